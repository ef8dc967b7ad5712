"""Measuring what fine-tuning changed: effective weights, ‖ΔW‖/‖W0‖, LoRA's amplification and
subspaces, and DoRA's magnitude and direction changes.

Every adapter in the course (LoRA, PiSSA, DoRA) is a module that maps ``x`` to ``x W_effᵀ + b``; its
effective weight is read off by feeding it the identity (:func:`effective_weight`), the same way for
every method, so full fine-tuning and the adapters are measured with one ruler.
"""

from __future__ import annotations

import math
import re

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


# The attention projections of the blocks: ``blocks.<layer>.attn.<matrix>`` (minigpt.model).
_ATTENTION_LINEAR = re.compile(r"blocks\.(\d+)\.attn\.(\w+)")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0 .. n-1 of a 1-D tensor, tied values sharing their mean rank."""
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[x.argsort()] = torch.arange(len(x), dtype=torch.float64)
    _, group = torch.unique(x, return_inverse=True)
    total = torch.zeros(int(group.max()) + 1, dtype=torch.float64).index_add_(0, group, ranks)
    return (total / torch.bincount(group).double())[group]


def _rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman's rank correlation of two 1-D tensors (None when either is constant)."""
    if len(a) < 2 or bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return None
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@torch.no_grad()
def row_changes(w0: torch.Tensor, wt: torch.Tensor, n_head: int = 1) -> dict:
    """DoRA's magnitude and direction changes (Liu et al., 2024, §3.2, eqs. (3)-(4)) of one
    ``(out, in)`` weight, per output row (the magnitude of ``nn.Linear``'s weight is the norm of a
    row, as in PEFT), computed in float64. With ``Δw = w_t − w_0`` per row:

    - ``dM``: mean over rows of ``|‖w_t‖ − ‖w_0‖|``; ``dD``: mean over rows of
      ``1 − cos(w_t, w_0)``;
    - ``radial``: mean over rows of ``|⟨Δw, ŵ_0⟩| / ‖Δw‖``, the share of the update along its
      row (:func:`random_radial_share` for a random direction);
    - ``radial_change``: mean over rows of ``⟨Δw, ŵ_0⟩``, the first-order change of the norms;
    - ``row_norm``: mean ``‖w_0‖``; ``in_features``: the rows' length;
    - ``head_dM``, ``head_dD``: ``dM`` and ``dD`` over each head's rows (``n_head`` groups of
      consecutive rows, as the attention splits its output);
    - ``row_corr``: Spearman's correlation across rows of ``|Δm|`` and ``1 − cos`` (None when
      undefined), the per-row relation §4.2's gradient argument is about.
    """
    w0, wt = w0.detach().double().cpu(), wt.detach().double().cpu()
    delta = wt - w0
    m0, mt = w0.norm(dim=1), wt.norm(dim=1)
    unit0, unit_t = w0 / m0[:, None], wt / mt[:, None]
    dm = (mt - m0).abs()
    dd = 0.5 * (unit_t - unit0).square().sum(dim=1)  # = 1 − cos, without cancellation
    along = (delta * unit0).sum(dim=1)
    size = delta.norm(dim=1)
    moved = size > 0
    radial = float((along[moved].abs() / size[moved]).mean()) if bool(moved.any()) else 0.0
    out = w0.shape[0]
    heads = n_head if n_head >= 1 and out % n_head == 0 else 1
    return {
        "dM": float(dm.mean()),
        "dD": float(dd.mean()),
        "radial": radial,
        "radial_change": float(along.mean()),
        "row_norm": float(m0.mean()),
        "in_features": int(w0.shape[1]),
        "head_dM": [float(v) for v in dm.view(heads, -1).mean(dim=1)],
        "head_dD": [float(v) for v in dd.view(heads, -1).mean(dim=1)],
        "row_corr": _rank_correlation(dm, dd),
    }


@torch.no_grad()
def magnitude_direction_points(
    base: nn.Module, tuned: nn.Module, step: int, matrices: tuple[str, ...] = ("query", "value")
) -> list[dict]:
    """One point per (matrix, layer) of the attention projections named in ``matrices``: DoRA's
    analysis (Liu et al., 2024, §3.2, figure 2) of ``tuned`` against ``base`` at checkpoint
    ``step``.

    Each point holds ``step``, ``matrix``, ``layer`` and the keys of :func:`row_changes` (``dM``,
    ``dD``, ``radial``, ``radial_change``, ``row_norm``, ``in_features``, ``head_dM``, ``head_dD``,
    ``row_corr``). The tuned weight is read with :func:`effective_weight` (float32, autocast off),
    so full fine-tuning, LoRA and DoRA are measured alike; ``base`` holds plain ``nn.Linear``
    layers. A few milliseconds for the course's model: the lab calls it at every checkpoint.
    """
    points = []
    for name, module in base.named_modules():
        match = _ATTENTION_LINEAR.fullmatch(name)
        if match is None or match.group(2) not in matrices or not isinstance(module, nn.Linear):
            continue
        n_head = getattr(base.get_submodule(name.rsplit(".", 1)[0]), "n_head", 1)
        layer = tuned.get_submodule(name)
        device = next(layer.parameters()).device
        with torch.autocast(device.type, enabled=False):
            wt = effective_weight(layer, module.in_features)
        point = {"step": int(step), "matrix": match.group(2), "layer": int(match.group(1))}
        points.append({**point, **row_changes(module.weight, wt, n_head)})
    order = {matrix: i for i, matrix in enumerate(matrices)}
    return sorted(points, key=lambda p: (order[p["matrix"]], p["layer"]))


def random_radial_share(in_features: int) -> float:
    """E|⟨u, e⟩| for a uniformly random unit vector ``u`` in ``in_features`` dimensions and a
    fixed unit ``e``: Γ(n/2) / (√π Γ((n+1)/2)) ≈ √(2/(π n)), the radial share of an update with
    no preference for the row's own direction."""
    n = in_features
    return math.exp(math.lgamma(n / 2) - math.lgamma((n + 1) / 2)) / math.sqrt(math.pi)
