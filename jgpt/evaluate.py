"""Evaluate a checkpoint from Python: load it, then compute the loss or the logits.

    from jgpt import evaluate

    cfg, params = evaluate.load_checkpoint("model.npz")      # jgpt checkpoint, or a torch .pt
    tokens = ...                                             # int array [T + 1] or [B, T + 1], T % 128 == 0
    evaluate.loss(params, cfg, tokens, window_blocks=14)     # mean CE over the T (or B * T) targets
    evaluate.logits(params, cfg, tokens[..., :-1], window_blocks=14)   # [T, 50304] or [B, T, 50304]

`window_blocks` is the record's W (long layers see W blocks of 128 tokens, short ones W // 2; the
final validation of record #26 uses 14). `policy` picks the numerics: "fp32" (default, exact, what
parity compares), "record" (bf16 activations and head, i.e. what the record's validation computes,
record26 §9), or "fp64" (needs jax_enable_x64). Evaluation never uses the FP8 head (§11.9).
Each sequence gets its own document ids and positions 0..T-1, like one validation slice (§9).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jgpt import checkpoint as ckpt
from jgpt import model
from jgpt.config import BLOCK_SIZE, ModelConfig


def load_checkpoint(path, **infer) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, params) from a jgpt checkpoint, or from a torch.save file (bare state dict or the
    record's {"model": ...}); for torch files the config is inferred from the shapes, and `infer`
    passes num_heads / head_dim / long_layers / max_seq_len (see checkpoint.infer_config)."""
    path = Path(path)
    if ckpt.is_jgpt_checkpoint(path):
        return ckpt.load_checkpoint(path)
    params = ckpt.load_torch_file(path)
    return ckpt.infer_config(params, **infer), params


def _batched(tokens) -> tuple[jax.Array, bool]:
    tokens = jnp.asarray(tokens)
    if tokens.ndim not in (1, 2):
        raise ValueError(f"tokens must be [T] or [B, T], got shape {tokens.shape}")
    return (tokens if tokens.ndim == 2 else tokens[None]), tokens.ndim == 1


def _check_len(T: int) -> None:
    if T % BLOCK_SIZE:
        raise ValueError(f"sequence length {T} is not a multiple of {BLOCK_SIZE} (attention blocks)")


@partial(jax.jit, static_argnames=("cfg", "window_blocks", "policy", "backend"))
def _logits(params, inputs, *, cfg, window_blocks, policy, backend):
    one = lambda seq: model.logits(params, cfg, seq, window_blocks, policy=policy, train=False, backend=backend)
    return jax.vmap(one)(inputs)


@partial(jax.jit, static_argnames=("cfg", "window_blocks", "policy", "backend"))
def _loss(params, inputs, targets, *, cfg, window_blocks, policy, backend):
    one = lambda i, t: model.forward(params, cfg, i, t, window_blocks, policy=policy, train=False, backend=backend)
    return jnp.mean(jax.vmap(one)(inputs, targets))  # equal-length sequences: mean of means


def logits(params, cfg: ModelConfig, input_seq, window_blocks: int, *, policy: str = "fp32",
           backend: str = "auto") -> jax.Array:
    """Softcapped logits (fp32; fp64 under "fp64") over all 50304 padded classes for input
    tokens [T] -> [T, Vp] or [B, T] -> [B, T, Vp]."""
    inputs, single = _batched(input_seq)
    _check_len(inputs.shape[1])
    out = _logits(params, inputs, cfg=cfg, window_blocks=int(window_blocks), policy=policy, backend=backend)
    return out[0] if single else out


def loss(params, cfg: ModelConfig, tokens, window_blocks: int, *, policy: str = "fp32",
         backend: str = "auto") -> float:
    """Mean cross-entropy (nats per token) of predicting tokens[..., 1:] from tokens[..., :-1];
    tokens is [T + 1] or [B, T + 1] with T a multiple of 128."""
    seqs, _ = _batched(tokens)
    _check_len(seqs.shape[1] - 1)
    return float(_loss(params, seqs[:, :-1], seqs[:, 1:], cfg=cfg, window_blocks=int(window_blocks),
                       policy=policy, backend=backend))
