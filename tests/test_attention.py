"""jgpt.attention against independent computations: the mask rule by brute-force loops, the
backends against each other and a per-query numpy softmax, rotary against complex numbers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jgpt import attention as A
from jgpt.config import BLOCK_SIZE, BOS_ID

SEQ_LENS = (128, 256, 384)  # few shapes: each one is a jit compile


def tokens_with_bos(rng, T, bos_positions):
    tok = rng.integers(0, BOS_ID, T)
    tok[list(bos_positions)] = BOS_ID
    return tok


def brute_force_mask(tokens, w):
    """record26 §5.6 written from the definitions, one pair at a time."""
    T = len(tokens)
    doc, count = [], 0
    for t in range(T):
        count += tokens[t] == BOS_ID
        doc.append(count)
    out = np.zeros((T, T), bool)
    for q in range(T):
        for k in range(q + 1):
            out[q, k] = doc[k] == doc[q] and (q // BLOCK_SIZE - k // BLOCK_SIZE) < max(w, 1)
    return out


_mask_fn = jax.jit(lambda tok, w: A.dense_mask(A.document_ids(tok), w))


@settings(max_examples=25, deadline=None)
@given(T=st.sampled_from(SEQ_LENS), data=st.data())
def test_mask_rule_matches_brute_force(T, data):
    bos = data.draw(st.lists(st.integers(0, T - 1), max_size=6))
    w = data.draw(st.integers(0, T // BLOCK_SIZE + 1))
    tokens = tokens_with_bos(np.random.default_rng(len(bos) + 7 * w), T, bos)
    got = np.asarray(_mask_fn(jnp.asarray(tokens), jnp.int32(w)))
    np.testing.assert_array_equal(got, brute_force_mask(tokens, w))


def test_document_ids():
    tok = np.array([5, BOS_ID, 3, 3, BOS_ID, BOS_ID, 1])
    np.testing.assert_array_equal(A.document_ids(jnp.asarray(tok)), [0, 1, 1, 1, 2, 3, 3])


def test_window_zero_is_window_one():
    tok = jnp.asarray(tokens_with_bos(np.random.default_rng(0), 384, [0, 100]))
    docs = A.document_ids(tok)
    np.testing.assert_array_equal(A.dense_mask(docs, 0), A.dense_mask(docs, 1))


# ------------------------------------------------------------------------------------------------


def qkv(rng, T, H=2, D=32, dtype=jnp.float32):
    return [jnp.asarray(rng.standard_normal((T, H, D)), dtype) for _ in range(3)]


def numpy_attention(q, k, v, tokens, w, scale):
    """Per-query softmax over the allowed keys, float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    mask = brute_force_mask(tokens, w)
    out = np.zeros_like(q)
    for t in range(q.shape[0]):
        keys = np.nonzero(mask[t])[0]
        s = np.einsum("hd,khd->hk", q[t], k[keys]) * scale
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[t] = np.einsum("hk,khd->hd", p, v[keys])
    return out


@pytest.mark.parametrize("backend", ["dense", "blockwise"])
def test_backend_matches_numpy(backend):
    rng = np.random.default_rng(1)
    T = 256
    tokens = tokens_with_bos(rng, T, [0, 37, 140, 141])
    q, k, v = qkv(rng, T)
    docs = A.document_ids(jnp.asarray(tokens))
    for w in (0, 2):
        got = A.attention(q, k, v, docs, w, scale=0.12, backend=backend)
        np.testing.assert_allclose(got, numpy_attention(q, k, v, tokens, w, 0.12), rtol=2e-5, atol=2e-6)


T_BW = 512  # 4 blocks
WINDOWS = (0, 1, 2, 4)  # 0 (short layers at W=1), 1, middle, all blocks


@pytest.fixture(scope="module")
def bw_case():
    rng = np.random.default_rng(2)
    tokens = tokens_with_bos(rng, T_BW, [0, 90, 300, 301, 460])
    q_k_v = qkv(rng, T_BW)
    cotangent = jnp.asarray(rng.standard_normal((T_BW, 2, 32)), jnp.float32)
    return A.document_ids(jnp.asarray(tokens)), q_k_v, cotangent


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_blockwise_equals_dense_values_and_grads(bw_case, dtype):
    docs, (q, k, v), cot = bw_case
    q, k, v = (a.astype(dtype) for a in (q, k, v))

    def loss(backend):  # traced window: one compile per backend serves all windows
        def f(q, k, v, w):
            y, vjp = jax.vjp(lambda q, k, v: A.attention(q, k, v, docs, w, scale=0.12, backend=backend,
                                                          max_window_blocks=4), q, k, v)
            return y, vjp(cot.astype(y.dtype))
        return jax.jit(f)

    dense, blockwise = loss("dense"), loss("blockwise")
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    for w in WINDOWS:
        (vd, gd), (vb, gb) = dense(q, k, v, jnp.int32(w)), blockwise(q, k, v, jnp.int32(w))
        np.testing.assert_allclose(np.asarray(vb, np.float32), np.asarray(vd, np.float32), **tol)
        for a, b in zip(gb, gd):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


