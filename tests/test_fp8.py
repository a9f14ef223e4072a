"""jgpt.fp8 against a numpy emulation (ml_dtypes casts), error bounds and saturation."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jgpt import fp8
from jgpt.fp8 import E4M3_MAX, E5M2_MAX, fp8_linear, fp8_matmul, quantize

D = 128
X_S, W_S, G_S = D ** 0.5 / 448, 24 / 448, 1 / 448  # record26 §5.9 at model_dim 128


def np_quant(a, scale, dtype, top):
    q = np.clip(np.asarray(a, np.float32) * (np.float32(1) / np.float32(scale)), -top, top)
    return q.astype(dtype).astype(np.float32)


def emulate(x, w, g):
    """record26 §5.9 in numpy float64 over the fp8 grids: (value, sum of |terms|) per output."""
    x8 = np_quant(x, X_S, ml_dtypes.float8_e4m3fn, 448).astype(np.float64)
    w8 = np_quant(w, W_S, ml_dtypes.float8_e4m3fn, 448).astype(np.float64)
    g8 = np_quant(g, G_S, ml_dtypes.float8_e5m2, 57344).astype(np.float64)
    a = lambda s, t: np.float64(np.float32(s) * np.float32(t))
    return [(l @ r * a(*s), np.abs(l) @ np.abs(r) * a(*s))
            for l, r, s in ((x8, w8.T, (X_S, W_S)), (g8, w8, (G_S, W_S)), (g8.T, x8, (X_S, G_S)))]


# Hopper FP8 tensor cores do not accumulate like IEEE fp32. Measured on H100 (jax 0.11.2), as a
# fraction of sum|terms|: the forward's fast accumulation (precision DEFAULT, the record's
# use_fast_accum=True, record26 §5.9) up to 5.6e-4; the backward's precise mode (cuBLASLt) up
# to 1.5e-5, and XLA's own GEMM for small shapes up to 5e-5. CPU accumulates in fp32.
ON_GPU = jax.default_backend() == "gpu"
FAST_ACCUM, PRECISE_ACCUM = (2.0 ** -9, 2.0 ** -13) if ON_GPU else (0.0, 0.0)


def assert_close_to_emulation(got, exact, abs_terms, n, out_ulp, fast=False):
    """fp32 accumulation of n terms (error <= n eps32 sum|terms|), then one rounding to the
    output dtype (relative ulp `out_ulp`)."""
    err = np.abs(np.asarray(got, np.float64) - exact)
    acc = max(n * 2.0 ** -24, FAST_ACCUM if fast else PRECISE_ACCUM)
    bound = acc * abs_terms + out_ulp * np.abs(exact) + 1e-30
    assert np.all(err <= bound), np.max(err / bound)


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, D))
    x = jnp.asarray(x / np.sqrt((x ** 2).mean(-1, keepdims=True)), jnp.bfloat16)  # rms-normed, as the head's input
    w = jnp.asarray(rng.standard_normal((512, D)) * 1.5, jnp.float32)
    g = jnp.asarray(rng.standard_normal((256, 512)) * 0.01, jnp.bfloat16)
    return x, w, g


def run(x, w, g):
    out, vjp = jax.vjp(lambda x, w: fp8_matmul(x, w, X_S, W_S, G_S), x, w)
    return (out, *vjp(g))


def test_quantize_matches_ml_dtypes(case):
    x, w, _ = case
    for a, s in ((x, X_S), (w, W_S)):
        got = np.asarray(jax.jit(lambda a: quantize(a, s, jnp.float8_e4m3fn))(a)).astype(np.float32)
        np.testing.assert_array_equal(got, np_quant(a, s, ml_dtypes.float8_e4m3fn, 448))


def test_forward_backward_match_emulation(case):
    x, w, g = case
    out, gx, gw = jax.jit(run)(x, w, g)
    assert (out.dtype, gx.dtype, gw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
    (e_out, a_out), (e_gx, a_gx), (e_gw, a_gw) = emulate(x, w, g)
    assert_close_to_emulation(out, e_out, a_out, D, 2.0 ** -8, fast=True)
    assert_close_to_emulation(gx, e_gx, a_gx, 512, 2.0 ** -8)
    assert_close_to_emulation(gw, e_gw, a_gw, 256, 2.0 ** -24)


def test_error_bound_against_exact_matmul(case):
    """FP8 (3 mantissa bits for x and w) stays within a few percent of the exact product."""
    x, w, g = case
    out, gx, gw = jax.jit(run)(x, w, g)
    xf, wf, gf = (np.asarray(a, np.float64) for a in (x, w, g))
    for got, exact, bound in ((out, xf @ wf.T, 0.05), (gx, gf @ wf, 0.1), (gw, gf.T @ xf, 0.1)):
        rel = np.linalg.norm(np.asarray(got, np.float64) - exact) / np.linalg.norm(exact)
        assert rel < bound, rel


def test_saturation_not_nan():
    """ml_dtypes turns overflow into NaN (e4m3) / inf (e5m2); the clip saturates (record26 §11.9)."""
    x = jnp.asarray([[1000.0, -1000.0, 1.0, 0.0]], jnp.bfloat16)
    w = jnp.asarray([[1000.0, 1000.0, -1000.0, 0.5]], jnp.float32)
    g = jnp.asarray([[1e6]], jnp.bfloat16)
    assert np.isnan(np.float32(1000.0 / X_S).astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
    assert np.isinf(np.float32(1e6 / G_S).astype(ml_dtypes.float8_e5m2).astype(np.float32))
    x8 = np.asarray(quantize(x, X_S, jnp.float8_e4m3fn), np.float32)
    np.testing.assert_array_equal(x8[0, :2], [E4M3_MAX, -E4M3_MAX])
    assert np.asarray(quantize(g, G_S, jnp.float8_e5m2), np.float32)[0, 0] == E5M2_MAX
    out, gx, gw = jax.jit(run)(x, w, g)
    for a in (out, gx, gw):
        assert np.all(np.isfinite(np.asarray(a, np.float32)))
    # the saturated operands give what the emulation (which clips too) gives
    (e_out, a_out), _, _ = emulate(x, w, g)
    assert_close_to_emulation(out, e_out, a_out, 4, 2.0 ** -8, fast=True)


def test_linear_leading_axes_and_jit_free(case):
    x, w, _ = case
    a = fp8_linear(x.reshape(2, 128, D), w, X_S, W_S, G_S)
    b = jax.jit(lambda x, w: fp8_matmul(x, w, X_S, W_S, G_S))(x, w)
    assert a.shape == (2, 128, 512)
    np.testing.assert_array_equal(np.asarray(a.reshape(256, 512), np.float32), np.asarray(b, np.float32))
    with pytest.raises(ValueError, match="fp8_matmul needs"):
        fp8_matmul(x, w.T, X_S, W_S, G_S)


@pytest.mark.skipif(not ON_GPU, reason="cuBLASLt FP8 GEMMs exist on GPU only")
def test_gpu_lowers_to_cublaslt_fp8_gemms():
    """design.md: the optimised HLO holds the FP8 custom call for all three GEMMs (grepping for
    the fp8 converts would pass on a silent fallback). Head-sized operands: XLA may pick
    another kernel for tiny ones."""
    x, w = jnp.ones((4096, 768), jnp.bfloat16), jnp.ones((50304, 768), jnp.float32)
    loss = lambda x, w: jnp.sum(fp8_matmul(x, w, X_S, W_S, G_S).astype(jnp.float32))
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))  # grad alone would drop the forward GEMM
    hlo = f.lower(x, w).compile().as_text()
    calls = [ln for ln in hlo.splitlines() if "__cublas$lt$matmul$f8" in ln and "custom-call(" in ln]
    assert len(calls) == 3, calls


REC_X_S, REC_W_S = 768 ** 0.5 / 448, 24 / 448  # the record's forward scales (model_dim 768)


def test_alpha_factors_closest_bf16_triple():
    """fp8.alpha_factors against an independent exhaustive search: three bf16 values (8-bit
    significands) whose product is exact in fp32 and closest to alpha; for the record's scales
    the best is 2.1e-7 above alpha (its significand's odd part 3 5^2 23 37 223 does not split
    into three factors below 256)."""
    import math
    import ml_dtypes
    f = fp8.alpha_factors(REC_X_S, REC_W_S)
    assert all(float(np.float32(v).astype(ml_dtypes.bfloat16)) == v for v in f)
    prod = f[0] * f[1] * f[2]
    assert float(np.float32(prod)) == prod  # no rounding when cuBLASLt multiplies them in fp32
    alpha = float(np.float32(REC_X_S) * np.float32(REC_W_S))
    m, _ = math.frexp(alpha)
    s = np.arange(128, 256, dtype=np.float64)
    triple = (s[:, None, None] * s[None, :, None] * s[None, None, :]).ravel()  # 2^21 .. 2^24
    best = min(np.min(np.abs(triple / 2.0 ** k - m)) / m for k in range(21, 25))
    assert abs(prod - alpha) / alpha == pytest.approx(best, rel=1e-9)
    assert 2.0e-7 < best < 2.2e-7


def test_bf16_output_emulation_one_rounding_from_exact_alpha():
    """fwd_bf16's CPU emulation (what the GPU's bf16-output cuBLASLt call computes) against the
    exact-alpha path: the same fp32 product times alpha3 = alpha (1 + 2.1e-7), so z differs only
    where a value sits that close to a bf16 rounding boundary, by one step."""
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((256, 768)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((4096, 768)) * 2.0, jnp.float32)
    exact = np.asarray(fp8.fwd_f32(x, w, REC_X_S, REC_W_S)[0].astype(jnp.bfloat16).astype(jnp.float32))
    z, res = fp8.fwd_bf16(x, w, REC_X_S, REC_W_S, emulate=True)
    got = np.asarray(z.astype(jnp.float32))
    differ = got != exact
    assert 0 < differ.mean() < 1e-3  # 4.5e-5 here: alpha3 != alpha, and only near-ties move
    step = 2.0 ** (np.floor(np.log2(np.abs(exact[differ]))) - 7)
    assert np.all(np.abs(got - exact)[differ] <= step)
    np.testing.assert_array_equal(np.asarray(res[0].astype(jnp.float32)),
                                  np.asarray(fp8.quantize(x, REC_X_S, jnp.float8_e4m3fn).astype(jnp.float32)))


@pytest.mark.skipif(not ON_GPU, reason="cuBLASLt FP8 GEMMs exist on GPU only")
def test_gpu_bf16_output_gemm_is_one_cublaslt_call_matching_emulation():
    """fwd_bf16's GPU form must become one cuBLASLt FP8 call writing bf16 (no fp32 product, no
    dequantised bf16 operands) and compute what the emulation does; the two cuBLASLt calls may
    accumulate in another order, so a small fraction of roundings may flip (printed)."""
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.standard_normal((8192, 768)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((50304, 768)) * 2.0, jnp.float32)
    f = jax.jit(lambda x, w: fp8.fwd_bf16(x, w, REC_X_S, REC_W_S, emulate=False)[0])
    hlo = f.lower(x, w).compile().as_text()
    calls = [ln for ln in hlo.splitlines() if "__cublas$lt$matmul$f8" in ln and "custom-call(" in ln]
    assert len(calls) == 1 and "(bf16[8192,50304]" in calls[0], calls
    got = np.asarray(f(x, w).astype(jnp.float32))
    want = np.asarray(jax.jit(lambda x, w: fp8.fwd_bf16(x, w, REC_X_S, REC_W_S, emulate=True)[0])(x, w).astype(jnp.float32))
    differ = got != want
    print(f"bf16-output GEMM z entries differing from the emulation: {differ.mean():.2e}")
    assert differ.mean() < 1e-3


def _norm_then_quantize(h, pin: bool):
    # the head's forward: X8 = e4m3(bf16(rms_norm(h)) / x_s); pin=False is the pre-fix form,
    # which lets XLA on GPUs fuse away the norm output's bf16 rounding
    from jgpt.model import rms_norm
    x = rms_norm(h)
    q = quantize(x, REC_X_S, jnp.float8_e4m3fn) if pin else fp8.scaled_clip(x, REC_X_S, jnp.float8_e4m3fn)
    return q.astype(jnp.float8_e4m3fn)


def test_quantize_pins_its_inputs_bf16_rounding():
    """The head quantises the bf16 tensor the final norm wrote (record26 §5.9: the FP8 matmul is a
    custom op in the record). Quantising the norm's unrounded fp32 output instead moves X8 in
    ~1% of entries (computed here with ml_dtypes); quantize() pins the rounding with a
    reduce_precision that XLA's excess-precision rewrites keep (the GPU test checks them)."""
    rng = np.random.default_rng(21)
    h = jnp.asarray(rng.standard_normal((512, 768)) * 3.0, jnp.bfloat16)
    from jgpt.model import rms_norm
    hf = np.asarray(h, np.float32)
    norm32 = hf / np.sqrt(np.mean(hf * hf, axis=-1, keepdims=True, dtype=np.float64) + 2.0 ** -23).astype(np.float32)
    kept = np_quant(norm32.astype(ml_dtypes.bfloat16), REC_X_S, ml_dtypes.float8_e4m3fn, 448)
    dropped = np_quant(norm32, REC_X_S, ml_dtypes.float8_e4m3fn, 448)
    assert 1e-3 < np.mean(kept != dropped) < 0.1  # double rounding: the pin matters
    got = np.asarray(jax.jit(lambda h: _norm_then_quantize(h, True))(h).astype(jnp.float32))
    # rms_norm's fp32 arithmetic vs numpy's may differ by an fp32 ulp before the bf16 rounding
    assert np.mean(got != kept) < 1e-4
    hlo = jax.jit(lambda x: quantize(x, REC_X_S, jnp.float8_e4m3fn)).lower(rms_norm(h)).as_text()
    assert "reduce_precision" in hlo


@pytest.mark.skipif(not ON_GPU, reason="XLA's excess-precision rewrite runs on GPUs")
def test_on_gpu_head_input_quantised_from_its_bf16_rounding():
    """Compiled on the GPU, norm + quantize must give e4m3 of the bf16 norm output (what the
    record's custom op reads), bit for bit; printed: how many entries the unpinned form moves."""
    from jgpt.model import rms_norm
    rng = np.random.default_rng(22)
    h = jnp.asarray(rng.standard_normal((8192, 768)) * 3.0, jnp.bfloat16)
    x_bf16 = np.asarray(jax.jit(rms_norm)(h), np.float32)  # the GPU's own norm, rounded
    want = np_quant(x_bf16, REC_X_S, ml_dtypes.float8_e4m3fn, 448)
    got = np.asarray(jax.jit(lambda h: _norm_then_quantize(h, True))(h).astype(jnp.float32))
    unpinned = np.asarray(jax.jit(lambda h: _norm_then_quantize(h, False))(h).astype(jnp.float32))
    print(f"X8 entries off the bf16 norm's quantisation: pinned {np.mean(got != want):.2e}, "
          f"unpinned {np.mean(unpinned != want):.2e}")
    np.testing.assert_array_equal(got, want)
