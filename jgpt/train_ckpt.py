"""What a training run leaves in its folder: Orbax checkpoints, the log and the metrics.

Training checkpoints with Orbax: the TrainState (params, optimizer state, step) plus a JSON
record of everything else a resumed run needs (data position, config, train time so far).

    ckpt = TrainCheckpointer(out / "checkpoints", keep=2)
    ckpt.save(step, state, meta)                       # meta: JSON-able dict
    state, meta, step = ckpt.restore_latest(abstract)  # abstract: ShapeDtypeStructs with shardings

Atomicity (design.md, "Errors users will make": nothing half-written is left behind): Orbax's
CheckpointManager writes a step into `<step>.orbax-checkpoint-tmp-<time>`, adds
`commit_success.txt` when everything is written, and renames the folder to `<step>`. A run
killed during a save therefore leaves a tmp folder, which Orbax never lists as a step and which
the next manager removes. We also skip a step folder that lacks the commit file (what a
filesystem without atomic renames could leave), and `restore_latest` falls back to the
previous step when the newest one cannot be read, so a damaged save costs the steps since the
previous checkpoint, never the run.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

COMMIT_FILE = "commit_success.txt"
TMP_MARKER = ".orbax-checkpoint-tmp"  # Orbax names a step being written "<step>.orbax-checkpoint-tmp-<time>"

log = logging.getLogger(__name__)


class NoCheckpoint(FileNotFoundError):
    """--resume found no complete checkpoint."""


class TrainCheckpointer:
    """Keep-last-`keep` checkpoints in `directory`, saved synchronously (the trainer pauses its
    clock around a save, so an asynchronous save would only blur what a kill leaves behind)."""

    def __init__(self, directory, keep: int = 2):
        self.directory = Path(directory).absolute()
        if keep < 1:
            raise ValueError(f"keep_checkpoints={keep} must be at least 1")
        self.remove_interrupted()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def remove_interrupted(self) -> list[Path]:
        """Delete what interrupted saves left (Orbax tmp folders), now and in this thread.
        (Orbax's own cleanup_tmp_directories runs in a background thread per manager, and two
        managers on one folder race each other's deletions.) The primary process only."""
        if jax.process_index() != 0 or not self.directory.is_dir():
            return []
        found = sorted(p for p in self.directory.iterdir() if TMP_MARKER in p.name)
        for p in found:
            log.warning("removing %s, left by an interrupted save", p)
            shutil.rmtree(p, ignore_errors=True)
        return found

    def complete_steps(self) -> list[int]:
        """Steps whose folder Orbax finalised (renamed from tmp, commit file present), ascending."""
        steps = []
        for s in self.manager.all_steps():
            if (self.directory / str(s) / COMMIT_FILE).is_file():
                steps.append(int(s))
            else:
                log.warning("ignoring checkpoint %s: no %s (an interrupted save)", self.directory / str(s), COMMIT_FILE)
        return sorted(steps)

    def save(self, step: int, state, meta: dict) -> Path:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(int(step), args=args, force=True)
        self.manager.wait_until_finished()
        return self.directory / str(step)

    def restore(self, step: int, abstract_state):
        """(state, meta) of `step`; abstract_state gives the tree, dtypes and target shardings
        (jax.ShapeDtypeStruct leaves with .sharding), so the restored arrays land where the
        compiled step expects them."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        out = self.manager.restore(int(step), args=args)
        return out.state, out.meta

    def restore_latest(self, abstract_state):
        """(state, meta, step) of the newest checkpoint that restores; older ones are tried
        when a newer one fails (say, a file cut short by a full disk)."""
        steps = self.complete_steps()
        if not steps:
            raise NoCheckpoint(f"no complete checkpoint in {self.directory} to resume from")
        errors = []
        for s in reversed(steps):
            try:
                state, meta = self.restore(s, abstract_state)
                return state, meta, s
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the previous one
                msg = f"checkpoint {self.directory / str(s)} could not be restored: {type(e).__name__}: {e}"
                log.warning(msg)
                errors.append(msg)
        raise NoCheckpoint("no checkpoint could be restored:\n  " + "\n  ".join(errors))

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON record of `step` (default: the newest complete one) without the arrays."""
        if step is None:
            steps = self.complete_steps()
            if not steps:
                raise NoCheckpoint(f"no complete checkpoint in {self.directory}")
            step = steps[-1]
        out = self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out.meta

    def close(self):
        self.manager.close()


def load_initial_params(path, model_cfg, policy: str, abstract_state):
    """Params from a jgpt .npz, a torch .pt or a run's checkpoints (design.md: one name, one
    shape on both sides), checked against the model config and cast to the policy's dtypes."""
    import numpy as np

    from jgpt import checkpoint as jc
    from jgpt import model

    p = Path(path).expanduser()
    if p.is_dir():
        folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        params = TrainCheckpointer(folder).restore_latest(abstract_state)[0].params
    elif not p.is_file():
        raise FileNotFoundError(f"--init_from {p}: no such file or folder")
    elif jc.is_jgpt_checkpoint(p):
        params = jc.load_checkpoint(p)[1]
    else:
        params = jc.load_torch_file(p)
    jc.validate_params(params, model_cfg, str(p))
    return {k: np.asarray(v).astype(model.param_dtype(k, policy)) for k, v in params.items()}


def abstract_like(state, shardings):
    """ShapeDtypeStructs of `state` (arrays or an eval_shape) carrying the target shardings."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


# ---------------------------------------------------------------------------------------------
# The run's records beside the checkpoints: the record's log lines, JSON lines, the loss plot


class RunLog:
    def __init__(self, out: Path, master: bool):
        self.out, self.master = out, master
        self.metrics = out / "metrics.jsonl"
        self._log = open(out / "log.txt", "a") if master else None  # noqa: SIM115 - closed in close()
        self._jsonl = None

    def print(self, line: str) -> None:
        if self.master:
            print(line, flush=True)
            print(line, file=self._log, flush=True)

    def event(self, kind: str, **rec) -> None:
        if not self.master:
            return
        if self._jsonl is None:
            self._jsonl = open(self.metrics, "a")  # noqa: SIM115
        self._jsonl.write(json.dumps({"event": kind, **rec}) + "\n")
        self._jsonl.flush()

    def truncate_to(self, step: int) -> None:
        """Resuming at `step`: keep the events of the steps before it (and the train step that
        made it); the resumed run logs the rest again, so the file reads as one run."""
        if not self.master or not self.metrics.exists():
            return
        kept = []
        for line in self.metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            s = rec.get("step")
            if s is None or s < step or (rec["event"] == "train" and s == step):
                kept.append(line)
        tmp = self.metrics.with_name(self.metrics.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        tmp.replace(self.metrics)

    def plot(self) -> Path | None:
        if not self.master or not self.metrics.exists():
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        recs = [json.loads(x) for x in self.metrics.read_text().splitlines() if x.strip()]
        train = [(r["step"], r["loss"]) for r in recs if r["event"] == "train"]
        val = [(r["step"], r["val_loss"]) for r in recs if r["event"] == "val"]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), lw=1, label="train loss")
        if val:
            ax.plot(*zip(*val), "o-", label="val loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats)")
        ax.grid(alpha=0.3)
        ax.legend()
        path = self.out / "loss.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return path

    def close(self) -> None:
        for f in (self._log, self._jsonl):
            if f is not None:
                f.close()


def peak_memory() -> str:
    import jax

    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    if peaks:
        return f"peak device memory: {max(peaks) // 2**20} MiB (max over {len(peaks)} local device(s))"
    import resource

    return f"peak host memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB (max RSS)"
