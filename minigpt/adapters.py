"""Adapter files: save the adapter tensors of a LoRA / PiSSA / DoRA model, and load them onto a
model.

An adapter file is a safetensors file holding, for every wrapped layer, everything of the wrapper
except its frozen ``linear`` (:func:`minigpt.lora.adapter_tensors`: ``lora.A``, ``lora.B``, and
PiSSA's ``A0``/``B0`` or DoRA's ``magnitude``), under the full state-dict name
(``blocks.0.attn.query.lora.A``). Its header records each layer's method and constructor arguments,
so :func:`load_adapter` can rebuild the wrappers on a plain pretrained model. The methods a file may
name are the literal table :data:`METHODS`.

:func:`export_peft` writes the same adapters in PEFT's layout instead (``adapter_config.json`` +
``adapter_model.safetensors``), for Hugging Face GPT-2 as :func:`minigpt.hf.save_gpt2` writes it.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from minigpt._validate import UserError, UserTypeError
from minigpt.dora import LinearWithDoRA
from minigpt.io import (
    DIGEST_KEY,
    atomic_write_bytes,
    check_writable_file,
    check_writable_folder,
    content_digest,
    read_safetensors,
    save_safetensors,
    verify_digest,
)
from minigpt.lora import (
    LinearWithLoRA,
    adapter_tensors,
    check_flag,
    check_lora_args,
    is_linear_like,
    layers_or_raise,
    mark_only_lora_as_trainable,
    method_name,
    named_targets,
    set_submodule,
)
from minigpt.pissa import LinearWithPiSSA, check_niter, pissa_to_lora_weights

ADAPTER_FORMAT = "minigpt-adapter/1"
METHODS: dict[str, type[LinearWithLoRA]] = {
    "lora": LinearWithLoRA,
    "pissa": LinearWithPiSSA,
    "dora": LinearWithDoRA,
}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor of ``model`` under its full state-dict name, e.g.
    ``blocks.0.attn.query.lora.A``."""
    return {
        f"{name}.{key}": value
        for name, layer in layers_or_raise(model)
        for key, value in adapter_tensors(layer).items()
    }


def adapter_size_bytes(model: nn.Module) -> tuple[int, int]:
    """``(adapter bytes, full checkpoint bytes)``: what :func:`save_adapter` stores vs the whole
    state dict."""
    adapter = sum(t.numel() * t.element_size() for t in adapter_state_dict(model).values())
    unique = {t.data_ptr(): t for t in model.state_dict().values()}  # tied tensors are stored once
    return adapter, sum(t.numel() * t.element_size() for t in unique.values())


def adapter_method(layer: LinearWithLoRA) -> str:
    """The method an adapter file records for a wrapper, from its type."""
    return method_name(layer)


def adapter_config(layer: LinearWithLoRA) -> dict[str, Any]:
    """The constructor arguments that rebuild ``layer``, read from its attributes."""
    method = adapter_method(layer)
    config = {
        "method": method,
        "rank": layer.lora.rank,
        "alpha": layer.lora.alpha,
        "dropout": float(getattr(layer.dropout, "p", 0.0)),
        "use_rslora": layer.lora.use_rslora,
    }
    if method == "pissa":
        config["niter"] = layer.niter
    else:
        config["init"] = layer.lora.init
    if method == "dora":
        config["detach_norm"] = layer.detach_norm
    return config


def shift_pissa_residual(layer: LinearWithPiSSA, A0: torch.Tensor, B0: torch.Tensor) -> None:
    """Loading another ``A0``/``B0`` (a randomised SVD, another machine's SVD signs) moves the
    residual so that it stays ``W − s·(A0 B0)ᵀ`` for them."""
    weight = layer.linear.weight
    with torch.no_grad():
        shift = layer.A0 @ layer.B0 - A0.to(layer.A0) @ B0.to(layer.B0)
        weight.add_((layer.scaling * shift.T).to(weight.dtype))


