"""LoRA from scratch (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685) and its rank-stabilised scaling rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732).

A frozen linear layer ``h = W0 x`` gets a trainable low-rank update (LoRA eq. (3)):

    h = W0 x + ΔW x = W0 x + (α/r) · B A x,

with ``A`` of rank ``r`` and ``B = 0`` at the start, so training starts from the pretrained model.
The ``α/r`` factor is LoRA section 4.1's scaling; rsLoRA replaces it by ``α/√r`` so that the update
keeps its size as the rank grows. Our matrices are stored for ``x @ A @ B`` (row vectors, as in
Raschka's "Build a Large Language Model (From Scratch)", appendix E): ``A`` is ``(in_dim, rank)``
and ``B`` is ``(rank, out_dim)``, i.e. the transposes of the paper's / PEFT's ``A`` (r × k) and
``B`` (d × r).

The module reads top to bottom: the two taught classes first, then the model-wide helpers (wrap,
freeze, merge) with the argument checks of those public entry points. PiSSA (:mod:`minigpt.pissa`)
and DoRA (:mod:`minigpt.dora`) subclass :class:`LinearWithLoRA`; adapter files live in
:mod:`minigpt.adapters`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from minigpt._validate import UserError, UserTypeError, check_choice, check_float, check_int
from minigpt._validate import check_flag as _check_flag

INITS = ("kaiming", "gaussian")


class LoRALayer(nn.Module):
    """The low-rank update alone: ``x -> scaling · x A B`` (LoRA eq. (3), ΔW x = B A x, transposed).

    ``A`` (in_dim × rank) starts random and ``B`` (rank × out_dim) at zero, so ΔW = 0 and the
    wrapped model is unchanged before the first step (LoRA section 4.1). ``scaling = alpha / rank``
    (section 4.1), or ``alpha / sqrt(rank)`` with ``use_rslora`` (rsLoRA). Raschka's repository
    (LLMs-from-scratch, appendix E) also divides by the rank since September 2025; the printed book
    multiplied by ``alpha`` alone, so the book's alpha values are not interchangeable with PEFT's or
    ours.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        use_rslora: bool = False,
        init: str = "kaiming",
    ):
        super().__init__()
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.init = check_init(init)
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        with torch.no_grad():
            if init == "kaiming":  # PEFT's default: kaiming_uniform_(a=√5), U(±1/√in_dim)
                self.A.uniform_(-1 / math.sqrt(in_dim), 1 / math.sqrt(in_dim))
            else:  # the paper's Gaussian A, std 1/rank (PEFT's init_lora_weights="gaussian")
                self.A.normal_(0.0, 1 / rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BEGIN SOLUTION hint: multiply x by A, scale by self.scaling, then multiply by B
        return (self.scaling * (x @ self.A)) @ self.B  # scaling the rank-r middle: fewer numbers
        # END SOLUTION

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.A.shape[0]}, out_dim={self.B.shape[1]}, rank={self.rank}, "
            f"alpha={self.alpha:g}, scaling={self.scaling:g}"
        )


