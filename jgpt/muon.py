"""Muon as an optax transformation, with the record's arithmetic (record26 §7.3, §11.13).

Per matrix-shaped parameter, for step s with momentum m = m(s) and learning rate lr = lr(s):

    b <- lerp(b, g, 1 - m)                      fp32 momentum buffer, EMA form
    u  = lerp(g, b, m)                          Nesterov: (1 - m) g + m b
    O  = NS5(u)                                 Newton-Schulz in `ns_dtype` (bf16 in the record)
    p <- p - lr * max(1, rows / cols)**0.5 * O  rows, cols: the last two dims, (out, in) layout

This is not `optax.contrib.muon`: that one bias-corrects the Nesterov term and runs NS in the
input dtype. Schedules are functions of the step; the step is the state's `count` (0 before the
first update) unless the caller passes `step=` to `update`, so the state checkpoints as is.

Rounding (what we reproduce and why):
  * torch.lerp with a scalar weight w computes `start + w*(end-start)` for |w| < 0.5 and
    `end - (1-w)*(end-start)` otherwise; its CPU kernel (and CUDA, contracted by nvcc) uses one
    fused multiply-add. Under jit XLA CPU contracts our expression to the same FMA (checked:
    bitwise equal to torch 2.13 CPU on 1e5 fp32 elements); op-by-op (eager) JAX rounds twice.
  * The record compiles NS with torch.compile: each matmul is a cuBLAS call (bf16 operands,
    fp32 accumulation, bf16 output) and each pointwise chain is one fused kernel that computes
    in fp32 from the bf16 operands and rounds once on store. We carry every NS value in fp32
    and write each of those roundings as `lax.reduce_precision` to bf16's bits, casting to bf16
    (exact by then) only for the matmul operands. Not as `.astype(bf16).astype(f32)`: XLA's
    excess-precision rewrites (`xla_allow_excess_precision`, on by default) delete such
    convert pairs inside a jit: on GPU (jax 0.11.2, H100: 27% of the elements of one fused
    `a*X + B@X` differed from the record's rounding; with reduce_precision 0.02%, summation
    order) and on jax 0.10.2 CPU after a bf16 dot (`(x @ y).astype(f32)` loses the rounding
    of the dot's output under jit, not eagerly).
    What XLA CPU does with a bf16 dot: jax 0.10.2 converts the operands to fp32, runs an fp32
    dot and rounds the result once; jax 0.11.2 runs a native bf16 YNNPACK dot. Both equal
    round_bf16(exact product) bit for bit in tests/test_muon.py, as cuBLAS does up to
    summation order (H100: 0.05% of elements one ulp off at k = 3072).
  * `B = b * A + c * A @ A` in the record's Python parses as `b*A + (c*A) @ A` (`*` and `@`
    share one precedence level, left to right), so c*A is rounded to bf16 before the matmul.
  * `X.norm()` of a bf16 tensor returns bf16, so the Frobenius norm is rounded to bf16 before
    `+ 1e-7` and the division (which then runs fused in fp32, rounded once).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jgpt.rounding import round_to

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # record26 §7.3 (also OptimConfig.ns_coeffs)
NS_EPS = 1e-7  # added to the Frobenius norm before dividing (record26 §7.3)

ScalarOrSchedule = float | Callable[[Any], Any]


class MuonState(NamedTuple):
    """count: int32 [], the 0-based step the next update applies (schedules read it).
    momentum: one buffer per parameter, fp32 (fp64 for fp64 parameters), like the params."""

    count: jax.Array
    momentum: optax.Updates


def _acc(dtype) -> jnp.dtype:
    """The dtype the arithmetic runs in: fp32 for bf16/fp32, fp64 for fp64 (torch's opmath)."""
    return jnp.promote_types(dtype, jnp.float32)


def _mm(x: jax.Array, y: jax.Array, dtype) -> jax.Array:
    """x @ y like cuBLAS in torch: `dtype` operands, accumulated in fp32 (or wider), the result
    rounded once to `dtype` and returned in the wide dtype. HIGHEST keeps fp32 matmuls out of
    TF32 on GPU (the fp32 / fp64 parity modes)."""
    acc = _acc(dtype)
    out = jnp.matmul(x.astype(dtype), y.astype(dtype), precision=jax.lax.Precision.HIGHEST,
                     preferred_element_type=acc)
    return round_to(out, dtype)


@functools.partial(jax.jit, static_argnames=("steps", "coeffs", "dtype"))
def newton_schulz(g: jax.Array, *, steps: int = 5, coeffs: tuple[float, float, float] = NS_COEFFS,
                  dtype=jnp.bfloat16) -> jax.Array:
    """NS5 of every matrix in the last two dims of `g` (leading dims are a batch), in `dtype`.

    Record26 §7.3: cast to dtype; transpose when rows > cols; X /= (||X||_F + 1e-7) per matrix
    (so a [3, hdim, d] qkv tensor is three matrices); `steps` times A = X Xᵀ, B = bA + cA·A,
    X = aX + BX; transpose back. Returns `dtype`. Every value below is held in the wide dtype
    and rounded to `dtype` where the record stores a tensor.
    """
    a, b, c = coeffs
    dtype = jnp.dtype(dtype)
    acc = _acc(dtype)
    x = round_to(g.astype(acc), dtype)  # G.bfloat16()
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # c_fc [4d, d]: work on the wide side so A is d x d (record26 §7.3)
        x = jnp.swapaxes(x, -1, -2)
    norm = round_to(jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True)), dtype)
    x = round_to(x / (norm + NS_EPS), dtype)
    for _ in range(steps):
        A = _mm(x, jnp.swapaxes(x, -1, -2), dtype)
        cA = round_to(c * A, dtype)  # `c * A @ A` is `(c * A) @ A` in the record's Python
        B = round_to(b * A + _mm(cA, A, dtype), dtype)
        x = round_to(a * x + _mm(B, x, dtype), dtype)
    if tall:
        x = jnp.swapaxes(x, -1, -2)
    return x.astype(dtype)


