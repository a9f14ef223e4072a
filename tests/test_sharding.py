"""jgpt.sharding and the data-parallel / FSDP train step on 8 simulated CPU devices.

XLA_FLAGS=--xla_force_host_platform_device_count=8 is read when jax starts, so every multi-device
check runs in its own Python process (design.md, "Distribution") and reports JSON back.

Equality of the sharded and the single-device step: the per-sequence losses and gradients are the
same functions, but the cross-device sum adds in another order and XLA compiles the partitioned
program's fusions a little differently, so the two differ by fp32 rounding per step. Adam's
lr * sign(g) on tiny gradients and bf16 Newton-Schulz turn such differences into lr-sized ones
over several steps (design.md, parity tier 0), so the multi-step trajectories are compared in
fp64, where rounding is 1e-16 and any logic difference shows, and the fp32 and record-precision
gradients are compared after one step within their own rounding.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

COMMON = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax
    if os.environ.get("X64") == "1":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jgpt import config, model, optim, sharding as shd, step

    CFG = config.Config(
        model=config.ModelConfig(num_layers=2, num_heads=2, model_dim=64, head_dim=32, max_seq_len=1024),
        optim=config.OptimConfig(num_iterations=10, muon_momentum_warmup=3, window_max_tokens=256))
    T = 256

    def make_params(policy):
        params = model.init_params(CFG.model, jax.random.PRNGKey(0), policy)
        # zero-initialised weights hide bugs (design.md): perturb c_proj and lm_head
        out = {}
        for n, (k, v) in enumerate(params.items()):
            if "c_proj" in k or k == "lm_head.weight":
                v = (v + 0.05 * jax.random.normal(jax.random.PRNGKey(100 + n), v.shape)).astype(v.dtype)
            out[k] = v
        return out

    def batches(S, steps):
        rng = np.random.default_rng(0)
        out = []
        for _ in range(steps):
            x = rng.integers(0, 2000, (S, T + 1)).astype(np.int32)
            x[:, 0] = 50256
            x[:, rng.integers(1, T, 3)] = 50256  # several documents per sequence
            out.append((x[:, :-1], x[:, 1:]))
        return out

    def run(params, optimizer, policy, data, windows, mesh=None, fsdp=False):
        state = step.init_state(jax.tree.map(jnp.copy, params), optimizer)
        fn = step.make_train_step(CFG.model, optimizer, policy=policy, mesh=mesh, fsdp=fsdp)
        if mesh is not None:
            state = shd.put(state, shd.state_shardings(state, mesh, fsdp))
        losses = []
        for (x, y), w in zip(data, windows):
            state, m = fn(state, x, y, w)
            losses.append(float(m["loss"]))
        return state, losses

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))
""")

TRAJECTORY = COMMON + textwrap.dedent("""
    # Several steps through the momentum warmup, all in fp64 (Muon's NS too). Window 2: long
    # layers see 2 blocks, short ones 1 (one compile per program; windows are static ints).
    params = make_params("fp64")
    opt = optim.build_optimizer(params, CFG.optim, ns_dtype=jnp.float64)
    windows = [2, 2, 2]
    result = {}
    data = batches(8, len(windows))
    ref, ref_losses = run(params, opt, "fp64", data, windows)
    for name, ndev, fsdp in (("dp8", 8, False), ("fsdp8", 8, True), ("dp4_accumulate", 4, False)):
        mesh = shd.make_mesh(jax.devices()[:ndev])
        st, losses = run(params, opt, "fp64", data, windows, mesh=mesh, fsdp=fsdp)
        result[name] = dict(
            losses=losses, ref_losses=ref_losses,
            param_rel={k: rel(st.params[k], ref.params[k]) for k in ref.params},
            opt_rel=max(rel(a, b) for a, b in zip(jax.tree.leaves(st.opt_state), jax.tree.leaves(ref.opt_state))),
            step=int(st.step),
            specs={k: list(v.sharding.spec) for k, v in st.params.items()},
            moment_specs=[list(l.sharding.spec) for l in jax.tree.leaves(st.opt_state) if l.ndim >= 2])
    print("RESULT" + json.dumps(result))
""")

