"""QK-norm, rotary and the value mix of an attention layer as Pallas kernels (Triton on GPUs).

Between the merged QKV projection and attention (record26 §5.5) every layer computes, per
head and token,

    q = bf16(rot(rms_norm_f32(q_raw)))      k = bf16(rot(rms_norm_f32(k_raw)))
    v = bf16(lam_v * v_raw + lam_ve * ve)       (lam_ve * ve only in value-embedding layers)

with rot the rotary of §5.5 in fp32, and in the backward pass the transposes
of these into one gradient of the projection's output. As XLA fusions this took ~1 ms per
layer and sequence on an H100 at 49,152 tokens (the norms' reductions, the rotations and the
concatenations and head transposes each a separate pass over the [T, 2304] activations: 86 ms
of a 790 ms record step), where torch.compile fuses each direction into one kernel (39 ms).
Here the forward is one pass that reads the projection's output once and writes q, k, v, and
the backward one pass that writes the projection's gradient [T, 3 * H * D] directly (plus the
value embedding's gradient and per-row partial sums for the two lambdas): 51 ms per step
(BENCHMARKS.md, session 4).

The arithmetic is jgpt.model's (norm_rotary, model.mix), operation for operation in fp32 with
the same bf16 roundings: one per stored tensor, as the compiled record's fused Triton kernels
round (record26 §11.1; model.norm_rotary says why the norm's output is not rounded before the
rotation). Only the norm's summation order (and where a compiler contracts a multiply-add)
differs, so the kernels match the XLA path on the CPU to within one bf16 rounding of a few
elements (tests/test_qkv_gpu.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jgpt.config import RMS_EPS
from jgpt.pallas_compat import RowTiles, checked_mode, compiler_params, out_struct, use_kernels


class Tiles(RowTiles):
    # tokens per program (each does one head of q, k and v). scripts/bench_qkv.py on an H100:
    # fwd+bwd 0.63 ms at 64 rows, 0.60 at 32, 0.81 at 128; 32 adopted in session 5 with the
    # step timed (BENCHMARKS.md)
    FAMILY = "qkv"


TILES = Tiles()
MODE = "auto"  # "auto" (kernels on GPUs), "pallas", "interpret" (tests) or "xla"


def set_mode(mode: str) -> None:
    """Select the QK-norm/rotary/mix passes: kernels or XLA fusions (benchmarks compare them)."""
    global MODE
    MODE = checked_mode(mode, "qkv")


def set_tiles(tiles: Tiles) -> None:
    global TILES
    TILES = tiles


def applies(T: int, head_dim: int, dtype) -> tuple[bool, bool]:
    """(use the kernels, interpreted) for T tokens of heads of head_dim in dtype under MODE."""
    half = head_dim // 2
    return use_kernels(MODE, jnp.dtype(dtype) == jnp.bfloat16 and T % TILES.rows == 0 and head_dim % 2 == 0
                       and half & (half - 1) == 0)


def _halves(ref):
    half = ref.shape[-1] // 2
    return ref[:, :half].astype(jnp.float32), ref[:, half:].astype(jnp.float32)


def _inv_rms(x1, x2, eps):
    """rsqrt(mean(x^2) + eps) per row of a head split into its two rotary halves (fp32)."""
    d = 2 * x1.shape[-1]
    return lax.rsqrt((jnp.sum(x1 * x1, axis=1) + jnp.sum(x2 * x2, axis=1)) / d + eps)


def _qkv_fwd_kernel(q_ref, k_ref, v_ref, *refs, has_ve, eps):
    if has_ve:
        ve_ref, cos_ref, sin_ref, l0_ref, l1_ref, qo_ref, ko_ref, vo_ref = refs
    else:
        cos_ref, sin_ref, l0_ref, qo_ref, ko_ref, vo_ref = refs
    c, s = cos_ref[...], sin_ref[...]
    half = c.shape[-1]
    for x_ref, o_ref in ((q_ref, qo_ref), (k_ref, ko_ref)):
        x1, x2 = _halves(x_ref)
        r = _inv_rms(x1, x2, eps)[:, None]
        # the norm's output goes into the rotation in fp32 (model.norm_rotary: the compiled record)
        n1, n2 = x1 * r, x2 * r
        o_ref[:, :half] = (n1 * c + n2 * s).astype(o_ref.dtype)
        o_ref[:, half:] = (-n1 * s + n2 * c).astype(o_ref.dtype)
    v = l0_ref[...][:, None] * v_ref[...].astype(jnp.float32)
    if has_ve:
        v = v + l1_ref[...][:, None] * ve_ref[...].astype(jnp.float32)
    vo_ref[...] = v.astype(vo_ref.dtype)


def _qkv_bwd_kernel(q_ref, k_ref, v_ref, dq_ref, dk_ref, dv_ref, *refs, has_ve, eps, heads):
    if has_ve:
        ve_ref, cos_ref, sin_ref, l0_ref, l1_ref, dqkv_ref, dve_ref, dl0_ref, dl1_ref = refs
    else:
        cos_ref, sin_ref, l0_ref, dqkv_ref, dl0_ref = refs
    i, h = pl.program_id(0), pl.program_id(1)
    c, s = cos_ref[...], sin_ref[...]
    rows, half = c.shape
    dtype = dqkv_ref.dtype
    row_ds = pl.ds(i * rows, rows)
    for slot, x_ref, g_ref in ((0, q_ref, dq_ref), (1, k_ref, dk_ref)):
        g1, g2 = _halves(g_ref)
        # the rotation's transpose, in fp32 into the norm's (autodiff of model.norm_rotary; the
        # record's compiled backward fuses both too)
        dn1, dn2 = g1 * c - g2 * s, g1 * s + g2 * c
        x1, x2 = _halves(x_ref)
        r = _inv_rms(x1, x2, eps)[:, None]
        # d/dx of x * r(x), r = (mean(x^2) + eps)^-1/2: dn r - x r^3 mean(dn x)
        proj = (jnp.sum(dn1 * x1, axis=1) + jnp.sum(dn2 * x2, axis=1))[:, None] / (2 * half)
        corr = r * r * r * proj
        col = (slot * heads + h) * 2 * half
        dqkv_ref[row_ds, pl.ds(col, half)] = (dn1 * r - x1 * corr).astype(dtype)
        dqkv_ref[row_ds, pl.ds(col + half, half)] = (dn2 * r - x2 * corr).astype(dtype)
    g = dv_ref[...].astype(jnp.float32)
    dqkv_ref[row_ds, pl.ds((2 * heads + h) * 2 * half, 2 * half)] = (l0_ref[...][:, None] * g).astype(dtype)
    dl0_ref[...] = jnp.sum(g * v_ref[...].astype(jnp.float32), axis=1)
    if has_ve:
        dve_ref[...] = (l1_ref[...][:, None] * g).astype(dve_ref.dtype)
        dl1_ref[...] = jnp.sum(g * ve_ref[...].astype(jnp.float32), axis=1)


def _specs(D: int, rows: int, heads: int, has_ve: bool):
    """Block specs of the raw q, k, v heads (column blocks h, H + h, 2H + h of the projection
    [T, 3 H D]), ve's head h, and the rotary tables' rows."""
    head = lambda slot: pl.BlockSpec((rows, D), lambda i, h: (i, slot * heads + h))  # noqa: E731
    ins = [head(0), head(1), head(2)]
    if has_ve:
        ins.append(pl.BlockSpec((rows, D), lambda i, h: (i, h)))
    table = pl.BlockSpec((rows, D // 2), lambda i, h: (i, 0))
    lam = pl.BlockSpec((rows,), lambda i, h: (i,))
    return ins, [table, table], [lam, lam] if has_ve else [lam]


def _lam_rows(lam, T, has_ve):
    # the lambdas broadcast per row, as the head kernels take their scalar (a Triton kernel
    # reads blocks; a [rows] block of one value costs 2 x 196 KB per layer at T = 49,152)
    lam = lam.astype(jnp.float32)
    return [jnp.broadcast_to(lam[j], (T,)) for j in range(2 if has_ve else 1)]


def _forward(qkv, ve, cos, sin, lam, heads, interpret):
    T, D = qkv.shape[0], 2 * cos.shape[-1]
    has_ve = ve is not None
    rows = TILES.rows
    ins, tables, lams = _specs(D, rows, heads, has_ve)
    out = pl.BlockSpec((rows, D), lambda i, h: (i, h))
    args = [qkv, qkv, qkv] + ([ve] if has_ve else []) + [cos, sin] + _lam_rows(lam, T, has_ve)
    shape = out_struct((T, heads * D), qkv.dtype, qkv)
    q, k, v = pl.pallas_call(
        functools.partial(_qkv_fwd_kernel, has_ve=has_ve, eps=RMS_EPS),
        grid=(T // rows, heads), in_specs=ins + tables + lams, out_specs=[out, out, out],
        out_shape=[shape, shape, shape], interpret=interpret, **compiler_params(interpret, TILES.warps),
    )(*args)
    return tuple(a.reshape(T, heads, D) for a in (q, k, v))


def _backward(qkv, ve, cos, sin, lam, dq, dk, dv, heads, interpret):
    T, D = qkv.shape[0], 2 * cos.shape[-1]
    has_ve = ve is not None
    rows = TILES.rows
    ins, tables, lams = _specs(D, rows, heads, has_ve)
    grad_in = pl.BlockSpec((rows, D), lambda i, h: (i, h))
    whole = pl.BlockSpec(qkv.shape, lambda i, h: (0, 0))  # each program writes its three heads' columns
    per_row = pl.BlockSpec((None, rows), lambda i, h: (h, i))
    outs = [whole] + ([grad_in] if has_ve else []) + [per_row] * (2 if has_ve else 1)
    shapes = [out_struct(qkv.shape, qkv.dtype, qkv)]
    if has_ve:
        shapes.append(out_struct(ve.shape, ve.dtype, ve))
    shapes += [out_struct((heads, T), jnp.float32, qkv)] * (2 if has_ve else 1)
    flat = lambda a: a.reshape(T, heads * D)  # noqa: E731
    args = ([qkv, qkv, qkv, flat(dq), flat(dk), flat(dv)] + ([ve] if has_ve else []) + [cos, sin]
            + _lam_rows(lam, T, has_ve))
    res = pl.pallas_call(
        functools.partial(_qkv_bwd_kernel, has_ve=has_ve, eps=RMS_EPS, heads=heads),
        grid=(T // rows, heads), in_specs=ins + [grad_in] * 3 + tables + lams, out_specs=outs,
        out_shape=shapes, interpret=interpret, **compiler_params(interpret, TILES.warps),
    )(*args)
    if has_ve:
        dqkv, dve, dl0, dl1 = res
        dlam = jnp.stack([jnp.sum(dl0), jnp.sum(dl1)])
    else:
        (dqkv, dl0), dve = res, None
        dlam = jnp.sum(dl0)[None]
    return dqkv, dve, dlam.astype(lam.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _prep(qkv, ve, cos, sin, lam, heads, interpret):
    return _forward(qkv, ve, cos, sin, lam, heads, interpret)


def _prep_fwd(qkv, ve, cos, sin, lam, heads, interpret):
    return _forward(qkv, ve, cos, sin, lam, heads, interpret), (qkv, ve, cos, sin, lam)


def _prep_bwd(heads, interpret, res, grads):
    qkv, ve, cos, sin, lam = res
    dqkv, dve, dlam = _backward(qkv, ve, cos, sin, lam, *grads, heads, interpret)
    # the rotary tables are constants of the sequence length (no parameter reaches them)
    return dqkv, dve, jnp.zeros_like(cos), jnp.zeros_like(sin), dlam


_prep.defvjp(_prep_fwd, _prep_bwd)


def norm_rotary_mix(qkv, ve, cos, sin, lam, heads: int, *, interpret: bool = False):
    """q, k, v [T, H, D] from the merged projection's output qkv [T, 3 H D] (bf16): QK-norm and
    rotary on q and k, v = lam[0] v (+ lam[1] ve); ve [T, H D] or None; cos, sin [T, D/2] fp32
    (attention.rotary_tables); lam: the layer's attention lambdas, [2] (or [1] without ve)."""
    T = qkv.shape[0]
    D = 2 * cos.shape[-1]
    if qkv.shape != (T, 3 * heads * D) or cos.shape[0] < T:
        raise ValueError(f"qkv {qkv.shape} and rotary tables {cos.shape} do not fit {heads} heads of {D}")
    lam = jnp.asarray(lam)[: 2 if ve is not None else 1]
    return _prep(qkv, ve, cos[:T], sin[:T], lam, heads, bool(interpret))
