"""The JAX trainer: `python -m jgpt.train` (console script `jgpt-train`).

    python -m jgpt.train                                   # no GPU, no FineWeb: "small" preset, synthetic data
    python -m jgpt.train --data ../shared/data/gutenberg   # any folder of *train*.bin / *val*.bin shards
    python -m jgpt.train --data fineweb --preset record26  # download FineWeb, run the record on all local GPUs
    # multi-host: the same command on every host, plus --coordinator_address host0:1234
    # --num_processes H --process_id 0..H-1 and an --out on a shared filesystem

Every field of ModelConfig, OptimConfig and RunConfig is a flag (`--num_layers 4 --seq_len 512
--num_iterations 30`); `--help` lists them. The loop is the record's (record26 §9-§10): an
untimed warm-up on a throwaway copy of the state, then steps 0..N-1 with validation at step 0,
every val_every steps and at N, excluded from the train time, and the record's log lines. The
step is compiled ahead of the timer: once for every window where the attention backend takes a
traced window (Pallas, dense), as the record compiles once with a dynamic window; once per
distinct window (14 in the record) on the blockwise backend.
Outputs in --out: log.txt, metrics.jsonl (one JSON object per event), loss.png, config.json and
checkpoints/ (Orbax; `--resume` continues a run exactly, bit for bit on CPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from jgpt import config
from jgpt.config import Config, ModelConfig, OptimConfig, RunConfig
from jgpt.synthetic import DataSource, fineweb_shards_needed, resolve_data  # noqa: F401 - the CLI's API

EXIT_SETTINGS, EXIT_DIVERGED = 2, 3


# ---------------------------------------------------------------------------------------------
# Presets beyond config.py's "record26" and "tiny"


def _small() -> Config:
    """The CPU default: the loss falls within a few minutes on a laptop (4,096 tokens per step;
    the 50304-way head is most of the work, design.md keeps the vocabulary)."""
    return Config(
        model=ModelConfig(num_layers=4, num_heads=2, model_dim=128, head_dim=64, max_seq_len=2048),
        optim=OptimConfig(num_iterations=30, muon_momentum_warmup=10, window_max_tokens=512),
        run=RunConfig(seq_len=512, seqs_per_step=8, val_seq_len=2048, val_tokens=16384, val_every=5,
                      warmup_steps=1, bos_search_span=65536))


def _gpu1() -> Config:
    """One GPU: the record's model, one 49,152-token sequence per step (design.md: ~330 steps on
    the Gutenberg shards), validation on 1,048,576 tokens (4 slices)."""
    return Config(optim=OptimConfig(num_iterations=300),
                  run=RunConfig(seqs_per_step=1, val_tokens=4 * 262144, val_every=50))


PRESETS = {**config.PRESETS, "small": _small, "gpu1": _gpu1}
SECTIONS = {"model": ModelConfig, "optim": OptimConfig, "run": RunConfig}
# Settings a resumed run may change without changing its trajectory.
RESUME_FREE = {"val_seq_len", "val_tokens", "val_every", "warmup_steps"}


METAVARS = {"int": "N", "float": "X", "int | None": "N|none", "tuple[int, ...] | None": "I,J,..|none",
            "tuple[float, float]": "X,Y", "tuple[float, float, float]": "X,Y,Z"}


def _parser_for(annotation: str):
    def parse(text: str):
        t = text.strip()
        if "None" in annotation and t.lower() == "none":
            return None
        if annotation.startswith("tuple"):
            elem = float if "float" in annotation else int
            return tuple(elem(v) for v in t.replace(" ", "").split(",") if v)
        return float(t) if annotation.startswith("float") else int(t)
    parse.__name__ = annotation  # argparse names the type in its error message
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jgpt-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    a = p.add_argument
    a("--preset", default="auto", help=f"one of {sorted(PRESETS)}; auto: record26 on GPU with FineWeb, "
                                       "gpu1 on another accelerator, small on CPU")
    a("--data", default="auto", help="auto (data/fineweb10B if present, else synthetic), synthetic, fineweb "
                                     "(download into --fineweb_dir), or a folder of *train*.bin and *val*.bin shards")
    a("--fineweb_dir", default="data/fineweb10B")
    a("--cycle_data", action="store_true", help="wrap around the training shards instead of stopping (record: no)")
    a("--policy", default="auto", choices=["auto", "record", "fp32", "fp64"],
      help="precision; auto: record on GPU/TPU, fp32 on CPU (bf16 matmuls are ~8x slower on most CPUs)")
    a("--ns_dtype", default="auto", choices=["auto", "bfloat16", "float32", "float64"],
      help="Newton-Schulz dtype; auto: bfloat16 (the record), float64 under --policy fp64")
    a("--backend", default="auto", help="attention backend (jgpt.attention.backends())")
    a("--out", default=None, help="run folder (default runs/<preset>-<time>)")
    a("--seed", type=int, default=0, help="init seed (the record has none)")
    a("--init_from", default=None, help="start from these weights: a jgpt .npz, a torch .pt state dict or a "
                                         "run's checkpoints/ folder (optimizer fresh, step 0)")
    a("--checkpoint_every", type=int, default=0, help="save every N steps (0: only at the end)")
    a("--keep_checkpoints", type=int, default=2)
    a("--no_checkpoint", action="store_true", help="save no checkpoint at all")
    a("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    a("--stop_after", type=int, default=None, help="stop once this many steps are done, without a final "
                                                    "save (an interruption, for tests)")
    a("--fsdp", action="store_true", help="shard params and optimizer state over the devices")
    a("--remat", default="auto", choices=["auto", "on", "off"],
      help="recompute each block in the backward pass; auto: off on accelerators with 48 GiB or more "
           "(a record-sized step peaks at ~27 GiB without it on an H100, BENCHMARKS.md), else on for "
           "sequences of 16,384 tokens or more")
    a("--head_gemm_out", default="bf16", choices=["f32", "bf16"],
      help="the FP8 head's forward GEMM output (jgpt.head_gpu.GEMM_OUT): bf16, cuBLASLt writes z with alpha "
           "approximated to 2.1e-7 (jgpt.fp8.fwd_bf16); f32, the record's exact alpha (slower on GPUs)")
    a("--head_exp", default="fast", choices=["accurate", "fast"],
      help="the FP8 head kernels' exp (jgpt.head_gpu.EXP): fast is exp2(x log2 e), Triton's own fp32 exp; "
           "accurate is libdevice's expf (GPU kernels only)")
    a("--block_sum", default="f32", choices=["f32", "bf16"],
      help="the residual sum between blocks (jgpt.model.BLOCK_SUM): f32, the next block's mix, the U-net skip "
           "add and the final norm read it unrounded, as the compiled record does; bf16, rounded first (eager torch)")
    a("--gemm_out", default="auto", choices=["auto", "convert", "narrow"],
      help="how a bf16 GEMM's product is rounded (jgpt.model.GEMM_OUT): narrow, the dot emits bf16 (on GPUs a "
           "cuBLASLt GEMM writing bf16, as the record's); convert, an fp32 dot and a convert; auto (default) "
           "picks the one that the backend's XLA keeps rounded: narrow on GPUs, convert elsewhere")
    a("--norm_kernels", default="xla", choices=["auto", "pallas", "xla"],
      help="each block's residual add + the MLP's input norm (jgpt.norm_gpu.MODE): auto, one Pallas kernel each "
           "way on GPUs; xla (default until timed on a GPU), XLA's fusions")
    a("--lazy_compile", action="store_true", help="compile each window when first reached (clock paused) "
                                                  "instead of all before the timer")
    g = p.add_argument_group("multi-host (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    g.add_argument("--coordinator_address", default=None)
    g.add_argument("--num_processes", type=int, default=None)
    g.add_argument("--process_id", type=int, default=None)
    g.add_argument("--multihost", action="store_true", help="jax.distributed.initialize() with cluster detection")
    for section, cls in SECTIONS.items():
        grp = p.add_argument_group(f"{cls.__name__} (record26 settings; default: the preset's)")
        for f in dataclasses.fields(cls):
            grp.add_argument(f"--{f.name}", type=_parser_for(str(f.type)), default=argparse.SUPPRESS,
                             metavar=METAVARS.get(str(f.type), "V"))
    return p


def config_from_args(base: Config, args) -> tuple[Config, dict]:
    """base with every --field given on the command line; returns (cfg, the overrides)."""
    overrides, parts = {}, {}
    for section, cls in SECTIONS.items():
        given = vars(args)  # absent flags are absent (SUPPRESS): "--head_dim none" is a value
        changes = {f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given}
        overrides.update(changes)
        parts[section] = config.replace(getattr(base, section), **changes)
    return Config(**parts), overrides


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> Config:
    def build(cls, values):
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    return Config(**{s: build(cls, d[s]) for s, cls in SECTIONS.items()})


def resume_changes(saved: Config, now: Config) -> tuple[list[str], list[str]]:
    """(model changes: the checkpoint cannot load; other changes: the resumed run departs from
    the original, e.g. a lower lr after a divergence)."""
    out: dict[str, list[str]] = {"model": [], "other": []}
    for s in SECTIONS:
        a, b = dataclasses.asdict(getattr(saved, s)), dataclasses.asdict(getattr(now, s))
        out["model" if s == "model" else "other"] += [f"{k}: checkpoint {a[k]!r}, now {b[k]!r}" for k in a
                                                      if a[k] != b[k] and k not in RESUME_FREE]
    return out["model"], out["other"]


# ---------------------------------------------------------------------------------------------
# The run (record26 §9-§10)


class TrainingDiverged(RuntimeError):
    """A non-finite loss or parameter: the run stops; its last good checkpoint stays."""


def _device_gib() -> float:
    """Memory of the first device in GiB; 0 where the backend does not say (the CPU)."""
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit", 0) / 2**30


def _host(x):
    """A (possibly multi-host) jax.Array as numpy on every process."""
    import numpy as np

    if x.is_fully_addressable:
        return np.asarray(x)
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _pick_preset(args, platform: str) -> str:
    if args.preset != "auto":
        if args.preset not in PRESETS:
            raise ValueError(f"--preset {args.preset!r}: choose one of {sorted(PRESETS)}")
        return args.preset
    if platform == "cpu":
        return "small"
    fw = Path(args.fineweb_dir)
    local_fw = args.data == "auto" and any(fw.glob("fineweb_train_*.bin"))
    return "record26" if args.data == "fineweb" or local_fw else "gpu1"


def run(args) -> float | None:
    """One training run from parsed flags; returns the final validation loss (None when
    --stop_after ended it early). Raises ValueError / FileNotFoundError for settings and data
    that cannot work (before anything compiles) and TrainingDiverged for a non-finite loss."""
    import jax

    from jgpt import sharding as shd

    shd.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id, auto=args.multihost)
    import jax.numpy as jnp
    import numpy as np

    from jgpt import head_gpu, model, norm_gpu, optim
    from jgpt import step as step_lib
    from jgpt.data import BatchLoader, DataExhausted, global_batch, validation_batches
    from jgpt.train_ckpt import RunLog, TrainCheckpointer, abstract_like, load_initial_params, peak_memory

    platform, master = jax.default_backend(), jax.process_index() == 0
    preset = _pick_preset(args, platform)
    out = Path(args.out) if args.out else Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    ckpt_dir = out / "checkpoints"
    meta = None
    if args.resume:
        if not args.out:
            raise ValueError("--resume needs --out, the folder of the run to continue")
        store = TrainCheckpointer(ckpt_dir, args.keep_checkpoints)  # one manager per run and folder
        meta = store.read_meta()
        saved = config_from_dict(meta["config"])
        cfg, _ = config_from_args(saved, args)
        shape_changes, changes = resume_changes(saved, cfg)
        if args.policy not in ("auto", meta["policy"]):
            shape_changes.append(f"policy: checkpoint {meta['policy']!r}, now {args.policy!r}")
        if shape_changes:
            raise ValueError(f"--resume: the checkpoint in {ckpt_dir} was trained with other model settings:\n  "
                             + "\n  ".join(shape_changes))
        if changes and master:
            print("warning: resuming with changed settings, so the run departs from the original:\n  "
                  + "\n  ".join(changes), file=sys.stderr, flush=True)
        policy = meta["policy"]
    else:
        if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
            raise ValueError(f"{out} already holds checkpoints: pass --resume to continue that run, "
                             "or choose another --out")
        cfg, _ = config_from_args(PRESETS[preset](), args)
        policy = args.policy if args.policy != "auto" else ("fp32" if platform == "cpu" else "record")
    if policy == "fp64":
        jax.config.update("jax_enable_x64", True)  # before the first array (model.compute_dtype)
    ns_name = args.ns_dtype if args.ns_dtype != "auto" else ("float64" if policy == "fp64" else "bfloat16")
    N, S, T = cfg.optim.num_iterations, cfg.run.seqs_per_step, cfg.run.seq_len
    remat = args.remat == "on" or (args.remat == "auto" and T >= 16384 and _device_gib() < 48)
    val_every, val_len = cfg.run.val_every, cfg.run.val_seq_len

    # Everything that can be wrong is checked before anything compiles (design.md, "Errors").
    mesh = shd.make_mesh()
    shd.check_divisible(S, cfg.run.val_tokens // val_len, mesh)
    if 0 < cfg.run.bos_search_span <= S * T:
        raise ValueError(f"bos_search_span={cfg.run.bos_search_span} cannot hold a step's {S} x {T} tokens and a "
                         f"closing BOS: set it above {S * T}, or 0 for the record's 2 x seqs_per_step x seq_len")
    if meta is not None and args.data == "auto":
        data = DataSource(**meta["data"])
    else:
        data = resolve_data(args.data, cfg, seed=args.seed, fineweb_dir=args.fineweb_dir, cycle=args.cycle_data)
    pi, pc = jax.process_index(), jax.process_count()

    def train_loader(state=None):
        return BatchLoader(data.train, T, S, cycle=data.cycle, max_span=cfg.run.bos_search_span or None,
                           process_index=pi, process_count=pc, state=state)

    def val_batches():
        return validation_batches(data.val, val_len, mesh.size, cfg.run.val_tokens, process_index=pi,
                                  process_count=pc)

    train_loader(meta["loader"] if meta else None)  # shard headers, one batch's worth of data
    val_batches()  # enough validation tokens

    ns_dtype = jnp.dtype(ns_name)
    abstract_params = jax.eval_shape(lambda: model.init_params(cfg.model, jax.random.PRNGKey(0), policy))
    optimizer = optim.build_optimizer(abstract_params, cfg.optim, ns_dtype=ns_dtype)
    shapes = jax.eval_shape(lambda: step_lib.init_state(abstract_params, optimizer))
    shardings = shd.state_shardings(shapes, mesh, args.fsdp)
    abstract = abstract_like(shapes, shardings)
    if meta is None:
        store = None if args.no_checkpoint else TrainCheckpointer(ckpt_dir, args.keep_checkpoints)
    ckpt = None if args.no_checkpoint else store
    if meta is not None:
        state, meta, start = store.restore_latest(abstract)
    else:
        start = 0
        if args.init_from:
            params = load_initial_params(args.init_from, cfg.model, policy, abstract)
        else:
            params = jax.device_get(model.init_params(cfg.model, jax.random.PRNGKey(args.seed), policy))
        host = jax.device_get(step_lib.init_state(params, optimizer))
        state = jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
                             host, shardings)
    stop = N if args.stop_after is None else min(N, max(args.stop_after, start))

    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out, master)
    if meta is not None:
        log.truncate_to(start)
    elif master:
        (out / "config.json").write_text(json.dumps({"preset": preset, "policy": policy, "ns_dtype": ns_name,
                                                     "head_gemm_out": args.head_gemm_out, "head_exp": args.head_exp,
                                                     "block_sum": args.block_sum, "gemm_out": args.gemm_out,
                                                     "norm_kernels": args.norm_kernels,
                                                     "data": dataclasses.asdict(data), "seed": args.seed,
                                                     "config": config_to_dict(cfg)}, indent=1) + "\n")
    nparams = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    fsdp_note = " | FSDP" if args.fsdp else ""
    log.print(f"jgpt {preset} | jax {jax.__version__} {platform} | {shd.describe(mesh)}{fsdp_note}")
    log.print(f"policy {policy}{' (default on ' + platform + ')' if args.policy == 'auto' else ''} | Newton-Schulz "
              f"{ns_name} | attention {args.backend}{' | remat' if remat else ''} | data {data.describe()}")
    log.print(f"model {nparams:,} params ({cfg.model.num_layers} layers, d={cfg.model.model_dim}) | {S} x {T} = "
              f"{S * T:,} tokens/step | {N} steps | val {cfg.run.val_tokens:,} tokens every {val_every} | out {out}")
    log.event("start", step=start, preset=preset, policy=policy, devices=mesh.size, resumed=meta is not None)

    head_gpu.set_gemm_out(args.head_gemm_out)  # both read when the step is traced
    head_gpu.set_exp(args.head_exp)
    model.set_block_sum(args.block_sum)
    model.set_gemm_out(args.gemm_out)
    norm_gpu.set_mode(args.norm_kernels)
    # one device: the plain jitted step (no shard_map around the kernels; same arithmetic)
    step_mesh = mesh if mesh.size > 1 or args.fsdp else None
    train_step = step_lib.make_train_step(cfg.model, optimizer, policy=policy, backend=args.backend, mesh=step_mesh,
                                          fsdp=args.fsdp, remat=remat)
    eval_batch = step_lib.make_eval_batch(cfg.model, policy=policy, backend=args.backend, mesh=step_mesh)
    bsh = shd.batch_sharding(mesh)
    xa = jax.ShapeDtypeStruct((S, T), jnp.int32, sharding=bsh)
    va = jax.ShapeDtypeStruct((mesh.size, val_len), jnp.int32, sharding=bsh)
    compiled: dict = {}
    # a traced window (Pallas / dense attention, jgpt.step.window_is_traced): one executable per
    # kind serves every window; otherwise one per (kind, window)
    traced = {"train": train_step.window_is_traced, "eval": eval_batch.window_is_traced}
    key = lambda kind, w: (kind, None if traced[kind] else w)  # noqa: E731

    def get(kind: str, w: int):
        k = key(kind, w)
        if k not in compiled:
            t = time.perf_counter()
            wa = jax.ShapeDtypeStruct((), jnp.int32) if traced[kind] else w
            fn = train_step.lower(abstract, xa, xa, wa) if kind == "train" else \
                eval_batch.lower(abstract.params, va, va, wa)
            compiled[k] = fn.compile()
            what = "every window (traced)" if traced[kind] else f"window {w} blocks"
            log.print(f"compiled {kind} step, {what}: {time.perf_counter() - t:.1f}s (untimed)")
        fn = compiled[k]
        return (lambda *a: fn(*a, np.int32(w))) if traced[kind] else fn

    window = lambda s: optim.window_blocks(s, cfg.optim)  # noqa: E731 - record26 §5.7
    is_val = lambda s: s == N or (val_every > 0 and s % val_every == 0)  # noqa: E731 - record26 §9
    if cfg.run.warmup_steps:  # record26 §10.3: compile and run untimed on a copy, then restore
        t = time.perf_counter()
        warm = jax.jit(lambda st: jax.tree.map(jnp.copy, st), out_shardings=shardings)(state)
        fn, wl = get("train", 1), train_loader()
        for _ in range(cfg.run.warmup_steps):
            b = global_batch(next(wl), bsh)
            warm, _ = fn(warm, b.inputs, b.targets)
        jax.block_until_ready(warm)
        del warm, wl
        log.print(f"warm-up: {cfg.run.warmup_steps} step(s) at window 1 on a copy of the state, "
                  f"{time.perf_counter() - t:.1f}s (untimed, state restored)")
    if not args.lazy_compile:
        for w in sorted({window(s) for s in range(start, stop)}):
            get("train", w)
        for w in sorted({window(s) for s in range(start, stop + 1) if is_val(s)}):
            get("eval", w)

    all_finite = jax.jit(lambda p: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(p)])))
    last_ckpt = [str(ckpt_dir / str(start)) if meta is not None else None]

    def diverged(what: str, s: int):
        where = last_ckpt[0] or "none was saved (use --checkpoint_every N)"
        msg = (f"{what} at step {s}/{N}: training diverged. The last checkpoint, saved before it with finite "
               f"parameters, is kept: {where}. Resume from it with lower learning rates (--resume --out {out} "
               f"--muon_lr ... --adam_lr_*), or check the data.")
        log.event("error", step=s, message=msg)
        raise TrainingDiverged(msg)

    def flush(p):
        if p is not None:
            s_done, m, ms, lr, w = p
            loss = float(_host(m["loss"]))
            log.event("train", step=s_done, loss=loss, train_time_ms=ms, step_avg_ms=ms / s_done, lr_factor=lr,
                      window=w)
            if not math.isfinite(loss):
                diverged(f"loss is {loss}", s_done)

    def save(s: int, train_ms: float, loader_state):
        if not bool(_host(all_finite(state.params))):
            diverged("parameters are not finite", s)
        t = time.perf_counter()
        path = ckpt.save(s, state, {"format": "jgpt-train", "version": 1, "step": s, "config": config_to_dict(cfg),
                                    "policy": policy, "data": dataclasses.asdict(data), "train_ms": train_ms,
                                    "loader": loader_state.to_dict(), "seed": args.seed})
        last_ckpt[0] = str(path)
        log.print(f"saved checkpoint {path} ({time.perf_counter() - t:.1f}s, untimed)")
        log.event("checkpoint", step=s, path=str(path))

    loader = train_loader(meta["loader"] if meta else None)  # record26 §10.4: a fresh loader
    train_ms = float(meta["train_ms"]) if meta else 0.0
    val_loss, pending, stopped = None, None, False
    jax.block_until_ready(state)

    def pause():  # the clock stops for validation, checkpoints and compiles (record26 §10.5)
        nonlocal train_ms, pending
        jax.block_until_ready(state)
        train_ms += 1000 * (time.perf_counter() - t0)
        flush(pending)
        pending = None

    t0 = time.perf_counter()
    for s in range(start, N + 1):
        if ckpt is not None and args.checkpoint_every > 0 and s % args.checkpoint_every == 0 and start < s < N:
            pause()
            save(s, train_ms, loader.state)
            t0 = time.perf_counter()
        if s == stop < N:
            pause()
            stopped = True
            log.print(f"stopped after step {s} (--stop_after), without a final checkpoint")
            break
        if is_val(s):
            pause()
            val_loss = 0.0
            for b in val_batches():
                b = global_batch(b, bsh)
                val_loss += float(_host(get("eval", window(s))(state.params, b.inputs, b.targets)).sum())
            val_loss /= cfg.run.val_tokens // val_len
            log.print(f"step:{s}/{N} val_loss:{val_loss:.4f} train_time:{train_ms:.0f}ms "
                      f"step_avg:{train_ms / max(s, 1):.2f}ms")
            log.event("val", step=s, val_loss=val_loss, train_time_ms=train_ms, step_avg_ms=train_ms / max(s, 1),
                      window=window(s))
            if not math.isfinite(val_loss):
                diverged(f"validation loss is {val_loss}", s)
            t0 = time.perf_counter()
        if s == N:
            break
        w = window(s)
        if key("train", w) not in compiled:
            pause()
            get("train", w)
            t0 = time.perf_counter()
        try:
            b = global_batch(next(loader), bsh)
        except DataExhausted as e:
            raise DataExhausted(f"at step {s}/{N}: {e} (--cycle_data wraps around)") from e
        state, metrics = get("train", w)(state, b.inputs, b.targets)
        # Waiting for the step before (its loss is logged a step late) keeps one step queued
        # on the device and the host at most one step ahead; no sync on this one (§10.5).
        prev, pending = pending, None
        flush(prev)
        approx = train_ms + 1000 * (time.perf_counter() - t0)
        pending = (s + 1, metrics, approx, optim.lr_factor(s, cfg.optim), w)
        log.print(f"step:{s + 1}/{N} train_time:{approx:.0f}ms step_avg:{approx / (s + 1):.2f}ms")
    if not stopped:
        log.print(f"final: val_loss:{val_loss:.4f} train_time:{train_ms:.0f}ms ({train_ms / 1000:.1f}s, the "
                  f"record's reported time) step_avg:{train_ms / max(N, 1):.2f}ms")
        if ckpt is not None and start < N:
            save(N, train_ms, loader.state)
    log.print(peak_memory())
    log.event("end", step=s, val_loss=val_loss, train_time_ms=train_ms, stopped=stopped, peak=peak_memory())
    plot = log.plot()
    if plot is not None:
        log.print(f"wrote {log.metrics} and {plot}")
    log.close()
    if store is not None:
        store.close()
    return None if stopped else val_loss


# ---------------------------------------------------------------------------------------------
# Entry point


def main(argv=None) -> int:
    from jgpt.data import DataExhausted
    from jgpt.train_ckpt import NoCheckpoint

    args = build_parser().parse_args(argv)
    try:
        final = run(args)
    except TrainingDiverged as e:
        print(f"jgpt-train: stopped: {e}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except (ValueError, FileNotFoundError, DataExhausted, NoCheckpoint) as e:
        print(f"jgpt-train: error: {e}", file=sys.stderr, flush=True)
        return EXIT_SETTINGS
    return 0 if final is None or math.isfinite(final) else EXIT_DIVERGED


if __name__ == "__main__":
    sys.exit(main())
