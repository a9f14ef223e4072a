"""jgpt.head_gpu: the fused head's LSE and e5m2-gradient passes as Pallas kernels, against the
XLA expressions of jgpt.head_loss (interpreted on the CPU; compiled Triton on a GPU)."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jgpt import fp8, head_gpu, head_loss
from jgpt.config import ModelConfig

CAP, DIV, GRAD_S = 30.0, 7.5 * np.sqrt(768.0), 1 / 448


def make_prod(C, V, seed=0, std=60.0):
    # the FP8 GEMM's fp32 product at the size a trained head gives (|z| / div up to ~1.5, so
    # the softcap bends)
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((C, V)) * std, jnp.float32)


def make_z(C, V, seed=0):
    return make_prod(C, V, seed).astype(jnp.bfloat16)


def xla_lse(z):
    return CAP + jnp.log(jnp.sum(jnp.exp(head_gpu.softcapped(z, CAP, DIV) - CAP), axis=-1))


def xla_g8(z, lse, y, g):
    onehot = jnp.arange(z.shape[1])[None, :] == y[:, None]
    dz = head_gpu.grad_z(z, lse[:, None], onehot, g, CAP, DIV)
    return fp8.quantize(dz, GRAD_S, jnp.float8_e5m2)


def f32(a):
    return np.asarray(jnp.asarray(a, jnp.float32))


@pytest.fixture
def on_cpu():
    """The interpreted kernels are the logic check: run them and their XLA reference on the CPU
    backend on every machine (on a GPU XLA keeps excess precision inside fusions)."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.mark.parametrize("V", [1664, 1920])  # 3 x 512 + a 128 tail; + 256 and 128 tails
def test_col_pieces_cover_the_vocabulary(V):
    n_full, tails = head_gpu._col_pieces(V, 512)
    cols = list(range(n_full * 512)) + [c for s, n in tails for c in range(s, s + n)]
    assert cols == list(range(V)) and all(n & (n - 1) == 0 for _, n in tails)


@pytest.mark.parametrize("V", [1664, 1920])
def test_interpreted_lse_and_z_equal_xla(V, on_cpu):
    prod = make_prod(64, V)
    z, lse = head_gpu.lse_and_z(prod, CAP, DIV, interpret=True)
    assert z.dtype == jnp.bfloat16
    np.testing.assert_array_equal(f32(z), f32(prod.astype(jnp.bfloat16)))
    # same terms, another summation order: fp32 sums of ~2e3 positive terms agree to ~1e-7
    np.testing.assert_allclose(f32(lse), f32(xla_lse(z)), rtol=2e-7, atol=0)


@pytest.mark.parametrize("g", [1.0, 0.37])
def test_interpreted_e5m2_gradient_equals_xla_in_both_layouts(g, on_cpu):
    C, V = 128, 1920
    z = make_z(C, V, seed=1)
    y = jnp.asarray(np.random.default_rng(2).integers(0, V, C), jnp.int32)
    lse = xla_lse(z)
    g8, g8t = head_gpu.grad_e5m2(z, lse, y, jnp.float32(g), CAP, DIV, GRAD_S, interpret=True)
    want = f32(xla_g8(z, lse, y, g))
    assert g8.dtype == g8t.dtype == jnp.float8_e5m2 and g8t.shape == (V, C)
    # the same operations on the same values: bit for bit
    np.testing.assert_array_equal(f32(g8), want)
    np.testing.assert_array_equal(f32(g8t), want.T)
    assert np.count_nonzero(want) > C * V // 4  # a real test: most entries survive e5m2


def head_loss_case(seed):
    """A small fused head: (loss-and-gradients function, h, w); settings are read at trace time."""
    cfg = ModelConfig(vocab_size=1900, num_layers=2, num_heads=2, model_dim=128)
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.standard_normal((128, 128)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((1920, 128)) * 0.5, jnp.float32)
    y = jnp.asarray(rng.integers(0, 1900, 128), jnp.int32)
    return jax.value_and_grad(lambda h, w: head_loss.fp8_head_loss(h, w, y, cfg), argnums=(0, 1)), h, w


