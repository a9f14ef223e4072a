"""scripts/curve_spread.py: the step-wise tier-4 check between every two disjoint pairs of runs."""
import pytest

from scripts import curve_spread as cs


def _runs():
    steps = range(1, 41)
    base = {s: 10.0 - 0.1 * s for s in steps}
    return {"a": base,
            "b": {s: base[s] + 0.01 for s in steps},
            "c": {s: base[s] + 0.02 for s in steps},
            "d": {s: base[s] + (-0.01 if s <= 30 else 0.2) for s in steps}}  # jumps at step 31


def test_counts_steps_over_twice_the_calibration_pair():
    steps, gaps, combos = cs.study(_runs())
    assert len(steps) == 40 and len(gaps) == 6
    by = {(t, c): n for n, _, t, c in combos}
    assert len(combos) == 6  # 3 ways to split four runs into two pairs, each pair the test once
    # |c-d| 0.03 against |a-b| 0.01: 3x at every one of the 30 steps after step 10
    assert by[(("c", "d"), ("a", "b"))] == 30
    # |a-d| 0.01 then 0.2 against |b-c| 0.01: the 10-step mean is 0.029 at step 31 (2.9x): 31..40
    assert by[(("a", "d"), ("b", "c"))] == 10
    # |b-d| 0.02 then 0.19 against |a-c| 0.02: 0.037 (1.85x) at step 31, 0.054 at 32: 32..40
    assert by[(("b", "d"), ("a", "c"))] == 9
    assert by[(("a", "b"), ("c", "d"))] == by[(("b", "c"), ("a", "d"))] == by[(("a", "c"), ("b", "d"))] == 0
    lines = "\n".join(cs.report(_runs()))
    assert "| a - b | 0.0100 | 0.0100 | 0 of 30 |" in lines
    assert "| c - d | 0.0675 | 0.1800 | 30 of 30 |" in lines  # mean: (30 x 0.03 + 10 x 0.18) / 40
    assert "with no step over: 3 (50.0%)" in lines


def test_bad_spec_names_the_argument(tmp_path):
    f = tmp_path / "curves.csv"
    f.write_text("step,ref_train\n1,10.0\n")
    with pytest.raises(ValueError, match="no column 'jgpt_train'"):
        cs.load(f"j={f}:jgpt_train")
    with pytest.raises(ValueError, match="expected LABEL=CSV:COLUMN"):
        cs.load(str(f))
