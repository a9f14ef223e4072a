"""jgpt.model.BLOCK_SUM (record26 §11.1): between blocks the compiled record hands the next
block's mix, the U-net skip add and the final norm the fp32 sum x + mlp(...), and stores only
its rounding (the skip, the block output). hidden() against the same blocks chained by hand with
numpy sums, under both settings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jgpt import attention as A
from jgpt import model as M
from jgpt.config import BOS_ID, ModelConfig

# 4 layers: U-net of 2 (layers 2, 3 add the skips of 1, 0), layer 2 attention-free
CFG = ModelConfig(num_layers=4, num_heads=2, model_dim=64, head_dim=32, max_seq_len=1024, no_attn_layers=(2,))
T, W = 256, 1
BF16 = jnp.bfloat16


def bf16(a):
    return np.asarray(jnp.asarray(a, jnp.float32).astype(BF16).astype(jnp.float32))


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(5)
    params = M.init_params(CFG, jax.random.key(5), "record")
    # move the zero-initialised projections and the scalars (lambdas, skip weights) off their init
    for k, v in params.items():
        if "c_proj" in k or k == "scalars":
            params[k] = jnp.asarray(np.asarray(v, np.float32) + rng.uniform(-0.3, 0.3, v.shape) / (8 if "c_proj" in k else 1),
                                    v.dtype)
    tok = rng.integers(0, BOS_ID, T)
    tok[[0, 100]] = BOS_ID
    return params, jnp.asarray(tok)


def by_hand(params, tok, mode):
    """The U-net with model.block_parts for the blocks and numpy fp32 for the sums between them."""
    L, dtype = CFG.num_layers, BF16
    docs = A.document_ids(tok)
    rope = A.rotary_tables(T, CFG.hdim_head, CFG.rope_base, jnp.float32)
    x0 = M.rms_norm(M.embedding(params["embed.weight"], tok).astype(dtype))
    scalars = np.asarray(params["scalars"], np.float32)
    x, skips = x0, []
    for i in range(L):
        if i >= L // 2:
            s = np.asarray(x, np.float32) + scalars[i - L // 2] * np.asarray(skips.pop(), np.float32)
            x = jnp.asarray(s) if mode == "f32" else jnp.asarray(bf16(s), dtype)
        k = CFG.ve_layout[i]
        ve = None if k is None else M.embedding(params[f"value_embeds.{k}.weight"], tok).astype(dtype)
        x_mid, m = M.block_parts(params, CFG, i, x, x0, ve, docs, W, rope=rope)
        s = np.asarray(x_mid, np.float32) + np.asarray(m, np.float32)
        stored = jnp.asarray(bf16(s), dtype)
        x = jnp.asarray(s) if mode == "f32" else stored
        if i < L // 2:
            skips.append(stored)
    return np.asarray(x, np.float32)


@pytest.mark.parametrize("mode", M.BLOCK_SUMS)
def test_hidden_hands_on_the_sum_as_set(case, mode, monkeypatch):
    params, tok = case
    monkeypatch.setattr(M, "BLOCK_SUM", mode)
    trace = {}
    got = M.hidden(params, CFG, tok, W, trace=trace)
    assert got.dtype == (jnp.float32 if mode == "f32" else BF16)
    got = np.asarray(got, np.float32)
    want, other = by_hand(params, tok, mode), by_hand(params, tok, "bf16" if mode == "f32" else "f32")
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-6 * scale  # fp32 summation order at most
    assert np.mean(np.abs(got - other) > 1e-3 * scale) > 0.01  # the two settings differ in bf16 ulps
    # the trace keeps the stored (rounded) block output either way
    np.testing.assert_array_equal(np.asarray(trace[f"block.{CFG.num_layers - 1}"], np.float32), bf16(got))
    if mode == "f32":
        assert np.mean(got != bf16(got)) > 0.5  # unrounded


def test_final_norm_rounds_the_fp32_sum_once(case, monkeypatch):
    """The head's input is rms_norm of the fp32 sum rounded to bf16 (what the FP8 head quantises)."""
    params, tok = case
    monkeypatch.setattr(M, "BLOCK_SUM", "f32")
    x = np.asarray(M.hidden(params, CFG, tok, W), np.float64)
    want = bf16(x / np.sqrt((x * x).mean(-1, keepdims=True) + 2.0 ** -23))
    got = np.asarray(M.final_norm(jnp.asarray(x, jnp.float32), BF16), np.float32)
    assert np.mean(got != want) < 1e-3  # fp32 vs fp64 norm: near-ties only
    assert got.dtype == np.float32 and M.final_norm(jnp.asarray(x, jnp.float32), BF16).dtype == BF16


