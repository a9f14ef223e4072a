"""Where the time of jgpt's record train step goes on the GPU: a profile summary.

    python scripts/profile_step.py --window 1 --backend blockwise --remat on --out /tmp/prof

    python scripts/profile_step.py --compare jgpt=TRACE.json.gz torch=TRACE.json   # kinds side by side

Traces `--steps` record steps (after a warm-up step) with jax.profiler (or, with --framework
torch, the reference's compiled step with torch.profiler), then reads the trace it wrote and
prints the GPU kernels grouped into kinds (matmuls, FP8 matmuls, attention, jgpt's head and
QK-norm kernels, fused elementwise/reductions, copies, collectives) and the `--top` costliest
kernels, each with its share of the summed kernel time. Kernel time is summed over streams, so it can exceed wall time when
streams overlap.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import math
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = [  # first match wins; triton_tem/poi/red/per: torch inductor's template (the record's
    # flex attention), pointwise and reduction kernels; nvjet_sm90_q*: cuBLASLt's FP8 kernels
    ("QK-norm / rotary / value mix (jgpt.qkv_gpu)", r"_qkv_"),
    ("add + norm (jgpt.norm_gpu)", r"^_(fwd|bwd)_kernel$|_norm_(fwd|bwd)"),
    ("attention (fused kernel)",
     r"flash|attention|mosaic|pallas|_fwd_kernel|_bwd_kernel|_dq_kernel|_dkv_kernel|mha|triton_tem"),
    ("fused head passes (jgpt.head_gpu)", r"_lse_kernel|_grad_kernel"),
    ("fp8 matmul", r"nvjet_sm90_q|f8|fp8|e4m3|e5m2"),
    # inductor names list the fused ops (e.g. "_to_copy"): classify them by prefix first
    ("reduction", r"^triton_(red|per)_"),
    ("fused elementwise", r"^triton_poi_"),
    ("matmul", r"gemm|nvjet|cutlass|cublas|sm90_xmma|xmma|wgmma|matmul|dot"),
    ("collective", r"nccl|all_reduce|all-reduce|all_gather|reduce_scatter"),
    ("copy / transpose", r"memcpy|memset|copy|transpose"),
    ("reduction", r"reduce|reduction|triton_red|triton_per"),
    ("fused elementwise", r"fusion|loop|input_|wrapped_|triton_poi"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, pat in KINDS if re.search(pat, low)), "other")


def kernel_times(trace_path: Path):
    """(us per kernel name, calls per name) of a jax.profiler Perfetto trace (.json.gz: GPU
    processes' events) or a torch.profiler Chrome trace (.json: events of category 'kernel')."""
    opener = gzip.open if trace_path.suffix == ".gz" else open
    data = json.load(opener(trace_path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, name in procs.items() if "GPU" in str(name) or "gpu" in str(name)}
    by_name, count = collections.Counter(), collections.Counter()
    for e in events:
        on_gpu = e.get("cat") == "kernel" if trace_path.suffix == ".json" else e.get("pid") in gpu
        if e.get("ph") != "X" or not on_gpu:
            continue
        by_name[e.get("name", "?")] += e.get("dur", 0.0)
        count[e.get("name", "?")] += 1
    if not by_name:
        sys.exit(f"no GPU kernel events in {trace_path} (processes: {sorted(procs.values())})")
    return by_name, count


def by_kind(by_name) -> collections.Counter:
    kinds = collections.Counter()
    for name, us in by_name.items():
        kinds[kind_of(name)] += us
    return kinds


def summarize(trace_path: Path, steps: int, top: int = 25) -> str:
    """The kind table and the `top` costliest kernels of one trace, per step."""
    by_name, count = kernel_times(trace_path)
    total = sum(by_name.values())
    lines = [f"summed GPU kernel time per step: {total / 1000 / steps:.1f} ms over {steps} steps", "",
             "| kind | ms/step | share |", "|---|---|---|"]
    for k, us in by_kind(by_name).most_common():
        lines.append(f"| {k} | {us / 1000 / steps:.1f} | {100 * us / total:.1f}% |")
    lines += ["", f"| top {top} kernels | calls/step | ms/step | share |", "|---|---|---|---|"]
    for name, us in by_name.most_common(top):
        lines.append(f"| {name[:90]} | {count[name] // steps} | {us / 1000 / steps:.2f} | {100 * us / total:.1f}% |")
    return "\n".join(lines)


def compare(traces: list[Path], labels: list[str], steps: int) -> str:
    """The kind tables of several traces (e.g. jgpt's and torch's, --steps each) side by side."""
    kinds = [by_kind(kernel_times(t)[0]) for t in traces]
    names = sorted(set().union(*kinds), key=lambda k: -max(kd[k] for kd in kinds))
    lines = ["| kind | " + " | ".join(f"{lb} ms/step" for lb in labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for k in names:
        lines.append(f"| {k} | " + " | ".join(f"{kd[k] / 1000 / steps:.1f}" for kd in kinds) + " |")
    lines.append("| total | " + " | ".join(f"{sum(kd.values()) / 1000 / steps:.1f}" for kd in kinds) + " |")
    return "\n".join(lines)


_HLO_INST = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.+?)\s+(custom-call|fusion)\((.*)$")


def gemm_table(hlo: str) -> str:
    """The GEMMs of an optimised HLO text, counted by kind and output shape: cuBLAS / cuBLASLt
    custom calls (their target) and XLA's Triton GEMM fusions ("triton_gemm"). Which GEMMs XLA
    fused, and whether a product is written in bf16 or fp32 (BENCHMARKS.md session 8)."""
    rows = collections.Counter()
    for line in hlo.splitlines():
        m = _HLO_INST.match(line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        if op == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', rest)
            if not target or "cublas" not in target.group(1):
                continue
            kind = target.group(1)
        elif "__triton_gemm" in rest or name.startswith("gemm_fusion"):
            kind = "triton_gemm"
        else:
            continue
        outs = [f"{d}[{dims}]" for d, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape) if d != "s8"]  # s8: workspace
        rows[kind, ", ".join(outs)] += 1
    lines = ["| GEMMs | kind | output |", "|---|---|---|"]
    lines += [f"| {n} | {kind} | {out} |" for (kind, out), n in sorted(rows.items())]
    return "\n".join(lines)


_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "f8e4m3fn": 1, "f8e5m2": 1, "s8": 1, "u8": 1, "pred": 1}


def _nbytes(shape: str, skip_s8: bool = False) -> int:
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]\w*)\[([\d,]*)\]", shape):
        if dtype not in _BYTES or (skip_s8 and dtype == "s8"):
            continue
        total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def traffic_table(hlo: str, tb_per_s: float = 3.0, top: int = 15) -> str:
    """Memory traffic of the kernels in an optimised HLO's busiest computation (the per-sequence
    loop body of the train step, else the entry): each fusion's and custom call's operands plus
    results, by kind, with the time it takes at `tb_per_s` TB/s - the floor a memory-bound kernel
    cannot beat - and the largest XLA fusions (fwd: autodiff's forward, bwd: its transpose).
    For the kernels outside the GEMMs this is what one-pass kernels can save (BENCHMARKS.md
    session 9)."""
    shapes, calls, trips = {}, [], {}
    params = {}  # (computation, instruction) -> parameter number
    users = collections.defaultdict(list)  # (computation, parameter number) -> (op, result shape) of its users
    comp = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%(\S+)\s+\(.*\{\s*$", line)
        if head:
            comp = head.group(1)
            continue
        inst = re.match(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$", line)
        if not inst:
            continue
        name, shape, op, rest = inst.groups()
        shapes[name] = shape
        if op == "parameter":
            params[comp, name] = int(re.match(r"(\d+)", rest).group(1))
        else:
            for src in set(re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])):
                if (comp, src) in params:
                    users[comp, params[comp, src]].append((op, shape))
        if op == "while":
            body = re.search(r"body=%([\w.\-]+)", rest)
            n = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
            if body:
                trips[body.group(1)] = int(n.group(1)) if n else 1
        if op in ("fusion", "custom-call"):
            calls.append((comp, name, shape, op, rest))
    if not calls:
        return "no fusions or custom calls in this HLO"
    per_comp = collections.Counter(c for c, *_ in calls)
    body = max(per_comp, key=per_comp.get)
    rows, kinds = [], collections.defaultdict(lambda: [0, 0])
    for c, name, shape, op, rest in calls:
        if c != body:
            continue
        operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        cublas = bool(target and "cublas" in target.group(1))
        fused = re.search(r"calls=%([\w.\-]+)", rest)
        size = _nbytes(shape, skip_s8=cublas)
        for i, o in enumerate(operands):
            # an operand that the fusion only slices, gathers from or takes tuple elements of
            # counts what those read (the loss's pick of z[target] reads 8,192 of z's 412M values)
            used = users.get((fused.group(1), i), []) if fused else []
            if used and all(u in ("slice", "dynamic-slice", "gather", "get-tuple-element") for u, _ in used):
                size += sum(_nbytes(sh) for _, sh in used)
            else:
                size += _nbytes(shapes.get(o, ""))
        if cublas:
            kind = "GEMM (cuBLAS)"
        elif "__triton_gemm" in rest:
            kind = "GEMM (XLA Triton fusion)"
        elif target and "triton" in target.group(1):
            kind = "Pallas kernels"
        elif op == "custom-call":
            kind = "other custom calls"
        else:
            fkind = re.search(r"kind=(\w+)", rest)
            kind = {"kLoop": "XLA elementwise fusions", "kInput": "XLA reduction fusions"}.get(
                fkind.group(1) if fkind else "", "other fusions")
        kinds[kind][0] += 1
        kinds[kind][1] += size
        if kind.startswith("XLA ") and "fusions" in kind:
            where = re.search(r'op_name="([^"]+)"', rest)
            where = where.group(1) if where else ""
            phase = "bwd" if "transpose(" in where else "fwd" if "jvp(" in where else ""
            rows.append((size, name, re.sub(r"\{[^}]*\}", "", shape), phase, where.rsplit("/", 1)[-1]))
    n = trips.get(body, 1)
    ms = lambda b: b / (tb_per_s * 1e12) * 1e3  # noqa: E731
    out = [f"computation %{body}: {per_comp[body]} kernels, run {n}x per step; traffic per run",
           "", f"| kind | kernels | GB | ms at {tb_per_s:g} TB/s |", "|---|---|---|---|"]
    out += [f"| {k} | {c} | {b / 1e9:.2f} | {ms(b):.2f} |" for k, (c, b) in sorted(kinds.items(), key=lambda kv: -kv[1][1])]
    out += ["", f"| largest XLA fusions | MB | phase | output | op |", "|---|---|---|---|---|"]
    out += [f"| {name} | {b / 1e6:.0f} | {phase} | {shape[:60]} | {op} |"
            for b, name, shape, phase, op in sorted(rows, reverse=True)[:top]]
    return "\n".join(out)


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
    p.add_argument("--norm_kernels", choices=["auto", "pallas", "xla"], default="xla",
                   help="the blocks' add + norm as jgpt.norm_gpu kernels (auto) or XLA fusions")
    p.add_argument("--tiles", default="", help="jgpt kernel tiles, bench.py --variant's settings: "
                   "'attn=TILES;head=TILES;qkv=TILES;head_out=f32|bf16' (unset: module defaults)")
    p.add_argument("--framework", choices=["jgpt", "torch"], default="jgpt",
                   help="torch: the reference's compiled step under torch.profiler, for comparison")
    p.add_argument("--out", default="/tmp/jgpt-profile", help="trace directory")
    p.add_argument("--summarize", help="only summarise this perfetto_trace.json.gz")
    p.add_argument("--compare", nargs="+", metavar="LABEL=TRACE",
                   help="only print these traces' kind tables side by side (e.g. jgpt=/tmp/p/...json.gz "
                        "torch=/tmp/p/torch_trace.json), each of --steps steps")
    p.add_argument("--hlo", help="also write the compiled step's optimised HLO here (.gz: compressed), to look "
                                 "up what a kernel of the table (a fusion's name) computes")
    p.add_argument("--gemms", metavar="HLO", help="only print the GEMM table of this saved optimised HLO (--hlo's file)")
    p.add_argument("--traffic", metavar="HLO", help="only print the memory-traffic table of this saved optimised HLO "
                                                     "(its kernels' bytes by kind; the largest XLA fusions)")
    args = p.parse_args(argv)
    if args.gemms:
        if not Path(args.gemms).is_file():
            p.error(f"--gemms {args.gemms}: no such file")
        print(gemm_table((gzip.open if args.gemms.endswith(".gz") else open)(args.gemms, "rt").read()))
        return
    if args.traffic:
        if not Path(args.traffic).is_file():
            p.error(f"--traffic {args.traffic}: no such file")
        print(traffic_table((gzip.open if args.traffic.endswith(".gz") else open)(args.traffic, "rt").read(),
                            top=args.top))
        return
    if args.summarize:
        print(summarize(Path(args.summarize), args.steps, args.top))
        return
    if args.compare:
        pairs = [c.partition("=") for c in args.compare]
        if any(not eq or not Path(path).is_file() for _, eq, path in pairs):
            p.error(f"--compare takes LABEL=TRACE with existing trace files, got {args.compare}")
        print(compare([Path(path) for _, _, path in pairs], [label for label, _, _ in pairs], args.steps))
        return
    if args.framework == "torch":
        return profile_torch(args)
    import jax
    from jgpt import head_gpu, norm_gpu, qkv_gpu
    from scripts.bench import apply_kernel_tiles, build_jgpt, parse_variant
    try:
        apply_kernel_tiles(parse_variant("profile:" + args.tiles, "--tiles")[1])
    except ValueError as e:
        p.error(str(e))
    head_gpu.set_mode(args.head_kernels)
    qkv_gpu.set_mode(args.qkv_kernels)
    norm_gpu.set_mode(args.norm_kernels)
    train_step, state, x, y = build_jgpt(args.backend, args.remat == "on", args.seqs)
    if args.hlo:
        text = train_step.lower(state, x, y, args.window).compile().as_text()
        (gzip.open if args.hlo.endswith(".gz") else open)(args.hlo, "wt").write(text)
        print(f"optimised HLO: {args.hlo} ({len(text):,} characters)\n\n{gemm_table(text)}\n")
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
