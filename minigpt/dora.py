"""DoRA from scratch (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353).

DoRA splits a weight into a magnitude and a direction (section 3, eq. (2)) and fine-tunes the magnitude
directly and the direction through LoRA (eq. (5)):

    W' = m · (W0 + ΔW) / ||W0 + ΔW||_c,   ΔW = s · B A,   m initialised to ||W0||_c.

"Column-wise" (``||·||_c``) refers to the paper's ``W ∈ R^{d×k}`` used as ``x W`` with one column per OUTPUT
feature, so ``m`` has one entry per output feature. ``nn.Linear`` stores the transpose, (out, in), so the
paper's columns are the rows here: the norm is taken over the input dimension, ``norm(dim=1)``, giving
``magnitude`` of shape ``(out_features,)`` as in the authors' code and PEFT. (Some from-scratch write-ups
normalise an (out, in) weight over ``dim=0``, i.e. per input feature; that is a different method.)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.lora import (LinearWithLoRA, _check_alpha, _check_bool, _check_dropout, _check_init,
                          register_adapter_method, replace_linear_with_adapter)


def _base_weight(linear: nn.Module) -> torch.Tensor:
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor):  # QuantizedLinear's .weight is a dequantised tensor: fine
        raise TypeError(f"DoRA needs the base layer's weight (a .weight tensor); {type(linear).__name__} has none")
    return weight


@register_adapter_method
class LinearWithDoRA(LinearWithLoRA):
    """DoRA layer (eq. (5)): ``linear``, a LoRA update ``lora`` and a trainable ``magnitude`` (out_features,).

    The forward follows PEFT so that it stays right with dropout and leaves the bias alone: with
    ``x_d = dropout(x)`` and ``g = m / ||W0 + ΔW||`` (per output feature),

        out = linear(x) + (g − 1) · (x_d W0ᵀ) + g · lora(x_d).

    Without dropout this is ``g · (W0 + ΔW) x + b``, i.e. ``W' x + b`` with the bias not rescaled.
    ``detach_norm=True`` treats the norm as a constant in backpropagation (section 4.3, which saves memory
    with little loss in accuracy); ``False`` lets the gradient flow through it. The forward value is the same.
    """

    method = "dora"

    def __init__(self, linear: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 detach_norm: bool = True, init: str = "kaiming"):
        detach_norm = _check_bool(detach_norm, "detach_norm")
        weight = _base_weight(linear)
        super().__init__(linear, rank, alpha, dropout=dropout, use_rslora=use_rslora, init=init)
        self.detach_norm = detach_norm
        with torch.no_grad():
            norm = self.weight_norm(weight.detach().float())
        self.magnitude = nn.Parameter(norm.to(self.lora.A.device))
        self.register_buffer("merged_norm", None, persistent=False)  # the norm used by merge, for unmerge

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``||W0 + ΔW||`` per output feature (the paper's column norm = a row norm of the (out, in) weight)."""
        return torch.linalg.norm(weight + self.delta_weight().to(weight.dtype), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.linear(x)
        out = self.linear(x)
        x_d = self.dropout(x.to(self.lora.A.dtype))  # adapter maths in the adapter's dtype (float32)
        weight = _base_weight(self.linear).to(x_d.dtype)
        # BEGIN SOLUTION hint: norm = ||W0 + ΔW|| per output row (detached if self.detach_norm); g = magnitude / norm
        norm = self.weight_norm(weight)
        if self.detach_norm:
            norm = norm.detach()
        g = self.magnitude / norm
        return out + ((g - 1) * F.linear(x_d, weight) + g * self.lora(x_d)).to(out.dtype)
        # END SOLUTION

    def merge(self) -> None:
        """``W <- m · (W + ΔW) / ||W + ΔW||`` in place; keeps the norm so :meth:`unmerge` can undo it."""
        weight = self._check_can_merge()
        with torch.no_grad():
            delta = self.delta_weight().to(weight.dtype)
            norm = torch.linalg.norm(weight + delta, dim=1)
            zero = torch.nonzero(norm == 0).flatten().tolist()
            if zero:
                raise ValueError(f"cannot merge DoRA: rows {zero} of W + ΔW have zero norm, so the direction "
                                 "V/||V|| is undefined")
            weight.copy_((self.magnitude / norm).to(weight.dtype)[:, None] * (weight + delta))
        self.merged_norm = norm
        self.merged = True

    def unmerge(self) -> None:
        """``W <- W' · ||W0 + ΔW|| / m − ΔW`` with the norm saved by :meth:`merge`."""
        weight = self._check_can_unmerge()
        zero = torch.nonzero(self.magnitude == 0).flatten().tolist()
        if zero:
            raise ValueError(f"cannot unmerge DoRA: magnitude entries {zero} are zero, so the merged rows no "
                             "longer hold the direction")
        with torch.no_grad():
            factor = (self.merged_norm / self.magnitude).to(weight.dtype)[:, None]
            weight.copy_(weight * factor - self.delta_weight().to(weight.dtype))
        self.merged_norm = None
        self.merged = False

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.lora.A, self.lora.B, self.magnitude]

    def adapter_config(self) -> dict:
        return {**super().adapter_config(), "detach_norm": self.detach_norm}

    @classmethod
    def expected_adapter_shapes(cls, in_features: int, out_features: int, rank: int) -> dict[str, tuple[int, ...]]:
        return {**super().expected_adapter_shapes(in_features, out_features, rank), "magnitude": (out_features,)}


def replace_linear_with_dora(model: nn.Module, rank: int, alpha: float,
                             target_modules: str | Iterable[str] | None = None, dropout: float = 0.0,
                             use_rslora: bool = False, detach_norm: bool = True, init: str = "kaiming",
                             exclude: str | Iterable[str] = ("lm_head",), freeze: bool = True) -> nn.Module:
    """Wrap linear layers in :class:`LinearWithDoRA`, in place (same selection rules as
    :func:`minigpt.lora.replace_linear_with_lora`); returns ``model``. ``freeze=True`` leaves A, B and the
    magnitudes trainable."""
    _check_alpha(alpha), _check_dropout(dropout), _check_bool(use_rslora, "use_rslora")
    _check_bool(detach_norm, "detach_norm"), _check_init(init)

    def factory(linear: nn.Module) -> LinearWithDoRA:
        return LinearWithDoRA(linear, rank, alpha, dropout=dropout, use_rslora=use_rslora,
                              detach_norm=detach_norm, init=init)

    return replace_linear_with_adapter(model, factory, rank, target_modules, exclude, freeze)
