"""The jitted train step and evaluation, as pure functions of plain pytrees (design.md conv. 4).

A step takes the S sequences of one optimizer step, each with positions from 0, each with its
own summed loss and its own backward (record26 §6: the FP8 head is not scale-free, so the
sequences are not merged), sums the gradients in the parameters' dtypes in sequence order (as
torch accumulates `.grad`, and as the ranks' AVG reduce does), divides by S, then applies Adam
and Muon at the step's lr and momentum (record26 §7).

The window (in 128-token blocks) is a traced int32 where the attention backend reads it only
through data (the Pallas kernels and the dense rule: key_start is an array), so one compiled
step serves the whole schedule, as the record's dynamic-window compile does. The blockwise
backend gathers a static number of blocks, so there the window is a static argument and each
distinct window compiles once (14 for the record's schedule). `window_is_traced` tells which.
"""
from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

from jax.sharding import Mesh, PartitionSpec as P

import jax
import jax.numpy as jnp
import optax

from jgpt import attention as attn
from jgpt import model
from jgpt import sharding as shd
from jgpt.config import ModelConfig


class TrainState(NamedTuple):
    params: dict[str, jax.Array]
    opt_state: Any
    step: jax.Array  # int32: the index of the next step (0-based, record26 §7)


def init_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(params, optimizer.init(params), jnp.zeros([], jnp.int32))


def window_is_traced(backend: str, policy: str) -> bool:
    """Whether the steps built for this backend and policy take the window as a traced int32
    (one compile for every window) rather than a static int (one compile per window). The
    Pallas kernels take bf16 only (the record policy); other dtypes fall back to blockwise."""
    name = attn.resolve_backend(backend)
    return name == "dense" or (name == "pallas" and policy == "record")


def _window_jit(traced: bool, **kw):
    """jax.jit with the window (argument 3) static unless traced."""
    return partial(jax.jit, static_argnums=() if traced else (3,), **kw)


def _seq_loss(cfg: ModelConfig, policy: str, backend: str, remat: bool, head_chunk: int | None):
    """One sequence's summed training loss: model.forward with the step's settings."""
    def seq_loss(params, x, y, window):
        return model.forward(params, cfg, x, y, window, policy=policy, train=True, backend=backend, remat=remat,
                             head_chunk=head_chunk)
    return seq_loss


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformationExtraArgs, *,
                    policy: str = "record", backend: str = "blockwise", donate: bool = True,
                    mesh: Mesh | None = None, fsdp: bool = False, remat: bool = False,
                    head_chunk: int | None = model.HEAD_CHUNK):
    """Returns train_step(state, inputs [S, T], targets [S, T], window) -> (state, metrics).
    metrics: loss (mean CE per token over the step) and per-sequence summed losses.
    remat: recompute each block in the backward pass (one record-sized 49,152-token sequence
    otherwise needs ~39 GiB of activations on the blockwise backend).
    head_chunk: model.forward's tokens per head chunk (a tuning setting: only the order of the
    loss and lm_head-gradient sums depends on it).

    With a `mesh` (jgpt.sharding.make_mesh) the step is data parallel over its "data" axis:
    see make_sharded_train_step. Without one it runs where its inputs are (one device)."""
    if mesh is not None:
        return make_sharded_train_step(cfg, optimizer, mesh, policy=policy, backend=backend,
                                       donate=donate, fsdp=fsdp, remat=remat, head_chunk=head_chunk)
    if fsdp:
        raise ValueError("fsdp=True needs a mesh (jgpt.sharding.make_mesh())")

    seq_loss = _seq_loss(cfg, policy, backend, remat, head_chunk)
    grad_fn = jax.value_and_grad(seq_loss)
    traced = window_is_traced(backend, policy)

    @_window_jit(traced, donate_argnums=(0,) if donate else ())
    def train_step(state: TrainState, inputs, targets, window):
        params = state.params

        def one_sequence(gsum, xy):
            loss, g = grad_fn(params, xy[0], xy[1], window)
            return jax.tree.map(jnp.add, gsum, g), loss

        zeros = jax.tree.map(jnp.zeros_like, params)
        gsum, losses = jax.lax.scan(one_sequence, zeros, (inputs, targets))
        n = inputs.shape[0]
        grads = jax.tree.map(lambda g: (g / n).astype(g.dtype), gsum)
        updates, opt_state = optimizer.update(grads, state.opt_state, params, step=state.step)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": losses.sum() / inputs.size, "seq_losses": losses}
        return TrainState(params, opt_state, state.step + 1), metrics

    train_step.window_is_traced = traced
    return train_step


def make_eval_loss(cfg: ModelConfig, *, policy: str = "record", backend: str = "blockwise"):
    """Returns eval_loss(params, input_seq [T], target_seq [T], window) -> mean CE (bf16 head
    under the record policy, record26 §9)."""

    traced = window_is_traced(backend, policy)

    @_window_jit(traced)
    def eval_loss(params, x, y, window):
        return model.forward(params, cfg, x, y, window, policy=policy, train=False, backend=backend)

    eval_loss.window_is_traced = traced
    return eval_loss


# ---------------------------------------------------------------------------------------------
# Data parallel over a mesh (design.md, "Distribution"; record26 §6)


