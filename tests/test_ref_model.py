"""The PyTorch reference on its own: parameters, mask rule, attention, FP8 emulation, loss at init.

Every expectation comes from an independent computation (brute-force loops, numpy, the spec's
numbers), not from the code under test.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

torch = pytest.importorskip("torch")
from ref import train_gpt as ref  # noqa: E402

BOS = 50256


# --- parameters (record26 §3) --------------------------------------------------------------------

def spec_table():
    """record26 §3, written out by hand: name -> (shape, dtype)."""
    t = {"embed.weight": ((50304, 768), torch.bfloat16), "lm_head.weight": ((50304, 768), torch.float32),
         "scalars": ((64,), torch.float32)}
    for k in range(3):
        t[f"value_embeds.{k}.weight"] = ((50304, 768), torch.bfloat16)
    for i in range(12):
        if i != 7:
            t[f"blocks.{i}.attn.qkv_w"] = ((3, 768, 768), torch.float32)
            t[f"blocks.{i}.attn.c_proj.weight"] = ((768, 768), torch.float32)
        t[f"blocks.{i}.mlp.c_fc.weight"] = ((3072, 768), torch.float32)
        t[f"blocks.{i}.mlp.c_proj.weight"] = ((768, 3072), torch.float32)
    return t


def test_state_dict_matches_the_record_table():
    with torch.device("meta"):
        model = ref.GPT(vocab_size=50257, num_layers=12, num_heads=6, model_dim=768, max_seq_len=262144)
    sd = model.state_dict()
    assert {k: (tuple(v.shape), v.dtype) for k, v in sd.items()} == spec_table()
    assert sum(v.numel() for v in sd.values()) == 275_742_784
    assert sum(v.numel() for k, v in sd.items() if "embed" in k) == 154_533_888


def test_init_values_follow_the_spec():
    torch.manual_seed(0)
    m = ref.GPT(50257, 4, 2, 64, 256, head_dim=32, precision="fp32")
    L = 4
    s = m.scalars.detach().numpy()
    np.testing.assert_array_equal(s, np.r_[np.ones(L), np.tile([1.0, 0.0], L), np.tile([0.5, 0.5], L), np.ones(4)])  # 20 -> 24
    bound = math.sqrt(3) * 0.5 / math.sqrt(64)
    qkv = m.blocks[0].attn.qkv_w.detach()
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    assert torch.count_nonzero(m.lm_head.weight) == 0
    assert torch.count_nonzero(m.blocks[1].mlp.c_proj.weight) == 0
    assert torch.count_nonzero(m.blocks[1].attn.c_proj.weight) == 0
    assert abs(m.embed.weight.std().item() - 1) < 0.01


def test_config_rules():
    assert ref.value_embed_layout(12) == [0, 1, 2] + [None] * 6 + [0, 1, 2]
    assert ref.value_embed_layout(4) == [0, 1, 0, 1]
    assert ref.default_long_layers(12) == (0, 4, 7, 11)
    assert ref.default_long_layers(6) == (0, 4, 5)
    assert ref.num_scalars(12) == 64 and ref.num_scalars(6) == 32


# --- the mask rule (record26 §5.6) ------------------------------------------------------------------

def brute_allowed(tokens, w):
    T = len(tokens)
    doc, d = [], 0
    for t in tokens:
        d += t == BOS
        doc.append(d)
    out = np.zeros((T, T), bool)
    for q in range(T):
        for k in range(q + 1):
            out[q, k] = doc[k] == doc[q] and (q // 128 - k // 128) < max(w, 1)
    return out


def random_tokens(rng, nblocks, nbos):
    toks = rng.integers(0, 50000, size=nblocks * 128)
    toks[rng.choice(len(toks), size=nbos, replace=False)] = BOS
    return toks


def flex_to_dense(bm, input_seq):
    """Token-level mask from a BlockMask's lists: full blocks entirely, partial ones by mask_mod."""
    T = input_seq.numel()
    docs = ref.document_ids(input_seq)
    out = np.zeros((T, T), bool)
    q = torch.arange(T)[:, None]
    k = torch.arange(T)[None, :]
    rule = ((k <= q) & (docs[q] == docs[k])).numpy()
    for m in range(T // 128):
        rows = slice(m * 128, (m + 1) * 128)
        for n in bm.full_kv_indices[0, 0, m, :bm.full_kv_num_blocks[0, 0, m]].tolist():
            out[rows, n * 128:(n + 1) * 128] = True
        for n in bm.kv_indices[0, 0, m, :bm.kv_num_blocks[0, 0, m]].tolist():
            out[rows, n * 128:(n + 1) * 128] |= rule[rows, n * 128:(n + 1) * 128]
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), nblocks=st.sampled_from([3, 6, 9]), nbos=st.integers(0, 12),
       window=st.integers(0, 10))