def test_blockwise_traced_window_one_compile(bw_case):
    """One compiled function (static max 4 blocks) serves every window, as in training."""
    docs, (q, k, v), _ = bw_case
    f = jax.jit(lambda w: A.attention(q, k, v, docs, w, scale=0.12, backend="blockwise", max_window_blocks=4))
    for w in WINDOWS:
        ref = A.attention(q, k, v, docs, w, scale=0.12, backend="dense")
        np.testing.assert_allclose(f(jnp.int32(w)), ref, rtol=1e-5, atol=1e-6)
    assert f._cache_size() == 1


def test_blockwise_rejects_window_over_static_max(bw_case):
    docs, (q, k, v), _ = bw_case
    with pytest.raises(ValueError, match="max_window_blocks"):
        A.attention(q, k, v, docs, 3, scale=0.12, backend="blockwise", max_window_blocks=2)


def test_bf16_numerics_follow_eager_reference(bw_case):
    """record26 §11.8: fp32 scores and softmax, P rounded to bf16 before P @ V, fp32 accumulation."""
    docs, (q, k, v), _ = bw_case
    q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
    got = A.attention(q, k, v, docs, 2, scale=0.12, backend="dense")
    assert got.dtype == jnp.bfloat16
    qf, kf, vf = (np.asarray(a, np.float32) for a in (q, k, v))
    s = np.einsum("qhd,khd->hqk", qf, kf) * np.float32(0.12)
    s = np.where(np.asarray(A.dense_mask(docs, 2))[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).astype(jnp.bfloat16).astype(np.float32)
    want = np.einsum("hqk,khd->qhd", p, vf)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-2)


def test_backend_registry():
    assert A.resolve_backend("auto") == "blockwise"
    calls = []

    def fake(q, k, v, docs, w, *, scale, max_window_blocks=None):
        calls.append(w)
        return A.dense_attention(q, k, v, docs, w, scale=scale)

    A.register_backend("fake", fake, auto_when=lambda platform: True)
    try:
        assert A.resolve_backend("auto") == "fake"
        q = k = v = jnp.ones((128, 1, 8))
        A.attention(q, k, v, jnp.zeros(128, jnp.int32), 1, scale=0.12)
        assert calls == [1]
    finally:
        A._BACKENDS.pop("fake")
        A._AUTO[:] = [e for e in A._AUTO if e[0] != "fake"]
    with pytest.raises(ValueError, match="unknown attention backend"):
        A.resolve_backend("nope")


# ------------------------------------------------------------------------------------------------


def test_rotary_frequencies():
    f = A.rotary_frequencies(128, 1024.0)
    assert f.shape == (64,) and f.dtype == np.float32
    # exponents j/31 rounded to fp32 as torch.linspace does: ~ln(1024) * 2^-24 relative
    np.testing.assert_allclose(f[:32], 1024.0 ** (-np.arange(32) / 31), rtol=1e-6)
    assert f[0] == 1 and np.all(f[32:] == 0)


@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_rotary_frequencies_equal_torch_buffer(head_dim):
    """Bit-identical to the reference's (1/1024)**torch.linspace(0, 1, n) in fp32, so rotary
    tables agree up to cos/sin ulps (record26 §11.3)."""
    torch = pytest.importorskip("torch")
    n = head_dim // 4
    want = ((1 / 1024) ** torch.linspace(0, 1, steps=n, dtype=torch.float32)).numpy()
    np.testing.assert_array_equal(A.rotary_frequencies(head_dim)[:n], want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rotary_matches_complex_rotation(dtype):
    """(x1 + i x2) * exp(-i theta): rotation by -theta, rotate-half pairing (record26 §5.5)."""
    rng = np.random.default_rng(3)
    T, H, D = 300, 2, 64
    x = jnp.asarray(rng.standard_normal((T, H, D)), dtype)
    got = A.rotary(x)
    assert got.dtype == dtype
    # theta in fp32 (t * omega rounded once), as the record's table (record26 §5.5)
    theta = (np.arange(T, dtype=np.float32)[:, None] * A.rotary_frequencies(D)[None, :]).astype(np.float64)
    xf = np.asarray(x, np.float64)
    z = (xf[..., : D // 2] + 1j * xf[..., D // 2:]) * np.exp(-1j * theta)[:, None, :]
    want = np.concatenate([z.real, z.imag], axis=-1)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **tol)
    np.testing.assert_array_equal(got[..., D // 4: D // 2], x[..., D // 4: D // 2])  # zero frequencies


def test_rotary_rejects_long_sequence():
    cos, sin = A.rotary_tables(128, 64)
    with pytest.raises(ValueError, match="rotary table"):
        A.apply_rotary(jnp.ones((256, 1, 64)), cos, sin)