def save_adapter(model: nn.Module, path: str | Path) -> None:
    """Write only the adapter tensors of ``model`` to a safetensors file, atomically.

    The header metadata records the format, the method(s), rank, alpha, use_rslora and, per target
    layer, the wrapper's method and constructor arguments, so :func:`load_adapter` can rebuild the
    wrappers.
    """
    configs = {name: adapter_config(layer) for name, layer in layers_or_raise(model)}
    check_writable_file(path, "adapter file")
    tensors = {
        key: value.detach().to("cpu").contiguous().clone()
        for key, value in adapter_state_dict(model).items()
    }

    def summary(field: str) -> str:  # the value shared by all layers, or "mixed"
        values = {str(c.get(field)) for c in configs.values()}
        return values.pop() if len(values) == 1 else "mixed"

    # numpy scalars (np.int64 rank, np.float32 alpha)
    plain = dict(default=lambda value: value.item())
    metadata = {
        "format": ADAPTER_FORMAT,
        "method": summary("method"),
        "rank": summary("rank"),
        "alpha": summary("alpha"),
        "use_rslora": summary("use_rslora"),
        "targets": json.dumps(list(configs)),
        "layers": json.dumps(configs, **plain),
    }
    metadata[DIGEST_KEY] = json.dumps(content_digest(tensors, metadata))
    save_safetensors(tensors, path, metadata)


