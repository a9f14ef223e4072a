"""The GPT of record #26: parameters and the forward pass (record26 §3-§5).

Parameters are a flat dict keyed by the record's state-dict names, with the record's (out, in)
layouts (design.md convention 1), so a torch state dict converts by changing the array type only:

    embed.weight [Vp, d]                 value_embeds.{k}.weight [Vp, d]
    blocks.{i}.attn.qkv_w [3, hdim, d]   blocks.{i}.attn.c_proj.weight [d, hdim]   (attention layers)
    blocks.{i}.mlp.c_fc.weight [4d, d]   blocks.{i}.mlp.c_proj.weight [d, 4d]
    lm_head.weight [Vp, d]               scalars [num_scalars]

Precision is a policy (design.md convention 3), chosen per call:

* "record": bf16 embeddings (parameters) and residual stream; fp32 master weights cast to bf16 at
  each matmul (fp32 accumulation); rms_norm, rotary, softmax and the lambda mixes computed in fp32
  and rounded once to bf16, as the compiled record fuses them (record26 §11.1); FP8 head in
  training, bf16 head in eval (§5.9, §11.9).
* "fp32": every activation fp32, matmuls at precision HIGHEST, no FP8.
* "fp64": everything float64 (the caller enables jax_enable_x64), no FP8.

The pieces (rms_norm, attention_layer, mlp, block, head) take activations whose dtype carries
the policy (bf16 = record, fp32, fp64), so parity tests can call each one in isolation.
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jgpt import attention as attn
from jgpt import norm_gpu, qkv_gpu
from jgpt.config import RMS_EPS, ModelConfig
from jgpt.fp8 import fp8_linear
from jgpt.head_loss import fp8_head_loss
from jgpt.rounding import round_to

POLICIES = {"record": jnp.bfloat16, "fp32": jnp.float32, "fp64": jnp.float64}


def compute_dtype(policy: str):
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r}: choose one of {tuple(POLICIES)}")
    dtype = POLICIES[policy]
    if dtype == jnp.float64 and jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64:
        raise ValueError("policy 'fp64' needs 64-bit JAX: jax.config.update('jax_enable_x64', True) "
                         "(or `with jax.enable_x64(True):`) before building params and calling forward")
    return dtype


# ------------------------------------------------------------------------------------------------
# Parameters (record26 §3)


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name and shape, in the record's construction order."""
    d, hdim, vp = cfg.model_dim, cfg.attn_dim, cfg.vocab_padded
    shapes = {"embed.weight": (vp, d)}
    for k in range(cfg.num_value_embeds):
        shapes[f"value_embeds.{k}.weight"] = (vp, d)
    for i in range(cfg.num_layers):
        if i not in cfg.attn_free:
            shapes[f"blocks.{i}.attn.qkv_w"] = (3, hdim, d)
            shapes[f"blocks.{i}.attn.c_proj.weight"] = (d, hdim)
        shapes[f"blocks.{i}.mlp.c_fc.weight"] = (cfg.mlp_ratio * d, d)
        shapes[f"blocks.{i}.mlp.c_proj.weight"] = (d, cfg.mlp_ratio * d)
    shapes["lm_head.weight"] = (vp, d)
    shapes["scalars"] = (cfg.num_scalars,)
    return shapes


def is_embedding(name: str) -> bool:
    return name == "embed.weight" or name.startswith("value_embeds.")


def param_dtype(name: str, policy: str):
    """Parameter dtype under a policy: the record keeps embeddings bf16, the rest fp32 (§3)."""
    dtype = compute_dtype(policy)
    if policy == "record":
        return jnp.bfloat16 if is_embedding(name) else jnp.float32
    return dtype


def init_scalars(cfg: ModelConfig) -> np.ndarray:
    """L skip weights (1), (1, 0) block lambdas and (0.5, 0.5) attention lambdas per layer, then a
    pad of ones to a multiple of 8 (record26 §3)."""
    L = cfg.num_layers
    parts = [np.ones(L), np.tile([1.0, 0.0], L), np.tile([0.5, 0.5], L), np.ones(cfg.num_scalars - 5 * L)]
    return np.concatenate(parts).astype(np.float32)


