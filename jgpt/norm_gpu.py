"""A block's residual add and the MLP's input norm (model.add_then_norm) as Pallas kernels
(Triton on GPUs), one pass each way.

After attention every block computes, per token row of width d (record26 §5.4, §11.1),

    s = fp32(x) + fp32(a)          stored = bf16(s)          normed = bf16(s * r),
    r = (mean(s^2) + eps)^-1/2

and in the backward pass (model.sum_norm's: at the stored sum, as torch's autograd does)

    g = bf16(g_stored + r g_normed - r^3 stored mean(g_normed stored)),

the gradient of both x and a. As XLA fusions each direction is a reduction and an elementwise
pass with the fp32 sum written between them (about 0.6 GB of traffic per layer and sequence
forward at 49,152 tokens, ~0.5 GB backward), where torch.compile writes one persistent
reduction kernel (BENCHMARKS.md session 9). Here each direction reads its inputs and writes its
outputs once: 0.3 GB each. Measured once on an H100: the record step at W14 took 762 ms against
768 with XLA's passes, with parity kept; off by default (MODE) until timed beside torch again.

The arithmetic is model.sum_norm's operation for operation in fp32, with one rounding per stored
tensor; only the row sums' order differs, so the kernels match the XLA path to within one bf16
rounding of a few elements (tests/test_norm_gpu.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jgpt.config import RMS_EPS
from jgpt.pallas_compat import RowTiles, checked_mode, compiler_params, out_struct, use_kernels


class Tiles(RowTiles):
    # token rows per program (32, 4 warps: qkv_gpu's timed choice; not yet swept for these kernels)
    FAMILY = "norm"


TILES = Tiles()
# "auto" (kernels on GPUs), "pallas", "interpret" (tests) or "xla". Off by default until timed
# and parity-checked on a GPU (bench.py --variant k:norm=auto; gpu_parity.py --jgpt_flags)
DEFAULT_MODE = "xla"
MODE = DEFAULT_MODE


def set_mode(mode: str) -> None:
    """Select the add + norm passes: kernels or XLA fusions (benchmarks compare them)."""
    global MODE
    MODE = checked_mode(mode, "norm")


def set_tiles(tiles: Tiles) -> None:
    global TILES
    TILES = tiles


def _piece(d: int) -> int:
    # columns per load: a power of two (Triton's tensors are) dividing d, at most 256
    p = d & -d
    return min(p, 256)


def applies(x: jax.Array, a: jax.Array) -> tuple[bool, bool]:
    """(use the kernels, interpreted) for add_norm(x, a) under MODE."""
    fits = (x.ndim == 2 and x.shape == a.shape and x.dtype == a.dtype == jnp.bfloat16
            and x.shape[0] % TILES.rows == 0 and _piece(x.shape[1]) >= 16)
    return use_kernels(MODE, fits)


def _cols(d: int):
    p = _piece(d)
    return [pl.ds(c * p, p) for c in range(d // p)]


def _add_norm_fwd_kernel(x_ref, a_ref, stored_ref, normed_ref, r_ref, *, eps):
    d = x_ref.shape[1]
    sum_of = lambda cols: x_ref[:, cols].astype(jnp.float32) + a_ref[:, cols].astype(jnp.float32)  # noqa: E731
    ss = jnp.zeros((x_ref.shape[0],), jnp.float32)
    for cols in _cols(d):
        s = sum_of(cols)
        stored_ref[:, cols] = s.astype(stored_ref.dtype)
        ss = ss + jnp.sum(s * s, axis=1)
    r = jax.lax.rsqrt(ss / d + eps)
    for cols in _cols(d):  # the second read of x and a hits the cache, not HBM
        normed_ref[:, cols] = (sum_of(cols) * r[:, None]).astype(normed_ref.dtype)
    r_ref[...] = r


def _add_norm_bwd_kernel(gs_ref, gn_ref, st_ref, r_ref, g_ref):
    d = st_ref.shape[1]
    r = r_ref[...]
    proj = jnp.zeros(r.shape, jnp.float32)
    for cols in _cols(d):
        proj = proj + jnp.sum(gn_ref[:, cols].astype(jnp.float32) * st_ref[:, cols].astype(jnp.float32), axis=1)
    proj = (proj / d)[:, None]
    r2 = r[:, None]
    for cols in _cols(d):
        st = st_ref[:, cols].astype(jnp.float32)
        g = gs_ref[:, cols].astype(jnp.float32) + r2 * gn_ref[:, cols].astype(jnp.float32) - r2 * r2 * r2 * st * proj
        g_ref[:, cols] = g.astype(g_ref.dtype)


def _call(kernel, ins, outs, interpret):
    T = ins[0].shape[0]
    rows = TILES.rows
    spec = lambda shape: pl.BlockSpec((rows, *shape[1:]), lambda i: (i,) + (0,) * (len(shape) - 1))  # noqa: E731
    return pl.pallas_call(
        kernel, grid=(T // rows,), in_specs=[spec(a.shape) for a in ins],
        out_specs=[spec(o.shape) for o in outs], out_shape=outs,
        interpret=interpret, **compiler_params(interpret, TILES.warps),
    )(*ins)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def add_norm(x: jax.Array, a: jax.Array, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(bf16(x + a), bf16(rms_norm(x + a))) with the sum and the norm in fp32: model.add_then_norm
    for bf16 x, a [T, d] (applies())."""
    return _add_norm_fwd(x, a, interpret)[0]


def _add_norm_fwd(x, a, interpret):
    T = x.shape[0]
    stored, normed, r = _call(functools.partial(_add_norm_fwd_kernel, eps=RMS_EPS), [x, a],
                              [out_struct(x.shape, x.dtype, x)] * 2 + [out_struct((T,), jnp.float32, x)],
                              interpret)
    return (stored, normed), (stored, r)


def _add_norm_bwd(interpret, res, g):
    stored, r = res
    g_stored, g_normed = (c.astype(stored.dtype) for c in g)
    (gx,) = _call(_add_norm_bwd_kernel, [g_stored, g_normed, stored, r], [out_struct(stored.shape, stored.dtype, stored)],
                  interpret)
    return gx, gx


add_norm.defvjp(_add_norm_fwd, _add_norm_bwd)