class LinearWithLoRA(nn.Module):
    """A frozen linear layer plus a LoRA update: ``linear(x) + lora(dropout(x))`` (LoRA eq. (3)).

    Dropout acts on the adapter's input only, as in PEFT. After :meth:`merge` the update lives in
    ``linear.weight`` and the forward is ``linear(x)``. Everything but ``linear`` is the adapter:
    what trains and what an adapter file holds.
    """

    def __init__(
        self,
        linear: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
    ):
        super().__init__()
        check_wrappable(linear)
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.lora = LoRALayer(self.in_features, self.out_features, rank, alpha, use_rslora, init)
        self.lora.to(linear.weight.device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def scaling(self) -> float:
        return self.lora.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if self.merged:
            return out
        # adapters stay float32 on a bf16 base (as in PEFT): compute in theirs, add in the base's
        return out + self.lora(self.dropout(x.to(self.lora.A.dtype))).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in ``nn.Linear``'s (out_features, in_features) layout: ``scaling · (A B)ᵀ``."""
        return self.scaling * (self.lora.A @ self.lora.B).T

    # LoRA section 4.1, "no additional inference latency": store W = W0 + ΔW
    def merge(self) -> None:
        check_mergeable(self, merged=False)
        with torch.no_grad():
            self.linear.weight += self.delta_weight().to(self.linear.weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        check_mergeable(self, merged=True)
        with torch.no_grad():
            self.linear.weight -= self.delta_weight().to(self.linear.weight.dtype)
        self.merged = False


def check_wrappable(linear: nn.Module) -> None:
    """A wrapper around a wrapper would leave the inner adapter out of merges and adapter files."""
    if isinstance(linear, LinearWithLoRA):
        raise UserTypeError(
            "linear already has an adapter: a wrapper around a wrapper would leave the inner "
            "adapter out of merges and adapter files; wrap the plain layer (.linear) instead"
        )


def method_name(layer: LinearWithLoRA) -> str:
    """``lora``, ``pissa`` or ``dora``: the wrapper's method, from its class name."""
    return type(layer).__name__.removeprefix("LinearWith").lower()


def check_mergeable(layer: LinearWithLoRA, merged: bool, name: str = "layer") -> None:
    """Refuse what would silently give a wrong weight: merging twice, unmerging what is not merged,
    or merging into a base that does not store its weight (a quantised layer)."""
    if layer.merged != merged:
        raise UserError(
            f"{name}: the adapter is already merged (merging twice adds the update twice); "
            "call unmerge first"
            if layer.merged
            else f"{name}: the adapter is not merged; nothing to unmerge"
        )
    if not isinstance(getattr(layer.linear, "weight", None), nn.Parameter):
        raise UserTypeError(
            f"{name}: merge needs a base layer that stores its weight as an nn.Parameter "
            f"(nn.Linear); {type(layer.linear).__name__} does not (a quantised base cannot absorb "
            "the update: keep the adapter separate, or dequantise the base into an nn.Linear first)"
        )


def adapter_parameters(layer: LinearWithLoRA) -> list[nn.Parameter]:
    """The parameters fine-tuning trains: every parameter of the wrapper except its frozen
    ``linear``."""
    return [p for name, p in layer.named_parameters() if not name.startswith("linear.")]


def adapter_tensors(layer: LinearWithLoRA) -> dict[str, torch.Tensor]:
    """What an adapter file stores for one wrapper: its state dict without ``linear.*`` (``lora.A``,
    ``lora.B``, and PiSSA's ``A0``/``B0`` or DoRA's ``magnitude``)."""
    return {
        key: value for key, value in layer.state_dict().items() if not key.startswith("linear.")
    }


# ----------------------------------------------------------------------------- argument checks
# (entry points)


def check_rank(rank: Any, name: str = "rank") -> int:
    """A rank is an integer >= 1 (numpy integers too). A rank above min(in, out) is allowed: it only
    adds redundant directions (and PiSSA adapters converted to LoRA have rank 2r)."""
    return check_int(name, rank, 1)


def check_number(
    value: Any, name: str, low: float = 0.0, high: float = math.inf, high_open: bool = False
) -> float:
    """A real number (numpy scalars too) with ``low < value <= high`` (``< high`` with
    ``high_open``)."""
    maximum = None if math.isinf(high) else high
    return check_float(name, value, low, maximum, strict_min=True, strict_max=high_open)


def check_dropout(dropout: Any) -> float:
    """A dropout probability in [0, 1)."""
    return check_float("dropout", dropout, 0.0, 1.0, strict_max=True)


def check_flag(value: Any, name: str) -> bool:
    return _check_flag(name, value)


def check_init(init: Any) -> str:
    return check_choice("init", init, INITS)


def check_lora_args(
    rank: Any, alpha: Any, dropout: Any = 0.0, use_rslora: Any = False, init: Any = "kaiming"
) -> dict[str, Any]:
    """The checked, plain-Python constructor arguments of a LoRA wrapper (numpy scalars become
    int/float)."""
    return dict(
        rank=check_rank(rank),
        alpha=check_number(alpha, "alpha"),
        dropout=check_dropout(dropout),
        use_rslora=check_flag(use_rslora, "use_rslora"),
        init=check_init(init),
    )


def _check_names(names: Any, arg: str) -> tuple[str, ...]:
    if isinstance(names, str):
        names = (names,)
    if isinstance(names, Iterable):
        names = tuple(names)
        if names and all(isinstance(n, str) and n for n in names):
            return names
    raise UserTypeError(
        f"{arg} must be a module name (str) or a non-empty list of non-empty names, got {names!r}"
    )


# ----------------------------------------------------------------------------- model traversal


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int)
    )


