"""scripts/gpu_grad_parity.py's comparisons: relative L2 with the share of differing signs, and
where lm_head's step-1 gradient signs part (the first update's only moving tensor at init)."""
import numpy as np

from scripts import gpu_grad_parity as gp


def test_compare_counts_sign_flips_and_relative_l2():
    b = np.array([[1.0, -2.0], [3.0, 4.0]])
    a = b.copy()
    a[0, 0] = -1.0  # one of four signs flips; |a - b| = 2, |b| = sqrt(30)
    rel, flips = gp.compare(a, b)
    assert rel == np.float64(2.0) / np.sqrt(30.0) and flips == 0.25


def test_where_signs_differ_names_rows_targets_and_columns(capsys):
    b = np.ones((6, 4))
    a = b.copy()
    a[[1, 2, 5], 3] = -1.0  # one column, three rows, one of them (5) a target
    a[2, 0] = 0.0  # a zero counts as a differing sign and as a zero
    gp.where_signs_differ("x", a, b, np.array([5, 0, 0]))
    out = capsys.readouterr().out
    assert "4 entries in 3 rows (1 of them targets in the sequence) and 2 columns" in out
    assert "largest five: [0, 0, 1, 3]" in out and "zeros in a / b: 1 / 0" in out
