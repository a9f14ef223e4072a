"""Whole-model backward parity, tiers 0 and 1: the gradient of the summed training loss with
respect to every parameter (ref: autograd of GPT.forward; jgpt: jax.value_and_grad of
jgpt.model.forward on the converted weights), per-tensor relative L2 within 1e-10 in float64 and
1e-4 in float32. Structurally zero gradient entries (dead scalars, embedding rows no token looks
up, record26 §11.16) must be exactly zero on both sides, since Adam would move a parameter whose
gradient is only rounding noise by a full lr * sign(g).

Then the same comparison (fp32, forward and backward) on inputs drawn by hypothesis: sequence
lengths 256/384/512, BOS anywhere (block edges included, or none at position 0, as in a
validation slice), every window 0..T/128.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity.conftest import (BACKENDS, FORWARD_KEYS, TIER0_REL, TIER1_ACT_REL, TIER1_GRAD_REL, TIER1_LOSS_REL,
                             WINDOWS, compare, jgpt_numpy_params, jgpt_run, make_tokens, record_max, ref_run,
                             tier_metrics)

TIERS = {"fp64": (0, TIER0_REL), "fp32": (1, TIER1_GRAD_REL)}


def grad_metrics(m):
    return {k[5:]: v for k, v in m.items() if k.startswith("grad:")}


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients(precision, window, backend):
    tier, bound = TIERS[precision]
    m = tier_metrics(precision, window)[backend]
    grads = grad_metrics(m)
    assert set(grads) == set(jgpt_numpy_params(precision)), "gradients for other parameters than the model's"
    record_max(f"tier {tier} gradients", max(grads.values()))
    bad = {k: v for k, v in grads.items() if not v <= bound}
    assert not bad, f"tier {tier} W={window} {backend}: gradient relative L2 above {bound:g}: {bad}"
    zeros = [k[6:] for k, v in m.items() if k.startswith("zeros:") and v]
    assert not zeros, f"tier {tier} W={window} {backend}: structurally zero gradient entries differ in {zeros}"


LENGTHS = (256, 384, 512)


@st.composite
def drawn_inputs(draw):
    length = draw(st.sampled_from(LENGTHS))
    nblk = length // 128
    edges = [128 * k for k in range(1, nblk)]
    # positions 1..length: length itself is the last target token only
    bos = draw(st.lists(st.one_of(st.sampled_from(edges), st.integers(1, length)), max_size=8, unique=True))
    return dict(length=length, bos=bos, first_bos=draw(st.booleans()),
                window=draw(st.integers(0, nblk)), seed=draw(st.integers(0, 2 ** 16)))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=drawn_inputs())
def test_tier1_on_drawn_inputs(case):
    """fp32 ref (dense attention) vs jgpt (blockwise, one compilation per length): loss, every
    activation and every gradient within tier 1."""
    inp, tgt = make_tokens(case["length"], seed=case["seed"], bos=case["bos"], first_bos=case["first_bos"])
    w = case["window"]
    m = compare(ref_run("fp32", inp, tgt, w), jgpt_run("fp32", "blockwise", inp, tgt, w))
    acts = {k: m[k] for k in FORWARD_KEYS}
    grads = grad_metrics(m)
    record_max("tier 1 drawn inputs: activations", max(acts.values()))
    record_max("tier 1 drawn inputs: gradients", max(grads.values()))
    assert m["loss"] <= TIER1_LOSS_REL, m["loss"]
    assert max(acts.values()) <= TIER1_ACT_REL, {k: v for k, v in acts.items() if v > TIER1_ACT_REL}
    assert max(grads.values()) <= TIER1_GRAD_REL, {k: v for k, v in grads.items() if v > TIER1_GRAD_REL}
    assert not any(v for k, v in m.items() if k.startswith("zeros:"))
    assert np.isfinite(m["ref_loss"])
