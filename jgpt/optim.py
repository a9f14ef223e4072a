"""Parameter groups, the record's Adam, and the lr / momentum / window schedules (record26 §5.7, §7).

`build_optimizer(params, cfg)` is one optax transformation: Muon for every >= 2-D parameter
under `blocks.`, and three Adam groups (embeddings 0.6, head 0.22, scalars 0.04), combined with
`optax.partition`. Every group keeps an int32 `count` (0 before the first update) that drives
its schedules, so training step s (0-based) uses lr x f(s), Muon momentum m(s) and Adam's
bias-correction t = s + 1 (record26 §7 step order). A train step may instead pass
`update(..., step=s)`; the counts then become s + 1.

Updates come back in the arithmetic dtype (fp32 for bf16 and fp32 params, fp64 for fp64):
apply them with `optax.apply_updates`, which adds in that dtype and rounds once to the
parameter's dtype, as the record's compiled Adam and Muon's fp32 add do (record26 §7.2, §7.3).
"""
from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jgpt.config import BLOCK_SIZE, OptimConfig
from jgpt.muon import ScalarOrSchedule, muon

GROUPS = ("muon", "adam_embed", "adam_head", "adam_scalars")


# ---------------------------------------------------------------------------------------------
# Schedules: pure functions of the step. A Python int gives Python numbers computed exactly as
# the reference does (doubles); a jnp scalar (traced inside a jitted step) gives jnp scalars in
# the default float dtype (fp32, or fp64 under x64).


def _is_python_int(step) -> bool:
    return isinstance(step, numbers.Integral) and not isinstance(step, bool)


def lr_factor(step, cfg: OptimConfig):
    """record26 §7.1: x = s/N; 1 while x < 1 - cooldown_frac, then w + floor(1 - w) with
    w = (1 - x)/cooldown_frac, i.e. linear from 1 down to the floor at s = N."""
    n, cd, floor = cfg.num_iterations, cfg.cooldown_frac, cfg.lr_floor
    if _is_python_int(step):
        x = step / n
        if x < 1 - cd:
            return 1.0
        w = (1 - x) / cd
        return w * 1.0 + (1 - w) * floor
    s = jnp.asarray(step)
    fdt = jnp.result_type(float)
    x = s.astype(fdt) / n
    # (n - s)/n rather than 1 - s/n: no cancellation near the end in fp32 (f(1749) would lose
    # ~5e-5 of w); in fp64 the two agree to ~1e-13.
    w = (n - s).astype(fdt) / n / cd
    return jnp.where(x < 1 - cd, jnp.ones((), fdt), w + (1 - w) * floor)


def muon_momentum(step, cfg: OptimConfig):
    """record26 §7.3: m(s) = start (1 - phi) + end phi, phi = min(s / warmup, 1)."""
    start, end, warm = cfg.muon_momentum_start, cfg.muon_momentum_end, cfg.muon_momentum_warmup
    if _is_python_int(step):
        phi = min(step / warm, 1) if warm > 0 else 1
        return (1 - phi) * start + phi * end
    fdt = jnp.result_type(float)
    s = jnp.asarray(step).astype(fdt)
    phi = jnp.minimum(s / warm, 1.0) if warm > 0 else jnp.ones((), fdt)
    return (1 - phi) * start + phi * end


def host_table(fn: Callable[[int], float], n: int) -> Callable[[Any], Any]:
    """fn as a schedule: fn(step) for a Python int; for a jnp step, the doubles fn(0), ...,
    fn(n - 1) rounded once to the default float dtype and indexed at min(step, n - 1). That is
    the value the reference uses (a Python double that torch casts to fp32 where it meets a
    tensor); the same formula in fp32 on a traced step can be an ulp off, and 1 - m formed from
    an fp32 m differs from fp32(1 - m) in most steps, which changes the Nesterov input of NS in
    about half of its elements (torch.lerp's weight; parity/test_optimizer.py)."""
    cache: dict[Any, jax.Array] = {}

    def at(step):
        if _is_python_int(step):
            return fn(step)
        fdt = jnp.result_type(float)
        if fdt not in cache:
            cache[fdt] = np.asarray([fn(s) for s in range(n)], np.float64).astype(fdt)
        return jnp.asarray(cache[fdt])[jnp.minimum(jnp.asarray(step), n - 1)]

    return at


