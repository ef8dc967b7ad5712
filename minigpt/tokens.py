"""Trainable token rows: train a few rows of a frozen embedding, as PEFT's ``TrainableTokens`` does.

A LoRA adapter on the blocks (:func:`minigpt.lora.replace_linear_with_lora`) cannot change what a
token id *means* on the way in, nor how likely it is on the way out: both live in the token
embedding, which stays frozen. When a user brings truly new tokens (ids pretraining never saw, or
ids added to the vocabulary), those rows must be trained. Training the whole ``(vocab, dim)`` matrix
would cost as many parameters as the rest of a small model; PEFT's answer is to train only the
selected rows — ``TrainableTokensConfig( token_indices=[...])``, or
``LoraConfig(trainable_token_indices=[...])`` next to a LoRA adapter
(``peft/tuners/trainable_tokens/layer.py`` in peft 0.21).

:class:`TrainableTokens` wraps a frozen ``nn.Embedding`` and holds one trainable ``delta`` of shape
``(len(token_indices), dim)``; the effective weight is ``W0`` with row ``token_indices[i]`` replaced
by ``W0[token_indices[i]] + delta[i]``. PEFT stores the new row values themselves (its
``trainable_tokens_delta`` starts as a copy of ``W0[idx]``); storing the difference is the same
model (``values = W0[idx] + delta``) with the same gradients, and makes weight decay pull a row back
towards its pretrained value rather than towards zero.

Weight tying: GPT-2 (and our :class:`minigpt.model.GPTModel`) uses the token embedding as the output
layer, ``lm_head.weight is tok_emb.weight``. PEFT then also wraps the tied ``lm_head`` with a layer
that uses the embedding adapter's rows (``TrainableTokensModel.inject_adapter``), so one set of new
rows both reads and writes the token. :func:`add_trainable_tokens` does the same with
:class:`TiedTokensHead`."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt._validate import UserError, UserTypeError


def check_token_indices(token_indices: Any, num_embeddings: int) -> list[int]:
    """``token_indices`` as a list of ints: non-empty, unique, each in ``[0, num_embeddings)``."""
    if isinstance(token_indices, (str, bytes)) or not isinstance(
        token_indices, (Iterable, torch.Tensor)
    ):
        raise UserTypeError(
            f"token_indices must be a list of integer token ids, got {type(token_indices).__name__}"
        )
    if isinstance(token_indices, torch.Tensor):
        if (
            token_indices.is_floating_point()
            or token_indices.dtype == torch.bool
            or token_indices.dim() != 1
        ):
            raise UserTypeError(
                f"token_indices as a tensor must be 1-D with an integer dtype, got dtype "
                f"{token_indices.dtype} and shape {tuple(token_indices.shape)}"
            )
        token_indices = token_indices.tolist()
    ids = []
    for i in token_indices:
        if isinstance(i, bool):
            raise UserTypeError(f"token_indices must hold integer token ids, got the bool {i!r}")
        try:
            ids.append(operator.index(i))
        except TypeError:
            raise UserTypeError(
                f"token_indices must hold integer token ids, got {i!r} ({type(i).__name__})"
            ) from None
    if not ids:
        raise UserError("token_indices is empty; name at least one token id to train")
    bad = [i for i in ids if not 0 <= i < num_embeddings]
    if bad:
        raise UserError(
            f"token_indices {bad} are out of range for an embedding of {num_embeddings} rows "
            f"(valid ids are 0..{num_embeddings - 1})"
        )
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise UserError(f"token_indices must be unique; {repeated} appear more than once")
    return ids


class TrainableTokens(nn.Module):
    """A frozen ``nn.Embedding`` whose rows ``token_indices`` get a trainable ``delta`` (PEFT's
    TrainableTokens).

    ``forward(idx)`` looks ids up in :meth:`merged_weight`: ``W0`` with ``W0[token_indices] +
    delta`` in the selected rows. ``delta`` starts at zero, so at initialisation the model is
    unchanged.
    """

    def __init__(self, embedding: nn.Embedding, token_indices: Iterable[int]):
        super().__init__()
        if not isinstance(embedding, nn.Embedding):
            raise UserTypeError(
                f"embedding must be an nn.Embedding, got {type(embedding).__name__}"
            )
        ids = check_token_indices(token_indices, embedding.num_embeddings)
        self.embedding = embedding.requires_grad_(False)
        weight = embedding.weight
        self.register_buffer(
            "token_indices", torch.tensor(ids, dtype=torch.long, device=weight.device)
        )
        self.delta = nn.Parameter(
            torch.zeros(len(ids), embedding.embedding_dim, dtype=weight.dtype, device=weight.device)
        )

    @property
    def num_embeddings(self) -> int:
        return self.embedding.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.embedding.embedding_dim

    def merged_weight(self) -> torch.Tensor:
        """``W0`` with the selected rows replaced by ``W0[idx] + delta`` (differentiable in
        ``delta``)."""
        return self.embedding.weight.index_add(
            0, self.token_indices, self.delta.to(self.embedding.weight)
        )

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight (a tensor, not a parameter), so code reading ``tok_emb.weight`` —
        e.g. :func:`minigpt.hf.save_gpt2` — sees the updated rows, like PEFT's
        ``get_merged_weights``."""
        return self.merged_weight()

    def merged_embedding(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` holding the merged weight: the wrapper folded away for
        export."""
        emb = self.embedding
        out = nn.Embedding(
            emb.num_embeddings,
            emb.embedding_dim,
            padding_idx=emb.padding_idx,
            device=emb.weight.device,
            dtype=emb.weight.dtype,
        )
        with torch.no_grad():
            out.weight.copy_(self.merged_weight())
        return out

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        emb = self.embedding
        return F.embedding(
            idx,
            self.merged_weight(),
            emb.padding_idx,
            emb.max_norm,
            emb.norm_type,
            emb.scale_grad_by_freq,
            emb.sparse,
        )

    def token_state_dict(self) -> dict[str, torch.Tensor]:
        """What to save next to an adapter file: ``token_indices`` and ``delta`` (CPU copies).

        :func:`minigpt.adapters.save_adapter` stores only the LoRA / PiSSA / DoRA layers, not these
        rows.
        """
        return {
            "token_indices": self.token_indices.detach().cpu().clone(),
            "delta": self.delta.detach().cpu().clone(),
        }

    def load_token_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`token_state_dict` returned; the indices must match this wrapper's."""
        missing = {"token_indices", "delta"} - set(state)
        if missing:
            raise UserError(f"token state dict lacks {sorted(missing)}")
        if state["token_indices"].tolist() != self.token_indices.tolist():
            raise UserError(
                f"token state dict trains ids {state['token_indices'].tolist()}, but this wrapper "
                f"trains {self.token_indices.tolist()}"
            )
        if tuple(state["delta"].shape) != tuple(self.delta.shape):
            raise UserError(
                f"token state dict delta has shape {tuple(state['delta'].shape)}, expected "
                f"{tuple(self.delta.shape)}"
            )
        with torch.no_grad():
            self.delta.copy_(state["delta"])

    def extra_repr(self) -> str:
        return f"token_indices={self.token_indices.tolist()}"


class TiedTokensHead(nn.Module):
    """The output layer of a tied model: ``logits = x @ tokens.merged_weight()ᵀ``.

    It owns no parameters; it reads the embedding wrapper's rows, as PEFT's tied
    ``TrainableTokensLayer`` does. The wrapper is kept in a list so it is not a submodule: the state
    dict holds ``delta`` once, and :func:`minigpt.lora.replace_linear_with_lora` finds no linear
    layer here to wrap.
    """

    def __init__(self, tokens: TrainableTokens):
        super().__init__()
        self._tokens = [tokens]

    @property
    def tokens(self) -> TrainableTokens:
        return self._tokens[0]

    @property
    def weight(self) -> torch.Tensor:
        return self.tokens.merged_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.tokens.merged_weight())


def add_trainable_tokens(model: nn.Module, token_indices: Iterable[int]) -> nn.Module:
    """Make the rows ``token_indices`` of ``model.tok_emb`` trainable, in place; returns ``model``.

    The embedding becomes a :class:`TrainableTokens` (frozen ``W0`` + trainable ``delta``); a tied
    ``lm_head`` becomes a :class:`TiedTokensHead` that uses the same updated rows, as PEFT does for
    tied GPT-2. Only ``delta`` is made trainable here; other parameters keep their
    ``requires_grad``.

    Order with LoRA: ``replace_linear_with_lora(..., freeze=True)`` freezes every non-LoRA
    parameter, ``delta`` included, so call it first and this function second (or set
    ``tok_emb.delta.requires_grad_(True)``).
    """
    emb = getattr(model, "tok_emb", None)
    if isinstance(emb, TrainableTokens):
        raise UserError(
            "model.tok_emb already has trainable tokens; add all token_indices in one call"
        )
    if not isinstance(emb, nn.Embedding):
        raise UserTypeError(
            f"model must have a token embedding tok_emb (nn.Embedding), got {type(emb).__name__}"
        )
    head = getattr(model, "lm_head", None)
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    tokens = TrainableTokens(emb, token_indices)
    model.tok_emb = tokens
    if tied:
        model.lm_head = TiedTokensHead(tokens)
    return model
