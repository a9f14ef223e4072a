"""jgpt.optim: schedules (record26 §5.7, §7.1, §7.3), the record's Adam (§7.2, §11.12) and the
combined optimizer, against independent numpy computations written from the spec."""
import contextlib
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from jgpt.config import OptimConfig, preset
from jgpt.optim import (GROUPS, adam, build_optimizer, lr_factor, muon_momentum, optimizer_step,
                        param_labels, window_blocks)

RECORD = OptimConfig()


@contextlib.contextmanager
def x64():
    with jax.enable_x64(True):
        yield


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# --------------------------------------------------------------------------------------------
# Schedules


def test_lr_factor_at_the_spec_steps():
    assert lr_factor(0, RECORD) == 1.0 and lr_factor(962, RECORD) == 1.0
    assert round(lr_factor(963, RECORD), 5) == 0.99943
    assert round(lr_factor(1500, RECORD), 5) == 0.38571
    assert round(lr_factor(1749, RECORD), 5) == 0.10114
    assert round(lr_factor(1749, OptimConfig(lr_floor=0.05)), 5) == 0.05121  # script B (§7.1)


def test_lr_factor_traced_matches_python():
    steps = np.arange(0, 1751)
    want = np.array([lr_factor(int(s), RECORD) for s in steps])
    got = np.asarray(jax.jit(lambda s: lr_factor(s, RECORD))(jnp.asarray(steps, jnp.int32)))
    np.testing.assert_allclose(got, want, rtol=2e-7, atol=0)
    with x64():
        got = np.asarray(jax.jit(lambda s: lr_factor(s, RECORD))(jnp.asarray(steps)))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


# record26 §5.7: (first step, last step, W)
WINDOW_TABLE = [(0, 129, 1), (130, 259, 2), (260, 388, 3), (389, 518, 4), (519, 648, 5), (649, 777, 6),
                (778, 907, 7), (908, 1037, 8), (1038, 1166, 9), (1167, 1296, 10), (1297, 1425, 11),
                (1426, 1555, 12), (1556, 1685, 13), (1686, 1750, 14)]


def test_window_schedule_is_the_spec_table():
    want = np.zeros(1751, np.int64)
    for lo, hi, w in WINDOW_TABLE:
        want[lo:hi + 1] = w
    got = np.array([window_blocks(s, RECORD) for s in range(1751)])
    np.testing.assert_array_equal(got, want)
    assert all(type(window_blocks(s, RECORD)) is int for s in (0, 900))
    traced = jax.jit(lambda s: window_blocks(s, RECORD))(jnp.arange(1751, dtype=jnp.int32))
    assert traced.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(traced), want)


@pytest.mark.parametrize("cfg", [RECORD, preset("tiny").optim], ids=["record26", "tiny"])
def test_window_schedule_equals_the_float_formula(cfg):
    """The integer form equals ceil(max(Wmax*s/N, 1)/128), the record's float formula."""
    for s in range(cfg.num_iterations + 1):
        assert window_blocks(s, cfg) == math.ceil(max(cfg.window_max_tokens * (s / cfg.num_iterations), 1) / 128)


def test_muon_momentum_warmup():
    for s, want in [(0, 0.85), (150, 0.90), (300, 0.95), (1000, 0.95)]:
        assert muon_momentum(s, RECORD) == pytest.approx(want, rel=1e-15, abs=0)
        assert float(muon_momentum(jnp.int32(s), RECORD)) == pytest.approx(want, rel=1e-7, abs=0)


# --------------------------------------------------------------------------------------------
# Groups


def record_names(num_layers=12):
    names = ["embed.weight", *[f"value_embeds.{k}.weight" for k in range(3)], "lm_head.weight", "scalars"]
    for i in range(num_layers):
        if i != 7:
            names += [f"blocks.{i}.attn.qkv_w", f"blocks.{i}.attn.c_proj.weight"]
        names += [f"blocks.{i}.mlp.c_fc.weight", f"blocks.{i}.mlp.c_proj.weight"]
    return names


