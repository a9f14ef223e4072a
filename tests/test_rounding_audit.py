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


def _outputs(site):
    """(rounded, fp32) reference outputs and jgpt's jitted output of a site, as float arrays."""
    _, _, inputs, _, j_fn, ref_fn = site
    as_ref = [t.float() if t.is_floating_point() else t for t in inputs]
    rounded, kept = (ref_fn(*as_ref, r).numpy() for r in (True, False))
    to_jax = [jnp.asarray(t.float().numpy(), jnp.bfloat16) if t.dtype == torch.bfloat16 else jnp.asarray(t.numpy())
              for t in inputs]
    out = np.asarray(ra.first(jax.jit(lambda *xs: j_fn(model, *xs))(*to_jax)).astype(jnp.float32))
    return rounded, kept, out.reshape(rounded.shape)


def test_sites_tell_rounded_from_fp32_and_classify_both_frameworks(table):
    assert len(table) == 12
    for site in table:
        name, _, inputs, t_fn = site[:4]
        rounded, kept, out = _outputs(site)
        assert np.mean(rounded != kept) > 1e-2, name
        eager = ra.first(t_fn(*inputs)).detach().float().numpy().reshape(rounded.shape)
        # eager torch rounds everywhere (its CPU embedding backward adds in another order: 0.5%
        # of the rows' sums land on the other side of a rounding)
        assert np.mean(eager != rounded) < 1e-2, name
        assert min(np.mean(out != rounded), np.mean(out != kept)) < 1e-3, name  # fp32 order: near-ties only


def _jgpt_rounds(site) -> tuple[float, float]:
    """(share off the rounded computation, share off the fp32 one) of jgpt's output at a site."""
    rounded, kept, out = _outputs(site)
    return float(np.mean(out != rounded)), float(np.mean(out != kept))


def _gemm_sites(table):
    sites = [s for s in table if "GEMM" in s[1] and "dW" not in s[1]]
    assert len(sites) == 3
    return sites


def test_gemm_products_reach_their_consumers_rounded(table):
    """The record's GEMMs write bf16 and the next kernel reads that; with model.GEMM_OUT's
    default ("auto") jgpt's fp32 consumers (the residual sums, relu^2) read the rounded product
    on this backend too. The fp32 share is ~0.2: a rounded-product mismatch would show as ~0.2
    off the rounded computation, accumulation order alone as ~1e-4."""
    assert model.GEMM_OUT == "auto"
    for site in _gemm_sites(table):
        off_rounded, off_kept = _jgpt_rounds(site)
        assert off_rounded < 1e-3 and off_kept > 0.1, (site[0], off_rounded, off_kept)


def test_gemm_products_round_on_gpu():
    """On a GPU "auto" is the narrow dot (at the record's size a cuBLASLt GEMM writing bf16, as
    the record's; BENCHMARKS.md session 8). Where XLA fuses a GEMM with its fp32 consumer instead
    (a Triton GEMM fusion: on an H100 this site's [1024, 3072] x [3072, 768] product, before the
    pin in model._matmul, reached the block sum unrounded), the pinned rounding still holds."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    assert model.gemm_out() == "narrow"
    for site in _gemm_sites(ra.sites(1024, 768, 6, seed=3)):
        off_rounded, off_kept = _jgpt_rounds(site)
        assert off_rounded < 2e-3 and off_kept > 0.1, (site[0], off_rounded, off_kept)
