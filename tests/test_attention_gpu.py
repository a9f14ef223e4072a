"""The "pallas" attention backend (jgpt.attention_gpu): flash-attention kernels for record26 §5.6.

On the CPU the kernels run in Pallas's interpreter: in fp32 they must equal the dense rule; in
bf16 they must be as close to the fp32 rule as blockwise attention in bf16 is. On a GPU the same
bf16 check runs on the Triton kernels at 8,192 tokens, 6 heads of 128, and "auto" must pick them.
Run there with `pytest tests/test_attention_gpu.py`."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jgpt import attention as attn
from jgpt import attention_gpu

BOS = 50256
ON_GPU = jax.default_backend() == "gpu"


def case(T, H, D, dtype, seed, doc_len=700):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, BOS, T)
    toks[rng.choice(T, max(2, T // doc_len), replace=False)] = BOS  # documents of ~doc_len tokens
    toks[T // 3: T // 3 + 3] = BOS  # one- and two-token documents too
    q, k, v, dy = (jnp.asarray(rng.standard_normal((T, H, D)), dtype) for _ in range(4))
    return attn.document_ids(jnp.asarray(toks, jnp.int32)), q, k, v, dy


def out_and_grads(fn, q, k, v, dy):
    def loss(q, k, v):
        return jnp.vdot(fn(q, k, v).astype(jnp.float32), dy.astype(jnp.float32))
    o = jax.jit(fn)(q, k, v)
    return o, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("T,window", [(512, 0), (512, 1), (1024, 3), (1024, 14)])
def test_key_start_interval_is_the_rule(T, window):
    docs = case(T, 1, 8, jnp.float32, T + window)[0]
    ks = np.asarray(attn.key_start(docs, window))
    pos = np.arange(T)
    interval = (pos[None, :] >= ks[:, None]) & (pos[None, :] <= pos[:, None])
    np.testing.assert_array_equal(interval, np.asarray(attn.dense_mask(docs, window)))


@pytest.mark.parametrize("T,window,doc_len", [(512, 0, 700), (512, 2, 700), (1024, 14, 700), (1024, 3, 40)])
def test_kernels_interpreted_fp32_equal_dense_rule(T, window, doc_len):
    """The Pallas kernels' logic (block skipping, unmasked whole tiles, online softmax, log-sum-exp,
    both backward loops) in the interpreter with fp32 operands, where only summation order
    differs; documents of ~700 tokens, and of ~40 (several per tile)."""
    docs, q, k, v, dy = case(T, 2, 64, jnp.float32, T + window, doc_len)
    ks = attn.key_start(docs, window)
    dense = lambda q, k, v: attn.attention(q, k, v, docs, window, scale=0.12, backend="dense")
    fused = lambda q, k, v: attention_gpu._flash(q, k, v, ks, 0.12, True)
    (o1, g1), (o2, g2) = out_and_grads(dense, q, k, v, dy), out_and_grads(fused, q, k, v, dy)
    assert rel(o2, o1) < 1e-5
    for a, b in zip(g2, g1):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("window", [1, 3])
def test_bf16_backend_interpreted_within_blockwise_error(window):
    """bf16 through the backend (P and dS rounded to bf16, record26 §11.8) vs the rule in fp32 on
    the same bf16 inputs: as close as blockwise attention in bf16 gets, x1.5."""
    check_bf16_against_blockwise(512, 2, 64, window)


def check_bf16_against_blockwise(T, H, D, window):
    docs, q, k, v, dy = case(T, H, D, jnp.bfloat16, window)
    up = [a.astype(jnp.float32) for a in (q, k, v)]
    block = lambda q, k, v: attn.attention(q, k, v, docs, window, scale=0.12, backend="blockwise")
    fused = lambda q, k, v: attention_gpu.pallas_attention(q, k, v, docs, window, scale=0.12)
    o_ref, g_ref = out_and_grads(block, *up, dy)
    o_b, g_b = out_and_grads(block, q, k, v, dy)
    o_f, g_f = out_and_grads(fused, q, k, v, dy)
    assert o_f.dtype == jnp.bfloat16 and np.isfinite(np.asarray(o_f, np.float32)).all()
    assert rel(o_f, o_ref) <= 1.5 * rel(o_b, o_ref) and rel(o_f, o_ref) < 1e-2
    for f, b, r in zip(g_f, g_b, g_ref):
        assert rel(f, r) <= 1.5 * rel(b, r) and rel(f, r) < 1e-2


def test_other_dtypes_fall_back_to_blockwise():
    docs, q, k, v, _ = case(256, 1, 32, jnp.float32, 0)
    a = attention_gpu.pallas_attention(q, k, v, docs, 1, scale=0.12)
    b = attn.attention(q, k, v, docs, 1, scale=0.12, backend="blockwise")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(not ON_GPU, reason="the Triton kernels run on a GPU")
@pytest.mark.parametrize("window", [1, 7, 14])
def test_triton_kernels_on_gpu(window):
    check_bf16_against_blockwise(8192, 6, 128, window)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_auto_selects_kernels_on_gpu():
    assert attn.resolve_backend("auto") == "pallas"


def test_auto_keeps_blockwise_on_cpu():
    if jax.default_backend() == "cpu":
        assert attn.resolve_backend("auto") == "blockwise"


@pytest.mark.parametrize("tiles", ["64,32,4,2/64,32,4,2/32,64,4,2", "128,128,4,2/128,64,8,3/128,32,4,2", "128,64,4,2/128,64,4,2/64,64,4,2/masked"])
def test_other_tiles_interpreted_fp32_equal_dense_rule(tiles):
    """Tile sizes that differ between the loops (key tiles smaller or larger than query tiles)."""
    old = attention_gpu.TILES
    attention_gpu.set_tiles(attention_gpu.Tiles.parse(tiles))
    try:
        test_kernels_interpreted_fp32_equal_dense_rule(1024, 3, 90)
    finally:
        attention_gpu.set_tiles(old)


def test_kernels_lower_to_triton():
    """The forward, dQ and dK/dV kernels pass the Pallas -> Triton lowering ([T, H, D] blocks of
    one head, base-2 softmax) on any host: three Triton calls in the gradient's program."""
    from jgpt.pallas_compat import triton_calls
    S = jax.ShapeDtypeStruct
    q = S((1024, 2, 128), jnp.bfloat16)

    def grads(q, k, v, docs):
        loss = lambda q, k, v: attention_gpu.pallas_attention(  # noqa: E731
            q, k, v, docs, jnp.int32(2), scale=0.12, interpret=False).astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    assert triton_calls(grads, q, q, q, S((1024,), jnp.int32)) == 3


def test_tiles_text_round_trip_and_bad_settings():
    for text in ("128,64,4,2/128,64,8,3/64,128,8,3", "64,32,4,2/64,32,4,2/32,64,4,2/masked"):
        assert str(attention_gpu.Tiles.parse(text)) == text
    assert attention_gpu.Tiles.parse("128,64,8,3/128,64,8,3/128,64,8,3") == attention_gpu.Tiles()
    for bad, msg in (("128,64,4,2/128,64,4,2", "must read"), ("128,64,4,2/128,64,4,2/64,64,4,2/x", "must read"),
                     ("96,32,4,2/128,64,4,2/64,64,4,2", "powers of two"),
                     ("64,128,4,2/128,64,4,2/64,64,4,2", "multiple of key tile"),
                     ("128,64,4,2/128,64,4/64,64,4,2", "dq tiles must read")):
        with pytest.raises(ValueError, match=msg):
            attention_gpu.Tiles.parse(bad)