def test_dense_mask_is_the_rule(seed, nblocks, nbos, window):
    toks = random_tokens(np.random.default_rng(seed), nblocks, nbos)
    got = ref.dense_mask(ref.document_ids(torch.tensor(toks)), window).numpy()
    np.testing.assert_array_equal(got, brute_allowed(toks, window))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), nblocks=st.sampled_from([4, 7]), nbos=st.integers(0, 10),
       window=st.integers(0, 9))
def test_flex_block_masks_equal_the_rule(seed, nblocks, nbos, window):
    """The record's block classification and nearest-first truncation give the dense rule for
    both windows W and W // 2 (including 0, which acts as 1)."""
    toks = torch.tensor(random_tokens(np.random.default_rng(seed), nblocks, nbos))
    long_bm, short_bm = ref.flex_block_masks(toks, torch.tensor(window, dtype=torch.int32))
    np.testing.assert_array_equal(flex_to_dense(long_bm, toks), brute_allowed(toks.numpy(), window))
    np.testing.assert_array_equal(flex_to_dense(short_bm, toks), brute_allowed(toks.numpy(), window // 2))


def naive_attention(q, k, v, allowed, scale):
    """Per query, per head: softmax over the allowed keys, in float64."""
    T, H, D = q.shape
    out = np.zeros((T, H, D))
    for h in range(H):
        for i in range(T):
            idx = np.nonzero(allowed[i])[0]
            s = scale * k[idx, h] @ q[i, h]
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v[idx, h]
    return out


@pytest.mark.parametrize("window", [0, 1, 2, 5])
def test_blockwise_and_dense_attention_equal_naive(window):
    rng = np.random.default_rng(window)
    toks = random_tokens(rng, 4, 5)
    q, k, v = (torch.tensor(rng.normal(size=(512, 2, 16))) for _ in range(3))
    docs = ref.document_ids(torch.tensor(toks))
    want = naive_attention(q.numpy(), k.numpy(), v.numpy(), brute_allowed(toks, window), 0.12)
    for fn in (ref.dense_attention, ref.blockwise_attention):
        got = fn(q, k, v, docs, window, 0.12).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_blockwise_attention_gradients_equal_dense():
    rng = np.random.default_rng(7)
    toks = torch.tensor(random_tokens(rng, 5, 6))
    docs = ref.document_ids(toks)
    base = [torch.tensor(rng.normal(size=(640, 2, 8))) for _ in range(3)]
    grads = []
    for fn in (ref.dense_attention, ref.blockwise_attention):
        qkv = [t.clone().requires_grad_() for t in base]
        fn(*qkv, docs, 3, 0.12).pow(2).sum().backward()
        grads.append([t.grad for t in qkv])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --- rotary (record26 §5.5) ---------------------------------------------------------------------

def test_rotary_is_rotation_by_minus_theta():
    rot = ref.Rotary(128, 300, torch.float64)
    x = torch.randn(1, 300, 2, 128, dtype=torch.float64)
    got = rot(x).numpy()
    j = np.arange(64)
    freq = np.where(j < 32, (1 / 1024) ** (np.minimum(j, 31) / 31), 0.0)
    theta = np.arange(300)[:, None] * freq[None, :]
    z = (x[..., :64].numpy() + 1j * x[..., 64:].numpy()) * np.exp(-1j * theta)[None, :, None, :]
    np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), rtol=1e-12, atol=1e-12)


# --- FP8 head emulation (record26 §5.9, §11.9) --------------------------------------------------------

def test_fp8_quantization_saturates_and_rounds_within_half_ulp():
    big = torch.tensor([1e4, -1e4, 449.0, 500.0, -470.0])
    assert ref.quantize_fp8(big, 1.0, torch.float8_e4m3fn).float().tolist() == [448, -448, 448, 448, -448]
    assert ref.quantize_fp8(torch.tensor([1e6, -7e4]), 1.0, torch.float8_e5m2).float().tolist() == [57344, -57344]
    x = torch.empty(10000).uniform_(-400, 400)
    x = x[x.abs() > 2**-6]  # normal range of e4m3
    rel = ((ref.quantize_fp8(x, 1.0, torch.float8_e4m3fn).float() - x).abs() / x.abs()).max().item()
    assert rel <= 2**-4 + 1e-7  # 3 mantissa bits: half an ulp is 2^-4 relative


