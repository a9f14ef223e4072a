"""What the Pallas kernels (jgpt.attention_gpu, jgpt.head_gpu) share: their output types inside
shard_map and their Triton launch settings, across jax 0.10 (CPU here) and 0.11 (the GPU)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

# log2(e): the kernels' base-2 exponentials (attention's softmax, the head's "fast" exp)
LOG2E = 1.4426950408889634


def out_struct(shape, dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
    """A pallas_call output type that varies over the same manual mesh axes as `like`: inside
    shard_map (the data-parallel step, jgpt.step) jax checks this, and the kernels' outputs
    are per-device like their inputs. Outside shard_map it is the empty set."""
    mat = getattr(jax.typeof(like), "manual_axis_type", None)
    if mat is None:  # a jax without manual-axis tracking on avals
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


KERNEL_MODES = ("auto", "pallas", "interpret", "xla")  # auto: the kernels on GPUs, XLA elsewhere


def checked_mode(mode: str, what: str) -> str:
    """A kernel family's mode setting (head_gpu.set_mode, qkv_gpu.set_mode), validated."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"{what} kernel mode must be auto, pallas, interpret or xla, got {mode!r}")
    return mode


def use_kernels(mode: str, fits: bool) -> tuple[bool, bool]:
    """(run the Pallas kernels, interpreted) under a mode, for inputs the kernels take (fits)."""
    if mode == "xla" or not fits:
        return False, False
    if mode == "auto":
        return jax.default_backend() == "gpu", False
    return True, mode == "interpret"


def compiler_params(interpret: bool, warps: int, stages: int = 2) -> dict:
    """pallas_call keyword arguments: Triton warps and pipeline stages (none when interpreted)."""
    if interpret:
        return {}
    from jax.experimental.pallas import triton as pltriton
    return {"compiler_params": pltriton.CompilerParams(num_warps=warps, num_stages=stages)}


def triton_calls(fn, *args) -> int:
    """Lower jit(fn) for CUDA on any host (the Pallas -> Triton lowering runs in Python) and count
    the Triton kernel calls in the result: a CPU test that the kernels' Triton lowering accepts
    them (compiling them to machine code still needs a GPU). args: arrays or ShapeDtypeStructs."""
    from jax import export
    target = "__gpu$xla.gpu.triton"
    exported = export.export(jax.jit(fn), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(target)])(*args)
    return exported.mlir_module().count(f"@{target}(")


@dataclasses.dataclass(frozen=True)
class RowTiles:
    """Launch settings of a kernel family that blocks token rows (jgpt.qkv_gpu, jgpt.norm_gpu):
    rows per program, a power of two (Triton's tensor shapes), and Triton warps. A subclass names
    its family in FAMILY (for errors) and documents its defaults."""
    rows: int = 32
    warps: int = 4
    FAMILY: ClassVar[str] = "row"

    @classmethod
    def parse(cls, text: str):
        """'rows,warps'."""
        return cls(*parse_ints(cls, text, f"{cls.FAMILY} tiles"))

    def __post_init__(self):
        if self.rows <= 0 or self.rows & (self.rows - 1):
            raise ValueError(f"{self.FAMILY} kernel rows must be a power of two, got {self.rows}")


def parse_ints(cls, text: str, what: str) -> tuple[int, ...]:
    """The comma-separated integer fields of a tile dataclass (Tiles.parse), with errors that
    name the setting and its form."""
    names = [f.name for f in dataclasses.fields(cls)]
    vals = text.split(",")
    try:
        if len(vals) != len(names):
            raise ValueError
        return tuple(int(v) for v in vals)
    except ValueError:
        raise ValueError(f"{what} must read '{','.join(names)}', got {text!r}") from None
