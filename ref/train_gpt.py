"""PyTorch reference of modded-nanogpt track-1 record #26 ("BosAlign", 2025-07-13).

Written from the specification in `../shared/docs/record26.md` (cited as §N below); the state-dict
names, shapes and dtypes are the record's, so checkpoints move between this file and the record.
One file, like the record. Importing it starts nothing; `main()` runs only under `__main__`:

    torchrun --nproc_per_node=8 ref/train_gpt.py                 # the record (CUDA, compiled)
    python ref/train_gpt.py --preset tiny --data ../shared/data/gutenberg   # CPU, eager

Modes (design.md "Reference modes"): precision `record` (bf16 embeddings and residual stream,
FP8 head in training), `fp32`, `fp64` (that dtype everywhere, FP8 off, Newton-Schulz in that
dtype); eager or compiled; CPU or CUDA. Sizes other than the record's follow the design's
config rule table, the same rule `jgpt/config.py` implements.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import glob
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

BOS_ID = 50256
BLOCK_SIZE = 128
RMS_EPS = torch.finfo(torch.float32).eps  # 2**-23 (§5, §11.2), also in fp64 mode
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
PRECISIONS = ("record", "fp32", "fp64")
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # §7.3

# -----------------------------------------------------------------------------------------------
# Config rules (design.md "Configs beyond the record"); the record's values at 12 layers.


def value_embed_layout(num_layers: int) -> list[int | None]:
    n = min(3, num_layers // 2)  # §5.2: 012 ... 012
    layout: list[int | None] = [None] * num_layers
    for k in range(n):
        layout[k] = layout[num_layers - n + k] = k
    return layout


def default_no_attn_layers(num_layers: int) -> tuple[int, ...]:
    return (7,) if num_layers == 12 else ()  # §5.4


def default_long_layers(num_layers: int) -> tuple[int, ...]:
    if num_layers == 12:
        return (0, 4, 7, 11)  # §5.6
    return tuple(sorted({0, num_layers - 1} | set(range(0, num_layers, 4))))


def num_scalars(num_layers: int) -> int:
    return -(-5 * num_layers // 8) * 8  # §3, padded to 8 (not to the world size)


# -----------------------------------------------------------------------------------------------
# Attention: one mask rule (§5.6), three implementations that honour it.


def norm(x: Tensor) -> Tensor:
    # §5, §11.2: eps 2**-23, computed in fp32 for bf16 input (opmath), result in x's dtype
    return F.rms_norm(x, (x.size(-1),), eps=RMS_EPS)


def document_ids(input_seq: Tensor) -> Tensor:
    return (input_seq == BOS_ID).cumsum(0)  # a BOS starts (and belongs to) a new document


def dense_mask(docs: Tensor, window_blocks: int) -> Tensor:
    """§5.6 dense rule: k <= q, same document, q//128 - k//128 < max(w, 1). [T, T] bool."""
    pos = torch.arange(docs.numel(), device=docs.device)
    q, k = pos[:, None], pos[None, :]
    blk = q // BLOCK_SIZE - k // BLOCK_SIZE
    return (k <= q) & (docs[:, None] == docs[None, :]) & (blk < max(int(window_blocks), 1))


