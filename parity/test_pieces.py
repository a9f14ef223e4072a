"""Parity of the model's pieces, each called on both sides with the same inputs: rotary, QK-norm,
one attention layer (windows 0..14, several documents, both jgpt backends), the MLP and whole
blocks, forward and backward (vjp with the same random cotangent), in fp64 (tier 0, relative
1e-10) and fp32 (tier 1: 1e-5 on outputs, 1e-4 on gradients). Errors here point at one piece;
test_forward/test_backward then check that the pieces are assembled the same way.
"""
import numpy as np
import pytest

from parity.conftest import (CFG, FIXED_TOKENS, T, TIER0_REL, TIER1_ACT_REL, TIER1_GRAD_REL, f64,
                             jgpt_numpy_params, record_max, ref_model, ref_rope_freqs, rel, torch,
                             x64_scope)

import jax
import jax.numpy as jnp

from jgpt import attention as A
from jgpt import model as M
from ref import train_gpt as ref

TORCH_DTYPE = {"fp64": torch.float64, "fp32": torch.float32}
JAX_DTYPE = {"fp64": "float64", "fp32": "float32"}
BOUNDS = {"fp64": (TIER0_REL, TIER0_REL), "fp32": (TIER1_ACT_REL, TIER1_GRAD_REL)}
D = CFG.hdim_head


def check(precision, what, got, want, grad=False):
    """Assert one piece quantity within its tier's bound and remember the measurement."""
    bound = BOUNDS[precision][1 if grad else 0]
    err = rel(got, want)
    record_max(f"tier {0 if precision == 'fp64' else 1} pieces {'grads' if grad else 'outputs'}", err)
    assert err <= bound, f"{precision} {what}: relative L2 {err:.3e} > {bound:g}"


def rand(shape, seed, scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape) * scale


def normed(a):
    return a / np.sqrt(np.mean(a * a, axis=-1, keepdims=True))


def jparams(precision, names):
    return {k: jnp.asarray(jgpt_numpy_params(precision)[k]) for k in names}


def jvjp(f, primals, g):
    """(f(*primals), vjp(g)) in one jit (one compile instead of one per primitive and shape)."""
    def run(primals, g):
        y, vjp = jax.vjp(f, *primals)
        return y, vjp(g)
    return jax.jit(run)(primals, g)


def leaf(a, precision):
    return torch.tensor(np.asarray(a), dtype=TORCH_DTYPE[precision], requires_grad=True)


@pytest.fixture(autouse=True)
def _clean_ref_grads():
    yield
    for precision in ("fp64", "fp32"):
        ref_model(precision).zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------
# rotary (record26 §5.5, §11.3)


