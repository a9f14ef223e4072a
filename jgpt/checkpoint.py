"""Moving parameters between PyTorch state dicts and jgpt, and jgpt's own checkpoint file.

jgpt parameters use the record's state-dict names and (out, in) layouts (design.md convention 1),
so conversion changes the array type only: every tensor keeps its dtype (bf16 stays bf16 through
ml_dtypes) and its bits.

The jgpt checkpoint file (format "jgpt-checkpoint", version 1) is a NumPy .npz archive:

* one entry per parameter, named by its state-dict name; dtypes numpy cannot store natively
  (bfloat16, float8) are stored as unsigned-integer views of their bits;
* an entry "__jgpt_meta__": uint8 bytes of a JSON object {"format", "version", "config" (the
  ModelConfig fields), "dtypes" (name -> dtype name)}.

It is written to a temporary name beside the target and renamed, so an interrupted save leaves no
half-written file. (Training checkpoints with optimizer state are a separate, later format.)

The torch side imports torch lazily; without it the functions say how to install it. The CLI is
`main` (`scripts/convert_weights.py`, console script `jgpt-convert`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

from jgpt.config import ModelConfig, default_no_attn_layers, pad_vocab
from jgpt.model import param_shapes

FORMAT, VERSION = "jgpt-checkpoint", 1
META_KEY = "__jgpt_meta__"
COMPILE_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers
DERIVED_BUFFERS = (".rotary.cos", ".rotary.sin")  # recomputed, never trained (record26 §3)
_ML_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
              "float8_e5m2": ml_dtypes.float8_e5m2}
_UINT_OF_SIZE = {1: np.uint8, 2: np.uint16}


class CheckpointMismatch(ValueError):
    """Parameters that do not fit a ModelConfig; the message lists every offending tensor."""


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("converting PyTorch checkpoints needs torch: pip install 'jgpt[torch]' "
                          "(or pip install torch)") from e
    return torch


# ------------------------------------------------------------------------------------------------
# torch <-> numpy, bit for bit


def state_dict_from_checkpoint(obj) -> dict:
    """A bare state dict, or the record's checkpoint dict whose "model" entry is one; keys lose
    the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes, derived rotary buffers go."""
    sd = obj["model"] if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(sd, dict):
        raise ValueError(f"expected a state dict or a dict with a 'model' state dict, got {type(obj).__name__}")
    out = {}
    for name, value in sd.items():
        for prefix in COMPILE_PREFIXES:
            name = name.removeprefix(prefix)
        if not name.endswith(DERIVED_BUFFERS):
            out[name] = value
    return out


def _tensor_to_numpy(torch, name: str, t) -> np.ndarray:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")
    t = t.detach().cpu().contiguous()
    dtype_name = str(t.dtype).removeprefix("torch.")
    if dtype_name in _ML_DTYPES:  # numpy has no such dtype: reinterpret the bits
        raw = t.view(torch.int16 if t.element_size() == 2 else torch.uint8).numpy()
        return raw.view(_ML_DTYPES[dtype_name]).copy()
    return t.numpy().copy()


def torch_state_dict_to_params(sd: dict) -> dict[str, np.ndarray]:
    """torch state dict (or record checkpoint dict) -> {name: numpy array}, dtypes and bits kept."""
    torch = _torch()
    return {name: _tensor_to_numpy(torch, name, t) for name, t in state_dict_from_checkpoint(sd).items()}


def params_to_torch_state_dict(params: dict) -> dict:
    """{name: array} (numpy or jax) -> torch state dict, dtypes and bits kept."""
    torch = _torch()
    sd = {}
    for name, a in params.items():
        a = np.ascontiguousarray(np.asarray(a))
        if a.dtype.name in _ML_DTYPES:
            signed = np.int16 if a.dtype.itemsize == 2 else np.uint8
            sd[name] = torch.from_numpy(a.view(signed).copy()).view(getattr(torch, a.dtype.name))
        else:
            sd[name] = torch.from_numpy(a.copy())
    return sd


def load_torch_file(path) -> dict[str, np.ndarray]:
    """Parameters from a file written by torch.save: a bare state dict or the record's
    checkpoint dict ({"model": ..., ...}, keys possibly prefixed `_orig_mod.`)."""
    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that is not plain tensors and containers, or not torch at all
        raise ValueError(f"{path}: not a loadable torch checkpoint ({type(e).__name__}: {e})") from e
    return torch_state_dict_to_params(obj)


def save_torch_file(path, params: dict) -> None:
    """torch.save(state dict) via a temporary name; the file loads with GPT.load_state_dict."""
    torch = _torch()
    sd = params_to_torch_state_dict(params)
    _atomic_write(Path(path), lambda f: torch.save(sd, f))


# ------------------------------------------------------------------------------------------------
# Validation against a ModelConfig, and inferring one


def validate_params(params: dict, cfg: ModelConfig, source: str = "checkpoint") -> None:
    """Raise CheckpointMismatch listing every missing, unexpected and mis-shaped tensor."""
    want = param_shapes(cfg)
    lines = []
    for name, shape in want.items():
        if name not in params:
            lines.append(f"  missing    {name}: expected shape {shape}")
        elif tuple(params[name].shape) != shape:
            lines.append(f"  shape      {name}: expected {shape}, found {tuple(params[name].shape)}")
    for name in params:
        if name not in want:
            lines.append(f"  unexpected {name}: shape {tuple(params[name].shape)}")
    if lines:
        raise CheckpointMismatch(f"{source} does not match the model config ({len(lines)} problem(s)):\n"
                                 + "\n".join(lines) + f"\nconfig: {cfg}")


def infer_config(params: dict, *, num_heads: int | None = None, head_dim: int | None = None,
                 **settings) -> ModelConfig:
    """A ModelConfig whose parameter shapes are those of `params`.

    Shapes fix vocab (padded), model_dim, num_layers, mlp_ratio, the attention-free layers and
    num_heads * head_dim. They cannot tell num_heads from head_dim: give one, else head_dim is
    128 (the record's) when it divides, else 64. Long-window layers and max_seq_len leave no
    trace in the weights: pass them in `settings` (other ModelConfig fields) if not the default.
    The result is validated against params."""
    if "embed.weight" not in params:
        raise CheckpointMismatch("cannot infer a config: no 'embed.weight' tensor")
    vp, d = params["embed.weight"].shape
    layers = sorted(int(n.split(".")[1]) for n in params if n.startswith("blocks.") and n.endswith(".mlp.c_fc.weight"))
    if not layers or layers != list(range(len(layers))):
        raise CheckpointMismatch(f"cannot infer num_layers from blocks.*.mlp.c_fc.weight indices {layers}")
    L = len(layers)
    attn_layers = [i for i in range(L) if f"blocks.{i}.attn.qkv_w" in params]
    hdim = params[f"blocks.{attn_layers[0]}.attn.qkv_w"].shape[1] if attn_layers else d
    if head_dim is None:
        head_dim = hdim // num_heads if num_heads else next((h for h in (128, 64) if hdim % h == 0), None)
    if not head_dim or hdim % head_dim:
        raise CheckpointMismatch(f"attention width {hdim} is not a multiple of head_dim={head_dim}; "
                                 "pass num_heads or head_dim")
    no_attn = tuple(i for i in range(L) if i not in attn_layers)
    kw = dict(vocab_size=50257 if pad_vocab(50257) == vp else vp, num_layers=L,
              num_heads=hdim // head_dim, model_dim=d,
              head_dim=None if d == hdim else head_dim,
              no_attn_layers=None if no_attn == default_no_attn_layers(L) else no_attn,
              mlp_ratio=params["blocks.0.mlp.c_fc.weight"].shape[0] // d)
    kw.update(settings)
    cfg = ModelConfig(**kw)
    validate_params(params, cfg, "parameters")
    return cfg


# ------------------------------------------------------------------------------------------------
# The jgpt checkpoint file


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"checkpoint config has settings this jgpt does not know: {unknown}")
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def save_checkpoint(path, params: dict, cfg: ModelConfig) -> None:
    """Write params (validated against cfg) and cfg as a jgpt checkpoint file (module doc)."""
    validate_params(params, cfg, "parameters to save")
    arrays, dtypes = {}, {}
    for name, a in params.items():
        a = np.asarray(a)
        dtypes[name] = a.dtype.name
        arrays[name] = a.view(_UINT_OF_SIZE[a.dtype.itemsize]) if a.dtype.name in _ML_DTYPES else a
    meta = dict(format=FORMAT, version=VERSION, config=config_to_dict(cfg), dtypes=dtypes)
    arrays[META_KEY] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    _atomic_write(Path(path), lambda f: np.savez(f, **arrays))


def is_jgpt_checkpoint(path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return META_KEY + ".npy" in z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def load_checkpoint(path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, params as numpy arrays in their saved dtypes) from a jgpt checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    if not is_jgpt_checkpoint(path):
        raise ValueError(f"{path} is not a jgpt checkpoint (no {META_KEY} entry); "
                         "torch files convert with `jgpt-convert to-jgpt`")
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(bytes(z[META_KEY]).decode())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{path}: unsupported checkpoint format {meta.get('format')} v{meta.get('version')}")
        params = {}
        for name, dtype in meta["dtypes"].items():
            a = z[name]
            params[name] = a.view(_ML_DTYPES[dtype]) if dtype in _ML_DTYPES else a
    cfg = config_from_dict(meta["config"])
    validate_params(params, cfg, str(path))
    return cfg, params


# ------------------------------------------------------------------------------------------------
# CLI


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="jgpt-convert",
        description="Convert model weights between PyTorch (ref/train_gpt.py or the upstream record "
                    "script) and jgpt. Tensors keep their names, shapes, dtypes and bits.",
        epilog="to-jgpt: IN is a torch.save file (a bare state dict, or the record's checkpoint dict "
               "with a 'model' entry; '_orig_mod.' prefixes are removed). The model config is inferred "
               "from the shapes; pass --num-heads or --head-dim when the attention width is not "
               "128 * heads, and --long-layers / --max-seq-len when not the default. "
               "to-torch: IN is a jgpt checkpoint; OUT gets a bare state dict "
               "(torch.load(OUT) -> GPT.load_state_dict). Needs torch: pip install 'jgpt[torch]'.")
    sub = p.add_subparsers(dest="direction", required=True)
    tj = sub.add_parser("to-jgpt", help="torch .pt -> jgpt checkpoint (.npz)")
    tj.add_argument("input", help="torch checkpoint (.pt)")
    tj.add_argument("output", help="jgpt checkpoint to write (.npz)")
    tj.add_argument("--num-heads", type=int)
    tj.add_argument("--head-dim", type=int)
    tj.add_argument("--long-layers", type=_ints, help="comma-separated layer indices, e.g. 0,4,7,11")
    tj.add_argument("--max-seq-len", type=int)
    tt = sub.add_parser("to-torch", help="jgpt checkpoint (.npz) -> torch state dict (.pt)")
    tt.add_argument("input", help="jgpt checkpoint (.npz)")
    tt.add_argument("output", help="torch file to write (.pt)")
    args = p.parse_args(argv)
    try:
        if args.direction == "to-jgpt":
            params = load_torch_file(args.input)
            settings = {k: v for k, v in (("long_layers", args.long_layers), ("max_seq_len", args.max_seq_len))
                        if v is not None}
            cfg = infer_config(params, num_heads=args.num_heads, head_dim=args.head_dim, **settings)
            save_checkpoint(args.output, params, cfg)
        else:
            cfg, params = load_checkpoint(args.input)
            save_torch_file(args.output, params)
    except (ImportError, FileNotFoundError, ValueError) as e:
        print(f"jgpt-convert: error: {e}", file=sys.stderr)
        return 1
    n = sum(int(np.prod(a.shape)) for a in params.values())
    print(f"wrote {args.output}: {len(params)} tensors, {n:,} parameters, {cfg}")
    return 0
