"""Measuring what fine-tuning changed: effective weights, ‖ΔW‖/‖W0‖, LoRA's amplification and
subspaces.

Every adapter in the course (LoRA, PiSSA, DoRA) is a module that maps ``x`` to ``x W_effᵀ + b``; its
effective weight is read off by feeding it the identity (:func:`effective_weight`), the same way for
every method, so full fine-tuning and the adapters are measured with one ruler.
"""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def effective_weight(layer: nn.Module, in_features: int) -> torch.Tensor:
    """The ``(out, in)`` matrix a linear-like layer applies: ``layer(I) - layer(0)``, transposed."""
    was_training = layer.training
    layer.eval()
    device = next(layer.parameters()).device
    eye = torch.eye(in_features, device=device)
    weight = (layer(eye) - layer(torch.zeros_like(eye))).T
    layer.train(was_training)
    return weight.float()


def adapted_linears(base: nn.Module) -> list[str]:
    """Names of the base model's linear layers inside the blocks (what every method adapts)."""
    return [
        name
        for name, m in base.named_modules()
        if isinstance(m, nn.Linear) and name.startswith("blocks.")
    ]


@torch.no_grad()
def weight_deltas(
    base: nn.Module, tuned: nn.Module
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (W0, ΔW)}`` for every block linear of ``base``, whatever method produced
    ``tuned``, as float32 CPU tensors (``base`` and ``tuned`` may be on different devices)."""
    deltas = {}
    for name in adapted_linears(base):
        w0 = base.get_submodule(name).weight.detach().float().cpu()
        deltas[name] = (
            w0,
            effective_weight(tuned.get_submodule(name), w0.shape[1]).cpu() - w0.cpu(),
        )
    return deltas


def delta_ratio(base: nn.Module, tuned: nn.Module) -> float:
    """‖ΔW‖_F / ‖W0‖_F over all block linears together: how far fine-tuning moved the weights."""
    deltas = weight_deltas(base, tuned)
    num = sum(float(d.square().sum()) for _, d in deltas.values())
    den = sum(float(w.square().sum()) for w, _ in deltas.values())
    return (num / den) ** 0.5


@torch.no_grad()
def amplification_factor(w0: torch.Tensor, delta: torch.Tensor, rank: int) -> float:
    """Hu et al. (2021) §7.3: ‖ΔW‖_F / ‖Uᵀ W0 V‖_F, with U, V the top-``rank`` singular vectors of
    ΔW.

    A large factor means ΔW amplifies directions that W0 barely uses (the paper reports ~21.5 for
    GPT-3's W_q at r = 4), rather than repeating W0's own top directions.
    """
    u, _, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    u, v = u[:, :rank], vh[:rank].T
    return float(delta.norm() / (u.T @ w0.float() @ v).norm())


@torch.no_grad()
def subspace_similarity(a: torch.Tensor, b: torch.Tensor, i: int, j: int) -> float:
    """Hu et al. (2021) §7.2, eq. (4): φ(A, B, i, j) = ‖U_Aᵢᵀ U_Bⱼ‖_F² / min(i, j), in [0, 1].

    ``a`` and ``b`` are two updates (or adapter matrices) with the same output space; U_Aᵢ holds the
    top ``i`` left singular vectors of ``a``. 1 means the top directions coincide, 0 that they are
    orthogonal.
    """
    ua = torch.linalg.svd(a.float(), full_matrices=False)[0][:, :i]
    ub = torch.linalg.svd(b.float(), full_matrices=False)[0][:, :j]
    return float((ua.T @ ub).square().sum() / min(i, j))