def window_blocks(step, cfg: OptimConfig):
    """record26 §5.7: W(s) = ceil(max(window_max_tokens * s / N, 1) / 128) attention blocks.

    Computed exactly in integers, ceil(Wmax * s / (N * 128)) and at least 1, which equals the
    float formula wherever the float is not within rounding of a block boundary (every step of
    the record and of the tiny preset). A traced step gives an int32 scalar.
    """
    wmax, n = cfg.window_max_tokens, cfg.num_iterations
    den = n * BLOCK_SIZE
    if _is_python_int(step):
        return max(1, -(-(wmax * step) // den))
    if wmax * max(n, 1) >= 2**31 or den >= 2**31:
        raise ValueError(f"window_max_tokens={wmax} x num_iterations={n} overflows int32; "
                         "compute the window on the host (pass a Python int step)")
    s = jnp.asarray(step).astype(jnp.int32)
    return jnp.maximum(1, (wmax * s + den - 1) // den).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Adam (record26 §7.2): eps added to the uncorrected sqrt(v); state in the parameter's dtype.


class AdamState(NamedTuple):
    """count: int32 [], completed steps (the update uses t = count + 1).
    mu, nu: first and second moments in the parameter's dtype (bf16 for the embeddings)."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


@jax.jit
def _adam_leaf(g, mu, nu, t, lr, b1, b2, one_minus_b1, one_minus_b2, eps):
    """One parameter's Adam step in torch's order. The record compiles the whole step, so the
    elementwise chain runs in fp32 from the stored (bf16) m, v and grad, and m, v are rounded
    only when stored (record26 §7.2, §11.12); the update uses the unrounded values."""
    acc = jnp.promote_types(mu.dtype, jnp.float32)
    g = g.astype(acc)
    b1, b2, c1, c2 = (jnp.asarray(x).astype(acc) for x in (b1, b2, one_minus_b1, one_minus_b2))
    m = mu.astype(acc) * b1 + g * c1  # exp_avg.mul_(b1).add_(g, alpha=1 - b1)
    v = nu.astype(acc) * b2 + (c2 * g) * g  # exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
    t = jnp.asarray(t).astype(acc)  # torch: beta ** step-tensor is an fp32 tensor (fp64 in fp64 mode)
    bias1 = 1 - b1**t
    bias2 = 1 - b2**t
    denom = jnp.sqrt(v) + jnp.asarray(eps, acc)
    step_size = jnp.asarray(lr).astype(acc) * (jnp.sqrt(bias2) / bias1)
    update = (m / denom) * step_size
    return -update, m.astype(mu.dtype), v.astype(nu.dtype)


def adam(learning_rate: ScalarOrSchedule, betas: tuple[float, float] = (0.8, 0.95), eps: float = 1e-10
         ) -> optax.GradientTransformationExtraArgs:
    """The record's Adam as updates to add: -lr (sqrt(1 - b2^t) / (1 - b1^t)) m / (sqrt(v) + eps),
    weight decay 0. `learning_rate` is a float or a function of the step (see `muon`)."""
    b1, b2 = betas

    def init_fn(params):
        zeros = lambda p: jnp.zeros(p.shape, p.dtype)  # noqa: E731 - state dtype = param dtype
        return AdamState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(zeros, params),
                         nu=jax.tree.map(zeros, params))

    def update_fn(updates, state, params=None, *, step=None, **extra_args):
        del params, extra_args
        step = state.count if step is None else step
        lr = learning_rate(step) if callable(learning_rate) else learning_rate
        t = jnp.asarray(step, jnp.int32) + 1
        grads, treedef = jax.tree.flatten(updates)
        mus = treedef.flatten_up_to(state.mu)
        nus = treedef.flatten_up_to(state.nu)
        # 1 - beta formed in Python doubles, then cast, as torch passes alpha=1 - beta1
        out = [_adam_leaf(g, m, v, t, lr, b1, b2, 1 - b1, 1 - b2, eps) for g, m, v in zip(grads, mus, nus)]
        new_updates = jax.tree.unflatten(treedef, [o[0] for o in out])
        new_state = AdamState(count=t, mu=jax.tree.unflatten(treedef, [o[1] for o in out]),
                              nu=jax.tree.unflatten(treedef, [o[2] for o in out]))
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# Groups and the combined optimizer (record26 §2, §3, §7).


def param_label(name: str, ndim: int) -> str:
    """Which optimizer group a parameter belongs to, by its state-dict name (record26 §3)."""
    if name.startswith("blocks.") and ndim >= 2:
        return "muon"
    if name == "embed.weight" or name.startswith("value_embeds."):
        return "adam_embed"
    if name == "lm_head.weight":
        return "adam_head"
    if name == "scalars":
        return "adam_scalars"
    raise ValueError(f"parameter {name!r} ({ndim}-D) belongs to no optimizer group: expected a "
                     ">= 2-D 'blocks.*' matrix (Muon), 'embed.weight', 'value_embeds.*', "
                     "'lm_head.weight' or 'scalars' (Adam)")


def param_labels(params: dict[str, Any]) -> dict[str, str]:
    """{name: group} for a flat dict of parameters keyed by state-dict names."""
    if not isinstance(params, dict):
        raise TypeError(f"params must be a flat dict keyed by state-dict names, got {type(params).__name__}")
    return {name: param_label(name, len(p.shape)) for name, p in params.items()}


def build_optimizer(params: dict[str, Any], optim_cfg: OptimConfig, *, ns_dtype=jnp.bfloat16
                    ) -> optax.GradientTransformationExtraArgs:
    """Muon for the block matrices and the three Adam groups, all on the lr schedule f(s).

    State: PartitionState(inner_states={group: MaskedState(inner_state=MuonState | AdamState)})
    for group in GROUPS, each with its own int32 count; leaves of other groups are MaskedNode.
    `ns_dtype`: bf16 (the record), float32 or float64 (parity modes).
    """
    cfg = optim_cfg

    def scheduled(base_lr: float):
        return host_table(lambda step: base_lr * lr_factor(step, cfg), cfg.num_iterations)

    warm = max(cfg.muon_momentum_warmup, 0) + 1  # m(s) is constant from s = warmup on
    transforms = {
        "muon": muon(scheduled(cfg.muon_lr), host_table(lambda step: muon_momentum(step, cfg), warm),
                     one_minus_momentum=host_table(lambda step: 1 - muon_momentum(step, cfg), warm),
                     ns_dtype=ns_dtype, ns_steps=cfg.ns_steps, ns_coeffs=cfg.ns_coeffs),
        "adam_embed": adam(scheduled(cfg.adam_lr_embed), cfg.adam_betas, cfg.adam_eps),
        "adam_head": adam(scheduled(cfg.adam_lr_head), cfg.adam_betas, cfg.adam_eps),
        "adam_scalars": adam(scheduled(cfg.adam_lr_scalars), cfg.adam_betas, cfg.adam_eps),
    }
    return optax.partition(transforms, param_labels(params))


def optimizer_step(opt_state) -> jax.Array:
    """The step the next update applies (the Muon group's count; all groups count together)."""
    return opt_state.inner_states["muon"].inner_state.count