def _softmax_attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """Scores and softmax in fp32 (fp64 in fp64 mode); P cast to v's dtype before P@V (§11.8)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    s = torch.einsum("...qhd,...khd->...hqk", q.to(acc), k.to(acc)) * scale
    s = s.masked_fill(~allowed.unsqueeze(-3), float("-inf"))
    p = torch.softmax(s, dim=-1).to(v.dtype)
    return torch.einsum("...hqk,...khd->...qhd", p, v)


def dense_attention(q, k, v, docs, window_blocks, scale):
    """q, k, v: [T, H, D]. Exact and simple; memory O(T^2): for tests."""
    return _softmax_attend(q, k, v, dense_mask(docs, window_blocks), scale)


def blockwise_attention(q, k, v, docs, window_blocks, scale):
    """The dense rule evaluated only on the kv blocks a query block can see (§5.6): block m
    gathers blocks m-w+1..m (w = max(W, 1)), so memory is O(T * w * 128). Differentiable."""
    T, H, D = q.shape
    nblk = T // BLOCK_SIZE
    w = min(max(int(window_blocks), 1), nblk)
    pad = (w - 1) * BLOCK_SIZE
    span = w * BLOCK_SIZE
    kp = F.pad(k, (0, 0, 0, 0, pad, 0)).unfold(0, span, BLOCK_SIZE).permute(0, 3, 1, 2)  # [N, span, H, D]
    vp = F.pad(v, (0, 0, 0, 0, pad, 0)).unfold(0, span, BLOCK_SIZE).permute(0, 3, 1, 2)
    pos = torch.arange(-pad, T, device=q.device)
    kpos = pos.unfold(0, span, BLOCK_SIZE)  # [N, span]; negative = padding
    kdoc = F.pad(docs, (pad, 0), value=-1).unfold(0, span, BLOCK_SIZE)
    qpos = torch.arange(T, device=q.device).view(nblk, BLOCK_SIZE)
    qdoc = docs.view(nblk, BLOCK_SIZE)
    allowed = (kpos[:, None, :] <= qpos[:, :, None]) & (kpos[:, None, :] >= 0) & (kdoc[:, None, :] == qdoc[:, :, None])
    out = _softmax_attend(q.view(nblk, BLOCK_SIZE, H, D), kp, vp, allowed, scale)
    return out.reshape(T, H, D)


def flex_block_masks(input_seq: Tensor, window_blocks: Tensor):
    """FlexAttention block masks of §5.6 (long: W, short: W // 2), built from the tokens on every
    call. Needs torch.compile: eager flex_attention ignores the block lists (§11.5)."""
    from torch.nn.attention.flex_attention import BlockMask

    docs = document_ids(input_seq)
    nblk = input_seq.numel() // BLOCK_SIZE

    def same_doc_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (docs[q_idx] == docs[kv_idx])

    idx = torch.arange(nblk, dtype=torch.int32, device=input_seq.device)
    lo = docs.view(nblk, BLOCK_SIZE)[:, 0]
    hi = docs.view(nblk, BLOCK_SIZE)[:, -1]
    overlap = (lo[:, None] <= hi[None, :]) & (hi[:, None] >= lo[None, :])
    inside_one_doc = (lo[:, None] == hi[None, :]) & (hi[:, None] == lo[None, :])
    any_blk = (idx[:, None] >= idx[None, :]) & overlap
    full_blk = (idx[:, None] > idx[None, :]) & inside_one_doc
    partial_blk = any_blk & ~full_blk

    def nearest_first(blk: Tensor):
        # stable ascending argsort of the 0/1 row, reversed: allowed blocks by decreasing n (§5.6)
        count = blk.sum(dim=-1, dtype=torch.int32)
        order = blk.to(torch.int8).argsort(dim=-1, stable=True).flip(-1).to(torch.int32)
        return count[None, None].contiguous(), order[None, None].contiguous()

    p_cnt, p_idx = nearest_first(partial_blk)
    f_cnt, f_idx = nearest_first(full_blk)

    def for_window(w: Tensor):
        # full blocks: min(F, w-1) (clamped at 0: the GPU treats w=0's -1 as 0, §5.6);
        # partial blocks: min(P, max(w - F, 1)) with the untruncated F
        return BlockMask.from_kv_blocks(
            torch.clamp_max(p_cnt, torch.clamp_min(w - f_cnt, 1)), p_idx,
            torch.clamp(f_cnt, max=w - 1).clamp_min(0), f_idx,
            BLOCK_SIZE=BLOCK_SIZE, mask_mod=same_doc_causal)

    return for_window(window_blocks), for_window(window_blocks // 2)


# -----------------------------------------------------------------------------------------------
# FP8 head (§5.9): torch._scaled_mm with static scales on CUDA; a faithful emulation on CPU.
E4M3_MAX, E5M2_MAX = 448.0, 57344.0


def quantize_fp8(t: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    # x/scale in fp32 from the bf16 input (the record's fused kernel, §11.9); saturate like
    # cvt.rn.satfinite, since a plain cast gives NaN/inf on overflow on some backends
    top = E4M3_MAX if dtype == torch.float8_e4m3fn else E5M2_MAX
    return (t.float() / scale).clamp(-top, top).to(dtype)


def _scaled_matmul(a8: Tensor, b8_t: Tensor, sa: float, sb: float, out_dtype, fast_accum: bool) -> Tensor:
    """(a8 @ b8_t) * sa * sb. b8_t is [K, N] (the transposed right operand)."""
    if a8.is_cuda:
        one = lambda s: torch.tensor(s, dtype=torch.float32, device=a8.device)
        return torch._scaled_mm(a8, b8_t, out_dtype=out_dtype, scale_a=one(sa), scale_b=one(sb),
                                use_fast_accum=fast_accum)
    alpha = torch.tensor(sa, dtype=torch.float32) * torch.tensor(sb, dtype=torch.float32)
    return ((a8.float() @ b8_t.float()) * alpha).to(out_dtype)


_compiled: dict = {}


def on_device(fn, t: Tensor):
    """fn itself on CPU (eager); torch.compile(fn) on CUDA, as the record compiles its FP8
    kernels, NS and Adam step, so pointwise chains are fused (fp32 inside, one rounding)."""
    if not t.is_cuda:
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]


def _fp8_forward(x: Tensor, w: Tensor, x_s: float, w_s: float):
    x8 = quantize_fp8(x, x_s, torch.float8_e4m3fn)
    w8 = quantize_fp8(w, w_s, torch.float8_e4m3fn)
    return _scaled_matmul(x8, w8.T, x_s, w_s, torch.bfloat16, fast_accum=True), x8, w8


def _fp8_backward_math(g: Tensor, x8: Tensor, w8: Tensor, x_s: float, w_s: float, grad_s: float):
    g8 = quantize_fp8(g, grad_s, torch.float8_e5m2)
    # grad_x from the quantized weights (bf16), grad_w from the quantized activations (fp32)
    grad_x = _scaled_matmul(g8, w8.T.contiguous().T, grad_s, w_s, torch.bfloat16, fast_accum=False)
    grad_w = _scaled_matmul(x8.T.contiguous(), g8.T.contiguous().T, x_s, grad_s, torch.float32, fast_accum=False).T
    return grad_x, grad_w


@torch.library.custom_op("jgpt_ref::fp8_mm", mutates_args=())
def fp8_mm(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor, Tensor]:
    return on_device(_fp8_forward, x)(x, w, x_s, w_s)


@fp8_mm.register_fake
def _(x, w, x_s, w_s, grad_s):
    return (x.new_empty(x.shape[0], w.shape[0], dtype=torch.bfloat16),
            torch.empty_like(x, dtype=torch.float8_e4m3fn), torch.empty_like(w, dtype=torch.float8_e4m3fn))


@torch.library.custom_op("jgpt_ref::fp8_mm_backward", mutates_args=())
def fp8_mm_backward(g: Tensor, x8: Tensor, w8: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor]:
    return on_device(_fp8_backward_math, g)(g, x8, w8, x_s, w_s, grad_s)


@fp8_mm_backward.register_fake
def _(g, x8, w8, x_s, w_s, grad_s):
    # grad_w comes out transposed ([d, V] computed, viewed as [V, d]), so the fake says so too
    return (g.new_empty(g.shape[0], w8.shape[1], dtype=torch.bfloat16),
            g.new_empty(w8.shape[1], w8.shape[0], dtype=torch.float32).T)


def _fp8_setup(ctx, inputs, output):
    ctx.scales = inputs[2:]
    ctx.save_for_backward(output[1], output[2])


def _fp8_backward(ctx, grad_out, *_):
    x8, w8 = ctx.saved_tensors
    grad_x, grad_w = torch.ops.jgpt_ref.fp8_mm_backward(grad_out.contiguous(), x8, w8, *ctx.scales)
    return grad_x, grad_w, None, None, None


fp8_mm.register_autograd(_fp8_backward, setup_context=_fp8_setup)

# -----------------------------------------------------------------------------------------------
# Model (§3-§5)


def mix(*pairs) -> Tensor:
    """sum(lam * x) with fp32 0-dim lambdas and bf16 x: computed in fp32 and rounded once to x's
    dtype, as the compiled record fuses these chains (§11.1); eager torch would round per op."""
    dtype = pairs[0][1].dtype
    acc = torch.promote_types(dtype, torch.float32)
    return sum(lam.to(acc) * x.to(acc) for lam, x in pairs).to(dtype)


def norm_rotary(rotary, x: Tensor) -> Tensor:
    """rotary(norm(x)) with the norm's output kept in fp32 and one rounding to x's dtype, as the
    compiled record computes it (§11.1): torch.compile fuses the two into one Triton kernel, whose
    code keeps a bf16 intermediate in fp32 (Inductor's emulate_precision_casts is off); eager
    torch would round the norm's output too. Compiled, Inductor drops that rounding either way."""
    acc = torch.promote_types(x.dtype, torch.float32)
    return rotary(norm(x.to(acc))).to(x.dtype)


class CastedLinear(nn.Linear):
    """Bias-free linear whose fp32 master weight is cast to the activation dtype (§5)."""

    def __init__(self, in_features: int, out_features: int, use_fp8=False, x_s=1.0, w_s=1.0, grad_s=1.0):
        super().__init__(in_features, out_features, bias=False)
        self.use_fp8, self.x_s, self.w_s, self.grad_s = use_fp8, x_s, w_s, grad_s
        bound = math.sqrt(3) * 0.5 * in_features ** -0.5  # §3: U(-a, a), std 0.5/sqrt(in)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_fp8 and self.training:
            flat = x.flatten(0, -2).contiguous()
            out = torch.ops.jgpt_ref.fp8_mm(flat, self.weight, self.x_s, self.w_s, self.grad_s)[0]
            return out.reshape(*x.shape[:-1], -1)
        return F.linear(x, self.weight.type_as(x))


class Rotary(nn.Module):
    """Half-truncated RoPE, base 1024, rotation by -theta, rotate-half pairing (§5.5)."""

    def __init__(self, head_dim: int, max_seq_len: int, dtype=torch.float32):
        super().__init__()
        n = head_dim // 4
        freq = (1 / 1024) ** torch.linspace(0, 1, steps=n, dtype=dtype)
        freq = torch.cat([freq, freq.new_zeros(n)])
        theta = torch.outer(torch.arange(max_seq_len, dtype=dtype), freq)
        self.cos = nn.Buffer(theta.cos(), persistent=False)
        self.sin = nn.Buffer(theta.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, T, H, D]
        T = x.size(-3)
        if T > self.cos.size(0):
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.cos.size(0)}")
        cos, sin = self.cos[None, :T, None, :], self.sin[None, :T, None, :]
        x1, x2 = x.to(self.cos.dtype).chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos), dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, max_seq_len: int, rope_dtype, attention: str):
        super().__init__()
        self.num_heads, self.head_dim, self.attention = num_heads, head_dim, attention
        hdim = num_heads * head_dim
        bound = math.sqrt(3) * 0.5 * dim ** -0.5
        self.qkv_w = nn.Parameter(torch.empty(3, hdim, dim).uniform_(-bound, bound))  # merged QKV (§5.5)
        self.rotary = Rotary(head_dim, max_seq_len, rope_dtype)
        self.c_proj = CastedLinear(hdim, dim)
        self.c_proj.weight.detach().zero_()  # drawn, then zeroed (§3 init order)

    def forward(self, x: Tensor, ve: Tensor | None, sa_lambdas: Tensor, mask) -> Tensor:
        B, T = x.size(0), x.size(1)
        assert B == 1, "one sequence per call (§4)"
        qkv = F.linear(x, self.qkv_w.flatten(end_dim=1).type_as(x))
        q, k, v = qkv.view(B, T, 3 * self.num_heads, self.head_dim).chunk(3, dim=-2)
        q, k = norm_rotary(self.rotary, q), norm_rotary(self.rotary, k)  # QK-norm, then RoPE (§5.5)
        v = mix((sa_lambdas[0], v)) if ve is None else mix((sa_lambdas[0], v), (sa_lambdas[1], ve.view_as(v)))
        if mask[0] == "flex":
            from torch.nn.attention.flex_attention import flex_attention
            y = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                               block_mask=mask[1], scale=0.12).transpose(1, 2)
        else:
            kind, docs, w = mask
            fn = dense_attention if kind == "dense" else blockwise_attention
            y = fn(q[0], k[0], v[0], docs, w, 0.12)[None]
        return self.c_proj(y.contiguous().view(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: int = 4):
        super().__init__()
        self.c_fc = CastedLinear(dim, ratio * dim)
        self.c_proj = CastedLinear(ratio * dim, dim)
        self.c_proj.weight.detach().zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, dim, num_heads, head_dim, max_seq_len, has_attn, rope_dtype, attention):
        super().__init__()
        self.attn = CausalSelfAttention(dim, num_heads, head_dim, max_seq_len, rope_dtype, attention) if has_attn else None
        self.mlp = MLP(dim)

    def forward(self, x, ve, x0, lambdas, sa_lambdas, mask, trace=None, i=0):
        x = mix((lambdas[0], x), (lambdas[1], x0))  # fp32 0-dim lambdas do not promote bf16 x (§11.1)
        if self.attn is not None:
            a = self.attn(norm(x), ve, sa_lambdas, mask)
            if trace is not None:
                trace[f"attn.{i}"] = a
            x = x + a
        m = self.mlp(norm(x))
        if trace is not None:
            trace[f"mlp.{i}"] = m
        return x + m


