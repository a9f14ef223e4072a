"""The fused head's two passes over the [C, 50304] logits as Pallas kernels (Triton on the GPU).

jgpt.head_loss keeps the bf16 z = fp8_mm(h, W) of a chunk and walks it twice (record26 §5.8-§5.9):

* forward: the row log-sum-exp of the softcapped logits, shifted by the softcap bound (every
  logit is <= cap, so exp(logit - cap) cannot overflow and one pass suffices), from the bf16 z
  the GEMM wrote (GEMM_OUT = "bf16", the default) or from its fp32 product, rounding z too;
* backward: dz = bf16(g * (softmax - onehot) * cap * s(1 - s) / div), quantised to e5m2 for the
  two FP8 backward GEMMs, which want it in both layouts ([C, V] for grad_h, [V, C] for grad_W:
  cuBLASLt's FP8 GEMM takes only K-contiguous operands).

As XLA fusions these cost ~3.2 ms per 8,192-token chunk on an H100 (the product's bf16
conversion, the LSE reduction, the dz pass, its e5m2 conversion and a separate transpose),
where reading z once takes 0.27 ms. Here the forward is one streaming pass over the product and
the backward one pass that writes both e5m2 layouts. The arithmetic is the XLA path's,
operation for operation (head_loss.py), so the interpreted kernels on the CPU give the same
bits, except the LSE's summation order, with EXP = "accurate"; the default "fast" swaps exp for
exp2(x log2 e), as Triton's own exp and torch.compile's kernels do (a few fp32 ulps).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jgpt import fp8
from jgpt.pallas_compat import LOG2E, checked_mode, compiler_params, out_struct, parse_ints, use_kernels

COL_QUANTUM = 128  # the vocabulary must be a multiple of this (50,304 = 393 x 128)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes and Triton warps of the two kernels (scripts/bench_head.py compares them)."""
    # defaults: scripts/bench_head.py's second H100 sweep (BENCHMARKS.md, session 3): 2,2048,4
    # for the LSE (0.90 ms per chunk vs 0.97 at 4 rows) and 64,64 with 8 warps for the gradient
    # (1.07 vs 1.13 with 4), adopted in session 5 with the step timed
    lse_rows: int = 2  # forward: rows per program
    lse_cols: int = 2048  # forward: vocabulary columns per loop step
    lse_warps: int = 4
    grad_rows: int = 64  # backward: the tile each program writes (and its transpose)
    grad_cols: int = 64
    grad_warps: int = 8

    @classmethod
    def parse(cls, text: str) -> "Tiles":
        """'lse_rows,lse_cols,lse_warps,grad_rows,grad_cols,grad_warps'."""
        return cls(*parse_ints(cls, text, "head tiles"))

    def __post_init__(self):
        sizes = (self.lse_rows, self.lse_cols, self.grad_rows, self.grad_cols)
        if any(n <= 0 or n & (n - 1) for n in sizes) or self.grad_cols > COL_QUANTUM or self.lse_cols < COL_QUANTUM:
            raise ValueError(f"head tiles must be powers of two with grad_cols <= {COL_QUANTUM} <= lse_cols: {self}")


TILES = Tiles()


def set_tiles(tiles: Tiles) -> None:
    """Use these tiles for kernels traced from now on."""
    global TILES
    TILES = tiles

MODE = "auto"  # "auto" (kernels on GPUs), "pallas", "interpret" (tests) or "xla"
# the forward FP8 GEMM's output: "bf16" (jgpt.fp8.fwd_bf16: cuBLASLt writes z, alpha approximated
# to 2.1e-7, which moves ~5e-5 of z's roundings; 27 ms less per step on an H100, BENCHMARKS.md
# session 6) or "f32" (the record's exact alpha; the cuBLASLt call writes the fp32 product and
# lse_and_z rounds it)
DEFAULT_GEMM_OUT = GEMM_OUT = "bf16"
# the kernels' exp: "fast" (exp2(x log2 e), one ex2.approx: how Triton itself lowers an fp32 exp
# on NVIDIA GPUs, so how torch.compile's kernels of the record compute it; 11 ms less per step)
# or "accurate" (jnp.exp: libdevice's expf in Triton, the XLA path's operation)
DEFAULT_EXP = EXP = "fast"


