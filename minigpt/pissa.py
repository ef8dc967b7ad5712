"""PiSSA from scratch (Meng, Wang & Zhang, 2024, "PiSSA: Principal Singular Values and Singular Vectors
Adaptation of Large Language Models", arXiv:2404.02948).

LoRA starts its adapter at zero and leaves W0 frozen. PiSSA splits the pretrained weight by its SVD
``W = U S Vᵀ`` (section 3) into the principal part, which becomes the trainable adapter, and
the residual, which is frozen:

    A = U[:, :r] S[:r]^½,  B = S[:r]^½ V[:, :r]ᵀ   (paper's notation, W ∈ R^{m×n}),
    W_res = U[:, r:] S[r:] V[:, r:]ᵀ = W − A B.

With our layout (``x @ A @ B``, ``A`` (in, r), ``B`` (r, out)) and a LoRA scaling ``s`` in front of the
adapter, the singular values are divided by ``s`` so that ``s·(A B)ᵀ`` is exactly the top-r part, as PEFT
does. The residual is computed by subtraction so that ``W_res + s·(A B)ᵀ`` reproduces W to float precision.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from minigpt.lora import (LinearWithLoRA, LoRALayer, _check_alpha, _check_bool, _check_dropout, _check_rank,
                          _real_weight, _set_submodule, adapter_layers, register_adapter_method, replace_linear_with_adapter)


def _check_niter(niter: object) -> int | None:
    if niter is None:
        return None
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
        raise ValueError(f"niter must be None (exact SVD) or an integer >= 0 (randomised SVD iterations), "
                         f"got {niter!r}")
    return niter


def pissa_init(weight: torch.Tensor, rank: int, scaling: float = 1.0,
               niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA's split of an ``nn.Linear`` weight (out, in) into ``(A, B, residual)`` (PiSSA section 3).

    Returns float32 ``A`` (in, rank) and ``B`` (rank, out) with ``scaling·(A B)ᵀ`` equal to the best rank-r
    approximation of ``weight``, and ``residual = weight − scaling·(A B)ᵀ`` in ``weight``'s dtype.
    ``niter=None`` uses the exact ``torch.linalg.svd``; ``niter=N`` the randomised ``torch.svd_lowrank``
    with ``q=rank`` and N power iterations (PiSSA's "fast SVD" initialisation), which draws random numbers: seed
    torch (``torch.manual_seed``) beforehand for a reproducible result. The SVD runs in float32 even for
    float16/bfloat16 weights.
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.ndim != 2:
        got = f"{weight.dtype} tensor of shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) \
            else type(weight).__name__
        raise TypeError(f"weight must be a 2-D floating-point tensor (out_features, in_features), got {got}")
    out_features, in_features = weight.shape
    _check_rank(rank, in_features, out_features)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not (math.isfinite(scaling) and scaling > 0):
        raise ValueError(f"scaling must be a positive finite number, got {scaling!r}")
    niter = _check_niter(niter)
    w = weight.detach().float()
    if niter is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        U, S, V = U[:, :rank], S[:rank], Vh[:rank].T
    else:
        U, S, V = torch.svd_lowrank(w, q=rank, niter=niter)
    root = torch.sqrt(S / scaling)
    A = V * root           # (in, r): V diag(√(S/s))
    B = root[:, None] * U.T  # (r, out): diag(√(S/s)) Uᵀ
    residual = (w - scaling * (A @ B).T).to(weight.dtype)
    return A.contiguous(), B.contiguous(), residual


def pissa_to_lora_weights(A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor,
                          B0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A trained PiSSA adapter (A, B) with initial (A0, B0) as a rank-2r LoRA for the ORIGINAL weight.

    ``W_res + s·(AB)ᵀ = W − s·(A0B0)ᵀ + s·(AB)ᵀ = W + s·([A, A0] [B; −B0])ᵀ`` (PiSSA's conversion of a
    trained PiSSA adapter to LoRA), so ``A' = cat([A, A0], dim=1)`` and ``B' = cat([B, −B0], dim=0)`` with the same scaling ``s``.
    """
    return torch.cat([A, A0], dim=1), torch.cat([B, -B0], dim=0)


