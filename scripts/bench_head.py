"""Time the training head's pieces on one record-size chunk (8,192 tokens x 50,304 classes).

    python scripts/bench_head.py                     # default and a sweep of kernel tiles
    python scripts/bench_head.py --tiles 16,512,4,64,128,4 32,512,8,64,128,8

Rows: the forward FP8 GEMM (fp32 product; + bf16 cast; bf16 written by cuBLASLt, fp8.fwd_bf16), z
and the row LSE from the product (XLA fusions vs the jgpt.head_gpu kernel per tile setting), the
LSE from a bf16 z (the kernel that follows fwd_bf16), the e5m2 gradient in both layouts (XLA vs
kernel), both kernels with the base-2 exp (head_gpu.EXP = "fast"), and the whole fused head (jgpt.head_loss, forward + backward) per configuration. Each
row: ms per call (mean of --iters after warm-up).
jgpt only: the reference's head is inside its compiled step (scripts/bench.py times that).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_SWEEP = ["4,2048,4,64,64,4", "8,1024,4,32,128,4", "2,2048,4,64,64,8", "4,1024,4,128,64,4",
                 "8,2048,8,32,64,4", "16,512,4,64,128,4"]


def timed(f, *args, iters: int):
    import jax
    out = f(*args)
    jax.block_until_ready(out)
    for _ in range(2):
        jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(iters):
        out = f(*args)
    jax.block_until_ready(out)
    return out, 1000 * (time.perf_counter() - t) / iters


def max_rel(a, b) -> float:
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--tiles", nargs="*", default=DEFAULT_SWEEP,
                   help="head_gpu.Tiles settings 'lse_rows,lse_cols,lse_warps,grad_rows,grad_cols,grad_warps'")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jgpt import fp8, head_gpu, head_loss
    from jgpt.config import ModelConfig

    cfg = ModelConfig()
    cap, div = head_loss._cap_terms(cfg)
    C, V, d = args.tokens, 50304, cfg.model_dim
    rng = np.random.default_rng(0)
    h = rng.standard_normal((C, d))
    h = jnp.asarray(h / np.sqrt((h ** 2).mean(-1, keepdims=True)), jnp.bfloat16)  # rms-normed
    w = jnp.asarray(rng.standard_normal((V, d)) * 1.5, jnp.float32)  # |z| / div up to ~1.5
    y = jnp.asarray(rng.integers(0, cfg.vocab_size, C), jnp.int32)
    scales = (cfg.fp8_x_s, cfg.fp8_w_s, cfg.fp8_grad_s)
    rows = []

    def row(group, name, ms, err=""):
        rows.append((group, name, ms, err))
        print(f"{group} | {name} | {ms:.3f} ms | {err}", file=sys.stderr, flush=True)

    prod, ms = timed(jax.jit(lambda h, w: fp8.fwd_f32(h, w, *scales[:2])[0]), h, w, iters=args.iters)
    row("fp8 GEMM", "fp32 product", ms)
    z, ms = timed(jax.jit(lambda h, w: fp8._fwd(h, w, *scales)[0]), h, w, iters=args.iters)
    row("fp8 GEMM", "+ bf16 cast (XLA)", ms)
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu:  # cuBLASLt writing z itself, alpha to 2.1e-7 (fp8.fwd_bf16, head_gpu.GEMM_OUT = "bf16")
        zb, ms = timed(jax.jit(lambda h, w: fp8.fwd_bf16(h, w, *scales[:2], emulate=False)[0]), h, w,
                       iters=args.iters)
        flips = np.mean(np.asarray(zb.astype(jnp.float32)) != np.asarray(z.astype(jnp.float32)))
        row("fp8 GEMM", "bf16 output (fwd_bf16)", ms, f"z entries differing from the exact alpha's {flips:.1e}")

    def xla_lse(prod):
        z = prod.astype(jnp.bfloat16)
        return z, cap + jnp.log(jnp.sum(jnp.exp(head_gpu.softcapped(z, cap, div) - cap), axis=-1))

    (_, lse), ms = timed(jax.jit(xla_lse), prod, iters=args.iters)
    row("z and row LSE from the product", "XLA fusions", ms)

    def xla_grad(z, lse, y):
        g8 = fp8.quantize(head_gpu.grad_z_xla(z, lse, y, 1.0, cap, div), cfg.fp8_grad_s, jnp.float8_e5m2)
        return g8, g8.T.copy()  # the layout grad_W's GEMM reads, materialised as XLA does

    (g8_ref, _), ms = timed(jax.jit(xla_grad), z, lse, y, iters=args.iters)
    row("e5m2 grad, both layouts", "XLA fusion + transpose", ms)
    g8_ref = np.asarray(g8_ref.astype(jnp.float32))

    if not on_gpu:
        print("no GPU: the Triton kernel rows are skipped", file=sys.stderr)
    head_gpu.set_exp("accurate")  # the tile rows: libdevice's exp; the fast exp has its own rows below
    for text in args.tiles if on_gpu else []:
        head_gpu.set_tiles(head_gpu.Tiles.parse(text))
        try:
            (zk, got), ms = timed(jax.jit(lambda p: head_gpu.lse_and_z(p, cap, div)), prod, iters=args.iters)
            same = np.array_equal(np.asarray(zk.astype(jnp.float32)), np.asarray(z.astype(jnp.float32)))
            row("z and row LSE from the product", f"kernel {text}", ms,
                f"LSE max rel diff {max_rel(got, lse):.1e}, z {'equal' if same else 'DIFFERENT'}")
            got, ms = timed(jax.jit(lambda z: head_gpu.lse_of_z(z, cap, div)), z, iters=args.iters)
            row("row LSE from a bf16 z", f"kernel {text}", ms, f"LSE max rel diff {max_rel(got, lse):.1e}")
            (g8, g8t), ms = timed(jax.jit(lambda z, l, y: head_gpu.grad_e5m2(z, l, y, 1.0, cap, div, cfg.fp8_grad_s)),
                                  z, lse, y, iters=args.iters)
            g8 = np.asarray(g8.astype(jnp.float32))
            ok = np.array_equal(np.asarray(g8t.astype(jnp.float32)), g8.T)
            row("e5m2 grad, both layouts", f"kernel {text}", ms,
                f"entries differing {np.mean(g8 != g8_ref):.1e}, transpose {'ok' if ok else 'WRONG'}")
        except Exception as e:  # a tile setting Triton rejects: report it, keep sweeping
            row("kernel", f"{text} failed", float("nan"), f"{type(e).__name__}: {str(e)[:120]}")
    head_gpu.set_tiles(head_gpu.Tiles())
    if on_gpu:  # the default tiles with the base-2 exp (head_gpu.EXP = "fast")
        head_gpu.set_exp("fast")
        (_, got), ms = timed(jax.jit(lambda p: head_gpu.lse_and_z(p, cap, div)), prod, iters=args.iters)
        row("z and row LSE from the product", "kernel, default tiles, fast exp", ms,
            f"LSE max rel diff {max_rel(got, lse):.1e}")
        (g8, _), ms = timed(jax.jit(lambda z, l, y: head_gpu.grad_e5m2(z, l, y, 1.0, cap, div, cfg.fp8_grad_s)),
                            z, lse, y, iters=args.iters)
        row("e5m2 grad, both layouts", "kernel, default tiles, fast exp", ms,
            f"entries differing {np.mean(np.asarray(g8.astype(jnp.float32)) != g8_ref):.1e}")
    head_gpu.set_exp(head_gpu.DEFAULT_EXP)

    for mode, out in (("xla", "f32"), ("pallas", "f32"), ("pallas", "bf16")) if on_gpu else (("xla", "f32"),):
        head_gpu.set_mode(mode)
        head_gpu.set_gemm_out(out)
        # a fresh function per setting: jit caches traces by function, and the settings are
        # read at trace time
        f = jax.value_and_grad(lambda h, w: head_loss.fp8_head_loss(h, w, y, cfg), argnums=(0, 1))
        _, ms = timed(jax.jit(f), h, w, iters=args.iters)
        row("fused head fwd+bwd", f"passes {mode}, GEMM output {out}, exp {head_gpu.EXP}", ms)
    head_gpu.set_mode("auto")
    head_gpu.set_gemm_out(head_gpu.DEFAULT_GEMM_OUT)

    print(f"device: {jax.devices()[0].device_kind} | jax {jax.__version__} | chunk {C} x {V}\n")
    print("| piece | variant | ms | check |\n|---|---|---|---|")
    for group, name, ms, err in rows:
        print(f"| {group} | {name} | {ms:.3f} | {err} |")


if __name__ == "__main__":
    main()
