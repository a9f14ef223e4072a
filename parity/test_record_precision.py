"""Tier 4 on the CPU: the record's precision on both sides (design.md "Parity tiers").

ref runs precision="record" eagerly with its CPU emulation of the FP8 head
(torch.ops.jgpt_ref.fp8_mm); jgpt runs policy="record" (bf16 embeddings and residual stream, fp32
master weights cast to bf16 at each matmul, FP8 head in training, bf16 head in eval). Both hold
the same bf16 embeddings and fp32 weights (conftest).

The two cannot agree to the bit: eager torch rounds every elementwise op to bf16 (except the
chains ref computes in fp32 and rounds once, as the compiled record's fused kernels do, record26
§11.1: the lambda mixes and the QK-norm + rotary), and jgpt's XLA fuses and orders its fp32
arithmetic its own way; the FP8 head then re-quantizes hidden states that differ by bf16 ulps.

Bounds:
* design.md tier 4: softcapped logits per-row relative L2 <= 1e-2 (the logits the loss sees).
  The raw FP8 logits cannot meet a per-row 1e-2 between two implementations: e4m3 keeps 3
  mantissa bits, so a one-ulp bf16 difference in a hidden element flips its quantized value by
  1/16 (measured: each side is ~3.8e-2 per tensor from the float64 result, the two sides
  1.9e-2 apart, per-row up to 5.1e-2; ref against itself with its bf16 weights moved by one
  ulp: 2.5e-2, per-row 5.3e-2). The same FP8 head given the same hidden state agrees to the
  bit (test_fp8_head_same_inputs).
* loss within 1% (tier 4's "final val within 1%").
* every traced activation and every gradient, per tensor: rel L2(jgpt, ref) <= 2 x the spread of
  ref against itself when each bf16 parameter moves by one ulp in a random direction (the
  design's tier-3/4 rule: "within 2x the spread of ref against itself under a perturbation of
  one ulp"). Measured (T = 384, W = 1 and 14, blockwise): jgpt-vs-ref / spread <= 1.00 for
  every gradient in training (worst the scalars, sums over T x d with heavy cancellation,
  1.5e-2 vs 2.7e-2 at W = 1 and 2.1e-2 vs 2.1e-2 at W = 14; embed.weight 9.1e-3 vs 9.9e-3;
  lm_head 2.0e-2 vs 2.5e-2); activations and logits <= 0.80. The largest gradient ratio was
  0.94 before jgpt's sums between blocks became fp32 (model.BLOCK_SUM, as the compiled record
  computes them; ref's eager path rounds them), 0.93 with them, and 1.00 once the norms and
  mixes that read those sums differentiate at the stored (rounded) sums as torch's autograd does
  (model.sum_norm, model.mix_sum). (Before ref's QK-norm + rotary became one fp32 chain, jgpt's,
  already one, put the scalars at 1.99 x the spread.) For scale, on the
  same inputs ref eager against ref under torch.compile (CPU inductor, 150 s of compilation, so
  not run here; measured while ref eager still rounded the QK-norm's output) differed by
  7e-3..1.3e-2 per weight gradient and 2.4e-2 on the scalars: jgpt's differences from eager ref
  lie inside that spread for every tensor (scalars: 1.9e-2).

Gradients are compared in training mode only (the record has no backward in eval). In eval
mode (bf16 head) jgpt's scalars gradient is measurably less accurate than ref's: 3.7e-2 from
the float64 result vs ref eager 9.6e-3 and ref compiled 1.3e-2 (W = 14); XLA's CPU
`xla_allow_excess_precision` (on by default) accounts for half of it (1.75e-2 with it off); the
weight gradients are unaffected. See the parity report.
"""
import functools

import numpy as np
import pytest

from parity.conftest import (CFG, FIXED_TOKENS, FORWARD_KEYS, TIER4_LOGITS_ROW_REL, build_ref, fp32_state,
                             host, jgpt_run, record_max, ref_model, ref_run, rel, row_rel, torch)

import jax
import jax.numpy as jnp

