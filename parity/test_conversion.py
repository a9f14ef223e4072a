"""Weights crossing between the frameworks (jgpt.checkpoint): a reference state dict converts to
jgpt and back with every tensor bit-identical and its dtype kept (bf16 embeddings included), is
exactly the parameter set jgpt's model expects under each policy, and jgpt running the converted
weights gives the reference's loss. The slow test is issue 3's "Done when": the same for a
record-sized model on real Gutenberg text.
"""
import gc

import numpy as np
import pytest

from parity.conftest import (CFG, FIXED_TOKENS, build_ref, fp32_state, jgpt_run, perturb_, record_max, ref_model,
                             ref_rope_freqs, ref_run, torch)

import jax
import jax.numpy as jnp

from jgpt import checkpoint as ckpt
from jgpt import model as M
from jgpt.config import BOS_ID, ModelConfig
from jgpt.data import load_shard

INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t):
    """The raw bits of a tensor (compares NaN payloads and signed zeros too)."""
    return t.contiguous().view(INT_OF[t.element_size()])


def assert_state_dicts_identical(got: dict, want: dict):
    assert list(got) == list(want), "names (or their order) changed"
    for k, v in want.items():
        assert got[k].dtype == v.dtype, f"{k}: dtype {got[k].dtype} != {v.dtype}"
        assert got[k].shape == v.shape, f"{k}: shape {tuple(got[k].shape)} != {tuple(v.shape)}"
        assert torch.equal(bits(got[k]), bits(v)), f"{k}: values differ"


@pytest.mark.parametrize("precision", ["record", "fp32", "fp64"])
def test_round_trip_bit_identical(precision):
    sd = ref_model(precision).state_dict()
    params = ckpt.torch_state_dict_to_params(sd)
    assert_state_dicts_identical(ckpt.params_to_torch_state_dict(params), sd)
    # ... and through jax arrays (what a jgpt training run holds and exports)
    with jax.enable_x64(precision == "fp64"):
        on_device = {k: jnp.asarray(v) for k, v in params.items()}
        assert_state_dicts_identical(ckpt.params_to_torch_state_dict(on_device), sd)


@pytest.mark.parametrize("precision", ["record", "fp32", "fp64"])
def test_converted_weights_are_jgpts_parameters(precision):
    """Names, shapes and dtypes are exactly those jgpt builds itself (record26 §3): the
    conversion needs no renaming, transposing or casting."""
    params = ckpt.torch_state_dict_to_params(ref_model(precision).state_dict())
    ckpt.validate_params(params, CFG)
    with jax.enable_x64(precision == "fp64"):
        for k, v in params.items():
            assert np.dtype(v.dtype) == np.dtype(M.param_dtype(k, precision)), (k, v.dtype)


def test_torch_file_to_jgpt_gives_refs_loss(tmp_path):
    """A record-style checkpoint file ({"model": state dict with torch.compile's `_orig_mod.`
    prefixes}) loaded by jgpt.checkpoint.load_torch_file: jgpt's eval loss (mean CE, the
    validation path) on it equals ref's within tier 1 (fp32)."""
    sd = ref_model("fp32").state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save({"step": 0, "model": {"_orig_mod." + k: v for k, v in sd.items()}}, path)
    params = ckpt.load_torch_file(path)
    ckpt.validate_params(params, CFG)
    want = ref_run("fp32", *FIXED_TOKENS, 2, train=False, grads=False).loss
    got = jgpt_run("fp32", "dense", *FIXED_TOKENS, 2, train=False, grads=False, params=params).loss
    err = abs(got - want) / want
    record_max("tier 1 loss (eval, from a torch file)", err)
    assert err <= 1e-5, (got, want)


def test_fp32_state_is_perturbed():
    """The suite's weights are not the zero init (design.md: always perturb)."""
    sd = fp32_state()
    assert float(sd["lm_head.weight"].std()) > 1.0
    assert all(float(v.std()) > 0.01 for k, v in sd.items() if k.endswith("c_proj.weight"))
    lam_x0 = sd["scalars"][CFG.num_layers + 1: 3 * CFG.num_layers: 2]
    assert bool(torch.all(lam_x0 != 0))


# ------------------------------------------------------------------------------------------------
# issue 3 "Done when": a record-sized state dict, both ways, and the same loss on real text

RECORD_SEQ = 1024  # 8 attention blocks: window 14 covers them all


def gutenberg_sequence(gutenberg_dir, length: int):
    """The `length + 1` tokens of val_000000.bin from its first BOS on (inputs and targets)."""
    tokens = load_shard(gutenberg_dir / "val_000000.bin")
    start = int(np.flatnonzero(tokens == BOS_ID)[0])
    seq = np.asarray(tokens[start: start + length + 1], np.int32)
    assert len(seq) == length + 1
    return seq[:-1], seq[1:]


@pytest.mark.slow
def test_record_sized_round_trip_and_loss(gutenberg_dir):
    """12 layers, 768 dims, 6 heads x 128, vocab 50304 (275,742,784 parameters, record26 §3),
    built by ref in fp32 with max_seq_len 1024 (small rotary buffers), lm_head and c_proj
    perturbed: the state dict converts to jgpt and back bit-identically, and jgpt (fp32 policy)
    and ref give the same loss on 1,024 Gutenberg tokens at windows 1 and 14 (relative 1e-5).
    At most three copies of the weights (~1.1 GB each) are alive at once."""
    cfg = ModelConfig(max_seq_len=RECORD_SEQ)
    inp, tgt = gutenberg_sequence(gutenberg_dir, RECORD_SEQ)
    assert np.sum(inp == BOS_ID) >= 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(26)
        model = build_ref("fp32", cfg)  # copy 1
    perturb_(model)
    model.eval()
    sd = model.state_dict()
    assert sum(v.numel() for v in sd.values()) == 275_742_784
    params = ckpt.torch_state_dict_to_params(sd)  # copy 2
    back = ckpt.params_to_torch_state_dict(params)  # copy 3
    assert_state_dicts_identical(back, sd)
    del back
    gc.collect()

    with torch.no_grad():
        want = {w: model(torch.as_tensor(inp), torch.as_tensor(tgt), w).item() for w in (1, 14)}
    device = {k: jnp.asarray(v) for k, v in params.items()}  # copy 3 again
    del params
    gc.collect()
    freqs = jnp.asarray(ref_rope_freqs(cfg.hdim_head))
    loss = jax.jit(lambda p, x, y, w: M.forward(p, cfg, x, y, w, policy="fp32", train=False,
                                                 backend="blockwise", max_window_blocks=14, rope_freqs=freqs))
    got = {w: float(loss(device, jnp.asarray(inp), jnp.asarray(tgt), jnp.asarray(w, jnp.int32))) for w in (1, 14)}
    del device
    gc.collect()
    for w in (1, 14):
        err = abs(got[w] - want[w]) / want[w]
        record_max("record-sized loss (fp32, Gutenberg)", err)
        assert err <= 1e-5, (w, got[w], want[w])
    assert abs(want[1] - want[14]) > 1e-4 * want[1], "the window should matter on real text"
