"""jgpt.tokenize and scripts/tokenize_text.py, offline through ../shared/tiktoken-cache."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jgpt.config import BOS_ID
from jgpt.data import BatchLoader, list_shards, load_shard

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "tokenize_text.py"

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 unicode survives; so do emoji \U0001f600.",
    "A literal <|endoftext|> inside the text stays ordinary text.",
    "Line one\nLine two\n\n  indented",
] * 5


@pytest.fixture
def enc(tiktoken_cache, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache))
    tiktoken = pytest.importorskip("tiktoken")
    return tiktoken.get_encoding("gpt2")


def expected_stream(enc, docs):
    return np.concatenate([[BOS_ID, *enc.encode_ordinary(d)] for d in docs]).astype(np.uint16)


def stream_of(paths):
    return np.concatenate([load_shard(p) for p in paths])


def test_encode_document(enc):
    from jgpt.tokenize import encode_document

    toks = encode_document(DOCS[2])
    assert toks.dtype == np.uint16 and toks[0] == BOS_ID == enc.eot_token
    assert (toks[1:] != BOS_ID).all()  # the special-token string inside text is not a BOS
    assert enc.decode(toks[1:].tolist()) == DOCS[2]


def test_jsonl_shards_and_sizes(enc, tmp_path):
    from jgpt.tokenize import tokenize_to_shards

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)) + "\n")
    written = tokenize_to_shards([src], tmp_path / "out", prefix="web", shard_size=50, val_shards=1, workers=1)
    want = expected_stream(enc, DOCS)
    assert np.array_equal(stream_of(written), want)  # documents run on across shards
    assert [len(load_shard(p)) for p in written[:-1]] == [50] * (len(written) - 1)
    assert 0 < len(load_shard(written[-1])) <= 50
    assert written[0].name == "web_val_000000.bin" and written[1].name == "web_train_000001.bin"
    assert list_shards(str(tmp_path / "out" / "web_train_*.bin")) == written[1:]


def test_text_files_separator_gzip_and_folders(enc, tmp_path):
    from jgpt.tokenize import tokenize_to_shards

    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(DOCS[0])
    with gzip.open(folder / "sub" / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n=====\n".join(DOCS[1:3]) + "\n=====\n   \n")  # the whitespace-only piece is skipped
    (folder / ".hidden.txt").write_text("never read")
    written = tokenize_to_shards([folder], tmp_path / "out", shard_size=10**6, separator="\n=====\n", workers=1)
    assert [p.name for p in written] == ["data_train_000000.bin"]
    assert np.array_equal(load_shard(written[0]), expected_stream(enc, DOCS[:3]))


def test_parallel_equals_serial(enc, tmp_path):
    from jgpt.tokenize import tokenize_to_shards

    src = tmp_path / "docs.jsonl"
    docs = [f"document {i}: " + " ".join(DOCS[i % 4].split()[: 1 + i % 7]) for i in range(600)]
    src.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    one = tokenize_to_shards([src], tmp_path / "one", text_key="body", shard_size=997, workers=1)
    two = tokenize_to_shards([src], tmp_path / "two", text_key="body", shard_size=997, workers=2)
    assert [p.name for p in one] == [p.name for p in two]
    for a, b in zip(one, two):
        assert a.read_bytes() == b.read_bytes()
    assert np.array_equal(stream_of(one), expected_stream(enc, docs))


def test_bad_inputs(enc, tmp_path):
    from jgpt.tokenize import tokenize_to_shards

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        tokenize_to_shards([bad], tmp_path / "o1")
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match=r"nokey\.jsonl:1: expected an object with a string field 'text'"):
        tokenize_to_shards([nokey], tmp_path / "o2")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt: not UTF-8"):
        tokenize_to_shards([latin], tmp_path / "o3")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match=r"no documents found in 1 input file"):
        tokenize_to_shards([empty], tmp_path / "o4")
    with pytest.raises(FileNotFoundError, match=r"input .*missing\.txt does not exist"):
        tokenize_to_shards([tmp_path / "missing.txt"], tmp_path / "o5")
    with pytest.raises(ValueError, match=r"shard_size=0 must be positive"):
        tokenize_to_shards([empty], tmp_path / "o6", shard_size=0)
    assert not [p for i in range(1, 7) for p in (tmp_path / f"o{i}").glob("*.bin")]


def test_existing_shards_need_overwrite(enc, tmp_path):
    from jgpt.tokenize import tokenize_to_shards

    src = tmp_path / "a.txt"
    src.write_text(" ".join(DOCS))
    first = tokenize_to_shards([src], tmp_path / "out", shard_size=20, workers=1)
    assert len(first) > 2
    with pytest.raises(FileExistsError, match=r"already holds \d+ shard\(s\) named data_\*\.bin"):
        tokenize_to_shards([src], tmp_path / "out", shard_size=20, workers=1)
    again = tokenize_to_shards([src], tmp_path / "out", shard_size=10**6, workers=1, overwrite=True)
    assert sorted((tmp_path / "out").glob("*.bin")) == again  # no stale shard of the longer run left


def test_script_end_to_end(tiktoken_cache, tmp_path):
    src = tmp_path / "docs.jsonl"
    docs = [f"{DOCS[i % 4]} number {i}" for i in range(300)]
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tiktoken_cache)}
    out = tmp_path / "shards"
    r = subprocess.run([sys.executable, str(SCRIPT), str(src), "--out", str(out), "--shard_size", "2000",
                        "--val_shards", "1", "--workers", "2"], env=env, capture_output=True, text=True,
                       timeout=180, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "300 documents ->" in r.stderr and "wrote" in r.stderr
    val, train = sorted(out.glob("data_val_*.bin")), sorted(out.glob("data_train_*.bin"))
    assert len(val) == 1 and len(train) >= 2
    loader = BatchLoader(str(out / "data_train_*.bin"), 64, 4)  # the shards feed the record's loader
    assert (next(loader).inputs[:, 0] == BOS_ID).all()

    r = subprocess.run([sys.executable, str(SCRIPT), str(src), "--out", str(out)], env=env, capture_output=True,
                       text=True, timeout=180, cwd=tmp_path)
    assert r.returncode == 1 and "error:" in r.stderr and "already holds" in r.stderr and "--overwrite" in r.stderr


def test_script_help():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert "--shard_size" in r.stdout and "TIKTOKEN_CACHE_DIR" in r.stdout and "<|endoftext|>" in r.stdout
