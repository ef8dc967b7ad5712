"""A GPT-2 in one readable file (Radford et al., 2019), numerically equal to Hugging Face's
``GPT2LMHeadModel``.

Architecture: token + learned position embeddings -> ``n_layer`` pre-LayerNorm blocks (causal
multi-head self-attention, then a 4x-wide GELU MLP, each with a residual connection) -> final
LayerNorm -> output head, tied to the token embedding as in GPT-2 or untied.

Query, key and value are three separate ``nn.Linear`` layers (GPT-2's checkpoint fuses them into one
``c_attn``; :mod:`minigpt.hf` splits it) so that LoRA can adapt ``query`` and ``value`` alone, as
the LoRA paper does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# the tiny presets' vocabulary (GPT-2 tokens, compact)
from minigpt._validate import UserError, UserTypeError
from minigpt.tokenizer import (
    COMPACT_VOCAB_SIZE,
)


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise UserError(f"GPTConfig.n_head ({self.n_head}) must divide n_embd ({self.n_embd})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.num_parameters() > MAX_PARAMETERS:  # a typo or a damaged file, not a model to build
            raise UserError(
                f"GPTConfig describes {self.num_parameters():,} parameters "
                f"({4 * self.num_parameters() / 2**30:,.0f} GiB in float32), more than the "
                f"{MAX_PARAMETERS:,} this course builds; check vocab_size, context_length, n_layer "
                "and n_embd"
            )

    def num_parameters(self) -> int:
        """The parameter count of a ``GPTModel`` of this config, computed without building it."""
        c = self.n_embd
        block = 12 * c * c + (13 if self.bias else 4) * c  # attention + MLP + two LayerNorms
        head = 0 if self.tie_weights else self.vocab_size * c
        return (self.vocab_size + self.context_length) * c + self.n_layer * block + 2 * c + head

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """A named configuration: ``gpt2-small`` (124M), ``gpt2-medium``, ``tiny`` (CPU), ``micro``
        (tests)."""
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise UserError(f"unknown GPTConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


# GPT-2 XL, the largest GPT-2, has 1.56 billion parameters.
MAX_PARAMETERS = 4_000_000_000

PRESETS = {
    "gpt2-small": GPTConfig(),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "tiny": GPTConfig(
        vocab_size=COMPACT_VOCAB_SIZE, context_length=32, n_layer=4, n_head=4, n_embd=128
    ),
    "micro": GPTConfig(
        vocab_size=COMPACT_VOCAB_SIZE, context_length=32, n_layer=2, n_head=2, n_embd=32
    ),
}


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t attends to positions <= t (Vaswani et al., 2017,
    eq. 1)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.query = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.key = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.value = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, C) -> (B, heads, T, head_dim)
        q, k, v = (
            proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            for proj in (self.query, self.key, self.value)
        )
        y = causal_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.out_proj(y))


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v (Vaswani et al. 2017, eq. 1) by torch's fused
    kernel, which never materialises the T x T matrix."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # torch's CPU attention backward is ~4x slower in bf16 than in float32 (torch 2.13): run it
        # in float32
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), is_causal=True, dropout_p=dropout_p
            )
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


class MLP(nn.Module):
    """Position-wise feed-forward network: 4x expansion and GELU (tanh approximation, as GPT-2)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPTModel(nn.Module):
    """GPT-2: ``model(idx)`` maps token ids ``(B, T)`` to next-token logits ``(B, T,
    vocab_size)``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if not isinstance(cfg, GPTConfig):
            raise UserTypeError(f"cfg must be a GPTConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) so the residual stream's
        # variance
        # does not grow with depth (Radford et al., 2019, section 2.3).
        for name, param in self.named_parameters():
            if name.endswith(("out_proj.weight", "mlp.proj.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(idx))

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The final hidden states (after ``ln_f``), one per position: ``forward`` is
        ``lm_head(hidden(idx))``."""
        # The value check is free on the CPU; on a GPU it would cost a host sync per call.
        check_token_ids(idx, self.cfg.vocab_size, self.cfg.context_length, idx.device.type == "cpu")
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameters counted once even when shared (the tied head adds nothing)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def check_token_ids(
    idx: torch.Tensor, vocab_size: int, context_length: int, check_values: bool = True
) -> None:
    """Refuse what ``GPTModel`` cannot read: not (batch, time) integer ids, too long, or ids outside
    the vocabulary.

    The shape checks read no tensor data and run on every device, before any kernel. The range check
    reads the values, which on a GPU means waiting for it, so ``GPTModel.forward`` runs it
    (``check_values``) on CPU tensors only; the entry points that take ids from the CPU
    (``generate``, ``answer``) check them there before moving them to the model's device.
    """
    if idx.dim() != 2 or idx.dtype not in (torch.long, torch.int, torch.int32):
        raise UserError(
            f"idx must be integer token ids of shape (batch, time), got {tuple(idx.shape)} "
            f"{idx.dtype}"
        )
    if idx.shape[1] > context_length:
        raise UserError(f"sequence length {idx.shape[1]} exceeds context_length {context_length}")
    if check_values and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= vocab_size):
        raise UserError(
            f"token ids must be in [0, {vocab_size}), got {int(idx.min())}..{int(idx.max())}"
        )
