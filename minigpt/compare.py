"""Head-to-head: full fine-tuning, LoRA, rsLoRA, PiSSA and DoRA on the same model, data, steps and seeds.

Every method starts from a deep copy of the course's pretrained mini GPT (:func:`minigpt.pretrained.get_pretrained`),
trains on the shared fine-tuning stream (:mod:`minigpt.finetune`) with the same schedule, batches and seed,
and is measured the same way. One row per method:

* ``trainable`` parameters and ``trainable_pct``, in % of the pretrained model's parameters;
* ``checkpoint_bytes``: the file fine-tuning produces, written to a temporary folder: the adapter
  (:func:`minigpt.lora.save_adapter`) for the adapter methods, the whole model checkpoint for full fine-tuning;
* ``memory_bytes``: what one training step needs (parameters, gradients, AdamW state, saved activations;
  :func:`minigpt.bench.training_memory` explains how it is counted on CPU and CUDA);
* ``seconds_per_step``: training time divided by steps (evaluation excluded);
* ``domain_loss``, ``task_accuracy`` and ``shakespeare_loss`` (forgetting; Biderman et al., 2024,
  arXiv:2405.09673) from :func:`minigpt.finetune.measure`.

Methods: full fine-tuning; LoRA (Hu et al., 2021, arXiv:2106.09685, eq. (3), scaling α/r); rsLoRA
(Kalajdzievski, 2023, arXiv:2312.03732, scaling α/√r); PiSSA (Meng, Wang & Zhang, 2024, arXiv:2404.02948,
SVD initialisation); DoRA (Liu et al., 2024, arXiv:2402.09353, eq. (5)). All adapters go on every linear
layer except the tied output head, with the same rank and alpha.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from minigpt.bench import training_memory
from minigpt.dora import replace_linear_with_dora
from minigpt.finetune import finetune_data, finetune_loaders, measure
from minigpt.lora import count_parameters, replace_linear_with_lora, save_adapter
from minigpt.pissa import replace_linear_with_pissa
from minigpt.train import TrainConfig, save_checkpoint, seed_everything, train

METHODS = ("full", "lora", "rslora", "pissa", "dora")
# Peak learning rates. full: 3e-3, the pretraining rate. lora: 1e-2 (chapter 6's sweep, 400 steps: 1e-2 beat
# 5e-3 on documentation loss). rslora: at rank 8 its α/√r scaling is 2.8x LoRA's α/r, so a smaller step gives a
# similar update. pissa: its A and B start at √σ-sized values, so one Adam step moves ΔW = s(ΔA·B + A·ΔB) much
# further than LoRA's (B = 0) and a smaller rate is needed. dora: as LoRA (same A, B; the magnitudes are 1-D).
# Only lora's value comes from a sweep; the others follow these arguments and are not tuned.
DEFAULT_LRS = {"full": 3e-3, "lora": 1e-2, "rslora": 5e-3, "pissa": 2e-3, "dora": 1e-2}
DEFAULT_STEPS, SMOKE_STEPS = 300, 4
DEFAULT_RANK, DEFAULT_ALPHA = 8, 16.0
BATCH_SIZE, SMOKE_BATCH_SIZE = 16, 4
COLUMNS = ("method", "lr", "trainable", "trainable_pct", "checkpoint_bytes", "memory_bytes", "seconds_per_step",
           "domain_loss", "task_accuracy", "shakespeare_loss")


def _check_methods(methods) -> tuple[str, ...]:
    if isinstance(methods, str):
        methods = tuple(m.strip() for m in methods.split(",") if m.strip())
    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be a non-empty list of distinct names from {METHODS}, got {list(methods)}")
    return methods


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1), got {value!r}")
    return value


def _check_lrs(lrs, methods: tuple[str, ...]) -> dict[str, float]:
    lrs = dict(lrs or {})
    for method, lr in lrs.items():
        if method not in METHODS:
            raise ValueError(f"lrs keys must be in {METHODS}, got {method!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lrs[{method!r}] must be a positive learning rate, got {lr!r}")
    return {m: float(lrs.get(m, DEFAULT_LRS[m])) for m in methods}


def prepare_model(base: nn.Module, method: str, rank: int, alpha: float, seed: int = 0) -> nn.Module:
    """A deep copy of ``base`` ready to fine-tune with ``method`` (adapters on every linear but ``lm_head``)."""
    model = copy.deepcopy(base)
    seed_everything(seed)  # LoRA's random A: the same draw for every adapter method
    if method == "full":
        model.requires_grad_(True)
    elif method in ("lora", "rslora"):
        replace_linear_with_lora(model, rank, alpha, use_rslora=method == "rslora")
    elif method == "pissa":
        replace_linear_with_pissa(model, rank, alpha)
    elif method == "dora":
        replace_linear_with_dora(model, rank, alpha)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return model


def checkpoint_bytes(model: nn.Module, method: str) -> int:
    """Size of the file fine-tuning produces: adapter-only, or the whole model for full fine-tuning."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("model.safetensors" if method == "full" else "adapter.safetensors")
        if method == "full":
            save_checkpoint(path, model)
        else:
            save_adapter(model, path)
        return path.stat().st_size


