"""Helpers for the trajectory parity tests (design.md "Parity tiers", tiers 0 and 3).

Both trainers run the tiny preset from the same initial weights on the same Gutenberg batches,
with the per-step semantics of `ref/train_gpt.py main()` (record26 §6, §7):

* one forward + backward per sequence, each sequence with its own summed loss;
* the summed gradients divided by the number of sequences;
* lr = initial_lr x get_lr(step) for every group, Muon momentum get_muon_momentum(step);
* Adam.step(), then Muon.step(); the window is get_window_size_blocks(step).

The reference side calls ref's own pieces (GPT, build_optimizers and the schedule functions),
the jgpt side its jitted train step (jgpt.step.make_train_step) with window = window_blocks(step).
The step loss is the mean CE per token: the per-sequence summed losses added in float64 on the
host and divided by the step's token count, the same way on both sides.
"""
from __future__ import annotations

import contextlib
import csv
import ctypes
import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from ref import train_gpt as ref

BOS = 50256
FP_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# Settings: one set of overrides applied to both presets


def settings(gutenberg_dir, *, precision: str, steps: int, seq_len: int, seqs_per_step: int,
             seed: int = 0):
    """(ref Hyperparameters, jgpt Config) of the tiny preset with the same overrides.

    num_iterations = steps, so the run spans the whole schedule: momentum warmup (10 steps), the
    LR cooldown (the last 45% of the steps) and the window growing to window_max_tokens (512)."""
    from jgpt.config import preset, replace

    hp = ref.Hyperparameters(**ref.PRESETS["tiny"])
    hp = dataclasses.replace(hp, precision=precision, num_iterations=steps, seq_len=seq_len,
                             seqs_per_step=seqs_per_step, seed=seed,
                             train_files=str(Path(gutenberg_dir) / "train_*.bin"),
                             val_files=str(Path(gutenberg_dir) / "val_*.bin"))
    ref.check_settings(hp)
    cfg = preset("tiny")
    cfg = replace(cfg, optim=replace(cfg.optim, num_iterations=steps),
                  run=replace(cfg.run, seq_len=seq_len, seqs_per_step=seqs_per_step))
    check_same_settings(hp, cfg)
    return hp, cfg


def check_same_settings(hp, cfg) -> None:
    """The two presets must describe the same run; a mismatch names the setting."""
    m, o, r = cfg.model, cfg.optim, cfg.run
    pairs = {
        "vocab_size": (hp.vocab_size, m.vocab_size), "num_layers": (hp.num_layers, m.num_layers),
        "num_heads": (hp.num_heads, m.num_heads), "model_dim": (hp.model_dim, m.model_dim),
        "head_dim": (hp.head_dim, m.hdim_head), "max_seq_len": (hp.max_seq_len, m.max_seq_len),
        "num_iterations": (hp.num_iterations, o.num_iterations), "cooldown_frac": (hp.cooldown_frac, o.cooldown_frac),
        "lr_floor": (hp.lr_floor, o.lr_floor), "adam_lr_embed": (hp.adam_lr_embed, o.adam_lr_embed),
        "adam_lr_head": (hp.adam_lr_head, o.adam_lr_head), "adam_lr_scalars": (hp.adam_lr_scalars, o.adam_lr_scalars),
        "adam_betas": (tuple(hp.adam_betas), tuple(o.adam_betas)), "adam_eps": (hp.adam_eps, o.adam_eps),
        "muon_lr": (hp.muon_lr, o.muon_lr), "muon_momentum_start": (hp.muon_momentum_start, o.muon_momentum_start),
        "muon_momentum_end": (hp.muon_momentum_end, o.muon_momentum_end),
        "muon_momentum_warmup": (hp.muon_momentum_warmup, o.muon_momentum_warmup),
        "ns_steps": (hp.ns_steps, o.ns_steps), "window_max_tokens": (hp.window_max_tokens, o.window_max_tokens),
        "seq_len": (hp.seq_len, r.seq_len), "seqs_per_step": (hp.seqs_per_step, r.seqs_per_step),
        "bos_search_span": (hp.bos_search_span, r.bos_search_span),
    }
    bad = {k: v for k, v in pairs.items() if v[0] != v[1]}
    assert not bad, f"ref and jgpt tiny presets differ (setting: (ref, jgpt)): {bad}"


# ---------------------------------------------------------------------------------------------
# Data: ref's generator and jgpt's loader must give the same tokens