def test_ref_rope_freqs_rebuild_the_reference_tables():
    """The frequencies the harness hands jgpt are the reference's: cos/sin of t * freqs equal
    ref's buffers bit for bit (so the expression in ref_rope_freqs is ref's)."""
    for precision, dtype in (("fp64", torch.float64), ("fp32", torch.float32)):
        rot = ref_model(precision).blocks[0].attn.rotary
        freqs = torch.from_numpy(ref_rope_freqs(D, dtype))
        theta = torch.outer(torch.arange(CFG.max_seq_len, dtype=dtype), freqs)
        assert torch.equal(theta.cos(), rot.cos) and torch.equal(theta.sin(), rot.sin)


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
def test_rotary_tables_and_frequencies(precision):
    """jgpt's own frequencies equal ref's (fp32: bit for bit; fp64: within an ulp), and its
    cos/sin tables (XLA's cos/sin) agree with ref's (torch's) within one ulp of 1 (measured:
    half of that, in 2.5% of the fp32 entries)."""
    dtype = TORCH_DTYPE[precision]
    want = ref_rope_freqs(D, dtype)
    got = A.rotary_frequencies(D, CFG.rope_base, np.dtype(JAX_DTYPE[precision]))
    ulp = np.finfo(want.dtype).eps
    assert np.all(np.abs(got - want) <= ulp * np.abs(want)), (got, want)
    if precision == "fp32":
        np.testing.assert_array_equal(got, want)
    rot = ref_model(precision).blocks[0].attn.rotary
    with x64_scope(precision):
        cos, sin = A.rotary_tables(CFG.max_seq_len, D, CFG.rope_base, jnp.dtype(JAX_DTYPE[precision]), want)
        # |table| <= 1: an absolute difference below eps (one ulp of 1) is implementation noise
        for mine, theirs in ((cos, rot.cos), (sin, rot.sin)):
            diff = np.max(np.abs(f64(mine) - f64(theirs)))
            assert diff <= ulp, f"{precision} rotary table differs by {diff / ulp:.2f} eps"


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
def test_rotary(precision):
    x = rand((1, T, CFG.num_heads, D), 1)
    rot = ref_model(precision).blocks[0].attn.rotary
    xt = leaf(x, precision)
    want = rot(xt)
    g = rand(want.shape, 2)
    want.backward(torch.as_tensor(g, dtype=xt.dtype))
    with x64_scope(precision):
        tables = A.rotary_tables(T, D, CFG.rope_base, jnp.dtype(JAX_DTYPE[precision]),
                                 ref_rope_freqs(D, TORCH_DTYPE[precision]))
        got, (gx,) = jvjp(lambda a: A.apply_rotary(a, *tables), (jnp.asarray(x[0], JAX_DTYPE[precision]),),
                          jnp.asarray(g[0], JAX_DTYPE[precision]))
        check(precision, "rotary", got, want[0])
        check(precision, "rotary dx", gx, xt.grad[0], grad=True)


# ------------------------------------------------------------------------------------------------
# QK-norm: rms over head_dim, eps 2^-23, no weight (record26 §5.5, §11.2)


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
def test_qk_norm(precision):
    x = rand((T, 2 * CFG.num_heads, D), 3, scale=4.0)
    x[5, 0] = 0.0  # an all-zero head: the eps alone keeps it finite, on both sides
    xt = leaf(x, precision)
    want = ref.norm(xt)
    g = rand(x.shape, 4)
    want.backward(torch.as_tensor(g, dtype=xt.dtype))
    with x64_scope(precision):
        got, (gx,) = jvjp(M.rms_norm, (jnp.asarray(x, JAX_DTYPE[precision]),), jnp.asarray(g, JAX_DTYPE[precision]))
        check(precision, "qk-norm", got, want)
        check(precision, "qk-norm dx", gx, xt.grad, grad=True)


# ------------------------------------------------------------------------------------------------
# one attention layer (record26 §5.5-§5.6)

ATTN_LAYER = 1  # a short-window layer with a value embedding (the pieces take its own window)
ATTN_NAMES = [f"blocks.{ATTN_LAYER}.attn.qkv_w", f"blocks.{ATTN_LAYER}.attn.c_proj.weight", "scalars"]
SA = slice(3 * CFG.num_layers + 2 * ATTN_LAYER, 3 * CFG.num_layers + 2 * ATTN_LAYER + 2)  # its (lambda_v, lambda_ve)


def ref_attention(precision, x, ve, window, g):
    model = ref_model(precision)
    attn = model.blocks[ATTN_LAYER].attn
    xt, vet = leaf(x, precision), None if ve is None else leaf(ve, precision)
    lam = leaf(model.scalars.detach().numpy()[SA], precision)
    docs = ref.document_ids(torch.as_tensor(FIXED_TOKENS[0]).long())
    y = attn(xt[None], None if vet is None else vet[None], lam, ("dense", docs, window))[0]
    y.backward(torch.as_tensor(g, dtype=y.dtype))
    grads = {"x": xt.grad, "qkv_w": attn.qkv_w.grad, "c_proj": attn.c_proj.weight.grad, "lambdas": lam.grad}
    if vet is not None:
        grads["ve"] = vet.grad
    return y, grads


