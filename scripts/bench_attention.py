"""Time and check the attention of one record sequence (49,152 tokens, 6 heads of 128, bf16) per
backend, next to the reference's compiled FlexAttention, on one GPU.

    python scripts/bench_attention.py                     # windows 1 7 14, every backend
    python scripts/bench_attention.py --windows 14 --jgpt pallas

Rows: forward ms and forward+backward ms (median of --iters timed calls after warm-up), and each
output's and gradient's relative L2 distance from jgpt's blockwise attention run in fp32 on the
same bf16 inputs (the rule of record26 §5.6 is the reference: blockwise equals dense on the CPU,
tests/test_attention.py). Tokens: bench.py's synthetic documents (log-normal lengths, median
~600 tokens). Each framework runs in its own process.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scripts.bench import T, add_worker_flags, run_workers, serve_worker, synthetic_tokens  # noqa: E402

H, D, SCALE = 6, 128, 0.12


def inputs(n_tokens: int = T, seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed)
    toks = synthetic_tokens(1, seed)[0][:n_tokens]
    # q and k are RMS-normed in the model (|x| = sqrt(D)), v and dy of unit scale
    q, k, v, dy = (rng.standard_normal((n_tokens, H, D)).astype(np.float32) for _ in range(4))
    return toks, q, k, v, dy


def _median_ms(fn, sync, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        sync(fn())
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def run_jax(args) -> dict:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.numpy as jnp
    from jgpt import attention as attn

    toks, *arrs = inputs(args.tokens)
    docs = attn.document_ids(jnp.asarray(toks, jnp.int32))
    q, k, v, dy = (jnp.asarray(a, jnp.bfloat16) for a in arrs)
    sync = jax.block_until_ready

    def fwd_bwd(fn):
        def loss(q, k, v):
            return jnp.vdot(fn(q, k, v).astype(jnp.float32), dy.astype(jnp.float32))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    def backend(name, w):
        return lambda q, k, v: attn.attention(q, k, v, docs, w, scale=SCALE, backend=name)

    out = {"framework": "jgpt", "version": jax.__version__, "device": jax.devices()[0].device_kind, "rows": []}
    for w in args.windows:
        ref_fn = backend("blockwise", w)
        up = [a.astype(jnp.float32) for a in (q, k, v)]
        ref_out = jax.jit(ref_fn)(*up)
        ref_grads = jax.jit(jax.grad(lambda q, k, v: jnp.vdot(ref_fn(q, k, v), dy.astype(jnp.float32)),
                                     argnums=(0, 1, 2)))(*up)
        variants = [(name, None) for name in args.jgpt if name != "pallas" or not args.tiles]
        if "pallas" in args.jgpt and args.tiles:
            variants += [("pallas", t) for t in args.tiles]
        for name, tiles in variants:
            row = {"window": w, "backend": name if tiles is None else f"pallas [{tiles}]"}
            try:
                if tiles is not None:
                    from jgpt import attention_gpu
                    attention_gpu.set_tiles(attention_gpu.Tiles.parse(tiles))
                fn = backend(name, w)
                f = jax.jit(fn)
                fb = fwd_bwd(fn)
                o = f(q, k, v)
                _, g = fb(q, k, v)
                rel = lambda a, b: float(jnp.linalg.norm((a.astype(jnp.float32) - b).ravel())
                                         / jnp.linalg.norm(b.ravel()))
                row["err_out"] = rel(o, ref_out)
                row["err_grad"] = max(rel(a, b) for a, b in zip(g, ref_grads))
                row["finite"] = bool(jnp.isfinite(o).all()) and all(bool(jnp.isfinite(x).all()) for x in g)
                row["fwd_ms"] = _median_ms(lambda: f(q, k, v), sync, args.iters, args.warmup)
                row["fwd_bwd_ms"] = _median_ms(lambda: fb(q, k, v), sync, args.iters, args.warmup)
            except Exception as e:  # one backend failing must not hide the others' numbers
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps(row), file=sys.stderr, flush=True)
            out["rows"].append(row)
    return out


def run_torch(args) -> dict:
    import torch
    from torch.nn.attention.flex_attention import flex_attention
    from ref import train_gpt as ref

    toks, *arrs = inputs(args.tokens)
    dev = torch.device("cuda")
    seq = torch.tensor(toks, dtype=torch.int32, device=dev)
    q, k, v, dy = (torch.tensor(a, device=dev).to(torch.bfloat16)[None].transpose(1, 2) for a in arrs)
    flex = torch.compile(flex_attention, dynamic=False)
    sync = lambda _: torch.cuda.synchronize()
    out = {"framework": "torch", "version": torch.__version__, "device": torch.cuda.get_device_name(), "rows": []}
    for w in args.windows:
        long_mask, _ = ref.flex_block_masks(seq, torch.tensor(w, device=dev, dtype=torch.int32))
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))

        def fwd():
            with torch.no_grad():
                return flex(q, k, v, block_mask=long_mask, scale=SCALE)

        def fwd_bwd():
            o = flex(qg, kg, vg, block_mask=long_mask, scale=SCALE)
            return torch.autograd.grad(o, (qg, kg, vg), dy)

        row = {"window": w, "backend": "flex (compiled)"}
        row["fwd_ms"] = _median_ms(fwd, sync, args.iters, args.warmup)
        row["fwd_bwd_ms"] = _median_ms(fwd_bwd, sync, args.iters, args.warmup)
        print(json.dumps(row), file=sys.stderr, flush=True)
        out["rows"].append(row)
    return out


def table(results: list[dict]) -> str:
    lines = ["device: " + results[0]["device"] + " | " + " | ".join(f"{r['framework']} {r['version']}" for r in results),
             "", "| window | backend | fwd ms | fwd+bwd ms | rel L2 out | rel L2 grads (max) |",
             "|---|---|---|---|---|---|"]
    rows = sorted((r for res in results for r in res["rows"]), key=lambda r: r["window"])
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['window']} | {r['backend']} | failed: {r['error'][:120]} | | | |")
            continue
        e_out = f"{r['err_out']:.1e}" if "err_out" in r else "-"
        e_grad = f"{r['err_grad']:.1e}" if "err_grad" in r else "-"
        lines.append(f"| {r['window']} | {r['backend']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {e_out} | {e_grad} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, nargs="+", default=[1, 7, 14])
    p.add_argument("--jgpt", nargs="+", default=["blockwise", "pallas"],
                   help="jgpt attention backends")
    p.add_argument("--tiles", nargs="+", help="pallas tile variants, attention_gpu.Tiles.parse form "
                   "'rows,step,warps,stages' for fwd/dq/dkv, e.g. 128,64,4,2/128,64,4,2/64,64,4,2[/masked]")
    p.add_argument("--tokens", type=int, default=T, help="sequence length (a multiple of 128)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    add_worker_flags(p)
    args = p.parse_args(argv)
    if args.worker:
        return serve_worker(args, run_jax, run_torch)
    argv_for = ["--windows", *map(str, args.windows), "--tokens", str(args.tokens), "--iters", str(args.iters),
                "--warmup", str(args.warmup), "--jgpt", *args.jgpt, *(["--tiles", *args.tiles] if args.tiles else [])]
    results = run_workers(__file__, [args.only] if args.only else ["jgpt", "torch"], argv_for, args.json)
    print(table(results))


if __name__ == "__main__":
    main()
