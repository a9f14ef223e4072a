"""jgpt.train: the CLI, the default synthetic run, resume == uninterrupted, guard rails.

Runs use tiny dims (2 layers, d = 64, 256-token sequences) so each takes seconds; the loop,
the logging and the checkpoints are the same code the record runs through.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jgpt import config, train
from jgpt.data import write_shard

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--num_layers", "2", "--model_dim", "64", "--num_heads", "2", "--head_dim", "32", "--seq_len", "256",
        "--seqs_per_step", "2", "--val_seq_len", "512", "--val_tokens", "1024", "--warmup_steps", "0",
        "--window_max_tokens", "256", "--bos_search_span", "16384"]
RUN8 = TINY + ["--num_iterations", "8", "--val_every", "4", "--checkpoint_every", "3"]
LINE_VAL = re.compile(r"^step:(\d+)/(\d+) val_loss:(\d+\.\d{4}) train_time:\d+ms step_avg:\d+\.\d{2}ms$")
LINE_TRAIN = re.compile(r"^step:(\d+)/(\d+) train_time:\d+ms step_avg:\d+\.\d{2}ms$")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jgpt_cache")


@pytest.fixture
def env(cache, tmp_path, monkeypatch):
    """A fresh clone's view: no data/fineweb10B in the working folder, a private cache."""
    monkeypatch.setenv("JGPT_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def events(out: Path, kinds=("train", "val")):
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["event"], r["step"], r.get("loss", r.get("val_loss"))) for r in recs if r["event"] in kinds]


def final_params(out: Path, step: int):
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(out / "checkpoints" / str(step) / "state")


