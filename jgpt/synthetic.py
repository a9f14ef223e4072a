"""The built-in default corpus: seeded synthetic documents over GPT-2 token ids.

A fresh clone has neither FineWeb nor ../shared (design.md, "Data"), so the main command trains
on data the project makes itself, with no download. The documents come from a small seeded
Markov process, learnable enough that the loss falls visibly within a few dozen steps:

* a vocabulary of `num_states` GPT-2 ids (a seeded draw from 0..50255; never BOS);
* Zipf-distributed "unigram" frequencies over those ids;
* each id has `num_successors` likely successors (drawn from the unigram law) with Zipf
  weights; with probability `p_restart` the next token is a fresh unigram draw instead;
* document lengths are log-normal (median `median_doc_len`, clipped), each document starts
  with BOS = 50256 (record26 §8: the loader aligns sequences to document starts).

A model first learns the unigram law (the loss drops from ln 50304 = 10.8 to about 6 nats)
and then the successor tables (towards the process's entropy rate, about 2 nats with the
defaults). Same seed and sizes -> the same bytes: the shards are written once into a cache
folder whose name holds every setting, atomically (a temporary folder, then a rename), and
reused afterwards.

`resolve_data` picks the trainer's data: this corpus, FineWeb (downloaded on request) or a
folder of shards.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from jgpt.config import BOS_ID
from jgpt.data import write_shard

FORMAT_VERSION = 1
SHARD_TOKENS = 1 << 24  # at most 16.8M tokens per file (the record's shards hold 100M)


@dataclass(frozen=True)
class SyntheticSpec:
    seed: int = 0
    train_tokens: int = 1 << 21
    val_tokens: int = 1 << 17
    num_states: int = 2048
    num_successors: int = 8
    zipf_unigram: float = 1.1
    zipf_successor: float = 1.5
    p_restart: float = 0.1
    median_doc_len: int = 300
    max_doc_len: int = 2048
    min_doc_len: int = 16

    def folder_name(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        return f"synthetic-v{FORMAT_VERSION}-seed{self.seed}-{self.train_tokens}-{self.val_tokens}-{digest}"


def cache_root() -> Path:
    """$JGPT_CACHE, else $XDG_CACHE_HOME/jgpt, else ~/.cache/jgpt."""
    if os.environ.get("JGPT_CACHE"):
        return Path(os.environ["JGPT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "jgpt"


class MarkovSource:
    """The process: vocabulary, unigram law and successor tables, all from one seed."""

    def __init__(self, spec: SyntheticSpec):
        rng = np.random.default_rng([spec.seed, 0])
        n, k = spec.num_states, spec.num_successors
        self.ids = rng.choice(BOS_ID, size=n, replace=False).astype(np.uint16)  # ids 0..50255
        uni = 1.0 / np.arange(1, n + 1) ** spec.zipf_unigram
        self.unigram_cdf = np.cumsum(uni / uni.sum())
        self.successors = np.searchsorted(self.unigram_cdf, rng.random((n, k)), side="right").clip(0, n - 1)
        w = 1.0 / np.arange(1, k + 1) ** spec.zipf_successor
        self.successor_cdf = np.cumsum(w / w.sum())
        self.spec = spec

    def _draw(self, cdf: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
        return np.searchsorted(cdf, rng.random(size), side="right").clip(0, len(cdf) - 1)

    def documents(self, rng: np.random.Generator, num_docs: int) -> list[np.ndarray]:
        """num_docs documents as uint16 arrays, each BOS + tokens. All documents advance in
        lockstep (one vectorised draw per position), so generation costs max_doc_len numpy
        steps per batch of documents, not one Python step per token."""
        s = self.spec
        mu = np.log(s.median_doc_len)
        lengths = np.clip(np.round(rng.lognormal(mu, 0.8, num_docs)), s.min_doc_len, s.max_doc_len).astype(np.int64)
        longest = int(lengths.max())
        states = np.empty((num_docs, longest), dtype=np.int64)
        cur = self._draw(self.unigram_cdf, rng, num_docs)
        states[:, 0] = cur
        for t in range(1, longest):
            restart = rng.random(num_docs) < s.p_restart
            fresh = self._draw(self.unigram_cdf, rng, num_docs)
            follow = self.successors[cur, self._draw(self.successor_cdf, rng, num_docs)]
            cur = np.where(restart, fresh, follow)
            states[:, t] = cur
        tokens = self.ids[states]
        bos = np.array([BOS_ID], dtype=np.uint16)
        return [np.concatenate([bos, tokens[i, :lengths[i] - 1]]) for i in range(num_docs)]

    def stream(self, rng: np.random.Generator, num_tokens: int, batch_docs: int = 1024) -> np.ndarray:
        """Whole documents until at least num_tokens tokens, cut to exactly num_tokens."""
        parts, have = [], 0
        while have < num_tokens:
            for doc in self.documents(rng, batch_docs):
                parts.append(doc)
                have += doc.size
                if have >= num_tokens:
                    break
        return np.concatenate(parts)[:num_tokens]


def _write_split(folder: Path, prefix: str, tokens: np.ndarray) -> list[Path]:
    paths = []
    for i, start in enumerate(range(0, tokens.size, SHARD_TOKENS)):
        paths.append(write_shard(folder / f"{prefix}_{i:06d}.bin", tokens[start:start + SHARD_TOKENS]))
    return paths


def generate(spec: SyntheticSpec, folder) -> Path:
    """Write train_*.bin and val_*.bin of `spec` into `folder` (created), plus spec.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = MarkovSource(spec)
    # Separate streams for train and val, so the val documents do not depend on train_tokens.
    train = source.stream(np.random.default_rng([spec.seed, 1]), spec.train_tokens)
    val = source.stream(np.random.default_rng([spec.seed, 2]), spec.val_tokens)
    _write_split(folder, "train", train)
    _write_split(folder, "val", val)
    (folder / "spec.json").write_text(json.dumps(asdict(spec), indent=1) + "\n")
    return folder


