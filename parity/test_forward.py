"""Whole-model forward parity, tiers 0 and 1 (design.md "Parity tiers"): the same perturbed
weights and tokens through ref's GPT.forward (dense attention) and jgpt.model.forward (dense and
blockwise backends); every traced activation (embedding norm x0, each attn.{i}, mlp.{i},
block.{i}, the final norm, raw and softcapped logits) and the summed training loss.

Tier 0 runs both sides in float64 (relative 1e-10: anything larger is a logic bug); tier 1 in
float32 with FP8 off (per-tensor relative L2 <= 1e-5, loss relative 1e-5). Windows 1, 2, 14 as
described in conftest. The runs are shared with test_backward through conftest.tier_metrics.
"""
import math

import pytest

from parity.conftest import (BACKENDS, CFG, FORWARD_KEYS, TIER0_REL, TIER1_ACT_REL, TIER1_LOSS_REL, WINDOWS,
                             record_max, tier_metrics)

TIERS = {"fp64": (0, TIER0_REL, TIER0_REL), "fp32": (1, TIER1_ACT_REL, TIER1_LOSS_REL)}


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward(precision, window, backend):
    tier, act_bound, loss_bound = TIERS[precision]
    m = tier_metrics(precision, window)[backend]
    assert set(FORWARD_KEYS) <= set(m), f"trace keys missing: {set(FORWARD_KEYS) - set(m)}"
    record_max(f"tier {tier} forward activations/logits", max(m[k] for k in FORWARD_KEYS))
    record_max(f"tier {tier} loss", m["loss"])
    bad = {k: m[k] for k in FORWARD_KEYS if not m[k] <= act_bound}
    assert not bad, f"tier {tier} W={window} {backend}: relative L2 above {act_bound:g}: {bad}"
    assert m["loss"] <= loss_bound, f"tier {tier} W={window} {backend}: loss relative {m['loss']:.3e}"


def test_the_cases_exercise_the_model():
    """The comparisons above are not vacuous: the perturbed model is far from the zero-init loss
    T * ln(Vp), and the three windows change the loss (so the masks matter)."""
    losses = [tier_metrics("fp64", w)["dense"]["ref_loss"] for w in WINDOWS]
    t = tier_metrics("fp64", WINDOWS[0])["dense"]["tokens"]
    assert all(abs(x - t * math.log(CFG.vocab_padded)) > 0.01 * x for x in losses)
    assert len({round(x, 6) for x in losses}) == len(losses), losses