def subprocess_env(cache, **extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JGPT_CACHE": str(cache), **extra}
    if "XLA_FLAGS" not in extra:
        env.pop("XLA_FLAGS", None)
    return env


# ---------------------------------------------------------------------------------------------
# Settings


def test_record26_preset_is_the_record():
    cfg = train.PRESETS["record26"]()
    assert cfg.optim.num_iterations == 1750
    assert cfg.run.tokens_per_step == 393_216 and cfg.run.seq_len == 49_152
    assert cfg.run.val_every == 125 and cfg.run.val_tokens == 10_485_760
    assert cfg.model == config.ModelConfig()
    for name in ("tiny", "small", "gpu1"):
        assert isinstance(train.PRESETS[name](), config.Config)


def test_every_config_field_is_a_flag():
    args = train.build_parser().parse_args(
        ["--num_layers", "4", "--long_layers", "0,3", "--no_attn_layers", "", "--adam_betas", "0.9, 0.99",
         "--head_dim", "none", "--muon_lr", "0.02", "--seq_len", "1024", "--val_every", "7"])
    cfg, overrides = train.config_from_args(train.PRESETS["small"](), args)
    assert cfg.model.num_layers == 4 and cfg.model.long_layers == (0, 3) and cfg.model.no_attn_layers == ()
    assert cfg.model.head_dim is None and cfg.optim.adam_betas == (0.9, 0.99) and cfg.optim.muon_lr == 0.02
    assert cfg.run.seq_len == 1024 and cfg.run.val_every == 7
    assert set(overrides) == {"num_layers", "long_layers", "no_attn_layers", "adam_betas", "head_dim", "muon_lr",
                              "seq_len", "val_every"}
    parser = train.build_parser()
    for cls in (config.ModelConfig, config.OptimConfig, config.RunConfig):
        for f in cls.__dataclass_fields__:
            assert parser.parse_args([f"--{f}", "1" if f != "adam_betas" else "1,2"]) is not None


def test_config_roundtrips_through_json():
    cfg = train.PRESETS["tiny"]()
    assert train.config_from_dict(json.loads(json.dumps(train.config_to_dict(cfg)))) == cfg


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    from jgpt import synthetic

    spec = synthetic.SyntheticSpec(seed=9, train_tokens=60_000, val_tokens=4096)
    return synthetic.generate(spec, tmp_path_factory.mktemp("small_corpus"))


@pytest.mark.parametrize("extra, message", [
    (["--seq_len", "200"], "seq_len=200 must be a multiple of 128"),
    (["--val_tokens", "1000"], "val_tokens=1000 must be a multiple of val_seq_len"),
    (["--data", "no/such/folder"], "--data no/such/folder: no such folder"),
    (["--data", "CORPUS", "--val_tokens", "8192", "--val_seq_len", "1024"], "validation needs val_tokens=8192"),
    (["--data", "CORPUS", "--seqs_per_step", "64", "--seq_len", "1024"], "bos_search_span=16384 cannot hold"),
    (["--data", "CORPUS", "--seqs_per_step", "64", "--seq_len", "1024", "--bos_search_span", "0"],
     "data too short for one batch"),
    (["--preset", "nope"], "--preset 'nope'"),
    (["--num_layers", "3"], "num_layers=3"),
])
def test_bad_settings_fail_before_compiling(env, small_corpus, capsys, extra, message):
    extra = [str(small_corpus) if x == "CORPUS" else x for x in extra]
    rc = train.main(TINY + ["--num_iterations", "2", "--out", str(env / "run")] + extra)
    cap = capsys.readouterr()
    assert rc == train.EXIT_SETTINGS
    assert message in cap.err
    assert "compiled" not in cap.out


def test_data_folder_without_val_shards(env, capsys):
    folder = env / "corpus"
    write_shard(folder / "train_000000.bin", np.full(1000, 50256, np.uint16))
    assert train.main(TINY + ["--data", str(folder)]) == train.EXIT_SETTINGS
    assert "no val shards (*val*.bin)" in capsys.readouterr().err


def test_devices_must_divide_the_sequences(cache, tmp_path):
    cmd = [sys.executable, "-m", "jgpt.train", *TINY, "--seqs_per_step", "3", "--out", str(tmp_path / "r")]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=subprocess_env(cache, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert p.returncode == train.EXIT_SETTINGS, p.stderr
    assert "seqs_per_step=3 is not divisible by the 2 devices" in p.stderr
    assert "compiled" not in p.stdout


def test_fineweb_resolves_local_shards_without_network(tmp_path):
    folder = tmp_path / "fineweb10B"
    cfg = train.PRESETS["record26"]()
    n = train.fineweb_shards_needed(cfg)
    assert n == 8  # the record reads a little over 7 shards (scripts/download_fineweb.py)
    write_shard(folder / "fineweb_val_000000.bin", np.full(10, 50256, np.uint16))
    for i in range(1, n + 1):
        write_shard(folder / f"fineweb_train_{i:06d}.bin", np.full(10, 50256, np.uint16))
    src = train.resolve_data("fineweb", cfg, seed=0, fineweb_dir=str(folder), cycle=False)
    assert src.name == "fineweb"
    assert src.train == str(folder / "fineweb_train_*.bin") and src.val == str(folder / "fineweb_val_*.bin")
    auto = train.resolve_data("auto", cfg, seed=0, fineweb_dir=str(folder), cycle=False)
    assert auto.train == src.train


def test_auto_data_is_synthetic_on_a_fresh_clone(env):
    cfg = train.PRESETS["small"]()
    src = train.resolve_data("auto", cfg, seed=0, fineweb_dir="data/fineweb10B", cycle=False)
    assert src.name.startswith("synthetic:") and str(env) not in src.train  # in the cache, not the clone


# ---------------------------------------------------------------------------------------------
# Runs


@pytest.mark.slow
def test_default_command_trains_on_synthetic_data(cache, tmp_path):
    """The README's main command on a fresh clone: no --data, no ../shared, no GPU."""
    p = subprocess.run([sys.executable, "-m", "jgpt.train", *TINY, "--num_iterations", "6", "--val_every", "3",
                        "--seqs_per_step", "4", "--out", "run"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env=subprocess_env(cache))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert any("policy fp32 (default on cpu)" in x for x in lines)
    assert any("data synthetic:" in x for x in lines)
    vals = [float(m.group(3)) for m in map(LINE_VAL.match, lines) if m]
    steps = [int(m.group(1)) for m in map(LINE_TRAIN.match, lines) if m]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert len(vals) == 3 and vals[0] == pytest.approx(10.8258, abs=1e-4)  # ln 50304: zero lm_head
    assert vals[2] < vals[1] < vals[0] - 2, vals
    assert any(x.startswith("final: val_loss:") for x in lines)
    assert any(x.startswith("peak host memory:") for x in lines)
    out = tmp_path / "run"
    train_losses = [e[2] for e in events(out, ("train",))]
    assert train_losses[-1] < train_losses[0] - 2
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "checkpoints" / "6" / "commit_success.txt").is_file()
    assert json.loads((out / "config.json").read_text())["preset"] == "small"
    assert not (tmp_path / "data").exists()


@pytest.fixture(scope="module")
def baseline(cache, tmp_path_factory):
    """An uninterrupted 8-step run with checkpoints every 3 steps (windows 1 and 2)."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    os.environ["JGPT_CACHE"] = str(cache)
    try:
        assert train.main(RUN8 + ["--out", str(out)]) == 0
    finally:
        del os.environ["JGPT_CACHE"]
    return out


def _assert_same_run(out: Path, baseline: Path):
    assert events(out) == events(baseline)  # every train and val loss, bit for bit
    a, b = final_params(out, 8), final_params(baseline, 8)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_resume_equals_uninterrupted(env, baseline, capsys):
    out = env / "run"
    assert train.main(RUN8 + ["--out", str(out), "--stop_after", "5"]) == 0
    assert "stopped after step 5" in capsys.readouterr().out
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [3]
    assert events(out)[-1] == ("train", 5, events(baseline)[6][2])
    assert train.main(RUN8 + ["--out", str(out), "--resume"]) == 0
    assert "warning" not in capsys.readouterr().err
    _assert_same_run(out, baseline)


@pytest.mark.slow
def test_killed_during_save_resumes_from_previous_checkpoint(env, baseline):
    """A kill during the save at step 6 leaves Orbax's tmp folder (the checkpoint is renamed into
    place only when complete): the resumed run starts at 3 and still equals the baseline."""
    out = env / "run"
    assert train.main(RUN8 + ["--out", str(out), "--stop_after", "7"]) == 0
    ck = out / "checkpoints"
    (ck / "6" / "commit_success.txt").unlink()
    (ck / "6").rename(ck / "6.orbax-checkpoint-tmp-1700000000000000")
    assert train.main(RUN8 + ["--out", str(out), "--resume"]) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["event"] == "end"
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["event"] == "start"] == [0, 3]
    _assert_same_run(out, baseline)


@pytest.mark.slow
def test_sigkill_mid_run_resumes_exactly(cache, tmp_path, baseline):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "jgpt.train", *RUN8, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env(cache))
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step:5/8 train_time"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    p = subprocess.run(cmd + ["--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=subprocess_env(cache))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    _assert_same_run(out, baseline)


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(env, capsys):
    out = env / "run"
    # scalars (the lambdas) at lr 1e38 overflow the residual stream after two updates
    rc = train.main(TINY + ["--num_iterations", "8", "--checkpoint_every", "2", "--out", str(out),
                            "--adam_lr_scalars", "1e38"])
    err = capsys.readouterr().err
    assert rc == train.EXIT_DIVERGED
    assert re.search(r"loss is nan at step \d/8: training diverged", err), err
    step = int(re.search(r"at step (\d)/8", err).group(1))
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir())
    assert saved and max(saved) < step  # never a checkpoint of the NaN state
    assert f"checkpoints/{max(saved)}" in err
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "error" and last["step"] == step


@pytest.mark.slow
def test_resume_refuses_another_model_and_fresh_runs_refuse_old_checkpoints(env, baseline, capsys):
    out = env / "run"
    shutil.copytree(baseline, out)
    assert train.main(RUN8[2:] + ["--num_layers", "4", "--out", str(out), "--resume"]) == train.EXIT_SETTINGS
    err = capsys.readouterr().err
    assert "other model settings" in err and "num_layers: checkpoint 2, now 4" in err
    assert train.main(RUN8 + ["--out", str(out)]) == train.EXIT_SETTINGS
    assert "already holds checkpoints" in capsys.readouterr().err
    assert train.main(["--resume"]) == train.EXIT_SETTINGS
    assert "--resume needs --out" in capsys.readouterr().err


def test_init_from_a_jgpt_checkpoint(env, capsys):
    from jgpt import checkpoint, model

    args = train.build_parser().parse_args(TINY)
    cfg, _ = train.config_from_args(train.PRESETS["small"](), args)
    params = jax.device_get(model.init_params(cfg.model, jax.random.PRNGKey(5), "fp32"))
    params["lm_head.weight"] = np.random.default_rng(0).normal(0, 1, params["lm_head.weight"].shape).astype(np.float32)
    checkpoint.save_checkpoint(env / "w.npz", params, cfg.model)
    assert train.main(TINY + ["--num_iterations", "1", "--out", "run", "--init_from", str(env / "w.npz"),
                              "--no_checkpoint"]) == 0
    first = [LINE_VAL.match(x) for x in capsys.readouterr().out.splitlines()]
    v0 = float(next(m for m in first if m).group(3))
    assert abs(v0 - 10.8258) > 0.01  # not the zero-head init: the weights were loaded
    assert not (env / "run" / "checkpoints").exists() or not any((env / "run" / "checkpoints").iterdir())


def test_trains_on_a_shard_folder(env, gutenberg_dir, capsys):
    assert train.main(TINY + ["--data", str(gutenberg_dir), "--num_iterations", "2", "--val_every", "0",
                              "--val_seq_len", "1024", "--val_tokens", "2048", "--out", "run",
                              "--no_checkpoint"]) == 0
    out = capsys.readouterr().out
    assert f"data {gutenberg_dir}" in out
    assert LINE_VAL.match([x for x in out.splitlines() if x.startswith("step:2/2 val_loss")][0])


def test_head_gemm_out_option_trains_in_record_precision(env):
    """--head_gemm_out bf16 (the FP8 head's GEMM writing z, alpha to 2.1e-7; emulated on the
    CPU) trains under the record policy, is written to config.json, and moves the losses only by
    z's few flipped roundings against the exact-alpha run."""
    from jgpt import head_gpu
    runs = {}
    try:
        for out in ("f32", "bf16"):
            exp = "fast" if out == "bf16" else "accurate"  # (the exp acts in the GPU kernels only)
            args = TINY + ["--num_iterations", "3", "--val_every", "3", "--policy", "record", "--no_checkpoint",
                           "--head_gemm_out", out, "--head_exp", exp, "--out", f"run_{out}"]
            assert train.main(args) == 0
            runs[out] = [e[2] for e in events(env / f"run_{out}")]
            cfg = json.loads((env / f"run_{out}" / "config.json").read_text())
            assert (cfg["head_gemm_out"], cfg["head_exp"]) == (out, exp)
    finally:
        head_gpu.set_gemm_out(head_gpu.DEFAULT_GEMM_OUT)
        head_gpu.set_exp(head_gpu.DEFAULT_EXP)
    # the option took effect (~1e3 of the 2.6e7 z entries per step round apart) and moved the
    # curve by rounding only (measured 9.4e-6 at the last step)
    assert runs["bf16"] != runs["f32"]
    np.testing.assert_allclose(runs["bf16"], runs["f32"], rtol=1e-4)
