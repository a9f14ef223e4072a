"""scripts/download_fineweb.py end to end against a fake hub on 127.0.0.1.

The fake hub answers what huggingface_hub's hf_hub_download asks of a `resolve` URL: HEAD with
X-Repo-Commit, ETag and Content-Length, then GET of the body; a missing file is a 404 with
X-Error-Code: EntryNotFound. The script runs in a subprocess because huggingface_hub reads
HF_ENDPOINT when it is imported. Only loopback traffic.
"""
from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from jgpt.data import HEADER_BYTES, load_shard, read_shard_header, write_shard

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "download_fineweb.py"
REPO = "kjj0/fineweb10B-gpt2"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}  # name -> body
        self.short: set[str] = set()  # names whose GET sends only half the body
        self.requests: list[tuple[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def _lookup(self):
        hub: FakeHub = self.server
        hub.requests.append((self.command, self.path))
        prefix = f"/datasets/{REPO}/resolve/main/"
        name = self.path[len(prefix):] if self.path.startswith(prefix) else None
        if name is None or name not in hub.files:
            self.send_response(404)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("X-Error-Code", "EntryNotFound" if name is not None else "RepoNotFound")
            self.send_header("X-Error-Message", "Entry not found")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None, None
        return name, hub.files[name]

    def _headers(self, name, body, length):
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest() + '"')
        self.send_header("Content-Length", str(length))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()

    def do_HEAD(self):
        name, body = self._lookup()
        if name is not None:
            self._headers(name, body, len(body))

    def do_GET(self):
        name, body = self._lookup()
        if name is None:
            return
        if name in self.server.short:  # the connection "ends" halfway with a consistent short body
            body = body[: len(body) // 2]
        self._headers(name, body, len(body))
        self.wfile.write(body)


@pytest.fixture
def hub():
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def shard_bytes(tmp: Path, name: str, n: int, seed: int) -> bytes:
    tokens = np.random.default_rng(seed).integers(0, 50257, n)
    return write_shard(tmp / "src" / name, tokens).read_bytes()


def run(hub: FakeHub, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp / "hf_home"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="10", HF_HUB_DOWNLOAD_TIMEOUT="10",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", PYTHONPATH=str(ROOT))
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(var, None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def fineweb(hub, tmp_path):
    for i, name in enumerate(["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]):
        hub.files[name] = shard_bytes(tmp_path, name, 3000 + 100 * i, i)
    return hub


def test_download_then_skip(fineweb, tmp_path):
    out = tmp_path / "out"
    r = run(fineweb, tmp_path, "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    for name, body in fineweb.files.items():
        assert (out / name).read_bytes() == body
        assert read_shard_header(out / name) == (len(body) - HEADER_BYTES) // 2
    assert "downloading" in r.stderr and "all shards present" in r.stderr
    gets = [p for m, p in fineweb.requests if m == "GET"]
    assert len(gets) == 3

    fineweb.requests.clear()
    r = run(fineweb, tmp_path, "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("skipped") == 3
    assert fineweb.requests == []  # present and valid: no network at all


def test_missing_file_on_hub(fineweb, tmp_path):
    out = tmp_path / "out"
    r = run(fineweb, tmp_path, "3", "--out", str(out))
    assert r.returncode == 1
    assert "fineweb_train_000003.bin: not found in dataset kjj0/fineweb10B-gpt2" in r.stderr
    assert not (out / "fineweb_train_000003.bin").exists()
    assert read_shard_header(out / "fineweb_train_000002.bin") > 0  # the others still came


def test_corrupt_file_on_hub(fineweb, tmp_path):
    body = bytearray(fineweb.files["fineweb_train_000002.bin"])
    body[:4] = np.array([20240521], dtype="<i4").tobytes()
    fineweb.files["fineweb_train_000002.bin"] = bytes(body)
    out = tmp_path / "out"
    r = run(fineweb, tmp_path, "2", "--out", str(out))
    assert r.returncode == 1
    assert "fineweb_train_000002.bin" in r.stderr and "magic 20240521, expected 20240520" in r.stderr
    assert not (out / "fineweb_train_000002.bin").exists()
    assert not list(out.glob("fineweb_train_000002*"))


def test_download_cut_short(fineweb, tmp_path):
    fineweb.short.add("fineweb_train_000001.bin")
    out = tmp_path / "out"
    r = run(fineweb, tmp_path, "1", "--out", str(out))
    assert r.returncode == 1
    assert "fineweb_train_000001.bin: download failed" in r.stderr
    # Nothing under the final name, and nothing anywhere that passes the shard check.
    assert not (out / "fineweb_train_000001.bin").exists()
    for f in out.rglob("*"):
        if f.is_file() and f.name != "fineweb_val_000000.bin":
            with pytest.raises(ValueError):
                read_shard_header(f)


def test_truncated_local_file_is_downloaded_again(fineweb, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    name = "fineweb_train_000001.bin"
    good = fineweb.files[name]
    (out / name).write_bytes(good[: HEADER_BYTES + 100])  # as left by an interrupted copy
    r = run(fineweb, tmp_path, "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "present but bad" in r.stderr and "truncated" in r.stderr
    assert (out / name).read_bytes() == good


def test_hub_cache_mode(fineweb, tmp_path):
    out = tmp_path / "out"
    r = run(fineweb, tmp_path, "1", "--out", str(out), "--cache", "--no_val")
    assert r.returncode == 0, r.stderr
    link = out / "fineweb_train_000001.bin"
    assert link.is_symlink()
    assert str(link.resolve()).startswith(str(tmp_path / "hf_home" / "hub"))
    assert np.array_equal(load_shard(link), load_shard(tmp_path / "src" / "fineweb_train_000001.bin"))
    r = run(fineweb, tmp_path, "1", "--out", str(out), "--cache", "--no_val")
    assert r.returncode == 0 and "skipped" in r.stderr


def test_help():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "kjj0/fineweb10B-gpt2" in r.stdout and "HF_ENDPOINT" in r.stdout