def init_params(cfg: ModelConfig, key: jax.Array, policy: str = "record") -> dict[str, jax.Array]:
    """The record's init distributions (record26 §3), drawn in fp32, then cast to the policy's
    parameter dtypes: embeddings N(0, 1); qkv_w and c_fc U(-a, a), a = sqrt(3) * 0.5 / sqrt(in);
    both c_proj and lm_head zero; scalars as init_scalars. (The record draws and then zeroes the
    zero-initialised weights; bitwise init parity is impossible anyway, §3.)"""
    params = {}
    for n, (name, shape) in enumerate(param_shapes(cfg).items()):
        k = jax.random.fold_in(key, n)
        if is_embedding(name):
            w = jax.random.normal(k, shape, jnp.float32)
        elif name.endswith("qkv_w") or name.endswith("c_fc.weight"):
            a = math.sqrt(3) * 0.5 / math.sqrt(shape[-1])
            w = jax.random.uniform(k, shape, jnp.float32, -a, a)
        elif name == "scalars":
            w = jnp.asarray(init_scalars(cfg))
        else:
            w = jnp.zeros(shape, jnp.float32)
        params[name] = w.astype(param_dtype(name, policy))
    return params


def num_params(params) -> int:
    return sum(int(np.prod(p.shape)) for p in params.values())


# ------------------------------------------------------------------------------------------------
# Pieces


def rms_norm(x: jax.Array, eps: float = RMS_EPS) -> jax.Array:
    """x * (mean(x^2) + eps)^-1/2 over the last axis, computed in fp32 (fp64 for fp64 x) with
    eps = 2^-23 and cast back to x's dtype (record26 §5, §11.2)."""
    return rms_normed(x, eps).astype(x.dtype)


def rms_normed(x: jax.Array, eps: float = RMS_EPS) -> jax.Array:
    """rms_norm before its rounding: in fp32 (fp64 for fp64 x)."""
    xf = x.astype(attn.acc_dtype(x.dtype))
    return xf * _rstd(xf, eps)