def named_targets(module: nn.Module, prefix: str = "") -> Iterable[tuple[str, nn.Module]]:
    """Like ``named_modules`` but without the root and without looking inside adapter wrappers
    (their ``.linear`` is not a separate target)."""
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        yield full, child
        if not isinstance(child, LinearWithLoRA):
            yield from named_targets(child, full)


def _matches(name: str, target: str) -> bool:
    """PEFT's rule: a target matches a module whose qualified name is the target or ends with
    '.target'."""
    return name == target or name.endswith("." + target)


def adapter_layers(model: nn.Module) -> list[tuple[str, LinearWithLoRA]]:
    """``(qualified name, wrapper)`` for every LoRA / PiSSA / DoRA layer in ``model``."""
    return [(name, m) for name, m in named_targets(model) if isinstance(m, LinearWithLoRA)]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child_name, module)


def select_targets(
    model: nn.Module,
    target_modules: str | Iterable[str] | None,
    exclude: str | Iterable[str] = ("lm_head",),
) -> list[tuple[str, nn.Module]]:
    """The ``(name, linear)`` pairs ``replace_linear_with_*`` would wrap; refuses already-wrapped
    layers."""
    modules = list(named_targets(model))
    linear_names = [
        n for n, m in modules if is_linear_like(m) and not isinstance(m, LinearWithLoRA)
    ]
    exclude = _check_names(exclude, "exclude") if exclude else ()
    if target_modules is None:
        selected = [
            (n, m)
            for n, m in modules
            if is_linear_like(m) and not any(_matches(n, e) for e in exclude)
        ]
        if not selected:
            raise UserError(
                f"target_modules=None selects every linear layer not in exclude={exclude}, but the "
                f"model has none; linear layers: {linear_names}"
            )
    else:
        selected = []
        for target in _check_names(target_modules, "target_modules"):
            hits = [(n, m) for n, m in modules if _matches(n, target)]
            if not hits:
                raise UserError(
                    f"target_modules entry {target!r} matches no module; the model's linear layers "
                    f"are {linear_names}"
                )
            for n, m in hits:
                if not is_linear_like(m):
                    raise UserTypeError(
                        f"target_modules entry {target!r} matches {n!r}, a {type(m).__name__}; "
                        f"targets must be linear layers, one of {linear_names}"
                    )
            selected += [hit for hit in hits if hit[0] not in {n for n, _ in selected}]
    for n, m in selected:
        if isinstance(m, LinearWithLoRA):
            raise UserError(
                f"layer {n!r} already has a {method_name(m)} adapter; wrapping it again is not "
                "supported (target_modules must name plain linear layers)"
            )
    return selected


def replace_linear_with_adapter(
    model: nn.Module,
    factory: Callable[[nn.Module], LinearWithLoRA],
    rank: int,
    target_modules: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] = ("lm_head",),
    freeze: bool = True,
    check: Callable[[str, nn.Module], None] | None = None,
) -> nn.Module:
    """The traversal shared by LoRA, PiSSA and DoRA: wrap each selected layer as
    ``factory(linear)``.

    Everything is checked (targets, and ``check(name, linear)`` for each selected layer) before the
    first layer is touched, so a bad argument never leaves a half-converted model.
    """
    check_flag(freeze, "freeze")
    selected = select_targets(model, target_modules, exclude)
    for name, linear in selected:
        if check is not None:
            check(name, linear)
        if rank > min(linear.in_features, linear.out_features):
            warnings.warn(
                f"rank {rank} exceeds min(in_features, out_features) = "
                f"{min(linear.in_features, linear.out_features)} for layer {name!r}: the extra "
                "directions are redundant (allowed, as in PEFT)",
                stacklevel=3,
            )
    shared = _shared_parameter_ids(model)
    for name, linear in selected:
        if id(getattr(linear, "weight", None)) in shared:
            warnings.warn(
                f"{name}.weight is shared with another module (tied weights); merging an adapter "
                "into "
                "it changes that module too",
                stacklevel=3,
            )
        set_submodule(model, name, factory(linear))
    if freeze:
        mark_only_lora_as_trainable(model)
    return model


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, count in seen.items() if count > 1}