def jgpt_attention(precision, x, ve, window, g, backend, traced):
    names = ATTN_NAMES
    dt = JAX_DTYPE[precision]
    with x64_scope(precision):
        params = jparams(precision, names)
        docs = A.document_ids(jnp.asarray(FIXED_TOKENS[0]))
        rope = A.rotary_tables(T, D, CFG.rope_base, jnp.dtype(dt), ref_rope_freqs(D, TORCH_DTYPE[precision]))
        w = jnp.asarray(window, jnp.int32) if traced else window  # traced: bounded by max_window_blocks

        def f(p, x, ve):
            return M.attention_layer(p, CFG, ATTN_LAYER, x, ve, docs, w, rope=rope, backend=backend,
                                     max_window_blocks=14 if traced else None)
        args = (params, jnp.asarray(x, dt), None if ve is None else jnp.asarray(ve, dt))
        y, (gp, gx, gve) = jvjp(f, args, jnp.asarray(g, dt))
        grads = {"x": gx, "qkv_w": gp[names[0]], "c_proj": gp[names[1]], "lambdas": gp["scalars"][SA]}
        if ve is not None:
            grads["ve"] = gve
        return f64(y), {k: f64(v) for k, v in grads.items()}


# fp64 at every window (logic), fp32 at the real window 2 (numerics); both backends with a
# static window (blockwise then gathers exactly the window's blocks), and once a traced window
# bounded by max_window_blocks (one compilation for every window, the other gather size)
ATTN_CASES = ([(p, w, b, False) for p, w in [("fp64", 0), ("fp64", 1), ("fp64", 2), ("fp64", 14), ("fp32", 2)]
               for b in ("dense", "blockwise")] + [("fp64", 2, "blockwise", True)])


@pytest.mark.parametrize("precision,window,backend,traced", ATTN_CASES)
def test_attention_layer(precision, window, backend, traced):
    """CausalSelfAttention.forward vs jgpt.model.attention_layer on the same normed input, with a
    value embedding (and once without): output and every gradient. FIXED_TOKENS has
    6 documents, one of a single token, one across all 3 blocks (window 2 cuts it). Window 0
    is the short layers' W // 2 while W = 1 (record26 §11.6); 14 saturates at 3 blocks."""
    x = normed(rand((T, CFG.model_dim), 10 + window))
    ve = rand((T, CFG.model_dim), 20 + window)
    g = rand((T, CFG.model_dim), 30 + window)
    for v in ((ve, None) if (precision, window, backend) == ("fp64", 2, "dense") else (ve,)):
        want, want_g = ref_attention(precision, x, v, window, g)
        ref_model(precision).zero_grad(set_to_none=True)
        got, got_g = jgpt_attention(precision, x, v, window, g, backend, traced)
        tag = f"attention w={window} {backend}{' traced' if traced else ''} ve={v is not None}"
        check(precision, tag, got, want)
        for k in want_g:
            check(precision, f"{tag} d{k}", got_g[k], want_g[k], grad=True)


def test_attention_window_matters():
    """Guard against a vacuous test: the windows above give different outputs (else the mask
    could be ignored on both sides and still agree)."""
    x = normed(rand((T, CFG.model_dim), 5))
    outs = [ref_attention("fp32", x, None, w, np.zeros((T, CFG.model_dim)))[0] for w in (0, 1, 2, 3)]
    assert rel(outs[0], outs[1]) == 0  # window 0 is window 1 (record26 §11.6)
    assert rel(outs[1], outs[2]) > 1e-2 and rel(outs[2], outs[3]) > 1e-2


