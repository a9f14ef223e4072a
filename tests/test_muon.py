"""jgpt.muon against independent numpy computations (record26 §7.3, §11.13).

The references here are written from the spec's formulas, in numpy fp64 (or fp32 / an explicit
bf16 rounding emulation through ml_dtypes); they share no code with jgpt.
"""
import contextlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jgpt.muon import NS_COEFFS, _mm, muon, newton_schulz, shape_factor
from jgpt.rounding import round_to

A_, B_, C_ = 3.4445, -4.7750, 2.0315
SHAPES = [(64, 64), (256, 64), (64, 256), (3, 64, 64)]


@contextlib.contextmanager
def x64():
    with jax.enable_x64(True):
        yield


def T(x):
    return np.swapaxes(x, -1, -2)


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def ref_ns(g, dtype=np.float64, steps=5):
    """NS5 from the spec in numpy, one matrix at a time (per-slice normalisation by construction)."""
    g = np.asarray(g, dtype)
    if g.ndim > 2:
        return np.stack([ref_ns(s, dtype, steps) for s in g])
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / (np.sqrt(np.sum(x * x)) + dtype(1e-7))
    for _ in range(steps):
        a = x @ x.T
        b = dtype(B_) * a + dtype(C_) * (a @ a)
        x = dtype(A_) * x + b @ x
    return x.T if g.shape[0] > g.shape[1] else x


def singular_values(x):
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


def with_spectrum(rng, rows, cols, sv):
    u, _ = np.linalg.qr(rng.standard_normal((rows, len(sv))))
    v, _ = np.linalg.qr(rng.standard_normal((cols, len(sv))))
    return (u * sv) @ v.T


def test_coefficients_are_the_records():
    assert NS_COEFFS == (A_, B_, C_)


# --------------------------------------------------------------------------------------------
# Newton-Schulz


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(SHAPES),
       dtype=st.sampled_from(["bfloat16", "float32"]), spread=st.sampled_from([0.0, 1.0]))
def test_ns_singular_values_land_in_band(seed, shape, dtype, spread):
    """Singular values of at least 2e-3 of the input's Frobenius norm end in [0.5, 1.5]."""
    rng = np.random.default_rng(seed)
    if spread:  # a prescribed, badly conditioned spectrum down to 5e-4 of the largest value
        rows, cols = shape[-2:]
        k = min(rows, cols)
        g = np.stack([with_spectrum(rng, rows, cols, np.logspace(0, -3.3, k)) for _ in range(int(np.prod(shape[:-2])))])
        g = g.reshape(shape)
    else:
        g = rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 2)
    out = np.asarray(newton_schulz(jnp.asarray(g, jnp.float32), dtype=jnp.dtype(dtype)), np.float64)
    assert out.shape == shape
    for gi, oi in zip(g.reshape(-1, *shape[-2:]), out.reshape(-1, *shape[-2:])):
        u, sv_in, vt = np.linalg.svd(gi, full_matrices=False)
        big = sv_in >= 2e-3 * np.linalg.norm(gi)
        assert big.any()
        # NS keeps the singular vectors (O = U p(S) Vᵀ): read p(s_i) along each input direction
        mapped = np.einsum("ji,jk,ik->i", u, oi, vt)
        assert np.all((mapped[big] >= 0.5) & (mapped[big] <= 1.5)), (sv_in[big], mapped[big])
        sv_out = singular_values(oi)
        assert sv_out.max() <= 1.5 and np.sum(sv_out >= 0.5) >= big.sum()


@pytest.mark.parametrize("shape", SHAPES)
def test_ns_fp64_matches_numpy(shape):
    rng = np.random.default_rng(1)
    g = rng.standard_normal(shape)
    with x64():
        out = np.asarray(newton_schulz(jnp.asarray(g), dtype=jnp.float64))
    assert out.dtype == np.float64
    assert rel_l2(out, ref_ns(g)) < 1e-10


