"""Step-1 gradients on the GPU: jgpt against ref compiled, next to ref eager against ref compiled.

    python scripts/gpu_grad_parity.py --data .gpudata --tokens 16384

Why: in the 200-step GPU parity run (BENCHMARKS.md, session 3) jgpt's loss after the first
update differs from ref compiled by 8e-4 while ref eager matches it to 1e-7. Adam's first step
moves each weight by about lr * sign(g), so what matters is how many gradient signs differ.
This draws the record26 init (seed 0, as scripts/gpu_parity.py), perturbs lm_head and c_proj
(zero at init: the step-1 gradients of everything else would vanish, design.md), takes the first
BOS-aligned training sequence, and prints per tensor: relative L2 difference and the fraction of
entries whose sign differs, for jgpt vs ref compiled and for ref eager vs ref compiled (the
tier-4 calibration pair). `--tokens` below 49,152: ref eager needs ~74 GiB at the record's length.

`--init train` takes the training init itself (lm_head and c_proj zero, so lm_head alone has a
step-1 gradient and the loss after the first update depends only on its signs) and prints where
those signs differ and how many entries of the head's e4m3 input X8 differ from the ref's.
Without a GPU it runs on the CPU, ref eager only (slowly; small --tokens).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compare(a, b) -> tuple[float, float]:
    import numpy as np
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))
    return rel, float(np.mean(np.sign(a) != np.sign(b)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder of *train*.bin shards")
    p.add_argument("--tokens", type=int, default=16384, help="sequence length (a multiple of 128)")
    p.add_argument("--window", type=int, default=1, help="attention window in blocks (step 1: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", choices=["perturbed", "train"], default="perturbed",
                   help="perturbed: lm_head and c_proj drawn non-zero so every tensor gets a gradient; "
                        "train: the training init itself (only lm_head gets a step-1 gradient), with "
                        "where lm_head's gradient signs differ and the head inputs compared bit by bit")
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from jgpt import checkpoint as jc
    from jgpt.data import BatchLoader
    from ref import train_gpt as ref

    files = sorted(Path(args.data).glob("*train*.bin"))
    if not files:
        sys.exit(f"--data {args.data}: no *train*.bin shards")
    batch = next(BatchLoader(files, args.tokens, 1))
    x, y = batch.inputs[0], batch.targets[0]

    hp = ref.parse_args(["--preset", "record26"])
    torch.manual_seed(args.seed)
    model = ref.GPT(hp.vocab_size, hp.num_layers, hp.num_heads, hp.model_dim, hp.max_seq_len, head_dim=hp.head_dim,
                    precision=hp.precision)
    g = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for name, t in (model.named_parameters() if args.init == "perturbed" else ()):
            if name == "lm_head.weight" or "c_proj" in name:
                t.add_(torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.dtype) * (1.0 if "lm_head" in name else 0.02))
    init = jc.torch_state_dict_to_params(model.state_dict())  # bits and dtypes kept
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(dev)
    xt, yt = torch.tensor(x, device=dev), torch.tensor(y, device=dev).long()
    wt = torch.tensor(args.window, dtype=torch.int32, device=dev)

    def ref_grads(net, module):
        module.zero_grad(set_to_none=True)
        loss = net(xt, yt, wt)
        loss.backward()
        grads = {n: t.grad.float().cpu().numpy() for n, t in module.named_parameters()}
        module.zero_grad(set_to_none=True)
        return float(loss), grads

    # (on the CPU ref stays eager, as everywhere in jgpt: its compile there is slow and not the
    # record's path, so the "compiled" column is eager too)
    loss_c, grads_c = ref_grads(torch.compile(model, dynamic=False) if dev == "cuda" else model, model)
    loss_e, grads_e = ref_grads(model, model)
    if args.init == "train":  # the head's X8 as ref quantises it (its custom op reads the bf16 norm)
        tr: dict = {}
        with torch.no_grad():
            model(xt, yt, wt, trace=tr)
            fn = tr["final_norm"].reshape(-1, hp.model_dim)
            x8_ref = ref.quantize_fp8(fn, model.lm_head.x_s, torch.float8_e4m3fn).float().cpu().numpy()
        del tr, fn
    model.cpu()  # free the GPU for jgpt (jax allocates its own pool)
    if dev == "cuda":
        torch.cuda.empty_cache()

    import jax
    import jax.numpy as jnp
    from jgpt import model as jmodel
    from jgpt.config import ModelConfig
    cfg = ModelConfig()
    names = jax.eval_shape(lambda: jmodel.init_params(cfg, jax.random.PRNGKey(0), "record"))
    params = {k: jnp.asarray(init[k].astype(jmodel.param_dtype(k, "record"))) for k in names}
    f = jax.jit(jax.value_and_grad(lambda p: jmodel.forward(p, cfg, jnp.asarray(x), jnp.asarray(y), args.window,
                                                            policy="record", train=True, backend="auto")))
    loss_j, grads_j = f(params)
    grads_j = {k: np.asarray(v.astype(jnp.float32)) for k, v in grads_j.items()}
    if args.init == "train":  # jgpt's X8 as its training step computes it (norm fused into quantize)
        from jgpt import fp8
        x8_j = jax.jit(lambda p: fp8.quantize(
            jmodel.final_norm(jmodel.hidden(p, cfg, jnp.asarray(x), args.window, backend="auto"), jnp.bfloat16),
            cfg.fp8_x_s, jnp.float8_e4m3fn))(params)
        x8_j = np.asarray(x8_j.astype(jnp.float32))

    print(f"device: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'} | torch {torch.__version__} | jax {jax.__version__} | "
          f"{args.tokens} tokens, window {args.window}")
    print(f"summed loss: ref compiled {loss_c:.6f}, ref eager {loss_e:.6f}, jgpt {float(loss_j):.6f}\n")
    print("| tensor | jgpt vs compiled: rel L2 | signs differ | eager vs compiled: rel L2 | signs differ |")
    print("|---|---|---|---|---|")
    zero = [n for n in grads_c if not (np.any(grads_c[n]) or np.any(grads_j[n]) or np.any(grads_e[n]))]
    for name in (n for n in grads_c if n not in zero):
        rj, sj = compare(grads_j[name], grads_c[name])
        re, se = compare(grads_e[name], grads_c[name])
        print(f"| {name} | {rj:.2e} | {sj:.2e} | {re:.2e} | {se:.2e} |")
    if zero:
        print(f"({len(zero)} tensors have zero gradients in all three: {', '.join(zero[:3])}, ...)")
    if args.init == "train":
        where_signs_differ("jgpt", grads_j["lm_head.weight"], grads_c["lm_head.weight"], y)
        where_signs_differ("ref eager", grads_e["lm_head.weight"], grads_c["lm_head.weight"], y)
        diff = x8_j != x8_ref
        print(f"head input X8 (e4m3 of the final norm), jgpt vs ref: {int(diff.sum())} of {diff.size} entries differ "
              f"(in {int(diff.any(1).sum())} of {diff.shape[0]} tokens)")


def where_signs_differ(label, a, b, targets) -> None:
    """At the training init lm_head is the only tensor with a step-1 gradient, and Adam's first
    step moves it by about lr * sign(g): print where the signs part (rows = vocabulary entries,
    split into the sequence's targets and the rest; columns = model dimensions)."""
    import numpy as np
    d = np.sign(a) != np.sign(b)
    rows = np.flatnonzero(d.any(1))
    hit = np.zeros(d.shape[0], bool)
    hit[np.asarray(targets)] = True
    cols = np.flatnonzero(d.any(0))
    print(f"lm_head signs differ, {label} vs ref compiled: {int(d.sum())} entries in {rows.size} rows "
          f"({int(hit[rows].sum())} of them targets in the sequence) and {cols.size} columns; "
          f"entries per column, largest five: {sorted(d.sum(0).tolist())[-5:]}; "
          f"zeros in a / b: {int((a == 0).sum())} / {int((b == 0).sum())}")


if __name__ == "__main__":
    main()
