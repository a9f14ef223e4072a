"""jgpt.step with a traced window: one compiled step for every window (Pallas / dense attention)
gives what the per-window static compile gives (record26 §5.7's schedule)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jgpt import config, model, optim, step

ROOT = Path(__file__).resolve().parent.parent
CFG = config.Config(model=config.ModelConfig(num_layers=2, num_heads=2, model_dim=64, head_dim=32, max_seq_len=1024),
                    optim=config.OptimConfig(num_iterations=10, muon_momentum_warmup=3, window_max_tokens=384))
T = 384  # three 128-token blocks: windows 1..3 differ


def data(S, steps, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        x = rng.integers(0, 2000, (S, T + 1)).astype(np.int32)
        x[:, 0] = 50256
        x[:, rng.integers(1, T, 2)] = 50256
        out.append((jnp.asarray(x[:, :-1]), jnp.asarray(x[:, 1:])))
    return out


def params():
    p = model.init_params(CFG.model, jax.random.PRNGKey(0), "fp32")
    # zero-initialised projections would hide the attention (design.md): perturb them
    return {k: v + 0.05 * jax.random.normal(jax.random.PRNGKey(i), v.shape) if "c_proj" in k or k == "lm_head.weight"
            else v for i, (k, v) in enumerate(p.items())}


def run(traced: bool, windows, monkeypatch):
    monkeypatch.setattr(step, "window_is_traced", lambda backend, policy: traced)
    opt = optim.build_optimizer(params(), CFG.optim, ns_dtype=jnp.float32)
    fn = step.make_train_step(CFG.model, opt, policy="fp32", backend="dense", donate=False)
    assert fn.window_is_traced is traced
    state, losses = step.init_state(params(), opt), []
    for (x, y), w in zip(data(2, len(windows)), windows):
        state, m = fn(state, x, y, w)
        losses.append(float(m["loss"]))
    return state, losses, fn._cache_size()


def test_which_backends_trace_the_window():
    assert step.window_is_traced("dense", "fp32") and step.window_is_traced("pallas", "record")
    assert not step.window_is_traced("blockwise", "record")
    assert not step.window_is_traced("pallas", "fp32")  # the kernels fall back to blockwise there


def test_traced_window_step_equals_static_and_compiles_once(monkeypatch):
    windows = [1, 2, 3, 1]
    s_static, l_static, n_static = run(False, windows, monkeypatch)
    s_traced, l_traced, n_traced = run(True, windows, monkeypatch)
    assert (n_static, n_traced) == (3, 1)
    # the same mask and the same arithmetic; XLA may fuse the traced-window program differently
    np.testing.assert_allclose(l_traced, l_static, rtol=1e-6)
    for k in s_static.params:
        a, b = np.asarray(s_traced.params[k]), np.asarray(s_static.params[k])
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), k
    assert len(set(l_static)) == len(l_static)  # the windows and steps do change the loss


def test_traced_window_eval_equals_static(monkeypatch):
    (x, y), = data(2, 1, seed=1)
    out = {}
    for traced in (False, True):
        monkeypatch.setattr(step, "window_is_traced", lambda backend, policy, t=traced: t)
        ev = step.make_eval_batch(CFG.model, policy="fp32", backend="dense")
        out[traced] = [np.asarray(ev(params(), x, y, w)) for w in (1, 2, 3)]
        assert ev._cache_size() == (1 if traced else 3)
    np.testing.assert_allclose(out[True], out[False], rtol=1e-6)
    assert not np.allclose(out[True][0], out[True][2])  # window 1 and 3 see different keys


SHARDED = textwrap.dedent("""
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import numpy as np
    import jax
    from jgpt import optim, sharding as shd, step
    import tests.test_step_window as t
    opt = optim.build_optimizer(t.params(), t.CFG.optim, ns_dtype=jax.numpy.float32)
    out = {}
    for name, mesh in (("one", None), ("two", shd.make_mesh())):
        fn = step.make_train_step(t.CFG.model, opt, policy="fp32", backend="dense", donate=False, mesh=mesh)
        state = step.init_state(t.params(), opt)
        if mesh is not None:
            state = shd.put(state, shd.state_shardings(state, mesh, False))
        losses = []
        for (x, y), w in zip(t.data(2, 3), (1, 3, 2)):
            state, m = fn(state, x, y, w)
            losses.append(float(m["loss"]))
        out[name] = {"traced": fn.window_is_traced, "compiles": fn._cache_size(), "losses": losses,
                     "devices": jax.device_count()}
    print("RESULT " + json.dumps(out))
""")


def test_sharded_traced_window_step_matches_single_device():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, r.stderr[-3000:]
    res = json.loads(line[len("RESULT "):])
    assert res["two"]["devices"] == 2 and res["two"]["traced"] and res["two"]["compiles"] == 1
    # the cross-device gradient sum adds in another order: fp32 rounding (tests/test_sharding.py)
    np.testing.assert_allclose(res["two"]["losses"], res["one"]["losses"], rtol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the Triton kernels run on GPUs only")
def test_data_parallel_step_runs_the_pallas_kernels_on_gpu():
    """The shard_map step (here over one GPU) with the Pallas attention and head kernels and a
    traced window: the kernels' outputs must carry the step's manual mesh axis (jax checks it,
    jgpt.pallas_compat.out_struct), and the step equals the plain jitted one."""
    from jgpt import sharding as shd
    cfg = config.ModelConfig(num_layers=2, num_heads=1, model_dim=128, head_dim=128, max_seq_len=1024)
    p = model.init_params(cfg, jax.random.PRNGKey(0), "record")
    p["lm_head.weight"] = jax.random.normal(jax.random.PRNGKey(1), p["lm_head.weight"].shape)
    opt = optim.build_optimizer(p, CFG.optim)
    (x, y), = data(1, 1)
    losses = {}
    for name, mesh in (("plain", None), ("sharded", shd.make_mesh())):
        fn = step.make_train_step(cfg, opt, policy="record", backend="pallas", mesh=mesh, donate=False)
        assert fn.window_is_traced
        st = step.init_state(p, opt)
        if mesh is not None:
            st = shd.put(st, shd.state_shardings(st, mesh, False))
        losses[name] = [float(fn(st, x, y, w)[1]["loss"]) for w in (1, 3)]
    np.testing.assert_allclose(losses["sharded"], losses["plain"], rtol=1e-6)


def test_head_chunk_reaches_the_step():
    """make_train_step(head_chunk=...) (bench.py's chunk setting) changes how the head is chunked:
    the same loss up to fp32 summation order, and the head's graph differs (so the setting is
    not ignored). (The updated weights are not compared: Adam's first step moves each weight by
    about lr * sign(g), and summation order flips the sign of near-zero gradients, design.md.)"""
    opt = optim.build_optimizer(params(), CFG.optim, ns_dtype=jnp.float32)
    out = {}
    for chunk in (None, 128):
        fn = step.make_train_step(CFG.model, opt, policy="fp32", backend="dense", donate=False, head_chunk=chunk)
        (x, y), = data(2, 1)
        _, m = fn(step.init_state(params(), opt), x, y, 2)
        out[chunk] = float(m["loss"]), fn.lower(step.init_state(params(), opt), x, y, 2).as_text().count("dot_general")
    assert out[128][0] == pytest.approx(out[None][0], rel=1e-6)
    assert out[128][1] > out[None][1]  # three head chunks, each its own GEMMs, instead of one