@register_adapter_method
class LinearWithPiSSA(LinearWithLoRA):
    """A LoRA layer whose adapter starts as the weight's principal rank-r part and whose base is the residual.

    The output at initialisation equals the original layer's to float precision. Caution: after wrapping,
    ``self.linear`` holds the RESIDUAL weight, not the pretrained one; running the base without the adapter
    (or dropping the adapter) is NOT the original model. Use :func:`pissa_to_lora` to get an adapter for the
    original weights. The initial ``A0``/``B0`` are kept as buffers for that conversion. The residual
    replaces ``linear.weight`` with a new Parameter, so a weight tied to another module (e.g. an embedding)
    is untied and that module keeps the original values.
    """

    method = "pissa"

    def __init__(self, linear: nn.Module, rank: int, alpha: float, niter: int | None = None,
                 use_rslora: bool = False, dropout: float = 0.0):
        niter = _check_niter(niter)
        weight = _real_weight(linear, "PiSSA initialisation")
        super().__init__(linear, rank, alpha, dropout=dropout, use_rslora=use_rslora)
        self.niter = niter
        A, B, residual = pissa_init(weight, rank, self.scaling, niter)
        with torch.no_grad():
            self.lora.A.copy_(A)
            self.lora.B.copy_(B)
        linear.weight = nn.Parameter(residual, requires_grad=weight.requires_grad)
        self.register_buffer("A0", A.to(self.lora.A.device).clone())
        self.register_buffer("B0", B.to(self.lora.B.device).clone())

    def adapter_config(self) -> dict:
        return {"method": self.method, "rank": self.rank, "alpha": self.alpha, "niter": self.niter,
                "use_rslora": self.lora.use_rslora, "dropout": self.dropout_p}

    @classmethod
    def expected_adapter_shapes(cls, in_features: int, out_features: int, rank: int) -> dict[str, tuple[int, ...]]:
        return {**super().expected_adapter_shapes(in_features, out_features, rank),
                "A0": (in_features, rank), "B0": (rank, out_features)}

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load A, B, A0, B0; if A0/B0 differ from ours (e.g. a randomised SVD, or a wrapper just rebuilt on the
        original weights), move the residual so that it is again ``W − s·(A0 B0)ᵀ`` for the file's A0, B0."""
        weight = self.linear.weight
        with torch.no_grad():
            old = (self.A0 @ self.B0).T
            new = (tensors["A0"].to(self.A0) @ tensors["B0"].to(self.B0)).T
            weight.add_((self.scaling * (old - new)).to(weight.dtype))
        super().load_adapter_state_dict(tensors)


def replace_linear_with_pissa(model: nn.Module, rank: int, alpha: float,
                              target_modules: str | Iterable[str] | None = None, niter: int | None = None,
                              dropout: float = 0.0, use_rslora: bool = False,
                              exclude: str | Iterable[str] = ("lm_head",), freeze: bool = True) -> nn.Module:
    """Wrap linear layers in :class:`LinearWithPiSSA`, in place (same selection rules as
    :func:`minigpt.lora.replace_linear_with_lora`); returns ``model``. With ``niter`` set, seed torch first."""
    _check_alpha(alpha), _check_dropout(dropout), _check_bool(use_rslora, "use_rslora"), _check_niter(niter)

    def factory(linear: nn.Module) -> LinearWithPiSSA:
        return LinearWithPiSSA(linear, rank, alpha, niter=niter, use_rslora=use_rslora, dropout=dropout)

    return replace_linear_with_adapter(model, factory, rank, target_modules, exclude, freeze)


def pissa_to_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LinearWithPiSSA` by a rank-2r :class:`LinearWithLoRA` on the ORIGINAL weight
    ``W = W_res + s·(A0 B0)ᵀ``, in place; the outputs are unchanged (see :func:`pissa_to_lora_weights`).

    The LoRA layer keeps PiSSA's scaling ``s`` (its alpha is adjusted for the doubled rank). The result can be
    saved with :func:`minigpt.lora.save_adapter` and loaded onto the untouched pretrained model.
    """
    layers = [(name, layer) for name, layer in adapter_layers(model) if isinstance(layer, LinearWithPiSSA)]
    if not layers:
        raise ValueError("model has no LinearWithPiSSA layers to convert; call replace_linear_with_pissa first")
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"PiSSA layers {merged} are merged; call unmerge_lora before pissa_to_lora")
    for name, layer in layers:
        s, rank, rslora = layer.scaling, layer.rank, layer.lora.use_rslora
        linear = layer.linear
        with torch.no_grad():
            linear.weight.add_((s * (layer.A0 @ layer.B0).T).to(linear.weight.dtype))
            A, B = pissa_to_lora_weights(layer.lora.A, layer.lora.B, layer.A0, layer.B0)
        lora = LinearWithLoRA(linear, rank, layer.alpha, dropout=layer.dropout_p, use_rslora=rslora)
        alpha = s * (math.sqrt(2 * rank) if rslora else 2 * rank)  # same scaling at twice the rank
        lora.lora = LoRALayer(layer.in_features, layer.out_features, 2 * rank, alpha, use_rslora=rslora).to(A.device)
        with torch.no_grad():
            lora.lora.A.copy_(A)
            lora.lora.B.copy_(B)
            lora.lora.A.requires_grad_(layer.lora.A.requires_grad)
            lora.lora.B.requires_grad_(layer.lora.B.requires_grad)
        _set_submodule(model, name, lora)
    return model