# ------------------------------------------------------------------------------------------------
# MLP and blocks (record26 §5.4)


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
def test_mlp(precision):
    i = 2
    x = normed(rand((T, CFG.model_dim), 40))
    g = rand((T, CFG.model_dim), 41)
    mlp = ref_model(precision).blocks[i].mlp
    xt = leaf(x, precision)
    want = mlp(xt)
    want.backward(torch.as_tensor(g, dtype=xt.dtype))
    names = [f"blocks.{i}.mlp.c_fc.weight", f"blocks.{i}.mlp.c_proj.weight"]
    with x64_scope(precision):
        dt = JAX_DTYPE[precision]
        got, (gp, gx) = jvjp(lambda p, x: M.mlp(p, i, x), (jparams(precision, names), jnp.asarray(x, dt)),
                             jnp.asarray(g, dt))
        check(precision, "mlp", got, want)
        check(precision, "mlp dx", gx, xt.grad, grad=True)
        check(precision, "mlp dc_fc", gp[names[0]], mlp.c_fc.weight.grad, grad=True)
        check(precision, "mlp dc_proj", gp[names[1]], mlp.c_proj.weight.grad, grad=True)


@pytest.mark.parametrize("precision,window", [("fp64", 2), ("fp32", 2)])
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_block(precision, layer, window):
    """Block_i(x, ve, x0): lambda mixing, attention (not in layer 2), MLP, with the layer's own
    window (long layer 3 sees W = 2, short layer 1 sees W // 2 = 1); output and all gradients."""
    L = CFG.num_layers
    x, x0 = rand((T, CFG.model_dim), 50), normed(rand((T, CFG.model_dim), 51))
    ve = rand((T, CFG.model_dim), 52)
    g = rand((T, CFG.model_dim), 53)
    model = ref_model(precision)
    blk = model.blocks[layer]
    lam_idx = slice(L + 2 * layer, L + 2 * layer + 2)
    sa_idx = slice(3 * L + 2 * layer, 3 * L + 2 * layer + 2)
    s = model.scalars.detach().numpy()
    xt, x0t, vet = leaf(x, precision), leaf(x0, precision), leaf(ve, precision)
    lam, sa = leaf(s[lam_idx], precision), leaf(s[sa_idx], precision)
    docs = ref.document_ids(torch.as_tensor(FIXED_TOKENS[0]).long())
    w = window if layer in CFG.long else window // 2
    want = blk(xt[None], vet[None], x0t[None], lam, sa, ("dense", docs, w))[0]
    want.backward(torch.as_tensor(g, dtype=want.dtype))
    names = [n for n in jgpt_numpy_params(precision) if n.startswith(f"blocks.{layer}.")] + ["scalars"]
    with x64_scope(precision):
        dt = JAX_DTYPE[precision]
        rope = A.rotary_tables(T, D, CFG.rope_base, jnp.dtype(dt), ref_rope_freqs(D, TORCH_DTYPE[precision]))
        jdocs = A.document_ids(jnp.asarray(FIXED_TOKENS[0]))

        def f(p, x, x0, ve):
            return M.block(p, CFG, layer, x, x0, ve, jdocs, window, rope=rope, backend="blockwise")
        primals = (jparams(precision, names), *(jnp.asarray(a, dt) for a in (x, x0, ve)))
        got, (gp, gx, gx0, gve) = jvjp(f, primals, jnp.asarray(g, dt))
        tag = f"block {layer} W={window}"
        check(precision, tag, got, want)
        pairs = [("dx", gx, xt.grad), ("dx0", gx0, x0t.grad),
                 ("dlambdas", gp["scalars"][lam_idx], lam.grad)]
        for n in names[:-1]:
            pairs.append((f"d{n}", gp[n], dict(model.named_parameters())[n].grad))
        if layer not in CFG.attn_free:
            pairs += [("dve", gve, vet.grad), ("dsa_lambdas", gp["scalars"][sa_idx], sa.grad)]
        else:
            assert vet.grad is None and not np.any(f64(gve)), "an attention-free block must ignore ve"
        for name, a, b in pairs:
            check(precision, f"{tag} {name}", a, b, grad=True)
