"""Where do the compiled record and jgpt round to bf16? One table, site by site.

    python scripts/rounding_audit.py              # torch eager, torch compiled, jgpt on jax's default backend

Why: the record keeps its activations in bf16 (record26 §11.1), but its compiled form and jgpt
under XLA both drop some of those roundings. Inductor's Triton code keeps a bf16 intermediate of
a fused kernel in fp32 (`to_dtype` casts to the compute type unless `emulate_precision_casts`),
so it rounds once per stored tensor; XLA on GPUs deletes fp32 -> bf16 -> fp32 convert pairs
(`xla_allow_excess_precision`, jgpt.muon's docstring), on the CPU some of them. Eager torch
rounds everywhere. A port matches the compiled record only where both round, or both keep
fp32, at the same places; each mismatch is ulp-level noise that the tier-4 calibration (ref
eager against ref compiled) need not contain.

Each site is a chain of the record's step with one bf16 rounding in question (the intermediate
named in the table). Every implementation's output is compared bit for bit with two float32
computations from the same inputs: the intermediate rounded to bf16 ("rounded") and kept in
fp32 ("fp32"). An implementation does what the smaller share says; float32 summation order
alone moves a few outputs (for the GEMM and the embedding gradient sites, where the output is
fp32, every output moves unless it was rounded: there "fp32" shows as both shares large).
Small functions fuse as the model's graph does only roughly, so a GPU run of this script is
evidence for the model, not proof; the 200-step parity run is the judge.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EPS = 2.0 ** -23


def sites(T: int, d: int, heads: int, seed: int, device: str = "cpu"):
    """[(name, intermediate, inputs (torch tensors), torch fn, jgpt fn(model module, *inputs),
    reference fn(*inputs, rounded: bool) -> fp32 torch tensor)]. The torch and jgpt functions
    return their output, or (output, intermediate) where the model stores the intermediate too
    (the residual stream: the block's next op reads it), which decides where compilers put their
    kernel boundaries."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F
    from jgpt import fp8
    from ref import train_gpt as ref

    g = torch.Generator().manual_seed(seed)
    bf = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).bfloat16()  # noqa: E731
    lam = np.array([0.7310, 0.4123], np.float32)
    lt = torch.tensor(lam, device=device)
    one = torch.ones((), device=device)  # the skip add's weight on x (ref.forward: x.new_ones(()))
    D = d // heads
    x_s = d ** 0.5 / 448

    def t_norm(y):
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + EPS)

    def rnd(y, on):
        return y.bfloat16().float() if on else y

    def both(mid, then):
        return then(mid), mid

    def wide_sum(x, a, then):  # x + a in fp32 into `then`, the sum stored rounded
        s = x.float() + a.float()
        return then(s), s.bfloat16()

    rot = ref.Rotary(D, T).to(device)  # the torch functions run on `device`, the references on the CPU
    cos, sin = rot.cos[:T, None, :].cpu(), rot.sin[:T, None, :].cpu()

    def t_rotary(q):
        q1, q2 = q.chunk(2, -1)
        return torch.cat((q1 * cos + q2 * sin, q1 * (-sin) + q2 * cos), -1)

    def jgpt_qk(m, q):
        # the reference's own tables: with jgpt's, computed inside the jitted function, this row
        # moved 0.5% of its outputs off both references in 2 of 12 test processes (not reproduced
        # in a process of its own); the site is about the norm's rounding, not the tables
        rope = (jnp.asarray(cos[:, 0].numpy()), jnp.asarray(sin[:, 0].numpy()))
        qkv = jnp.concatenate([q.reshape(T, -1)] * 3, axis=-1)
        return m.qk_norm_rotary_mix(qkv, None, rope, jnp.ones((1,), jnp.float32), heads)[0]

    def ref_x8(x):
        w = torch.zeros(8, d, device=x.device)
        return torch.ops.jgpt_ref.fp8_mm(ref.norm(x), w, x_s, 24 / 448, 1 / 448)[1].float()

    def j_boundary(m, first, second, x0):  # as model.hidden: the sum in BLOCK_SUM's dtype, stored rounded
        s = m.mix(first, second, dtype=m.between_blocks_dtype(x0.dtype))
        return m.block_input(lam[0], s, lam[1], x0), s.astype(x0.dtype)

    # gradient sites: the record's backward output (bf16) and its first fp32 consumer in the
    # optimizer (Muon's momentum blend, Adam's first moment), here (1 - 0.95) and (1 - 0.8)
    def t_weight_grad(x, w, gy):
        w = w.detach().requires_grad_()
        F.linear(x, w.type_as(x)).backward(gy)
        return 0.05 * w.grad

    def j_weight_grad(m, x, w, gy):
        return 0.05 * jax.vjp(lambda w: m.linear(x, w), w)[1](gy)[0]

    ids = torch.randint(0, 512, (T,), generator=g)

    def t_embed_grad(table, ids, gy):
        table = table.detach().requires_grad_()
        F.embedding(ids, table).backward(gy)
        return 0.2 * table.grad.float()

    def j_embed_grad(m, table, ids, gy):
        return 0.2 * jax.vjp(lambda t: m.embedding(t, ids), table)[1](gy)[0].astype(jnp.float32)

    def embed_sum(table, ids, gy):
        out = torch.zeros(table.shape, dtype=torch.float32)
        return out.index_add_(0, ids, gy.float())

    return [
        ("block input: mix -> norm", "the mix", (bf(T, d, s=3), bf(T, d)),
         lambda x, x0: both(ref.mix((lt[0], x), (lt[1], x0)), ref.norm),
         lambda m, x, x0: both(m.mix((lam[0], x), (lam[1], x0)), m.rms_norm),
         lambda x, x0, r: rnd(t_norm(rnd(lam[0] * x + lam[1] * x0, r)), True)),
        ("MLP input: residual add -> norm", "x + attn", (bf(T, d, s=3), bf(T, d)),
         lambda x, y: both(x + y, ref.norm),
         lambda m, x, y: m.add_then_norm(x, y)[::-1],
         lambda x, y, r: rnd(t_norm(rnd(x + y, r)), True)),
        ("block output: residual add -> next mix", "x + mlp", (bf(T, d, s=3), bf(T, d), bf(T, d)),
         lambda x, y, x0: both(x + y, lambda s: ref.mix((lt[0], s), (lt[1], x0))),
         lambda m, x, y, x0: j_boundary(m, (1.0, x), (1.0, y), x0),
         lambda x, y, x0, r: rnd(lam[0] * rnd(x + y, r) + lam[1] * x0, True)),
        ("U-net skip: skip add -> block mix", "x + w skip", (bf(T, d, s=3), bf(T, d, s=3), bf(T, d)),
         lambda x, k, x0: both(ref.mix((one, x), (lt[1], k)), lambda s: ref.mix((lt[0], s), (lt[1], x0))),
         lambda m, x, k, x0: j_boundary(m, (1.0, x), (lam[1], k), x0),
         lambda x, k, x0, r: rnd(lam[0] * rnd(x + lam[1] * k, r) + lam[1] * x0, True)),
        # GEMM outputs: cuBLAS writes the record's product in bf16 and the next kernel reads it;
        # XLA may hand a fused fp32 consumer the GEMM's fp32 accumulator instead. The torch
        # functions add in fp32 (as the compiled record does, rows above), so that eager torch
        # too has the GEMM's rounding as the only one in question
        ("attention out: c_proj GEMM -> residual add -> norm", "y Wp^T (bf16 GEMM)",
         (bf(T, d, s=3), bf(T, d), torch.randn(d, d, generator=g) * 0.05),
         lambda x, y, w: wide_sum(x, F.linear(y, w.type_as(y)), lambda s: ref.norm(s).bfloat16()),
         lambda m, x, y, w: m.add_then_norm(x, m.linear(y, w))[::-1],
         lambda x, y, w, r: rnd(t_norm(x + rnd(y @ rnd(w, True).T, r)), True)),
        ("MLP hidden: c_fc GEMM -> relu^2", "x Wfc^T (bf16 GEMM)",
         (bf(T, d), torch.randn(4 * d, d, generator=g) * 0.05),
         lambda x, w: F.relu(F.linear(x, w.type_as(x))).square(),
         lambda m, x, w: jnp.square(jax.nn.relu(m.linear(x, w))),
         lambda x, w, r: rnd(F.relu(rnd(x @ rnd(w, True).T, r)).square(), True)),
        ("MLP out: c_proj GEMM -> block sum -> next mix", "h Wp^T (bf16 GEMM)",
         (bf(T, d, s=3), bf(T, 4 * d), torch.randn(d, 4 * d, generator=g) * 0.02, bf(T, d)),
         lambda x, h, w, x0: wide_sum(x, F.linear(h, w.type_as(h)),
                                      lambda s: ref.mix((lt[0], s), (lt[1], x0.float())).bfloat16()),
         lambda m, x, h, w, x0: j_boundary(m, (1.0, x), (1.0, m.linear(h, w)), x0),
         lambda x, h, w, x0, r: rnd(lam[0] * (x + rnd(h @ rnd(w, True).T, r)) + lam[1] * x0, True)),
        ("x0 into a block's mix: norm -> mix", "norm(embed)", (bf(T, d, s=3), bf(T, d)),
         lambda x, e: both(ref.norm(e), lambda n: ref.mix((lt[0], x), (lt[1], n))),
         lambda m, x, e: both(m.rms_norm(e), lambda n: m.mix((lam[0], x), (lam[1], n))),
         lambda x, e, r: rnd(lam[0] * x + lam[1] * rnd(t_norm(e), r), True)),
        ("QK-norm -> rotary", "norm(q)", (bf(T, heads, D, s=2),),
         lambda q: rot(ref.norm(q[None]))[0],
         jgpt_qk,
         lambda q, r: rnd(t_rotary(rnd(t_norm(q), r)), True)),
        ("head input: final norm -> e4m3", "norm(x)", (bf(T, d, s=3),),
         ref_x8,
         lambda m, x: fp8.quantize(m.rms_norm(x), x_s, jnp.float8_e4m3fn),
         lambda x, r: (rnd(t_norm(x), r) / x_s).clamp(-448, 448).to(torch.float8_e4m3fn).float()),
        ("weight gradient -> Muon momentum", "dW = g^T x (bf16 GEMM)",
         (bf(T, d), torch.randn(4 * d, d, generator=g) * 0.02, bf(T, 4 * d)),
         t_weight_grad, j_weight_grad,
         lambda x, w, gy, r: 0.05 * rnd(gy.T @ x, r)),
        ("embedding gradient -> Adam", "dE (bf16 table's gradient)",
         (bf(512, d), ids, bf(T, d)),
         t_embed_grad, j_embed_grad,
         lambda table, ids, gy, r: 0.2 * rnd(embed_sum(table, ids, gy), r)),
    ]


