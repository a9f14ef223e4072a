"""Attention pieces of record #26: document ids, the block-window mask rule, rotary, backends.

Shapes are per sequence, no batch axis: q, k, v are [T, H, D] (vmap for batches). Every backend
implements the one dense rule of record26 §5.6 (through `allowed`) and differs in memory and
speed only:

    allowed(q, k) = k <= q  and  doc(k) == doc(q)  and  q//128 - k//128 < max(w, 1)

Backends (`attention(..., backend=name)`):

* "dense": the full [T, T] mask; exact, O(T^2) memory; the reference the others are tested against.
* "blockwise": each 128-token query block gathers only the kv blocks its window can reach (the
  diagonal and the w-1 before it); memory O(T * w * 128). The window may be a traced int32, so one
  compiled function serves every window up to a static `max_window_blocks`.
* "auto": the first registered backend whose `auto_when(platform)` holds, else "blockwise".
  A fused GPU kernel plugs in with `register_backend(name, fn, auto_when=lambda p: p == "gpu")`.

Softmax numerics follow the eager math reference of record26 §11.8: scores in fp32 (fp64 for
fp64 inputs) from q, k of any dtype, softmax in that dtype, P cast to v's dtype before P @ V with
fp32 accumulation, output in v's dtype.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jgpt.config import BLOCK_SIZE, BOS_ID


def acc_dtype(dtype) -> jnp.dtype:
    """Accumulation/compute dtype for activations of `dtype`: fp32, or fp64 for fp64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


def matmul_precision(dtype):
    # design.md convention 3: the fp32 policy must not fall back to TF32/bf16 passes on GPU; bf16
    # operands already multiply exactly into an fp32 accumulator, so they keep the default
    return lax.Precision.DEFAULT if jnp.dtype(dtype) == jnp.bfloat16 else lax.Precision.HIGHEST


# ------------------------------------------------------------------------------------------------
# Documents and the mask rule (record26 §5.6)


def document_ids(tokens: jax.Array) -> jax.Array:
    """doc(t) = number of BOS tokens at positions 0..t: a BOS starts (and belongs to) a new
    document; tokens before the first BOS are document 0 (record26 §5.6)."""
    return jnp.cumsum((jnp.asarray(tokens) == BOS_ID).astype(jnp.int32), axis=-1, dtype=jnp.int32)