def run_under(f, h, w, mode, gemm_out="f32"):
    """f(h, w) with the head's kernel mode and GEMM output set, then the defaults restored."""
    try:
        head_gpu.set_mode(mode)
        head_gpu.set_gemm_out(gemm_out)
        return f(h, w)
    finally:
        head_gpu.set_mode("auto")
        head_gpu.set_gemm_out(head_gpu.DEFAULT_GEMM_OUT)


def test_fused_head_loss_with_interpreted_kernels_equals_xla_path(on_cpu):
    f, h, w = head_loss_case(3)
    loss_x, (gh_x, gw_x) = run_under(f, h, w, "xla")
    loss_k, (gh_k, gw_k) = run_under(f, h, w, "interpret")
    assert float(loss_k) == pytest.approx(float(loss_x), rel=1e-6)
    # identical e5m2 gradients; grad_w's GEMM reads G8^T instead of transposing G8
    np.testing.assert_array_equal(f32(gh_k), f32(gh_x))
    np.testing.assert_allclose(f32(gw_k), f32(gw_x), rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(gw_x))))


@pytest.mark.parametrize("V", [1664, 1920])
def test_interpreted_lse_of_z_equals_xla(V, on_cpu):
    """The LSE pass reading a bf16 z (GEMM_OUT = "bf16": cuBLASLt wrote z) instead of the fp32
    product: the same terms as xla_lse, another summation order."""
    z = make_z(64, V, seed=9)
    lse = head_gpu.lse_of_z(z, CAP, DIV, interpret=True)
    np.testing.assert_allclose(f32(lse), f32(xla_lse(z)), rtol=2e-7, atol=0)


def test_bf16_gemm_out_head_loss_close_to_exact_alpha(on_cpu):
    """fp8_head_loss with GEMM_OUT = "bf16" (fp8.fwd_bf16 emulated, interpreted LSE-of-z kernel)
    against the exact-alpha path with interpreted kernels: z moves by one bf16 step where alpha's
    2.1e-7 approximation crosses a rounding boundary, which the loss and gradients barely see."""
    f, h, w = head_loss_case(10)
    loss_x, (gh_x, gw_x) = run_under(f, h, w, "interpret")
    loss_b, (gh_b, gw_b) = run_under(f, h, w, "interpret", "bf16")
    assert float(loss_b) == pytest.approx(float(loss_x), rel=1e-6)
    for a, b in ((gh_b, gh_x), (gw_b, gw_x)):
        a, b = f32(a).astype(np.float64), f32(b).astype(np.float64)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-3


def test_bad_gemm_out_is_refused():
    with pytest.raises(ValueError, match="f32 or bf16"):
        head_gpu.set_gemm_out("fp16")


def test_interpreted_fast_exp_within_an_ulp_of_xla(on_cpu):
    """EXP = "fast" (exp2(x log2 e) in the kernels, Triton's own fp32 exp) against the XLA path's
    exp: the LSE within a few fp32 ulps, the e5m2 gradient equal but for rare one-step flips."""
    C, V = 128, 1920
    z = make_z(C, V, seed=1)
    y = jnp.asarray(np.random.default_rng(2).integers(0, V, C), jnp.int32)
    lse = xla_lse(z)
    try:
        head_gpu.set_exp("fast")
        _, lse_f = head_gpu.lse_and_z(z.astype(jnp.float32), CAP, DIV, interpret=True)
        g8, _ = head_gpu.grad_e5m2(z, lse, y, jnp.float32(1.0), CAP, DIV, GRAD_S, interpret=True)
    finally:
        head_gpu.set_exp(head_gpu.DEFAULT_EXP)
    np.testing.assert_allclose(f32(lse_f), f32(lse), rtol=5e-7, atol=0)  # measured 7.8e-8
    got, want = f32(g8), f32(xla_g8(z, lse, y, 1.0))
    differ = got != want
    assert differ.mean() < 1e-4
    both = np.maximum(np.abs(got), np.abs(want))
    assert np.all(np.abs(got - want)[differ] <= 0.25 * both[differ] + 2.0 ** -16)
    with pytest.raises(ValueError, match="accurate or fast"):
        head_gpu.set_exp("approx")


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="head kernel mode"):
        head_gpu.set_mode("triton")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="Triton kernels run on GPUs only")
