"""jgpt.synthetic: the built-in default corpus (seeded, learnable, BOS-aligned, cached)."""
import numpy as np
import pytest

from jgpt import synthetic as syn
from jgpt.config import BOS_ID
from jgpt.data import BatchLoader, load_shard, read_shard_header, validation_batches

SMALL = syn.SyntheticSpec(seed=3, train_tokens=200_000, val_tokens=50_000)


def _tokens(folder, prefix):
    return np.concatenate([np.asarray(load_shard(p)) for p in sorted(folder.glob(f"{prefix}_*.bin"))])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return syn.ensure(SMALL, tmp_path_factory.mktemp("cache"))


def test_shards_are_valid_and_sized(corpus):
    train, val = sorted(corpus.glob("train_*.bin")), sorted(corpus.glob("val_*.bin"))
    assert sum(read_shard_header(p) for p in train) == SMALL.train_tokens
    assert sum(read_shard_header(p) for p in val) == SMALL.val_tokens
    assert (corpus / "spec.json").is_file()


def test_documents_start_with_bos_and_use_gpt2_ids(corpus):
    t = _tokens(corpus, "train")
    assert t[0] == BOS_ID
    assert t.max() <= BOS_ID  # GPT-2 ids only
    starts = np.flatnonzero(t == BOS_ID)
    lengths = np.diff(starts)
    assert lengths.min() >= SMALL.min_doc_len and lengths.max() <= SMALL.max_doc_len
    assert 0.5 * SMALL.median_doc_len < np.median(lengths) < 2 * SMALL.median_doc_len
    assert not np.any(t[starts[:-1] + 1] == BOS_ID)  # no empty documents


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, corpus):
    again = syn.generate(SMALL, tmp_path / "again")
    for p in corpus.glob("*.bin"):
        assert (again / p.name).read_bytes() == p.read_bytes()
    other = syn.generate(syn.SyntheticSpec(seed=4, train_tokens=20_000, val_tokens=20_000), tmp_path / "other")
    assert not np.array_equal(_tokens(other, "train")[:20_000], _tokens(corpus, "train")[:20_000])


def test_val_does_not_depend_on_train_size(tmp_path, corpus):
    bigger = syn.generate(syn.SyntheticSpec(seed=3, train_tokens=300_000, val_tokens=50_000), tmp_path / "b")
    np.testing.assert_array_equal(_tokens(bigger, "val"), _tokens(corpus, "val"))


def test_learnable_structure(corpus):
    """The successor tables make the next token far more predictable than the unigram law:
    the empirical conditional entropy is a few nats below the unigram entropy."""
    t = _tokens(corpus, "train").astype(np.int64)
    _, counts = np.unique(t, return_counts=True)
    p = counts / counts.sum()
    h_uni = -(p * np.log(p)).sum()
    pairs = t[:-1] * 65536 + t[1:]
    u, c = np.unique(pairs, return_counts=True)
    _, inv = np.unique(u // 65536, return_inverse=True)
    h_bi = -(c / c.sum() * np.log(c / np.bincount(inv, weights=c)[inv])).sum()
    assert h_uni > 3.5 and h_bi < h_uni - 1.5


def test_ensure_caches_and_leaves_no_temporaries(tmp_path):
    root = tmp_path / "cache"
    spec = syn.SyntheticSpec(seed=1, train_tokens=10_000, val_tokens=5_000)
    first = syn.ensure(spec, root)
    stamp = (first / "train_000000.bin").stat().st_mtime_ns
    assert syn.ensure(spec, root) == first
    assert (first / "train_000000.bin").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert [p.name for p in root.iterdir()] == [first.name]  # the temporary folder was renamed
    assert first.name.startswith("synthetic-v1-seed1-10000-5000-")


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("JGPT_CACHE", str(tmp_path / "c"))
    assert syn.cache_root() == tmp_path / "c"
    monkeypatch.delenv("JGPT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert syn.cache_root() == tmp_path / "x" / "jgpt"


def test_spec_for_run_holds_the_run(tmp_path):
    """A corpus sized by spec_for_run feeds every step of the run (no cycling) and validation."""
    steps, S, T, span = 20, 4, 512, 65536
    spec = syn.spec_for_run(seed=0, num_iterations=steps, tokens_per_step=S * T, max_span=span, val_tokens=8192)
    assert spec.train_tokens % (1 << 20) == 0
    folder = syn.ensure(spec, tmp_path)
    loader = BatchLoader(str(folder / "train_*.bin"), T, S, max_span=span)
    for _ in range(steps):
        batch = next(loader)
        assert (batch.inputs[:, 0] == BOS_ID).all()
    assert len(list(validation_batches(str(folder / "val_*.bin"), 2048, 4, 8192))) == 1


def test_cli_writes_a_corpus(tmp_path, capsys):
    assert syn.main([str(tmp_path / "c"), "--seed", "2", "--train_tokens", "5000", "--val_tokens", "3000"]) == 0
    assert read_shard_header(tmp_path / "c" / "train_000000.bin") == 5000
    assert "wrote" in capsys.readouterr().out