GRADIENTS = COMMON + textwrap.dedent("""
    # One step whose optimizer passes the averaged gradient through as the update and keeps it
    # as its state: st.opt_state is the gradient exactly as the step computed it (bf16 for the
    # record's embeddings), before the update is added to the weights and rounded to their dtype.
    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def keep(updates, state, params=None, **extra):
        return updates, updates

    recorder = optax.with_extra_args_support(optax.GradientTransformation(init, keep))
    result = {}
    for policy in ("fp32", "record"):
        params = make_params(policy)
        data = batches(8, 1)
        ref, ref_losses = run(params, recorder, policy, data, [1])
        st, losses = run(params, recorder, policy, data, [1], mesh=shd.make_mesh())
        g_ref, g = ref.opt_state, st.opt_state
        result[policy] = dict(losses=losses, ref_losses=ref_losses,
                              dtypes={k: str(g[k].dtype) for k in g_ref},
                              grad_rel={k: rel(g[k], g_ref[k]) for k in g_ref},
                              grad_norm={k: float(np.linalg.norm(np.asarray(g_ref[k], np.float64))) for k in g_ref})
    print("RESULT" + json.dumps(result))
""")

NS_SPLIT = COMMON + textwrap.dedent("""
    import re
    from jgpt import muon
    mesh = shd.make_mesh()
    g = jax.random.normal(jax.random.PRNGKey(0), (5, 64, 128))

    def f(g):
        with shd.distributed_newton_schulz(mesh):
            return muon.newton_schulz(g)

    text = jax.jit(f).lower(g).compile().as_text()
    result = dict(
        shapes=sorted(set(re.findall(r"bf16\\[\\d+,64,128\\]", text))),
        all_gather="all-gather" in text,
        equal=bool(np.array_equal(np.asarray(jax.jit(f)(g), np.float32),
                                  np.asarray(muon.newton_schulz(g), np.float32))),
        restored=muon.newton_schulz is not None and "sharded" not in muon.newton_schulz.__name__)
    print("RESULT" + json.dumps(result))
""")


def _run(script: str, **env) -> dict:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    full_env.pop("XLA_FLAGS", None)
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=full_env, capture_output=True, text=True,
                       timeout=1200)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
    assert p.returncode == 0 and line, f"subprocess failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return json.loads(line[-1][len("RESULT"):])


@pytest.fixture(scope="module")
def trajectory():
    return _run(TRAJECTORY, X64="1")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dp8", "fsdp8", "dp4_accumulate"])
def test_sharded_steps_equal_single_device_fp64(trajectory, mode):
    r = trajectory[mode]
    assert r["step"] == 3
    np.testing.assert_allclose(r["losses"], r["ref_losses"], rtol=1e-12, atol=0)
    worst = max(r["param_rel"].values())
    assert worst < 1e-11, f"{mode}: params differ from the single-device step: {r['param_rel']}"
    assert r["opt_rel"] < 1e-11
    # losses actually moved (not a trivially unchanged model)
    assert r["ref_losses"][-1] < r["ref_losses"][0] - 0.1


@pytest.mark.slow
def test_fsdp_shards_params_and_optimizer_state(trajectory):
    fsdp, dp = trajectory["fsdp8"], trajectory["dp8"]
    assert fsdp["specs"]["embed.weight"] == ["data"]
    assert fsdp["specs"]["blocks.0.attn.qkv_w"] == [None, "data"]  # [3, 64, 64]: axis 1
    assert fsdp["specs"]["scalars"] == ["data"]  # 16 scalars over 8 devices
    assert all("data" in s for s in fsdp["moment_specs"])  # Adam m, v and Muon buffers split too
    assert all(s == [] for s in dp["specs"].values())


