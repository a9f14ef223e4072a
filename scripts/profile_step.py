"""Where the time of jgpt's record train step goes on the GPU: a profile summary.

    python scripts/profile_step.py --window 1 --backend blockwise --remat on --out /tmp/prof

Traces `--steps` record steps (after a warm-up step) with jax.profiler (or, with --framework
torch, the reference's compiled step with torch.profiler), then reads the trace it wrote and prints the GPU kernels grouped into kinds (matmuls, attention, fused
elementwise/reductions, copies, collectives) and the `--top` costliest kernels, each with its share
of the summed kernel time. Kernel time is summed over streams, so it can exceed wall time when
streams overlap.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = [  # first match wins; triton_tem/poi/red/per: torch inductor's template (the record's
    # flex attention), pointwise and reduction kernels
    ("attention (fused kernel)",
     r"flash|attention|mosaic|pallas|_fwd_kernel|_bwd_kernel|_dq_kernel|_dkv_kernel|mha|triton_tem"),
    ("fused head passes (jgpt.head_gpu)", r"_lse_kernel|_grad_kernel"),
    # inductor names list the fused ops (e.g. "_to_copy", "fp8"): classify them by prefix first
    ("reduction", r"^triton_(red|per)_"),
    ("fused elementwise", r"^triton_poi_"),
    ("fp8 matmul", r"f8|fp8|e4m3|e5m2"),
    ("matmul", r"gemm|nvjet|cutlass|cublas|sm90_xmma|xmma|wgmma|matmul|dot"),
    ("collective", r"nccl|all_reduce|all-reduce|all_gather|reduce_scatter"),
    ("copy / transpose", r"memcpy|memset|copy|transpose"),
    ("reduction", r"reduce|reduction|triton_red|triton_per"),
    ("fused elementwise", r"fusion|loop|input_|wrapped_|triton_poi"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, pat in KINDS if re.search(pat, low)), "other")


def summarize(trace_path: Path, steps: int, top: int = 25) -> str:
    """Kernel table of a jax.profiler Perfetto trace (.json.gz: GPU processes' events) or a
    torch.profiler Chrome trace (.json: events of category 'kernel')."""
    opener = gzip.open if trace_path.suffix == ".gz" else open
    data = json.load(opener(trace_path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, name in procs.items() if "GPU" in str(name) or "gpu" in str(name)}
    by_name, by_kind = collections.Counter(), collections.Counter()
    count = collections.Counter()
    for e in events:
        on_gpu = e.get("cat") == "kernel" if trace_path.suffix == ".json" else e.get("pid") in gpu
        if e.get("ph") != "X" or not on_gpu:
            continue
        name = e.get("name", "?")
        by_name[name] += e.get("dur", 0.0)
        by_kind[kind_of(name)] += e.get("dur", 0.0)
        count[name] += 1
    total = sum(by_name.values())
    if not total:
        return f"no GPU kernel events in {trace_path} (processes: {sorted(procs.values())})"
    lines = [f"summed GPU kernel time per step: {total / 1000 / steps:.1f} ms over {steps} steps", "",
             "| kind | ms/step | share |", "|---|---|---|"]
    for k, us in by_kind.most_common():
        lines.append(f"| {k} | {us / 1000 / steps:.1f} | {100 * us / total:.1f}% |")
    lines += ["", f"| top {top} kernels | calls/step | ms/step | share |", "|---|---|---|---|"]
    for name, us in by_name.most_common(top):
        lines.append(f"| {name[:90]} | {count[name] // steps} | {us / 1000 / steps:.2f} | {100 * us / total:.1f}% |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--window", type=int, default=1)
    p.add_argument("--backend", default="auto")
    p.add_argument("--remat", choices=["on", "off"], default="off")
    p.add_argument("--seqs", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=25, help="list this many costliest kernels")
    p.add_argument("--head_kernels", choices=["auto", "pallas", "xla"], default="auto")
    p.add_argument("--qkv_kernels", choices=["auto", "pallas", "xla"], default="auto")
    p.add_argument("--tiles", default="", help="jgpt kernel tiles, bench.py --variant's settings: "
                   "'attn=TILES;head=TILES;qkv=TILES;head_out=f32|bf16' (unset: module defaults)")
    p.add_argument("--framework", choices=["jgpt", "torch"], default="jgpt",
                   help="torch: the reference's compiled step under torch.profiler, for comparison")
    p.add_argument("--out", default="/tmp/jgpt-profile", help="trace directory")
    p.add_argument("--summarize", help="only summarise this perfetto_trace.json.gz")
    p.add_argument("--hlo", help="also write the compiled step's optimised HLO here (.gz: compressed), to look "
                                 "up what a kernel of the table (a fusion's name) computes")
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize(Path(args.summarize), args.steps, args.top))
        return
    if args.framework == "torch":
        return profile_torch(args)
    import jax
    from jgpt import head_gpu, qkv_gpu
    from scripts.bench import apply_kernel_tiles, build_jgpt, parse_variant
    try:
        apply_kernel_tiles(parse_variant("profile:" + args.tiles, "--tiles")[1])
    except ValueError as e:
        p.error(str(e))
    head_gpu.set_mode(args.head_kernels)
    qkv_gpu.set_mode(args.qkv_kernels)
    train_step, state, x, y = build_jgpt(args.backend, args.remat == "on", args.seqs)
    if args.hlo:
        text = train_step.lower(state, x, y, args.window).compile().as_text()
        (gzip.open if args.hlo.endswith(".gz") else open)(args.hlo, "wt").write(text)
        print(f"optimised HLO: {args.hlo} ({len(text):,} characters)")
    for _ in range(2):
        state, m = train_step(state, x, y, args.window)
    jax.block_until_ready(m["loss"])
    t = time.perf_counter()
    with jax.profiler.trace(args.out, create_perfetto_trace=True):
        for _ in range(args.steps):
            state, m = train_step(state, x, y, args.window)
        jax.block_until_ready(m["loss"])
    print(f"traced {args.steps} steps in {time.perf_counter() - t:.2f} s (with profiler overhead)")
    trace = max(Path(args.out).rglob("perfetto_trace.json.gz"), key=lambda f: f.stat().st_mtime)
    print(f"trace: {trace}")
    print(summarize(trace, args.steps, args.top))


def profile_torch(args) -> None:
    import torch
    from scripts.bench import build_torch
    step = build_torch(args.seqs)
    for _ in range(2):
        step(args.window)
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step(args.window)
        torch.cuda.synchronize()
    print(f"traced {args.steps} steps in {time.perf_counter() - t:.2f} s (with profiler overhead)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    trace = Path(args.out) / "torch_trace.json"
    prof.export_chrome_trace(str(trace))
    print(f"trace: {trace}")
    print(summarize(trace, args.steps, args.top))


if __name__ == "__main__":
    main()
