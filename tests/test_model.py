"""jgpt.model: parameter names, shapes and init; the forward pass against a numpy
re-implementation of record26 §5 (fp32 and fp64 policies); policies, windows, backends, trace."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jgpt import attention as A
from jgpt import model as M
from jgpt.config import BOS_ID, ModelConfig

# L = 4 with layer 2 attention-free: U-net of 2, value embeds on layers 0, 1 and 2, 3, long layers {0, 3}
CFG = ModelConfig(num_layers=4, num_heads=2, model_dim=64, head_dim=32, max_seq_len=1024, no_attn_layers=(2,))
T = 384  # 3 attention blocks


def perturbed_params(cfg, seed=0, policy="fp32"):
    """Init, then move every zero-initialised weight and the scalars so that nothing hides
    behind ln(50304) (design.md: always perturb)."""
    rng = np.random.default_rng(seed)
    params = M.init_params(cfg, jax.random.key(seed), policy)
    out = {}
    for name, p in params.items():
        a = np.asarray(p, np.float32)
        if name == "lm_head.weight":
            a = rng.standard_normal(a.shape) * 1.5
        elif "c_proj" in name:
            a = rng.standard_normal(a.shape) * 0.5 / math.sqrt(a.shape[1])
        elif name == "scalars":
            a = a + rng.uniform(-0.3, 0.3, a.shape)
        out[name] = jnp.asarray(a, p.dtype)
    return out


def batch(seed=0, bos=(0, 50, 129, 130, 300)):
    tok = np.random.default_rng(seed).integers(0, BOS_ID, T + 1)
    tok[list(bos)] = BOS_ID
    return tok[:-1], tok[1:]


# ------------------------------------------------------------------------------------------------
# numpy re-implementation of record26 §5 (written from the spec, not from jgpt.model)


def np_forward(params, cfg, inp, tgt, W, theta_dtype):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    L, H, D, d = cfg.num_layers, cfg.num_heads, cfg.hdim_head, cfg.model_dim
    eps = 2.0 ** -23

    def rms(x):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)

    docs = np.cumsum(inp == BOS_ID)
    pos = np.arange(T)

    def mask(w):
        q, k = pos[:, None], pos[None, :]
        return (k <= q) & (docs[:, None] == docs[None, :]) & (q // 128 - k // 128 < max(w, 1))

    n4 = D // 4
    omega = np.concatenate([1024.0 ** (-np.arange(n4) / (n4 - 1)), np.zeros(n4)]).astype(theta_dtype)
    theta = (pos.astype(theta_dtype)[:, None] * omega[None, :]).astype(np.float64)

    def rope(x):  # (x1 + i x2) e^{-i theta}
        z = (x[..., : D // 2] + 1j * x[..., D // 2:]) * np.exp(-1j * theta)[:, None, :]
        return np.concatenate([z.real, z.imag], -1)

    s = p["scalars"]
    n_ve = min(3, L // 2)
    layout = [None] * L
    for k in range(n_ve):
        layout[k] = layout[L - n_ve + k] = k
    ves = [p[f"value_embeds.{k}.weight"][inp] for k in range(n_ve)]
    x = x0 = rms(p["embed.weight"][inp])
    skips = []
    for i in range(L):
        if i >= L // 2:
            x = x + s[i - L // 2] * skips.pop()
        x = s[L + 2 * i] * x + s[L + 2 * i + 1] * x0
        if i not in cfg.attn_free:
            u = rms(x)
            qkv = (u @ p[f"blocks.{i}.attn.qkv_w"].reshape(3 * H * D, d).T).reshape(T, 3, H, D)
            q, k, v = rope(rms(qkv[:, 0])), rope(rms(qkv[:, 1])), qkv[:, 2]
            lv, lve = s[3 * L + 2 * i], s[3 * L + 2 * i + 1]
            v = lv * v if layout[i] is None else lv * v + lve * ves[layout[i]].reshape(T, H, D)
            m = mask(W if i in cfg.long else W // 2)
            sc = np.where(m[None], np.einsum("qhd,khd->hqk", q, k) * 0.12, -np.inf)
            pr = np.exp(sc - sc.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            y = np.einsum("hqk,khd->qhd", pr, v).reshape(T, H * D)
            x = x + y @ p[f"blocks.{i}.attn.c_proj.weight"].T
        h = np.maximum(rms(x) @ p[f"blocks.{i}.mlp.c_fc.weight"].T, 0) ** 2
        x = x + h @ p[f"blocks.{i}.mlp.c_proj.weight"].T
        if i < L // 2:
            skips.append(x)
    z = rms(x) @ p["lm_head.weight"].T
    logits = 30 / (1 + np.exp(-z / (7.5 * math.sqrt(d))))
    mx = logits.max(-1, keepdims=True)
    lse = (mx + np.log(np.exp(logits - mx).sum(-1, keepdims=True)))[:, 0]
    return logits, lse - logits[np.arange(T), tgt]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def fp32_case():
    params = perturbed_params(CFG)
    inp, tgt = batch()
    return params, inp, tgt


@pytest.fixture(scope="module")
def fp32_eval(fp32_case):
    """One compiled eval forward (traced window, blockwise) shared by the fp32 tests."""
    params, inp, tgt = fp32_case
    f = jax.jit(lambda p, w: M.forward_with_trace(p, CFG, inp, tgt, w, policy="fp32", train=False,
                                                  max_window_blocks=3))
    return lambda W: f(params, jnp.int32(W))


@pytest.mark.parametrize("W", [1, 3])
def test_fp32_forward_matches_numpy(fp32_case, fp32_eval, W):
    params, inp, tgt = fp32_case
    loss, trace = fp32_eval(W)
    want_logits, want_ce = np_forward(params, CFG, inp, tgt, W, np.float32)
    assert rel(trace["logits"], want_logits) < 1e-5
    assert abs(float(loss) / want_ce.mean() - 1) < 1e-5


def test_fp64_forward_matches_numpy(fp32_case):
    """Tier-0 style: in float64 anything above rounding noise is a logic bug (design.md)."""
    params, inp, tgt = fp32_case
    with jax.enable_x64(True):
        p64 = {k: jnp.asarray(np.asarray(v, np.float64)) for k, v in params.items()}
        f = jax.jit(lambda p: M.forward_with_trace(p, CFG, inp, tgt, 2, policy="fp64", train=False))
        loss, trace = f(p64)
        assert trace["logits"].dtype == jnp.float64
        want_logits, want_ce = np_forward(params, CFG, inp, tgt, 2, np.float64)
        assert rel(trace["logits"], want_logits) < 1e-10
        assert abs(float(loss) / want_ce.mean() - 1) < 1e-10


def test_fp64_policy_needs_x64(fp32_case):
    params, inp, tgt = fp32_case
    with pytest.raises(ValueError, match="jax_enable_x64"):
        M.forward(params, CFG, inp, tgt, 1, policy="fp64")


def test_loss_at_init_is_ln_vocab():
    """lm_head starts at zero: every softcapped logit is 15, CE = ln(50304) (record26 §11.15);
    training sums over tokens (FP8 head), eval takes the mean."""
    params = M.init_params(CFG, jax.random.key(1), "record")
    inp, tgt = batch(1)
    for policy, train in (("record", True), ("fp32", False)):
        loss = float(jax.jit(lambda p: M.forward(p, CFG, inp, tgt, 1, policy=policy, train=train))(params))
        per_token = loss / T if train else loss
        assert abs(per_token - math.log(50304)) < 1e-5, (policy, train, per_token)


def test_record_policy_dtypes_and_closeness(fp32_case):
    params32, inp, tgt = fp32_case
    params = {k: (v.astype(jnp.bfloat16) if M.is_embedding(k) else v) for k, v in params32.items()}
    loss_ev, tr = jax.jit(lambda p: M.forward_with_trace(p, CFG, inp, tgt, 2, policy="record", train=False))(params)
    assert tr["x0"].dtype == jnp.bfloat16 and tr["block.3"].dtype == jnp.bfloat16
    assert tr["logits_raw"].dtype == jnp.float32
    ref = float(jax.jit(lambda p: M.forward(p, CFG, inp, tgt, 2, policy="fp32", train=False))(params))
    assert abs(float(loss_ev) / ref - 1) < 1e-2
    loss_tr, grads = jax.jit(jax.value_and_grad(lambda p: M.forward(p, CFG, inp, tgt, 2, policy="record")))(params)
    assert abs(float(loss_tr) / T / ref - 1) < 2e-2  # FP8 head in training
    for k, g in grads.items():
        assert g.dtype == params[k].dtype and np.all(np.isfinite(np.asarray(g, np.float32))), k


def test_fp32_grads_match_fp64(fp32_case):
    params, inp, tgt = fp32_case
    g32 = jax.jit(jax.grad(lambda p: M.forward(p, CFG, inp, tgt, 2, policy="fp32")))(params)
    with jax.enable_x64(True):
        p64 = {k: jnp.asarray(np.asarray(v, np.float64)) for k, v in params.items()}
        g64 = jax.jit(jax.grad(lambda p: M.forward(p, CFG, jnp.asarray(inp), jnp.asarray(tgt), 2, policy="fp64")))(p64)
        g64 = {k: np.asarray(v) for k, v in g64.items()}
    for k in params:
        if np.linalg.norm(g64[k]) == 0:  # dead entries (record26 §11.16)
            assert np.all(np.asarray(g32[k]) == 0), k
        else:
            assert rel(g32[k], g64[k]) < 1e-4, k


def test_dense_backend_and_compile_count(fp32_case, fp32_eval):
    """The blockwise model (one compile for every window) equals the dense-mask model."""
    params, inp, tgt = fp32_case
    dense = jax.jit(lambda p, w: M.forward(p, CFG, inp, tgt, w, policy="fp32", train=False, backend="dense"))
    for W in (1, 3):
        np.testing.assert_allclose(fp32_eval(W)[0], dense(params, jnp.int32(W)), rtol=1e-5)


def test_trace_keys(fp32_eval):
    _, trace = fp32_eval(1)
    want = {"x0", "final_norm", "logits_raw", "logits"} | {f"block.{i}" for i in range(4)}
    want |= {f"mlp.{i}" for i in range(4)} | {f"attn.{i}" for i in (0, 1, 3)}
    assert set(trace) == want
    assert trace["block.0"].shape == (T, 64) and trace["logits"].shape == (T, 50304)


def test_block_piece_matches_forward(fp32_case, fp32_eval):
    """Block 1 called on its own (as a per-layer parity test does) reproduces the forward's."""
    params, inp, tgt = fp32_case
    _, tr = fp32_eval(1)
    docs = A.document_ids(jnp.asarray(inp))

    def one_block(p, x, x0):
        ve = p["value_embeds.1.weight"][inp]
        trace = {}
        out = M.block(p, CFG, 1, x, x0, ve, docs, 1, trace=trace)
        return out, trace["attn.1"]

    out, a = jax.jit(one_block)(params, tr["block.0"], tr["x0"])
    np.testing.assert_allclose(a, tr["attn.1"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, tr["block.1"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------


def test_record_param_names_shapes_count():
    cfg = ModelConfig()
    shapes = jax.eval_shape(lambda k: M.init_params(cfg, k, "record"), jax.random.key(0))
    assert M.num_params(shapes) == 275_742_784  # record26 §1, §3
    assert sum(M.num_params({k: v}) for k, v in shapes.items() if "embed" in k) == 154_533_888
    assert "blocks.7.attn.qkv_w" not in shapes and "blocks.7.mlp.c_fc.weight" in shapes
    assert sum(k.endswith("qkv_w") for k in shapes) == 11
    assert shapes["blocks.0.attn.qkv_w"].shape == (3, 768, 768)
    assert shapes["blocks.0.mlp.c_fc.weight"].shape == (3072, 768)
    assert shapes["blocks.0.mlp.c_proj.weight"].shape == (768, 3072)
    assert shapes["scalars"].shape == (64,)
    assert shapes["embed.weight"].dtype == jnp.bfloat16 and shapes["value_embeds.2.weight"].dtype == jnp.bfloat16
    assert shapes["lm_head.weight"].dtype == jnp.float32 and shapes["lm_head.weight"].shape == (50304, 768)
    assert set(shapes) == set(M.param_shapes(cfg))


def test_init_distributions():
    cfg = ModelConfig(num_layers=4, num_heads=2, model_dim=128, head_dim=64)
    p = M.init_params(cfg, jax.random.key(0), "record")
    e = np.asarray(p["embed.weight"], np.float32)
    assert abs(e.std() - 1) < 0.01 and abs(e.mean()) < 0.01
    a = math.sqrt(3) * 0.5 / math.sqrt(128)
    for name in ("blocks.1.attn.qkv_w", "blocks.1.mlp.c_fc.weight"):
        w = np.asarray(p[name])
        assert w.max() <= a and w.min() >= -a and abs(w.std() - 0.5 / math.sqrt(128)) < 0.01 * a
    for name in ("blocks.1.attn.c_proj.weight", "blocks.1.mlp.c_proj.weight", "lm_head.weight"):
        assert not np.any(np.asarray(p[name]))
    s = np.asarray(p["scalars"])
    np.testing.assert_array_equal(s, [1] * 4 + [1, 0] * 4 + [0.5, 0.5] * 4 + [1] * 4)
    assert all(v.dtype == jnp.float32 for v in M.init_params(cfg, jax.random.key(0), "fp32").values())


def test_remat_same_loss_and_grads(fp32_case):
    """Rematerialised blocks recompute the same numbers (only memory changes)."""
    params, inp, tgt = fp32_case
    f = lambda remat: jax.jit(jax.value_and_grad(
        lambda p: M.forward(p, CFG, inp, tgt, 2, policy="fp32", remat=remat)))(params)
    (l0, g0), (l1, g1) = f(False), f(True)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for k in g0:
        assert rel(g1[k], g0[k]) < 1e-5 if np.any(g0[k]) else not np.any(g1[k]), k
    with pytest.raises(ValueError, match="remat"):
        M.forward(params, CFG, inp, tgt, 2, remat=True, trace={})


def test_chunked_head_equals_whole_head():
    """forward(head_chunk=...) only reorders the loss and lm_head-gradient sums (rows are
    independent), so loss and every gradient agree to fp32 rounding."""
    cfg = ModelConfig(num_layers=2, num_heads=2, model_dim=64, head_dim=32, max_seq_len=1024)
    p = M.init_params(cfg, jax.random.PRNGKey(0), "fp32")
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    p["lm_head.weight"] = jax.random.normal(keys[0], p["lm_head.weight"].shape) * 1.5
    for i, k in zip(range(2), keys[1:]):
        for name in (f"blocks.{i}.mlp.c_proj.weight", f"blocks.{i}.attn.c_proj.weight"):
            p[name] = jax.random.normal(k, p[name].shape) * 0.05
    rng = np.random.default_rng(0)
    t = rng.integers(0, 50000, 1025)
    t[rng.choice(1024, 8, replace=False)] = 50256
    x, y = jnp.asarray(t[:-1]), jnp.asarray(t[1:])
    for train in (True, False):
        f = lambda p, c: M.forward(p, cfg, x, y, 2, policy="fp32", train=train, head_chunk=c)  # noqa: E731
        (a, ga), (b, gb) = jax.value_and_grad(f)(p, None), jax.value_and_grad(f)(p, 256)
        assert abs(float(a) - float(b)) <= 1e-6 * abs(float(a))
        for k in ga:
            n = float(jnp.linalg.norm(ga[k]))
            if n > 0:
                assert float(jnp.linalg.norm(ga[k] - gb[k])) <= 1e-5 * n, k


def _round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float64 -> the nearest bf16 value (8 significant bits), ties to even, in float64: one
    rounding (a float64 -> float32 -> bf16 cast rounds twice). Normal numbers only."""
    m, e = np.frexp(x)  # x = m * 2^e, 0.5 <= |m| < 1
    return np.ldexp(np.rint(m * 2.0 ** 8), e - 8)  # rint: half to even


def _embedding_case(dtype, seed=0):
    """A [64, 16] table, one token (5) repeated 4,096 times among 512 random ones, and a
    cotangent biased positive so that token 5's row sums to ~2,000 (bf16 ulp 16 there)."""
    rng = np.random.default_rng(seed)
    table = jnp.asarray(rng.standard_normal((64, 16)), dtype)
    ids = np.r_[np.full(4096, 5), rng.integers(0, 64, 512)]
    ids = jnp.asarray(rng.permutation(ids), jnp.int32)
    g = jnp.asarray(rng.standard_normal((ids.shape[0], 16)) + 0.5, dtype)
    return table, ids, g


def test_embedding_gradient_sums_in_fp32_and_rounds_once():
    """M.embedding, bf16 table (record26 §3): the gradient is the exact sum of the bf16
    cotangents per row, rounded to bf16 once, up to the fp32 sum's own error, as torch's
    embedding backward; autodiff of the gather (a bf16 scatter-add) fails the same check."""
    table, ids, g = _embedding_case(jnp.bfloat16)
    (got,) = jax.vjp(lambda t: M.embedding(t, ids), table)[1](g)
    assert got.dtype == jnp.bfloat16
    # independent: the exact sum in float64 (bf16 terms of 8 bits over a few dozen binades
    # add exactly in 53 bits), and the standard bound on any order's fp32 sum of n terms,
    # gamma_{n-1} sum|terms| with gamma_k = k u / (1 - k u), u = 2^-24, within which the fp32
    # sum may cross a bf16 rounding midpoint
    exact, terms = np.zeros((64, 16)), np.zeros((64, 16))
    np.add.at(exact, np.asarray(ids), np.asarray(g, np.float64))
    np.add.at(terms, np.asarray(ids), np.abs(np.asarray(g, np.float64)))
    n = np.bincount(np.asarray(ids), minlength=64)[:, None]
    ku = np.maximum(n - 1, 0) * 2.0 ** -24
    slack = ku / (1 - ku) * terms
    lo, hi = _round_to_bf16(exact - slack), _round_to_bf16(exact + slack)

    def within(grad):
        grad = np.asarray(grad, np.float64)
        return (lo <= grad) & (grad <= hi)

    assert within(got).all()
    # the bound has teeth: lo == hi, i.e. got is the exact sum rounded once, nearly everywhere
    assert (np.asarray(got, np.float64) == _round_to_bf16(exact)).mean() > 0.95
    # the bf16 scatter-add: row 5 (2,000 in ulps of 16, each term under an ulp) stalls
    (plain,) = jax.vjp(lambda t: t[ids], table)[1](g)
    assert not within(plain)[5].any()
    assert np.abs(np.asarray(plain, np.float64) - exact)[5].min() > 10 * 16
    # the forward is the plain gather, bit for bit
    np.testing.assert_array_equal(np.asarray(M.embedding(table, ids), np.float32),
                                  np.asarray(table[ids], np.float32))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_embedding_gradient_in_wide_tables_is_autodiffs(dtype):
    """fp32 and fp64 tables (those policies): the sum is in the table's own dtype, the same
    scatter-add autodiff does, so the gradients are equal bit for bit."""
    with jax.enable_x64(dtype == "float64"):
        table, ids, g = _embedding_case(jnp.dtype(dtype))
        (got,) = jax.vjp(lambda t: M.embedding(t, ids), table)[1](g)
        (plain,) = jax.vjp(lambda t: t[ids], table)[1](g)
        assert got.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(plain))
        np.testing.assert_array_equal(np.asarray(M.embedding(table, ids)), np.asarray(table[ids]))


def test_embedding_under_jit_vmap_and_shard_map():
    """The custom VJP where jgpt runs it: jitted, vmapped (batches of sequences) and inside
    shard_map (jgpt.step's data-parallel step), on a table cast to varying as the step does
    and on a replicated one, whose gradient then is summed over the mesh as autodiff's is."""
    from jax.sharding import PartitionSpec as P

    from jgpt import sharding as shd

    table, ids, g = _embedding_case(jnp.bfloat16)
    grad = lambda t, i, c: jax.vjp(lambda t: M.embedding(t, i), t)[1](c)[0]  # noqa: E731
    want = grad(table, ids, g)
    np.testing.assert_array_equal(np.asarray(jax.jit(grad)(table, ids, g), np.float32),
                                  np.asarray(want, np.float32))
    ids2, g2 = ids.reshape(4, -1), g.reshape(4, -1, 16)
    batched = jax.vmap(grad, in_axes=(None, 0, 0))(table, ids2, g2)
    for b in range(4):
        np.testing.assert_array_equal(np.asarray(batched[b], np.float32),
                                      np.asarray(grad(table, ids2[b], g2[b]), np.float32))
    mesh = shd.make_mesh(jax.devices()[:1])
    for cast in (True, False):
        def per_device(t, i, c, cast=cast):
            if cast:
                t = jax.lax.pcast(t, shd.AXIS, to="varying")
            return jax.lax.psum(grad(t, i, c), shd.AXIS) if cast else grad(t, i, c)

        fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(shd.AXIS), P(shd.AXIS)), out_specs=P()))
        np.testing.assert_array_equal(np.asarray(fn(table, ids, g), np.float32), np.asarray(want, np.float32))


