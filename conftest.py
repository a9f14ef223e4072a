"""Test-wide fixtures: where ../shared lives, and the rule that CI never skips its tests.

Tests that need the offline corpora or the tiktoken cache take the `shared_dir` fixture (or
`gutenberg_dir`). Without ../shared they skip with a reason; with JGPT_REQUIRE_SHARED=1 (set by
.ci/run) that skip becomes a failure, so CI always runs them.
"""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("JGPT_SHARED", ROOT.parent / "shared"))


def _need(path: Path, what: str) -> Path:
    if path.exists():
        return path
    msg = f"{what} not found at {path} (set JGPT_SHARED to the shared/ folder)"
    if os.environ.get("JGPT_REQUIRE_SHARED") == "1":
        pytest.fail(msg + "; JGPT_REQUIRE_SHARED=1 forbids skipping")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(SHARED, "../shared")


@pytest.fixture(scope="session")
def gutenberg_dir(shared_dir) -> Path:
    return _need(shared_dir / "data" / "gutenberg", "Gutenberg shards")


@pytest.fixture(scope="session")
def tiktoken_cache(shared_dir) -> Path:
    return _need(shared_dir / "tiktoken-cache", "tiktoken cache")