def load_batches(hp, cfg, steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`steps` batches of (inputs [S, T] int32, targets [S, T] int64), asserting that
    ref.distributed_data_generator and jgpt.data.BatchLoader give identical tokens."""
    from jgpt.data import BatchLoader

    gen = ref.distributed_data_generator(hp.train_files, hp.seq_len, hp.seqs_per_step, 0, 1, align_to_bos=True,
                                         cycle=hp.cycle_train_files, max_span=hp.bos_search_span or None)
    loader = BatchLoader(hp.train_files, cfg.run.seq_len, cfg.run.seqs_per_step, align_to_bos=True,
                         max_span=cfg.run.bos_search_span or None)
    out = []
    for step in range(steps):
        ref_batch, jb = next(gen), next(loader)
        x = np.stack([i.numpy() for i, _ in ref_batch])
        y = np.stack([t.numpy() for _, t in ref_batch])
        assert x.dtype == np.int32 and y.dtype == np.int64
        np.testing.assert_array_equal(np.asarray(jb.inputs), x, err_msg=f"inputs differ at step {step}")
        np.testing.assert_array_equal(np.asarray(jb.targets).astype(np.int64), y, err_msg=f"targets differ at step {step}")
        assert (x[:, 0] == BOS).all(), f"step {step}: a sequence does not start with BOS (record26 §8)"
        out.append((x, y))
    return out


# ---------------------------------------------------------------------------------------------
# Initial weights


def ref_model(hp):
    return ref.GPT(hp.vocab_size, hp.num_layers, hp.num_heads, hp.model_dim, hp.max_seq_len, head_dim=hp.head_dim,
                   precision=hp.precision)


def initial_state_dict(hp) -> dict[str, torch.Tensor]:
    """The reference's own init (record26 §3: lm_head and every c_proj zero), seeded by hp.seed."""
    torch.manual_seed(hp.seed)
    return {k: v.detach().clone() for k, v in ref_model(hp).state_dict().items()}


def nudge_one_ulp(sd: dict[str, torch.Tensor], *, fraction: float = 1.0, toward: float = float("inf"),
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Every floating tensor moved by one ulp (torch.nextafter) toward `toward`, on all elements
    (fraction 1) or on a random subset of that fraction. Zeros move to the smallest subnormal."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in sd.items():
        if t.dtype not in FP_DTYPES:
            out[name] = t.clone()
            continue
        moved = torch.nextafter(t, torch.full_like(t, toward))
        if fraction < 1.0:
            pick = torch.rand(t.shape, generator=g) < fraction
            moved = torch.where(pick, moved, t)
        out[name] = moved
    return out


def permute_summation_order(sd: dict[str, torch.Tensor], *, seed: int = 0
                            ) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """The same network with its vocabulary rows, residual channels and MLP hidden units
    relabelled by random permutations: (state dict, target map). An exact symmetry of the model,
    of Adam (elementwise) and of Muon (NS(P X Q) = P NS(X) Q for permutations P, Q), so the
    trainer computes the same function at every step, but every reduction over those axes (the
    head's matmuls and log-sum-exp over 50304 classes, the rms norms, the Frobenius norms and
    NS matmuls, the residual projections) adds its terms in another order. Train with the
    targets relabelled, `target_map[targets]`; the loss curve is invariant. This is ref against
    itself under a change of rounding only, the perturbation that two implementations of the
    same arithmetic are to each other."""
    g = torch.Generator().manual_seed(seed)
    vocab, d = sd["lm_head.weight"].shape
    hidden = next(v.shape[0] for k, v in sd.items() if k.endswith("mlp.c_fc.weight"))
    pv, pd, ph = (torch.randperm(n, generator=g) for n in (vocab, d, hidden))
    out = {}
    for name, t in sd.items():
        t = t.clone()
        if name == "lm_head.weight":
            t = t[pv][:, pd]
        elif name == "embed.weight":
            t = t[:, pd]  # value embeddings live in v's (head) space: unchanged
        elif name.endswith("attn.qkv_w"):
            t = t[:, :, pd]
        elif name.endswith("attn.c_proj.weight"):
            t = t[pd]
        elif name.endswith("mlp.c_fc.weight"):
            t = t[ph][:, pd]
        elif name.endswith("mlp.c_proj.weight"):
            t = t[pd][:, ph]
        out[name] = t.contiguous()
    target_map = np.empty(vocab, np.int64)
    target_map[pv.numpy()] = np.arange(vocab)  # new row j holds old row pv[j]
    return out, target_map


# ---------------------------------------------------------------------------------------------
# The two trainers


def run_ref(hp, state_dict, batches, *, target_map=None, log=None, before_update=None,
            after_update=None) -> np.ndarray:
    """ref/train_gpt.py main()'s training loop (warmup_steps = 0, no validation), eager on CPU.
    `target_map` relabels the targets (see permute_summation_order). Hooks (teacher forcing):
    before_update(step, window, model, optimizers) once the step's gradients are in .grad and the
    step's lr and momentum are set; after_update(step, model) after Adam and Muon have stepped.
    Returns the per-step mean training loss (float64)."""
    model = ref_model(hp)
    model.load_state_dict(state_dict)
    model.train()
    optimizers = ref.build_optimizers(model, hp)
    losses = []
    for step, (x, y) in enumerate(batches):
        window = ref.get_window_size_blocks(step, hp.num_iterations, hp.window_max_tokens)
        total = 0.0
        if target_map is not None:
            y = target_map[y]
        for inputs, targets in zip(x, y):  # one backward per sequence (record26 §6)
            loss = model(torch.from_numpy(inputs), torch.from_numpy(targets), window)
            loss.backward()
            total += loss.item()
        if len(x) > 1:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.div_(len(x))
        lr_f = ref.get_lr(step, hp.num_iterations, hp.cooldown_frac, hp.lr_floor)
        momentum = ref.get_muon_momentum(step, hp.muon_momentum_warmup, hp.muon_momentum_start,
                                         hp.muon_momentum_end)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_f
        for group in optimizers[1].param_groups:
            group["momentum"] = momentum
        if before_update:
            before_update(step, window, model, optimizers)
        for opt in optimizers:  # Adam, then Muon (record26 §7)
            opt.step()
        if after_update:
            after_update(step, model)
        model.zero_grad(set_to_none=True)
        losses.append(total / x.size)
        if log:
            log(f"ref step {step}: window {window} lr x{lr_f:.4f} momentum {momentum:.3f} loss {losses[-1]:.6f}")
    return np.asarray(losses, np.float64)


def run_jgpt(cfg, policy: str, state_dict, batches, *, log=None) -> np.ndarray:
    """jgpt's jitted train step from the converted weights (call under jax.enable_x64 for fp64).
    Returns the per-step mean training loss (float64)."""
    import jax
    import jax.numpy as jnp

    from jgpt.checkpoint import torch_state_dict_to_params
    from jgpt.optim import build_optimizer, window_blocks
    from jgpt.step import init_state, make_train_step

    ns_dtype = {"fp64": jnp.float64, "fp32": jnp.float32, "record": jnp.bfloat16}[policy]
    params = {k: jnp.asarray(v) for k, v in torch_state_dict_to_params(state_dict).items()}
    for k, v in params.items():
        assert v.dtype == np.dtype(str(state_dict[k].dtype).removeprefix("torch.")), (k, v.dtype)
    optimizer = build_optimizer(params, cfg.optim, ns_dtype=ns_dtype)
    train_step = make_train_step(cfg.model, optimizer, policy=policy, backend="blockwise")
    state = init_state(params, optimizer)
    losses = []
    for step, (x, y) in enumerate(batches):
        window = window_blocks(step, cfg.optim)
        state, metrics = train_step(state, jnp.asarray(x), jnp.asarray(y.astype(np.int32)), window)
        seq = np.asarray(jax.device_get(metrics["seq_losses"]), np.float64)
        losses.append(float(seq.sum()) / x.size)
        if log:
            log(f"jgpt step {step}: window {window} loss {losses[-1]:.6f}")
    return np.asarray(losses, np.float64)


def rel_l2(a, b) -> float:
    """norm(a - b) / norm(b) in float64 (norm(a - b) when b is zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / nb) if nb else float(np.linalg.norm(a - b))


class TeacherForcing:
    """One step of jgpt from ref's exact state at every step of a ref run (pass `before_update`
    and `after_update` to run_ref; call under jax.enable_x64 for fp64). At step k, jgpt gets ref's
    weights, Adam m and v, Muon momentum buffers and step count; jgpt's gradients of the step's
    batch (its own per-sequence forward/backward, summed, divided by S, as in its train step) are
    compared with ref's .grad, and jgpt's train step, run from that state, gives the step's loss
    and the weights after the update, compared with ref's after Adam and Muon.

    Records per step: `loss` (relative difference of the step's mean loss), `grad` and `param`
    (largest per-tensor relative L2 over the tensors, with `grad_name`, `param_name`)."""

    def __init__(self, cfg, policy: str, batches):
        import functools

        import jax
        import jax.numpy as jnp

        from jgpt import model as jmodel
        from jgpt.optim import build_optimizer
        from jgpt.step import make_train_step

        self.jnp, self.batches, self.policy = jnp, batches, policy
        self.cfg = cfg
        self.optimizer = None
        self._build_optimizer = functools.partial(
            build_optimizer, optim_cfg=cfg.optim,
            ns_dtype={"fp64": jnp.float64, "fp32": jnp.float32, "record": jnp.bfloat16}[policy])
        self._make_train_step = functools.partial(make_train_step, cfg.model, policy=policy,
                                                  backend="blockwise", donate=False)

        def seq_loss(params, x, y, window):
            return jmodel.forward(params, cfg.model, x, y, window, policy=policy, train=True, backend="blockwise")

        @functools.partial(jax.jit, static_argnums=(3,))
        def grads(params, inputs, targets, window):
            def one(gsum, xy):
                loss, g = jax.value_and_grad(seq_loss)(params, xy[0], xy[1], window)
                return jax.tree.map(jnp.add, gsum, g), loss
            gsum, _ = jax.lax.scan(one, jax.tree.map(jnp.zeros_like, params), (inputs, targets))
            return jax.tree.map(lambda g: (g / inputs.shape[0]).astype(g.dtype), gsum)

        self._grads = grads
        self.records: list[dict] = []
        self._new_params = None

    def _state_from_ref(self, step: int, model, optimizers):
        from jgpt.checkpoint import torch_state_dict_to_params
        from jgpt.step import TrainState, init_state

        jnp = self.jnp
        params = {k: jnp.asarray(v) for k, v in
                  torch_state_dict_to_params({k: v.detach().clone() for k, v in model.state_dict().items()}).items()}
        if self.optimizer is None:
            self.optimizer = self._build_optimizer(params)
            self.train_step = self._make_train_step(self.optimizer)
        names = {id(p): n for n, p in model.named_parameters()}
        st = init_state(params, self.optimizer)
        inner = dict(st.opt_state.inner_states)
        adam, muon = optimizers
        for group, masked in inner.items():
            s = masked.inner_state
            if group == "muon":
                mom = dict(s.momentum)
                for p, ost in muon.state.items():
                    assert names[id(p)] in mom, names[id(p)]
                    mom[names[id(p)]] = jnp.asarray(ost["momentum_buffer"].numpy().copy())
                s = s._replace(momentum=mom, count=jnp.asarray(step, jnp.int32))
            else:
                mu, nu = dict(s.mu), dict(s.nu)
                for p, ost in adam.state.items():
                    n = names[id(p)]
                    if hasattr(mu.get(n), "shape"):  # a leaf of this group (others are MaskedNode)
                        assert int(ost["step"]) == step, (n, int(ost["step"]), step)
                        mu[n] = jnp.asarray(ost["exp_avg"].numpy().copy())
                        nu[n] = jnp.asarray(ost["exp_avg_sq"].numpy().copy())
                s = s._replace(mu=mu, nu=nu, count=jnp.asarray(step, jnp.int32))
            inner[group] = masked._replace(inner_state=s)
        return TrainState(params, st.opt_state._replace(inner_states=inner), jnp.asarray(step, jnp.int32))

    def before_update(self, step: int, window: int, model, optimizers) -> None:
        import jax

        jnp = self.jnp
        x, y = self.batches[step]
        state = self._state_from_ref(step, model, optimizers)
        xj, yj = jnp.asarray(x), jnp.asarray(y.astype(np.int32))
        jg = jax.device_get(self._grads(state.params, xj, yj, window))
        new, metrics = self.train_step(state, xj, yj, window)
        self._new_params = jax.device_get(new.params)
        jloss = float(np.asarray(metrics["seq_losses"], np.float64).sum()) / x.size
        # ref's loss of the same step from the same weights: recomputed by run_ref, passed by the caller
        rec = {"step": step, "jgpt_loss": jloss}
        gmax, gname = -1.0, ""
        for n, p in model.named_parameters():
            if p.grad is None:
                continue
            r = rel_l2(jg[n], p.grad.numpy())
            if n == "scalars":
                rec["grad_scalars"] = r
            elif r > gmax:
                gmax, gname = r, n
        rec.update(grad=gmax, grad_name=gname, c_proj_zero=all(
            not p.detach().any() for n, p in model.named_parameters() if n.endswith("c_proj.weight")))
        self.records.append(rec)

    def after_update(self, step: int, model) -> None:
        rec = self.records[-1]
        assert rec["step"] == step
        pmax, pname = -1.0, ""
        for n, p in model.named_parameters():
            r = rel_l2(self._new_params[n], p.detach().numpy())
            if r > pmax:
                pmax, pname = r, n
        rec.update(param=pmax, param_name=pname)
        self._new_params = None

    def finish(self, ref_loss: np.ndarray) -> dict[str, np.ndarray]:
        """Per-step arrays: loss (relative difference from ref's step loss), grad, param."""
        jl = np.asarray([r["jgpt_loss"] for r in self.records])
        out = {"loss": np.abs(jl - ref_loss[:len(jl)]) / np.abs(ref_loss[:len(jl)])}
        for k in ("grad", "param"):
            out[k] = np.asarray([r[k] for r in self.records])
            out[k + "_name"] = [r[k + "_name"] for r in self.records]
        out["grad_scalars"] = np.asarray([r["grad_scalars"] for r in self.records])
        out["c_proj_zero"] = np.asarray([r["c_proj_zero"] for r in self.records])
        return out

    def run_free(self, state_dict, batches) -> np.ndarray:
        """jgpt's free-running trajectory (as run_jgpt) with the same jitted train step, so no
        window compiles twice. Returns the per-step mean training loss (float64)."""
        import jax

        from jgpt.checkpoint import torch_state_dict_to_params
        from jgpt.optim import window_blocks
        from jgpt.step import init_state

        jnp = self.jnp
        params = {k: jnp.asarray(v) for k, v in torch_state_dict_to_params(state_dict).items()}
        if self.optimizer is None:
            self.optimizer = self._build_optimizer(params)
            self.train_step = self._make_train_step(self.optimizer)
        state = init_state(params, self.optimizer)
        losses = []
        for step, (x, y) in enumerate(batches):
            state, metrics = self.train_step(state, jnp.asarray(x), jnp.asarray(y.astype(np.int32)),
                                             window_blocks(step, self.cfg.optim))
            losses.append(float(np.asarray(jax.device_get(metrics["seq_losses"]), np.float64).sum()) / x.size)
        return np.asarray(losses, np.float64)


def check_windows(hp, cfg, steps: int) -> list[int]:
    """ref's float window formula and jgpt's integer one agree at every step; returns them."""
    from jgpt.optim import window_blocks

    ref_w = [ref.get_window_size_blocks(s, hp.num_iterations, hp.window_max_tokens) for s in range(steps)]
    jgpt_w = [window_blocks(s, cfg.optim) for s in range(steps)]
    assert ref_w == jgpt_w, f"window schedules differ: ref {ref_w}, jgpt {jgpt_w}"
    return ref_w


# ---------------------------------------------------------------------------------------------
# Speed: glibc hands every large tensor fresh mmap'd pages (the [T, 50304] logits and their
# gradients, 100-200 MB each, several per sequence), and the page faults cost about half of ref's
# time here. Serving them from the heap and keeping freed memory lets ref reuse its pages.
# Measured, 10 steps of 2 x 512 tokens on 2 cores: fp32 24 -> 13 s (peak RSS 1.5 -> 2.4 GB),
# fp64 64 -> 29 s (2.6 -> 4.1 GB). Numerics are untouched.

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536


@contextlib.contextmanager
def reuse_freed_memory():
    """glibc only (a no-op elsewhere); restores glibc's defaults and releases the memory after."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):
        libc, ok = None, False
    try:
        yield bool(ok)
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)


# ---------------------------------------------------------------------------------------------
# Output


def write_csv(name: str, columns: dict[str, np.ndarray], tmp_dir) -> list[Path]:
    """Write the columns (first one: step) to tmp_dir/name and, when JGPT_PARITY_OUT is set, to
    that folder too (written to a temporary name, then renamed). Returns the paths written."""
    dirs = [Path(tmp_dir)]
    if os.environ.get("JGPT_PARITY_OUT"):
        dirs.append(Path(os.environ["JGPT_PARITY_OUT"]))
    keys = list(columns)
    n = len(columns[keys[0]])
    paths = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        path = d / name
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(keys)
            for i in range(n):
                w.writerow([_fmt(columns[k][i]) for k in keys])
        os.replace(tmp, path)
        paths.append(path)
    return paths


def _fmt(v) -> str:
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return repr(float(v))
