"""PiSSA from scratch (Meng, Wang & Zhang, 2024, "PiSSA: Principal Singular Values and Singular
Vectors Adaptation of Large Language Models", arXiv:2404.02948).

LoRA starts its adapter at zero and leaves W0 frozen. PiSSA splits the pretrained weight by its SVD
``W = U S Vᵀ`` (section 3) into the principal part, which becomes the trainable adapter, and the
residual, which is frozen:

    A = U[:, :r] S[:r]^½,  B = S[:r]^½ V[:, :r]ᵀ   (paper's notation, W ∈ R^{m×n}),
    W_res = U[:, r:] S[r:] V[:, r:]ᵀ = W − A B.

With our layout (``x @ A @ B``, ``A`` (in, r), ``B`` (r, out)) and a LoRA scaling ``s`` in front of
the adapter, the singular values are divided by ``s`` so that ``s·(A B)ᵀ`` is exactly the top-r
part, as PEFT does. The residual is computed by subtraction so that ``W_res + s·(A B)ᵀ`` reproduces
W to float precision.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from minigpt._validate import UserError, UserTypeError, check_int
from minigpt.lora import (
    LinearWithLoRA,
    adapter_layers,
    check_lora_args,
    replace_linear_with_adapter,
    set_submodule,
)


def pissa_init(
    weight: torch.Tensor, rank: int, scaling: float = 1.0, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA's split of an ``nn.Linear`` weight (out, in) into ``(A, B, residual)`` (PiSSA section
    3).

    Returns float32 ``A`` (in, rank) and ``B`` (rank, out) with ``scaling·(A B)ᵀ`` equal to the best
    rank-r approximation of ``weight``, and ``residual = weight − scaling·(A B)ᵀ`` in ``weight``'s
    dtype. ``niter=None`` uses the exact ``torch.linalg.svd``; ``niter=N`` the randomised
    ``torch.svd_lowrank`` with ``q=rank`` and N power iterations (PiSSA's "fast SVD"
    initialisation), which draws random numbers: seed torch (``torch.manual_seed``) beforehand for a
    reproducible result. The SVD runs in float32 even for float16/bfloat16 weights.
    """
    if not 1 <= rank <= min(weight.shape):
        raise UserError(
            "PiSSA's rank must be in [1, min(out_features, in_features)] = [1, "
            f"{min(weight.shape)}] "
            f"(the SVD has no more directions), got {rank}"
        )
    w = weight.detach().float()
    if niter is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        U, S, V = U[:, :rank], S[:rank], Vh[:rank].T
    else:
        U, S, V = torch.svd_lowrank(w, q=rank, niter=niter)
    root = torch.sqrt(S / scaling)
    A = V * root  # (in, r): V diag(√(S/s))
    B = root[:, None] * U.T  # (r, out): diag(√(S/s)) Uᵀ
    residual = (w - scaling * (A @ B).T).to(weight.dtype)
    return A.contiguous(), B.contiguous(), residual


