#!/usr/bin/env python3
"""Turn text files or JSONL into token shards for jgpt (and the record's loader).

Each document becomes <|endoftext|> (50256) followed by its GPT-2 tokens (tiktoken "gpt2").
Shards are named OUT/PREFIX_SPLIT_000000.bin, ... in the record's format (256 x int32 header,
uint16 tokens); documents run on across shard boundaries.

Examples:
  python scripts/tokenize_text.py books/*.txt --out data/mybooks --split train
  python scripts/tokenize_text.py corpus.jsonl.gz --out data/web --val_shards 1 --shard_size 100000000
  python scripts/tokenize_text.py notes.txt --separator $'\\n\\n\\n' --out data/notes

Then train with --train_files 'data/web/data_train_*.bin' --val_files 'data/web/data_val_*.bin'.

tiktoken downloads the GPT-2 files on first use; offline, point TIKTOKEN_CACHE_DIR at a folder
that holds them (../shared/tiktoken-cache here).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

try:
    import jgpt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="text / JSONL files (.gz too) or folders of them")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--prefix", default="data", help="shard name prefix (default: data)")
    p.add_argument("--split", default="train", help="split name in the shard names (default: train)")
    p.add_argument("--val_shards", type=int, default=0,
                   help="name the first K shards 'val' (the record's fineweb.py convention: K=1)")
    p.add_argument("--shard_size", type=int, default=10**8, help="tokens per shard (default: 100,000,000)")
    p.add_argument("--format", dest="fmt", choices=("auto", "text", "jsonl"), default="auto",
                   help="input format; auto: .jsonl/.ndjson/.json are JSONL, anything else text")
    p.add_argument("--text_key", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--separator", default=None,
                   help="cut text files into documents on this string (default: one document per file)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards of the same prefix")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from jgpt.tokenize import tokenize_to_shards

    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(unit="tok", unit_scale=True, desc="tokenizing", file=sys.stderr, dynamic_ncols=True)
    docs = 0

    def progress(d, t):
        nonlocal docs
        docs += d
        bar.update(t)
        if docs % 64 == 0:
            bar.set_postfix(docs=docs, refresh=False)

    def on_write(path, n):
        if bar is not None:
            bar.write(f"wrote {path} ({n:,} tokens)", file=sys.stderr)

    try:
        written = tokenize_to_shards(
            args.inputs, args.out, prefix=args.prefix, shard_size=args.shard_size, split=args.split,
            val_shards=args.val_shards, workers=args.workers, fmt=args.fmt, text_key=args.text_key,
            separator=args.separator, progress=progress if bar is not None else None, on_write=on_write,
            overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        if bar is not None:
            bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    if bar is not None:
        bar.close()
    if not args.quiet:
        print(f"{docs:,} documents -> {len(written)} shard(s) in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
