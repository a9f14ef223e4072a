"""The FP8 head matmul of record #26 (record26 §5.9, §11.9) as a jax.custom_vjp.

    forward:  X8 = e4m3fn(clip(x / x_s, +-448)),  W8 = e4m3fn(clip(w / w_s, +-448))
              out = bf16((X8 . W8^T in fp32) * alpha),  alpha = fp32(x_s) * fp32(w_s)
    backward: G8 = e5m2(clip(g / grad_s, +-57344))
              grad_x = bf16((G8 . W8 in fp32) * (fp32(grad_s) * fp32(w_s)))
              grad_w = fp32((G8^T . X8 in fp32) * (fp32(x_s) * fp32(grad_s)))   (= (X8^T G8)^T)

The matmuls are `lax.dot_general` on the fp8 operands with preferred_element_type=float32: on
H100 XLA lowers them to a cuBLASLt FP8 GEMM (`__cublas$lt$matmul$f8`, three per step, checked
on jax 0.11.2), on CPU it upcasts and accumulates in fp32.
Only X8 and W8 are saved for the backward pass, as the record does.

Two numerical choices, both deliberate:

* Clip before the cast: ml_dtypes/XLA turn e4m3 overflow into NaN and e5m2 overflow into inf,
  where the record's sm_90 cast saturates (record26 §11.9).
* The quotient x / s is computed as x * fp32(1/s). XLA rewrites division by a broadcast scalar
  into that multiplication anyway (observed on CPU), so writing it out makes the quantisation the
  same on every backend. It differs from true division by at most one fp32 ulp of the quotient,
  which changes the fp8 value only when the quotient sits on an fp8 rounding midpoint.
"""
from __future__ import annotations

import functools
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jgpt.rounding import pinned_f32, round_to

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
E5M2_MAX = 57344.0  # largest finite float8_e5m2


def scaled_clip(x: jax.Array, scale: float, dtype) -> jax.Array:
    """clip(x_f32 / scale, +-max of the fp8 dtype) in fp32: quantize before its final cast."""
    top = E4M3_MAX if jnp.dtype(dtype) == jnp.float8_e4m3fn else E5M2_MAX
    inv = np.float32(1.0) / np.float32(scale)
    return jnp.clip(x.astype(jnp.float32) * inv, -top, top)


def quantize(x: jax.Array, scale: float, dtype) -> jax.Array:
    """fp8(clip(x_f32 / scale, +-max)) with saturation instead of NaN/inf (record26 §11.9), of
    x as rounded to its own dtype. The head's x is the final norm's bf16 output, which XLA on
    GPUs fuses into this quantisation: without the pin it quantised the norm's unrounded fp32
    output (1.3% of X8 moves); the record quantises the bf16 tensor its norm wrote (its FP8
    matmul is a custom op, §5.9). (Not inside the Pallas kernels: Triton keeps their
    roundings, and Pallas's Triton lowering has no reduce_precision.)"""
    return scaled_clip(pinned_f32(x), scale, dtype).astype(dtype)


def _alpha(a: float, b: float) -> np.float32:
    # one fp32 scale factor, the product of the two fp32-rounded scales (record26 §5.9)
    return np.float32(a) * np.float32(b)


def _dot(a, b, contract_a: int, contract_b: int, precision) -> jax.Array:
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


# On H100, XLA's cuBLASLt FP8 GEMM uses fast (reduced-precision) accumulation at precision
# DEFAULT and full fp32 accumulation at HIGH/HIGHEST (measured: max error 5e-4 vs 3e-5 of the
# sum of |terms|). The record uses fast accumulation in the forward only (record26 §5.9).
FWD_PRECISION = lax.Precision.DEFAULT
BWD_PRECISION = lax.Precision.HIGHEST

@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def fp8_matmul(x: jax.Array, w: jax.Array, x_s: float, w_s: float, grad_s: float) -> jax.Array:
    """x [T, d] (bf16) @ w[V, d]^T through FP8 with static scales; returns bf16 [T, V].

    Gradients: grad_x in x's dtype, grad_w in w's dtype (fp32 master weight)."""
    out, _ = _fwd(x, w, x_s, w_s, grad_s)
    return out


def _fwd(x, w, x_s, w_s, grad_s):
    prod, res = fwd_f32(x, w, x_s, w_s)
    return prod.astype(jnp.bfloat16), res


def fwd_f32(x, w, x_s, w_s):
    """The forward product before its bf16 rounding: fp32 (X8 . W8^T) * alpha, and the
    residuals of the backward. On H100 this is what the cuBLASLt FP8 GEMM writes (XLA folds
    alpha into it but not the bf16 cast; its GEMM rewriter gives a bf16 output only for bf16
    dequantised operands, whose bf16 scales would change alpha), so a consumer that reads the
    product anyway (jgpt.head_gpu.lse_and_z) can do the rounding itself."""
    res = quantized(x, w, x_s, w_s)
    return _dot(res[0], res[1], 1, 1, FWD_PRECISION) * _alpha(x_s, w_s), res


