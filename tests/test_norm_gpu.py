"""jgpt.norm_gpu: the block's add + norm kernels against an fp64 computation of record26 §5.4 /
model.sum_norm's formulas and against the XLA path (interpreted on the CPU, compiled on a GPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jgpt import model as M
from jgpt import norm_gpu
from jgpt.config import RMS_EPS
from jgpt.pallas_compat import triton_calls

ON_GPU = jax.default_backend() == "gpu"


def _case(T=128, d=768, seed=0):
    rng = np.random.default_rng(seed)
    mk = lambda scale: jnp.asarray(rng.standard_normal((T, d)) * scale, jnp.bfloat16)  # noqa: E731
    return mk(1.0), mk(0.5), mk(1.0), mk(1.0)  # x, a, g_stored, g_normed


def _f(t):
    return np.asarray(t, np.float64)


def _bf16(t64):
    return np.asarray(jnp.asarray(t64, jnp.float32).astype(jnp.bfloat16), np.float64)


def _ulps_off(got, want):
    """|got - want| in units of want's bf16 spacing (2^(e-7))."""
    spacing = np.exp2(np.floor(np.log2(np.maximum(np.abs(want), 1e-30))) - 7)
    return np.abs(_f(got) - want) / spacing


def _fp64(x, a, gs, gn):
    """(stored, normed, g) in fp64, each rounded once to bf16, and g's error scale: the sum of
    its three terms' magnitudes (the gradient is a difference of terms that can cancel, so fp32
    arithmetic's error is relative to them, not to g)."""
    s = _f(x) + _f(a)
    r = 1 / np.sqrt(np.mean(s * s, axis=1, keepdims=True) + RMS_EPS)
    st = _bf16(s)
    terms = (_f(gs), r * _f(gn), -(r ** 3) * st * np.mean(_f(gn) * st, axis=1, keepdims=True))
    return st, _bf16(s * r), _bf16(sum(terms)), sum(np.abs(t) for t in terms)


def _assert_grad_close(got, want, scale):
    """got within one bf16 step of want plus fp32 arithmetic's error on the terms: |err| <=
    8 * 2^-24 * scale (a few roundings of terms up to `scale`, and the mean's sum order)."""
    spacing = np.exp2(np.floor(np.log2(np.maximum(np.abs(want), 1e-30))) - 7)
    excess = np.abs(_f(got) - want) - spacing - 8 * 2.0 ** -24 * scale
    assert excess.max() <= 0, (excess.max(), (excess > 0).mean())
    assert (_ulps_off(got, want) > 0).mean() < 2e-3


def _run(fn, x, a, gs, gn):
    (stored, normed), vjp = jax.vjp(fn, x, a)
    gx, ga = vjp((gs, gn))
    return stored, normed, gx, ga


@pytest.fixture
def interpret():
    norm_gpu.set_mode("interpret")
    yield
    norm_gpu.set_mode(norm_gpu.DEFAULT_MODE)


def test_kernels_match_fp64_formulas(interpret):
    x, a, gs, gn = _case()
    stored, normed, gx, ga = _run(lambda x, a: norm_gpu.add_norm(x, a, True), x, a, gs, gn)
    want_st, want_n, want_g, scale = _fp64(x, a, gs, gn)
    np.testing.assert_array_equal(_f(stored), want_st)  # x + a is exact in fp32: one rounding
    np.testing.assert_array_equal(_f(gx), _f(ga))  # one gradient for both summands
    off = _ulps_off(normed, want_n)
    # fp32 arithmetic against fp64, each rounded once to bf16: at most one step apart, rarely
    assert off.max() <= 1.0 and (off > 0).mean() < 2e-3, (off.max(), (off > 0).mean())
    _assert_grad_close(gx, want_g, scale)


def test_model_add_then_norm_takes_the_kernels_with_the_xla_paths_numbers(interpret):
    x, a, gs, gn = _case(T=256, seed=1)
    assert norm_gpu.applies(x, a) == (True, True)
    kern = _run(M.add_then_norm, x, a, gs, gn)
    norm_gpu.set_mode("xla")
    assert norm_gpu.applies(x, a) == (False, False)
    xla = _run(M.add_then_norm, x, a, gs, gn)
    np.testing.assert_array_equal(_f(kern[0]), _f(xla[0]))
    # the row sums (mean(s^2), mean(g_normed stored)) in another order: 1/rms differs in its
    # last fp32 bits, one bf16 step on a few elements (more where the gradient's terms cancel)
    off = _ulps_off(kern[1], _f(xla[1]))
    assert off.max() <= 1.0 and (off > 0).mean() < 2e-3, (off.max(), (off > 0).mean())
    scale = _fp64(x, a, gs, gn)[3]
    for k, r in zip(kern[2:], xla[2:]):
        _assert_grad_close(k, _f(r), 2 * scale)


def test_applies_only_to_bf16_row_blocks():
    norm_gpu.set_mode("pallas")
    try:
        x, a, _, _ = _case(T=64, d=128)
        assert norm_gpu.applies(x, a) == (True, False)
        assert norm_gpu.applies(x.astype(jnp.float32), a.astype(jnp.float32))[0] is False
        assert norm_gpu.applies(x[:40], a[:40])[0] is False  # 40 rows: not a multiple of 32
        assert norm_gpu.applies(x, a[:, :64])[0] is False
    finally:
        norm_gpu.set_mode(norm_gpu.DEFAULT_MODE)
    with pytest.raises(ValueError, match="norm kernel mode"):
        norm_gpu.set_mode("triton")
    with pytest.raises(ValueError, match="power of two"):
        norm_gpu.Tiles(rows=24)


def test_triton_lowering_accepts_both_kernels():
    spec = jax.ShapeDtypeStruct((128, 768), jnp.bfloat16)

    def fwd_bwd(x, a):
        out, vjp = jax.vjp(lambda x, a: norm_gpu.add_norm(x, a, False), x, a)
        return vjp(out)

    assert triton_calls(fwd_bwd, spec, spec) == 2


@pytest.mark.skipif(not ON_GPU, reason="compiled kernels need a GPU")
def test_compiled_kernels_match_xla_on_gpu():
    x, a, gs, gn = _case(T=4096, seed=2)
    norm_gpu.set_mode("auto")
    try:
        kern = jax.jit(lambda *t: _run(M.add_then_norm, *t))(x, a, gs, gn)
        norm_gpu.set_mode("xla")
        xla = jax.jit(lambda *t: _run(M.add_then_norm, *t))(x, a, gs, gn)
    finally:
        norm_gpu.set_mode(norm_gpu.DEFAULT_MODE)
    want_st, want_n, want_g, scale = _fp64(x, a, gs, gn)
    np.testing.assert_array_equal(_f(kern[0]), want_st)
    off = _ulps_off(kern[1], want_n)
    assert off.max() <= 1.0 and (off > 0).mean() < 2e-3, ("normed", off.max(), (off > 0).mean())
    for got in kern[2:]:
        _assert_grad_close(got, want_g, scale)
    np.testing.assert_array_equal(_f(kern[0]), _f(xla[0]))
    off = _ulps_off(kern[1], _f(xla[1]))
    assert off.max() <= 1.0 and (off > 0).mean() < 2e-3, ("normed vs xla", off.max(), (off > 0).mean())
    for k, r in zip(kern[2:], xla[2:]):
        _assert_grad_close(k, _f(r), 2 * scale)
