"""bf16 roundings that XLA keeps.

The record stores its activations, gradients and optimizer states as bf16 tensors, and wherever
one kernel writes such a tensor and another reads it, the reader sees the rounded value
(record26 §11.1). XLA allows excess precision by default (`xla_allow_excess_precision`): on GPUs
a module-wide pass (SimplifyFPConversions, before fusion) deletes fp32 -> bf16 -> fp32 convert
pairs, so a jgpt value written as `.astype(bf16)` may reach an fp32 consumer unrounded
(jgpt.muon's docstring has a measurement; scripts/rounding_audit.py prints where it happens). reduce_precision is
what XLA keeps: on a value that is already in the narrower dtype it changes nothing, so these
pins cost an elementwise op and never change a CPU result.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def round_to(x: jax.Array, dtype) -> jax.Array:
    """x rounded to `dtype`'s precision (round to nearest even), keeping x's dtype; x itself when
    dtype is not narrower."""
    info, own = jnp.finfo(dtype), jnp.finfo(x.dtype)
    if info.bits >= own.bits:
        return x
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def pinned_f32(x: jax.Array) -> jax.Array:
    """x in fp32 (or x's own dtype if wider), with the rounding of x's own narrower dtype (bf16)
    kept where XLA fuses x's producer into the consumer."""
    wide = jnp.promote_types(x.dtype, jnp.float32)
    return round_to(x.astype(wide), x.dtype)
