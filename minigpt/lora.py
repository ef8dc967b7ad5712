"""LoRA from scratch (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685)
and its rank-stabilised scaling rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732).

A frozen linear layer ``h = W0 x`` gets a trainable low-rank update (LoRA eq. (3)):

    h = W0 x + ΔW x = W0 x + (α/r) · B A x,

with ``A`` of rank ``r`` and ``B = 0`` at the start, so training starts from the pretrained model. The
``α/r`` factor is LoRA section 4.1's scaling; rsLoRA replaces it by ``α/√r`` so that the update keeps its
size as the rank grows. Our matrices are stored for ``x @ A @ B`` (row vectors, as in Raschka's
"Build a Large Language Model (From Scratch)", appendix E): ``A`` is ``(in_dim, rank)`` and ``B`` is
``(rank, out_dim)``, i.e. the transposes of the paper's / PEFT's ``A`` (r × k) and ``B`` (d × r).

The same wrapper class, traversal, merge and adapter file serve PiSSA (:mod:`minigpt.pissa`) and DoRA
(:mod:`minigpt.dora`): they subclass :class:`LinearWithLoRA` and register themselves in ``ADAPTER_METHODS``.
"""

from __future__ import annotations

import importlib
import json
import math
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from minigpt.io import atomic_save_file, read_safetensors

ADAPTER_FORMAT = "minigpt-adapter/1"
INITS = ("kaiming", "gaussian")


# ----------------------------------------------------------------------------- argument checks

def _check_rank(rank: Any, in_features: int | None = None, out_features: int | None = None,
                where: str = "") -> int:
    if in_features is None or out_features is None:
        allowed = "a positive integer (>= 1)"
    else:
        limit = min(in_features, out_features)
        allowed = f"an integer in [1, min(in_features, out_features)] = [1, {limit}]"
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be {allowed}{where}, got {type(rank).__name__} {rank!r}")
    if rank < 1 or (in_features is not None and out_features is not None and rank > min(in_features, out_features)):
        raise ValueError(f"rank must be {allowed}{where}, got {rank}")
    return rank


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a positive finite number, got {type(alpha).__name__} {alpha!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number (> 0), got {alpha}")
    return float(alpha)


def _check_dropout(dropout: Any) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"dropout must be a number in [0, 1), got {type(dropout).__name__} {dropout!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout}")
    return float(dropout)


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def _check_init(init: Any) -> str:
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    return init


def _check_names(names: Any, arg: str) -> tuple[str, ...]:
    if isinstance(names, str):
        names = (names,)
    if isinstance(names, Iterable):
        names = tuple(names)
        if names and all(isinstance(n, str) and n for n in names):
            return names
    raise TypeError(f"{arg} must be a module name (str) or a non-empty list of non-empty names, got {names!r}")


def _features(linear: nn.Module) -> tuple[int, int]:
    in_features, out_features = getattr(linear, "in_features", None), getattr(linear, "out_features", None)
    if not isinstance(linear, nn.Module) or not isinstance(in_features, int) or not isinstance(out_features, int):
        raise TypeError("linear must be an nn.Module with integer in_features and out_features (nn.Linear or "
                        f"minigpt.quant.QuantizedLinear), got {type(linear).__name__}")
    return in_features, out_features


def _real_weight(linear: nn.Module, purpose: str) -> nn.Parameter:
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise TypeError(f"{purpose} needs a base layer that stores its weight as an nn.Parameter (nn.Linear); "
                        f"{type(linear).__name__} does not (a quantised base cannot absorb the update: keep the "
                        "adapter separate, or dequantise the base into an nn.Linear first)")
    return weight


# ----------------------------------------------------------------------------- the layers