from jgpt.fp8 import fp8_matmul

RECORD_WINDOWS = (1, 14)  # the windows themselves are tiers 0/1's subject; here the precision
LOSS_REL = 1e-2
SPREAD_FACTOR = 2.0
BACKEND = "blockwise"


@functools.cache
def perturbed_model():
    """ref at record precision with every bf16 parameter (the embeddings) one ulp up or down."""
    with torch.random.fork_rng(devices=[]):
        model = build_ref("record")
    model.load_state_dict(ref_model("record").state_dict())
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype == torch.bfloat16:  # +-1 on the bit pattern: the neighbouring bf16 value
                step = torch.randint(0, 2, p.shape, generator=g, dtype=torch.int16) * 2 - 1
                p.view(torch.int16).add_(step)
    return model


@functools.cache
def runs(window: int, train: bool):
    """(ref, ref with one-ulp perturbed bf16 weights, jgpt) at record precision."""
    r = ref_run("record", *FIXED_TOKENS, window, train=train, grads=train)
    p = ref_run("record", *FIXED_TOKENS, window, train=train, grads=train, model=perturbed_model())
    j = jgpt_run("record", BACKEND, *FIXED_TOKENS, window, train=train, grads=train)
    return r, p, j


CASES = [(w, True) for w in RECORD_WINDOWS] + [(14, False)]


@pytest.mark.parametrize("window,train", CASES)
def test_tier4_logits_and_loss(window, train):
    r, _, j = runs(window, train)
    worst = float(np.max(row_rel(j.acts["logits"], r.acts["logits"])))
    record_max(f"tier 4 logits per-row ({'train, FP8' if train else 'eval, bf16'} head)", worst)
    assert worst <= TIER4_LOGITS_ROW_REL, f"softcapped logits per-row relative L2 {worst:.3e}"
    loss = abs(j.loss - r.loss) / abs(r.loss)
    record_max("tier 4 loss", loss)
    assert loss <= LOSS_REL, (j.loss, r.loss)


@pytest.mark.parametrize("window,train", CASES)
def test_tier4_activations_within_ref_spread(window, train):
    r, p, j = runs(window, train)
    worst = {}
    for k in FORWARD_KEYS:
        spread, diff = rel(p.acts[k], r.acts[k]), rel(j.acts[k], r.acts[k])
        worst[k] = diff / spread if spread else (0.0 if diff == 0 else np.inf)
    record_max("tier 4 activations / ref spread", max(worst.values()))
    bad = {k: v for k, v in worst.items() if v > SPREAD_FACTOR}
    assert not bad, f"activations beyond {SPREAD_FACTOR} x ref's one-ulp spread: {bad}"


@pytest.mark.parametrize("window", RECORD_WINDOWS)
def test_tier4_gradients_within_ref_spread(window):
    r, p, j = runs(window, True)
    ratio, diffs = {}, {}
    for k in r.grads:
        spread, diffs[k] = rel(p.grads[k], r.grads[k]), rel(j.grads[k], r.grads[k])
        assert spread > 0, f"the perturbation did not reach {k}"
        ratio[k] = diffs[k] / spread
    record_max("tier 4 gradients (rel L2 jgpt vs ref)", max(diffs.values()))
    record_max("tier 4 gradients / ref spread", max(ratio.values()))
    bad = {k: v for k, v in ratio.items() if v > SPREAD_FACTOR}
    assert not bad, f"gradients beyond {SPREAD_FACTOR} x ref's one-ulp spread: {bad}"


def test_eval_head_is_bf16_not_fp8():
    """Validation uses the plain bf16 head (record26 §11.9): the raw eval logits agree to the
    bf16 level (measured 6.5e-3), well below the FP8 head's own error (~3.8e-2), which
    is what an FP8 head on one side would show."""
    r, _, j = runs(14, False)
    err = rel(j.acts["logits_raw"], r.acts["logits_raw"])
    record_max("tier 4 eval raw logits", err)
    assert err <= 1e-2
    r_train = runs(14, True)[0]
    assert rel(r_train.acts["logits_raw"], r.acts["logits_raw"]) > 2e-2  # the FP8 head does differ