def quantized(x, w, x_s, w_s):
    """X8 [T, d], W8 [V, d] (e4m3fn) and the primal dtypes: the forward's operands and the
    residuals of the backward."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"fp8_matmul needs x [T, d] and w [V, d], got {x.shape} and {w.shape}")
    x8 = quantize(x, x_s, jnp.float8_e4m3fn)
    w8 = quantize(w, w_s, jnp.float8_e4m3fn)
    # zero-size arrays carry the primal dtypes for the cotangents
    return x8, w8, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype)


@functools.lru_cache(maxsize=None)
def alpha_factors(x_s: float, w_s: float) -> tuple[float, float, float]:
    """Three bf16 values whose product (exact in fp32: three 8-bit significands) is closest to
    alpha = fp32(x_s) * fp32(w_s). See fwd_bf16: cuBLASLt writes a bf16 product only when each
    scale it applies is a bf16 value. For the record's scales alpha's 24-bit significand has the
    odd part 3 * 5^2 * 23 * 37 * 223, which no three 8-bit factors give; the best product is
    2.1e-7 (relative) above alpha."""
    alpha = float(_alpha(x_s, w_s))
    m, e = math.frexp(alpha)  # alpha = m * 2^e, 0.5 <= m < 1
    best = None
    for s1 in range(128, 256):
        for s2 in range(s1, 256):
            for k in range(21, 26):  # s1 s2 s3 / 2^k in [0.5, 1) for some s3 in [128, 256)
                s3 = round(m * 2 ** k / (s1 * s2))
                if 128 <= s3 < 256:
                    err = abs(s1 * s2 * s3 / 2 ** k - m)
                    if best is None or err < best[0]:
                        best = (err, s1, s2, s3, k)
    _, s1, s2, s3, k = best
    # s1 / 2^7 * s2 / 2^7 * s3 * 2^(e + 14 - k) = (s1 s2 s3 / 2^k) 2^e: 8-bit significands, bf16-exact
    return s1 / 128, s2 / 128, math.ldexp(s3, e + 14 - k)


def fwd_bf16(x, w, x_s, w_s, *, emulate: bool):
    """z = bf16((X8 . W8^T) * alpha3), alpha3 = the product of alpha_factors (alpha to 2.1e-7),
    written by cuBLASLt as bf16: no fp32 product in memory (2 x 1.6 GB of traffic per
    8,192-token chunk of the head). Not the record's exact alpha: the z entries within 2.1e-7 of
    a bf16 rounding boundary round one step apart (4.5e-5 of them in tests/test_fp8.py).

    On GPUs XLA's GEMM rewriter turns `dot(bf16(X8) * f1, bf16(W8) * f2) -> bf16, * f3` into one
    FP8 cuBLASLt call with scales f1, f2 and alpha f3 (bf16 values, applied in fp32 to the fp32
    accumulator). Evaluated literally, that form would round the dequantised operands to bf16:
    `emulate` (the CPU) computes what the GPU call does instead, the fp32 product times alpha3
    rounded once to bf16. tests/test_fp8.py checks the GPU form against the emulation."""
    res = quantized(x, w, x_s, w_s)
    x8, w8 = res[:2]
    f1, f2, f3 = alpha_factors(float(x_s), float(w_s))
    if emulate:
        return (_dot(x8, w8, 1, 1, FWD_PRECISION) * np.float32(f1 * f2 * f3)).astype(jnp.bfloat16), res
    bf = jnp.bfloat16
    z = lax.dot_general(x8.astype(bf) * bf(f1), w8.astype(bf) * bf(f2), (((1,), (1,)), ((), ())),
                        precision=FWD_PRECISION, preferred_element_type=bf)
    return z * bf(f3), res


def _bwd(x_s, w_s, grad_s, res, g):
    return bwd_e5m2(x_s, w_s, grad_s, res, quantize(g, grad_s, jnp.float8_e5m2))


def bwd_e5m2(x_s, w_s, grad_s, res, g8, g8t=None):
    """The two backward GEMMs from the quantised gradient G8 [T, V]; g8t = G8^T [V, T] when the
    caller already has it (jgpt.head_gpu writes both layouts; else XLA transposes G8)."""
    x8, w8, x_proto, w_proto = res
    # the record's grad_x is a bf16 GEMM output; pinned, as the final norm's backward reads it in
    # fp32 and XLA on GPUs may otherwise hand it the fp32 product (jgpt.rounding)
    grad_x = round_to(_dot(g8, w8, 1, 0, BWD_PRECISION) * _alpha(grad_s, w_s), x_proto.dtype).astype(x_proto.dtype)
    gw = _dot(g8, x8, 0, 0, BWD_PRECISION) if g8t is None else _dot(g8t, x8, 1, 0, BWD_PRECISION)
    grad_w = (gw * _alpha(x_s, grad_s)).astype(w_proto.dtype)
    return grad_x, grad_w


fp8_matmul.defvjp(_fwd, _bwd)


def fp8_linear(x: jax.Array, w: jax.Array, x_s: float, w_s: float, grad_s: float) -> jax.Array:
    """fp8_matmul over the last axis of x [..., d], for activations with leading axes."""
    lead = x.shape[:-1]
    out = fp8_matmul(x.reshape(-1, x.shape[-1]), w, x_s, w_s, grad_s)
    return out.reshape(*lead, w.shape[0])