def _rstd(xf: jax.Array, eps: float = RMS_EPS) -> jax.Array:
    return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def sum_norm(s: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """(s, rms_norm(s)), each rounded once to `dtype`, for an fp32 (fp64) residual sum s that the
    compiled record computes in the same kernel as the norm (record26 §11.1; the stored sum's
    rounding is pinned, jgpt.rounding).

    The backward is the one torch's autograd runs: it saved the stored (rounded) sum and the
    norm's fp32 1/rms, not the fp32 sum, and differentiates the norm at the stored values. It
    also keeps XLA from holding every layer's fp32 sum for the backward pass (1.2 GiB more peak
    memory at the record's size on an H100 with autodiff's residuals, BENCHMARKS.md session 7)."""
    return _sum_norm_fwd(s, dtype)[0]


def _sum_norm_fwd(s, dtype):
    r = _rstd(s)  # s * r is rms_normed(s): s is already in the accumulation dtype
    stored = round_to(s, dtype).astype(dtype)
    return (stored, (s * r).astype(dtype)), (stored, r)


def _sum_norm_bwd(dtype, res, g):
    stored, r = res
    g_stored, g_normed = (c.astype(r.dtype) for c in g)
    st = stored.astype(r.dtype)
    # d(s r)/ds for r = (mean(s^2) + eps)^-1/2: r g - r^3 s mean(g s)
    return (g_stored + r * g_normed - r * r * r * st * jnp.mean(g_normed * st, axis=-1, keepdims=True),)


sum_norm.defvjp(_sum_norm_fwd, _sum_norm_bwd)


# How a GEMM's rounded product reaches its consumers (record26 §11.1: the record's cuBLAS GEMMs
# write bf16 tensors, and the next kernel reads those). "convert": the dot writes its fp32 (fp64)
# accumulator and a convert rounds it; "narrow": the dot itself emits `dtype`. Unpinned, each
# backend's XLA dropped the rounding in one of the two forms where an fp32 consumer follows (the
# MLP's c_proj product into the block's fp32 sum, scripts/rounding_audit.py's GEMM rows): on an
# H100 the convert form (its Triton GEMM fusion handed the fp32 product on; the narrow form too,
# at 1,024 tokens), on the CPU the narrow form (rewritten as an fp32 dot and a convert). _matmul
# therefore pins the rounding in both; the form decides the GEMM: on GPUs the narrow dot is a
# cuBLASLt GEMM writing bf16 at the record's size, as in the record, 3% faster than the Triton
# fusions (BENCHMARKS.md session 8). "auto": narrow on GPUs, convert elsewhere.
GEMM_OUTS = ("auto", "convert", "narrow")
DEFAULT_GEMM_OUT = "auto"
GEMM_OUT = DEFAULT_GEMM_OUT


def gemm_out() -> str:
    """GEMM_OUT resolved for jax's default backend ("convert" or "narrow")."""
    if GEMM_OUT != "auto":
        return GEMM_OUT
    return "narrow" if jax.default_backend() == "gpu" else "convert"


def check_choice(setting: str, mode: str, choices: tuple[str, ...]) -> str:
    """mode, if it is one of choices; else one ValueError naming the setting."""
    if mode not in choices:
        raise ValueError(f"{setting}={mode!r}: choose one of {choices}")
    return mode


def set_gemm_out(mode: str) -> None:
    global GEMM_OUT
    GEMM_OUT = check_choice("gemm_out", mode, GEMM_OUTS)


def _matmul(a, b, contract_a, contract_b, dtype, pin: bool = True) -> jax.Array:
    """a . b over the given axes, accumulated in fp32 (fp64), rounded once to `dtype`. pin=False
    only where every reader of the product is a kernel reading it from memory (linear's pins)."""
    acc = attn.acc_dtype(a.dtype)
    narrow = gemm_out() == "narrow" and jnp.finfo(dtype).bits < jnp.finfo(acc).bits
    out = jax.lax.dot_general(a, b, ((contract_a, contract_b), ((), ())),
                              precision=attn.matmul_precision(a.dtype),
                              preferred_element_type=dtype if narrow else acc)
    if not pin:
        return out.astype(dtype)
    # pinned in either form (GEMM_OUT's comment): where XLA fuses the GEMM with an fp32 consumer
    # it would hand on the accumulator unrounded
    return round_to(out.astype(acc), dtype).astype(dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def linear(x: jax.Array, w: jax.Array, pin_out: bool = True, pin_dx: bool = True) -> jax.Array:
    """x @ w.T with w (out, in) cast to x's dtype, accumulated in fp32 (fp64), result in x's
    dtype: the record's CastedLinear (record26 §5).

    The backward is the one torch runs for CastedLinear: both gradients are GEMMs on operands in
    x's dtype with fp32 accumulation, rounded to x's dtype (dW is the gradient of the cast weight,
    bf16 under the record policy, then widened to w's dtype). Plain autodiff of the forward
    would carry an fp32 cotangent from the widened accumulator into fp32 (TF32 on the GPU) GEMMs:
    half the tensor-core rate and twice the bytes.

    pin_out / pin_dx = False drop _matmul's rounding pin on the output / on dx where only GPU
    kernels read that tensor (from memory, so rounded): the QKV projection's output into
    jgpt.qkv_gpu, the attention output projection's dx into jgpt.attention_gpu's backward. There
    XLA cannot fuse the pin into the reader, and it cost an extra pass over each tensor
    (BENCHMARKS.md session 9)."""
    return _matmul(x, w.astype(x.dtype), (x.ndim - 1,), (1,), x.dtype, pin_out)


def _linear_fwd(x, w, pin_out, pin_dx):
    return linear(x, w, pin_out, pin_dx), (x, w)


def _linear_bwd(pin_out, pin_dx, res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = _matmul(g, w.astype(x.dtype), (g.ndim - 1,), (0,), x.dtype, pin_dx)
    lead = tuple(range(x.ndim - 1))
    # the record's dW is a bf16 GEMM output widened to the fp32 master weight's dtype; the
    # rounding is pinned so that XLA cannot hand Muon the unrounded product (jgpt.rounding)
    acc = attn.acc_dtype(x.dtype)
    dw = round_to(_matmul(g, x, lead, lead, acc), x.dtype).astype(w.dtype)
    return dx, dw


linear.defvjp(_linear_fwd, _linear_bwd)


def mix(*pairs, dtype=None) -> jax.Array:
    """sum(lam * x) over (lam, x) pairs: the fp32 lambdas multiply without promoting x; computed
    in fp32 (fp64) and rounded once to `dtype` (default: the first x's), as the compiled record
    fuses it (§11.1). An fp32 `dtype` keeps the sum unrounded for a consumer in the same fusion."""
    dtype = pairs[0][1].dtype if dtype is None else dtype
    acc = attn.acc_dtype(dtype)
    total = sum(jnp.asarray(lam).astype(acc) * x.astype(acc) for lam, x in pairs)
    return total.astype(dtype)


@jax.custom_vjp
def mix_sum(lam0, s, lam1, x0) -> jax.Array:
    """mix((lam0, s), (lam1, x0)) rounded to x0's dtype, for a block whose residual input s is the
    previous block's unrounded fp32 sum (BLOCK_SUM f32). The backward is the one torch's autograd
    runs: lam0's gradient reads the stored (rounded) sum, the tensor it saved, and XLA holds that
    bf16 tensor for the backward pass, not the fp32 sum."""
    return mix((lam0, s), (lam1, x0), dtype=x0.dtype)


def _mix_sum_fwd(lam0, s, lam1, x0):
    return mix_sum(lam0, s, lam1, x0), (lam0, lam1, round_to(s, x0.dtype).astype(x0.dtype), x0)


def _mix_sum_bwd(res, g):
    lam0, lam1, stored, x0 = res
    acc = attn.acc_dtype(x0.dtype)
    g = g.astype(acc)
    lam0, lam1 = jnp.asarray(lam0), jnp.asarray(lam1)
    return (jnp.sum(g * stored.astype(acc)).astype(lam0.dtype).reshape(lam0.shape),
            lam0.astype(acc) * g,
            jnp.sum(g * x0.astype(acc)).astype(lam1.dtype).reshape(lam1.shape),
            (lam1.astype(acc) * g).astype(x0.dtype))


mix_sum.defvjp(_mix_sum_fwd, _mix_sum_bwd)


def between_blocks_dtype(dtype):
    """The dtype of the residual sums between blocks (BLOCK_SUM) for compute dtype `dtype`."""
    return attn.acc_dtype(dtype) if BLOCK_SUM == "f32" else jnp.dtype(dtype)


def block_input(lam0, x, lam1, x0) -> jax.Array:
    """A block's first mix, lam0 x + lam1 x0 rounded to x0's dtype, where x is the stored stream
    (x0's dtype) or the previous block's fp32 sum (BLOCK_SUM f32: mix_sum)."""
    return mix((lam0, x), (lam1, x0)) if x.dtype == x0.dtype else mix_sum(lam0, x, lam1, x0)


def lambdas(params, cfg: ModelConfig, i: int):
    """Layer i's (skip weight or None, block lambdas (res, x0), attention lambdas (v, ve))."""
    s, L = params["scalars"], cfg.num_layers
    skip = s[i - L // 2] if i >= L // 2 else None
    return skip, s[L + 2 * i: L + 2 * i + 2], s[3 * L + 2 * i: 3 * L + 2 * i + 2]


def layer_window(cfg: ModelConfig, i: int, window_blocks):
    """Long layers use W blocks, the others W // 2 (record26 §5.6)."""
    return window_blocks if i in cfg.long else window_blocks // 2


def layer_max_blocks(cfg: ModelConfig, i: int, max_window_blocks: int | None) -> int | None:
    if max_window_blocks is None or i in cfg.long:
        return max_window_blocks
    return max(max_window_blocks // 2, 1)


def norm_rotary(x, cos, sin) -> jax.Array:
    """rotary(rms_norm(x)) for q or k [T, H, D] as the compiled record computes it: the norm's
    output goes into the rotation in fp32, and only the rotation's output is rounded to x's
    dtype. torch.compile fuses the two into one Triton kernel, and Inductor's Triton code keeps
    a bf16 intermediate of a fused kernel in fp32 (its `to_dtype` casts to the compute type;
    `emulate_precision_casts`, off by default, would round), so the record rounds once per stored
    tensor (record26 §11.1); eager torch would also round the norm's output."""
    return attn.apply_rotary(rms_normed(x), cos, sin).astype(x.dtype)


def qk_norm_rotary_mix(qkv, ve, rope, lam, heads: int):
    """q, k, v [T, H, D] from the merged projection's output [T, 3 H D]: QK-norm then rotary on
    q and k, v = lam[0] v (+ lam[1] ve) (record26 §5.5). Where jgpt.qkv_gpu applies (bf16 on a
    GPU) the same arithmetic runs as one kernel each way."""
    T = qkv.shape[0]
    x = qkv.reshape(T, 3 * heads, -1)
    fused, interpret = qkv_gpu.applies(T, x.shape[-1], qkv.dtype)
    if fused:
        return qkv_gpu.norm_rotary_mix(qkv, ve, *rope, lam, heads, interpret=interpret)
    q, k, v = x[:, :heads], x[:, heads:2 * heads], x[:, 2 * heads:]
    q, k = norm_rotary(q, *rope), norm_rotary(k, *rope)
    v = mix((lam[0], v)) if ve is None else mix((lam[0], v), (lam[1], ve.reshape(v.shape)))
    return q, k, v


def attention_layer(params, cfg: ModelConfig, i: int, x, ve, docs, window_blocks, *, rope=None,
                    backend: str = "blockwise", max_window_blocks: int | None = None) -> jax.Array:
    """Attn_i(x) of record26 §5.5 for a normed x [T, d]; `window_blocks` is the layer's own
    window (layer_window); rope = (cos, sin) tables, built here if None."""
    pre = f"blocks.{i}.attn."
    T, H, D = x.shape[0], cfg.num_heads, cfg.hdim_head
    qkv_w = params[pre + "qkv_w"]
    fused, interpret = qkv_gpu.applies(T, D, x.dtype)
    # merged QKV [T, 3 H D] (§5.5); unpinned where only the compiled QKV kernels read it (linear)
    qkv = linear(x, qkv_w.reshape(-1, qkv_w.shape[-1]), not fused or interpret)
    if rope is None:
        rope = attn.rotary_tables(T, D, cfg.rope_base, attn.acc_dtype(x.dtype))
    q, k, v = qk_norm_rotary_mix(qkv, ve, rope, lambdas(params, cfg, i)[2], H)
    y = attn.attention(q, k, v, docs, window_blocks, scale=cfg.attn_scale, backend=backend,
                       max_window_blocks=max_window_blocks)
    pin_dy = not attn.reads_dout_from_memory(backend, T, y.dtype)
    return linear(y.reshape(T, H * D), params[pre + "c_proj.weight"], True, pin_dy)


def mlp(params, i: int, x) -> jax.Array:
    """c_proj(relu(c_fc(x))^2), bias-free (record26 §5.4)."""
    h = linear(x, params[f"blocks.{i}.mlp.c_fc.weight"])
    return linear(jnp.square(jax.nn.relu(h)), params[f"blocks.{i}.mlp.c_proj.weight"])


def add_then_norm(x, a) -> tuple[jax.Array, jax.Array]:
    """(x + a, rms_norm(x + a)) as the compiled record computes them in one kernel: the norm
    reads the fp32 sum and the residual stream stores it rounded (record26 §11.1;
    scripts/rounding_audit.py on an H100: torch compiled keeps fp32 there, where XLA's native
    bf16 add rounded first); the backward reads the stored sum (sum_norm)."""
    fused, interpret = norm_gpu.applies(x, a)
    if fused:  # the same arithmetic as one kernel each way (jgpt.norm_gpu)
        return norm_gpu.add_norm(x, a, interpret)
    acc = attn.acc_dtype(x.dtype)
    return sum_norm(x.astype(acc) + a.astype(acc), jnp.dtype(x.dtype))


# The residual stream between blocks (record26 §11.1). "f32": the next block's mix, the U-net
# skip add before it and the final norm read the unrounded fp32 sum x + mlp(...), and only the
# stored sum (the skip, the trace) is rounded, as the compiled record's fused kernels compute it
# (scripts/rounding_audit.py's block-boundary rows); "bf16": the sum is rounded first, as eager
# torch does. jgpt.train --block_sum picks it.
BLOCK_SUMS = ("f32", "bf16")
DEFAULT_BLOCK_SUM = "f32"
BLOCK_SUM = DEFAULT_BLOCK_SUM


def set_block_sum(mode: str) -> None:
    global BLOCK_SUM
    BLOCK_SUM = check_choice("block_sum", mode, BLOCK_SUMS)


def block(params, cfg: ModelConfig, i: int, x, x0, ve, docs, window_blocks, **kw) -> jax.Array:
    """Block_i of record26 §5.4 (the U-net skip is added by the caller before it): x + mlp(...)
    as the residual stream stores it, in x0's dtype."""
    x, m = block_parts(params, cfg, i, x, x0, ve, docs, window_blocks, **kw)
    return x + m


def block_parts(params, cfg: ModelConfig, i: int, x, x0, ve, docs, window_blocks, *, rope=None,
                backend: str = "blockwise", max_window_blocks: int | None = None,
                trace=None) -> tuple[jax.Array, jax.Array]:
    """Block_i's residual input to its MLP and the MLP's output, unsummed, so that the caller can
    hand the sum to the next block in fp32 (BLOCK_SUM). x may be that fp32 sum; x0 sets the dtype."""
    lam = lambdas(params, cfg, i)[1]
    x = block_input(lam[0], x, lam[1], x0)
    if i not in cfg.attn_free:
        a = attention_layer(params, cfg, i, rms_norm(x), ve, docs, layer_window(cfg, i, window_blocks),
                            rope=rope, backend=backend,
                            max_window_blocks=layer_max_blocks(cfg, i, max_window_blocks))
        if trace is not None:
            trace[f"attn.{i}"] = a
        x, h = add_then_norm(x, a)
    else:
        h = rms_norm(x)
    m = mlp(params, i, h)
    if trace is not None:
        trace[f"mlp.{i}"] = m
    return x, m


def final_norm(x: jax.Array, dtype) -> jax.Array:
    """The head's input: rms_norm of the last block's output (fp32 under BLOCK_SUM f32), rounded
    to the compute dtype, the tensor the record's FP8 custom op reads (§5.8, §11.1); its backward
    reads the stored (rounded) output (sum_norm)."""
    return sum_norm(x.astype(attn.acc_dtype(dtype)), jnp.dtype(dtype))[1]


def head(params, cfg: ModelConfig, x, *, fp8: bool = False, dtype=None, trace=None) -> jax.Array:
    """Softcapped logits [T, Vp] in fp32 (fp64) from the last block's output x (record26 §5.8);
    dtype: the compute dtype (default x's; x is fp32 under BLOCK_SUM f32)."""
    h = final_norm(x, x.dtype if dtype is None else dtype)
    if fp8:
        z = fp8_linear(h, params["lm_head.weight"], cfg.fp8_x_s, cfg.fp8_w_s, cfg.fp8_grad_s)
    else:
        z = linear(h, params["lm_head.weight"])
    z = z.astype(attn.acc_dtype(x.dtype))
    logits = cfg.softcap * jax.nn.sigmoid(z / jnp.asarray(cfg.softcap_div * math.sqrt(cfg.model_dim), z.dtype))
    if trace is not None:
        trace.update(final_norm=h, logits_raw=z, logits=logits)
    return logits


# ------------------------------------------------------------------------------------------------
# Forward


def embedding(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table[ids]: rows of an embedding table [V, d], with the gradient torch's embedding
    backward gives the record's bf16 tables (record26 §3: embeddings bf16): the cotangent rows
    summed per token in fp32 (in the table's dtype if wider: fp32, fp64) and rounded once to the
    table's dtype. Autodiff of the gather scatter-adds in the table's dtype, i.e. in bf16 under
    the record policy, where a frequent token's row sums hundreds of bf16 terms: on an H100 that
    put the value embeddings' step gradients 8-11% (relative L2) from the reference's, against
    0.3-0.4% for ref eager vs ref compiled (scripts/gpu_grad_parity.py, BENCHMARKS.md session 3)."""
    # Inside shard_map, a table replicated over mesh axes along which ids vary gets a gradient
    # that varies along them: mark it varying first, as autodiff of the gather does implicitly
    # (the cast's transpose sums the per-device gradients). jgpt.step casts its params itself.
    extra = _varying_axes(ids) - _varying_axes(table)
    if extra:
        table = jax.lax.pcast(table, tuple(sorted(extra)), to="varying")
    # shape and dtype are static (nondiff) arguments: the backward needs no residual but ids
    return _embedding(tuple(table.shape), jnp.dtype(table.dtype), table, ids)


def _varying_axes(x) -> frozenset:
    """The manual mesh axes x varies along inside shard_map (empty outside it, or on a jax
    without manual-axis types on avals)."""
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset() if mat is None else mat.varying


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _embedding(shape, dtype, table, ids):
    return table[ids]


def _embedding_fwd(shape, dtype, table, ids):
    return table[ids], ids


def _embedding_bwd(shape, dtype, ids, g):
    acc = jnp.promote_types(dtype, jnp.float32)
    grad = jnp.zeros(shape, acc).at[ids].add(g.astype(acc))
    # rounded once to the table's dtype, pinned: the record's optimizer reads a bf16 gradient
    # (jgpt.rounding); ids: integers, no cotangent
    return round_to(grad, dtype).astype(dtype), None


_embedding.defvjp(_embedding_fwd, _embedding_bwd)


def hidden(params, cfg: ModelConfig, input_seq, window_blocks, *, policy: str = "record",
           backend: str = "blockwise", max_window_blocks: int | None = None, rope_freqs=None,
           remat: bool = False, trace=None) -> jax.Array:
    """Embedding and the U-net of blocks (record26 §5.1-§5.4): the last block's output [T, d],
    in fp32 (unrounded, for the final norm) under BLOCK_SUM f32 with a bf16 policy, else in the
    compute dtype. remat: recompute each block in the backward pass instead of storing its
    activations."""
    if remat and trace is not None:
        raise ValueError("trace records activations, which remat recomputes: use one or the other")
    dtype = compute_dtype(policy)
    input_seq = jnp.asarray(input_seq)
    if input_seq.ndim != 1:
        raise ValueError(f"input_seq must be one 1-D token sequence (vmap for batches), got {input_seq.shape}")
    T, L = input_seq.shape[0], cfg.num_layers
    docs = attn.document_ids(input_seq)
    rope = attn.rotary_tables(T, cfg.hdim_head, cfg.rope_base, attn.acc_dtype(dtype), rope_freqs)
    ves = [embedding(params[f"value_embeds.{k}.weight"], input_seq).astype(dtype) for k in range(cfg.num_value_embeds)]
    x = x0 = rms_norm(embedding(params["embed.weight"], input_seq).astype(dtype))
    if trace is not None:
        trace["x0"] = x0
    # the sums between blocks: fp32 and unrounded (BLOCK_SUM f32), or rounded to the dtype
    sum_dtype = between_blocks_dtype(dtype)
    skips = []
    for i in range(L):
        if i >= L // 2:  # U-net, LIFO (§5.3)
            x = mix((1.0, x), (lambdas(params, cfg, i)[0], skips.pop()), dtype=sum_dtype)
        ve = None if cfg.ve_layout[i] is None else ves[cfg.ve_layout[i]]
        # a Python-int window stays static (closed over), so blockwise gathers only its blocks
        run = partial(block_parts, cfg=cfg, i=i, docs=docs, window_blocks=window_blocks, rope=rope,
                      backend=backend, max_window_blocks=max_window_blocks)
        run = jax.checkpoint(run) if remat else partial(run, trace=trace)
        x_mid, m = run(params, x=x, x0=x0, ve=ve)
        x = mix((1.0, x_mid), (1.0, m), dtype=sum_dtype)
        stored = round_to(x, dtype).astype(dtype)  # the residual stream's bf16 tensor (pinned)
        if trace is not None:
            trace[f"block.{i}"] = stored
        if i < L // 2:
            skips.append(stored)
    return x


def logits(params, cfg: ModelConfig, input_seq, window_blocks, *, policy: str = "record",
           train: bool = False, trace=None, **kw) -> jax.Array:
    """Softcapped logits [T, Vp]: FP8 head only when training under the record policy (§11.9)."""
    x = hidden(params, cfg, input_seq, window_blocks, policy=policy, trace=trace, **kw)
    return head(params, cfg, x, fp8=train and policy == "record", dtype=compute_dtype(policy), trace=trace)


HEAD_LOOP = "unrolled"  # or "map" (lax.map over the chunks); a tuning switch for scripts/bench.py
HEAD_CHUNK = 8192  # forward's default head_chunk: tokens per chunk of the head, softcap and CE


def cross_entropy(logits_: jax.Array, targets) -> jax.Array:
    """Per-token CE over all padded classes (record26 §5.8), in the logits' dtype."""
    lse = jax.nn.logsumexp(logits_, axis=-1)
    picked = jnp.take_along_axis(logits_, jnp.asarray(targets)[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return lse - picked


def forward(params, cfg: ModelConfig, input_seq, target_seq, window_blocks, *, policy: str = "record",
            train: bool = True, backend: str = "blockwise", max_window_blocks: int | None = None,
            rope_freqs=None, remat: bool = False, head_chunk: int | None = HEAD_CHUNK,
            trace: dict | None = None) -> jax.Array:
    """The record's GPT.forward (record26 §4-§5): summed CE over the T tokens in training, mean
    in eval. One sequence per call: input_seq, target_seq [T] ints, T a multiple of 128.

    window_blocks: W, long layers see max(W, 1) blocks and short ones max(W // 2, 1); it may be
    a traced int32 if max_window_blocks (a static int >= W) bounds it for the blockwise backend.
    rope_freqs: override the rotary frequencies (parity tests pass the reference's buffer).
    remat: recompute each block's activations in the backward pass (less memory, ~1/3 more work).
    head_chunk: above this many tokens (when it divides T) the head, softcap and CE run over
    token chunks, each recomputed in the backward pass: the [T, 50304] fp32 logits and their
    gradients would otherwise need ~10 GB each at the record's 49,152 tokens. Rows are
    independent, so only the order of the loss sum (and of lm_head's gradient sum) changes.
    trace: a dict filled with x0, attn.{i}, mlp.{i}, block.{i}, final_norm, logits_raw, logits;
    use it outside jit, or forward_with_trace under jit."""
    fp8 = train and policy == "record"
    T = jnp.shape(input_seq)[0]
    chunked = bool(head_chunk) and T > head_chunk and T % head_chunk == 0
    dtype = compute_dtype(policy)
    if trace is None and (fp8 or chunked):
        x = hidden(params, cfg, input_seq, window_blocks, policy=policy, backend=backend,
                   max_window_blocks=max_window_blocks, rope_freqs=rope_freqs, remat=remat)
        if fp8:  # training in record precision: the fused FP8 head + CE (jgpt.head_loss)
            def chunk_loss(x_c, y_c):
                return fp8_head_loss(final_norm(x_c, dtype), params["lm_head.weight"], y_c, cfg)
        else:
            @jax.checkpoint
            def chunk_loss(x_c, y_c):
                return jnp.sum(cross_entropy(head(params, cfg, x_c, dtype=dtype), y_c))
        if not chunked:
            return chunk_loss(x, jnp.asarray(target_seq))

        ys = jnp.asarray(target_seq)
        # chunks unrolled, not a scan: a scan would stack every chunk's saved bf16 logits in one
        # buffer it first zero-fills (4.9 GB at the record's size), and inside shard_map a fresh
        # zero carry would not be device-varying like the chunk losses (jax 0.11 checks this)
        if HEAD_LOOP == "map":
            xs, ys2 = x.reshape(T // head_chunk, head_chunk, -1), ys.reshape(T // head_chunk, head_chunk)
            parts = list(jax.lax.map(lambda xy: chunk_loss(*xy), (xs, ys2)))
        else:
            parts = [chunk_loss(x[c:c + head_chunk], ys[c:c + head_chunk]) for c in range(0, T, head_chunk)]
        total = sum(p.astype(attn.acc_dtype(x.dtype)) for p in parts)
        return total if train else total / T
    z = logits(params, cfg, input_seq, window_blocks, policy=policy, train=train, trace=trace,
               backend=backend, max_window_blocks=max_window_blocks, rope_freqs=rope_freqs, remat=remat)
    ce = cross_entropy(z, target_seq)
    return jnp.sum(ce) if train else jnp.mean(ce)


def forward_with_trace(params, cfg: ModelConfig, input_seq, target_seq, window_blocks, **kw):
    """forward that returns (loss, trace dict): the jit-friendly way to get activations."""
    trace: dict = {}
    loss = forward(params, cfg, input_seq, target_seq, window_blocks, trace=trace, **kw)
    return loss, trace
