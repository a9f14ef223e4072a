"""Text of one's own to token shards (the record's format, jgpt.data.write_shard).

Documents come from text files (one document per file, or cut on a separator) or JSONL (one
object per line, the text under a key); plain or gzipped. Each document becomes <|endoftext|>
followed by tiktoken's gpt2 encoding of its text (special-token strings inside the text stay
ordinary text, as in the record's fineweb.py). Documents run on across shard boundaries, so every
shard but the last holds exactly shard_size tokens. Encoding runs in worker processes with a
bounded queue, and the output order is the input order whatever the number of workers.
"""
from __future__ import annotations

import collections
import gzip
import io
import json
import multiprocessing
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from jgpt.data import write_shard

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_ENC = None


def _encoding():
    global _ENC
    if _ENC is None:
        import tiktoken  # optional at import time; downloads once, or reads TIKTOKEN_CACHE_DIR

        _ENC = tiktoken.get_encoding("gpt2")
    return _ENC


def encode_document(text: str) -> np.ndarray:
    enc = _encoding()
    return np.array([enc.eot_token, *enc.encode_ordinary(text)], dtype=np.uint16)


def _encode_many(texts: list[str]) -> list[np.ndarray]:
    return [encode_document(t) for t in texts]


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _kind(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return "jsonl" if name.endswith(JSONL_SUFFIXES) else "text"


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; folders become their files (recursive, sorted, hidden ones skipped)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise FileNotFoundError(f"input folder {p} holds no files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"input {p} does not exist")
    if not out:
        raise FileNotFoundError("no input files given")
    return out


def iter_documents(paths: Iterable[Path], *, fmt: str = "auto", text_key: str = "text",
                   separator: str | None = None) -> Iterator[str]:
    """Document texts in input order. Empty or whitespace-only documents are skipped."""
    for path in paths:
        kind = _kind(path, fmt)
        try:
            with _open_text(path) as f:
                if kind == "jsonl":
                    for lineno, line in enumerate(f, 1):
                        if not line.strip():
                            continue
                        try:
                            obj = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one JSON object "
                                             "per line") from None
                        if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
                            raise ValueError(f"{path}:{lineno}: expected an object with a string field "
                                             f"{text_key!r} (set --text_key)")
                        if obj[text_key].strip():
                            yield obj[text_key]
                elif kind == "text":
                    text = f.read()
                    for doc in (text.split(separator) if separator else [text]):
                        if doc.strip():
                            yield doc
                else:
                    raise ValueError(f"unknown input format {kind!r}; expected auto, text or jsonl")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _batches(texts: Iterable[str], max_chars: int = 1 << 20, max_docs: int = 256) -> Iterator[list[str]]:
    batch, chars = [], 0
    for t in texts:
        batch.append(t)
        chars += len(t)
        if chars >= max_chars or len(batch) >= max_docs:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_documents(texts: Iterable[str], workers: int = 1) -> Iterator[np.ndarray]:
    """Encoded documents (BOS first) in input order, over `workers` processes."""
    if workers <= 1:
        for batch in _batches(texts):
            yield from _encode_many(batch)
        return
    # spawn, not fork: safe whatever threads the parent runs (tqdm, jax); workers inherit sys.path.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_encoding) as pool:
        pending: collections.deque = collections.deque()
        # Bounded look-ahead: Pool.imap would read the whole corpus into memory ahead of the workers.
        for batch in _batches(texts):
            pending.append(pool.apply_async(_encode_many, (batch,)))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


class ShardWriter:
    """Cuts a token stream into shards of shard_size tokens named
    {out_dir}/{prefix}_{split}_{index:06d}.bin; the first val_shards shards are split "val"."""

    def __init__(self, out_dir, prefix: str, shard_size: int, *, split: str = "train", val_shards: int = 0,
                 on_write: Callable[[Path, int], None] | None = None):
        if shard_size < 1:
            raise ValueError(f"shard_size={shard_size} must be positive")
        self.out_dir, self.prefix, self.shard_size = Path(out_dir), prefix, shard_size
        self.split, self.val_shards, self.on_write = split, val_shards, on_write
        self.buf = np.empty(shard_size, dtype=np.uint16)
        self.fill = 0
        self.index = 0
        self.written: list[Path] = []
        self.tokens = 0

    def add(self, tokens: np.ndarray):
        while tokens.size:
            take = min(tokens.size, self.shard_size - self.fill)
            self.buf[self.fill:self.fill + take] = tokens[:take]
            self.fill += take
            tokens = tokens[take:]
            if self.fill == self.shard_size:
                self._flush()

    def _flush(self):
        split = "val" if self.index < self.val_shards else self.split
        path = self.out_dir / f"{self.prefix}_{split}_{self.index:06d}.bin"
        write_shard(path, self.buf[:self.fill])
        self.written.append(path)
        self.tokens += self.fill
        if self.on_write:
            self.on_write(path, self.fill)
        self.index += 1
        self.fill = 0

    def close(self) -> list[Path]:
        if self.fill:
            self._flush()
        return self.written


def tokenize_to_shards(inputs, out_dir, *, prefix: str = "data", shard_size: int = 10**8, split: str = "train",
                       val_shards: int = 0, workers: int | None = None, fmt: str = "auto", text_key: str = "text",
                       separator: str | None = None, progress: Callable[[int, int], None] | None = None,
                       on_write: Callable[[Path, int], None] | None = None, overwrite: bool = False) -> list[Path]:
    """Tokenize files (or folders) into shards; returns the paths written. progress(docs, tokens)
    is called with increments as documents are encoded. Existing shards of the same prefix are an
    error unless overwrite (stale shards of a longer earlier run would join the stream)."""
    paths = expand_inputs(inputs)
    old = sorted(Path(out_dir).glob(f"{prefix}_*_[0-9][0-9][0-9][0-9][0-9][0-9].bin"))
    if old and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {len(old)} shard(s) named {prefix}_*.bin ({old[0].name}, ...); "
                              "remove them, choose another prefix, or overwrite them (--overwrite)")
    for f in old:
        f.unlink()
    _encoding()  # fail here, with tiktoken's own message, before any worker starts
    writer = ShardWriter(out_dir, prefix, shard_size, split=split, val_shards=val_shards, on_write=on_write)
    docs = iter_documents(paths, fmt=fmt, text_key=text_key, separator=separator)
    n_docs = 0
    for toks in encode_documents(docs, workers or os.cpu_count() or 1):
        writer.add(toks)
        n_docs += 1
        if progress:
            progress(1, int(toks.size))
    if n_docs == 0:
        raise ValueError(f"no documents found in {len(paths)} input file(s) (all empty?)")
    return writer.close()