def read_adapter(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """``(per-layer configs, tensors)`` of an adapter file, checking its format and metadata."""
    configs, tensors, _ = _read_adapter(path)
    return configs, tensors


def _verify_adapter(path: str | Path, metadata: dict, tensors: dict) -> None:
    """The file's digest over its tensors and metadata; a file without one loads with a
    warning."""
    fields = {key: value for key, value in metadata.items() if key != DIGEST_KEY}
    if not verify_digest(path, "adapter file", metadata.get(DIGEST_KEY), tensors, fields):
        warnings.warn(
            f"adapter file {path} records no digest, so a damaged or edited file cannot be "
            "detected; save it again with save_adapter to add one",
            stacklevel=3,
        )


def _read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    metadata, tensors = read_safetensors(path, "adapter file")
    if metadata.get("format") != ADAPTER_FORMAT:
        raise UserError(
            f"{str(path)!r} has metadata format={metadata.get('format')!r}; expected "
            f"{ADAPTER_FORMAT!r} (written by minigpt.adapters.save_adapter)"
        )
    try:
        configs = json.loads(metadata["layers"])
        if not isinstance(configs, dict) or not all(isinstance(c, dict) for c in configs.values()):
            raise UserTypeError("'layers' must map layer names to objects")
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise UserError(
            f"{str(path)!r} has corrupted adapter metadata ('layers' entry): {err!r}"
        ) from err
    return configs, tensors, metadata


def wrapper_arguments(config: dict[str, Any]) -> tuple[type[LinearWithLoRA], dict[str, Any]]:
    """The class and checked constructor arguments a file's layer config describes."""
    method = config.get("method")
    if method not in METHODS:
        raise UserError(f"adapter method must be one of {sorted(METHODS)}, got {method!r}")
    args = check_lora_args(
        config.get("rank"),
        config.get("alpha"),
        config.get("dropout", 0.0),
        config.get("use_rslora", False),
        config.get("init", "kaiming"),
    )
    if method == "pissa":
        del args["init"]
        args["niter"] = check_niter(config.get("niter"))
    if method == "dora":
        args["detach_norm"] = check_flag(config.get("detach_norm", True), "detach_norm")
    return METHODS[method], args


def _expected_shapes(
    module: nn.Module, cls: type[LinearWithLoRA], args: dict[str, Any]
) -> dict[str, tuple]:
    """The adapter tensors' shapes: those of a wrapper built on a stand-in layer on the meta device
    (no data, no compute), or of the wrapper already there."""
    if isinstance(module, LinearWithLoRA):
        return {key: tuple(value.shape) for key, value in adapter_tensors(module).items()}
    with torch.device("meta"):
        template = cls(nn.Linear(module.in_features, module.out_features), **args)
    return {key: tuple(value.shape) for key, value in adapter_tensors(template).items()}


def load_adapter(model: nn.Module, path: str | Path, freeze: bool = True) -> nn.Module:
    """Load an adapter written by :func:`save_adapter` into ``model``, in place; returns ``model``.

    Layers that are still plain linear layers get the wrapper the file's metadata describes; layers
    already wrapped must have the same method and rank. Every config, key, shape and value (finite)
    is checked before anything is changed. ``freeze=True`` leaves only the adapter parameters
    trainable.
    """
    configs, tensors, metadata = _read_adapter(path)
    modules = dict(named_targets(model))
    plan, expected_keys = [], set()
    for name, config in configs.items():
        module = modules.get(name)
        if module is None or not is_linear_like(module):
            linear_names = [n for n, m in modules.items() if is_linear_like(m)]
            raise UserError(
                f"adapter file {path}: layer {name!r} is not a linear layer of this model; its "
                f"linear layers are {linear_names}"
            )
        try:
            cls, args = wrapper_arguments(config)
        except (TypeError, ValueError) as err:
            raise UserError(f"adapter file {path}: layer {name!r}: {err}") from err
        if isinstance(module, LinearWithLoRA):
            if adapter_method(module) != config["method"] or module.lora.rank != args["rank"]:
                raise UserError(
                    f"adapter file {path}: layer {name!r} of the model has a "
                    f"{adapter_method(module)} adapter of rank {module.lora.rank}, but the file "
                    f"holds a {config['method']} adapter of rank {args['rank']}"
                )
            if module.merged:
                raise UserError(
                    f"adapter file {path}: layer {name!r} of the model is merged; call "
                    "unmerge_lora before load_adapter"
                )
        try:
            shapes = _expected_shapes(module, cls, args)
        except (TypeError, ValueError) as err:  # a wrapper that cannot sit on this layer
            raise UserError(f"adapter file {path}: layer {name!r}: {err}") from err
        for key, shape in shapes.items():
            full = f"{name}.{key}"
            expected_keys.add(full)
            if full not in tensors:
                raise UserError(
                    f"adapter file {path} lacks tensor {full!r} (expected shape {shape})"
                )
            if tuple(tensors[full].shape) != shape:
                raise UserError(
                    f"adapter file {path}: tensor {full!r} has shape "
                    f"{tuple(tensors[full].shape)}, but the model expects {shape}"
                )
            if tensors[full].is_floating_point() and not torch.isfinite(tensors[full]).all():
                raise UserError(
                    f"adapter tensor {full!r} in {str(path)!r} holds NaN or inf values; refusing "
                    "to "
                    "load it (the file is corrupted, or it was saved after training diverged)"
                )
        plan.append((name, module, cls, args))
    unexpected = sorted(set(tensors) - expected_keys)
    if unexpected:
        raise UserError(f"adapter file {path} has tensors no layer expects: {unexpected}")
    _verify_adapter(path, metadata, tensors)  # last of the checks, still before any change

    for name, module, cls, args in plan:
        if not isinstance(module, LinearWithLoRA):
            module = cls(module, **args)
            set_submodule(model, name, module)
        prefix = name + "."
        if isinstance(module, LinearWithPiSSA) and prefix + "A0" in tensors:
            shift_pissa_residual(module, tensors[prefix + "A0"], tensors[prefix + "B0"])
        module.load_state_dict(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=False
        )
    if freeze:
        mark_only_lora_as_trainable(model)
    return model


# ----------------------------------------------------------------------------- export to PEFT

# Our linear layers -> Hugging Face GPT-2's: query/key/value are fused into one Conv1D ``c_attn``
# (rows q | k | v).
PEFT_MODULES = {
    "attn.query": ("attn.c_attn", 0),
    "attn.key": ("attn.c_attn", 1),
    "attn.value": ("attn.c_attn", 2),
    "attn.out_proj": ("attn.c_proj", 0),
    "mlp.fc": ("mlp.c_fc", 0),
    "mlp.proj": ("mlp.c_proj", 0),
}
PEFT_PARTS = {
    "attn.c_attn": ("attn.query", "attn.key", "attn.value"),
    "attn.c_proj": ("attn.out_proj",),
    "mlp.c_fc": ("mlp.fc",),
    "mlp.c_proj": ("mlp.proj",),
}


def _lora_for_original_weight(
    layer: LinearWithLoRA,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, W0)`` in our layout (A: in × r, B: r × out, W0: out × in) with the layer's scaling
    folded into B, so that the layer's output is ``x W0ᵀ + b + x A B``. A PiSSA layer is converted
    to its rank-2r LoRA on the ORIGINAL weight (:func:`minigpt.pissa.pissa_to_lora_weights`); the
    model itself is left untouched."""
    A, B = layer.lora.A.detach().float(), layer.lora.B.detach().float()
    weight = layer.linear.weight.detach().float()
    if isinstance(layer, LinearWithPiSSA):
        A0, B0 = layer.A0.detach().float(), layer.B0.detach().float()
        weight = weight + layer.scaling * (A0 @ B0).T  # W = W_res + s·(A0 B0)ᵀ
        A, B = pissa_to_lora_weights(A, B, A0, B0)
    return A, layer.scaling * B, weight


def export_peft(
    model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None
) -> Path:
    """Write the adapters of ``model`` as a PEFT LoRA folder (``adapter_config.json`` +
    ``adapter_model.safetensors``); returns the folder.

    ``peft.PeftModel.from_pretrained(base, folder)`` then gives the same logits as ``model``, where
    ``base`` is the pretrained model WITHOUT adapters saved by :func:`minigpt.hf.save_gpt2` and
    loaded with ``transformers.GPT2LMHeadModel.from_pretrained``::

        # before wrapping (or a fresh load of the same weights)
        save_gpt2(base_model, "base")
        replace_linear_with_lora(model, rank=8, alpha=16)  # ... train ...
        export_peft(model, "adapter", base_model_name_or_path="base")
        hf = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained("base"), "adapter")

    How the layers map (GPT-2's checkpoint layout, :mod:`minigpt.hf`):

    - ``attn.out_proj``, ``mlp.fc``, ``mlp.proj`` become ``attn.c_proj``, ``mlp.c_fc``,
      ``mlp.c_proj``. These are ``Conv1D`` layers, so the config sets ``fan_in_fan_out=True``; PEFT
      still stores ``lora_A`` as (r, in) and ``lora_B`` as (out, r), i.e. ``A.T`` and ``B.T`` of
      ours.
    - ``attn.query``/``key``/``value`` are fused into one ``c_attn`` whose output rows are q | k |
      v. Their adapters become ONE adapter of rank ``r_q + r_k + r_v`` (of the ones present): ``A``
      is the concatenation of their ``A``s and ``B`` is block-structured, each adapter's ``B``
      writing only its own third of the output and zeros elsewhere, so ``B A x`` is exactly the
      three updates side by side. A projection without an adapter (e.g. key when only q and v are
      adapted) gets zero rows.
    - Scalings are folded into ``B`` (``B <- s·B``, with ``s`` = α/r, or α/√r for rsLoRA) and every
      module gets ``lora_alpha = r`` (``use_rslora=False``), so PEFT's scaling is 1; the ranks that
      differ from the config's ``r`` are listed in ``rank_pattern`` and ``alpha_pattern``.
    - **PiSSA** layers are converted automatically (on copies; ``model`` is not changed) to their
      rank-2r LoRA on the original weights (:func:`minigpt.pissa.pissa_to_lora_weights`), so the
      base to load them on is the ORIGINAL pretrained model, not the PiSSA residual.
    - **DoRA** (``use_dora=True``): the magnitude is saved as ``lora_magnitude_vector``. DoRA's norm
      is per output row, so the fused ``c_attn`` magnitude is q's, k's and v's concatenated, and
      folding ``s`` into ``B`` keeps ``W0 + s·BA`` (and so the norm) unchanged. When any layer uses
      DoRA every exported module does (PEFT's ``use_dora`` is global): rows of a plain LoRA layer
      get magnitude ``||W0 + ΔW||`` and rows without an adapter ``||W0||``, which makes DoRA the
      identity on them.

    ``lora_dropout`` is the layers' dropout when they all share one (0.0 otherwise); it only matters
    for further training. Refused: merged layers (unmerge first) and adapters on layers GPT-2 has no
    ``Conv1D`` for (``lm_head``). ``base_model_name_or_path`` is recorded in the config.
    """
    pattern = re.compile(r"blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in PEFT_MODULES) + r")")
    layers = layers_or_raise(model)
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise UserError(
            f"layers {merged} are merged; call unmerge_lora before export_peft (a merged weight "
            "is not the base PEFT loads the adapter on)"
        )
    ours: dict[str, LinearWithLoRA] = {}
    for name, layer in layers:
        if not pattern.fullmatch(name):
            raise UserError(
                f"cannot export the adapter on {name!r} to PEFT: GPT-2 adapters can only target "
                "the "
                f"blocks' {sorted(PEFT_MODULES)} layers (lm_head is not a Conv1D layer of GPT-2's "
                "blocks); remove that adapter or merge it into the model you save with save_gpt2"
            )
        ours[name] = layer
    use_dora = any(isinstance(layer, LinearWithDoRA) for layer in ours.values())

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    blocks = sorted({int(pattern.fullmatch(name).group(1)) for name in ours})
    for i in blocks:
        for hf_name, parts in PEFT_PARTS.items():
            names = [f"blocks.{i}.{part}" for part in parts]
            if not any(name in ours for name in names):
                continue
            pieces, magnitudes, widths = [], [], []
            for name in names:
                layer = ours.get(name)
                if layer is None:  # a projection of the fused c_attn without an adapter
                    weight = model.get_submodule(name).weight.detach().float()
                    pieces.append(None)
                    magnitudes.append(torch.linalg.norm(weight, dim=1))
                    widths.append(weight.shape[0])
                    continue
                A, B, weight = _lora_for_original_weight(layer)
                pieces.append((A, B))
                widths.append(B.shape[1])
                if isinstance(layer, LinearWithDoRA):
                    magnitudes.append(layer.magnitude.detach().float())
                elif use_dora:  # LoRA as DoRA: magnitude ||W0 + ΔW|| makes the rescaling 1
                    magnitudes.append(torch.linalg.norm(weight + (A @ B).T, dim=1))
            A = torch.cat([p[0] for p in pieces if p is not None], dim=1)  # (in, R)
            B = torch.zeros(A.shape[1], sum(widths))  # (R, out): block-structured
            row = col = 0
            for piece, width in zip(pieces, widths, strict=False):
                if piece is not None:
                    B[row : row + piece[1].shape[0], col : col + width] = piece[1]
                    row += piece[1].shape[0]
                col += width
            key = f"transformer.h.{i}.{hf_name}"
            ranks[key] = A.shape[1]
            tensors[f"base_model.model.{key}.lora_A.weight"] = A.T.contiguous()
            tensors[f"base_model.model.{key}.lora_B.weight"] = B.T.contiguous()
            if use_dora:
                tensors[f"base_model.model.{key}.lora_magnitude_vector"] = torch.cat(
                    magnitudes
                ).contiguous()

    r = Counter(ranks.values()).most_common(1)[0][0]
    others = {key: rank for key, rank in ranks.items() if rank != r}
    n_layer = getattr(getattr(model, "cfg", None), "n_layer", None) or len(
        getattr(model, "blocks", ())
    )
    every = [f"transformer.h.{i}.{hf}" for i in range(n_layer) for hf in PEFT_PARTS]
    # c_attn, c_proj, c_fc: PEFT matches name suffixes
    short = sorted({key.rsplit(".", 1)[1] for key in ranks})
    covered = {key for key in every if key.rsplit(".", 1)[1] in short}
    # full names when a short one selects too much
    targets = short if covered == set(ranks) else sorted(ranks)
    dropouts = {adapter_config(layer)["dropout"] for layer in ours.values()}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "target_modules": targets,
        "fan_in_fan_out": True,
        "use_rslora": False,
        "use_dora": use_dora,
        "lora_dropout": dropouts.pop() if len(dropouts) == 1 else 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    folder = check_writable_folder(folder, "PEFT export folder")
    save_safetensors(tensors, folder / "adapter_model.safetensors", {"format": "pt"})
    atomic_write_bytes(
        folder / "adapter_config.json", (json.dumps(config, indent=2) + "\n").encode("utf-8")
    )
    return folder
