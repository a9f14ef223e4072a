"""Tiers 0 and 3 (design.md "Parity tiers"): the tiny preset trained by both trainers.

Same initial weights (ref's fp32 init, converted to jgpt; cast to fp64 for the fp64 runs), same
Gutenberg batches (ref's distributed_data_generator and jgpt.data.BatchLoader, asserted token for
token), and the per-step semantics of ref's main(): one backward per sequence, gradients divided by
the number of sequences, lr = initial_lr x get_lr(step), momentum get_muon_momentum(step), Adam then
Muon, window get_window_size_blocks(step) (jgpt: window_blocks(step), asserted equal). See
_trajectory.

Sizes: the tiny preset's model (L=6, 2 heads of 64, d=128, vocab 50304) and schedules (window up to
512 tokens, 10 steps of momentum warmup, cooldown over the last 45%), with num_iterations set to the
number of steps run (JGPT_PARITY_STEPS, default 30), so every schedule runs its whole course: the
window grows 1 -> 4 blocks, the momentum 0.85 -> 0.95, the lr factor falls toward 0.1. Two sequences
of 512 tokens per step instead of 8 of 1024 (the 50304-way head costs nearly all of the time on a
CPU): the window still restricts, and each step still sums two backward passes. One module fixture
runs ref in fp64 with jgpt teacher-forced at every step, then jgpt's free-running fp64 trajectory.

DEVIATIONS FROM design.md's WORDING (measured, issue 4; no tolerance is loosened, the measure
changes where the worded one cannot separate the two implementations' rounding from a bug):

Tier 0, fp64 ("relative 1e-10"). Asserted per step, teacher-forced: at every step k, jgpt gets ref's
exact state (weights, Adam m and v, Muon buffers, step) and both take one step on batch k: the
step's loss, every gradient (per-tensor relative L2) and every weight after the update (per-tensor
relative L2) within 1e-10. Measured (30 steps): the step's loss <= 4.7e-15 (step 10); gradients <=
2.1e-12 (step 24, embed.weight); weights after the step <= 8.85e-11 (step 10, embed.weight: a thin
margin, see the next paragraph for why that tensor). The free-running curves are asserted at 1e-10
only over the first 16 steps (measured 2.5e-11); over 30 they reach 1.73e-10 at step 24 (reported,
not asserted). Cause, measured by teacher forcing: each step from identical state agrees to rounding
(above), but Adam divides each element's m by its own sqrt(v), so an element whose gradient nearly
cancels turns a 1e-12 relative gradient difference (the head's backward: dL/dh = W^T dlogits cancels
~60:1 over 50304 classes, summed in another order by MKL and XLA) into an update differing by up to
2e-9 relative, and the loss curves jump at those steps (10, 24). Ref against itself from weights one
ulp apart grows the same way. One exception inside the teacher-forced gradients: the `scalars`
gradient at steps where every c_proj weight is still zero (step 1: c_proj and lm_head start at zero,
so step 0 moves only lm_head). There x stays proportional to x0, and the lambdas' exact gradient is
a difference that cancels to ~1e-8 of its terms (rms_norm's eps 2^-23 against the mean square), so
its rounding floor is ~1e-8 relative: measured 7.5e-9 (step 1; elsewhere <= 2.3e-12) jgpt vs ref,
and ref vs itself with 1 vs 2 threads 3e-10. It is reported, not asserted; the weights after that
step (the scalars included) are asserted at 1e-10, and the scalars' gradient at every other step is.

Tier 3, fp32 (design.md: "within 2x the spread of ref against itself under a one-ulp perturbation of
the initial weights"). Asserted instead: against the fp64 trajectory from the same weights and data
(ref's fp64 curve above), jgpt's fp32 curve is no farther than 2x ref's fp32 curve, per step from
step 0 on 10-step trailing moving means of |loss - fp64 loss|. Measured: ratio max 1.002 (median
about 1). WEAK, read before relying on it: fp32 and fp64 trajectories part at step 2 (Adam's first
steps move each weight by about lr x sign(g), and the signs of gradients near zero are rounding), so
|ref32 - ref64| is 3e-2 at step 2 and up to 2e-1, while |jgpt32 - ref32| is up to 1e-2; both fp32
curves sit at nearly the same distance from fp64, so this bound misses any jgpt change that moves
the fp32 curve by less than ~1e-1. The teacher-forced fp64 test pins the logic; this one only checks
that jgpt's fp32 training is not grossly less accurate. The one-ulp spread is still run, its ratio
printed, not asserted: 10-step mean |jgpt - ref| / one-ulp spread up to 139 (median 74). Why
design.md's wording cannot hold: torch's fp32 cross_entropy backward carries the row's rounded log-
sum-exp into all 50304 classes, an error correlated across classes that every ref-vs-ref
perturbation (one ulp, thread count, permuted summation order) keeps; jgpt is closer to the exact
gradients than ref (at ref's step-3 state, against an fp64 evaluation of the same weights: lm_head
ref 3.4e-6, jgpt 2.2e-7; loss ref 2.9e-7, jgpt 5.3e-8).

CSVs (trajectory_fp64.csv: free-running curves and teacher-forced maxima per step; trajectory.csv:
every curve) go to pytest's tmp dir and, if JGPT_PARITY_OUT is set, to that folder; the paths are
printed (pytest -s shows them). Time: 873 s for the file with OMP_NUM_THREADS=1 on 2 cores shared
with other jobs (fixture 621 s, fp32 test 250 s); torch's 2 OpenMP threads on a loaded machine made
ref several times slower.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax  # noqa: E402

from ref import train_gpt as ref  # noqa: E402

from parity import _trajectory as tr  # noqa: E402
from parity.conftest import record_max  # noqa: E402

SEQ_LEN, SEQS = 512, 2
STEPS = int(os.environ.get("JGPT_PARITY_STEPS", 30))
TOL_FP64 = 1e-10  # design.md tier 0
FREE_RUNNING_STEPS_FP64 = 16  # tier 0 asserted on the free-running curve up to here (docstring)
SPREAD_FACTOR, WINDOW = 2.0, 10  # design.md tier 3 (and tier 4's 10-step moving mean)
ACCURACY_FROM_STEP = 0  # the fp32 accuracy comparison holds from the first step


def moving_mean(a: np.ndarray, w: int = WINDOW) -> np.ndarray:
    """Trailing mean over the last w steps (fewer at the start)."""
    c = np.concatenate([[0.0], np.cumsum(a)])
    i = np.arange(1, len(a) + 1)
    lo = np.maximum(i - w, 0)
    return (c[i] - c[lo]) / (i - lo)


def _log(t0):
    return lambda s: print(f"  [{time.perf_counter() - t0:6.1f}s] {s}", flush=True)


def check_schedules_run_their_course(hp, cfg, steps: int) -> list[int]:
    windows = tr.check_windows(hp, cfg, steps)
    assert windows[0] == 1 and windows[-1] == hp.window_max_tokens // 128, windows
    lr_last = ref.get_lr(steps - 1, hp.num_iterations, hp.cooldown_frac, hp.lr_floor)
    mom = [ref.get_muon_momentum(s, hp.muon_momentum_warmup, hp.muon_momentum_start, hp.muon_momentum_end)
           for s in range(steps)]
    assert lr_last < 0.5 and mom[0] == hp.muon_momentum_start, (lr_last, mom[0])
    if steps > hp.muon_momentum_warmup:
        assert mom[-1] == hp.muon_momentum_end
    return windows


@pytest.fixture(scope="module")
def fp64_runs(gutenberg_dir):
    """The fp64 runs both tests use: ref's trajectory with jgpt teacher-forced at every step
    (tr.TeacherForcing), and jgpt's free-running trajectory. The initial weights are ref's fp32
    init cast to fp64, so the ref curve is also the fp64 reference of the fp32 test."""
    t0 = time.perf_counter()
    hp32, cfg32 = tr.settings(gutenberg_dir, precision="fp32", steps=STEPS, seq_len=SEQ_LEN, seqs_per_step=SEQS)
    hp64, cfg64 = tr.settings(gutenberg_dir, precision="fp64", steps=STEPS, seq_len=SEQ_LEN, seqs_per_step=SEQS)
    windows = check_schedules_run_their_course(hp64, cfg64, STEPS)
    batches = tr.load_batches(hp64, cfg64, STEPS)
    sd32 = tr.initial_state_dict(hp32)
    m64 = tr.ref_model(hp64)
    m64.load_state_dict(sd32)  # casts to the fp64 model's dtypes
    sd64 = {k: v.detach().clone() for k, v in m64.state_dict().items()}
    del m64
    with jax.enable_x64(True):  # global in a JAX process: on for these runs only
        tf = tr.TeacherForcing(cfg64, "fp64", batches)
        with tr.reuse_freed_memory():
            ref64 = tr.run_ref(hp64, sd64, batches, before_update=tf.before_update, after_update=tf.after_update)
        t_ref = time.perf_counter() - t0
        forced = tf.finish(ref64)
        jgpt64 = tf.run_free(sd64, batches)
    t_jgpt = time.perf_counter() - t0 - t_ref
    print(f"\nfp64 runs ({STEPS} steps of {SEQS}x{SEQ_LEN} tokens): ref + teacher-forced jgpt {t_ref:.0f}s, "
          f"free-running jgpt {t_jgpt:.0f}s", flush=True)
    return dict(hp32=hp32, cfg32=cfg32, batches=batches, sd32=sd32, windows=windows, ref64=ref64,
                jgpt64=jgpt64, forced=forced)


@pytest.mark.slow
def test_fp64_one_step_from_refs_state_and_trajectory(fp64_runs, tmp_path):
    """Tier 0 (fp64): at every step, one step of each trainer from ref's exact state agrees to
    1e-10 (loss, every gradient, every weight after the update); the free-running curves agree to
    1e-10 over the first FREE_RUNNING_STEPS_FP64 steps (module docstring: why not all of them)."""
    r = fp64_runs
    ref64, jgpt64, f = r["ref64"], r["jgpt64"], r["forced"]
    rel = np.abs(jgpt64 - ref64) / np.abs(ref64)
    paths = tr.write_csv("trajectory_fp64.csv", {
        "step": np.arange(STEPS), "window": np.asarray(r["windows"]), "ref_loss": ref64, "jgpt_loss": jgpt64,
        "rel_diff": rel, "forced_loss_rel": f["loss"], "forced_grad_rel_max": f["grad"],
        "forced_param_rel_max": f["param"], "forced_grad_rel_scalars": f["grad_scalars"],
        "c_proj_all_zero": f["c_proj_zero"].astype(int)}, tmp_path)
    conditioned = ~f["c_proj_zero"]
    gs = np.where(conditioned, f["grad_scalars"], 0.0)
    n = min(FREE_RUNNING_STEPS_FP64, STEPS)
    print(f"\nfp64, teacher-forced ({STEPS} steps): loss rel max {f['loss'].max():.2e} (step "
          f"{int(f['loss'].argmax())}); gradients per-tensor rel max {f['grad'].max():.2e} (step "
          f"{int(f['grad'].argmax())}, {f['grad_name'][int(f['grad'].argmax())]}); weights after the step "
          f"{f['param'].max():.2e} (step {int(f['param'].argmax())}, {f['param_name'][int(f['param'].argmax())]})\n"
          f"  scalars' gradient: {gs.max():.2e} (step {int(gs.argmax())}) where some c_proj is nonzero; "
          f"{np.max(f['grad_scalars'], initial=0, where=~conditioned):.2e} at the steps {np.nonzero(~conditioned)[0].tolist()} "
          f"with every c_proj zero (ill-conditioned, not asserted)\n"
          f"fp64, free-running: max relative loss difference {rel[:n].max():.2e} over the first {n} steps, "
          f"{rel.max():.2e} over {STEPS} (step {int(rel.argmax())}, not asserted); loss {ref64[0]:.4f} -> "
          f"{ref64[-1]:.4f}\n  curves: {', '.join(map(str, paths))}")
    record_max("tier 0 teacher-forced loss (fp64)", f["loss"].max())
    record_max("tier 0 teacher-forced gradients (fp64)", f["grad"].max())
    record_max("tier 0 teacher-forced weights after a step (fp64)", f["param"].max())
    record_max("tier 0 teacher-forced scalars gradient, c_proj nonzero (fp64)", gs.max())
    record_max(f"tier 0 free-running loss, {n} steps (fp64)", rel[:n].max())
    assert ref64[-1] < ref64[0] - 3, "the model did not train: the comparison would prove little"
    bad = [f"step {s}: loss rel {f['loss'][s]:.2e}, grad rel {f['grad'][s]:.2e} ({f['grad_name'][s]}), "
           f"scalars' grad rel {gs[s]:.2e}, "
           f"weights rel {f['param'][s]:.2e} ({f['param_name'][s]})" for s in range(STEPS)
           if not (f["loss"][s] <= TOL_FP64 and f["grad"][s] <= TOL_FP64 and f["param"][s] <= TOL_FP64
                   and gs[s] <= TOL_FP64)]
    assert not bad, f"one fp64 step from ref's state differs beyond {TOL_FP64:.0e} (a logic bug):\n  " + "\n  ".join(bad)
    bad = [f"step {s}: ref {ref64[s]!r} jgpt {jgpt64[s]!r} rel {rel[s]:.2e}" for s in np.nonzero(~(rel[:n] <= TOL_FP64))[0]]
    assert not bad, f"free-running fp64 losses differ beyond {TOL_FP64:.0e}:\n  " + "\n  ".join(bad)


@pytest.mark.slow
def test_fp32_trajectory_no_less_accurate_than_ref(fp64_runs, tmp_path):
    """Tier 3 (fp32): against the fp64 trajectory from the same weights and data, jgpt's fp32
    curve is within 2x ref's fp32 curve (10-step moving means of |loss - fp64 loss|). The ratio
    to ref's one-ulp spread (design.md's wording) is printed, not asserted (module docstring)."""
    t0 = time.perf_counter()
    log = _log(t0)
    r = fp64_runs
    hp, cfg, batches, sd = r["hp32"], r["cfg32"], r["batches"], r["sd32"]
    ref64 = r["ref64"]
    jgpt32 = tr.run_jgpt(cfg, "fp32", sd, batches)
    log("jgpt fp32 done")
    with tr.reuse_freed_memory():
        ref32 = tr.run_ref(hp, sd, batches)
        log("ref fp32 done")
        up = tr.run_ref(hp, tr.nudge_one_ulp(sd), batches)
        log("ref fp32, all weights one ulp up, done")

    err_j, err_r = np.abs(jgpt32 - ref64), np.abs(ref32 - ref64)
    mm_j, mm_r = moving_mean(err_j), moving_mean(err_r)
    diff, spread = np.abs(jgpt32 - ref32), np.abs(up - ref32)
    mm_d, mm_s = moving_mean(diff), moving_mean(spread)
    acc = mm_j / mm_r
    ulp_ratio = mm_d / np.where(mm_s > 0, mm_s, np.nan)
    paths = tr.write_csv("trajectory.csv", {
        "step": np.arange(STEPS), "window": np.asarray(r["windows"]), "ref_fp32": ref32, "jgpt_fp32": jgpt32,
        "ref_fp64": ref64, "jgpt_fp64": r["jgpt64"], "ref_fp32_one_ulp_up": up,
        "jgpt_fp32_err_mm10": mm_j, "ref_fp32_err_mm10": mm_r, "jgpt_ref_fp32_diff_mm10": mm_d,
        "one_ulp_spread_mm10": mm_s}, tmp_path)
    s0 = ACCURACY_FROM_STEP
    print(f"\nfp32 trajectory, {STEPS} steps ({time.perf_counter() - t0:.0f}s): loss {ref32[0]:.4f} -> {ref32[-1]:.4f}\n"
          f"  distance from fp64, 10-step mean: jgpt up to {mm_j.max():.2e}, ref up to {mm_r.max():.2e}; "
          f"ratio jgpt/ref max {acc[s0:].max():.2f} (step {s0 + int(acc[s0:].argmax())}), median {np.median(acc):.2f}\n"
          f"  |jgpt - ref| fp32 (10-step mean) up to {mm_d.max():.2e}; ref one-ulp spread up to {mm_s.max():.2e}; "
          f"ratio max {np.nanmax(ulp_ratio):.0f}, median {np.nanmedian(ulp_ratio):.0f} (reported, not asserted)\n"
          f"  curves: {', '.join(map(str, paths))}")
    record_max("tier 3 fp32 distance from fp64, jgpt / ref (10-step means)", acc[s0:].max())
    record_max("tier 3 10-step mean |jgpt - ref| / one-ulp spread (not asserted)", np.nanmax(ulp_ratio))
    assert ref32[-1] < ref32[0] - 3, "the model did not train: the comparison would prove little"
    bad = [f"step {s}: mean |jgpt - fp64| {mm_j[s]:.2e} > {SPREAD_FACTOR:g} x mean |ref - fp64| {mm_r[s]:.2e}"
           for s in range(s0, STEPS) if not mm_j[s] <= SPREAD_FACTOR * mm_r[s]]
    assert not bad, (f"jgpt's fp32 curve is more than {SPREAD_FACTOR:g}x farther from the fp64 trajectory than "
                     f"ref's at {len(bad)} of {STEPS - s0} steps:\n  " + "\n  ".join(bad))
