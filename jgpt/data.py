"""Token shards and the record's batches (record26 §8).

A shard is a 256 x int32 little-endian header (magic 20240520, version 1, token count, zeros),
then that many little-endian uint16 GPT-2 token ids. Shards are memory-mapped, never read whole.

Training batches are BOS-aligned: each sequence starts at a BOS token, the next one at the first
BOS at or after the previous start + seq_len, and the stream advances to the BOS that closes the
last window. Validation batches are unaligned consecutive slices. Both follow the record's tail
rule: before each batch, when pos + max_span + 1 >= len(shard), the rest of the shard is dropped
and the next file (sorted glob order) starts at pos 0.

Everything here is numpy; the position in the stream (`LoaderState`) is a small JSON-able record
that a checkpoint saves, so a resumed run reads exactly the batches it would have read.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from jgpt.config import BOS_ID

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKEN = 2**16 - 1


class ShardError(ValueError):
    """A shard file whose header or size is not what the format requires."""


class DataExhausted(RuntimeError):
    """The training files ran out (the record does not cycle; pass cycle=True to wrap)."""


# ---------------------------------------------------------------------------------------------
# Shard files


def read_shard_header(path) -> int:
    """Check a shard's header against its file size; return its token count."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} does not exist" if not path.exists() else f"shard {path} is not a file")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"shard {path} is truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header "
                         f"({HEADER_INTS} x int32)")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"shard {path} has magic {int(header[0])}, expected {SHARD_MAGIC}: not a token shard "
                         "(256 x int32 header, then uint16 tokens)")
    if header[1] != SHARD_VERSION:
        raise ShardError(f"shard {path} has version {int(header[1])}, expected {SHARD_VERSION}")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise ShardError(f"shard {path} is {what}: the header says {count} tokens, i.e. {expected} bytes, "
                         f"but the file has {size} bytes")
    return count


def load_shard(path) -> np.ndarray:
    """The tokens of a checked shard as a read-only uint16 memory map."""
    count = read_shard_header(path)
    if count == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))


def _check_tokens(tokens, where: str) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"{where}: tokens must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{where}: tokens must be integers, got dtype {arr.dtype}")
    if arr.size and arr.dtype != np.uint16:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > MAX_TOKEN:
            bad = int(np.flatnonzero((arr < 0) | (arr > MAX_TOKEN))[0])
            raise ValueError(f"{where}: token {int(arr[bad])} at index {bad} does not fit uint16 (0..{MAX_TOKEN})")
    if arr.size >= 2**31:
        raise ValueError(f"{where}: {arr.size} tokens do not fit the int32 token count of the header")
    return arr.astype("<u2", copy=False)