def test_param_labels_follow_the_record_groups():
    params = {n: jax.ShapeDtypeStruct((64,) if n == "scalars" else (8, 8), jnp.float32) for n in record_names()}
    labels = param_labels(params)
    assert sum(v == "muon" for v in labels.values()) == 46  # record26 §7.3: 46 matrices
    assert [n for n, v in labels.items() if v == "adam_embed"] == [
        "embed.weight", "value_embeds.0.weight", "value_embeds.1.weight", "value_embeds.2.weight"]
    assert labels["lm_head.weight"] == "adam_head" and labels["scalars"] == "adam_scalars"
    with pytest.raises(ValueError, match="blocks.0.attn.lambdas"):
        param_labels({"blocks.0.attn.lambdas": jnp.zeros(2)})
    with pytest.raises(ValueError, match="rotary"):
        param_labels({"rotary.cos": jnp.zeros((4, 4))})


# --------------------------------------------------------------------------------------------
# Adam, against numpy


B1, B2, EPS = 0.8, 0.95, 1e-10


def ref_adam(p, grads_seq, lrs):
    """record26 §7.2 in numpy fp64: t from 1, eps on the uncorrected sqrt(v)."""
    p = np.asarray(p, np.float64)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads_seq, lrs), start=1):
        g = np.asarray(g, np.float64)
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        p = p - lr * (math.sqrt(1 - B2**t) / (1 - B1**t)) * m / (np.sqrt(v) + EPS)
    return p, m, v


@pytest.mark.parametrize("mode", ["fp64", "fp32"])
def test_adam_matches_numpy(mode):
    ctx = x64() if mode == "fp64" else contextlib.nullcontext()
    dt, tol = (jnp.float64, 1e-10) if mode == "fp64" else (jnp.float32, 1e-5)
    rng = np.random.default_rng(0)
    lrs = [0.6, 0.6, 0.5, 0.3, 0.1]
    with ctx:
        p0 = jnp.asarray(rng.standard_normal((32, 16)), dt)
        grads_seq = [jnp.asarray(rng.standard_normal((32, 16)) * 10.0 ** rng.uniform(-3, 1), dt) for _ in lrs]
        tx = adam(lambda s: jnp.asarray(lrs, dt)[s], (B1, B2), EPS)
        state, p = tx.init({"w": p0}), {"w": p0}
        step = jax.jit(tx.update)
        for g in grads_seq:
            u, state = step({"w": g}, state, p)
            p = optax.apply_updates(p, u)
    want_p, want_m, want_v = ref_adam(p0, grads_seq, lrs)
    assert p["w"].dtype == dt and state.mu["w"].dtype == dt and int(state.count) == len(lrs)
    assert rel_l2(p["w"] - p0, want_p - np.asarray(p0, np.float64)) < tol
    assert rel_l2(state.mu["w"], want_m) < tol and rel_l2(state.nu["w"], want_v) < tol


def test_adam_first_step_is_lr_sign():
    """t starts at 1: the first update is lr g/(|g| + eps') = lr sign(g) (record26 §7.2)."""
    with x64():
        g = jnp.asarray(np.random.default_rng(1).standard_normal(100))
        u, _ = adam(0.6).update({"w": g}, adam(0.6).init({"w": g}))
        # lr g / (|g| + eps / sqrt(1 - b2)): sign(g) to ~1e-6 for |g| >= 1e-3
        np.testing.assert_allclose(np.asarray(u["w"]), -0.6 * np.sign(np.asarray(g)), rtol=1e-6)
        g = np.asarray(g)
        np.testing.assert_allclose(np.asarray(u["w"]), -0.6 * g / (np.abs(g) + EPS / np.sqrt(1 - B2)), rtol=1e-12)


def _bf16(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16)