@pytest.mark.parametrize("exp", ["accurate", "fast"])
def test_compiled_kernels_match_xla_on_gpu(exp):
    """Record-size chunk (8,192 x 50,304): the Triton kernels (either exp, see head_gpu.EXP)
    against XLA's fusions of the same arithmetic. exp and sigmoid differ by ulps between Triton
    and XLA, so a few bf16/e5m2 roundings flip; each flip is one e5m2 step."""
    C, V = 8192, 50304
    prod = make_prod(C, V, seed=4)
    y = jnp.asarray(np.random.default_rng(5).integers(0, V, C), jnp.int32)
    head_gpu.set_exp(exp)
    try:
        z, lse_k = jax.jit(lambda p: head_gpu.lse_and_z(p, CAP, DIV))(prod)
        lse_x = jax.jit(xla_lse)(z)
        g8, g8t = jax.jit(lambda z, l, y: head_gpu.grad_e5m2(z, l, y, 1.0, CAP, DIV, GRAD_S))(z, lse_x, y)
    finally:
        head_gpu.set_exp(head_gpu.DEFAULT_EXP)
    np.testing.assert_array_equal(f32(z), f32(prod.astype(jnp.bfloat16)))
    np.testing.assert_allclose(f32(lse_k), f32(lse_x), rtol=1e-6, atol=0)
    want = f32(jax.jit(lambda z, l, y: xla_g8(z, l, y, 1.0))(z, lse_x, y))
    got = f32(g8)
    np.testing.assert_array_equal(f32(g8t), got.T)
    differ = got != want
    print(f"e5m2 gradient entries that differ from XLA's: {differ.mean():.2e}")
    assert differ.mean() < 1e-3, differ.mean()
    # a flip moves an entry by at most one e5m2 step (2 mantissa bits: <= 25% + tiny subnormals)
    both = np.maximum(np.abs(got), np.abs(want))
    assert np.all(np.abs(got - want)[differ] <= 0.25 * both[differ] + 2.0 ** -16)


def test_head_kernels_lower_to_triton():
    """The LSE passes (from the fp32 product, and from a bf16 z) and the e5m2 gradient pass go
    through the Pallas -> Triton lowering on any host: one Triton call each."""
    from jgpt.pallas_compat import triton_calls
    S = jax.ShapeDtypeStruct
    C, V = 256, 1920
    assert triton_calls(lambda p: head_gpu.lse_and_z(p, CAP, DIV), S((C, V), jnp.float32)) == 1
    assert triton_calls(lambda z: head_gpu.lse_of_z(z, CAP, DIV), S((C, V), jnp.bfloat16)) == 1
    grad = lambda z, l, y: head_gpu.grad_e5m2(z, l, y, 1.0, CAP, DIV, GRAD_S)  # noqa: E731
    args = S((C, V), jnp.bfloat16), S((C,), jnp.float32), S((C,), jnp.int32)
    assert triton_calls(grad, *args) == 1
    try:  # and with the base-2 exp
        head_gpu.set_exp("fast")
        assert triton_calls(lambda z: head_gpu.lse_of_z(z, CAP, DIV), S((C, V), jnp.bfloat16)) == 1
        assert triton_calls(grad, *args) == 1
    finally:
        head_gpu.set_exp(head_gpu.DEFAULT_EXP)