def shape_factor(shape: tuple[int, ...]) -> float:
    """max(1, rows/cols)**0.5 over the last two dims in (out, in) layout (record26 §7.3, §11.13):
    2 for c_fc [4d, d]; 1 for [d, 4d], [d, d] and the [3, hdim, d] qkv tensor."""
    rows, cols = shape[-2], shape[-1]
    return max(1.0, rows / cols) ** 0.5


def _lerp(start: jax.Array, end: jax.Array, weight: jax.Array) -> jax.Array:
    """torch.lerp with a scalar weight: start + w(end - start) for |w| < 0.5, else
    end - (1 - w)(end - start), written as base + coeff*(end - start) like torch's CPU kernel
    (w - 1 == -(1 - w) exactly for w in [0.5, 1])."""
    small = jnp.abs(weight) < 0.5
    coeff = jnp.where(small, weight, weight - 1)
    base = jnp.where(small, start, end)
    return base + coeff * (end - start)


def _value(x: ScalarOrSchedule, step):
    return x(step) if callable(x) else x


@jax.jit
def _momentum_step(g: jax.Array, buf: jax.Array, one_minus_m, m) -> tuple[jax.Array, jax.Array]:
    """buf.lerp_(g, 1 - m); u = g.lerp(buf, m) (record26 §7.3). Jitted so eager callers get the
    same FMA contraction as a jitted train step."""
    acc = buf.dtype
    buf = _lerp(buf, g.astype(acc), jnp.asarray(one_minus_m).astype(acc))
    u = _lerp(g.astype(acc), buf, jnp.asarray(m).astype(acc))
    return buf, u


def muon(learning_rate: ScalarOrSchedule, momentum: ScalarOrSchedule, *, ns_dtype=jnp.bfloat16,
         ns_steps: int = 5, ns_coeffs: tuple[float, float, float] = NS_COEFFS,
         one_minus_momentum: ScalarOrSchedule | None = None) -> optax.GradientTransformationExtraArgs:
    """Muon over every leaf (each must have >= 2 dims): returns the updates to add to the params.

    `learning_rate` and `momentum` are floats or functions of the step (a Python int or an
    int32 scalar). The step is `state.count`, or `step` when the caller passes
    `update(..., step=s)`; after the update count = step + 1. Same-shape matrices are stacked
    and orthogonalised in one batched NS call (the arithmetic per matrix is unchanged).
    Updates come back in the parameter's arithmetic dtype (fp32 for fp32 params).
    `one_minus_momentum` (a float or schedule) gives 1 - m where m is a traced fp32 value: the
    reference forms 1 - m in double before torch casts it (jgpt.optim.host_table); by default
    1 - m is computed from m.
    """
    ns_dtype = jnp.dtype(ns_dtype)
    ns_coeffs = tuple(float(v) for v in ns_coeffs)

    def init_fn(params):
        for p in jax.tree.leaves(params):
            if p.ndim < 2:
                raise ValueError(f"Muon takes matrices (>= 2 dims); got a parameter of shape {p.shape}")
        buffers = jax.tree.map(lambda p: jnp.zeros(p.shape, _acc(p.dtype)), params)
        return MuonState(count=jnp.zeros([], jnp.int32), momentum=buffers)

    def update_fn(updates, state, params=None, *, step=None, **extra_args):
        del params, extra_args
        step = state.count if step is None else step
        lr = _value(learning_rate, step)
        m = _value(momentum, step)
        # like torch: formed at the scalar's precision (a double), then cast
        one_minus_m = 1 - m if one_minus_momentum is None else _value(one_minus_momentum, step)

        grads, treedef = jax.tree.flatten(updates)
        bufs = treedef.flatten_up_to(state.momentum)
        new_bufs, nesterov = [], []
        for g, buf in zip(grads, bufs):
            if g.shape != buf.shape:
                raise ValueError(f"Muon: gradient of shape {g.shape} for a buffer of shape {buf.shape}")
            buf, u = _momentum_step(g, buf, one_minus_m, m)
            new_bufs.append(buf)
            nesterov.append(u)

        # Stack same-shape matrices into one batched NS call (record26 §7.3 groups by shape).
        groups: dict[tuple, list[int]] = {}
        for i, u in enumerate(nesterov):
            groups.setdefault((u.shape, u.dtype), []).append(i)
        ortho: list[jax.Array | None] = [None] * len(nesterov)
        for idx in groups.values():
            stacked = jnp.stack([nesterov[i] for i in idx])
            out = newton_schulz(stacked, steps=ns_steps, coeffs=ns_coeffs, dtype=ns_dtype)
            for j, i in enumerate(idx):
                ortho[i] = out[j]

        new_updates = []
        for buf, o in zip(new_bufs, ortho):
            acc = buf.dtype  # the parameter's arithmetic dtype: fp32 (fp64 in fp64 mode)
            # p.add_(O, alpha=-lr * factor): the scalar is formed first, the product in fp32
            # from the bf16 O (record26 §7.3: "the update is added in fp32").
            alpha = jnp.asarray(-(lr * shape_factor(buf.shape))).astype(acc)
            new_updates.append(alpha * o.astype(acc))

        new_state = MuonState(count=jnp.asarray(step, jnp.int32) + 1,
                              momentum=jax.tree.unflatten(treedef, new_bufs))
        return jax.tree.unflatten(treedef, new_updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