@pytest.mark.parametrize("shape", SHAPES)
def test_ns_fp32_matches_numpy(shape):
    rng = np.random.default_rng(2)
    g = rng.standard_normal(shape).astype(np.float32)
    out = np.asarray(newton_schulz(jnp.asarray(g), dtype=jnp.float32))
    assert out.dtype == np.float32
    assert rel_l2(out, ref_ns(g)) < 1e-5
    assert rel_l2(out, ref_ns(g, np.float32)) < 1e-5


def _bf16(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def ref_ns_bf16(g, steps):
    """The record's compiled bf16 NS, rounding written out: matmuls accumulate wide and round
    to bf16; `b*A + (c*A)@A` (Python precedence) and `a*X + B@X` are fused, rounded once."""
    x = _bf16(g)
    x = _bf16(x / (_bf16(np.sqrt(np.sum(x * x))) + 1e-7))
    for _ in range(steps):
        a = _bf16(x @ x.T)
        b = _bf16(B_ * a + _bf16(_bf16(C_ * a) @ a))
        x = _bf16(A_ * x + _bf16(b @ x))
    return x


def test_ns_bf16_reproduces_the_records_rounding():
    """One bf16 iteration equals the emulation bit for bit (but for rare fp32 summation-order
    flips); a later bf16 rounding flip anywhere spreads through A = XXᵀ, so after 5 steps two
    faithful implementations differ by ~1e-2 in relative L2 (bf16 NS is chaotic at that level)."""
    rng = np.random.default_rng(3)
    g = rng.standard_normal((64, 256)).astype(np.float32)
    for steps in (0, 1):
        out = np.asarray(newton_schulz(jnp.asarray(g), steps=steps), np.float64)
        assert np.mean(out == ref_ns_bf16(g, steps)) > 0.999
    out = np.asarray(newton_schulz(jnp.asarray(g)), np.float64)
    assert rel_l2(out, ref_ns_bf16(g, 5)) < 3e-2
    assert rel_l2(out, ref_ns(g)) < 5e-2  # bf16 NS vs exact NS


def test_bf16_matmul_on_cpu_accumulates_wide_and_rounds_once():
    """What XLA CPU does with bf16 dots (documented in jgpt.muon): a bare bf16 matmul equals
    round_bf16(exact product); `_mm` does the same explicitly and keeps the rounding under jit
    inside a fused chain."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((64, 256)), jnp.bfloat16)
    y = jnp.asarray(rng.standard_normal((256, 64)), jnp.bfloat16)
    z = jnp.asarray(rng.standard_normal((64, 64)), jnp.bfloat16)
    exact = np.asarray(x, np.float64) @ np.asarray(y, np.float64)
    assert np.array_equal(np.asarray(x @ y, np.float64), _bf16(exact))
    assert np.array_equal(np.asarray(_mm(x, y, jnp.bfloat16), np.float64), _bf16(exact))
    want = _bf16(np.float32(A_) * np.asarray(z, np.float32) + _bf16(exact).astype(np.float32))
    f32 = jnp.float32
    fused = jax.jit(lambda x, y, z: round_to(A_ * z.astype(f32) + _mm(x, y, jnp.bfloat16), jnp.bfloat16))
    assert np.array_equal(np.asarray(fused(x, y, z), np.float64), want)
    # (A bare `(x @ y).astype(f32)` in that chain loses the rounding under jit on jax 0.10.2
    # CPU, which upcasts the bf16 dot; jax 0.11.2 CPU runs it natively in bf16 and keeps it.)


def test_round_is_round_to_nearest_even():
    bits = np.random.default_rng(11).integers(0, 2**32, 200000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    got = np.asarray(jax.jit(lambda v: round_to(v, jnp.bfloat16))(jnp.asarray(x)))
    want = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(got, want)


def test_ns_normalises_each_qkv_slice():
    """The [3, hdim, d] tensor is three matrices: each slice normalised on its own (§7.3)."""
    rng = np.random.default_rng(5)
    g = rng.standard_normal((3, 64, 64)) * np.array([1e-3, 1.0, 1e3])[:, None, None]
    for dtype in (jnp.float32, jnp.bfloat16):
        out = np.asarray(newton_schulz(jnp.asarray(g, jnp.float32), dtype=dtype), np.float64)
        for i in range(3):
            alone = np.asarray(newton_schulz(jnp.asarray(g[i], jnp.float32), dtype=dtype), np.float64)
            np.testing.assert_allclose(out[i], alone, rtol=0, atol=1e-6 if dtype == jnp.float32 else 0)
            sv = singular_values(out[i])
            assert sv.min() > 0.5 and sv.max() < 1.5
    # contrast: one norm over the whole tensor would leave the 1e-3 slice far outside the band
    x = g / np.linalg.norm(g)
    for _ in range(5):
        a = x @ T(x)
        x = A_ * x + (B_ * a + C_ * (a @ a)) @ x
    assert singular_values(x[0]).max() < 0.1


def test_ns_transposes_tall_matrices():
    rng = np.random.default_rng(6)
    g = jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(newton_schulz(g, dtype=jnp.float32)),
                                  np.asarray(newton_schulz(g.T, dtype=jnp.float32)).T)


def test_shape_factor_is_two_only_for_c_fc():
    assert shape_factor((3072, 768)) == 2.0  # c_fc (out, in)
    assert shape_factor((768, 3072)) == 1.0  # mlp c_proj
    assert shape_factor((768, 768)) == 1.0  # attn c_proj
    assert shape_factor((3, 768, 768)) == 1.0  # qkv: the last two dims
    assert shape_factor((256, 64)) == 2.0


# --------------------------------------------------------------------------------------------
# The transformation


def mini_matrices(rng, dtype):
    shapes = {"blocks.0.attn.qkv_w": (3, 64, 64), "blocks.0.attn.c_proj.weight": (64, 64),
              "blocks.0.mlp.c_fc.weight": (256, 64), "blocks.0.mlp.c_proj.weight": (64, 256),
              "blocks.1.mlp.c_fc.weight": (256, 64)}  # a second c_fc: exercises the stacked NS
    return {k: jnp.asarray(rng.standard_normal(s) * 0.02, dtype) for k, s in shapes.items()}


def ref_lr(s):  # test schedules, spec-shaped: constant, then a linear ramp down
    return 0.05 * (1.0 if s < 3 else 1.0 - 0.1 * (s - 2))


def ref_momentum(s):  # warm-up 0.85 -> 0.95 over 4 steps
    phi = min(s / 4, 1)
    return 0.85 * (1 - phi) + 0.95 * phi


def run_ref_muon(params, grads_seq, dtype):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    buf = {k: np.zeros_like(v) for k, v in p.items()}
    for s, grads in enumerate(grads_seq):
        m, lr = ref_momentum(s), ref_lr(s)
        for k in p:
            g = np.asarray(grads[k], np.float64)
            buf[k] = m * buf[k] + (1 - m) * g
            u = (1 - m) * g + m * buf[k]
            factor = max(1.0, p[k].shape[-2] / p[k].shape[-1]) ** 0.5
            p[k] = p[k] - lr * factor * ref_ns(u, dtype)
    return p, buf


@pytest.mark.parametrize("mode", ["fp64", "fp32"])
def test_muon_matches_numpy_across_momentum_warmup(mode):
    rng = np.random.default_rng(7)
    ctx = x64() if mode == "fp64" else contextlib.nullcontext()
    dt, tol, npdt = (jnp.float64, 1e-10, np.float64) if mode == "fp64" else (jnp.float32, 1e-5, np.float32)
    with ctx:
        params = mini_matrices(rng, dt)
        grads_seq = [{k: jnp.asarray(rng.standard_normal(v.shape), dt) for k, v in params.items()} for _ in range(6)]
        def lr(s):  # ref_lr and ref_momentum on a traced count (int32 / int is fp32: cast first)
            s = jnp.asarray(s).astype(dt)
            return 0.05 * jnp.where(s < 3, 1.0, 1.0 - 0.1 * (s - 2))

        def momentum(s):
            phi = jnp.minimum(jnp.asarray(s).astype(dt) / 4, 1)
            return 0.85 * (1 - phi) + 0.95 * phi

        tx = muon(lr, momentum, ns_dtype=dt)
        state = tx.init(params)
        step = jax.jit(tx.update)
        p = params
        for grads in grads_seq:
            updates, state = step(grads, state, p)
            p = jax.tree.map(lambda a, u: a + u, p, updates)
        assert int(state.count) == 6
        want_p, want_buf = run_ref_muon(params, grads_seq, npdt)
        for k in params:
            assert p[k].dtype == dt and state.momentum[k].dtype == dt
            assert rel_l2(p[k], want_p[k]) < tol, k
            assert rel_l2(p[k] - params[k], want_p[k] - np.asarray(params[k], np.float64)) < tol, k
            assert rel_l2(state.momentum[k], want_buf[k]) < tol, k


def test_muon_update_is_minus_lr_factor_times_ns():
    rng = np.random.default_rng(8)
    params = mini_matrices(rng, jnp.float32)
    grads = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in params.items()}
    tx = muon(0.05, 0.9, ns_dtype=jnp.float32)  # fp32 NS: bf16 NS would amplify ulp-level input noise
    updates, state = tx.update(grads, tx.init(params), params)
    for k, g in grads.items():
        u = 0.19 * np.asarray(g, np.float64)  # first step: buf = 0.1 g, u = 0.1 g + 0.9 buf
        o = np.asarray(newton_schulz(jnp.asarray(u, jnp.float32), dtype=jnp.float32), np.float64)
        factor = 2.0 if "c_fc" in k else 1.0
        assert updates[k].dtype == jnp.float32 and state.momentum[k].dtype == jnp.float32
        assert rel_l2(updates[k], -0.05 * factor * o) < 1e-5, k


def test_dead_matrix_never_moves():
    rng = np.random.default_rng(9)
    params = mini_matrices(rng, jnp.float32)
    tx = muon(0.05, 0.95)
    state = tx.init(params)
    for _ in range(3):
        grads = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in params.items()}
        grads["blocks.0.attn.c_proj.weight"] = jnp.zeros((64, 64), jnp.float32)
        updates, state = tx.update(grads, state, params)
        assert np.all(np.asarray(updates["blocks.0.attn.c_proj.weight"]) == 0)
        assert np.all(np.isfinite(np.asarray(updates["blocks.0.mlp.c_fc.weight"])))
    assert np.all(np.asarray(state.momentum["blocks.0.attn.c_proj.weight"]) == 0)


def test_explicit_step_drives_the_schedules():
    rng = np.random.default_rng(10)
    params = mini_matrices(rng, jnp.float32)
    grads = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in params.items()}
    f32 = lambda s: jnp.asarray(s).astype(jnp.float32)  # noqa: E731 - same value for int and count
    tx = muon(lambda s: 0.05 / (1 + f32(s)), lambda s: 0.8 + 0.01 * f32(s), ns_dtype=jnp.float32)
    state = tx.init(params)
    by_count = tx.update(grads, state._replace(count=jnp.asarray(5, jnp.int32)), params)
    by_step = tx.update(grads, state, params, step=5)
    assert int(by_step[1].count) == 6 and int(by_count[1].count) == 6
    for k in params:
        np.testing.assert_array_equal(np.asarray(by_count[0][k]), np.asarray(by_step[0][k]))


def test_rejects_vectors():
    with pytest.raises(ValueError, match="matrices"):
        muon(0.05, 0.95).init({"x": jnp.zeros(4)})