def ulps_apart(a, b):
    """|a - b| in units of b's bf16 spacing (a and b hold bf16 values)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    spacing = np.exp2(np.floor(np.log2(np.maximum(np.abs(b), 1e-38))) - 7)
    return np.abs(a - b) / spacing


def test_fp8_head_same_inputs():
    """The FP8 head alone, same bf16 hidden state (ref's final norm), same fp32 head weight,
    same bf16 incoming gradient: ref's emulated torch.ops.jgpt_ref.fp8_mm against
    jgpt.fp8.fp8_matmul (record26 §5.9). The forward is bit-identical; grad_w is an fp32 sum
    over the T tokens in another order (within the fp32 summation bound); grad_x is a bf16
    rounding of an fp32 sum over 50,304 products in another order: one ulp at most."""
    model = ref_model("record")
    h = torch.tensor(runs(1, True)[0].acts["final_norm"]).bfloat16()  # bf16 values, widened: exact
    h.requires_grad_()
    w = model.lm_head.weight.detach().clone().requires_grad_()
    head = model.lm_head
    assert (head.x_s, head.w_s, head.grad_s) == (CFG.fp8_x_s, CFG.fp8_w_s, CFG.fp8_grad_s)
    out = torch.ops.jgpt_ref.fp8_mm(h, w, head.x_s, head.w_s, head.grad_s)[0]
    # |dloss/dz| <= 0.036 with summed CE (record26 §5.9); 0.01 puts g / grad_s in e5m2's normal range
    g = (torch.randn(out.shape, generator=torch.Generator().manual_seed(0)) * 0.01).bfloat16()
    out.backward(g)
    jo, vjp = jax.vjp(lambda x, wt: fp8_matmul(x, wt, CFG.fp8_x_s, CFG.fp8_w_s, CFG.fp8_grad_s),
                      jnp.asarray(host(h), jnp.bfloat16), jnp.asarray(host(w)))
    gx, gw = vjp(jnp.asarray(host(g), jnp.bfloat16))
    assert jo.dtype == jnp.bfloat16 and gx.dtype == jnp.bfloat16 and gw.dtype == jnp.float32
    np.testing.assert_array_equal(host(jo), host(out))
    # grad_w = G^T X sums T products per entry in fp32, and XLA's CPU GEMM and torch's add them in
    # blocked orders that depend on the CPU (bit-identical on session 3's CI machine, 1.75% of
    # entries one fp32 ulp apart on a session-4 dev VM): each order is within T u sum|terms| of
    # the exact sum (the worst-case fp32 summation bound; sum|terms| from the unquantised
    # operands, x1.2 for the e5m2/e4m3 roundings), so the two are within twice that
    T = h.shape[0]
    terms = 1.2 * np.abs(host(g).astype(np.float64)).T @ np.abs(host(h).astype(np.float64))
    gap = np.abs(host(gw).astype(np.float64) - host(w.grad).astype(np.float64))
    assert np.all(gap <= 2 * T * 2.0 ** -24 * terms), float(np.max(gap / (T * 2.0 ** -24 * terms)))
    record_max("tier 4 FP8 head grad_w entries differing (fraction)", float(np.mean(gap > 0)))
    d = ulps_apart(host(gx), host(h.grad))
    record_max("tier 4 FP8 head grad_x (bf16 ulps)", float(d.max()))
    assert d.max() <= 1 and np.mean(d > 0) < 1e-2, (d.max(), np.mean(d > 0))


def test_record_weights_are_the_fp32_ones_rounded():
    """The record model's bf16 embeddings are the fp32 state rounded (load_state_dict casts), and
    the other weights are the fp32 ones: both sides see the same numbers."""
    sd = ref_model("record").state_dict()
    for k, v in fp32_state().items():
        want = v.bfloat16() if k == "embed.weight" or k.startswith("value_embeds.") else v
        assert sd[k].dtype == want.dtype and torch.equal(sd[k], want), k
