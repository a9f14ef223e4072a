"""The training head of the record fused with its loss: FP8 lm_head, softcap and summed CE.

record26 §5.8-§5.9: z = fp8_mm(h, W) (bf16), logits = 30 * sigmoid(z / (7.5 * sqrt(d))) in fp32,
loss = sum(logsumexp(logits) - logits[target]). Autodiff of that chain keeps [T, 50304] fp32
intermediates and walks them in several passes (and under jax.checkpoint redoes the FP8 GEMM);
this custom VJP saves only the bf16 z and the per-row log-sum-exp (one reduction pass over z),
and computes the gradient of z in one elementwise pass (head_gpu.grad_z: torch autograd's order
for the record's graph), then the FP8 backward GEMMs of jgpt.fp8. On GPUs both passes over z
are Pallas kernels (jgpt.head_gpu); elsewhere XLA fusions of the same arithmetic. With
head_gpu.GEMM_OUT = "bf16" (the default) the FP8 GEMM writes z itself (fp8.fwd_bf16: alpha to 2.1e-7)
and the LSE pass reads it.
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from jgpt import fp8, head_gpu


def _cap_terms(cfg):
    return float(cfg.softcap), float(cfg.softcap_div * math.sqrt(cfg.model_dim))


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def fp8_head_loss(h: jax.Array, w: jax.Array, targets: jax.Array, cfg) -> jax.Array:
    """Summed CE (fp32 scalar) of the FP8 head on normed hidden states h [C, d] (bf16) against
    targets [C]; w is lm_head.weight [Vp, d]. Same value as head(..., fp8=True) + cross_entropy."""
    return _forward(h, w, targets, cfg)[0]


def _forward(h, w, targets, cfg):
    cap, div = _cap_terms(cfg)
    if head_gpu.GEMM_OUT == "bf16":  # cuBLASLt writes z (alpha to 2.1e-7: fp8.fwd_bf16)
        use_kernels, interpret = head_gpu.applies((h.shape[0], w.shape[0]))
        # the cuBLASLt form where the compiled kernels run (a GPU); elsewhere (the CPU, and the
        # interpreted kernel tests) what that call computes
        z, fp8_res = fp8.fwd_bf16(h, w, cfg.fp8_x_s, cfg.fp8_w_s, emulate=not use_kernels or interpret)
        lse = head_gpu.lse_of_z(z, cap, div, interpret) if use_kernels else _lse_xla(z, cap, div)
    else:
        prod, fp8_res = fp8.fwd_f32(h, w, cfg.fp8_x_s, cfg.fp8_w_s)
        use_kernels, interpret = head_gpu.applies(prod.shape)
        if use_kernels:
            z, lse = head_gpu.lse_and_z(prod, cap, div, interpret)
        else:
            z = prod.astype(jnp.bfloat16)
            lse = _lse_xla(z, cap, div)
    z_t = jnp.take_along_axis(z, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]
    picked = head_gpu.softcapped(z_t, cap, div)
    return jnp.sum(lse - picked), (z, lse, targets, fp8_res)


def _lse_xla(z, cap, div):
    # the softcap bounds every logit by `cap`, so shifting by cap instead of the row max keeps
    # exp() in (e^-2cap, 1]: one pass over z instead of a max pass and a sum pass
    return cap + jnp.log(jnp.sum(jnp.exp(head_gpu.softcapped(z, cap, div) - cap), axis=-1))


def _bwd(cfg, res, g):
    z, lse, targets, fp8_res = res
    cap, div = _cap_terms(cfg)
    scales = (cfg.fp8_x_s, cfg.fp8_w_s, cfg.fp8_grad_s)
    use_kernels, interpret = head_gpu.applies(z.shape)
    if use_kernels:  # one pass: z -> e5m2 gradient in both layouts
        g8, g8t = head_gpu.grad_e5m2(z, lse, targets, g, cap, div, cfg.fp8_grad_s, interpret)
        grad_h, grad_w = fp8.bwd_e5m2(*scales, fp8_res, g8, g8t)
    else:
        grad_h, grad_w = fp8._bwd(*scales, fp8_res, head_gpu.grad_z_xla(z, lse, targets, g, cap, div))
    return grad_h, grad_w, None


fp8_head_loss.defvjp(_forward, _bwd)