def test_adam_bf16_state_rounds_once_on_store():
    """Embeddings: p, g, m, v bf16; the step computes in fp32 from the stored values and rounds
    only when storing m, v and p (record26 §7.2, §11.12). Emulated in numpy fp32."""
    rng = np.random.default_rng(2)
    p0 = _bf16(rng.standard_normal((128, 64)))
    grads = [_bf16(rng.standard_normal((128, 64)) * 1e-2) for _ in range(3)]
    tx = adam(0.6)
    state, p = tx.init({"e": jnp.asarray(p0)}), {"e": jnp.asarray(p0)}
    m, v, pr = _bf16(np.zeros_like(p0, np.float32)), _bf16(np.zeros_like(p0, np.float32)), p0
    f32 = np.float32
    for t, g in enumerate(grads, start=1):
        u, state = jax.jit(tx.update)({"e": jnp.asarray(g)}, state, p)
        p = optax.apply_updates(p, u)
        gf = g.astype(f32)
        mf = m.astype(f32) * f32(B1) + gf * f32(1 - B1)  # torch: alpha=1 - beta1, a double cast to fp32
        vf = v.astype(f32) * f32(B2) + (f32(1 - B2) * gf) * gf
        step_size = f32(0.6) * (np.sqrt(f32(1) - f32(B2) ** f32(t)) / (f32(1) - f32(B1) ** f32(t)))
        new_p = _bf16(pr.astype(f32) - (mf / (np.sqrt(vf) + f32(EPS))) * step_size)
        for got, want, prev in ((p["e"], new_p, pr), (state.mu["e"], _bf16(mf), m), (state.nu["e"], _bf16(vf), v)):
            assert got.dtype == jnp.bfloat16
            got, want = np.asarray(got, np.float64), want.astype(np.float64)
            # XLA contracts the fp32 chain into FMAs under jit (numpy does not): a value within
            # an fp32 ulp of a bf16 rounding boundary may round the other way, one bf16 ulp
            # (or, after cancellation, an fp32 ulp of the operands). Measured: <= 0.3% of
            # elements; rounding after every op instead (eager torch) differs in ~33%.
            assert np.mean(got != want) < 1e-2
            scale = np.abs(prev.astype(np.float64)).max() + 1.0
            np.testing.assert_allclose(got, want, rtol=2**-7, atol=2**-22 * scale)
        # next step from jgpt's own stored values, so each step is checked on its own
        pr, m, v = (np.asarray(x) for x in (p["e"], state.mu["e"], state.nu["e"]))


