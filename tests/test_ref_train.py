"""The PyTorch reference's optimizers, schedules, data loader, settings and training entry point."""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

torch = pytest.importorskip("torch")
from ref import train_gpt as ref  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BOS = 50256


# --- schedules (record26 §5.7, §7.1, §7.3) -------------------------------------------------------

def test_lr_schedule_at_the_spec_steps():
    f = lambda s: ref.get_lr(s, 1750, 0.45, 0.1)
    assert f(0) == 1.0 and f(962) == 1.0
    assert round(f(963), 5) == 0.99943
    assert round(f(1500), 5) == 0.38571
    assert round(f(1749), 5) == 0.10114


def test_window_table():
    # record26 §5.7: (first step, W) for each row of the table
    rows = [(0, 1), (130, 2), (260, 3), (389, 4), (519, 5), (649, 6), (778, 7), (908, 8), (1038, 9),
            (1167, 10), (1297, 11), (1426, 12), (1556, 13), (1686, 14)]
    for (start, w), (nxt, _) in zip(rows, rows[1:] + [(1751, None)]):
        assert {ref.get_window_size_blocks(s, 1750) for s in range(start, nxt)} == {w}, start


def test_momentum_warmup():
    m = lambda s: ref.get_muon_momentum(s, 300, 0.85, 0.95)
    assert m(0) == 0.85 and m(300) == 0.95 and m(1000) == 0.95
    assert m(150) == pytest.approx(0.90, abs=1e-15)


# --- optimizers (record26 §7.2, §7.3) -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_newton_schulz_singular_values(dtype):
    torch.manual_seed(0)
    for shape in [(64, 64), (256, 64), (64, 192), (3, 64, 64)]:
        G = torch.randn(*shape) @ torch.diag(torch.logspace(0, -2, shape[-1]))  # spread spectrum
        X = ref.zeropower_via_newtonschulz5(G, 5, dtype).double()
        for g, x in zip(G.reshape(-1, *shape[-2:]), X.reshape(-1, *shape[-2:])):
            sg = torch.linalg.svdvals(g.double())
            sx = torch.linalg.svdvals(x)
            big = sg >= 2e-3 * g.double().norm()
            assert big.any()
            assert ((sx[big] >= 0.5) & (sx[big] <= 1.5)).all(), (shape, sx[big].min(), sx[big].max())


def test_muon_update_against_a_numpy_reference():
    """Three fp64 steps across a momentum change; numpy: lerp momentum, Nesterov, NS5, shape factor."""
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(96, 32)) * 0.1
    p = torch.nn.Parameter(torch.tensor(p0))
    opt = ref.Muon([p], lr=0.05, momentum=0.9, ns_dtype=torch.float64)
    buf, want = np.zeros_like(p0), p0.copy()
    a, b, c = 3.4445, -4.7750, 2.0315
    for step, m in enumerate([0.85, 0.9, 0.95]):
        g = rng.normal(size=p0.shape)
        p.grad = torch.tensor(g)
        opt.param_groups[0]["momentum"] = m
        opt.step()
        buf = m * buf + (1 - m) * g
        u = (1 - m) * g + m * buf
        X = u.T / (np.linalg.norm(u) + 1e-7)  # tall: transposed
        for _ in range(5):
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
        want = want - 0.05 * math.sqrt(96 / 32) * X.T
        np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-10, atol=1e-13)


def test_adam_update_against_the_spec_formula():
    rng = np.random.default_rng(1)
    p0 = rng.normal(size=(16, 8))
    p = torch.nn.Parameter(torch.tensor(p0))
    opt = ref.DistAdam([dict(params=[p], lr=0.2)], betas=(0.8, 0.95), eps=1e-10)
    m = v = np.zeros_like(p0)
    want = p0.copy()
    for t in range(1, 4):
        g = rng.normal(size=p0.shape)
        g[0] = 0  # a dead row never moves
        p.grad = torch.tensor(g)
        opt.step()
        m = 0.8 * m + 0.2 * g
        v = 0.95 * v + 0.05 * g * g
        want = want - 0.2 * (math.sqrt(1 - 0.95**t) / (1 - 0.8**t)) * m / (np.sqrt(v) + 1e-10)
        np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-12)
    np.testing.assert_array_equal(p.detach().numpy()[0], p0[0])


def test_adam_state_is_bf16_for_bf16_params():
    p = torch.nn.Parameter(torch.randn(8, 4).bfloat16())
    opt = ref.DistAdam([dict(params=[p], lr=0.1)])
    p.grad = torch.randn(8, 4).bfloat16()
    opt.step()
    st_ = opt.state[p]
    assert st_["exp_avg"].dtype == torch.bfloat16 and st_["exp_avg_sq"].dtype == torch.bfloat16
    assert p.dtype == torch.bfloat16


def test_optimizer_groups_are_the_records():
    with torch.device("meta"):
        model = ref.GPT(50257, 12, 6, 768, 1024)
    hp = ref.Hyperparameters()
    adam, muon = ref.build_optimizers(model, hp)
    lrs = {id(p): g["lr"] for g in adam.param_groups for p in g["params"]}
    assert lrs[id(model.embed.weight)] == 0.6 and lrs[id(model.value_embeds[2].weight)] == 0.6
    assert lrs[id(model.lm_head.weight)] == 0.22 and lrs[id(model.scalars)] == 0.04
    muon_params = [p for g in muon.param_groups for p in g["params"]]
    assert len(muon_params) == 46 and len(muon.param_groups) == 4


