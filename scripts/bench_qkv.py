"""Time QK-norm + rotary + value mix (jgpt.qkv_gpu) for one record-size layer on the GPU.

    python scripts/bench_qkv.py                        # XLA fusions, then the kernels per tile
    python scripts/bench_qkv.py --tiles 64,4 128,8

One attention layer of one 49,152-token sequence (6 heads of 128, with a value embedding):
forward (q, k, v from the projection's output) and forward + backward (the projection's
gradient, the value embedding's and the lambdas'), ms per call. The floor is the bytes: the
forward reads [T, 2304] + [T, 768] bf16 and writes [T, 2304] (0.53 GB), the backward reads
about 0.83 GB and writes 0.30 GB: ~0.18 ms and ~0.28 ms at 3 TB/s. jgpt only; torch.compile's
fused kernels for the same work took 0.17 / 0.27 ms in the record step's profile
(BENCHMARKS.md, session 4).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_head import timed  # noqa: E402

DEFAULT_SWEEP = ["64,4", "32,4", "128,4", "64,8", "32,2", "128,8"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=49152)
    p.add_argument("--tiles", nargs="*", default=DEFAULT_SWEEP, help="qkv_gpu.Tiles 'rows,warps'")
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jgpt import attention as attn, model, qkv_gpu

    T, H, D = args.tokens, 6, 128
    rng = np.random.default_rng(0)
    qkv = jnp.asarray(rng.standard_normal((T, 3 * H * D)), jnp.bfloat16)
    ve = jnp.asarray(rng.standard_normal((T, H * D)), jnp.bfloat16)
    lam = jnp.asarray([0.6, 0.4], jnp.float32)
    cos, sin = attn.rotary_tables(T, D, 1024.0, jnp.float32)
    cots = tuple(jnp.asarray(rng.standard_normal((T, H, D)), jnp.bfloat16) for _ in range(3))

    def build():
        def fwd(qkv, ve, lam):  # the layer's own code path, under qkv_gpu.MODE
            return model.qk_norm_rotary_mix(qkv, ve, (cos, sin), lam, H)

        def fwd_bwd(qkv, ve, lam):
            out, vjp = jax.vjp(fwd, qkv, ve, lam)
            return out, vjp(cots)

        return jax.jit(fwd), jax.jit(fwd_bwd)

    rows = []
    for label, mode, tiles in [("XLA fusions", "xla", None)] + [(f"kernels {t}", "pallas", t) for t in args.tiles]:
        qkv_gpu.set_mode(mode)
        if tiles:
            qkv_gpu.set_tiles(qkv_gpu.Tiles.parse(tiles))
        f, fb = build()
        _, t_f = timed(f, qkv, ve, lam, iters=args.iters)
        _, t_fb = timed(fb, qkv, ve, lam, iters=args.iters)
        rows.append((label, t_f, t_fb))
        print(f"{label}: fwd {t_f:.3f} ms, fwd+bwd {t_fb:.3f} ms", file=sys.stderr, flush=True)
    print(f"device: {jax.devices()[0].device_kind} | jax {jax.__version__} | T={T}, {H} heads of {D}")
    print("\n| variant | fwd ms | fwd+bwd ms | bwd ms |\n|---|---|---|---|")
    for label, t_f, t_fb in rows:
        print(f"| {label} | {t_f:.3f} | {t_fb:.3f} | {t_fb - t_f:.3f} |")


if __name__ == "__main__":
    main()