def test_fp8_head_forward_and_backward_against_fp32():
    torch.manual_seed(0)
    d, V, T = 128, 512, 256
    x = ref.norm(torch.randn(T, d)).bfloat16().requires_grad_()
    w = (torch.randn(V, d) * 1.5).requires_grad_()
    x_s, w_s, g_s = d ** 0.5 / 448, 24 / 448, 1 / 448
    out = torch.ops.jgpt_ref.fp8_mm(x, w, x_s, w_s, g_s)[0]
    exact = x.float() @ w.detach().T
    assert out.dtype == torch.bfloat16
    rel = (out.float() - exact).norm() / exact.norm()
    assert 1e-3 < rel < 0.06  # quantized (not exact) but close: e4m3 on both operands
    g = (torch.randn(T, V) * 0.01).bfloat16()
    out.backward(g)
    gx_exact = g.float() @ w.detach()
    gw_exact = g.float().T @ x.detach().float()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert (x.grad.float() - gx_exact).norm() / gx_exact.norm() < 0.1
    assert (w.grad - gw_exact).norm() / gw_exact.norm() < 0.1


# --- whole model ------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["record", "fp32", "fp64"])
def test_loss_at_init_is_ln_vocab(precision):
    torch.manual_seed(0)
    m = ref.GPT(50257, 4, 2, 64, 512, head_dim=32, precision=precision)
    toks = torch.tensor(random_tokens(np.random.default_rng(0), 4, 3))
    tgt = torch.roll(toks, -1).long()
    train = m(toks, tgt, 2)  # training: sum over tokens
    assert train.item() == pytest.approx(512 * math.log(50304), rel=1e-6)
    m.eval()
    assert m(toks, tgt, 2).item() == pytest.approx(math.log(50304), rel=1e-6)


def perturbed(precision, seed=0, **kw):
    """A model whose zero-initialised c_proj and lm_head are perturbed (design.md, parity tiers);
    the weights are drawn once in fp32 and copied into the requested precision."""
    torch.manual_seed(seed)
    src = ref.GPT(50257, 4, 2, 64, 512, head_dim=32, precision="fp32", **kw)
    with torch.no_grad():
        src.lm_head.weight.normal_(0, 1.5)
        for b in src.blocks:
            b.mlp.c_proj.weight.normal_(0, 0.05)
            if b.attn is not None:
                b.attn.c_proj.weight.normal_(0, 0.05)
    m = ref.GPT(50257, 4, 2, 64, 512, head_dim=32, precision=precision, **kw)
    m.load_state_dict(src.state_dict())
    return m


def test_precisions_agree_and_attention_backends_agree():
    toks = torch.tensor(random_tokens(np.random.default_rng(1), 4, 6))
    tgt = torch.roll(toks, -1).long()
    losses = {}
    for precision in ("fp64", "fp32", "record"):
        for attention in ("dense", "blockwise"):
            m = perturbed(precision, attention=attention)
            losses[precision, attention] = m(toks, tgt, 3).item()
    assert losses["fp64", "dense"] == pytest.approx(losses["fp64", "blockwise"], rel=1e-12)
    assert losses["fp32", "dense"] == pytest.approx(losses["fp64", "dense"], rel=1e-5)
    assert losses["record", "dense"] == pytest.approx(losses["fp64", "dense"], rel=2e-2)


def test_window_changes_the_loss_and_no_attention_layer_has_none():
    m = perturbed("fp64", no_attn_layers=(2,))
    assert m.blocks[2].attn is None and "blocks.2.attn.qkv_w" not in m.state_dict()
    toks = torch.tensor(random_tokens(np.random.default_rng(2), 4, 1))
    tgt = torch.roll(toks, -1).long()
    assert m(toks, tgt, 1).item() != pytest.approx(m(toks, tgt, 4).item(), rel=1e-9)
    # windows 0 and 1 are the same mask for the short layers (record26 §11.6)
    assert m(toks, tgt, 1).item() == m(toks, tgt, 1).item()


def test_checkpoint_with_orig_mod_prefix_loads(tmp_path):
    a, b = perturbed("fp32", seed=1), perturbed("fp32", seed=2)
    ckpt = {"step": 5, "model": {"_orig_mod." + k: v for k, v in a.state_dict().items()}, "optimizers": []}
    torch.save(ckpt, tmp_path / "c.pt")
    ref.load_checkpoint(b, tmp_path / "c.pt")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    torch.save(a.state_dict(), tmp_path / "bare.pt")
    ref.load_checkpoint(b, tmp_path / "bare.pt")


def test_fp8_ops_fake_kernels_match_the_real_ones():
    """torch.compile trusts the fake kernels' shapes and strides (a mismatch fails only on GPU)."""
    x = ref.norm(torch.randn(256, 64)).bfloat16()
    w = torch.randn(512, 64)
    torch.library.opcheck(torch.ops.jgpt_ref.fp8_mm, (x, w, 8 / 448, 24 / 448, 1 / 448), test_utils=("test_faketensor",))
    _, x8, w8 = torch.ops.jgpt_ref.fp8_mm(x, w, 8 / 448, 24 / 448, 1 / 448)
    g = torch.randn(256, 512).bfloat16()
    torch.library.opcheck(torch.ops.jgpt_ref.fp8_mm_backward, (g, x8, w8, 8 / 448, 24 / 448, 1 / 448),
                          test_utils=("test_faketensor",))