def _checked(value: str, options: tuple[str, ...], what: str) -> str:
    if value not in options:
        raise ValueError(f"{what} must be {' or '.join(options)}, got {value!r}")
    return value


def set_gemm_out(out: str) -> None:
    global GEMM_OUT
    GEMM_OUT = _checked(out, ("f32", "bf16"), "head GEMM output")


def set_exp(kind: str) -> None:
    global EXP
    EXP = _checked(kind, ("accurate", "fast"), "head kernel exp")


def set_mode(mode: str) -> None:
    """Select the head's elementwise passes: scripts/bench.py --head_kernels compares them."""
    global MODE
    MODE = checked_mode(mode, "head")


def applies(z_shape) -> tuple[bool, bool]:
    """(use the kernels, interpreted) for a chunk of z with this shape under MODE."""
    C, V = z_shape
    return use_kernels(MODE, C % TILES.grad_rows == 0 and C % TILES.lse_rows == 0 and V % COL_QUANTUM == 0)


def _scaled(z, div):
    # fp32(z) / div as a multiplication by the fp32 reciprocal: XLA rewrites division by a
    # constant into this anyway (as in jgpt.fp8), and a Triton division is a slow IEEE divide
    return z.astype(jnp.float32) * (np.float32(1) / np.float32(div))


def _exp(x, fast: bool):
    return jnp.exp2(x * np.float32(LOG2E)) if fast else jnp.exp(x)


def _sigmoid(x, fast: bool):
    return 1 / (1 + _exp(-x, True)) if fast else jax.nn.sigmoid(x)


def softcapped(z, cap, div, fast: bool = False):
    """record26 §5.8's logits from the bf16 z: cap * sigmoid(fp32(z) / div), fp32 (fast: with
    the base-2 exp, see EXP)."""
    return cap * _sigmoid(_scaled(z, div), fast)


def _col_pieces(V: int, width: int):
    """(start, size) column pieces covering [0, V): full `width` tiles, then power-of-two tails
    (Triton tiles are powers of two; V is a multiple of COL_QUANTUM)."""
    n_full = V // width
    pieces, start, size = [], n_full * width, width // 2
    while start < V:
        if V - start >= size:
            pieces.append((start, size))
            start += size
        size //= 2
    return n_full, pieces


def _lse_kernel(src_ref, *out_refs, cap, div, V, rows, width):
    # src: the FP8 GEMM's fp32 product (out_refs = z, lse: z is written as it is read) or the
    # bf16 z itself (out_refs = lse)
    z_ref, lse_ref = out_refs if len(out_refs) == 2 else (None, out_refs[0])
    n_full, tails = _col_pieces(V, width)
    fast = EXP == "fast"

    def add(acc, start, size):
        cols = pl.ds(start, size)
        if z_ref is None:
            z = src_ref[:, cols]
        else:
            z = src_ref[:, cols].astype(z_ref.dtype)  # the FP8 GEMM's bf16 output rounding
            z_ref[:, cols] = z
        e = _exp(softcapped(z, cap, div, fast) - cap, fast)
        return acc + jnp.sum(e, axis=1)

    acc = jnp.zeros((rows,), jnp.float32)
    if n_full:  # (a loop body traced with a tile wider than the vocabulary would not lower)
        acc = lax.fori_loop(0, n_full, lambda j, a: add(a, j * width, width), acc)
    for start, size in tails:
        acc = add(acc, start, size)
    lse_ref[...] = cap + jnp.log(acc)