def run_comparison(methods=METHODS, steps: int | None = None, rank: int = DEFAULT_RANK,
                   alpha: float = DEFAULT_ALPHA, lrs: dict[str, float] | None = None, seed: int = 0,
                   smoke: bool | None = None, progress: bool = True, baseline: bool = True) -> list[dict]:
    """Fine-tune the pretrained mini GPT with each method under identical conditions; one dict per method.

    ``steps`` defaults to 300 (about 3-4 minutes for the five methods on 2 CPU cores) or 4 in smoke mode;
    ``lrs`` overrides entries of ``DEFAULT_LRS``. With ``baseline`` the first row is the pretrained model
    itself (``method="pretrained"``, no training): the reference for forgetting. Keys: ``COLUMNS``.
    """
    from minigpt.notebooks import smoke_mode
    from minigpt.pretrained import get_pretrained

    methods = _check_methods(methods)
    smoke = smoke_mode() if smoke is None else bool(smoke)
    steps = _check_positive_int((SMOKE_STEPS if smoke else DEFAULT_STEPS) if steps is None else steps, "steps")
    _check_positive_int(rank, "rank")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    lrs = _check_lrs(lrs, methods)

    base = get_pretrained(smoke=smoke, progress=progress).to("cpu").eval()
    data = finetune_data()
    if smoke:  # the plumbing only: a few task prompts and evaluation batches
        data = dataclasses.replace(data, task_eval=data.task_eval[:8])
    eval_batches = 2 if smoke else 20
    batch_size = SMOKE_BATCH_SIZE if smoke else BATCH_SIZE
    context = base.cfg.context_length
    base_params = count_parameters(base)[1]

    rows = []
    if baseline:
        rows.append({"method": "pretrained", "lr": None, "trainable": 0, "trainable_pct": 0.0,
                     "checkpoint_bytes": None, "memory_bytes": None, "seconds_per_step": None,
                     **measure(base, data, max_batches=eval_batches)})
    for method in methods:
        model = prepare_model(base, method, rank, alpha, seed)
        train_loader, _, _ = finetune_loaders(data, context, batch_size, seed=seed)
        memory = training_memory(model, next(iter(train_loader)))["total"]
        cfg = TrainConfig(steps=steps, lr=lrs[method], min_lr=lrs[method] / 10, warmup_steps=max(1, steps // 10),
                          seed=seed, device="cpu", progress=progress)
        if progress:
            print(f"{method}: lr {lrs[method]:g}", file=sys.stderr, flush=True)
        history = train(model, train_loader, None, cfg)
        trainable = count_parameters(model)[0]
        rows.append({"method": method, "lr": lrs[method], "trainable": trainable,
                     "trainable_pct": 100.0 * trainable / base_params,
                     "checkpoint_bytes": checkpoint_bytes(model, method), "memory_bytes": memory,
                     "seconds_per_step": history.seconds / steps,
                     **measure(model.eval(), data, max_batches=eval_batches)})
    return [{key: row[key] for key in COLUMNS} for row in rows]


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    """The comparison as a Markdown table (sizes in KiB/MiB, accuracy in %)."""
    header = ("| method | lr | trainable | % of model | checkpoint | train memory | s/step | domain loss "
              "| task acc. | Shakespeare loss |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        size = r["checkpoint_bytes"]
        size_text = "–" if size is None else (f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB")
        memory = None if r["memory_bytes"] is None else r["memory_bytes"] / 2**20
        lines.append(f"| {r['method']} | {_fmt(r['lr'], 'g')} | {r['trainable']:,} | {r['trainable_pct']:.2f} "
                     f"| {size_text} | {_fmt(memory, '.1f')}{'' if memory is None else ' MiB'} "
                     f"| {_fmt(r['seconds_per_step'], '.3f')} | {r['domain_loss']:.3f} "
                     f"| {100 * r['task_accuracy']:.1f} % | {r['shakespeare_loss']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m minigpt compare [--steps N] [--rank R] [--alpha A] [--methods full,lora,...] [--smoke] [--json PATH]``."""
    parser = argparse.ArgumentParser(prog="python -m minigpt compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help=f"steps per method (default {DEFAULT_STEPS}, "
                                                                f"smoke {SMOKE_STEPS})")
    parser.add_argument("--rank", type=int, default=DEFAULT_RANK)
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="micro model, a few steps: seconds")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        methods = _check_methods(args.methods)
        if args.steps is not None:
            _check_positive_int(args.steps, "steps")
        _check_positive_int(args.rank, "rank")
    except ValueError as err:
        parser.error(str(err))
    start = time.perf_counter()
    rows = run_comparison(methods, args.steps, args.rank, args.alpha, seed=args.seed, smoke=args.smoke or None,
                          progress=not args.no_progress)
    print(format_table(rows))
    print(f"\n{len(methods)} methods in {time.perf_counter() - start:.0f} s")
    if args.json:
        from minigpt.io import atomic_write_bytes

        atomic_write_bytes(args.json, json.dumps(rows, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
