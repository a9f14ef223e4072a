"""jgpt.checkpoint and jgpt.evaluate: torch <-> jgpt conversion bit for bit, the jgpt checkpoint
file, validation messages, config inference, the CLI, and evaluating a converted checkpoint."""
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jgpt import checkpoint as C  # noqa: E402
from jgpt import evaluate  # noqa: E402
from jgpt import model as M  # noqa: E402
from jgpt.config import BOS_ID, ModelConfig  # noqa: E402

CFG = ModelConfig(num_layers=4, num_heads=2, model_dim=64, head_dim=32, max_seq_len=1024, no_attn_layers=(2,))


def torch_state_dict(cfg, seed=0):
    """A record-style state dict: bf16 embeddings, fp32 rest; the embeddings hold arbitrary bit
    patterns (NaN payloads, -0, subnormals) so that only a bit-exact path survives."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in M.param_shapes(cfg).items():
        if M.is_embedding(name):
            bits = torch.randint(-2 ** 15, 2 ** 15, shape, generator=g, dtype=torch.int32).to(torch.int16)
            sd[name] = bits.view(torch.bfloat16)
        else:
            sd[name] = torch.randn(shape, generator=g) * 0.1
    return sd


def assert_same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(f"u{a.dtype.itemsize}"), b.view(f"u{b.dtype.itemsize}"))


def torch_bits(t):
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def test_round_trip_torch_params_torch_bit_exact():
    sd = torch_state_dict(CFG)
    params = C.torch_state_dict_to_params(sd)
    assert params["embed.weight"].dtype.name == "bfloat16" and params["scalars"].dtype == np.float32
    back = C.params_to_torch_state_dict(params)
    assert list(back) == list(sd)
    for name, t in sd.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        np.testing.assert_array_equal(torch_bits(back[name]), torch_bits(t))
    # jax arrays convert as well (what a trainer holds)
    back2 = C.params_to_torch_state_dict({k: jnp.asarray(v) for k, v in params.items()})
    np.testing.assert_array_equal(torch_bits(back2["embed.weight"]), torch_bits(sd["embed.weight"]))


def test_jgpt_file_round_trip(tmp_path):
    params = C.torch_state_dict_to_params(torch_state_dict(CFG))
    path = tmp_path / "m.npz"
    C.save_checkpoint(path, params, CFG)
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]  # no temporary left behind
    cfg, loaded = C.load_checkpoint(path)
    assert cfg == CFG and list(loaded) == list(params)
    for name in params:
        assert_same_bits(loaded[name], params[name])


def test_record_checkpoint_dict_and_prefix(tmp_path):
    sd = torch_state_dict(CFG)
    record = dict(step=1750, code="print('hi')",
                  model={"_orig_mod." + k: v for k, v in sd.items()},
                  optimizers=[{"state": {0: {"exp_avg": torch.zeros(3)}},
                               "param_groups": [{"lr": 0.008, "betas": (0.8, 0.95), "params": [0]}]}])
    torch.save(record, tmp_path / "rec.pt")
    params = C.load_torch_file(tmp_path / "rec.pt")
    assert set(params) == set(sd)
    np.testing.assert_array_equal(params["embed.weight"].view(np.int16), torch_bits(sd["embed.weight"]))
    assert C.state_dict_from_checkpoint({"blocks.0.attn.rotary.cos": 1, "module.scalars": 2}) == {"scalars": 2}


def test_mismatch_lists_every_tensor():
    params = C.torch_state_dict_to_params(torch_state_dict(CFG))
    params["blocks.1.mlp.c_fc.weight"] = np.zeros((128, 64), np.float32)
    params["lm_head.weight"] = np.zeros((50304, 32), np.float32)
    del params["blocks.3.attn.qkv_w"]
    params["blocks.2.attn.qkv_w"] = np.zeros((3, 64, 64), np.float32)
    with pytest.raises(C.CheckpointMismatch) as e:
        C.validate_params(params, CFG)
    msg = str(e.value)
    assert "4 problem(s)" in msg
    assert "blocks.1.mlp.c_fc.weight: expected (256, 64), found (128, 64)" in msg
    assert "lm_head.weight: expected (50304, 64), found (50304, 32)" in msg
    assert "missing    blocks.3.attn.qkv_w: expected shape (3, 64, 64)" in msg
    assert "unexpected blocks.2.attn.qkv_w" in msg


def test_infer_config():
    record = jax.eval_shape(lambda k: M.init_params(ModelConfig(), k), jax.random.key(0))
    assert C.infer_config(record) == ModelConfig()
    params = C.torch_state_dict_to_params(torch_state_dict(CFG))
    cfg = C.infer_config(params, num_heads=2, max_seq_len=1024)
    assert (cfg.num_heads, cfg.hdim_head, cfg.attn_free, cfg.num_layers) == (2, 32, (2,), 4)
    assert M.param_shapes(cfg) == M.param_shapes(CFG)
    with pytest.raises(C.CheckpointMismatch, match="head_dim"):
        C.infer_config(params, head_dim=48)


def test_cli_round_trip(tmp_path, capsys):
    sd = torch_state_dict(CFG)
    torch.save({"model": {"_orig_mod." + k: v for k, v in sd.items()}}, tmp_path / "in.pt")
    assert C.main(["to-jgpt", str(tmp_path / "in.pt"), str(tmp_path / "m.npz"), "--num-heads", "2"]) == 0
    assert C.main(["to-torch", str(tmp_path / "m.npz"), str(tmp_path / "out.pt")]) == 0
    back = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(back) == list(sd)
    for name, t in sd.items():
        assert back[name].dtype == t.dtype
        np.testing.assert_array_equal(torch_bits(back[name]), torch_bits(t))
    assert "wrote" in capsys.readouterr().out
    assert C.main(["to-torch", str(tmp_path / "missing.npz"), str(tmp_path / "x.pt")]) == 1
    assert "no such checkpoint file" in capsys.readouterr().err


def test_missing_torch_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install 'jgpt\[torch\]'"):
        C.load_torch_file("whatever.pt")


def test_evaluate_converted_checkpoint(tmp_path):
    """The documented evaluation API on a converted torch checkpoint."""
    sd = {k: (torch.randn(v.shape) if M.is_embedding(k) else v).to(v.dtype) for k, v in torch_state_dict(CFG).items()}
    sd["scalars"] = torch.from_numpy(M.init_scalars(CFG))
    torch.save(sd, tmp_path / "m.pt")
    cfg, params = evaluate.load_checkpoint(tmp_path / "m.pt", num_heads=2, max_seq_len=1024)
    tok = np.random.default_rng(0).integers(0, BOS_ID, (2, 257))
    tok[:, [0, 100]] = BOS_ID
    loss = evaluate.loss(params, cfg, tok, window_blocks=2)
    z = evaluate.logits(params, cfg, tok[:, :-1], window_blocks=2)
    assert z.shape == (2, 256, 50304) and z.dtype == jnp.float32
    z = np.asarray(z, np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    want = np.mean(lse - np.take_along_axis(z, tok[:, 1:, None], -1)[..., 0])
    assert math.isfinite(loss) and abs(loss / want - 1) < 1e-5
    np.testing.assert_allclose(evaluate.logits(params, cfg, tok[1, :-1], window_blocks=2), z[1], rtol=1e-6)
    with pytest.raises(ValueError, match="multiple of 128"):
        evaluate.loss(params, cfg, tok[:, :200], window_blocks=2)