def _window_shard_map(f, window, traced: bool, mesh, in_specs, out_specs):
    """shard_map of f(params, inputs, targets, window): a traced window enters as a replicated
    argument (returned in args), a static one is bound into f."""
    if traced:
        return jax.shard_map(f, mesh=mesh, in_specs=(*in_specs, P()), out_specs=out_specs), (jnp.asarray(window, jnp.int32),)
    return jax.shard_map(partial(f, window=window), mesh=mesh, in_specs=in_specs, out_specs=out_specs), ()


def _to_varying(tree):
    """Mark replicated values as per-device inside shard_map, so that the gradient w.r.t. them
    stays each device's own (no implicit all-reduce per sequence): one reduction per step."""
    cast = getattr(jax.lax, "pcast", None)
    if cast is not None:
        return jax.tree.map(lambda x: cast(x, shd.AXIS, to="varying"), tree)
    return jax.tree.map(lambda x: jax.lax.pvary(x, shd.AXIS), tree)  # jax < 0.9


def make_sharded_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformationExtraArgs,
                            mesh: Mesh, *, policy: str = "record", backend: str = "blockwise",
                            donate: bool = True, fsdp: bool = False, remat: bool = False,
                            head_chunk: int | None = model.HEAD_CHUNK):
    """The train step of make_train_step, data parallel over mesh axis "data" (record26 §6).

    Each of the D devices takes S/D whole sequences (inputs sharded by rows) and runs the same
    scan as the single-device step: one backward per sequence, gradients summed in the params'
    dtypes. The per-device sums are added across devices once (psum; a reduce-scatter under
    FSDP), divided by S, and Muon orthogonalises whole matrices per device
    (sharding.distributed_newton_schulz). The result equals the single-device step up to
    rounding: the cross-device sum adds in the collective's order, and XLA compiles the
    partitioned program's fusions a little differently (on CPU, a softmax's x / sum(x) became
    x * (1 / sum(x)) in one program and not the other), so no bit-for-bit promise; the tests
    hold the two together in fp64. The state keeps sharding.state_shardings(state, mesh, fsdp).
    """
    seq_loss = _seq_loss(cfg, policy, backend, remat, head_chunk)
    grad_fn = jax.value_and_grad(seq_loss)
    d = mesh.size
    traced = window_is_traced(backend, policy)

    def device_grads(params, inputs, targets, window):
        params = _to_varying(params)

        def one_sequence(gsum, xy):
            loss, g = grad_fn(params, xy[0], xy[1], window)
            return jax.tree.map(jnp.add, gsum, g), loss

        zeros = jax.tree.map(jnp.zeros_like, params)
        gsum, losses = jax.lax.scan(one_sequence, zeros, (inputs, targets))
        return shd.reduce_grads(gsum, d, fsdp), losses

    @_window_jit(traced, donate_argnums=(0,) if donate else ())
    def train_step(state: TrainState, inputs, targets, window):
        params = state.params
        n = inputs.shape[0]
        if n % d:
            raise ValueError(f"{n} sequences per step are not divisible by the {d} devices of the mesh")
        shapes = {k: v.shape for k, v in params.items()}
        fn, args = _window_shard_map(device_grads, window, traced, mesh, ({k: P() for k in params}, P(shd.AXIS), P(shd.AXIS)),
                                     (shd.reduced_specs(shapes, d, fsdp), P(shd.AXIS)))
        inputs = jax.lax.with_sharding_constraint(inputs, shd.batch_sharding(mesh))
        targets = jax.lax.with_sharding_constraint(targets, shd.batch_sharding(mesh))
        gsum, losses = fn(params, inputs, targets, *args)
        grads = jax.tree.map(lambda g: (g / n).astype(g.dtype), gsum)
        with shd.distributed_newton_schulz(mesh, gather=not fsdp):
            updates, opt_state = optimizer.update(grads, state.opt_state, params, step=state.step)
        params = optax.apply_updates(params, updates)
        new = TrainState(params, opt_state, state.step + 1)
        new = jax.lax.with_sharding_constraint(new, shd.state_shardings(new, mesh, fsdp))
        # Sum the S per-sequence losses replicated, in one place, as the single-device step does.
        losses = jax.lax.with_sharding_constraint(losses, shd.replicated(mesh))
        metrics = {"loss": losses.sum() / inputs.size, "seq_losses": losses}
        return new, metrics

    train_step.window_is_traced = traced
    return train_step


def make_eval_batch(cfg: ModelConfig, *, policy: str = "record", backend: str = "blockwise",
                    mesh: Mesh | None = None):
    """Returns eval_batch(params, inputs [n, T], targets [n, T], window) -> [n] mean CE per
    slice (record26 §9: each validation slice its own sequence, bf16 head under "record").
    With a mesh the n slices are split over "data" (n divisible by the device count); each
    device evaluates its slices one after the other."""

    def slices(params, inputs, targets, window):
        one = lambda xy: model.forward(params, cfg, xy[0], xy[1], window, policy=policy,  # noqa: E731
                                       train=False, backend=backend)
        return jax.lax.map(one, (inputs, targets))

    traced = window_is_traced(backend, policy)
    if mesh is None:
        eval_batch = _window_jit(traced)(slices)
    else:
        @_window_jit(traced)
        def eval_batch(params, inputs, targets, window):
            fn, args = _window_shard_map(slices, window, traced, mesh, ({k: P() for k in params}, P(shd.AXIS), P(shd.AXIS)),
                                         P(shd.AXIS))
            return fn(params, inputs, targets, *args)

    eval_batch.window_is_traced = traced
    return eval_batch