class GPT(nn.Module):
    """The record's GPT (§3-§5). Drop-in: GPT(vocab_size, num_layers, num_heads, model_dim,
    max_seq_len) and forward(input_seq, target_seq, sliding_window_num_blocks) as in the record;
    keyword settings cover what the record hard-codes (design.md config rule table)."""

    def __init__(self, vocab_size: int, num_layers: int, num_heads: int, model_dim: int, max_seq_len: int, *,
                 head_dim: int | None = None, no_attn_layers=None, long_layers=None,
                 precision: str = "record", attention: str = "auto"):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: choose one of {PRECISIONS}")
        if attention not in ("auto", "flex", "blockwise", "dense"):
            raise ValueError(f"attention={attention!r}: choose auto, flex, blockwise or dense")
        if num_layers < 2 or num_layers % 2:
            raise ValueError(f"num_layers={num_layers}: the U-net needs an even number >= 2")
        head_dim = head_dim or model_dim // num_heads
        self.precision, self.attention = precision, attention
        self.num_layers, self.model_dim = num_layers, model_dim
        self.no_attn = tuple(default_no_attn_layers(num_layers) if no_attn_layers is None else no_attn_layers)
        self.long = tuple(default_long_layers(num_layers) if long_layers is None else long_layers)
        self.ve_layout = value_embed_layout(num_layers)
        vocab_padded = -(-vocab_size // 128) * 128  # §3: padded inside the constructor
        rope_dtype = torch.float64 if precision == "fp64" else torch.float32
        # construction order = the record's init RNG order (§3)
        self.embed = nn.Embedding(vocab_padded, model_dim)
        self.value_embeds = nn.ModuleList([nn.Embedding(vocab_padded, model_dim) for _ in range(min(3, num_layers // 2))])
        self.blocks = nn.ModuleList([
            Block(model_dim, num_heads, head_dim, max_seq_len, i not in self.no_attn, rope_dtype, attention)
            for i in range(num_layers)])
        self.lm_head = CastedLinear(model_dim, vocab_padded, use_fp8=(precision == "record"),
                                    x_s=model_dim ** 0.5 / 448, w_s=24 / 448, grad_s=1 / 448)
        self.lm_head.weight.detach().zero_()
        n = num_scalars(num_layers)
        self.scalars = nn.Parameter(torch.cat([
            torch.ones(num_layers),  # U-net skip weights (first L//2 used)
            torch.tensor([1.0, 0.0]).repeat(num_layers),  # block lambdas (residual, x0)
            torch.tensor([0.5, 0.5]).repeat(num_layers),  # attention lambdas (v, ve)
            torch.ones(n - 5 * num_layers)]))
        if precision == "record":
            for m in self.modules():
                if isinstance(m, nn.Embedding):
                    m.bfloat16()  # §3: embeddings are bf16 parameters
        elif precision == "fp64":
            self.double()

    def _masks(self, input_seq: Tensor, window):
        kind = self.attention
        if kind == "auto":
            kind = "flex" if input_seq.is_cuda and torch.compiler.is_compiling() else "blockwise"
        if kind == "flex":
            w = window if torch.is_tensor(window) else torch.tensor(window, dtype=torch.int32, device=input_seq.device)
            long_bm, short_bm = flex_block_masks(input_seq, w)
            return ("flex", long_bm), ("flex", short_bm)
        docs = document_ids(input_seq)
        w = int(window)
        return (kind, docs, w), (kind, docs, w // 2)

    def forward(self, input_seq: Tensor, target_seq: Tensor, sliding_window_num_blocks, trace: dict | None = None):
        assert input_seq.ndim == 1, "one 1-D token sequence (§4)"
        if input_seq.numel() % BLOCK_SIZE:
            raise ValueError(f"sequence length {input_seq.numel()} is not a multiple of {BLOCK_SIZE}")
        L = self.num_layers
        ves = [ve(input_seq) for ve in self.value_embeds]
        long_mask, short_mask = self._masks(input_seq, sliding_window_num_blocks)
        x = x0 = norm(self.embed(input_seq)[None])
        if trace is not None:
            trace["x0"] = x0
        skip_w = self.scalars[:L // 2]
        lambdas = self.scalars[L:3 * L].view(-1, 2)
        sa_lambdas = self.scalars[3 * L:5 * L].view(-1, 2)
        skips, n = [], L // 2
        for i, block in enumerate(self.blocks):
            if i >= n:
                x = mix((x.new_ones(()), x), (skip_w[i - n], skips.pop()))  # U-net, LIFO (§5.3)
            ve = None if self.ve_layout[i] is None else ves[self.ve_layout[i]]
            mask = long_mask if i in self.long else short_mask
            x = block(x, ve, x0, lambdas[i], sa_lambdas[i], mask, trace, i)
            if trace is not None:
                trace[f"block.{i}"] = x
            if i < n:
                skips.append(x)
        x = norm(x)
        logits = self.lm_head(x)
        acc = torch.float64 if self.precision == "fp64" else torch.float32
        z = logits.to(acc)
        logits = 30 * torch.sigmoid(z / (7.5 * x.size(-1) ** 0.5))  # softcap (§5.8)
        if trace is not None:
            trace.update(final_norm=x, logits_raw=z, logits=logits)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), target_seq.long(),
                               reduction="sum" if self.training else "mean")


def state_dict_from_checkpoint(obj) -> dict[str, Tensor]:
    """A bare state dict, or the record's checkpoint dict ({"model": ...}), with or without the
    `_orig_mod.` prefix that torch.compile adds."""
    sd = obj["model"] if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    return {k.removeprefix("_orig_mod."): v for k, v in sd.items()}


def load_checkpoint(model: GPT, path) -> None:
    sd = state_dict_from_checkpoint(torch.load(path, map_location="cpu", weights_only=False))
    model.load_state_dict(sd)


# -----------------------------------------------------------------------------------------------
# Optimizers (§7). Distributed collectives: NCCL as the record; gloo (no reduce_scatter, no AVG)
# sums with all_reduce and divides, which is the same mean.


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_nccl() -> bool:
    return dist.get_backend() == "nccl"


NS_MATMUL = torch.matmul  # the NS matmuls; parity tests swap in one rounded the same way on both sides


def _fused_axpy(k: float, x: Tensor, y: Tensor, acc: torch.dtype, dtype: torch.dtype) -> Tensor:
    """`k * x + y` as the record's compiled NS computes it: in `acc` from the `dtype` operands,
    the multiply-add contracted to one FMA (Triton's default, as XLA's), rounded once to `acc`,
    then to `dtype`. Eager torch would round k * x to `acc` before the add: with B = b*A + (c*A)@A
    near cancellation that flips ~1% of B's bf16 elements from the record's. So eager computes it
    in float64, where k (as `acc`) times x and the sum are exact for fp32 / bf16 operands (<= 48
    significant bits), and rounds once (a double rounding through fp64 differs from the FMA in
    ~2^-29 of the elements). fp64 has nothing wider: two roundings there, ~1e-16."""
    if torch.compiler.is_compiling() or acc == torch.float64:
        return (k * x.to(acc) + y.to(acc)).to(dtype)
    k = torch.tensor(k, dtype=acc).double()
    return (k * x.double() + y.double()).to(acc).to(dtype)


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, dtype=torch.bfloat16, coeffs=NS_COEFFS) -> Tensor:
    """Newton-Schulz orthogonalisation of each matrix of the last two dims (§7.3), in `dtype`.
    The record's `B = b * A + c * A @ A` is `b*A + (c*A) @ A` in Python. It is compiled there,
    so the pointwise sums around each matmul are computed in fp32 from the dtype operands and
    rounded once (`_fused_axpy`); written out here so eager CPU computes the same."""
    a, b, c = coeffs
    acc = torch.promote_types(dtype, torch.float32)
    mm = NS_MATMUL
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = (X.to(acc) / (X.norm(dim=(-2, -1), keepdim=True).to(acc) + 1e-7)).to(dtype)  # the norm is stored in dtype
    for _ in range(steps):
        A = mm(X, X.mT)
        B = _fused_axpy(b, A, mm(c * A, A), acc, dtype)
        X = _fused_axpy(a, X, mm(B, X), acc, dtype)
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Muon (§7.3): fp32 momentum (lerp form), Nesterov, NS5, lr * max(1, rows/cols)**0.5.
    Matrices are grouped by shape; within a group rank r owns every world_size-th matrix."""

    def __init__(self, params, lr=0.05, momentum=0.95, weight_decay=0.0, ns_steps=5, ns_dtype=torch.bfloat16):
        params = list(params)
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [dict(params=[p for p in params if tuple(p.shape) == s]) for s in shapes]
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.ns_steps, self.ns_dtype = ns_steps, ns_dtype

    def _update(self, p: Tensor, g: Tensor, group) -> None:
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(g)
        buf, m = state["momentum_buffer"], group["momentum"]
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        buf.lerp_(g, 1 - m)
        u = g.lerp(buf, m)  # Nesterov: (1 - m) g + m buf
        o = on_device(zeropower_via_newtonschulz5, u)(u, self.ns_steps, self.ns_dtype)
        p.add_(o, alpha=-group["lr"] * max(1, p.size(-2) / p.size(-1)) ** 0.5)

    @torch.no_grad()
    def step(self):
        rank, ws = _world()
        for group in self.param_groups:
            params = group["params"]
            for base in range(0, len(params), ws):
                chunk = params[base:base + ws]
                if ws > 1:
                    grads = [p.grad for p in chunk] + [torch.zeros_like(chunk[0])] * (ws - len(chunk))
                    g = torch.empty_like(chunk[0])
                    if _is_nccl():
                        dist.reduce_scatter(g, grads, op=dist.ReduceOp.AVG)
                    else:
                        for j, gj in enumerate(grads):  # gloo: sum to every rank, keep ours
                            gj = gj.clone()
                            dist.all_reduce(gj)
                            if j == rank:
                                g = gj / ws
                else:
                    g = chunk[0].grad
                if rank < len(chunk):
                    self._update(chunk[rank], g, group)
                if ws > 1:
                    out = [p.data for p in chunk] + [torch.empty_like(chunk[0]) for _ in range(ws - len(chunk))]
                    mine = out[rank].detach().clone()
                    dist.all_gather(out, mine)


def adam_math(p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: Tensor, lr: float, b1: float, b2: float, eps: float):
    """record26 §7.2 in fp32 (fp64 for fp64 params) from the stored values; the caller stores."""
    acc = torch.promote_types(p.dtype, torch.float32)
    t = step.to(acc)
    gf = g.to(acc)
    m = m.to(acc) * b1 + gf * (1 - b1)
    v = v.to(acc) * b2 + (1 - b2) * gf * gf  # addcmul's order: (value * g) * g
    step_size = lr * (torch.sqrt(1 - b2 ** t) / (1 - b1 ** t))
    return p.to(acc) - (m / (v.sqrt() + eps)) * step_size, m, v


class DistAdam(torch.optim.Optimizer):
    """Adam with rows sharded over ranks (§7.2): p -= lr (sqrt(1-b2^t)/(1-b1^t)) m/(sqrt(v)+eps).
    State in the parameter's dtype; the arithmetic in fp32 (the record compiles the step, which
    computes from the stored values in fp32 and rounds once on store, §11.12)."""

    def __init__(self, params, lr=0.008, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        rank, ws = _world()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows = p.shape[0] // ws
                if p.shape[0] % ws:
                    raise ValueError(f"DistAdam shards rows: {p.shape[0]} rows do not divide by world size {ws}")
                if ws == 1:
                    g = p.grad
                elif _is_nccl():
                    g = torch.empty_like(p.grad[:rows])
                    dist.reduce_scatter_tensor(g, p.grad.contiguous(), op=dist.ReduceOp.AVG)
                else:
                    g = p.grad.clone()
                    dist.all_reduce(g)
                    g = (g / ws)[rank * rows:(rank + 1) * rows]
                p_slice = p[rank * rows:(rank + 1) * rows]
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0, dtype=torch.int64, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p_slice)
                    state["exp_avg_sq"] = torch.zeros_like(p_slice)
                state["step"] += 1
                new_p, m, v = on_device(adam_math, p)(p_slice, g, state["exp_avg"], state["exp_avg_sq"], state["step"],
                                                      group["lr"], b1, b2, group["eps"])
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                p_slice.copy_(new_p)
                if ws > 1:
                    parts = list(p.chunk(ws))
                    mine = parts[rank].clone()
                    dist.all_gather(parts, mine)


def build_optimizers(model: GPT, hp: "Hyperparameters") -> list[torch.optim.Optimizer]:
    """The record's groups (§2, §7): Adam for embeddings (0.6), head (0.22), scalars (0.04);
    Muon (0.05) for every matrix under `blocks`. initial_lr is recorded for the schedule."""
    embed = [model.embed.weight, *[ve.weight for ve in model.value_embeds]]
    adam = DistAdam([dict(params=[model.lm_head.weight], lr=hp.adam_lr_head),
                     dict(params=embed, lr=hp.adam_lr_embed),
                     dict(params=[model.scalars], lr=hp.adam_lr_scalars)],
                    betas=hp.adam_betas, eps=hp.adam_eps)
    matrices = [p for n, p in model.blocks.named_parameters() if p.ndim >= 2]
    ns_dtype = {"record": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[model.precision]
    muon = Muon(matrices, lr=hp.muon_lr, momentum=hp.muon_momentum_end, ns_steps=hp.ns_steps, ns_dtype=ns_dtype)
    for opt in (adam, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return [adam, muon]


# -----------------------------------------------------------------------------------------------
# Schedules (§5.7, §7.1, §7.3)


def get_lr(step: int, num_iterations: int, cooldown_frac: float = 0.45, floor: float = 0.1) -> float:
    x = step / num_iterations
    assert 0 <= x < 1, f"step {step} outside 0..{num_iterations - 1}"
    if x < 1 - cooldown_frac:
        return 1.0
    w = (1 - x) / cooldown_frac
    return w * 1.0 + (1 - w) * floor


def get_window_size_blocks(step: int, num_iterations: int, window_max_tokens: int = 1728) -> int:
    x = step / num_iterations
    assert 0 <= x <= 1, f"step {step} outside 0..{num_iterations}"
    return math.ceil(max(window_max_tokens * x, 1) / BLOCK_SIZE)


def get_muon_momentum(step: int, warmup: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    frac = min(step / warmup, 1)
    return (1 - frac) * start + frac * end


# -----------------------------------------------------------------------------------------------
# Data (§8)


def load_data_shard(path) -> Tensor:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} does not exist")
    size = path.stat().st_size
    if size < HEADER_INTS * 4:
        raise ValueError(f"shard {path}: {size} bytes, shorter than the {HEADER_INTS * 4}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"shard {path}: magic {header[0]}, expected {SHARD_MAGIC}")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"shard {path}: version {header[1]}, expected {SHARD_VERSION}")
    n = int(header[2])
    if size != HEADER_INTS * 4 + 2 * n:
        raise ValueError(f"shard {path}: header says {n} tokens ({HEADER_INTS * 4 + 2 * n} bytes), file has {size} bytes")
    tokens = np.fromfile(path, dtype="<u2", count=n, offset=HEADER_INTS * 4)
    return torch.from_numpy(tokens.astype(np.int32))


def find_batch_starts(tokens: Tensor, pos: int, seq_len: int, num_seqs: int, max_span: int) -> tuple[list[int], int]:
    """BOS-aligned starts (§8): each next start is the first BOS at or after previous + seq_len.
    Returns the starts and the span to advance (to the BOS that closed the last window)."""
    bos = (torch.nonzero(tokens[pos:pos + max_span] == BOS_ID).squeeze(-1) + pos).tolist()
    starts = []
    if bos:
        start = bos[0]
        for e in bos[1:]:
            if e - start >= seq_len:
                starts.append(start)
                if len(starts) == num_seqs:
                    return starts, e - pos
                start = e
    raise ValueError(f"found {len(starts)} of {num_seqs} BOS-aligned sequences of {seq_len} tokens in the "
                     f"{max_span}-token search span at position {pos}: a document longer than the span, or too few BOS")


def distributed_data_generator(pattern: str, seq_len: int, num_seqs: int, rank: int = 0, world_size: int = 1,
                               align_to_bos: bool = True, cycle: bool = False, max_span: int | None = None):
    """Yields, per step, this rank's num_seqs // world_size sequences as (inputs int32, targets
    int64); rank r takes the contiguous chunk r of the step's num_seqs sequences. The BOS search
    span is the record's 2 * num_seqs * seq_len unless given (short sequences on long-document
    data need more: the record's span assumes seq_len >> document length)."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no shard matches {pattern!r}")
    if num_seqs % world_size:
        raise ValueError(f"{num_seqs} sequences per step do not divide by world size {world_size}")
    local = num_seqs // world_size
    if max_span is None or not align_to_bos:
        max_span = (2 if align_to_bos else 1) * num_seqs * seq_len
    file_idx, pos = 0, 0
    tokens = load_data_shard(files[0])
    while True:
        if pos + max_span + 1 >= len(tokens):  # tail rule (§8): drop the rest, next shard
            file_idx += 1
            if file_idx == len(files):
                if not cycle:
                    raise DataExhausted(f"training data exhausted after {len(files)} shard(s) of {pattern!r}")
                file_idx = 0
            tokens, pos = load_data_shard(files[file_idx]), 0
            if pos + max_span + 1 >= len(tokens):
                raise ValueError(f"shard {files[file_idx]} ({len(tokens)} tokens) is too short for one batch "
                                 f"of {num_seqs} x {seq_len} tokens (needs > {max_span + 1})")
        if align_to_bos:
            starts, span = find_batch_starts(tokens, pos, seq_len, num_seqs, max_span)
        else:
            starts, span = [pos + i * seq_len for i in range(num_seqs)], max_span
        batch = []
        for s in starts[rank * local:(rank + 1) * local]:
            buf = tokens[s:s + seq_len + 1]
            batch.append((buf[:-1].to(torch.int32), buf[1:].to(torch.int64)))
        pos += span
        yield batch


class DataExhausted(RuntimeError):
    """The training files ran out (no cycling, as in the record)."""


# -----------------------------------------------------------------------------------------------
# Settings and presets (§2). The CLI overrides any field: --num_iterations 30.


@dataclass
class Hyperparameters:
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"
    vocab_size: int = 50257
    num_layers: int = 12
    num_heads: int = 6
    model_dim: int = 768
    head_dim: int = 128
    max_seq_len: int = 4 * 64 * 1024
    seq_len: int = 48 * 1024
    seqs_per_step: int = 8
    val_seq_len: int = 4 * 64 * 1024
    val_tokens: int = 10485760
    num_iterations: int = 1750
    cooldown_frac: float = 0.45
    lr_floor: float = 0.1
    val_loss_every: int = 125
    warmup_steps: int = 10
    bos_search_span: int = 0  # 0: the record's 2 * seqs_per_step * seq_len (§8)
    window_max_tokens: int = 1728
    adam_lr_embed: float = 0.6
    adam_lr_head: float = 0.22
    adam_lr_scalars: float = 0.04
    adam_betas: tuple = (0.8, 0.95)
    adam_eps: float = 1e-10
    muon_lr: float = 0.05
    muon_momentum_start: float = 0.85
    muon_momentum_end: float = 0.95
    muon_momentum_warmup: int = 300
    ns_steps: int = 5
    precision: str = "record"
    compile: str = "auto"  # auto: compile on CUDA, eager on CPU
    device: str = "auto"
    cycle_train_files: bool = False
    seed: int | None = None  # the record has none (§11.18)
    init_state: str = ""  # a state dict to start from (parity harnesses inject their own init)
    save_checkpoint: str = ""
    log_file: str = ""
    train_loss_every: int = 0  # >0: also log the step's mean per-token train loss (a host sync; parity runs)


PRESETS = {
    "record26": {},
    # design.md tiny preset: L=6, 2 heads of 64, d=128, 1024-token sequences, 8 per step. fp32:
    # bf16 matmuls are ~8x slower than fp32 on CPUs without bf16 units (use --precision record).
    "tiny": dict(precision="fp32", train_files="../shared/data/gutenberg/train_*.bin", val_files="../shared/data/gutenberg/val_*.bin",
                 num_layers=6, num_heads=2, model_dim=128, head_dim=64, max_seq_len=4096, seq_len=1024,
                 val_seq_len=4096, val_tokens=32768, num_iterations=60, val_loss_every=20, warmup_steps=0,
                 window_max_tokens=512, muon_momentum_warmup=10, seed=0, bos_search_span=65536),
}


def parse_args(argv=None) -> Hyperparameters:
    p = argparse.ArgumentParser(description="PyTorch reference of modded-nanogpt record #26. "
                                "Preset 'record26' is the record; 'tiny' trains on a CPU in minutes.")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="record26 where CUDA is present, else tiny")
    p.add_argument("--data", default=None, help="a folder of shards: sets train_files=DIR/*train*.bin, val_files=DIR/*val*.bin")
    for f in dataclasses.fields(Hyperparameters):
        kind = f.type if isinstance(f.type, type) else str
        if f.name == "adam_betas":
            p.add_argument("--adam_betas", type=float, nargs=2, default=None)
        elif f.name in ("cycle_train_files",):
            p.add_argument(f"--{f.name}", action="store_true", default=None)
        else:
            conv = {"int": int, "float": float, "str": str, "int | None": int}.get(str(f.type), kind)
            p.add_argument(f"--{f.name}", type=conv, default=None)
    a = p.parse_args(argv)
    name = a.preset or ("record26" if torch.cuda.is_available() else "tiny")
    hp = Hyperparameters(**PRESETS[name])
    if a.data:
        hp.train_files, hp.val_files = os.path.join(a.data, "*train*.bin"), os.path.join(a.data, "*val*.bin")
    for f in dataclasses.fields(Hyperparameters):
        v = getattr(a, f.name)
        if v is not None:
            setattr(hp, f.name, tuple(v) if f.name == "adam_betas" else v)
    check_settings(hp)
    return hp


def check_settings(hp: Hyperparameters, world_size: int = 1) -> None:
    """Settings that cannot work fail here, naming the setting (design.md, Errors)."""
    for name in ("seq_len", "val_seq_len"):
        if getattr(hp, name) % BLOCK_SIZE:
            raise ValueError(f"{name}={getattr(hp, name)} is not a multiple of {BLOCK_SIZE} (attention blocks)")
    if hp.seqs_per_step % world_size:
        raise ValueError(f"world size {world_size} does not divide seqs_per_step={hp.seqs_per_step}")
    if hp.val_tokens % (world_size * hp.val_seq_len):
        raise ValueError(f"val_tokens={hp.val_tokens} is not a multiple of world size x val_seq_len "
                         f"({world_size} x {hp.val_seq_len})")
    for rows, what in ((-(-hp.vocab_size // 128) * 128, "padded vocab"), (num_scalars(hp.num_layers), "scalars")):
        if rows % world_size:
            raise ValueError(f"world size {world_size} does not divide the {rows} rows of the {what} (DistAdam shards rows)")
    if max(hp.seq_len, hp.val_seq_len) > hp.max_seq_len:
        raise ValueError(f"max_seq_len={hp.max_seq_len} is shorter than seq_len/val_seq_len")
    if hp.precision not in PRECISIONS:
        raise ValueError(f"precision={hp.precision!r}: choose one of {PRECISIONS}")


# -----------------------------------------------------------------------------------------------
# Training (§9, §10)


def main(argv=None) -> float:
    hp = parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = hp.device == "cuda" or (hp.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    check_settings(hp, world_size)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    master = rank == 0
    log_f = open(hp.log_file, "a") if hp.log_file and master else None

    def print0(s: str):
        if master:
            print(s, flush=True)
            if log_f:
                print(s, file=log_f, flush=True)

    for f in (hp.train_files, hp.val_files):
        if not glob.glob(f):
            raise FileNotFoundError(f"no shard matches {f!r} (use --data DIR or --train_files/--val_files)")
    if hp.seed is not None:
        torch.manual_seed(hp.seed)
    compile_model = hp.compile == "yes" or (hp.compile == "auto" and use_cuda)
    print0(f"run {uuid.uuid4()} | torch {torch.__version__} | device {device} x{world_size} | "
           f"precision {hp.precision} | compiled {compile_model}")

    model = GPT(hp.vocab_size, hp.num_layers, hp.num_heads, hp.model_dim, hp.max_seq_len, head_dim=hp.head_dim,
                precision=hp.precision)
    if hp.init_state:
        load_checkpoint(model, hp.init_state)
    model = model.to(device)
    if world_size > 1:
        for p in model.parameters():
            dist.broadcast(p.detach(), 0)
    optimizers = build_optimizers(model, hp)
    net = torch.compile(model, dynamic=False) if compile_model else model

    def window(step):
        return get_window_size_blocks(step, hp.num_iterations, hp.window_max_tokens)

    def train_step(batch, step, lr_f, momentum):
        total = torch.zeros((), device=device)
        for inputs, targets in batch:  # one backward per sequence (§6)
            loss = net(inputs.to(device), targets.to(device), window_arg(window(step)))
            loss.backward()
            total += loss.detach().float() / targets.numel()
        if len(batch) > 1:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.div_(len(batch))  # mean over the step's sequences, as the ranks' AVG
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_f
        for group in optimizers[1].param_groups:
            group["momentum"] = momentum
        for opt in optimizers:  # Adam, then Muon (§7)
            opt.step()
        model.zero_grad(set_to_none=True)
        return total / len(batch)

    def window_arg(w):
        return torch.tensor(w, dtype=torch.int32, device=device) if use_cuda else w

    def train_batches():
        return distributed_data_generator(hp.train_files, hp.seq_len, hp.seqs_per_step, rank, world_size,
                                          align_to_bos=True, cycle=hp.cycle_train_files,
                                          max_span=hp.bos_search_span or None)

    def sync():
        if use_cuda:
            torch.cuda.synchronize()

    if hp.warmup_steps:  # §10.3: compile untimed, then restore the initial state
        saved = dict(model=copy.deepcopy(model.state_dict()), opts=[copy.deepcopy(o.state_dict()) for o in optimizers])
        loader = train_batches()
        for _ in range(hp.warmup_steps):
            train_step(next(loader), 1, 1.0, hp.muon_momentum_end)
        model.load_state_dict(saved["model"])
        for opt, s in zip(optimizers, saved["opts"]):
            opt.load_state_dict(s)
        del loader, saved

    loader = train_batches()
    train_ms, val_loss = 0.0, float("nan")
    sync()
    t0 = time.perf_counter()
    for step in range(hp.num_iterations + 1):
        last = step == hp.num_iterations
        if last or (hp.val_loss_every > 0 and step % hp.val_loss_every == 0):
            sync()
            train_ms += 1000 * (time.perf_counter() - t0)
            val_loss = evaluate(net, hp, window_arg(window(step)), rank, world_size, device)
            print0(f"step:{step}/{hp.num_iterations} val_loss:{val_loss:.4f} train_time:{train_ms:.0f}ms "
                   f"step_avg:{train_ms / max(step, 1):.2f}ms")
            model.train()
            sync()
            t0 = time.perf_counter()
        if last:
            break
        lr_f = get_lr(step, hp.num_iterations, hp.cooldown_frac, hp.lr_floor)
        momentum = get_muon_momentum(step, hp.muon_momentum_warmup, hp.muon_momentum_start, hp.muon_momentum_end)
        loss = train_step(next(loader), step, lr_f, momentum)
        if hp.train_loss_every and (step + 1) % hp.train_loss_every == 0:
            if world_size > 1:
                dist.all_reduce(loss)
                loss /= world_size
            print0(f"step:{step + 1}/{hp.num_iterations} train_loss:{loss.item():.6f}")
        approx = train_ms + 1000 * (time.perf_counter() - t0)  # no sync, as the record (§1)
        print0(f"step:{step + 1}/{hp.num_iterations} train_time:{approx:.0f}ms step_avg:{approx / (step + 1):.2f}ms")
    if use_cuda:
        print0(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 1024 // 1024} MiB "
               f"reserved: {torch.cuda.max_memory_reserved() // 1024 // 1024} MiB")
    else:
        import resource
        print0(f"peak host memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")
    if hp.save_checkpoint and master:
        tmp = hp.save_checkpoint + ".tmp"
        torch.save(dict(step=hp.num_iterations, model=model.state_dict(),
                        optimizers=[o.state_dict() for o in optimizers]), tmp)
        os.replace(tmp, hp.save_checkpoint)
        print0(f"saved {hp.save_checkpoint}")
    if world_size > 1:
        dist.destroy_process_group()
    return val_loss


@torch.no_grad()
def evaluate(net, hp: Hyperparameters, window, rank: int, world_size: int, device) -> float:
    """§9: mean of per-slice mean CE over the first val_tokens tokens, unaligned slices, bf16 head."""
    net.eval()
    steps = hp.val_tokens // (world_size * hp.val_seq_len)
    loader = distributed_data_generator(hp.val_files, hp.val_seq_len, world_size, rank, world_size, align_to_bos=False)
    total = torch.zeros((), device=device, dtype=torch.float64)
    for _ in range(steps):
        (inputs, targets), = next(loader)
        total += net(inputs.to(device), targets.to(device), window).double()
    total /= steps
    if world_size > 1:
        dist.all_reduce(total)
        total /= world_size
    return float(total)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, DataExhausted) as e:
        sys.exit(f"error: {e}")