class LoRALayer(nn.Module):
    """The low-rank update alone: ``x -> scaling · x A B`` (LoRA eq. (3), ΔW x = B A x, transposed).

    ``A`` (in_dim × rank) starts random and ``B`` (rank × out_dim) starts at zero, so ΔW = 0 and the
    wrapped model is unchanged before the first step (LoRA section 4.1); gradients still reach ``B``
    because ``x A`` is non-zero. ``init="kaiming"`` matches PEFT's default (``kaiming_uniform_(a=√5)`` on
    an ``nn.Linear(in_dim, rank)``, i.e. U(-1/√in_dim, 1/√in_dim)); the bound is computed from ``in_dim``
    explicitly because torch would take our ``A``'s fan-in to be ``rank``. ``init="gaussian"`` is the paper's
    random Gaussian A with std 1/rank (PEFT's ``init_lora_weights="gaussian"``).

    ``scaling = alpha / rank`` (LoRA section 4.1) or ``alpha / sqrt(rank)`` with ``use_rslora``
    (rsLoRA, Kalajdzievski 2023). Raschka's appendix E multiplies by ``alpha`` alone (no ``/rank``),
    so its alpha values are not interchangeable with PEFT's or ours.
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, use_rslora: bool = False,
                 init: str = "kaiming"):
        super().__init__()
        _check_rank(rank)
        self.rank, self.alpha = rank, _check_alpha(alpha)
        self.use_rslora = _check_bool(use_rslora, "use_rslora")
        self.init = _check_init(init)
        self.scaling = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        with torch.no_grad():
            if init == "kaiming":
                bound = 1.0 / math.sqrt(in_dim)
                self.A.uniform_(-bound, bound)
            else:
                self.A.normal_(0.0, 1.0 / rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BEGIN SOLUTION hint: multiply x by A, then by B, and scale the result by self.scaling
        return self.scaling * (x @ self.A @ self.B)
        # END SOLUTION

    def extra_repr(self) -> str:
        return (f"in_dim={self.A.shape[0]}, out_dim={self.B.shape[1]}, rank={self.rank}, alpha={self.alpha:g}, "
                f"scaling={self.scaling:g}, use_rslora={self.use_rslora}")


class LinearWithLoRA(nn.Module):
    """A frozen linear layer plus a LoRA update: ``linear(x) + lora(dropout(x))`` (LoRA eq. (3)).

    ``linear`` may be any module with ``in_features``/``out_features`` that maps ``x -> W0 x + b``
    (``nn.Linear`` or ``minigpt.quant.QuantizedLinear``); only merging needs a real ``weight`` Parameter.
    Dropout acts on the adapter's input only, as in PEFT. After :meth:`merge` the update lives in
    ``linear.weight`` and ``forward`` is just ``linear(x)``.

    Subclasses (PiSSA, DoRA) override ``method``, ``expected_adapter_shapes``, ``adapter_parameters`` and the
    merge maths; the traversal, checkpoint and trainability helpers below only use this interface.
    """

    method = "lora"

    def __init__(self, linear: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 init: str = "kaiming"):
        super().__init__()
        self.in_features, self.out_features = _features(linear)
        _check_rank(rank, self.in_features, self.out_features)
        self.dropout_p = _check_dropout(dropout)
        self.linear = linear
        self.lora = LoRALayer(self.in_features, self.out_features, rank, alpha, use_rslora, init)
        weight = getattr(linear, "weight", None)
        if isinstance(weight, torch.Tensor):
            self.lora.to(weight.device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def rank(self) -> int:
        return self.lora.rank

    @property
    def alpha(self) -> float:
        return self.lora.alpha

    @property
    def scaling(self) -> float:
        return self.lora.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.linear(x)
        out = self.linear(x)
        # adapters stay float32 on a float16/bfloat16 base (as in PEFT): compute in theirs, add in the base's
        return out + self.lora(self.dropout(x.to(self.lora.A.dtype))).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in ``nn.Linear``'s (out_features, in_features) layout: ``scaling · (A B)ᵀ``."""
        return self.scaling * (self.lora.A @ self.lora.B).T

    # -- merging (LoRA section 4.1, "no additional inference latency": store W = W0 + BA)
    def merge(self) -> None:
        """``W <- W + scaling·(A B)ᵀ`` in place; the forward becomes ``linear(x)``."""
        weight = self._check_can_merge()
        with torch.no_grad():
            weight.add_(self.delta_weight().to(weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge`: ``W <- W - scaling·(A B)ᵀ``."""
        weight = self._check_can_unmerge()
        with torch.no_grad():
            weight.sub_(self.delta_weight().to(weight.dtype))
        self.merged = False

    def _check_can_merge(self) -> nn.Parameter:
        if self.merged:
            raise ValueError("this layer's adapter is already merged into its weight; call unmerge first "
                             "(merging twice would add the update twice)")
        return _real_weight(self.linear, "merge")

    def _check_can_unmerge(self) -> nn.Parameter:
        if not self.merged:
            raise ValueError("this layer's adapter is not merged; nothing to unmerge (call merge first)")
        return _real_weight(self.linear, "unmerge")

    # -- the adapter-file interface
    def adapter_parameters(self) -> list[nn.Parameter]:
        """The parameters fine-tuning trains (everything else in the model stays frozen)."""
        return [self.lora.A, self.lora.B]

    def adapter_config(self) -> dict[str, Any]:
        """The constructor arguments, so that :func:`load_adapter` can rebuild this wrapper."""
        return {"method": self.method, "rank": self.rank, "alpha": self.alpha, "dropout": self.dropout_p,
                "use_rslora": self.lora.use_rslora, "init": self.lora.init}

    @classmethod
    def expected_adapter_shapes(cls, in_features: int, out_features: int, rank: int) -> dict[str, tuple[int, ...]]:
        return {"lora.A": (in_features, rank), "lora.B": (rank, out_features)}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter tensors keyed by their name inside this wrapper (``lora.A``, ``lora.B``, ...)."""
        state = self.state_dict()
        return {key: state[key] for key in self.expected_adapter_shapes(self.in_features, self.out_features,
                                                                        self.rank)}

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        state = self.state_dict()
        with torch.no_grad():
            for key, value in tensors.items():
                state[key].copy_(value)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, merged={self.merged}, dropout={self.dropout_p:g}"


ADAPTER_METHODS: dict[str, type[LinearWithLoRA]] = {"lora": LinearWithLoRA}


def register_adapter_method(cls: type[LinearWithLoRA]) -> type[LinearWithLoRA]:
    """Make ``cls.method`` known to :func:`load_adapter` (used as a class decorator by pissa/dora).

    Only classes defined in the ``minigpt`` package register: a notebook's copy of the class (a teaching
    cell, or a student's stub) must not replace the package's for the rest of the process.
    """
    if cls.__module__.startswith("minigpt."):
        ADAPTER_METHODS[cls.method] = cls
    return cls


# ----------------------------------------------------------------------------- model traversal

def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(getattr(module, "in_features", None), int)
                                             and isinstance(getattr(module, "out_features", None), int))


def _named_modules(module: nn.Module, prefix: str = "") -> Iterable[tuple[str, nn.Module]]:
    """Like ``named_modules`` but without the root and without looking inside adapter wrappers
    (their ``.linear`` is not a separate target)."""
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        yield full, child
        if not isinstance(child, LinearWithLoRA):
            yield from _named_modules(child, full)


def _matches(name: str, target: str) -> bool:
    """PEFT's rule: a target matches a module whose qualified name is the target or ends with '.target'."""
    return name == target or name.endswith("." + target)


def adapter_layers(model: nn.Module) -> list[tuple[str, LinearWithLoRA]]:
    """``(qualified name, wrapper)`` for every LoRA / PiSSA / DoRA layer in ``model``."""
    return [(name, m) for name, m in _named_modules(model) if isinstance(m, LinearWithLoRA)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child_name, module)


def _select_targets(model: nn.Module, target_modules: str | Iterable[str] | None,
                    exclude: str | Iterable[str]) -> list[tuple[str, nn.Module]]:
    modules = list(_named_modules(model))
    linear_names = [n for n, m in modules if _is_linear_like(m) and not isinstance(m, LinearWithLoRA)]
    exclude = _check_names(exclude, "exclude") if exclude else ()
    if target_modules is None:
        selected = [(n, m) for n, m in modules
                    if _is_linear_like(m) and not any(_matches(n, e) for e in exclude)]
        if not selected:
            raise ValueError(f"target_modules=None selects every linear layer not in exclude={exclude}, but the "
                             f"model has none; linear layers: {linear_names}")
    else:
        selected = []
        for target in _check_names(target_modules, "target_modules"):
            hits = [(n, m) for n, m in modules if _matches(n, target)]
            if not hits:
                raise ValueError(f"target_modules entry {target!r} matches no module; the model's linear layers "
                                 f"are {linear_names}")
            for n, m in hits:
                if not _is_linear_like(m):
                    raise TypeError(f"target_modules entry {target!r} matches {n!r}, a {type(m).__name__}; "
                                    f"targets must be linear layers, one of {linear_names}")
            selected += [hit for hit in hits if hit[0] not in {n for n, _ in selected}]
    for n, m in selected:
        if isinstance(m, LinearWithLoRA):
            raise ValueError(f"layer {n!r} already has a {m.method} adapter; wrapping it again is not supported "
                             "(target_modules must name plain linear layers)")
    return selected


def replace_linear_with_adapter(model: nn.Module, factory: Callable[[nn.Module], LinearWithLoRA], rank: int,
                                target_modules: str | Iterable[str] | None = None,
                                exclude: str | Iterable[str] = ("lm_head",), freeze: bool = True) -> nn.Module:
    """The traversal shared by LoRA, PiSSA and DoRA: wrap each selected layer as ``factory(linear)``.

    Everything is checked (targets, rank against every selected layer) before the first layer is touched,
    so a bad argument never leaves a half-converted model.
    """
    _check_bool(freeze, "freeze")
    _check_rank(rank)
    selected = _select_targets(model, target_modules, exclude)
    for name, linear in selected:
        _check_rank(rank, linear.in_features, linear.out_features, where=f" for layer {name!r}")
    shared = _shared_parameter_ids(model)
    for name, linear in selected:
        if id(getattr(linear, "weight", None)) in shared:
            warnings.warn(f"{name}.weight is shared with another module (tied weights); merging an adapter into "
                          "it changes that module too", stacklevel=3)
        _set_submodule(model, name, factory(linear))
    if freeze:
        mark_only_lora_as_trainable(model)
    return model


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, count in seen.items() if count > 1}


def replace_linear_with_lora(model: nn.Module, rank: int, alpha: float,
                             target_modules: str | Iterable[str] | None = None, dropout: float = 0.0,
                             use_rslora: bool = False, init: str = "kaiming",
                             exclude: str | Iterable[str] = ("lm_head",), freeze: bool = True) -> nn.Module:
    """Wrap linear layers of ``model`` in :class:`LinearWithLoRA`, in place; returns ``model``.

    ``target_modules=None`` wraps every linear layer except those matching ``exclude`` (by default the
    output head ``lm_head``, like PEFT's ``"all-linear"``, which skips the output layer; in our GPT it is also
    tied to the token embedding). Otherwise each name matches a module whose qualified name equals it or
    ends with ``"." + name`` (PEFT's rule), e.g. ``["query", "value"]`` for LoRA's paper setting (section 7.1);
    ``exclude`` only applies to ``target_modules=None``. ``freeze=True`` sets ``requires_grad=False`` on every
    parameter that is not an adapter parameter.
    """
    _check_alpha(alpha), _check_dropout(dropout), _check_bool(use_rslora, "use_rslora"), _check_init(init)

    def factory(linear: nn.Module) -> LinearWithLoRA:
        return LinearWithLoRA(linear, rank, alpha, dropout=dropout, use_rslora=use_rslora, init=init)

    return replace_linear_with_adapter(model, factory, rank, target_modules, exclude, freeze)


# ----------------------------------------------------------------------------- trainability

def mark_only_lora_as_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter, then unfreeze the adapters' (A, B, and DoRA's magnitude)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in adapter_layers(model):
        for p in layer.adapter_parameters():
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

def _layers_or_raise(model: nn.Module) -> list[tuple[str, LinearWithLoRA]]:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapter layers (LinearWithLoRA / PiSSA / DoRA); "
                         "call replace_linear_with_lora first")
    return layers


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (each wrapper's own ``merge()``: LoRA, PiSSA or DoRA)."""
    layers = _layers_or_raise(model)
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"adapters already merged in {merged}; call unmerge_lora first")
    for _, layer in layers:
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora`, restoring the base weights (to float precision)."""
    layers = _layers_or_raise(model)
    unmerged = [name for name, layer in layers if not layer.merged]
    if unmerged:
        raise ValueError(f"adapters not merged in {unmerged}; call merge_lora first")
    for _, layer in layers:
        layer.unmerge()
    return model


# ----------------------------------------------------------------------------- adapter-only checkpoints

def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor of ``model`` under its full state-dict name, e.g. ``blocks.0.attn.query.lora.A``."""
    return {f"{name}.{key}": value for name, layer in _layers_or_raise(model)
            for key, value in layer.adapter_state_dict().items()}


def adapter_size_bytes(model: nn.Module) -> tuple[int, int]:
    """``(adapter bytes, full checkpoint bytes)``: what :func:`save_adapter` stores vs the whole state dict."""
    adapter = sum(t.numel() * t.element_size() for t in adapter_state_dict(model).values())
    unique = {t.data_ptr(): t for t in model.state_dict().values()}  # tied tensors are stored once
    return adapter, sum(t.numel() * t.element_size() for t in unique.values())


def save_adapter(model: nn.Module, path: str | Path) -> None:
    """Write only the adapter tensors of ``model`` to a safetensors file, atomically.

    The header metadata records the format, the method(s), rank, alpha, use_rslora and, per target layer,
    the wrapper's constructor arguments, so :func:`load_adapter` can rebuild the wrappers on a plain model.
    """
    layers = _layers_or_raise(model)
    configs = {name: layer.adapter_config() for name, layer in layers}
    tensors = {key: value.detach().to("cpu").contiguous().clone()
               for key, value in adapter_state_dict(model).items()}

    def summary(field: str) -> str:  # the value shared by all layers, or "mixed"
        values = {str(c[field]) for c in configs.values()}
        return values.pop() if len(values) == 1 else "mixed"

    metadata = {"format": ADAPTER_FORMAT, "method": summary("method"), "rank": summary("rank"),
                "alpha": summary("alpha"), "use_rslora": summary("use_rslora"),
                "targets": json.dumps(list(configs)), "layers": json.dumps(configs)}
    atomic_save_file(lambda tmp: save_file(tensors, tmp, metadata=metadata), path)


def _read_adapter(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    metadata, tensors = read_safetensors(path, "adapter file")
    if metadata.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{str(path)!r} has metadata format={metadata.get('format')!r}; expected "
                         f"{ADAPTER_FORMAT!r} (written by minigpt.lora.save_adapter)")
    try:
        configs = json.loads(metadata["layers"])
        for name, config in configs.items():
            for field in ("method", "rank", "alpha"):
                config[field]
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} has corrupted adapter metadata ('layers' entry): {err!r}") from err
    return configs, tensors


def _adapter_class(method: str) -> type[LinearWithLoRA]:
    if method not in ADAPTER_METHODS and method in ("pissa", "dora"):
        importlib.import_module(f"minigpt.{method}")  # registers the class; lora itself never depends on it
    if method not in ADAPTER_METHODS:
        raise ValueError(f"adapter method must be one of {sorted(set(ADAPTER_METHODS) | {'pissa', 'dora'})}, "
                         f"got {method!r}")
    return ADAPTER_METHODS[method]


def load_adapter(model: nn.Module, path: str | Path, freeze: bool = True) -> nn.Module:
    """Load an adapter written by :func:`save_adapter` into ``model``, in place; returns ``model``.

    Layers that are still plain linear layers get the wrapper the file's metadata describes; layers
    already wrapped must have the same method and rank. Every key and shape is checked before anything
    is changed. ``freeze=True`` leaves only the adapter parameters trainable.
    """
    configs, tensors = _read_adapter(path)
    modules = dict(_named_modules(model))
    plan = []
    expected_keys: set[str] = set()
    for name, config in configs.items():
        module = modules.get(name)
        if module is None or not _is_linear_like(module):
            linear_names = [n for n, m in modules.items() if _is_linear_like(m)]
            raise ValueError(f"adapter layer {name!r} is not a linear layer of this model; its linear layers "
                             f"are {linear_names}")
        cls = _adapter_class(config["method"])
        if isinstance(module, LinearWithLoRA):
            if module.method != config["method"] or module.rank != config["rank"]:
                raise ValueError(f"layer {name!r} has a {module.method} adapter of rank {module.rank}, but the "
                                 f"file holds a {config['method']} adapter of rank {config['rank']}")
            if module.merged:
                raise ValueError(f"layer {name!r} is merged; call unmerge_lora before load_adapter")
        shapes = cls.expected_adapter_shapes(module.in_features, module.out_features, config["rank"])
        for key, shape in shapes.items():
            full = f"{name}.{key}"
            expected_keys.add(full)
            if full not in tensors:
                raise ValueError(f"adapter file lacks tensor {full!r} (expected shape {shape})")
            if tuple(tensors[full].shape) != shape:
                raise ValueError(f"adapter tensor {full!r} has shape {tuple(tensors[full].shape)} in the file, "
                                 f"but the model expects {shape}")
        plan.append((name, module, cls, config, list(shapes)))
    unexpected = sorted(set(tensors) - expected_keys)
    if unexpected:
        raise ValueError(f"adapter file has tensors no layer expects: {unexpected}")

    for name, module, cls, config, keys in plan:
        if not isinstance(module, LinearWithLoRA):
            kwargs = {k: v for k, v in config.items() if k != "method"}
            module = cls(module, **kwargs)
            _set_submodule(model, name, module)
        module.load_adapter_state_dict({key: tensors[f"{name}.{key}"] for key in keys})
    if freeze:
        mark_only_lora_as_trainable(model)
    return model