def first(out):
    return out[0] if isinstance(out, tuple) else out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gemm_out", default=None, choices=["auto", "convert", "narrow"],
                   help="jgpt's model.GEMM_OUT for its column (default: the module's)")
    args = p.parse_args(argv)

    import jax
    import torch

    from jgpt import model as jmodel
    if args.gemm_out:
        jmodel.set_gemm_out(args.gemm_out)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__} ({dev}), jax {jax.__version__} ({jax.default_backend()}), "
          f"{args.tokens} tokens, jgpt GEMM_OUT {jmodel.GEMM_OUT} ({jmodel.gemm_out()})")
    print("share of outputs off the 'rounded' / 'fp32' computation (the smaller one is what it does)\n")
    print("| site | intermediate | torch eager | torch compiled | jgpt (jit) |")
    print("|---|---|---|---|---|")
    for name, what, inputs, t_fn, j_fn, ref_fn in sites(args.tokens, 768, 6, args.seed, dev):
        try:
            print(f"| {name} | {what} | " + " | ".join(audit(inputs, t_fn, j_fn, ref_fn)) + " |", flush=True)
        except Exception as e:  # one site's failure (e.g. a compile error) leaves the others' rows
            print(f"| {name} | {what} | failed: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | |", flush=True)


def audit(inputs, t_fn, j_fn, ref_fn) -> list[str]:
    """The three cells of one site: torch eager, torch compiled, jgpt under jit."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from jgpt import model as jmodel

    dev = "cuda" if torch.cuda.is_available() else "cpu"

    def to_jax(t):
        if t.dtype == torch.bfloat16:
            return jnp.asarray(t.float().numpy(), jnp.bfloat16)
        return jnp.asarray(t.numpy())

    def as_ref(t):  # the reference computations take floats in fp32
        return t.float() if t.is_floating_point() else t

    want = {r: ref_fn(*map(as_ref, inputs), r).numpy() for r in (True, False)}
    outs = []
    for fn in (t_fn, torch.compile(t_fn, dynamic=False)):
        out = first(fn(*[t.to(dev) for t in inputs]))
        outs.append(out.detach().float().cpu().numpy())
    out = first(jax.jit(lambda *xs: j_fn(jmodel, *xs))(*map(to_jax, inputs)))
    outs.append(np.asarray(out.astype(jnp.float32)))
    cells = []
    for out in outs:
        r, f = (float(np.mean(out.reshape(want[k].shape) != want[k])) for k in (True, False))
        cells.append(f"{'rounds' if r < f else 'fp32'} ({r:.1e} / {f:.1e})")
    return cells


if __name__ == "__main__":
    main()
