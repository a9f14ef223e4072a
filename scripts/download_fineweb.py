#!/usr/bin/env python3
"""Download the record's FineWeb shards (GPT-2 tokens) from the Hugging Face hub.

Fetches fineweb_val_000000.bin and fineweb_train_000001.bin .. fineweb_train_{N:06d}.bin of the
dataset kjj0/fineweb10B-gpt2 (100M tokens per train shard; the record's 1,750 steps read a
little over 7 of them, hence the default 8) into --out, the record's data/fineweb10B by default.

Every file is checked after download: the 256 x int32 header (magic 20240520, version 1, token
count) and a size equal to 1024 + 2 x count bytes. A file already present that passes is skipped
without touching the network; one that fails (say, left by a copy cut short) is downloaded
again; a download that fails the check is deleted and reported, and the exit status is 1.

Honours HF_ENDPOINT (a mirror), HF_TOKEN, HF_HOME / HF_HUB_CACHE. With --cache the files go to
the hub's cache (shared with other projects) and --out gets symlinks to them.

Examples:
  python scripts/download_fineweb.py 8            # the record's data: val + 8 train shards
  python scripts/download_fineweb.py 1 --out data/fineweb10B --cache
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import jgpt  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jgpt.data import ShardError, read_shard_header  # noqa: E402

REPO = "kjj0/fineweb10B-gpt2"


def shard_names(num_train: int, val: bool = True) -> list[str]:
    names = ["fineweb_val_000000.bin"] if val else []
    return names + [f"fineweb_train_{i:06d}.bin" for i in range(1, num_train + 1)]


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def _remove(path: Path):
    """Remove a bad file; in the hub cache also the blob its snapshot link points to, so the
    next run downloads it again instead of finding it cached."""
    if path.is_symlink():
        target = path.resolve()
        path.unlink()
        if target.exists():
            target.unlink()
    elif path.exists():
        path.unlink()


def fetch(name: str, out: Path, *, repo: str, revision: str, cache: bool, force: bool) -> Path:
    from huggingface_hub import hf_hub_download

    kwargs = dict(repo_id=repo, filename=name, repo_type="dataset", revision=revision, force_download=force)
    if not cache:
        return Path(hf_hub_download(local_dir=out, **kwargs))
    cached = Path(hf_hub_download(**kwargs))
    try:
        read_shard_header(cached)
    except (ShardError, OSError):
        _remove(cached)
        raise
    link = out / name
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(cached.resolve())
    return link


def download(num_train: int, out: Path, *, repo: str = REPO, revision: str = "main", cache: bool = False,
             val: bool = True) -> list[str]:
    """Fetch and check the shards; returns the error messages (empty when all is well)."""
    out.mkdir(parents=True, exist_ok=True)
    names = shard_names(num_train, val)
    errors = []
    for k, name in enumerate(names, 1):
        dest = out / name
        tag = f"[{k}/{len(names)}] {name}"
        force = False
        if dest.exists() or dest.is_symlink():
            try:
                n = read_shard_header(dest)
                log(f"{tag}: present ({n:,} tokens), skipped")
                continue
            except (ShardError, OSError) as e:
                log(f"{tag}: present but bad ({e}); downloading again")
                _remove(dest)
                force = True
        log(f"{tag}: downloading from {repo}")
        try:
            path = fetch(name, out, repo=repo, revision=revision, cache=cache, force=force)
        except Exception as e:  # the hub's errors (missing file, network) as one line each
            from huggingface_hub.errors import EntryNotFoundError

            if isinstance(e, EntryNotFoundError):
                msg = f"{name}: not found in dataset {repo} at revision {revision!r}"
            else:
                msg = f"{name}: download failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log(f"{tag}: error: {msg}")
            errors.append(msg)
            continue
        try:
            n = read_shard_header(path)
        except (ShardError, OSError) as e:
            _remove(path)
            msg = f"{name}: downloaded file failed the shard check and was deleted: {e}"
            log(f"{tag}: error: {msg}")
            errors.append(msg)
            continue
        log(f"{tag}: ok ({n:,} tokens)")
    return errors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("num_train", nargs="?", type=int, default=8,
                   help="number of training shards, 100M tokens each (default: 8; the dataset has 103)")
    p.add_argument("--out", default="data/fineweb10B", help="destination folder (default: data/fineweb10B)")
    p.add_argument("--repo", default=REPO, help=f"dataset on the hub (default: {REPO})")
    p.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    p.add_argument("--cache", action="store_true",
                   help="keep the files in the hub cache (HF_HUB_CACHE) and put symlinks in --out")
    p.add_argument("--no_val", action="store_true", help="skip the validation shard")
    args = p.parse_args(argv)
    if args.num_train < 0:
        p.error(f"num_train={args.num_train} must be >= 0")
    try:
        from huggingface_hub import constants
    except ImportError:
        log("error: huggingface_hub is not installed (pip install huggingface_hub)")
        return 1
    via = f" via the hub cache {constants.HF_HUB_CACHE}" if args.cache else ""
    log(f"endpoint {constants.ENDPOINT}; destination {args.out}{via}")
    errors = download(args.num_train, Path(args.out), repo=args.repo, revision=args.revision, cache=args.cache,
                      val=not args.no_val)
    if errors:
        log(f"{len(errors)} file(s) failed:\n  " + "\n  ".join(errors))
        return 1
    log("all shards present and checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