def test_zero_gradients_never_move():
    """Dead scalars and never-seen embedding rows keep their values (record26 §3, §11.16)."""
    rng = np.random.default_rng(3)
    params = {"scalars": jnp.asarray(rng.standard_normal(16), jnp.float32),
              "embed.weight": jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16)}
    tx = build_optimizer(params, OptimConfig(num_iterations=10))
    state, p = tx.init(params), params
    step = jax.jit(tx.update)
    for _ in range(4):
        grads = {"scalars": jnp.asarray(rng.standard_normal(16), jnp.float32).at[6:12].set(0),
                 "embed.weight": jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16).at[50:].set(0)}
        u, state = step(grads, state, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_array_equal(np.asarray(p["scalars"][6:12]), np.asarray(params["scalars"][6:12]))
    np.testing.assert_array_equal(np.asarray(p["embed.weight"][50:]), np.asarray(params["embed.weight"][50:]))
    assert not np.array_equal(np.asarray(p["scalars"][:6]), np.asarray(params["scalars"][:6]))


# --------------------------------------------------------------------------------------------
# The combined optimizer: step s uses f(s), m(s) and Adam's t = s + 1 (record26 §7)

CFG = OptimConfig(num_iterations=8, cooldown_frac=0.5, lr_floor=0.1, muon_momentum_warmup=4)


def ref_schedules(s, cfg):
    x = s / cfg.num_iterations
    f = 1.0 if x < 1 - cfg.cooldown_frac else (1 - x) / cfg.cooldown_frac * (1 - cfg.lr_floor) + cfg.lr_floor
    phi = min(s / cfg.muon_momentum_warmup, 1)
    return f, cfg.muon_momentum_start + (cfg.muon_momentum_end - cfg.muon_momentum_start) * phi


def ref_ns64(g):
    a, b, c = 3.4445, -4.7750, 2.0315
    if g.ndim > 2:
        return np.stack([ref_ns64(s) for s in g])
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(5):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def mini_model(rng, dt, emb_dt):
    d, v = 32, 64
    shapes = {"embed.weight": (v, d), "value_embeds.0.weight": (v, d), "lm_head.weight": (v, d), "scalars": (16,),
              "blocks.0.attn.qkv_w": (3, d, d), "blocks.0.attn.c_proj.weight": (d, d),
              "blocks.0.mlp.c_fc.weight": (4 * d, d), "blocks.0.mlp.c_proj.weight": (d, 4 * d)}
    return {k: jnp.asarray(rng.standard_normal(s) * 0.1, emb_dt if "embed" in k else dt) for k, s in shapes.items()}


def run_reference(params, grads_seq, cfg):
    lr = {"embed.weight": cfg.adam_lr_embed, "value_embeds.0.weight": cfg.adam_lr_embed,
          "lm_head.weight": cfg.adam_lr_head, "scalars": cfg.adam_lr_scalars}
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    st = {k: [np.zeros_like(v), np.zeros_like(v)] for k, v in p.items()}
    for s, grads in enumerate(grads_seq):
        f, mom = ref_schedules(s, cfg)
        t = s + 1
        for k in p:
            g = np.asarray(grads[k], np.float64)
            if k.startswith("blocks."):
                buf = st[k][0] = mom * st[k][0] + (1 - mom) * g
                u = (1 - mom) * g + mom * buf
                p[k] = p[k] - cfg.muon_lr * f * max(1, g.shape[-2] / g.shape[-1]) ** 0.5 * ref_ns64(u)
            else:
                m = st[k][0] = cfg.adam_betas[0] * st[k][0] + (1 - cfg.adam_betas[0]) * g
                v = st[k][1] = cfg.adam_betas[1] * st[k][1] + (1 - cfg.adam_betas[1]) * g * g
                bc = math.sqrt(1 - cfg.adam_betas[1] ** t) / (1 - cfg.adam_betas[0] ** t)
                p[k] = p[k] - lr[k] * f * bc * m / (np.sqrt(v) + cfg.adam_eps)
    return p


@pytest.mark.parametrize("mode", ["fp64", "fp32"])
def test_build_optimizer_matches_numpy_across_warmup_and_cooldown(mode):
    ctx = x64() if mode == "fp64" else contextlib.nullcontext()
    dt, tol = (jnp.float64, 1e-10) if mode == "fp64" else (jnp.float32, 1e-5)
    rng = np.random.default_rng(4)
    with ctx:
        params = mini_model(rng, dt, dt)
        grads_seq = [{k: jnp.asarray(rng.standard_normal(v.shape), dt) for k, v in params.items()} for _ in range(7)]
        tx = build_optimizer(params, CFG, ns_dtype=dt)
        state, p = tx.init(params), params

        @jax.jit
        def train_step(p, state, grads):
            u, state = tx.update(grads, state, p)
            return optax.apply_updates(p, u), state

        for grads in grads_seq:
            p, state = train_step(p, state, grads)
        assert int(optimizer_step(state)) == 7
        assert set(state.inner_states) == set(GROUPS)
    want = run_reference(params, grads_seq, CFG)
    for k in params:
        assert p[k].dtype == dt
        assert rel_l2(p[k] - params[k], want[k] - np.asarray(params[k], np.float64)) < tol, k


def test_record_precision_policy_dtypes():
    """bf16 embeddings keep bf16 params and bf16 Adam state; Muon buffers and matrices fp32."""
    rng = np.random.default_rng(5)
    params = mini_model(rng, jnp.float32, jnp.bfloat16)
    tx = build_optimizer(params, CFG)
    grads = {k: jnp.asarray(rng.standard_normal(v.shape), v.dtype) for k, v in params.items()}
    u, state = jax.jit(tx.update)(grads, tx.init(params), params)
    new = optax.apply_updates(params, u)
    assert all(new[k].dtype == params[k].dtype for k in params)
    adam_state = state.inner_states["adam_embed"].inner_state
    assert adam_state.mu["embed.weight"].dtype == jnp.bfloat16
    assert adam_state.nu["value_embeds.0.weight"].dtype == jnp.bfloat16
    assert state.inner_states["muon"].inner_state.momentum["blocks.0.mlp.c_fc.weight"].dtype == jnp.float32


def test_explicit_step_equals_the_count(tmp_path):
    """A train step may pass step=s instead of relying on the counts; and the state round-trips
    through an orbax checkpoint and continues identically."""
    import orbax.checkpoint as ocp

    rng = np.random.default_rng(6)
    params = mini_model(rng, jnp.float32, jnp.bfloat16)
    grads = [{k: jnp.asarray(rng.standard_normal(v.shape), v.dtype) for k, v in params.items()} for _ in range(3)]
    tx = build_optimizer(params, CFG, ns_dtype=jnp.float32)
    s0 = tx.init(params)
    _, s1 = tx.update(grads[0], s0, params)
    _, s2 = tx.update(grads[1], s1, params)
    by_count, _ = tx.update(grads[2], s2, params)
    by_step, s3 = tx.update(grads[2], s2, params, step=jnp.int32(2))  # as a jitted step passes it
    assert int(optimizer_step(s3)) == 3
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), by_count, by_step)

    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "opt", s2)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "opt", jax.tree.map(ocp.utils.to_shape_dtype_struct, s2))
    assert jax.tree.structure(restored) == jax.tree.structure(s2)
    again, _ = tx.update(grads[2], restored, params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), by_count, again)
