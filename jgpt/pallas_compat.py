"""What the Pallas kernels (jgpt.attention_gpu, jgpt.head_gpu) share: their output types inside
shard_map and their Triton launch settings, across jax 0.10 (CPU here) and 0.11 (the GPU)."""
from __future__ import annotations

import jax


def out_struct(shape, dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
    """A pallas_call output type that varies over the same manual mesh axes as `like`: inside
    shard_map (the data-parallel step, jgpt.step) jax checks this, and the kernels' outputs
    are per-device like their inputs. Outside shard_map it is the empty set."""
    mat = getattr(jax.typeof(like), "manual_axis_type", None)
    if mat is None:  # a jax without manual-axis tracking on avals
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


def compiler_params(interpret: bool, warps: int, stages: int = 2) -> dict:
    """pallas_call keyword arguments: Triton warps and pipeline stages (none when interpreted)."""
    if interpret:
        return {}
    from jax.experimental.pallas import triton as pltriton
    return {"compiler_params": pltriton.CompilerParams(num_warps=warps, num_stages=stages)}
