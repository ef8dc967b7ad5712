"""DoRA from scratch (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation",
arXiv:2402.09353).

DoRA splits a weight into a magnitude and a direction (section 3, eq. (2)) and fine-tunes the
magnitude directly and the direction through LoRA (eq. (5)):

    W' = m · (W0 + ΔW) / ||W0 + ΔW||_c,   ΔW = s · B A,   m initialised to ||W0||_c.

"Column-wise" (``||·||_c``) refers to the paper's ``W ∈ R^{d×k}`` used as ``x W`` with one column
per OUTPUT feature, so ``m`` has one entry per output feature. ``nn.Linear`` stores the transpose,
(out, in), so the paper's columns are the rows here: the norm is taken over the input dimension,
``norm(dim=1)``, giving ``magnitude`` of shape ``(out_features,)`` as in the authors' code and PEFT.
(Some from-scratch write-ups normalise an (out, in) weight over ``dim=0``, i.e. per input feature;
that is a different method.)

An all-zero row of ``W0 + ΔW`` (real checkpoints have them: Llama-3.1-8B's ``o_proj``, peft#2049)
has no direction, and ``m / ||·||`` would be 0/0 = NaN. We floor the norm at ``ε =
torch.finfo(dtype).tiny`` (about 1.2e-38 in float32): such a row starts with magnitude ε and gives
the base layer's output (its bias), and every other row is computed exactly as without the floor.
PEFT 0.21 returns NaN there.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt._validate import UserError, UserTypeError
from minigpt.lora import (
    LinearWithLoRA,
    check_flag,
    check_lora_args,
    check_mergeable,
    replace_linear_with_adapter,
)


class LinearWithDoRA(LinearWithLoRA):
    """DoRA layer (eq. (5)): ``linear``, a LoRA update ``lora`` and a trainable ``magnitude``
    (out_features,).

    With ``g = m / ||W0 + ΔW||`` per output feature, eq. (5) is ``W' x + b = g ⊙ (W0 x + ΔW x) +
    b``. The forward computes it from the frozen path's output ``linear(x) = W0 x + b``, as PEFT
    does:

        out = linear(x) + (g − 1) ⊙ W0 x + g ⊙ lora(x),

    reusing ``W0 x = linear(x) − b`` instead of a second matmul with ``W0`` (an optimisation; with
    dropout active, ``W0`` must see the dropped-out input, so it is recomputed). The bias is not
    rescaled. ``detach_norm=True`` treats the norm as a constant in backpropagation (section 4.3,
    which saves memory with little loss in accuracy); ``False`` lets the gradient flow through it.
    The forward value is the same.
    """

    def __init__(
        self,
        linear: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        detach_norm: bool = True,
        init: str = "kaiming",
    ):
        super().__init__(linear, rank, alpha, dropout=dropout, use_rslora=use_rslora, init=init)
        self.detach_norm = detach_norm
        with torch.no_grad():
            self.magnitude = nn.Parameter(
                self.weight_norm(linear.weight.detach().float()).to(self.lora.A.device)
            )
        # the norm used by merge, for unmerge
        self.register_buffer("merged_norm", None, persistent=False)

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``||W0 + ΔW||`` per output feature (the paper's column norm = a row norm of the (out, in)
        weight), floored at the dtype's smallest normal number so that an all-zero row does not
        divide 0 by 0."""
        norm = torch.linalg.norm(weight + self.delta_weight().to(weight.dtype), dim=1)
        return norm.clamp_min(torch.finfo(norm.dtype).tiny)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)  # W0 x + b: the frozen path
        if self.merged:
            return out
        # adapter maths in the adapter's dtype (float32)
        x_d = self.dropout(x.to(self.lora.A.dtype))
        # BEGIN SOLUTION hint: g = magnitude / ||W0 + ΔW|| per row (detached if self.detach_norm)
        # section 4.3: the norm is a constant for backpropagation, so build no graph for it
        if self.detach_norm:
            with torch.no_grad():
                norm = self.weight_norm(self.linear.weight.to(x_d.dtype))
        else:
            norm = self.weight_norm(self.linear.weight.to(x_d.dtype))
        g = self.magnitude / norm
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base = (
                out.to(x_d.dtype)
                if self.linear.bias is None
                else (out - self.linear.bias).to(x_d.dtype)
            )
        else:  # dropout active: W0 must see the same dropped-out input as the adapter
            base = F.linear(x_d, self.linear.weight.to(x_d.dtype))
        return out + ((g - 1) * base + g * self.lora(x_d)).to(out.dtype)
        # END SOLUTION

    def merge(self) -> None:
        """``W <- m · (W + ΔW) / ||W + ΔW||`` in place; keeps the norm so :meth:`unmerge` can undo
        it."""
        check_mergeable(self, merged=False)
        weight = self.linear.weight
        with torch.no_grad():
            norm = self.weight_norm(weight)
            weight.copy_(
                (self.magnitude / norm).to(weight.dtype)[:, None]
                * (weight + self.delta_weight().to(weight.dtype))
            )
        self.merged_norm = norm
        self.merged = True

    def unmerge(self) -> None:
        """``W <- W' · ||W0 + ΔW|| / m − ΔW`` with the norm saved by :meth:`merge`."""
        check_mergeable(self, merged=True)
        weight = self.linear.weight
        zero = torch.nonzero(self.magnitude == 0).flatten().tolist()
        if zero:
            raise UserError(
                f"cannot unmerge DoRA: magnitude entries {zero} are zero, so the merged rows no "
                "longer hold the direction"
            )
        with torch.no_grad():
            factor = (self.merged_norm / self.magnitude).to(weight.dtype)[:, None]
            weight.copy_(weight * factor - self.delta_weight().to(weight.dtype))
        self.merged_norm = None
        self.merged = False


def check_dora_target(name: str, linear: nn.Module) -> None:
    """DoRA's magnitude and norm need the base layer's weight (a tensor; a quantised base's
    dequantised one)."""
    if not isinstance(getattr(linear, "weight", None), torch.Tensor):
        raise UserTypeError(
            f"DoRA needs the base layer's weight (a .weight tensor); {name!r} is a "
            f"{type(linear).__name__} without one"
        )


def replace_linear_with_dora(
    model: nn.Module,
    rank: int,
    alpha: float,
    target_modules: str | Iterable[str] | None = None,
    dropout: float = 0.0,
    use_rslora: bool = False,
    detach_norm: bool = True,
    init: str = "kaiming",
    exclude: str | Iterable[str] = ("lm_head",),
    freeze: bool = True,
) -> nn.Module:
    """Wrap linear layers in :class:`LinearWithDoRA`, in place (same selection rules as
    :func:`minigpt.lora.replace_linear_with_lora`); returns ``model``. ``freeze=True`` leaves A, B
    and the magnitudes trainable."""
    args = check_lora_args(rank, alpha, dropout, use_rslora, init)
    detach_norm = check_flag(detach_norm, "detach_norm")
    return replace_linear_with_adapter(
        model,
        lambda linear: LinearWithDoRA(linear, **args, detach_norm=detach_norm),
        args["rank"],
        target_modules,
        exclude,
        freeze,
        check=check_dora_target,
    )
