"""The parity harness: one tiny model, the same weights and tokens on both sides (design.md
"Parity tiers").

Weights. The reference GPT is built once in fp32 from a fixed torch seed, then every weight that
the record initialises to zero is perturbed (design.md: "always perturb"; record26 §11.15):
lm_head ~ N(0, 1.5) so the logits matter through the softcap's 7.5*sqrt(d) divisor, every
c_proj ~ N(0, 0.05), and the scalars get U(-0.3, 0.3) added (lambda_x0 starts at 0, so without
this the x0 path would carry nothing). That fp32 state dict is then loaded into a reference model
of each precision (load_state_dict casts: bf16 embeddings for "record", float64 for "fp64"), and
jgpt gets that model's own state dict through `jgpt.checkpoint.torch_state_dict_to_params`, so
every comparison also runs the conversion.

Rotary. jgpt receives the reference's rotary frequencies (`ref_rope_freqs`, the expression of
ref's Rotary, checked bit for bit against its cos/sin buffers in test_pieces). jgpt's own
frequencies are equal today in fp32 and fp64 (test_pieces checks that too), but they are the one
input where two correct implementations can legitimately disagree by ulps (record26 §11.3:
torch's linspace and pow against jgpt's numpy re-derivation), and passing ref's keeps a future
change there from showing up as a model bug. The cos/sin tables are still computed by each side
(torch vs XLA): measured, they differ by one ulp below 1 in 413 of the 16,384 fp32 entries
(12 in fp64), i.e. ~6e-8 relative at most, far below the tier-1 bound.

Runs. `ref_run` / `jgpt_run` return a `Run` (loss, activations without the batch axis,
gradients) as numpy arrays of their own precision. `tier_metrics` compares one reference run
against jgpt's dense and blockwise backends and caches only the numbers, so the forward and
backward test files share one run per (precision, window) and no gradients stay alive between
tests.

fp64 needs `jax_enable_x64`, which is global state: jgpt_run enables it with the
`jax.enable_x64(True)` context manager around its whole computation (parameters created inside,
results converted to numpy before leaving), so no fp64 array or setting leaks into other tests.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jgpt import checkpoint as ckpt  # noqa: E402
from jgpt import model as M  # noqa: E402
from jgpt.config import BOS_ID, ModelConfig  # noqa: E402
from ref import train_gpt as ref  # noqa: E402

# Four layers, layer 2 without attention (the record's layer 7 analogue, and a U-net layer that
# receives a skip), long layers {0, 3} by the config rule, value embeddings on 0, 1 and 2, 3.
MODEL = dict(vocab_size=50257, num_layers=4, num_heads=2, model_dim=64, head_dim=32,
             max_seq_len=1024, no_attn_layers=(2,))
CFG = ModelConfig(**MODEL)

T = 384  # 3 attention blocks
# W = 1: long layers 1 block, short layers W // 2 = 0 (the diagonal block, record26 §11.6);
# W = 2: long layers 2 of 3 blocks (a real window), short 1; W = 14: the record's maximum,
# which saturates (every block) at 3 blocks, short layers 7 blocks.
WINDOWS = (1, 2, 14)
# Documents [0, 20), [20] (one token), [21, 60), [60, 330) (across all 3 blocks, so W = 2 cuts
# it), [330, 383), [383] (the last input token). Hypothesis draws others (block edges included).
FIXED_BOS = (0, 20, 21, 60, 330, 383)
BACKENDS = ("dense", "blockwise")

FORWARD_KEYS = (["x0"] + [f"{kind}.{i}" for i in range(CFG.num_layers) for kind in ("attn", "mlp", "block")
                          if not (kind == "attn" and i in CFG.attn_free)]
                + ["final_norm", "logits_raw", "logits"])

# design.md "Parity tiers" (never loosen these: find the cause)
TIER0_REL = 1e-10
TIER1_ACT_REL, TIER1_LOSS_REL, TIER1_GRAD_REL = 1e-5, 1e-5, 1e-4
TIER4_LOGITS_ROW_REL = 1e-2

# largest difference seen per tier and quantity, printed at the end of the run (parity report)
MEASURED: dict[str, float] = {}


def record_max(tier: str, value: float) -> float:
    MEASURED[tier] = max(MEASURED.get(tier, 0.0), float(value))
    return value


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.write_sep("-", "parity: largest relative difference measured")
        for tier in sorted(MEASURED):
            terminalreporter.write_line(f"{tier:44s} {MEASURED[tier]:.3e}")


# ------------------------------------------------------------------------------------------------
# numbers


def f64(a) -> np.ndarray:
    """Any torch tensor or jax/numpy array (bf16 included) as a float64 numpy array."""
    if isinstance(a, torch.Tensor):
        return a.detach().to(torch.float64).cpu().numpy()
    return np.asarray(a).astype(np.float64)


def host(a) -> np.ndarray:
    """A torch tensor or jax array as numpy in its own precision (bf16 widened to float32, which
    is exact), without the float64 copy: runs keep ~20 MB logits and embedding gradients."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        return (a.float() if a.dtype == torch.bfloat16 else a).numpy()
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype.itemsize < 4 else a