def _lse_call(src, with_z: bool, cap, div, interpret):
    C, V = src.shape
    t = TILES
    block = pl.BlockSpec((t.lse_rows, V), lambda i: (i, 0))
    lse_spec, lse_struct = pl.BlockSpec((t.lse_rows,), lambda i: (i,)), out_struct((C,), jnp.float32, src)
    return pl.pallas_call(
        functools.partial(_lse_kernel, cap=cap, div=div, V=V, rows=t.lse_rows, width=t.lse_cols),
        grid=(C // t.lse_rows,), in_specs=[block],
        out_specs=[block, lse_spec] if with_z else lse_spec,
        out_shape=[out_struct((C, V), jnp.bfloat16, src), lse_struct] if with_z else lse_struct,
        interpret=interpret, **compiler_params(interpret, t.lse_warps),
    )(src)


def lse_and_z(prod: jax.Array, cap: float, div: float, interpret: bool = False):
    """From the FP8 GEMM's fp32 product [C, V]: z = bf16(prod) and, per row, the log-sum-exp
    cap + log(sum(exp(cap * sigmoid(z / div) - cap))) in fp32 [C], in one pass (the GEMM's
    output is read once instead of by a bf16 conversion and then by the reduction)."""
    return _lse_call(prod, True, cap, div, interpret)


def lse_of_z(z: jax.Array, cap: float, div: float, interpret: bool = False) -> jax.Array:
    """The row log-sum-exp of lse_and_z from a bf16 z [C, V] (the GEMM wrote z itself:
    GEMM_OUT = "bf16")."""
    return _lse_call(z, False, cap, div, interpret)


def grad_z(z, lse, onehot, g, cap, div, *, fast: bool = False):
    """dz of the summed CE in torch autograd's order for the record's graph (record26 §5.8):
    d logits = g (softmax - onehot); d sigmoid = cap d logits; dz = d sigmoid s (1 - s) / div,
    rounded to z's dtype (bf16) like the gradient of the bf16 z. lse, g broadcast against z.

    (The record materialises the bf16 gradient, §5.9; fp8.quantize keeps that rounding where XLA
    fuses dz into the quantisation, and Triton kernels keep it anyway.)
    fast: the base-2 exp and sigmoid of EXP = "fast" (the kernels only)."""
    s = _sigmoid(_scaled(z, div), fast)
    d_logits = g * (_exp(cap * s - lse, fast) - onehot.astype(jnp.float32))
    dz = _scaled((d_logits * cap) * (s * (1 - s)), div)
    return dz.astype(z.dtype)


def grad_z_xla(z, lse, targets, g, cap, div):
    """dz of a [C, V] chunk as XLA fusions (the kernels' fallback, and the reference the
    gradient kernel is tested and timed against): grad_z with the one-hot of the targets."""
    onehot = jnp.arange(z.shape[-1], dtype=jnp.int32)[None, :] == jnp.asarray(targets, jnp.int32)[:, None]
    return grad_z(z, lse[:, None], onehot, g, cap, div)


def _grad_kernel(z_ref, lse_ref, y_ref, g_ref, g8_ref, g8t_ref, *, cap, div, grad_s):
    j = pl.program_id(1)
    width = g8_ref.shape[1]
    cols = j * width + lax.iota(jnp.int32, width)
    onehot = cols[None, :] == y_ref[...][:, None]
    dz = grad_z(z_ref[...], lse_ref[...][:, None], onehot, g_ref[...][:, None], cap, div, fast=EXP == "fast")
    q = fp8.scaled_clip(dz, grad_s, jnp.float8_e5m2)  # fp32, on the e5m2 grid's range
    g8_ref[...] = q.astype(jnp.float8_e5m2)
    g8t_ref[...] = q.T.astype(jnp.float8_e5m2)


def grad_e5m2(z, lse, targets, g, cap: float, div: float, grad_s: float, interpret: bool = False):
    """The head's z-gradient quantised for the FP8 backward GEMMs, in both layouts:
    (G8 [C, V], G8^T [V, C]) in float8_e5m2, G8 = e5m2(clip(bf16(dz) / grad_s))."""
    C, V = z.shape
    R, W = TILES.grad_rows, TILES.grad_cols
    g_rows = jnp.broadcast_to(jnp.asarray(g, jnp.float32), (C,))
    row = pl.BlockSpec((R,), lambda i, j: (i,))
    return pl.pallas_call(
        functools.partial(_grad_kernel, cap=cap, div=div, grad_s=grad_s),
        grid=(C // R, V // W),
        in_specs=[pl.BlockSpec((R, W), lambda i, j: (i, j)), row, row, row],
        out_specs=[pl.BlockSpec((R, W), lambda i, j: (i, j)), pl.BlockSpec((W, R), lambda i, j: (j, i))],
        out_shape=[out_struct((C, V), jnp.float8_e5m2, z), out_struct((V, C), jnp.float8_e5m2, z)],
        interpret=interpret, **compiler_params(interpret, TILES.grad_warps),
    )(z, lse, targets.astype(jnp.int32), g_rows)