def test_set_block_sum_rejects_unknown_modes():
    with pytest.raises(ValueError, match="block_sum='fp16'"):
        M.set_block_sum("fp16")


# ------------------------------------------------------------------------------------------------
# the backward torch's autograd runs there: at the stored (rounded) sum, with the forward's 1/rms


def f64(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def test_sum_norm_backward_reads_the_stored_sum():
    rng = np.random.default_rng(1)
    s = jnp.asarray(rng.standard_normal((64, 96)) * 3, jnp.float32)
    g_st, g_n = (jnp.asarray(rng.standard_normal((64, 96)), BF16) for _ in range(2))
    (stored, normed), vjp = jax.vjp(lambda s: M.sum_norm(s, jnp.dtype(BF16)), s)
    (ds,) = vjp((g_st, g_n))
    s64, st = f64(s), f64(bf16(s))
    np.testing.assert_array_equal(f64(stored), st)
    r = 1 / np.sqrt((s64 * s64).mean(-1, keepdims=True) + 2.0 ** -23)  # from the fp32 sum (forward)
    np.testing.assert_array_equal(f64(normed), f64(bf16(s64 * r)))
    gn = f64(g_n)
    want = f64(g_st) + r * gn - r ** 3 * st * (gn * st).mean(-1, keepdims=True)
    tol = 4 * np.finfo(np.float32).eps * np.abs(want).max()  # fp32 arithmetic (measured 3.6e-7 of 4.0)
    np.testing.assert_allclose(f64(ds), want, rtol=0, atol=tol)
    # differentiating the norm at the fp32 sum instead (autodiff's choice) moves it far beyond that
    at_s = f64(g_st) + r * gn - r ** 3 * s64 * (gn * s64).mean(-1, keepdims=True)
    assert np.abs(at_s - want).max() > 100 * tol


def test_mix_sum_backward_reads_the_stored_sum():
    rng = np.random.default_rng(2)
    s = jnp.asarray(rng.standard_normal((64, 96)) * 3, jnp.float32)
    x0 = jnp.asarray(rng.standard_normal((64, 96)), BF16)
    lam0, lam1 = jnp.float32(0.83), jnp.float32(-0.41)
    g = jnp.asarray(rng.standard_normal((64, 96)), BF16)
    out, vjp = jax.vjp(M.mix_sum, lam0, s, lam1, x0)
    np.testing.assert_array_equal(f64(out), f64(bf16(0.83 * f64(s).astype(np.float32) + -0.41 * f64(x0))))
    d_lam0, d_s, d_lam1, d_x0 = vjp(g)
    g64, st = f64(g), f64(bf16(s))
    np.testing.assert_allclose(float(d_lam0), (g64 * st).sum(), rtol=1e-5)
    assert abs(float(d_lam0) - (g64 * f64(s)).sum()) > 1e-4 * abs((g64 * st).sum())  # not at the fp32 sum
    np.testing.assert_allclose(float(d_lam1), (g64 * f64(x0)).sum(), rtol=1e-5)
    assert d_s.dtype == jnp.float32 and d_x0.dtype == BF16
    np.testing.assert_array_equal(f64(d_s), f64(np.float32(0.83) * np.asarray(g, np.float32)))
    np.testing.assert_array_equal(f64(d_x0), f64(bf16(np.float32(-0.41) * np.asarray(g, np.float32))))


@pytest.mark.parametrize("mode", M.BLOCK_SUMS)
def test_backward_holds_no_fp32_residual_sums(case, mode, monkeypatch, capsys):
    """Autodiff saves only bf16 activations (and their fp32 upcasts, which XLA fuses into the
    backward's kernels) across the blocks: no fp32 [T, d] sum computed by an add."""
    from jax.ad_checkpoint import print_saved_residuals
    params, tok = case
    monkeypatch.setattr(M, "BLOCK_SUM", mode)
    print_saved_residuals(lambda p: M.hidden(p, CFG, tok, W).astype(jnp.float32).sum(), params)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(f"f32[{T},{CFG.model_dim}]")]
    assert lines, "print_saved_residuals printed nothing to check"
    assert all("from the argument" in ln or "convert_element_type" in ln for ln in lines), lines
