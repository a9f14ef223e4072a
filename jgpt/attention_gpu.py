"""Flash attention for the record's mask as Pallas kernels (Triton on the GPU; interpreted on CPU).

record26 §5.6's rule is an interval per query: allowed(q, k) = key_start[q] <= k <= q
(attention.key_start), with key_start nondecreasing in q. So a query block needs only the kv
blocks from key_start[first query] up to its diagonal, and a kv block is needed only by the query
blocks from its own up to the last query whose key_start reaches it: both loops skip every block
the documents and the window rule out, as the record's FlexAttention block masks do (§5.6).

Numerics follow the record's flex attention (§11.8): scores q.k in fp32 from bf16 operands, an
online softmax in fp32, P rounded to bf16 for P @ V with fp32 accumulation, output bf16; the
backward recomputes P from the saved log-sum-exp (FlashAttention-2), rounds dS to bf16 for the
dQ and dK GEMMs, and accumulates in fp32. The kernels take bf16/fp16; other dtypes (fp32 and
fp64 parity runs) go to the blockwise backend.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jgpt.pallas_compat import LOG2E, compiler_params, out_struct, parse_ints
from jgpt.rounding import pinned_f32

NEG = -1e30  # running-max start: finite, so a row with no visible key yet gives exp(-inf) = 0
# The softmax runs in base 2, as FlexAttention's kernels do (record26 §11.8): scores are scaled
# by scale * log2(e) and exponentiated with exp2, one multiply-add and one ex2 per score where
# exp(x) costs a libdevice range reduction; the saved log-sum-exp is base 2 too (internal).


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel's tile and Triton launch settings: `rows` per program (query rows in the
    forward and dQ, keys in dK/dV) and `step` per loop iteration (keys, resp. query rows)."""
    rows: int
    step: int
    warps: int
    stages: int


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The three kernels' settings (scripts/bench_attention.py --tiles compares them). Defaults:
    FlexAttention's H100 choice for head dim 128 (8 warps, 3 stages; 128 keys per dK/dV program),
    which with the transposed dK/dV loop beat session 4's 4-warp 64-key tiles in the record step
    (BENCHMARKS.md, session 5)."""
    fwd: Launch = Launch(128, 64, 8, 3)
    dq: Launch = Launch(128, 64, 8, 3)
    dkv: Launch = Launch(128, 64, 8, 3)
    # loop separately over the tiles every row and column of a program sees whole, skipping
    # the mask arithmetic there (three loops per program); False: one loop, every tile masked
    split: bool = True

    @classmethod
    def parse(cls, text: str) -> "Tiles":
        """'rows,step,warps,stages' per kernel, fwd/dq/dkv separated by '/', then optionally
        '/masked' (split=False)."""
        parts = text.split("/")
        split = not (len(parts) == 4 and parts[3] == "masked")
        parts = parts[:3] if len(parts) == 4 and not split else parts
        if len(parts) != 3:
            raise ValueError(f"attention tiles must read 'r,s,w,st/r,s,w,st/r,s,w,st[/masked]' (fwd/dq/dkv), got {text!r}")
        return cls(*(Launch(*parse_ints(Launch, p, f"attention {name} tiles"))
                     for name, p in zip(("fwd", "dq", "dkv"), parts)), split=split)

    def __post_init__(self):
        for name in ("fwd", "dq", "dkv"):
            t = getattr(self, name)
            if min(t.rows, t.step, t.warps, t.stages) <= 0 or any(n & (n - 1) for n in (t.rows, t.step, t.warps)):
                raise ValueError(f"attention {name} tiles must be positive powers of two: {t}")
        for name in ("fwd", "dq"):  # a query tile's diagonal must end on a key-tile boundary
            t = getattr(self, name)
            if t.rows % t.step:
                raise ValueError(f"attention {name}: query tile {t.rows} must be a multiple of key tile {t.step}")

    def __str__(self) -> str:
        text = "/".join(f"{t.rows},{t.step},{t.warps},{t.stages}" for t in (self.fwd, self.dq, self.dkv))
        return text if self.split else text + "/masked"


TILES = Tiles()


def set_tiles(tiles: Tiles) -> None:
    """Use these tiles for kernels traced from now on (already compiled functions keep theirs)."""
    global TILES
    TILES = tiles


def _compiler_params(interpret: bool, launch: Launch):
    return compiler_params(interpret, launch.warps, launch.stages)


def _dot(a, b, trans_b=False):
    """a @ b (or a @ b.T) with fp32 accumulation."""
    # fp32 operands (the interpreted logic tests) must not run as TF32 on a GPU
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, (((1,), (1 if trans_b else 0,)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)


def _visible(q_pos, k_pos, ks):
    return (k_pos[None, :] >= ks[:, None]) & (k_pos[None, :] <= q_pos[:, None])


def _split_loop(lo, free_lo, free_hi, hi, body, carry):
    """fori over tiles [lo, hi) where the tiles in [free_lo, free_hi) are visible to every row
    and column of the program's tile: those skip the mask arithmetic, body(j, carry, masked)."""
    if not TILES.split:
        return lax.fori_loop(lo, hi, functools.partial(body, masked=True), carry)
    a = jnp.clip(free_lo, lo, hi)
    b = jnp.clip(free_hi, a, hi)
    carry = lax.fori_loop(lo, a, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(a, b, functools.partial(body, masked=False), carry)
    return lax.fori_loop(b, hi, functools.partial(body, masked=True), carry)


def _query_tile_bounds(ks, i, bq, bk):
    """Key tiles a query tile loops over, and the ones every row sees whole: from key_start of
    its first row to its diagonal; whole tiles start at or after key_start of its last row (ks
    is nondecreasing) and end at or before its first row (causality)."""
    lo, hi = jnp.min(ks) // bk, (i + 1) * bq // bk
    return lo, (jnp.max(ks) + bk - 1) // bk, i * bq // bk, hi


def _fwd_kernel(ks_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, bq, bk):
    i = pl.program_id(1)
    q = q_ref[...]
    ks = ks_ref[...]
    q_pos = i * bq + lax.iota(jnp.int32, bq)

    def body(j, carry, masked):
        m, l, acc = carry
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        s = _dot(q, k, trans_b=True) * (scale * LOG2E)
        if masked:
            s = jnp.where(_visible(q_pos, j * bk + lax.iota(jnp.int32, bk), ks), s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return m_new, l, acc

    d = q.shape[-1]
    init = (jnp.full((bq,), NEG, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, d), jnp.float32))
    m, l, acc = _split_loop(*_query_tile_bounds(ks, i, bq, bk), body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(l)


def _dq_kernel(ks_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, bq, bk):
    i = pl.program_id(1)
    q, do, ks = q_ref[...], do_ref[...], ks_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = i * bq + lax.iota(jnp.int32, bq)

    def body(j, dq, masked):
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        p = jnp.exp2(_dot(q, k, trans_b=True) * (scale * LOG2E) - lse[:, None])
        if masked:
            p = jnp.where(_visible(q_pos, j * bk + lax.iota(jnp.int32, bk), ks), p, 0.0)
        ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = _split_loop(*_query_tile_bounds(ks, i, bq, bk), body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(qend_ref, qfull_ref, ks_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref,
                dv_ref, *, scale, bq, bk):
    j = pl.program_id(1)
    k, v = k_ref[...], v_ref[...]
    k_pos = j * bk + lax.iota(jnp.int32, bk)

    # The loop works on transposed tiles, [keys, queries] (as FlashAttention-2's Triton kernels
    # do): P^T and dS^T are then computed in the layout the dV and dK products take as their
    # left operand, where P and dS [queries, keys] would each need a transpose of a register
    # tile per step; the transposed operands are q and dO, read from memory.
    def body(i, carry, masked):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        q, do = q_ref[rows, :], do_ref[rows, :]
        lse, delta = lse_ref[rows], delta_ref[rows]
        pt = jnp.exp2(_dot(k, q, trans_b=True) * (scale * LOG2E) - lse[None, :])
        if masked:
            q_pos, ks = i * bq + lax.iota(jnp.int32, bq), ks_ref[rows]
            pt = jnp.where((k_pos[:, None] >= ks[None, :]) & (k_pos[:, None] <= q_pos[None, :]), pt, 0.0)
        dv = dv + _dot(pt.astype(do.dtype), do)
        dst = pt * (_dot(v, do, trans_b=True) - delta[None, :])
        dk = dk + _dot(dst.astype(q.dtype), q)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    # query tiles that see this key tile: from its first key (causality) to the last query whose
    # key_start reaches its last key (qend); those whose rows all see every key of it run from
    # the tile at or after its last key up to the last query whose key_start is <= its first key
    # (qfull); key_start is nondecreasing, so both are prefix ends, precomputed per key
    lo, hi = j * bk // bq, (jnp.max(qend_ref[...]) + bq - 1) // bq
    free_lo, free_hi = (j * bk + bk - 1 + bq - 1) // bq, jnp.max(qfull_ref[...]) // bq
    dk, dv = _split_loop(lo, free_lo, free_hi, hi, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _spec(block, index):
    return pl.BlockSpec(block, index)


# q, k, v, o and their gradients are [T, H, D] (the projection's layout: no head transposes
# around the kernels); a program reads one head's rows, a strided view of 256-byte rows
def _rows(n, D):
    return _spec((n, None, D), lambda h, i: (i, h, 0))


def _whole(T, D):
    return _spec((T, None, D), lambda h, i: (0, h, 0))


def _forward(q, k, v, ks, scale, interpret):
    T, H, D = q.shape
    t = TILES.fwd
    BLOCK_Q, BLOCK_K = t.rows, t.step
    kernel = functools.partial(_fwd_kernel, scale=scale, bq=BLOCK_Q, bk=BLOCK_K)
    return pl.pallas_call(
        kernel, grid=(H, T // BLOCK_Q),
        in_specs=[_spec((BLOCK_Q,), lambda h, i: (i,)), _rows(BLOCK_Q, D), _whole(T, D), _whole(T, D)],
        out_specs=[_rows(BLOCK_Q, D), _spec((None, BLOCK_Q), lambda h, i: (h, i))],
        out_shape=[out_struct(q.shape, q.dtype, q), out_struct((H, T), jnp.float32, q)],
        interpret=interpret, **_compiler_params(interpret, t),
    )(ks, q, k, v)


def _backward(q, k, v, o, lse, do, ks, scale, interpret):
    T, H, D = q.shape
    BLOCK_Q, BLOCK_K = TILES.dq.rows, TILES.dq.step
    BLOCK_KV, BLOCK_QB = TILES.dkv.rows, TILES.dkv.step
    row_q, whole = _rows(BLOCK_Q, D), _whole(T, D)
    vec_q = _spec((None, BLOCK_Q), lambda h, i: (h, i))
    # FlashAttention-2's rowsum(o * dO) as one XLA reduction (computing it inside the dQ kernel
    # cost that kernel more than this pass: +7.5 ms against 5.1 ms per record step on an H100)
    # dO's bf16 rounding pinned here (the kernels read the stored dO), so that the GEMM writing it
    # needs no pin of its own (model.linear's pin_dx)
    delta = jnp.sum(o.astype(jnp.float32) * pinned_f32(do), axis=-1).T  # [H, T]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, bq=BLOCK_Q, bk=BLOCK_K), grid=(H, T // BLOCK_Q),
        in_specs=[_spec((BLOCK_Q,), lambda h, i: (i,)), row_q, whole, whole, row_q, vec_q, vec_q],
        out_specs=row_q, out_shape=out_struct(q.shape, q.dtype, q),
        interpret=interpret, **_compiler_params(interpret, TILES.dq),
    )(ks, q, k, v, do, lse, delta)

    # per key: the end of the query prefix whose key_start reaches its tile's last key (qend)
    # and its tile's first key (qfull); key_start is sorted
    tile_start = jnp.arange(T, dtype=jnp.int32) // BLOCK_KV * BLOCK_KV
    qend = jnp.searchsorted(ks, tile_start + BLOCK_KV - 1, side="right").astype(jnp.int32)
    qfull = jnp.searchsorted(ks, tile_start, side="right").astype(jnp.int32)
    row_k = _rows(BLOCK_KV, D)
    whole_vec = _spec((None, T), lambda h, j: (h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, bq=BLOCK_QB, bk=BLOCK_KV), grid=(H, T // BLOCK_KV),
        in_specs=[_spec((BLOCK_KV,), lambda h, j: (j,)), _spec((BLOCK_KV,), lambda h, j: (j,)),
                  _spec((T,), lambda h, j: (0,)), whole, row_k, row_k,
                  whole, whole_vec, whole_vec],
        out_specs=[row_k, row_k],
        out_shape=[out_struct(k.shape, k.dtype, k), out_struct(v.shape, v.dtype, v)],
        interpret=interpret, **_compiler_params(interpret, TILES.dkv),
    )(qend, qfull, ks, q, k, v, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, ks, scale, interpret):
    return _forward(q, k, v, ks, scale, interpret)[0]


def _flash_fwd(q, k, v, ks, scale, interpret):
    o, lse = _forward(q, k, v, ks, scale, interpret)
    return o, (q, k, v, ks, o, lse)


def _flash_bwd(scale, interpret, res, do):
    q, k, v, ks, o, lse = res
    dq, dk, dv = _backward(q, k, v, o, lse, do, ks, scale, interpret)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas_attention(q, k, v, docs, window_blocks, *, scale: float, max_window_blocks=None,
                     interpret: bool | None = None):
    """Backend fn (attention.register_backend): q, k, v [T, H, D] -> [T, H, D] in v's dtype.

    interpret: run the kernels in Pallas's interpreter (default: off the GPU)."""
    from jgpt import attention as attn
    T = q.shape[0]
    if not fits(T, q.dtype):
        return attn.blockwise_attention(q, k, v, docs, window_blocks, scale=scale,
                                        max_window_blocks=max_window_blocks)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    ks = attn.key_start(docs, window_blocks)
    return _flash(q, k, v, ks, float(scale), bool(interpret))


def fits(T: int, dtype) -> bool:
    """Whether the kernels take T tokens in dtype (pallas_attention falls back to blockwise otherwise)."""
    return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and not any(
        T % n for t in (TILES.fwd, TILES.dq, TILES.dkv) for n in (t.rows, t.step))


def auto_when(platform: str) -> bool:
    """"auto" picks the kernels on GPUs (Triton lowering); the CPU keeps blockwise."""
    return platform == "gpu"