@pytest.mark.slow
def test_sharded_gradients_equal_within_rounding():
    """The step's averaged gradient (what the optimizer receives), sharded vs single device.

    Compared before the update is added to the weights. This test used to compare new - old
    weights, bf16(w + g) - w for the record's bf16 embeddings, where the rounding to w's ulp
    dominates: N(0, 1) weights have ulps up to 2^-8 = 3.9e-3 while the step's gradient entries
    are ~1e-3, so most entries round to 0 or 1 ulp, and wherever the two paths' gradients
    straddle a rounding midpoint (bf16 gradients often sit exactly on one: a tie) that entry's
    measured difference is a whole ulp of w. The relative L2 was then a sum over a handful of
    such flips out of 3.2M entries: 9 of them gave 1.26e-2 for embed.weight. model.embedding's
    fp32 per-sequence sum changes only rows a sequence looks up more than once, BOS's above all
    (4 times in every sequence here); it moved one BOS-row entry (w = 0.699; g = 1.508 ulps of w
    in one path, exactly 1.5 in the other, a tie rounded to even) across, alone 61% of the
    squared difference: 2.03e-2.
    The gradients themselves differ by 1.3e-3 there, before and after that change."""
    r = _run(GRADIENTS)
    # fp32: the cross-device sum and the partitioned program's fusions reorder fp32 sums only.
    # record: the embeddings' gradients are bf16 (record26 §3, §11.12), and each path sums the 8
    # sequences' bf16 gradients in bf16 in its own order (scan vs psum): up to 7 roundings per
    # path of at most half an ulp (2^-8 of the partial sum), random in sign, so the rms of the
    # difference is at most sqrt(14) * 2^-8 / sqrt(3) = 8.4e-3 of rows all 8 sequences touch, and
    # 0 for rows only one touches (measured: value_embeds.0 2.6e-3, embed.weight 1.3e-3, fp32
    # params <= 3e-5). A missed or doubled sequence would move a gradient by ~1/8.
    for policy, tol in (("fp32", 1e-5), ("record", 1e-2)):
        res = r[policy]
        # the forward is the same function per sequence: the step-0 loss agrees to rounding
        np.testing.assert_allclose(res["losses"], res["ref_losses"], rtol=1e-6)
        if policy == "record":
            assert res["dtypes"]["embed.weight"] == "bfloat16"  # the bf16 sums the bound is for
        for k, v in res["grad_rel"].items():
            if res["grad_norm"][k] > 0:
                assert v < tol, f"{policy}: gradient of {k} differs by {v:.2e} (relative L2)"


@pytest.mark.slow
def test_muon_orthogonalises_whole_matrices_per_device():
    r = _run(NS_SPLIT)
    # 5 matrices padded to 8, one whole [64, 128] matrix per device, then gathered
    assert "bf16[1,64,128]" in r["shapes"]
    assert r["all_gather"]
    assert r["equal"], "sharded Newton-Schulz differs from the unsharded one"
    assert r["restored"]


# ---------------------------------------------------------------------------------------------
# Pure functions (one device)


def test_fsdp_axis_and_spec():
    from jax.sharding import PartitionSpec as P

    from jgpt import sharding as shd

    assert shd.fsdp_axis((50304, 768), 8) == 0
    assert shd.fsdp_axis((3, 768, 768), 8) == 1
    assert shd.fsdp_axis((64,), 8) == 0
    assert shd.fsdp_axis((), 8) is None
    assert shd.fsdp_axis((3, 5), 8) is None
    assert shd.fsdp_axis((50304, 768), 1) is None
    assert shd.fsdp_spec((3, 768, 768), 8) == P(None, "data")
    assert shd.fsdp_spec((7,), 8) == P()


def test_check_divisible_names_the_setting():
    from jgpt import sharding as shd

    class FakeMesh:
        size = 8

    shd.check_divisible(8, 40, FakeMesh())
    with pytest.raises(ValueError, match="seqs_per_step=6 is not divisible by the 8 devices"):
        shd.check_divisible(6, 40, FakeMesh())
    with pytest.raises(ValueError, match="val_tokens"):
        shd.check_divisible(8, 4, FakeMesh())


def test_initialize_distributed_single_process(monkeypatch):
    from jgpt import sharding as shd

    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    assert shd.initialize_distributed() is False
    with pytest.raises(ValueError, match="coordinator"):
        shd.initialize_distributed(num_processes=2)
    with pytest.raises(ValueError, match="num_processes"):
        shd.initialize_distributed("localhost:1234")


@pytest.mark.slow
def test_single_device_mesh_step_matches_plain_step():
    """The mesh path on one device is the plain step (same program up to the shard_map)."""
    import jax
    import jax.numpy as jnp

    from jgpt import config, model, optim, sharding as shd, step

    cfg = config.ModelConfig(num_layers=2, num_heads=2, model_dim=64, head_dim=32, max_seq_len=512)
    params = model.init_params(cfg, jax.random.PRNGKey(0), "fp32")
    opt = optim.build_optimizer(params, config.OptimConfig(num_iterations=10))
    rng = np.random.default_rng(1)
    x = rng.integers(0, 1000, (2, 129)).astype(np.int32)
    x[:, 0] = 50256
    out = []
    for mesh in (None, shd.make_mesh(jax.devices()[:1])):
        st = step.init_state(jax.tree.map(jnp.copy, params), opt)
        st, m = step.make_train_step(cfg, opt, policy="fp32", mesh=mesh)(st, x[:, :128], x[:, 1:], 1)
        out.append((float(m["loss"]), st))
    assert out[0][0] == out[1][0]
    for k in params:
        np.testing.assert_array_equal(np.asarray(out[0][1].params[k]), np.asarray(out[1][1].params[k]))
