"""Where jgpt and ref round the QK-norm + rotary chain (record26 §5.5, §11.1): once, on the
rotation's output, as the compiled record's fused Triton kernel does (Inductor keeps a fused
bf16 intermediate in fp32); eager torch would also round the norm's output, which moves ~16%
of the outputs by a bf16 step. Both sides are checked against a float64 computation of the
chain rounded once (scripts/rounding_audit.py measures the compiled record itself)."""
import ml_dtypes
import numpy as np
import pytest

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
