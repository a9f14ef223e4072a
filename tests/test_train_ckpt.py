"""jgpt.train_ckpt: Orbax training checkpoints (atomic, keep-last-k, fallback) and the run log."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jgpt import config, model, optim, step
from jgpt.train_ckpt import NoCheckpoint, RunLog, TrainCheckpointer, abstract_like

# A restore that fails (wrong shapes, damaged files) leaves Orbax's read coroutines un-awaited;
# Python reports them at some later garbage collection, in whichever test runs then.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CFG = config.ModelConfig(num_layers=2, num_heads=2, model_dim=64, head_dim=32, max_seq_len=512)


def _state(seed=0, policy="record"):
    params = model.init_params(CFG, jax.random.PRNGKey(seed), policy)
    opt = optim.build_optimizer(params, config.OptimConfig(num_iterations=10))
    state = step.init_state(params, opt)
    # distinct optimizer values, so a restore that mixed leaves up would show
    leaves, tree = jax.tree.flatten(state)
    leaves = [x + jnp.asarray(i, x.dtype) if x.ndim else x + 7 * seed for i, x in enumerate(leaves)]
    return jax.tree.unflatten(tree, leaves)


def _abstract(state):
    return abstract_like(state, jax.tree.map(lambda x: x.sharding, state))


def _equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_roundtrip_keeps_tree_dtypes_and_meta(tmp_path):
    state = _state()
    ck = TrainCheckpointer(tmp_path / "ck")
    meta = {"step": 3, "loader": {"file_index": 0, "pos": 123}, "config": {"a": [1, 2]}}
    path = ck.save(3, state, meta)
    assert path == tmp_path / "ck" / "3" and (path / "commit_success.txt").is_file()
    restored, got_meta, s = ck.restore_latest(_abstract(state))
    assert s == 3 and got_meta == meta
    assert isinstance(restored, step.TrainState)
    assert restored.params["embed.weight"].dtype == jnp.bfloat16  # record policy: bf16 embeddings
    _equal(restored, state)
    assert ck.read_meta() == meta


def test_keeps_the_last_k(tmp_path):
    ck = TrainCheckpointer(tmp_path, keep=2)
    for s in (2, 4, 6):
        ck.save(s, _state(s), {"step": s})
    assert ck.complete_steps() == [4, 6]


def test_interrupted_save_is_ignored_and_cleaned(tmp_path):
    """A save killed midway leaves Orbax's tmp folder: never a step, removed on the next start."""
    state = _state()
    ck = TrainCheckpointer(tmp_path)
    ck.save(2, state, {"step": 2})
    ck.save(4, _state(1), {"step": 4})
    ck.close()
    partial = tmp_path / "6.orbax-checkpoint-tmp-1234567890"
    shutil.copytree(tmp_path / "4", partial)
    (partial / "commit_success.txt").unlink()
    for f in list((partial / "state").rglob("*"))[:3]:
        if f.is_file():
            f.write_bytes(b"\0")  # half-written
    ck2 = TrainCheckpointer(tmp_path)
    assert ck2.complete_steps() == [2, 4]
    _, meta, s = ck2.restore_latest(_abstract(state))
    assert s == 4 and meta == {"step": 4}
    assert not partial.exists()  # cleanup_tmp_directories


def test_step_folder_without_commit_file_is_skipped(tmp_path):
    state = _state()
    ck = TrainCheckpointer(tmp_path)
    ck.save(2, state, {"step": 2})
    shutil.copytree(tmp_path / "2", tmp_path / "5")
    (tmp_path / "5" / "commit_success.txt").unlink()
    ck2 = TrainCheckpointer(tmp_path)
    assert ck2.complete_steps() == [2]
    assert ck2.restore_latest(_abstract(state))[2] == 2


def test_unreadable_latest_falls_back_to_previous(tmp_path):
    state = _state()
    ck = TrainCheckpointer(tmp_path)
    ck.save(2, state, {"step": 2})
    ck.save(4, _state(1), {"step": 4})
    shutil.rmtree(tmp_path / "4" / "state")  # damaged after the commit (disk trouble)
    (tmp_path / "4" / "state").mkdir()
    restored, meta, s = TrainCheckpointer(tmp_path).restore_latest(_abstract(state))
    assert s == 2 and meta["step"] == 2
    _equal(restored, state)


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(NoCheckpoint, match="no complete checkpoint"):
        TrainCheckpointer(tmp_path / "empty").restore_latest(_abstract(_state()))
    with pytest.raises(ValueError, match="keep_checkpoints"):
        TrainCheckpointer(tmp_path / "x", keep=0)


def test_restore_into_other_shapes_names_the_problem(tmp_path):
    ck = TrainCheckpointer(tmp_path)
    ck.save(1, _state(), {"step": 1})
    other = config.ModelConfig(num_layers=2, num_heads=2, model_dim=128, head_dim=32, max_seq_len=512)
    params = model.init_params(other, jax.random.PRNGKey(0), "record")
    st = step.init_state(params, optim.build_optimizer(params, config.OptimConfig()))
    with pytest.raises(NoCheckpoint, match="could not be restored"):
        ck.restore_latest(_abstract(st))


# ---------------------------------------------------------------------------------------------
# RunLog


def test_runlog_events_truncation_and_plot(tmp_path, capsys):
    log = RunLog(tmp_path, master=True)
    log.print("step:0/4 val_loss:10.8258 train_time:0ms step_avg:0.00ms")
    log.event("start", step=0)
    log.event("val", step=0, val_loss=10.8)
    for s in range(1, 5):
        log.event("train", step=s, loss=10.0 - s)
    log.event("checkpoint", step=2)
    log.event("val", step=2, val_loss=8.0)
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "st')  # a line cut short by a kill
    assert "val_loss:10.8258" in capsys.readouterr().out
    assert (tmp_path / "log.txt").read_text().startswith("step:0/4")

    log = RunLog(tmp_path, master=True)
    log.truncate_to(2)  # resume at step 2: keep train steps <= 2, other events < 2
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in recs] == [("start", 0), ("val", 0), ("train", 1), ("train", 2)]
    log.event("val", step=2, val_loss=8.0)
    png = log.plot()
    log.close()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runlog_non_master_writes_nothing(tmp_path):
    log = RunLog(tmp_path, master=False)
    log.print("x")
    log.event("train", step=1, loss=1.0)
    assert log.plot() is None
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_tmp_marker_is_orbaxs():
    """remove_interrupted finds Orbax's tmp folders by this marker (a private Orbax constant)."""
    from jgpt.train_ckpt import TMP_MARKER

    atomicity_types = pytest.importorskip("orbax.checkpoint._src.path.atomicity_types")
    assert atomicity_types.TMP_DIR_SUFFIX == TMP_MARKER
