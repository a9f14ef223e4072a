"""Where jgpt and ref round the QK-norm + rotary chain (record26 §5.5, §11.1): once, on the
rotation's output, as the compiled record's fused Triton kernel does (Inductor keeps a fused
bf16 intermediate in fp32); eager torch would also round the norm's output, which moves ~16%
of the outputs by a bf16 step. Both sides are checked against a float64 computation of the
chain rounded once (scripts/rounding_audit.py measures the compiled record itself)."""
import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jgpt import attention as attn
from jgpt import model

T, H, D = 256, 4, 128


def chain64(q, cos, sin, round_norm: bool):
    """bf16(rot(norm(q))) in float64, the norm's output rounded to bf16 first if round_norm."""
    x = np.asarray(q, np.float64)
    n = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 2.0 ** -23)
    if round_norm:
        n = n.astype(ml_dtypes.bfloat16).astype(np.float64)
    c, s = np.asarray(cos, np.float64)[:, None, :], np.asarray(sin, np.float64)[:, None, :]
    n1, n2 = n[..., :D // 2], n[..., D // 2:]
    y = np.concatenate([n1 * c + n2 * s, -n1 * s + n2 * c], axis=-1)
    return y.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(5)
    q = (rng.standard_normal((T, H, D)) * 2.0).astype(ml_dtypes.bfloat16)
    cos, sin = attn.rotary_tables(T, D, 1024.0, jnp.float32)
    once, twice = chain64(q, cos, sin, False), chain64(q, cos, sin, True)
    assert 0.05 < np.mean(once != twice) < 0.3  # the site matters (~16%)
    return q, cos, sin, once


def test_jgpt_norm_rotary_rounds_once(case):
    q, cos, sin, once = case
    got = np.asarray(model.norm_rotary(jnp.asarray(q), cos, sin).astype(jnp.float32))
    assert np.mean(got != once) < 1e-3  # fp32 arithmetic against float64: near-ties only


def test_ref_norm_rotary_rounds_once(case):
    torch = pytest.importorskip("torch")
    from ref import train_gpt as ref
    q, _, _, once = case
    rot = ref.Rotary(D, T)
    got = ref.norm_rotary(rot, torch.tensor(q.astype(np.float32)).bfloat16()[None])[0].float().numpy()
    assert np.mean(got != once) < 1e-3


def test_round_to_and_pinned_f32():
    """rounding.round_to is bf16's round to nearest even kept in fp32 (ties included), and the
    identity where the dtype is not narrower; pinned_f32 widens with x's own rounding pinned."""
    from jgpt.rounding import pinned_f32, round_to
    x = np.float32([1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 1.0 + 2.0 ** -9, -3.3e-3, 7.0e30])
    want = x.astype(ml_dtypes.bfloat16).astype(np.float32)  # ties to even: 1, 1 + 2^-6, 1
    np.testing.assert_array_equal(np.asarray(round_to(jnp.asarray(x), jnp.bfloat16)), want)
    np.testing.assert_array_equal(np.asarray(round_to(jnp.asarray(x), jnp.float32)), x)
    b = jnp.asarray(want, jnp.bfloat16)
    p = pinned_f32(b)
    assert p.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(p), want)
    assert "reduce_precision" in jax.jit(pinned_f32).lower(b).as_text()


def test_weight_and_embedding_gradients_pin_their_bf16_rounding():
    """The record's dW (a bf16 GEMM output, widened to the fp32 master weight) and its embedding
    gradient (bf16) reach the optimizer rounded; jgpt writes both roundings as reduce_precision,
    which XLA's excess-precision rewrites keep (jgpt.rounding). Values: the bf16 rounding of the
    fp32 product/sum; the lowered HLO holds the pins."""
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((48, 32)) * 0.1, jnp.float32)
    g = jnp.asarray(rng.standard_normal((64, 48)), jnp.bfloat16)
    dw_fn = jax.jit(lambda x, w, g: jax.vjp(lambda w: model.linear(x, w), w)[1](g)[0])
    dw = np.asarray(dw_fn(x, w, g))
    exact = np.asarray(g, np.float64).T @ np.asarray(x, np.float64)
    assert dw.dtype == np.float32
    near = exact.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
    assert np.mean(dw != near) < 1e-2 and np.all(dw == dw.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert "reduce_precision" in dw_fn.lower(x, w, g).as_text()

    table = jnp.asarray(rng.standard_normal((16, 32)), jnp.bfloat16)
    ids = jnp.asarray(rng.integers(0, 16, 64), jnp.int32)
    de_fn = jax.jit(lambda t, ids, g: jax.vjp(lambda t: model.embedding(t, ids), t)[1](g)[0])
    gy = jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16)
    de = np.asarray(de_fn(table, ids, gy).astype(jnp.float32))
    sums = np.zeros((16, 32))
    np.add.at(sums, np.asarray(ids), np.asarray(gy, np.float64))
    assert np.mean(de != sums.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)) < 1e-2
    assert "reduce_precision" in de_fn.lower(table, ids, gy).as_text()
