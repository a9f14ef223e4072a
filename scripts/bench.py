"""Time jgpt's record train step next to ref/train_gpt.py's under torch.compile, on one GPU.

    python scripts/bench.py                       # both frameworks, windows 1 7 14, a table
    python scripts/bench.py --windows 1 14 --seqs 8 --iters 5
    python scripts/bench.py --only jgpt           # one side (no ratio then)
    python scripts/bench.py --variant base --variant q32:qkv=32,4   # jgpt configurations side by side
    python scripts/bench.py --variant base --variant c16k:chunk=16384 --variant b:head_out=bf16
    python scripts/bench.py --only jgpt --xla_flags=--xla_gpu_exhaustive_tiling_search=true

Each framework runs in its own process (one GPU, no memory shared between them), on the same
synthetic BOS-aligned token sequences (documents of log-normal length, median ~600 tokens, like
the corpora here). A "step" is the record's optimizer step: `--seqs` sequences of 49,152 tokens,
one forward+backward each, then Adam and Muon (record26 §6-§7). Model FLOPs per token are
6N (N = non-embedding parameters + lm_head) plus attention 12 * L_attn * d_attn * (visible keys),
and MFU is against a bf16 matmul peak measured in the same run. Peak memory is
`peak_bytes_in_use` for JAX (XLA_PYTHON_CLIENT_PREALLOCATE=false) and `max_memory_allocated` for
torch (design.md, Performance).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
T = 48 * 1024


def synthetic_tokens(n_seqs: int, seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 50256, size=(n_seqs, T + 1))
    for row in out:
        pos = 0
        while pos < T + 1:
            row[pos] = 50256
            pos += max(16, int(rng.lognormal(np.log(600), 1.0)))
    return out


def visible_keys(tokens, window_blocks: int) -> float:
    """Mean number of keys a query attends to under the record26 §5.6 rule, long and short."""
    import numpy as np
    docs = np.cumsum(tokens == 50256)
    q = np.arange(len(tokens))
    start = np.searchsorted(docs, docs, side="left")  # first token of each query's document
    res = {}
    for w in (window_blocks, window_blocks // 2):
        lo = np.maximum(start, (q // 128 - max(w, 1) + 1) * 128)
        res[w] = float(np.mean(q - lo + 1))
    return res


def model_flops_per_token(tokens, window: int) -> float:
    d, V = 768, 50304
    dense = 11 * 4 * d * d + 12 * 8 * d * d + V * d  # qkv+proj (11 layers), mlp, head
    keys = visible_keys(tokens, window)
    long_layers, short_layers = 3, 8  # layers 0, 4, 11 long; 7 has no attention
    attn = 12 * d * (long_layers * keys[window] + short_layers * keys[window // 2])  # QK and PV: 4 fwd + 8 bwd
    return 6 * dense + attn


def bf16_peak_tflops() -> float:
    import torch
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192 ** 3 / (time.perf_counter() - t) / 1e12


def build_torch(seqs: int):
    """The reference's record step under torch.compile on synthetic sequences: step(window)."""
    import torch
    from ref import train_gpt as ref
    toks = torch.tensor(synthetic_tokens(seqs)).cuda()
    model = ref.GPT(50257, 12, 6, 768, 262144).cuda()
    with torch.no_grad():  # perturb the zero-initialised weights so the step does real work
        model.lm_head.weight.normal_(0, 1.0)
    opts = ref.build_optimizers(model, ref.Hyperparameters())
    net = torch.compile(model, dynamic=False)

    def step(window: int):
        wt = torch.tensor(window, dtype=torch.int32, device="cuda")
        for s in range(seqs):
            net(toks[s, :-1].int(), toks[s, 1:].long(), wt).backward()
        for p in model.parameters():
            p.grad.div_(seqs)
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)

    return step