def pissa_to_lora_weights(
    A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A trained PiSSA adapter (A, B) with initial (A0, B0) as a rank-2r LoRA for the ORIGINAL
    weight.

    ``W_res + s·(AB)ᵀ = W − s·(A0B0)ᵀ + s·(AB)ᵀ = W + s·([A, A0] [B; −B0])ᵀ`` (PiSSA's conversion of
    a trained PiSSA adapter to LoRA), so ``A' = cat([A, A0], dim=1)`` and ``B' = cat([B, −B0],
    dim=0)`` with the same scaling ``s``.
    """
    return torch.cat([A, A0], dim=1), torch.cat([B, -B0], dim=0)


class LinearWithPiSSA(LinearWithLoRA):
    """A LoRA layer whose adapter starts as the weight's principal rank-r part and whose base is the
    residual.

    The forward is LoRA's; only the start differs. The output at initialisation equals the original
    layer's to float precision. Caution: after wrapping, ``self.linear`` holds the RESIDUAL weight,
    not the pretrained one; running the base without the adapter is NOT the original model. Use
    :func:`pissa_to_lora` to get an adapter for the original weights. The initial ``A0``/``B0`` are
    kept as buffers for that conversion. The residual replaces ``linear.weight`` with a new
    Parameter, so a weight tied to another module (e.g. an embedding) is untied and that module
    keeps the original values.
    """

    def __init__(
        self,
        linear: nn.Module,
        rank: int,
        alpha: float,
        niter: int | None = None,
        use_rslora: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__(linear, rank, alpha, dropout=dropout, use_rslora=use_rslora)
        A, B, residual = pissa_init(linear.weight, rank, self.scaling, niter)
        with torch.no_grad():
            self.lora.A.copy_(A)
            self.lora.B.copy_(B)
        linear.weight = nn.Parameter(residual, requires_grad=linear.weight.requires_grad)
        self.register_buffer("A0", A.to(self.lora.A.device).clone())
        self.register_buffer("B0", B.to(self.lora.B.device).clone())
        self.niter = niter


def check_niter(niter: object) -> int | None:
    """None (exact SVD) or an integer >= 0 (randomised SVD power iterations)."""
    return None if niter is None else check_int("niter", niter, 0)


def check_pissa_target(name: str, linear: nn.Module) -> None:
    """PiSSA rewrites the base weight, so it needs a real ``nn.Parameter`` (not a quantised
    base)."""
    if not isinstance(getattr(linear, "weight", None), nn.Parameter):
        raise UserTypeError(
            f"PiSSA initialisation of {name!r} needs a base layer that stores its weight as an "
            f"nn.Parameter (nn.Linear); {type(linear).__name__} does not (a quantised base cannot "
            "hold "
            "the residual: dequantise it into an nn.Linear first)"
        )


def replace_linear_with_pissa(
    model: nn.Module,
    rank: int,
    alpha: float,
    target_modules: str | Iterable[str] | None = None,
    niter: int | None = None,
    dropout: float = 0.0,
    use_rslora: bool = False,
    exclude: str | Iterable[str] = ("lm_head",),
    freeze: bool = True,
) -> nn.Module:
    """Wrap linear layers in :class:`LinearWithPiSSA`, in place (same selection rules as
    :func:`minigpt.lora.replace_linear_with_lora`); returns ``model``. With ``niter`` set, seed
    torch first. The rank may not exceed min(in_features, out_features) of any selected layer (the
    SVD has no more)."""
    args = check_lora_args(rank, alpha, dropout, use_rslora)
    args.pop("init")
    niter = check_niter(niter)

    def check(name: str, linear: nn.Module) -> None:
        check_pissa_target(name, linear)
        if args["rank"] > min(linear.in_features, linear.out_features):
            raise UserError(
                f"PiSSA's rank must be at most min(in_features, out_features) = "
                f"{min(linear.in_features, linear.out_features)} for layer {name!r}, got "
                f"{args['rank']}"
            )

    return replace_linear_with_adapter(
        model,
        lambda linear: LinearWithPiSSA(linear, **args, niter=niter),
        args["rank"],
        target_modules,
        exclude,
        freeze,
        check=check,
    )


def pissa_to_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LinearWithPiSSA` by a rank-2r :class:`LinearWithLoRA` on the ORIGINAL
    weight ``W = W_res + s·(A0 B0)ᵀ``, in place; the outputs are unchanged (see
    :func:`pissa_to_lora_weights`).

    The LoRA layer keeps PiSSA's scaling ``s`` (its alpha is adjusted for the doubled rank); 2r may
    exceed min(in_features, out_features), which LoRA allows. The result can be saved with
    :func:`minigpt.adapters.save_adapter` and loaded onto the untouched pretrained model.
    """
    layers = [
        (name, layer) for name, layer in adapter_layers(model) if isinstance(layer, LinearWithPiSSA)
    ]
    if not layers:
        raise UserError(
            "model has no LinearWithPiSSA layers to convert; call replace_linear_with_pissa first"
        )
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise UserError(f"PiSSA layers {merged} are merged; call unmerge_lora before pissa_to_lora")
    for name, layer in layers:
        s, rank, rslora = layer.scaling, layer.lora.rank, layer.lora.use_rslora
        linear = layer.linear
        with torch.no_grad():
            linear.weight.add_((s * (layer.A0 @ layer.B0).T).to(linear.weight.dtype))
            A, B = pissa_to_lora_weights(layer.lora.A, layer.lora.B, layer.A0, layer.B0)
        alpha = s * (math.sqrt(2 * rank) if rslora else 2 * rank)  # same scaling at twice the rank
        lora = LinearWithLoRA(
            linear, 2 * rank, alpha, dropout=getattr(layer.dropout, "p", 0.0), use_rslora=rslora
        )
        with torch.no_grad():
            lora.lora.A.copy_(A)
            lora.lora.B.copy_(B)
        lora.lora.A.requires_grad_(layer.lora.A.requires_grad)
        lora.lora.B.requires_grad_(layer.lora.B.requires_grad)
        set_submodule(model, name, lora)
    return model
