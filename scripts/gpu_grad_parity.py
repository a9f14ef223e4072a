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
        for name, t in model.named_parameters():
            if name == "lm_head.weight" or "c_proj" in name:
                t.add_(torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.dtype) * (1.0 if "lm_head" in name else 0.02))
    init = jc.torch_state_dict_to_params(model.state_dict())  # bits and dtypes kept
    model = model.cuda()
    xt, yt = torch.tensor(x, device="cuda"), torch.tensor(y, device="cuda").long()
    wt = torch.tensor(args.window, dtype=torch.int32, device="cuda")

    def ref_grads(net, module):
        module.zero_grad(set_to_none=True)
        loss = net(xt, yt, wt)
        loss.backward()
        grads = {n: t.grad.float().cpu().numpy() for n, t in module.named_parameters()}
        module.zero_grad(set_to_none=True)
        return float(loss), grads

    loss_c, grads_c = ref_grads(torch.compile(model, dynamic=False), model)
    loss_e, grads_e = ref_grads(model, model)
    model.cpu()  # free the GPU for jgpt (jax allocates its own pool)
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

    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | jax {jax.__version__} | "
          f"{args.tokens} tokens, window {args.window}")
    print(f"summed loss: ref compiled {loss_c:.6f}, ref eager {loss_e:.6f}, jgpt {float(loss_j):.6f}\n")
    print("| tensor | jgpt vs compiled: rel L2 | signs differ | eager vs compiled: rel L2 | signs differ |")
    print("|---|---|---|---|---|")
    for name in grads_c:
        rj, sj = compare(grads_j[name], grads_c[name])
        re, se = compare(grads_e[name], grads_c[name])
        print(f"| {name} | {rj:.2e} | {sj:.2e} | {re:.2e} | {se:.2e} |")


if __name__ == "__main__":
    main()