def ensure(spec: SyntheticSpec, root=None) -> Path:
    """The folder of `spec`'s shards under `root` (default cache_root()), generated on first
    use into a temporary folder and renamed into place, so an interrupted generation leaves
    nothing under the final name and concurrent runs agree on the bytes."""
    root = Path(root) if root is not None else cache_root()
    final = root / spec.folder_name()
    if (final / "spec.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        generate(spec, tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "spec.json").is_file():  # not a concurrent writer's finished copy
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def round_up(n: int, unit: int = 1 << 20) -> int:
    return -(-n // unit) * unit


def spec_for_run(*, seed: int, num_iterations: int, tokens_per_step: int, max_span: int, val_tokens: int,
                 warmup_steps: int = 0) -> SyntheticSpec:
    """A corpus big enough for a run without cycling: BOS-aligned sequences skip to the next
    document start, which wastes up to one document per sequence, so twice the tokens the
    steps consume, plus one search span for the loader's tail rule (record26 §8), rounded up
    to a MiB of tokens so that nearby settings share one cached corpus."""
    steps = max(num_iterations, warmup_steps)
    train = round_up(2 * steps * tokens_per_step + max_span + 2)
    val = round_up(val_tokens + 2, 1 << 16)
    return SyntheticSpec(seed=seed, train_tokens=train, val_tokens=val)


# ---------------------------------------------------------------------------------------------
# Choosing the training data (the trainer's --data)


@dataclass
class DataSource:
    name: str
    train: str  # glob pattern, sorted as the record does
    val: str
    cycle: bool = False

    def describe(self) -> str:
        return f"{self.name} (train {self.train}, val {self.val}{', cycled' if self.cycle else ''})"


def _fineweb_download(folder: Path, num_train: int) -> None:
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "scripts" / "download_fineweb.py"
    if not script.is_file():
        raise FileNotFoundError(f"--data fineweb needs {script} (a jgpt checkout); or download the shards into "
                                f"{folder} yourself and pass --data {folder}")
    spec = importlib.util.spec_from_file_location("jgpt_download_fineweb", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = [n for n in module.shard_names(num_train) if not (folder / n).exists()]
    if missing:
        print(f"downloading {len(missing)} FineWeb shard(s) into {folder}", flush=True)
        errors = module.download(num_train, folder)
        if errors:
            raise FileNotFoundError("FineWeb download failed:\n  " + "\n  ".join(errors))


def fineweb_shards_needed(cfg) -> int:
    """100M tokens per shard; BOS alignment and the tail rule drop a few percent (record26 §8):
    the record's 1,750 steps read a little over 7 shards, hence 8."""
    return max(1, math.ceil(cfg.optim.num_iterations * cfg.run.tokens_per_step * 1.1 / 1e8))


def resolve_data(spec: str, cfg, *, seed: int, fineweb_dir: str, cycle: bool, download: bool = True
                 ) -> DataSource:
    """--data: "auto" (FineWeb in fineweb_dir if its shards are there, else this corpus),
    "synthetic" (this corpus, sized for cfg's run), "fineweb" (fetch the shards the run needs
    with scripts/download_fineweb.py unless present) or a folder of *train*.bin / *val*.bin."""
    fw = Path(fineweb_dir)
    has_fineweb = any(fw.glob("fineweb_train_*.bin")) and any(fw.glob("fineweb_val_*.bin"))
    if spec == "auto":
        spec = "fineweb-local" if has_fineweb else "synthetic"
    if spec in ("fineweb", "fineweb-local"):
        if spec == "fineweb" and download:
            _fineweb_download(fw, fineweb_shards_needed(cfg))
        return DataSource("fineweb", str(fw / "fineweb_train_*.bin"), str(fw / "fineweb_val_*.bin"), cycle)
    if spec == "synthetic":
        span = cfg.run.bos_search_span or 2 * cfg.run.tokens_per_step
        want = spec_for_run(seed=seed, num_iterations=cfg.optim.num_iterations,
                            tokens_per_step=cfg.run.tokens_per_step, max_span=span,
                            val_tokens=cfg.run.val_tokens, warmup_steps=cfg.run.warmup_steps)
        cap = round_up(64 * 2**20 + span)  # ~1 min to generate; larger runs cycle over it
        if want.train_tokens > cap:
            want, cycle = replace(want, train_tokens=cap), True
        folder = ensure(want)
        return DataSource(f"synthetic:{folder.name}", str(folder / "train_*.bin"), str(folder / "val_*.bin"), cycle)
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"--data {spec}: no such folder (expected auto, synthetic, fineweb or a folder of "
                                "*train*.bin and *val*.bin shards)")
    for kind in ("train", "val"):
        if not any(folder.glob(f"*{kind}*.bin")):
            raise FileNotFoundError(f"--data {folder}: no {kind} shards (*{kind}*.bin) in the folder")
    return DataSource(str(folder), str(folder / "*train*.bin"), str(folder / "*val*.bin"), cycle)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m jgpt.synthetic",
                                description="Write the built-in synthetic corpus (train_*.bin, val_*.bin).")
    p.add_argument("out", help="folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train_tokens", type=int, default=SyntheticSpec.train_tokens)
    p.add_argument("--val_tokens", type=int, default=SyntheticSpec.val_tokens)
    a = p.parse_args(argv)
    folder = generate(SyntheticSpec(seed=a.seed, train_tokens=a.train_tokens, val_tokens=a.val_tokens), a.out)
    print(f"wrote {folder}: {a.train_tokens:,} train and {a.val_tokens:,} val tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