def test_linear_unpinned_equals_pinned_and_rounds_once():
    """linear's pin flags (dropped only where GPU kernels read the product from memory) change no
    value: output and both gradients equal the pinned form's, and each equals the fp64 product
    rounded once to bf16."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((64, 96)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((80, 96)) * 0.1, jnp.float32)
    g = jnp.asarray(rng.standard_normal((64, 80)), jnp.bfloat16)

    def run(pin_out, pin_dx):
        out, vjp = jax.vjp(lambda a, b: M.linear(a, b, pin_out, pin_dx), x, w)
        return (out, *vjp(g))

    pinned = run(True, True)
    for flags in [(False, True), (True, False), (False, False)]:
        for a, b in zip(pinned, run(*flags)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    x64, w64, g64 = (np.asarray(t, np.float64) for t in (x, jnp.asarray(w, jnp.bfloat16), g))
    np.testing.assert_array_equal(np.asarray(pinned[0], np.float32),
                                  np.asarray(jnp.asarray(x64 @ w64.T, jnp.bfloat16), np.float32))
    np.testing.assert_array_equal(np.asarray(pinned[1], np.float32),
                                  np.asarray(jnp.asarray(g64 @ w64, jnp.bfloat16), np.float32))


def test_attention_reads_dout_from_memory_only_for_gpu_kernels():
    # off the GPU no backend's backward is a compiled kernel: the GEMM writing dO keeps its pin
    assert not A.reads_dout_from_memory("auto", 1024, jnp.bfloat16)
    assert not A.reads_dout_from_memory("blockwise", 1024, jnp.bfloat16)
    if jax.default_backend() == "gpu":
        assert A.reads_dout_from_memory("auto", 1024, jnp.bfloat16)
        assert not A.reads_dout_from_memory("auto", 1024, jnp.float32)