def _norm(x: np.ndarray) -> float:
    return float(np.sqrt(np.sum(np.square(x.ravel(), dtype=np.float64))))


def rel(a, b) -> float:
    """norm(a - b) / norm(b) (design.md tier tolerance), 0 when both are exactly zero.

    The difference is taken in the wider of the two dtypes (float32 pairs stay float32: the
    difference of two close floats is exact, else off by 6e-8 of itself), the squares summed
    in float64 (pairwise), so the result is good to ~1e-7 relative, far inside tier 1's 1e-5."""
    a, b = host(a), host(b)
    dt = np.promote_types(a.dtype, b.dtype)
    a, b = a.astype(dt, copy=False), b.astype(dt, copy=False)
    den, num = _norm(b), _norm(a - b)
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return num / den


def row_rel(a, b) -> np.ndarray:
    """Per-row relative L2 over the last axis (tier 4's logits measure), in float64."""
    a, b = f64(a), f64(b)
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


# ------------------------------------------------------------------------------------------------
# tokens


def make_tokens(length: int, seed: int = 0, bos=None, n_bos: int = 5, first_bos: bool = True):
    """(input_seq, target_seq) int32 [length]: random GPT-2 ids with BOS (50256) at `bos`, or at
    n_bos random positions, and at position 0 when first_bos (training sequences are BOS-aligned,
    validation slices are not)."""
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, BOS_ID, length + 1)
    if bos is None:
        bos = rng.choice(np.arange(1, length + 1), size=n_bos, replace=False)
    tok[np.asarray(list(bos), dtype=np.int64)] = BOS_ID
    if first_bos:
        tok[0] = BOS_ID
    return tok[:-1].astype(np.int32), tok[1:].astype(np.int32)


FIXED_TOKENS = make_tokens(T, seed=0, bos=FIXED_BOS)


# ------------------------------------------------------------------------------------------------
# weights


def build_ref(precision: str, cfg: ModelConfig = CFG, attention: str = "dense") -> ref.GPT:
    return ref.GPT(cfg.vocab_size, cfg.num_layers, cfg.num_heads, cfg.model_dim, cfg.max_seq_len,
                   head_dim=cfg.head_dim, no_attn_layers=cfg.no_attn_layers, long_layers=cfg.long_layers,
                   precision=precision, attention=attention)


def perturb_(model: ref.GPT, seed: int = 26, scalars: bool = True) -> None:
    """Move the zero-initialised weights (record26 §11.15): lm_head N(0, 1.5), each c_proj
    N(0, 0.05), and (scalars=True) U(-0.3, 0.3) added to the scalars. In place, fp32."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.5, generator=g)
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.normal_(0.0, 0.05, generator=g)
        if scalars:
            model.scalars.add_(torch.empty_like(model.scalars).uniform_(-0.3, 0.3, generator=g))


@functools.cache
def fp32_state() -> dict:
    """The perturbed fp32 state dict every model of the suite is loaded from (built once)."""
    with torch.random.fork_rng(devices=[]):  # the suite's own init, without touching global RNG
        torch.manual_seed(2025)
        model = build_ref("fp32")
    perturb_(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@functools.cache
def ref_model(precision: str) -> ref.GPT:
    """A reference model of `precision` holding fp32_state (cast by load_state_dict)."""
    with torch.random.fork_rng(devices=[]):
        model = build_ref(precision)
    model.load_state_dict(fp32_state())
    return model


@functools.cache
def jgpt_numpy_params(precision: str) -> dict:
    """ref_model(precision)'s state dict converted by jgpt.checkpoint (dtypes and bits kept)."""
    return ckpt.torch_state_dict_to_params(ref_model(precision).state_dict())


def ref_rope_freqs(head_dim: int, dtype=torch.float32) -> np.ndarray:
    """The reference's rotary frequencies, by the expression of ref's Rotary (record26 §5.5)."""
    n = head_dim // 4
    freq = (1 / 1024) ** torch.linspace(0, 1, steps=n, dtype=dtype)
    return torch.cat([freq, freq.new_zeros(n)]).numpy()


