"""Model and run settings, the record's constants, and presets.

Every constant of record #26 lives here once, with the spec section it comes from
(`../shared/docs/record26.md`). Sizes other than the record's follow the design's config rule
table (design.md, "Configs beyond the record"); `ref/train_gpt.py` implements the same rule.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

BOS_ID = 50256  # GPT-2 <|endoftext|>, starts every document (record26 §5.6, §8)
BLOCK_SIZE = 128  # attention block size (record26 §5.6)
RMS_EPS = 2.0**-23  # torch.finfo(float32).eps, rms_norm in fp32 (record26 §5)

PRECISIONS = ("record", "fp32", "fp64")


def pad_vocab(vocab_size: int) -> int:
    """Next multiple of 128 (record26 §3: 50257 -> 50304, used by embeddings and head alike)."""
    return -(-vocab_size // 128) * 128


def value_embed_layout(num_layers: int) -> list[int | None]:
    """Which value embedding each layer uses (record26 §5.2; design rule n = min(3, L//2)).

    The first n and the last n layers get ve0..ve(n-1); the others none.
    """
    n = min(3, num_layers // 2)
    layout: list[int | None] = [None] * num_layers
    for k in range(n):
        layout[k] = k
        layout[num_layers - n + k] = k
    return layout


def default_no_attn_layers(num_layers: int) -> tuple[int, ...]:
    """Layers without attention: the record's {7} at 12 layers (record26 §5.4), else none."""
    return (7,) if num_layers == 12 else ()


def default_long_layers(num_layers: int) -> tuple[int, ...]:
    """Long-window layers (record26 §5.6): the record's {0, 4, 7, 11} at 12 layers; otherwise
    the design's rule: the first, the last and every 4th layer."""
    if num_layers == 12:
        return (0, 4, 7, 11)
    return tuple(sorted({0, num_layers - 1} | set(range(0, num_layers, 4))))


def num_scalars(num_layers: int) -> int:
    """L skip weights + 2L block lambdas + 2L attention lambdas, padded to a multiple of 8
    (record26 §3; the pad is to 8, never to the world size)."""
    n = 5 * num_layers
    return -(-n // 8) * 8


@dataclass(frozen=True)
class ModelConfig:
    """The GPT of record #26 (record26 §3-§5). Defaults are the record."""

    vocab_size: int = 50257
    num_layers: int = 12
    num_heads: int = 6
    model_dim: int = 768
    head_dim: int | None = None  # None: model_dim // num_heads (128 in the record)
    max_seq_len: int = 262144  # rotary table length (record26 §5.5: 4*64*1024)
    no_attn_layers: tuple[int, ...] | None = None  # None: default_no_attn_layers
    long_layers: tuple[int, ...] | None = None  # None: default_long_layers
    mlp_ratio: int = 4  # record26 §5.4
    attn_scale: float = 0.12  # record26 §5.5, not 1/sqrt(head_dim)
    rope_base: float = 1024.0  # record26 §5.5
    softcap: float = 30.0  # record26 §5.8: softcap * sigmoid(z / (7.5 * sqrt(d)))
    softcap_div: float = 7.5
    fp8_w_s: float = 24 / 448  # record26 §5.9 (x_s = sqrt(model_dim)/448 is derived)
    fp8_grad_s: float = 1 / 448

    def __post_init__(self):
        if self.num_layers < 2 or self.num_layers % 2:
            raise ValueError(f"num_layers={self.num_layers}: the U-net needs an even number >= 2")
        if self.head_dim is None and self.model_dim % self.num_heads:
            raise ValueError(
                f"model_dim={self.model_dim} is not divisible by num_heads={self.num_heads}; "
                "set head_dim explicitly")
        if self.hdim_head % 4:
            raise ValueError(f"head_dim={self.hdim_head} must be a multiple of 4 (half-truncated RoPE)")
        for name, layers in (("no_attn_layers", self.attn_free), ("long_layers", self.long)):
            bad = [i for i in layers if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"{name}={layers} has layers outside 0..{self.num_layers - 1}: {bad}")

    @property
    def hdim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.model_dim // self.num_heads

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.hdim_head

    @property
    def vocab_padded(self) -> int:
        return pad_vocab(self.vocab_size)

    @property
    def attn_free(self) -> tuple[int, ...]:
        return default_no_attn_layers(self.num_layers) if self.no_attn_layers is None else tuple(self.no_attn_layers)

    @property
    def long(self) -> tuple[int, ...]:
        return default_long_layers(self.num_layers) if self.long_layers is None else tuple(self.long_layers)

    @property
    def ve_layout(self) -> list[int | None]:
        return value_embed_layout(self.num_layers)

    @property
    def num_value_embeds(self) -> int:
        return min(3, self.num_layers // 2)

    @property
    def num_scalars(self) -> int:
        return num_scalars(self.num_layers)

    @property
    def fp8_x_s(self) -> float:
        return math.sqrt(self.model_dim) / 448  # record26 §5.9: |rms-normed x| <= sqrt(d)


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule constants (record26 §2, §5.7, §7)."""

    num_iterations: int = 1750
    cooldown_frac: float = 0.45  # record26 §7.1
    lr_floor: float = 0.1  # record26 §7.1 (script A/C; B used 0.05)
    adam_lr_embed: float = 0.6  # embed and value embeds (0.008 x 75)
    adam_lr_head: float = 0.22  # lm_head (0.008 x 27.5)
    adam_lr_scalars: float = 0.04  # scalars (0.008 x 5)
    adam_betas: tuple[float, float] = (0.8, 0.95)
    adam_eps: float = 1e-10  # added to the uncorrected sqrt(v) (record26 §7.2)
    muon_lr: float = 0.05
    muon_momentum_start: float = 0.85  # record26 §7.3 momentum warmup
    muon_momentum_end: float = 0.95
    muon_momentum_warmup: int = 300
    ns_steps: int = 5
    ns_coeffs: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
    window_max_tokens: int = 1728  # record26 §5.7: W(s) = ceil(max(1728 s/1750, 1)/128)


@dataclass(frozen=True)
class RunConfig:
    """Batch, validation and loop settings (record26 §2, §8-§10)."""

    seq_len: int = 48 * 1024  # tokens per sequence (one per rank in the record)
    seqs_per_step: int = 8  # sequences per optimizer step (the record's 8 ranks)
    val_seq_len: int = 4 * 64 * 1024
    val_tokens: int = 10485760
    val_every: int = 125
    warmup_steps: int = 10  # untimed compile warm-up, state restored afterwards (record26 §10)
    # BOS search span of the aligned loader; 0 = the record's 2 * seqs_per_step * seq_len (§8).
    # Short sequences over long documents need more (the record's span assumes seq_len >> doc).
    bos_search_span: int = 0

    def __post_init__(self):
        if self.seq_len % BLOCK_SIZE:
            raise ValueError(f"seq_len={self.seq_len} must be a multiple of {BLOCK_SIZE} (attention blocks)")
        if self.val_seq_len % BLOCK_SIZE:
            raise ValueError(f"val_seq_len={self.val_seq_len} must be a multiple of {BLOCK_SIZE}")
        if self.val_tokens % self.val_seq_len:
            raise ValueError(f"val_tokens={self.val_tokens} must be a multiple of val_seq_len={self.val_seq_len}")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.seqs_per_step


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _tiny() -> Config:
    # design.md: L = 6, 2 heads of 64, d = 128, 1,024-token sequences, 8 per step, 60 steps,
    # window up to 512 tokens, 10 warm-up steps of momentum.
    return Config(
        model=ModelConfig(num_layers=6, num_heads=2, model_dim=128, head_dim=64, max_seq_len=4096),
        optim=OptimConfig(num_iterations=60, muon_momentum_warmup=10, window_max_tokens=512),
        run=RunConfig(seq_len=1024, seqs_per_step=8, val_seq_len=4096, val_tokens=32768,
                      val_every=20, warmup_steps=0, bos_search_span=65536),
    )


PRESETS = {
    "record26": Config,
    "tiny": _tiny,
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def replace(cfg, **changes):
    """dataclasses.replace that names the setting when it does not exist."""
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} for {type(cfg).__name__}; known: {sorted(names)}")
    return dataclasses.replace(cfg, **changes)