# --- data (record26 §8) --------------------------------------------------------------------------

def write_shard(path, tokens, magic=20240520, version=1, count=None):
    header = np.zeros(256, np.int32)
    header[:3] = magic, version, len(tokens) if count is None else count
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, np.uint16).tobytes())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), seq_len=st.sampled_from([8, 16, 40]), num_seqs=st.sampled_from([1, 2, 4, 8]),
       p_bos=st.floats(0.02, 0.3))
def test_bos_batch_starts(seed, seq_len, num_seqs, p_bos):
    rng = np.random.default_rng(seed)
    toks = np.where(rng.random(3000) < p_bos, BOS, rng.integers(0, 50000, 3000))
    bos = np.nonzero(toks == BOS)[0]
    pos = int(rng.integers(0, 100))
    span_max = 2 * num_seqs * seq_len
    # independent walk: each start is the first BOS at or after the previous start + seq_len
    first = bos[bos >= pos]
    want, ok = [], len(first) > 0
    if ok:
        want.append(int(first[0]))
        while ok and len(want) <= num_seqs:
            nxt = bos[bos >= want[-1] + seq_len]
            ok = len(nxt) > 0
            if ok:
                want.append(int(nxt[0]))
        ok = ok and want[-1] < pos + span_max
    if not ok:
        with pytest.raises(ValueError, match="BOS-aligned"):
            ref.find_batch_starts(torch.tensor(toks), pos, seq_len, num_seqs, span_max)
        return
    starts, span = ref.find_batch_starts(torch.tensor(toks), pos, seq_len, num_seqs, span_max)
    assert starts == want[:num_seqs] and span == want[num_seqs] - pos
    assert all(toks[s] == BOS for s in starts)


def test_generator_ranks_split_a_step_and_targets_shift(tmp_path):
    rng = np.random.default_rng(3)
    toks = np.where(rng.random(20000) < 0.05, BOS, rng.integers(0, 50000, 20000))
    write_shard(tmp_path / "train_000000.bin", toks)
    pattern = str(tmp_path / "train_*.bin")
    whole = next(ref.distributed_data_generator(pattern, 64, 8))
    parts = [next(ref.distributed_data_generator(pattern, 64, 8, rank=r, world_size=4)) for r in range(4)]
    assert [x.tolist() for part in parts for x, _ in part] == [x.tolist() for x, _ in whole]
    for x, y in whole:
        assert x[0] == BOS and torch.equal(x[1:], y[:-1].int()) and x.dtype == torch.int32 and y.dtype == torch.int64


@pytest.mark.parametrize("problem,match", [
    (dict(magic=123), "magic 123, expected 20240520"),
    (dict(version=2), "version 2, expected 1"),
    (dict(count=10**6), "header says 1000000 tokens"),
])
def test_bad_shards_name_the_file(tmp_path, problem, match):
    path = tmp_path / "bad.bin"
    write_shard(path, np.arange(100), **problem)
    with pytest.raises(ValueError, match=match) as e:
        ref.load_data_shard(path)
    assert str(path) in str(e.value)


def test_missing_data_and_settings_that_do_not_divide(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        next(ref.distributed_data_generator(str(tmp_path / "nothing_*.bin"), 128, 8))
    with pytest.raises(ValueError, match="seq_len=1000 is not a multiple of 128"):
        ref.parse_args(["--preset", "tiny", "--seq_len", "1000"])
    with pytest.raises(ValueError, match="world size 3 does not divide seqs_per_step=8"):
        ref.check_settings(ref.Hyperparameters(), world_size=3)
    with pytest.raises(SystemExit, match="no shard matches"):
        run_ref(["--data", str(tmp_path)], check=False, raise_exit=True)


def run_ref(args, check=True, raise_exit=False, nproc=1):
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
           if nproc > 1 else [sys.executable]) + [str(ROOT / "ref" / "train_gpt.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"))
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    if raise_exit and r.returncode:
        raise SystemExit(r.stderr.strip().splitlines()[-1])
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


SMALL = ["--preset", "tiny", "--seqs_per_step", "2", "--val_tokens", "8192", "--seed", "1"]


def val_losses(out):
    return [float(line.split("val_loss:")[1].split()[0]) for line in out.splitlines() if "val_loss:" in line]


@pytest.mark.slow
def test_tiny_training_lowers_the_validation_loss(gutenberg_dir):
    out = run_ref([*SMALL, "--data", str(gutenberg_dir), "--num_iterations", "8", "--val_loss_every", "4"])
    losses = val_losses(out)
    assert len(losses) == 3 and losses[0] == pytest.approx(math.log(50304), abs=1e-4)
    assert losses[2] < losses[1] < losses[0] - 2
    assert "step:8/8 train_time:" in out and "step_avg:" in out


@pytest.mark.slow
def test_two_gloo_processes_equal_one(gutenberg_dir):
    """torchrun with 2 CPU processes (gloo): the same step as one process accumulating both."""
    args = [*SMALL, "--data", str(gutenberg_dir), "--num_iterations", "2", "--val_loss_every", "0"]
    one, two = val_losses(run_ref(args)), val_losses(run_ref(args, nproc=2))
    assert two[-1] == pytest.approx(one[-1], rel=1e-5)