def write_shard(path, tokens) -> Path:
    """Write a shard atomically: a temporary file in the same folder, fsync, then rename, so an
    interrupted write never leaves a file under the final name."""
    path = Path(path)
    body = _check_tokens(tokens, f"shard {path}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, body.size
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header.tobytes())
            f.write(body.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def list_shards(files) -> list[Path]:
    """A glob pattern (sorted, as in the record) or an explicit list of paths."""
    if isinstance(files, (str, os.PathLike)):
        pattern = os.fspath(files)
        found = sorted(glob.glob(os.path.expanduser(pattern)))
        if not found:
            folder = os.path.dirname(pattern) or "."
            hint = "" if os.path.isdir(folder) else f"; the folder {folder!r} does not exist"
            raise FileNotFoundError(f"no shard matches {pattern!r}{hint}")
        return [Path(f) for f in found]
    paths = [Path(f) for f in files]
    if not paths:
        raise FileNotFoundError("empty list of shard files")
    return paths


# ---------------------------------------------------------------------------------------------
# Batch rules (record26 §8)


def find_batch_starts(tokens: np.ndarray, pos: int, seq_len: int, num_seqs: int, max_span: int,
                      source: str = "tokens") -> tuple[list[int], int]:
    """The record's BOS-aligned starts: the first BOS at or after pos, then each next start the
    first BOS at or after the previous start + seq_len, all within tokens[pos : pos + max_span].
    Returns (starts, span) where pos + span is the BOS that closes the last sequence."""
    window = np.asarray(tokens[pos:pos + max_span])
    bos = np.flatnonzero(window == BOS_ID)
    starts: list[int] = []
    if bos.size:
        start = int(bos[0])
        while True:
            # Same as the record's scan: the first later BOS e with e - start >= seq_len.
            k = int(np.searchsorted(bos, start + seq_len, side="left"))
            if k == bos.size:
                break
            starts.append(pos + start)
            end = int(bos[k])
            if len(starts) == num_seqs:
                return starts, end
            start = end
    raise ValueError(
        f"{source}: found {len(starts)} of {num_seqs} BOS-aligned sequences of {seq_len} tokens in the "
        f"{max_span}-token search span at position {pos}; expected {num_seqs} starts, each a BOS (id {BOS_ID}) at "
        f"least {seq_len} tokens after the previous one, and a closing BOS, all within the span. A document "
        f"longer than the span, or data without document starts: raise max_span or lower seq_len")


def local_slice(total: int, index: int, count: int, what: str = "num_seqs",
                unit: str = "processes") -> slice:
    """The contiguous chunk `index` of `count` equal chunks of range(total)."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"index {index} is not in 0..{count - 1} {unit}")
    if total % count:
        raise ValueError(f"{what}={total} is not divisible by {count} {unit}; choose {what} a multiple of {count}")
    n = total // count
    return slice(index * n, (index + 1) * n)


def device_slices(n_local_seqs: int, num_devices: int) -> list[slice]:
    """Per-device rows of a process's batch (each device its own whole sequences, as in the record)."""
    return [local_slice(n_local_seqs, d, num_devices, "sequences per process", "local devices")
            for d in range(num_devices)]


def global_batch(batch: "Batch", sharding) -> "Batch":
    """Assemble each process's rows into global jax.Arrays laid out by `sharding` (rows over the
    data axis); a thin wrapper over jax.make_array_from_process_local_data."""
    import jax  # jgpt.data stays importable without jax initialised

    return Batch(*(jax.make_array_from_process_local_data(sharding, x) for x in batch))


# ---------------------------------------------------------------------------------------------
# Loaders


class Batch(NamedTuple):
    inputs: np.ndarray  # [n_local_seqs, seq_len] int32
    targets: np.ndarray  # [n_local_seqs, seq_len], inputs shifted by one


@dataclass
class LoaderState:
    """Where the next batch starts. JSON-able through to_dict / from_dict."""

    file_index: int = 0
    pos: int = 0
    epoch: int = 0  # completed passes over the files (cycle=True only)
    batches: int = 0  # batches returned so far
    file: str = ""  # name of files[file_index], checked on restore

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderState":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"loader state has unknown keys {unknown}; expected some of {sorted(names)}")
        return cls(**d)


class BatchLoader:
    """The record's loader as an iterator of `Batch`.

    files: a glob pattern (sorted) or a list of shard paths. Each batch is num_seqs sequences of
    seq_len tokens; this process gets the contiguous chunk process_index of process_count.
    align_to_bos: training batches (True) or validation slices (False). max_span: the BOS search
    span, default the record's 2 * num_seqs * seq_len (num_seqs * seq_len when unaligned).
    cycle: wrap to the first file instead of raising DataExhausted (off, as in the record).
    state: a LoaderState (or its dict) to resume from.
    """

    def __init__(self, files, seq_len: int, num_seqs: int = 8, *, align_to_bos: bool = True,
                 cycle: bool = False, max_span: int | None = None, process_index: int = 0,
                 process_count: int = 1, targets_dtype=np.int32, state: LoaderState | dict | None = None):
        if seq_len < 1 or num_seqs < 1:
            raise ValueError(f"seq_len={seq_len} and num_seqs={num_seqs} must be positive")
        self.files = list_shards(files)
        self.pattern = os.fspath(files) if isinstance(files, (str, os.PathLike)) else None
        self.seq_len, self.num_seqs = seq_len, num_seqs
        self.align_to_bos, self.cycle = align_to_bos, cycle
        self.rows = local_slice(num_seqs, process_index, process_count)
        self.targets_dtype = np.dtype(targets_dtype)
        if not align_to_bos:
            self.max_span = num_seqs * seq_len
        else:
            self.max_span = 2 * num_seqs * seq_len if max_span is None else int(max_span)
            if self.max_span < num_seqs * seq_len + 1:
                raise ValueError(f"max_span={self.max_span} cannot hold {num_seqs} sequences of {seq_len} tokens "
                                 f"and a closing BOS (needs >= {num_seqs * seq_len + 1})")
        # Check every header now, so a bad shard fails at start-up and not hours into a run.
        self.sizes = [read_shard_header(f) for f in self.files]
        self._usable = [n > self.max_span + 1 for n in self.sizes]  # tail rule at pos 0
        if not any(self._usable):
            big = int(np.argmax(self.sizes))
            raise ValueError(
                f"data too short for one batch: the largest shard, {self.files[big]}, has {self.sizes[big]} tokens, "
                f"but one batch of {num_seqs} x {seq_len} tokens needs a shard of more than {self.max_span + 1} "
                f"(search span {self.max_span} + 1); use fewer or shorter sequences (seqs_per_step, seq_len)")
        self._warned: set[int] = set()
        self._tokens: np.ndarray | None = None
        self._loaded = -1
        st = state if isinstance(state, LoaderState) else LoaderState.from_dict(state or {})
        self._state = dataclasses.replace(st)
        self._check_state()

    def _check_state(self):
        st = self._state
        if not 0 <= st.file_index < len(self.files):
            raise ValueError(f"loader state file_index={st.file_index} is outside the {len(self.files)} shard(s) "
                             f"{self._describe()}")
        name = self.files[st.file_index].name
        if st.file and st.file != name:
            raise ValueError(f"loader state was saved at shard {st.file!r} (index {st.file_index}), but that index "
                             f"is now {name!r} {self._describe()}: the data files changed since the checkpoint")
        if not 0 <= st.pos <= self.sizes[st.file_index]:
            raise ValueError(f"loader state pos={st.pos} is outside shard {self.files[st.file_index]} "
                             f"({self.sizes[st.file_index]} tokens)")
        st.file = name

    def _describe(self) -> str:
        return f"of {self.pattern!r}" if self.pattern is not None else f"in {self.files[0].parent}"

    @property
    def state(self) -> LoaderState:
        return dataclasses.replace(self._state)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def _shard(self) -> np.ndarray:
        if self._loaded != self._state.file_index:
            self._tokens = load_shard(self.files[self._state.file_index])
            self._loaded = self._state.file_index
        return self._tokens

    def _advance_file(self):
        st = self._state
        st.file_index, st.pos = st.file_index + 1, 0
        if st.file_index == len(self.files):
            if not self.cycle:
                st.file_index -= 1
                st.pos = self.sizes[st.file_index]
                raise DataExhausted(
                    f"data exhausted after {st.batches} batch(es): all {len(self.files)} shard(s) {self._describe()} "
                    f"are used up (no cycling, as in the record); add shards, train fewer steps, or set cycle=True")
            st.file_index, st.epoch = 0, st.epoch + 1
        st.file = self.files[st.file_index].name

    def __next__(self) -> Batch:
        st = self._state
        while st.pos + self.max_span + 1 >= self.sizes[st.file_index]:  # tail rule (record26 §8)
            i = st.file_index
            if not self._usable[i] and i not in self._warned:
                self._warned.add(i)
                warnings.warn(f"skipping shard {self.files[i]}: {self.sizes[i]} tokens, too short for one batch "
                              f"(needs more than {self.max_span + 1})", stacklevel=2)
            self._advance_file()
        tokens = self._shard()
        if self.align_to_bos:
            starts, span = find_batch_starts(tokens, st.pos, self.seq_len, self.num_seqs, self.max_span,
                                             source=f"shard {self.files[st.file_index]}")
        else:
            starts = [st.pos + r * self.seq_len for r in range(self.num_seqs)]
            span = self.max_span
        mine = starts[self.rows]
        if self.targets_dtype == np.int32:
            # One allocation for both: steady-state reuse by the allocator (measured: two separate
            # 1.5 MB arrays got fresh, page-faulting memory each batch, 10x slower).
            inputs, targets = np.empty((2, len(mine), self.seq_len), dtype=np.int32)
        else:
            inputs = np.empty((len(mine), self.seq_len), dtype=np.int32)
            targets = np.empty((len(mine), self.seq_len), dtype=self.targets_dtype)
        for i, s in enumerate(mine):
            buf = tokens[s:s + self.seq_len + 1]
            inputs[i] = buf[:-1]
            targets[i] = buf[1:]
        st.pos += span
        st.batches += 1
        return Batch(inputs, targets)


def batches_available(sizes: Sequence[int], span: int) -> int:
    """How many unaligned batches of `span` tokens shards of these sizes give under the tail rule."""
    return sum((n - span - 2) // span + 1 for n in sizes if n >= span + 2)


def validation_batches(files, seq_len: int, num_seqs: int = 8, val_tokens: int = 10485760, *,
                       process_index: int = 0, process_count: int = 1,
                       targets_dtype=np.int32) -> Iterator[Batch]:
    """The record's validation: the first val_tokens tokens (10,485,760 by default) as unaligned
    batches of num_seqs slices of seq_len, from position 0 of the first file. Checked up front,
    so a short validation set fails before training starts, not at the first evaluation."""
    per_batch = num_seqs * seq_len
    if val_tokens < per_batch or val_tokens % per_batch:
        raise ValueError(f"val_tokens={val_tokens} must be a positive multiple of num_seqs x seq_len = "
                         f"{num_seqs} x {seq_len} = {per_batch}")
    loader = BatchLoader(files, seq_len, num_seqs, align_to_bos=False, process_index=process_index,
                         process_count=process_count, targets_dtype=targets_dtype)
    steps = val_tokens // per_batch
    have = batches_available(loader.sizes, per_batch)
    if have < steps:
        raise ValueError(f"validation needs val_tokens={val_tokens} ({steps} batch(es) of {num_seqs} x {seq_len}) but "
                         f"the shard(s) {loader._describe()} ({sum(loader.sizes)} tokens) hold {have} under the tail "
                         f"rule; lower val_tokens to at most {have * per_batch}")

    def gen():
        for _ in range(steps):
            yield next(loader)

    return gen()


def _bench(argv=None):
    import argparse
    import time

    p = argparse.ArgumentParser(prog="python -m jgpt.data",
                                description="Batches per second of the BOS-aligned training loader.")
    p.add_argument("files", help="glob pattern of training shards")
    p.add_argument("--seq_len", type=int, default=48 * 1024)
    p.add_argument("--num_seqs", type=int, default=8)
    p.add_argument("--max_span", type=int, default=None, help="BOS search span (default 2 x num_seqs x seq_len)")
    p.add_argument("--batches", type=int, default=200)
    a = p.parse_args(argv)
    loader = BatchLoader(a.files, a.seq_len, a.num_seqs, cycle=True, max_span=a.max_span)
    next(loader)  # map the first shard
    t0 = time.perf_counter()
    batch = None
    for _ in range(a.batches):
        batch = next(loader)  # noqa: F841  (held while the next one is built, as in a training loop)
    dt = time.perf_counter() - t0
    tokens = a.batches * a.seq_len * a.num_seqs
    print(f"{a.batches} batches of {a.num_seqs} x {a.seq_len}: {a.batches / dt:.1f} batches/s, "
          f"{1e3 * dt / a.batches:.2f} ms/batch, {tokens / dt / 1e6:.1f}M tokens/s "
          f"({loader.state.epoch} wrap(s) over {len(loader.files)} shard(s))")


if __name__ == "__main__":
    _bench()