def run_torch(args) -> dict:
    import torch
    train_step = build_torch(args.seqs)
    out = {"framework": "torch", "version": torch.__version__, "rows": {}}
    for w in args.windows:
        step = lambda: train_step(w)  # noqa: E731

        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(args.iters):
            step()
        torch.cuda.synchronize()
        out["rows"][w] = {"ms": 1000 * (time.perf_counter() - t) / args.iters,
                          "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        print(f"torch window {w}: {out['rows'][w]}", file=sys.stderr, flush=True)
    out["bf16_peak_tflops"] = bf16_peak_tflops()
    out["device"] = torch.cuda.get_device_name()
    return out


def build_jgpt(backend: str = "auto", remat: bool = True, seqs: int = 8, head_chunk: int | None = None):
    """jgpt's record train step (record26 preset, record precision) with its state and one batch
    of `seqs` synthetic sequences: (train_step, state, x, y)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.numpy as jnp
    from jgpt import config, model, optim, step as jstep
    cfg = config.preset("record26")
    params = model.init_params(cfg.model, jax.random.PRNGKey(0), "record")
    params["lm_head.weight"] = jax.random.normal(jax.random.PRNGKey(1), params["lm_head.weight"].shape) * 1.0
    opt = optim.build_optimizer(params, cfg.optim)
    train_step = jstep.make_train_step(cfg.model, opt, policy="record", backend=backend, remat=remat,
                                       head_chunk=head_chunk or model.HEAD_CHUNK)
    state = jstep.init_state(params, opt)
    toks = jnp.asarray(synthetic_tokens(seqs), jnp.int32)
    return train_step, state, toks[:, :-1], toks[:, 1:]


def parse_variant(text: str, flag: str = "--variant") -> tuple[str, dict]:
    """'name[:attn=TILES;head=TILES;qkv=TILES;head_out=f32|bf16;head_exp=accurate|fast;chunk=N;sum=f32|bf16;gemm=auto|convert|narrow;norm=auto|pallas|xla]' ->
    (name, settings): a jgpt configuration to time (TILES in each module's Tiles.parse form,
    head_out the forward FP8 GEMM's output, head_gpu.GEMM_OUT, head_exp the head kernels' exp,
    head_gpu.EXP, chunk the head's tokens per chunk, model.HEAD_CHUNK, sum the residual sum between
    blocks, model.BLOCK_SUM, gemm how a bf16 GEMM's product is rounded, model.GEMM_OUT, norm the
    block's add + norm as jgpt.norm_gpu kernels or XLA fusions, norm_gpu.MODE; unset settings keep
    their defaults)."""
    from jgpt import attention_gpu, head_gpu, model, qkv_gpu

    def head_out(value):
        if value not in ("f32", "bf16"):
            raise ValueError(f"head_out must be f32 or bf16, got {value!r}")

    def head_exp(value):
        if value not in ("accurate", "fast"):
            raise ValueError(f"head_exp must be accurate or fast, got {value!r}")

    def chunk(value):
        if not value.isdigit() or int(value) <= 0 or T % int(value):
            raise ValueError(f"chunk must divide the sequence's {T} tokens, got {value!r}")

    parsers = {"attn": attention_gpu.Tiles.parse, "head": head_gpu.Tiles.parse, "qkv": qkv_gpu.Tiles.parse,
               "head_out": head_out, "head_exp": head_exp, "chunk": chunk,
               "sum": partial(model.check_choice, "sum", choices=model.BLOCK_SUMS),
               "gemm": partial(model.check_choice, "gemm", choices=model.GEMM_OUTS),
               "norm": partial(model.check_choice, "norm", choices=("auto", "pallas", "xla"))}
    name, _, rest = text.partition(":")
    settings = {}
    for item in filter(None, rest.split(";")):
        key, eq, value = item.partition("=")
        if key not in parsers or not eq:
            raise ValueError(f"{flag} {text!r}: settings read attn=..., head=..., qkv=..., head_out=..., "
                             "head_exp=..., chunk=..., sum=..., gemm=... or norm=..., separated by ';'")
        try:
            parsers[key](value)  # fail here, not in the worker
        except (TypeError, ValueError) as e:
            raise ValueError(f"{flag} {text!r}: {e}") from None
        settings[key] = value
    if not name:
        raise ValueError(f"{flag} {text!r} needs a name before ':'")
    return name, settings


def apply_kernel_tiles(settings: dict) -> None:
    """Set every kernel family's tiles: the variant's, else the module default."""
    from jgpt import attention_gpu, head_gpu, model, norm_gpu, qkv_gpu
    for key, mod in (("attn", attention_gpu), ("head", head_gpu), ("qkv", qkv_gpu)):
        mod.set_tiles(mod.Tiles.parse(settings[key]) if key in settings else mod.Tiles())
    head_gpu.set_gemm_out(settings.get("head_out", head_gpu.DEFAULT_GEMM_OUT))
    head_gpu.set_exp(settings.get("head_exp", head_gpu.DEFAULT_EXP))
    model.set_block_sum(settings.get("sum", model.DEFAULT_BLOCK_SUM))
    model.set_gemm_out(settings.get("gemm", model.DEFAULT_GEMM_OUT))
    norm_gpu.set_mode(settings.get("norm", norm_gpu.DEFAULT_MODE))


def run_jax(args) -> dict:
    # before the first backend use (jax.devices below): peak_bytes_in_use is the step's own
    # memory only without preallocation (design.md, Performance)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    from jgpt import head_gpu, model, qkv_gpu
    model.HEAD_LOOP = args.head_loop
    head_gpu.set_mode(args.head_kernels)
    qkv_gpu.set_mode(args.qkv_kernels)
    out = {"framework": "jgpt", "version": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "remat": args.remat == "on", "backend": args.backend,
           "head_loop": args.head_loop, "head_kernels": args.head_kernels, "qkv_kernels": args.qkv_kernels,
           "variants": []}
    dev = jax.devices()[0]
    for text in args.variant or ["jgpt"]:
        name, settings = parse_variant(text)
        apply_kernel_tiles(settings)
        train_step, state, x, y = build_jgpt(args.backend, args.remat == "on", args.seqs,
                                             int(settings.get("chunk", 0)) or None)
        rows = {}
        for w in args.windows:
            t0 = time.perf_counter()
            state, m = train_step(state, x, y, w)
            jax.block_until_ready(m["loss"])
            compile_s = time.perf_counter() - t0
            for _ in range(args.warmup - 1):
                state, m = train_step(state, x, y, w)
            jax.block_until_ready(m["loss"])
            t = time.perf_counter()
            for _ in range(args.iters):
                state, m = train_step(state, x, y, w)
            jax.block_until_ready(m["loss"])
            rows[w] = {"ms": 1000 * (time.perf_counter() - t) / args.iters, "compile_s": compile_s,
                       "peak_gib": dev.memory_stats().get("peak_bytes_in_use", 0) / 2**30}
            print(f"{name} window {w}: {rows[w]}", file=sys.stderr, flush=True)
        out["variants"].append({"name": name, "settings": settings, "rows": rows})
        del train_step, state, x, y
    out["device"] = dev.device_kind
    return out


def table(results: list[dict], seqs: int) -> str:
    toks = synthetic_tokens(1)[0][:-1]
    peak = next((r["bf16_peak_tflops"] for r in results if "bf16_peak_tflops" in r), None)
    # (label, rows) per timed configuration: torch, then each jgpt variant
    timed = [("jgpt" if v["name"] == "jgpt" else f"jgpt [{v['name']}]", v["rows"])
             for r in results if r["framework"] == "jgpt" for v in r["variants"]]
    torch_rows = next((r["rows"] for r in results if r["framework"] == "torch"), None)
    if torch_rows is not None:
        timed.insert(0, ("torch", torch_rows))
    lines = [f"device: {results[0].get('device')} | " + " | ".join(f"{r['framework']} {r['version']}" for r in results)
             + (f" | measured bf16 matmul peak {peak:.0f} TFLOP/s" if peak else ""),
             "", "| window | framework | ms/step | tokens/s | model TFLOP/s | MFU | peak GiB | jgpt/torch |",
             "|---|---|---|---|---|---|---|---|"]
    get = lambda rows, w: rows.get(str(w)) or rows.get(w)  # noqa: E731 (JSON keys are strings)
    windows = sorted({int(w) for _, rows in timed for w in rows})
    for w in windows:
        flops = model_flops_per_token(toks, w) * seqs * T
        base = get(torch_rows, w) if torch_rows is not None else None
        for label, rows in timed:
            row = get(rows, w)
            if not row:
                continue
            tf = flops / (row["ms"] / 1000) / 1e12
            ratio = f"{row['ms'] / base['ms']:.2f}x" if base and label != "torch" else ""
            mfu = f"{100 * tf / peak:.0f}%" if peak else "-"
            lines.append(f"| {w} | {label} | {row['ms']:.0f} | {seqs * T / row['ms'] * 1000:,.0f} | {tf:.0f} | {mfu} | "
                         f"{row['peak_gib']:.1f} | {ratio} |")
    settings = [(v["name"], v["settings"]) for r in results if r["framework"] == "jgpt" for v in r["variants"]
                if v["settings"]]
    if settings:
        lines += [""] + [f"{name}: " + "; ".join(f"{k}={val}" for k, val in s.items()) for name, s in settings]
    flags = next((r.get("xla_flags") for r in results if r["framework"] == "jgpt" and r.get("xla_flags")), None)
    if flags:
        lines.append(f"jgpt XLA_FLAGS: {flags}")
    if sum(len(r["variants"]) for r in results if r["framework"] == "jgpt") > 1:
        lines.append("(jgpt peak GiB: the process's peak so far; a later variant shows at least the earlier ones')")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, nargs="+", default=[1, 7, 14])
    p.add_argument("--seqs", type=int, default=8, help="49,152-token sequences per step (record: 8)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--backend", default="auto", help="jgpt attention backend")
    p.add_argument("--remat", choices=["on", "off"], default="off",
                   help="jgpt: recompute each block in the backward pass (less memory, more work; the record "
                        "step fits an H100 without it, and the ratios in BENCHMARKS.md are without it)")
    p.add_argument("--head_loop", choices=["unrolled", "map"], default="unrolled",
                   help="jgpt: how the head's token chunks are looped (model.HEAD_LOOP)")
    p.add_argument("--head_kernels", choices=["auto", "pallas", "xla"], default="auto",
                   help="jgpt: the head's LSE and gradient passes as Pallas kernels or XLA fusions")
    p.add_argument("--qkv_kernels", choices=["auto", "pallas", "xla"], default="auto",
                   help="jgpt: QK-norm, rotary and value mix as Pallas kernels (jgpt.qkv_gpu) or XLA fusions")
    p.add_argument("--variant", action="append",
                   help="jgpt: time this configuration, "
                        "'name[:attn=TILES;head=TILES;qkv=TILES;head_out=f32|bf16;head_exp=accurate|fast;chunk=N;sum=f32|bf16;gemm=auto|convert|narrow;norm=auto|pallas|xla]' "
                        "(repeatable; tiles in jgpt.attention_gpu/head_gpu/qkv_gpu Tiles.parse form)")
    p.add_argument("--xla_flags", default=None,
                   help="XLA_FLAGS for the jgpt worker only (e.g. '--xla_gpu_exhaustive_tiling_search=true'); "
                        "they apply to every --variant of the run")
    add_worker_flags(p)
    args = p.parse_args(argv)
    if args.worker:
        return serve_worker(args, run_jax, run_torch)
    for text in args.variant or []:
        try:
            parse_variant(text)
        except ValueError as e:
            p.error(str(e))
    argv_for = ["--windows", *map(str, args.windows), "--seqs", str(args.seqs), "--iters", str(args.iters),
                "--warmup", str(args.warmup), "--backend", args.backend, "--remat", args.remat,
                "--head_loop", args.head_loop, "--head_kernels", args.head_kernels,
                "--qkv_kernels", args.qkv_kernels, *[f"--variant={v}" for v in args.variant or []]]
    env = {"jgpt": {"XLA_FLAGS": args.xla_flags}} if args.xla_flags is not None else None
    results = run_workers(__file__, [args.only] if args.only else ["torch", "jgpt"], argv_for, args.json, env)
    print(table(results, args.seqs))


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    """The flags every two-framework benchmark script shares: one framework per process."""
    p.add_argument("--only", choices=["jgpt", "torch"])
    p.add_argument("--worker", choices=["jgpt", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the raw results here")


def serve_worker(args, run_jax, run_torch) -> None:
    res = run_jax(args) if args.worker == "jgpt" else run_torch(args)
    print("RESULT " + json.dumps(res), flush=True)


def run_workers(script: str, frameworks: list[str], argv: list[str], json_path: str | None,
                env: dict[str, dict] | None = None) -> list[dict]:
    """Run `script --worker fw argv` per framework, each in its own process (no GPU memory
    shared; env[fw]: extra environment variables of that worker), and collect the RESULT lines;
    exits when none produced one."""
    results = []
    for fw in frameworks:
        r = subprocess.run([sys.executable, script, "--worker", fw, *argv], capture_output=True, text=True,
                           env={**os.environ, **((env or {}).get(fw) or {})})
        sys.stderr.write(r.stderr[-3000:])
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if r.returncode or line is None:
            print(f"{fw} worker failed (exit {r.returncode})", file=sys.stderr)
            continue
        results.append(json.loads(line[len("RESULT "):]))
    if not results:
        sys.exit("no framework produced a result")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