def allowed(q_pos, k_pos, q_doc, k_doc, window_blocks) -> jax.Array:
    """The one mask rule (record26 §5.6, §11.6-7), broadcast over its arguments.

    Negative k positions are padding (blockwise gathers before the sequence start) and never
    allowed. max(w, 1) makes window 0 (short layers while W = 1) mean the diagonal block."""
    w = jnp.maximum(jnp.asarray(window_blocks, jnp.int32), 1)
    near = (q_pos // BLOCK_SIZE - k_pos // BLOCK_SIZE) < w
    return (k_pos <= q_pos) & (k_pos >= 0) & (q_doc == k_doc) & near


def key_start(docs: jax.Array, window_blocks) -> jax.Array:
    """[T] int32: the first key each query may see, so that allowed(q, k) is key_start[q] <= k <= q.

    Documents are contiguous runs of equal ids (document_ids), so doc(k) == doc(q) with k <= q
    means k >= the start of q's document, and the block window means k >= 128 * (q//128 - w + 1)
    with w = max(w, 1) (record26 §5.6). This interval form is what fused kernels take (a per-query
    lower bound plus causality); blocks wholly before it can be skipped."""
    docs = jnp.asarray(docs)
    pos = jnp.arange(docs.shape[-1], dtype=jnp.int32)
    first = jnp.concatenate([jnp.ones(docs.shape[:-1] + (1,), bool), docs[..., 1:] != docs[..., :-1]], -1)
    doc_start = lax.cummax(jnp.where(first, pos, 0), axis=docs.ndim - 1)
    w = jnp.maximum(jnp.asarray(window_blocks, jnp.int32), 1)
    return jnp.maximum(doc_start, jnp.maximum((pos // BLOCK_SIZE - w + 1) * BLOCK_SIZE, 0))


def dense_mask(docs: jax.Array, window_blocks) -> jax.Array:
    """[T, T] boolean mask of the rule; row q, column k."""
    pos = jnp.arange(docs.shape[-1], dtype=jnp.int32)
    return allowed(pos[:, None], pos[None, :], docs[:, None], docs[None, :], window_blocks)


# ------------------------------------------------------------------------------------------------
# Rotary (record26 §5.5, §11.3)


def _linspace01(n: int, dtype) -> np.ndarray:
    """torch.linspace(0, 1, n) in `dtype` as torch's CPU kernel computes it: step = 1/(n-1) in
    dtype, then step*i (first half) and 1 - step*(n-1-i) (second half), each with one rounding
    (the kernel's multiply-add is fused). Exact rationals make that single rounding explicit."""
    dtype = np.dtype(dtype)
    if n == 1:
        return np.zeros(1, dtype)
    step = Fraction(float(dtype.type(1) / dtype.type(n - 1)))
    vals = [step * i if i < n // 2 else 1 - step * (n - 1 - i) for i in range(n)]
    # float() rounds correctly to float64, which holds step*i exactly for fp32 step
    return np.array([float(v) for v in vals]).astype(dtype)


def rotary_frequencies(head_dim: int, base: float = 1024.0, dtype=np.float32) -> np.ndarray:
    """omega = (1/base)**linspace(0, 1, n) for n = head_dim//4, then n zeros (record26 §5.5).

    The exponents reproduce torch's linspace bit for bit and the power is taken in float64 and
    rounded once; this equals the reference's fp32 buffer for head_dim <= 128 (checked against
    torch 2.13 CPU; fp64 may differ by an ulp of 1e-16). Parity tests can still pass the
    reference's own frequencies as `freqs`/`rope_freqs`."""
    n = head_dim // 4
    omega = (1.0 / base) ** _linspace01(n, dtype).astype(np.float64)
    return np.concatenate([omega, np.zeros(n)]).astype(dtype)


def rotary_tables(seq_len: int, head_dim: int, base: float = 1024.0, dtype=jnp.float32,
                  freqs=None) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each [seq_len, head_dim//2] in `dtype`, with theta = t * omega computed in
    `dtype` (fp32 for the record and fp32 policies, fp64 for fp64) at absolute positions
    0..seq_len-1, not reset per document (record26 §5.5)."""
    if freqs is None:
        freqs = rotary_frequencies(head_dim, base, np.dtype(dtype))
    freqs = jnp.asarray(freqs, dtype)
    if freqs.shape != (head_dim // 2,):
        raise ValueError(f"rotary freqs have shape {freqs.shape}, expected ({head_dim // 2},)")
    theta = jnp.arange(seq_len, dtype=dtype)[:, None] * freqs[None, :]
    return jnp.cos(theta), jnp.sin(theta)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [T, H, D] by -theta with rotate-half pairing (dim j with j + D/2), computing in
    the tables' dtype and casting back to x's dtype (record26 §5.5, §11.3)."""
    T = x.shape[0]
    if T > cos.shape[0]:
        raise ValueError(f"sequence of {T} tokens exceeds the rotary table of {cos.shape[0]} rows")
    c, s = cos[:T, None, :], sin[:T, None, :]
    x1, x2 = jnp.split(x.astype(cos.dtype), 2, axis=-1)
    y = jnp.concatenate([x1 * c + x2 * s, -x1 * s + x2 * c], axis=-1)
    return y.astype(x.dtype)


def rotary(x: jax.Array, base: float = 1024.0, freqs=None) -> jax.Array:
    """apply_rotary with tables built for x: fp64 for fp64 x, else fp32 (record26 §5.5)."""
    cos, sin = rotary_tables(x.shape[0], x.shape[-1], base, acc_dtype(x.dtype), freqs)
    return apply_rotary(x, cos, sin)


# ------------------------------------------------------------------------------------------------
# Softmax attention over an explicit mask (record26 §11.8 eager math numerics)


def softmax_attend(q, k, v, mask, scale: float) -> jax.Array:
    """q [..., Q, H, D], k and v [..., K, H, D], mask [..., Q, K] -> [..., Q, H, D] in v's dtype.

    Every query must see at least one key (the rule always allows the diagonal)."""
    acc = acc_dtype(q.dtype)
    s = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=acc,
                   precision=matmul_precision(q.dtype))
    s = s * jnp.asarray(scale, acc)
    s = jnp.where(mask[..., None, :, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    out = jnp.einsum("...hqk,...khd->...qhd", p, v, preferred_element_type=acc_dtype(v.dtype),
                     precision=matmul_precision(v.dtype))
    return out.astype(v.dtype)


def dense_attention(q, k, v, docs, window_blocks, *, scale: float, max_window_blocks=None):
    """The rule as a full [T, T] mask: exact and simple, O(T^2) memory (tests, short sequences)."""
    del max_window_blocks  # every block is visible to the dense mask anyway
    return softmax_attend(q, k, v, dense_mask(docs, window_blocks), scale)


def _static_blocks(window_blocks, max_window_blocks, nblk: int) -> int:
    """How many kv blocks each query block gathers: a static int, at least the window."""
    if max_window_blocks is not None:
        nmax = min(max(int(max_window_blocks), 1), nblk)
        concrete = _concrete_int(window_blocks)
        if concrete is not None and min(max(concrete, 1), nblk) > nmax:
            raise ValueError(f"window_blocks={concrete} exceeds max_window_blocks={max_window_blocks}")
        return nmax
    concrete = _concrete_int(window_blocks)
    return nblk if concrete is None else min(max(concrete, 1), nblk)


def _concrete_int(x) -> int | None:
    try:
        return int(x)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return None


def blockwise_attention(q, k, v, docs, window_blocks, *, scale: float, max_window_blocks=None):
    """The rule evaluated only on the kv blocks a query block can reach (record26 §5.6).

    Query block m gathers kv blocks m-n+1..m, n = a static block count: `max_window_blocks` if
    given (the window may then be traced and must not exceed it), else the concrete window, else
    all blocks. Blocks before the sequence start are zero padding that the rule masks. The mask
    rule then removes what the (possibly smaller) runtime window and the documents forbid."""
    T, H, D = q.shape
    if T % BLOCK_SIZE:
        raise ValueError(f"blockwise attention needs T a multiple of {BLOCK_SIZE}, got T={T}")
    nblk = T // BLOCK_SIZE
    n = _static_blocks(window_blocks, max_window_blocks, nblk)
    pad = (n - 1) * BLOCK_SIZE

    def gather(a, fill=0):  # [T, ...] -> [nblk, n * BLOCK_SIZE, ...], oldest block first
        a = jnp.pad(a, [(pad, 0)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
        views = [a[j * BLOCK_SIZE: j * BLOCK_SIZE + T].reshape(nblk, BLOCK_SIZE, *a.shape[1:])
                 for j in range(n)]
        return jnp.concatenate(views, axis=1)

    def attend(q, k, v, docs, window):
        kb, vb = gather(k), gather(v)
        kpos, kdoc = gather(jnp.arange(T, dtype=jnp.int32), -1), gather(docs, -1)  # -1: padding
        qpos = jnp.arange(T, dtype=jnp.int32).reshape(nblk, BLOCK_SIZE)
        mask = allowed(qpos[:, :, None], kpos[:, None, :], docs.reshape(nblk, BLOCK_SIZE)[:, :, None],
                       kdoc[:, None, :], window)
        out = softmax_attend(q.reshape(nblk, BLOCK_SIZE, H, D), kb, vb, mask, scale)
        return out.reshape(T, H, D)

    # Rematerialised in the backward pass: saving the gathered blocks, scores and probabilities
    # of every layer costs ~6 GB per layer at the record's 49,152 tokens and 14 blocks.
    return jax.checkpoint(attend)(q, k, v, docs, jnp.asarray(window_blocks, jnp.int32))


# ------------------------------------------------------------------------------------------------
# Backend registry


Backend = Callable[..., jax.Array]
_BACKENDS: dict[str, Backend] = {"dense": dense_attention, "blockwise": blockwise_attention}
_AUTO: list[tuple[str, Callable[[str], bool]]] = []


def register_backend(name: str, fn: Backend, *, auto_when: Callable[[str], bool] | None = None) -> None:
    """Add a backend fn(q, k, v, docs, window_blocks, *, scale, max_window_blocks) -> [T, H, D].

    It must implement the rule exactly (test it against "dense"). With `auto_when`, "auto" picks
    it (latest registration first) when auto_when(jax.default_backend()) is true."""
    if name == "auto":
        raise ValueError("'auto' is reserved for backend selection")
    _BACKENDS[name] = fn
    if auto_when is not None:
        _AUTO.insert(0, (name, auto_when))


def backends() -> tuple[str, ...]:
    return tuple(_BACKENDS) + ("auto",)


def resolve_backend(name: str) -> str:
    if name == "auto":
        platform = jax.default_backend()
        return next((n for n, when in _AUTO if when(platform)), "blockwise")
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {backends()}")
    return name


def attention(q, k, v, docs, window_blocks, *, scale: float, backend: str = "auto",
              max_window_blocks: int | None = None) -> jax.Array:
    """Document-causal block-window attention of record26 §5.5-§5.6.

    q, k, v: [T, H, D] (q and k already normed and rotated); docs: document_ids(tokens) [T];
    window_blocks: int or int32 scalar w (max(w, 1) blocks visible); scale: 0.12 in the record.
    Returns [T, H, D] in v's dtype."""
    if docs.shape != (q.shape[0],):
        raise ValueError(f"docs has shape {docs.shape}, expected ({q.shape[0]},): pass document_ids(tokens)")
    fn = _BACKENDS[resolve_backend(backend)]
    return fn(q, k, v, docs, window_blocks, scale=scale, max_window_blocks=max_window_blocks)


def reads_dout_from_memory(backend: str, T: int, dtype) -> bool:
    """Whether `backend`'s backward pass reads the output gradient dO only as a stored tensor: the
    compiled Pallas kernels (jgpt.attention_gpu) on a GPU, whose one XLA reader of dO (the
    rowsum) pins its rounding. The GEMM writing dO then needs no rounding pin (model.linear)."""
    from jgpt import attention_gpu
    return (resolve_backend(backend) == "pallas" and jax.default_backend() == "gpu"
            and attention_gpu.fits(T, dtype))


def _register_fused() -> None:
    # record26 §5.6 as Pallas flash-attention kernels (jgpt.attention_gpu): auto on GPUs
    from jgpt import attention_gpu
    register_backend("pallas", attention_gpu.pallas_attention, auto_when=attention_gpu.auto_when)


_register_fused()
