"""scripts/rounding_audit.py's sites, without torch.compile (which the GPU run adds): at every
site the two reference computations differ (so the table can tell what an implementation does),
eager torch matches the rounded one, and jgpt's jitted output matches one of the two."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jgpt import model  # noqa: E402
from scripts import rounding_audit as ra  # noqa: E402


@pytest.fixture(scope="module")
def table():
    return ra.sites(256, 768, 6, seed=3)


def test_sites_tell_rounded_from_fp32_and_classify_both_frameworks(table):
    assert len(table) == 12
    for name, _, inputs, t_fn, j_fn, ref_fn in table:
        as_ref = [t.float() if t.is_floating_point() else t for t in inputs]
        rounded, kept = (ref_fn(*as_ref, r).numpy() for r in (True, False))
        assert np.mean(rounded != kept) > 1e-2, name
        eager = ra.first(t_fn(*inputs)).detach().float().numpy().reshape(rounded.shape)
        # eager torch rounds everywhere (its CPU embedding backward adds in another order: 0.5%
        # of the rows' sums land on the other side of a rounding)
        assert np.mean(eager != rounded) < 1e-2, name
        to_jax = [jnp.asarray(t.float().numpy(), jnp.bfloat16) if t.dtype == torch.bfloat16 else jnp.asarray(t.numpy())
                  for t in inputs]
        out = np.asarray(ra.first(jax.jit(lambda *xs: j_fn(model, *xs))(*to_jax)).astype(jnp.float32))
        out = out.reshape(rounded.shape)
        assert min(np.mean(out != rounded), np.mean(out != kept)) < 1e-3, name  # fp32 order: near-ties only
