"""scripts/gpu_parity.py's comparison of curves (tier 4 of design.md): the 10-step moving means,
the loss after the first update, the steps over twice the ref-vs-ref spread, the final val."""
from scripts import gpu_parity as gp


def test_compare_counts_steps_over_twice_the_spread(tmp_path):
    steps = range(1, 31)
    ref = {s: 10.0 - 0.1 * s for s in steps}
    eager = {s: ref[s] + 0.01 for s in steps}  # spread 0.01 everywhere
    jgpt = {s: ref[s] + (0.05 if 21 <= s <= 25 else 0.01) for s in steps}  # 5 steps at 5x
    runs = {"ref": {"train": ref, "val": {30: 7.0}}, "jgpt": {"train": jgpt, "val": {30: 7.01}},
            "ref_eager": {"train": eager, "val": {}}}
    lines = gp.compare(runs, tmp_path)
    text = "\n".join(lines)
    assert "loss after the first update (step 2): ref 9.800000, jgpt 9.810000, ref_eager 9.810000" in text
    # the 10-step mean of |jgpt - ref| rises from 0.01 at step 20 by 0.004 a step to 0.03 at 25,
    # stays there to step 30 and is over 2x the spread (0.02) from step 23 to 30: 8 of 20 steps
    assert "steps after step 10 over the bound: 8 of 20" in text
    assert "worst ratio jgpt-vs-ref / spread after step 10: 3.00 (bound 2)" in text
    assert "mean over steps |jgpt - ref| 0.0167, |ref eager - ref| 0.0100" in text
    assert "final val (step 30): ref 7.0000 jgpt 7.0100, relative 0.14% (bound 1%)" in text
    assert (tmp_path / "curves.csv").read_text().splitlines()[0] == \
        "step,ref_train,jgpt_train,ref_eager_train,ref_val,jgpt_val,ref_eager_val"