def replace_linear_with_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    target_modules: str | Iterable[str] | None = None,
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str = "kaiming",
    exclude: str | Iterable[str] = ("lm_head",),
    freeze: bool = True,
) -> nn.Module:
    """Wrap linear layers of ``model`` in :class:`LinearWithLoRA`, in place; returns ``model``.

    ``target_modules=None`` wraps every linear layer except those matching ``exclude`` (by default
    the output head ``lm_head``, like PEFT's ``"all-linear"``, which skips the output layer; in our
    GPT it is also tied to the token embedding). Otherwise each name matches a module whose
    qualified name equals it or ends with ``"." + name`` (PEFT's rule), e.g. ``["query", "value"]``
    for LoRA's paper setting (section 7.1); ``exclude`` only applies to ``target_modules=None``.
    ``freeze=True`` sets ``requires_grad=False`` on every parameter that is not an adapter
    parameter.
    """
    args = check_lora_args(rank, alpha, dropout, use_rslora, init)
    return replace_linear_with_adapter(
        model,
        lambda linear: LinearWithLoRA(linear, **args),
        args["rank"],
        target_modules,
        exclude,
        freeze,
    )


# ----------------------------------------------------------------------------- trainability


def mark_only_lora_as_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter, then unfreeze the adapters' (A, B, and DoRA's magnitude)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in adapter_layers(model):
        for p in adapter_parameters(layer):
            p.requires_grad_(True)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; tied parameters count once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_summary(model: nn.Module) -> str:
    """E.g. ``"trainable 12,288 / 1,000,000 (1.23 %)"``."""
    trainable, total = count_parameters(model)
    return f"trainable {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.2f} %)"


# ----------------------------------------------------------------------------- merge / unmerge


def layers_or_raise(model: nn.Module) -> list[tuple[str, LinearWithLoRA]]:
    layers = adapter_layers(model)
    if not layers:
        raise UserError(
            "model has no adapter layers (LinearWithLoRA / PiSSA / DoRA); "
            "call replace_linear_with_lora first"
        )
    return layers


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (each wrapper's own ``merge()``: LoRA, PiSSA or
    DoRA)."""
    layers = layers_or_raise(model)
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise UserError(f"adapters already merged in {merged}; call unmerge_lora first")
    for name, layer in layers:
        check_mergeable(layer, merged=False, name=name)
    for _, layer in layers:
        layer.merge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter (unless merged already) and put each plain base layer back in its
    wrapper's place.

    The result has the base model's modules and cost (LoRA section 4.1: no added inference latency;
    PEFT's ``merge_and_unload``); the adapters are gone, so unlike :func:`merge_lora` this cannot be
    undone.
    """
    layers = layers_or_raise(model)
    for name, layer in layers:
        if not layer.merged:
            check_mergeable(layer, merged=False, name=name)
    for name, layer in layers:
        if not layer.merged:
            layer.merge()
        set_submodule(model, name, layer.linear)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora`, restoring the base weights (to float precision)."""
    layers = layers_or_raise(model)
    unmerged = [name for name, layer in layers if not layer.merged]
    if unmerged:
        raise UserError(f"adapters not merged in {unmerged}; call merge_lora first")
    for name, layer in layers:
        check_mergeable(layer, merged=True, name=name)
    for _, layer in layers:
        layer.unmerge()
    return model