def x64_scope(policy: str):
    """jax_enable_x64 for the fp64 policy only, restored on exit (it is process-global)."""
    return jax.enable_x64(True) if policy == "fp64" else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------
# runs


@dataclass
class Run:
    loss: float
    acts: dict  # name -> numpy [T, ...] (no batch axis), float32/float64 (bf16 widened)
    grads: dict | None  # parameter name -> numpy


def ref_run(precision: str, inp, tgt, window: int, *, train: bool = True, grads: bool = True,
            model: ref.GPT | None = None) -> Run:
    """The reference (ref_model(precision), or `model`) on one sequence: loss, trace, gradients."""
    model = ref_model(precision) if model is None else model
    model.train(train)
    model.zero_grad(set_to_none=True)
    trace: dict = {}
    with torch.set_grad_enabled(grads):
        loss = model(torch.as_tensor(inp), torch.as_tensor(tgt), window, trace=trace)
        if grads:
            loss.backward()
    acts = {k: host(v)[0] for k, v in trace.items()}  # ref keeps a batch axis of 1
    g = {n: host(p.grad) for n, p in model.named_parameters()} if grads else None
    model.zero_grad(set_to_none=True)
    return Run(loss.item(), acts, g)


@functools.cache
def _jgpt_fn(policy: str, backend: str, train: bool, grads: bool):
    """One jitted function per (policy, backend, mode): the window is a traced int32, so every
    window of a sequence length shares one compilation (the dense and blockwise backends both
    take a traced window; blockwise then gathers every block and masks by the rule)."""
    def f(params, inp, tgt, window, freqs):
        return M.forward_with_trace(params, CFG, inp, tgt, window, policy=policy, train=train,
                                    backend=backend, rope_freqs=freqs)
    return jax.jit(jax.value_and_grad(f, has_aux=True) if grads else f)


def jgpt_run(policy: str, backend: str, inp, tgt, window: int, *, train: bool = True,
             grads: bool = True, params: dict | None = None) -> Run:
    """jgpt on the converted reference weights of `policy` (or `params`, numpy)."""
    src = jgpt_numpy_params(policy) if params is None else params
    freq_dtype = torch.float64 if policy == "fp64" else torch.float32
    with x64_scope(policy):
        p = {k: jnp.asarray(v) for k, v in src.items()}
        args = (p, jnp.asarray(inp), jnp.asarray(tgt), jnp.asarray(window, jnp.int32),
                jnp.asarray(ref_rope_freqs(CFG.hdim_head, freq_dtype)))
        out = _jgpt_fn(policy, backend, train, grads)(*args)
        (loss, trace), g = out if grads else (out, None)
        return Run(float(loss), {k: host(v) for k, v in trace.items()},
                   None if g is None else {k: host(v) for k, v in g.items()})


def structural_zeros(name: str, g: np.ndarray) -> np.ndarray:
    """Where a gradient is zero by construction (record26 §11.16): dead scalars (entries), and
    embedding rows that no token looks up (rows). Elsewhere an exact zero is a cancellation that
    may come out as +-1e-11 in another summation order, so it is not compared."""
    if name == "scalars":
        return g == 0
    if name == "embed.weight" or name.startswith("value_embeds."):
        return ~np.any(g != 0, axis=-1)
    return np.zeros(0, bool)


def compare(r: Run, j: Run) -> dict:
    """Relative differences of jgpt (j) against ref (r): loss, each activation, each gradient
    ("grad:<name>"), and "zeros:<name>" = 0 when the structurally zero gradient entries
    coincide, else 1."""
    out = {"loss": abs(j.loss - r.loss) / abs(r.loss), "ref_loss": r.loss, "tokens": len(r.acts["x0"])}
    out.update({k: rel(j.acts[k], r.acts[k]) for k in r.acts})
    for k, g in (r.grads or {}).items():
        out[f"grad:{k}"] = rel(j.grads[k], g)
        out[f"zeros:{k}"] = float(not np.array_equal(structural_zeros(k, j.grads[k]), structural_zeros(k, g)))
    return out


@functools.cache
def tier_metrics(precision: str, window: int) -> dict:
    """{backend: compare(ref, jgpt)} on FIXED_TOKENS, ref with dense attention (tier 1)."""
    r = ref_run(precision, *FIXED_TOKENS, window)
    return {b: compare(r, jgpt_run(precision, b, *FIXED_TOKENS, window)) for b in BACKENDS}

