"""Mesh, shardings and multi-host start-up: JAX SPMD as the distributed engine (design.md,
"Distribution").

One 1-D mesh, axis "data", spans every device of every process. The record's scheme is data
parallel: each device trains its own whole sequences (one 49,152-token sequence per H100 in the
record, record26 §2, §6) and the gradients are averaged across devices. Two layouts for the state:

* data parallel (default): params and optimizer state replicated on every device (each device
  then applies Adam to every embedding row itself, where the record's DistAdam splits rows;
  that is memory-bound elementwise work, small next to a step);
* FSDP (`fsdp=True`): every param and optimizer-state leaf is split along one axis over "data"
  (the first axis the device count divides; leaves nothing divides stay replicated). A step
  gathers the params once, reduce-scatters the summed gradients, and updates shards locally.

Muon keeps the record's layout either way (record26 §7.3): same-shape matrices are stacked, the
stack is split over "data" so that each device orthogonalises whole matrices, and the results are
gathered (`distributed_newton_schulz`).
"""
from __future__ import annotations

import contextlib
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"

# ---------------------------------------------------------------------------------------------
# Processes and the mesh


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, auto: bool = False) -> bool:
    """Join a multi-host job before jax touches a device. Explicit arguments win; otherwise the
    variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; `auto` lets
    jax.distributed.initialize detect SLURM / Open MPI / TPU pods by itself. Returns whether it
    initialised (False: a single process, nothing to do)."""
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if coordinator_address is None and not auto:
        if num_processes not in (None, 1):
            raise ValueError(f"num_processes={num_processes} needs a coordinator address "
                             "(--coordinator_address HOST:PORT or JAX_COORDINATOR_ADDRESS)")
        return False
    if coordinator_address is not None and (num_processes is None or process_id is None) and not auto:
        raise ValueError("a coordinator address needs --num_processes and --process_id (or JAX_NUM_PROCESSES "
                         "and JAX_PROCESS_ID), unless --multihost lets JAX detect the cluster")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True


def make_mesh(devices=None) -> Mesh:
    """The 1-D "data" mesh over `devices` (default: all devices of all processes), ordered by
    process and then device id, so each process's devices hold a contiguous run of the batch's
    rows: the rows BatchLoader gives that process (jgpt.data.local_slice)."""
    devs = list(jax.devices() if devices is None else devices)
    devs.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devs), (AXIS,))


def check_divisible(seqs_per_step: int, val_slices: int, mesh: Mesh) -> None:
    """The settings a mesh needs, checked before anything compiles (design.md, "Errors users will
    make"): whole sequences per device, whole validation slices per device."""
    d = mesh.size
    if seqs_per_step % d:
        raise ValueError(f"seqs_per_step={seqs_per_step} is not divisible by the {d} devices: each device trains "
                         f"whole sequences (record26 §6); choose seqs_per_step a multiple of {d} "
                         f"(tokens per step = seqs_per_step x seq_len)")
    if val_slices % d:
        raise ValueError(f"val_tokens / val_seq_len = {val_slices} validation slices is not divisible by the {d} "
                         f"devices; choose val_tokens a multiple of {d} x val_seq_len")


# ---------------------------------------------------------------------------------------------
# Shardings


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (sequences) over "data": [S, T] -> each device S/D whole sequences."""
    return NamedSharding(mesh, P(AXIS))


def fsdp_axis(shape: tuple[int, ...], num_devices: int) -> int | None:
    """The axis FSDP splits: the first one the device count divides (row blocks, as the record's
    DistAdam splits rows), None for scalars and leaves nothing divides (kept replicated)."""
    if num_devices == 1:
        return None
    for ax, n in enumerate(shape):
        if n >= num_devices and n % num_devices == 0:
            return ax
    return None


def fsdp_spec(shape: tuple[int, ...], num_devices: int) -> P:
    ax = fsdp_axis(shape, num_devices)
    if ax is None:
        return P()
    return P(*([None] * ax + [AXIS]))


def state_shardings(tree, mesh: Mesh, fsdp: bool = False):
    """NamedShardings for every leaf of a pytree (a TrainState, or its eval_shape): replicated,
    or the FSDP split of each leaf."""
    def one(leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, fsdp_spec(shape, mesh.size) if fsdp else P())
    return jax.tree.map(one, tree)


def put(tree, shardings):
    """device_put every leaf to its sharding (a host array, or an array laid out differently)."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


# ---------------------------------------------------------------------------------------------
# The gradient reduction (inside shard_map)


def reduce_grads(grads: dict, num_devices: int, fsdp: bool) -> dict:
    """Per-device gradient sums -> their sum over "data": an all-reduce (psum) for replicated
    leaves, a reduce-scatter into the FSDP layout (fsdp_spec) for split ones. Out specs:
    reduced_specs. The order of the cross-device sum is the collective's (NCCL's ring on GPU, a
    tree on CPU), so it differs from the single-device scan's by fp32 (bf16) rounding."""
    out = {}
    for k, g in grads.items():
        ax = fsdp_axis(g.shape, num_devices) if fsdp else None
        out[k] = jax.lax.psum(g, AXIS) if ax is None else \
            jax.lax.psum_scatter(g, AXIS, scatter_dimension=ax, tiled=True)
    return out


def reduced_specs(shapes: dict, num_devices: int, fsdp: bool) -> dict:
    """shard_map out_specs of reduce_grads."""
    return {k: fsdp_spec(tuple(s), num_devices) if fsdp else P() for k, s in shapes.items()}


# ---------------------------------------------------------------------------------------------
# Muon: whole matrices per device


_NS_LOCK = threading.RLock()


@contextlib.contextmanager
def distributed_newton_schulz(mesh: Mesh, gather: bool = True):
    """While a train step is traced, every batched Newton-Schulz call of jgpt.muon (one per
    group of same-shape matrices) is split over "data" along the stack: the stack, padded with
    zero matrices to a multiple of D (NS maps a zero matrix to zero: X / (0 + 1e-7) = 0), is
    cut into D contiguous blocks and device d orthogonalises block d, whole matrices, as the
    record's Muon hands matrices to ranks (record26 §7.3). `gather` then replicates the result
    (the record's all_gather); without it the layout is left to the params' sharding (FSDP).

    Per matrix the arithmetic is unchanged: the split NS equals the unsplit one bit for bit
    (tests/test_sharding.py). jgpt.muon takes no NS function as an argument, so this swaps its
    module-level `newton_schulz` for the duration of a trace (under a lock); an `ns_fn`
    argument to muon() would make the swap unnecessary.
    """
    from jgpt import muon as muon_mod

    d = mesh.size
    if d == 1:
        yield
        return
    original = muon_mod.newton_schulz
    split = NamedSharding(mesh, P(AXIS))
    whole = NamedSharding(mesh, P())

    def sharded_ns(g, **kw):
        n = g.shape[0]
        pad = -n % d
        if pad:
            g = jnp.concatenate([g, jnp.zeros((pad, *g.shape[1:]), g.dtype)])
        g = jax.lax.with_sharding_constraint(g, split)
        out = original(g, **kw)
        if gather:
            out = jax.lax.with_sharding_constraint(out, whole)
        return out[:n]

    with _NS_LOCK:
        muon_mod.newton_schulz = sharded_ns
        try:
            yield
        finally:
            muon_mod.newton_schulz = original


def describe(mesh: Mesh) -> str:
    devs = mesh.devices.ravel()
    kinds = sorted({d.device_kind for d in devs})
    return (f"{mesh.size} device(s) ({', '.join(kinds)}) on {jax.process_count()} process(es), "
            f"mesh axis '{AXIS}'")
