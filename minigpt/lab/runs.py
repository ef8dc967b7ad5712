"""The fine-tuning lab: full fine-tuning, LoRA, rsLoRA, PiSSA and DoRA on one model, one budget,
three seeds.

Every run starts from a deep copy of the course's pretrained mini GPT
(:func:`minigpt.lab.pretrained.get_pretrained`), trains on the shared stream of
:mod:`minigpt.lab.task` (documentation + the word-reversal task, loss on answers only) for the same
steps and batches, and is measured the same way. The rules that make the comparison fair:

* **The same learning-rate grid for every method** (:data:`LR_GRID`), each method's best chosen on
  seed 0 by task accuracy on *validation* prompts (:attr:`FinetuneData.task_val`), never on the
  prompts we report;
* **the same weight-decay rule**: none, for every method (fine-tuning for a few hundred steps;
  PiSSA's authors argue decay would pull its principal components towards zero, and applying a rule
  to one method only would confound the comparison);
* **seeds**: every (method, lr) is then run with seeds 0, 1, 2, ...; the seed fixes the adapters'
  random initialisation and the order of the batches. Tables show mean ± standard deviation over
  seeds.

Finished runs are cached as JSON under ``$MINIGPT_CACHE/runs/<pretrained recipe>/`` keyed by their
full configuration, so chapters that share a run (chapter 06's LoRA baseline is chapter 10's)
compute it once. Seed 0's trained weights (the trainable tensors only) are cached beside its record,
because chapters inspect seed 0's model (:meth:`Lab.model`): reading them back costs milliseconds,
training again about fifteen seconds. Runs asked for together (:meth:`Lab.runs`, and so
:meth:`Lab.tune` and :meth:`Lab.seeds`) train one per core in worker processes
(:mod:`minigpt.lab.pool`); ``MINIGPT_LAB_WORKERS=1`` trains them one after another here.

One record per run (:data:`RECORD_KEYS`): ``method``, ``seed``, ``lr``, ``rank``, ``trainable``
parameters, ``task_accuracy`` (held-out prompts), ``val_accuracy`` (the prompts used for choosing
lr), ``domain_loss`` (held-out documentation), ``shakespeare_loss`` (forgetting; Biderman et al.,
2024, arXiv:2405.09673) and ``shakespeare_loss_before``, ``delta_ratio`` = ‖ΔW‖_F/‖W0‖_F over the
block linears, ``seconds``, ``checkpoint_bytes`` and, with ``curve_every``, a learning-forgetting
``curve``.

Methods: LoRA (Hu et al., 2021, arXiv:2106.09685, eq. (3), scaling α/r); rsLoRA (Kalajdzievski,
2023, arXiv:2312.03732, α/√r); PiSSA (Meng, Wang & Zhang, 2024, arXiv:2404.02948); DoRA (Liu et al.,
2024, arXiv:2402.09353, eq. (5)). Adapters go on every linear layer of the blocks, never the tied
output head.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save

from minigpt._validate import UserError, check_float, check_int
from minigpt.adapters import save_adapter
from minigpt.analysis import delta_ratio, magnitude_direction_points
from minigpt.dora import replace_linear_with_dora
from minigpt.lab.task import (
    FinetuneData,
    finetune_context,
    finetune_loaders,
    measure,
    task_accuracy,
)
from minigpt.lora import count_parameters, replace_linear_with_lora
from minigpt.pissa import replace_linear_with_pissa
from minigpt.train import (
    TrainConfig,
    TrainingDiverged,
    evaluate,
    save_checkpoint,
    seed_everything,
    train,
)

METHODS = ("full", "lora", "rslora", "pissa", "dora")


# One grid for all methods, from where a method barely learns (1e-4) to where its learning collapses
# (1.6e-2), in steps of 2 where the methods' best rates lie: the same runs choose each method's rate
# (seed 0, validation prompts) and trace its learning-forgetting front (Biderman et al., 2024,
# compare methods over many learning rates).
LR_GRID = (1e-4, 3e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)


SMOKE_LR_GRID = (1e-3, 5e-3)


# 200 steps: the task is learnt by then at a good rate, and the course keeps to its time with three
# seeds on the whole grid.
DEFAULT_STEPS, SMOKE_STEPS = 200, 4


# A fixed warm-up, then a constant rate: the checkpoint at step s of a run is then exactly the
# s-step run (same batches, same rates), so one run gives the front at several run lengths.
WARMUP_STEPS = 20


DEFAULT_RANK, DEFAULT_ALPHA = 32, 64.0


DEFAULT_SEEDS = 3


BATCH_SIZE, SMOKE_BATCH_SIZE = 16, 4


# A run with a curve records DoRA's weight changes at each quarter of the run (Liu et al., 2024,
# §3.2, four checkpoints); they cost milliseconds, so they are taken between the curve's points too.
WEIGHT_CHECKPOINTS = 4


# Forgetting and domain loss on the first 16 batches of 32 rows (16,384 tokens) of each held-out
# text, at the end and at every checkpoint of the curve. Every run is measured on the same batches,
# so differences between runs are paired.
EVAL_BATCHES = 16


WEIGHT_DECAY = 0.0


LAB_VERSION = 9  # part of every cache key: raise it when what a run measures changes


# The lab trains in the precision train() picks ("auto": bf16 autocast on CPUs with native bf16 and
# on CUDA, float32 elsewhere; weights, optimizer state and evaluation stay float32). With one thread
# per worker (minigpt.lab.pool), a LoRA step ran 1.37x faster in bf16 on the 2-core development
# machine (45 against 61 ms); with two threads on one step the gain had been within the step's
# noise. The resolved precision is part of every cache key, so float32 and bf16 runs never mix in
# one table.
LAB_PRECISION = "auto"


RECORD_KEYS = (
    "method",
    "seed",
    "lr",
    "rank",
    "alpha",
    "steps",
    "trainable",
    "task_accuracy",
    "val_accuracy",
    "domain_loss",
    "shakespeare_loss",
    "shakespeare_loss_before",
    "delta_ratio",
    "seconds",
    "checkpoint_bytes",
    "task_accuracy_before",
    "domain_loss_before",
)


# Keys of each point of a run's ``curve`` (its learning-forgetting trajectory).
CURVE_KEYS = ("step", "val_accuracy", "task_accuracy", "shakespeare_loss")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything that determines a fine-tuning run's result (and its cache key)."""

    method: str
    lr: float
    seed: int = 0
    rank: int = DEFAULT_RANK
    alpha: float = DEFAULT_ALPHA
    steps: int = DEFAULT_STEPS
    batch_size: int = BATCH_SIZE
    # Evaluate task accuracy and forgetting every this many steps (None: steps // 2, the two run
    # lengths the fronts compare; 0: at the start and the end only, for runs whose curve no chapter
    # plots). Each point costs about a second, a tenth of a run's training.
    curve_every: int | None = None
    # module names to adapt (None: every linear layer of the blocks)
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"method must be one of {METHODS}, got {self.method!r}")
        check_float("lr", self.lr, 0.0, strict_min=True)
        check_int("seed", self.seed, 0)
        check_int("rank", self.rank, 1)
        check_float("alpha", self.alpha, 0.0, strict_min=True)
        check_int("steps", self.steps, 1)
        check_int("batch_size", self.batch_size, 1)
        if self.curve_every is not None:
            check_int("curve_every", self.curve_every, 0)
        else:
            object.__setattr__(self, "curve_every", max(1, self.steps // 2))
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))


def prepare_model(
    base: nn.Module,
    method: str,
    rank: int,
    alpha: float,
    seed: int = 0,
    targets: tuple[str, ...] | None = None,
) -> nn.Module:
    """A deep copy of ``base`` ready to fine-tune with ``method``: adapters on ``targets`` (default:
    every linear layer but ``lm_head``), or every weight trainable for ``full``."""
    model = copy.deepcopy(base)
    seed_everything(seed)  # LoRA's random A: the same draw for every adapter method
    if method == "full":
        model.requires_grad_(True)
    elif method in ("lora", "rslora"):
        replace_linear_with_lora(
            model, rank, alpha, target_modules=targets, use_rslora=method == "rslora"
        )
    elif method == "pissa":
        replace_linear_with_pissa(model, rank, alpha, target_modules=targets)
    elif method == "dora":
        replace_linear_with_dora(model, rank, alpha, target_modules=targets)
    else:
        raise UserError(f"method must be one of {METHODS}, got {method!r}")
    return model


def checkpoint_bytes(model: nn.Module, method: str) -> int:
    """Size of the file fine-tuning produces: adapter-only, or the whole model for full
    fine-tuning."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("model.safetensors" if method == "full" else "adapter.safetensors")
        if method == "full":
            save_checkpoint(path, model)
        else:
            save_adapter(model, path)
        return path.stat().st_size


def curve_point(
    model: nn.Module,
    data: FinetuneData,
    eval_batches: int = EVAL_BATCHES,
    step: int = 0,
    accuracies: tuple[float, float] | None = None,
) -> dict:
    """One point of a learning-forgetting curve (:data:`CURVE_KEYS`): validation and held-out task
    accuracy (unless given, in that order) and forgetting on the same batches as the final
    measurement."""
    _, _, shakespeare_val = finetune_loaders(data, finetune_context(model), BATCH_SIZE)
    if accuracies is None:
        accuracies = (task_accuracy(model, data.task_val), task_accuracy(model, data.task_eval))
    return {
        "step": step,
        "val_accuracy": accuracies[0],
        "task_accuracy": accuracies[1],
        "shakespeare_loss": evaluate(model, shakespeare_val, eval_batches),
    }


def finetune(
    base: nn.Module,
    spec: RunSpec,
    data: FinetuneData,
    eval_batches: int = EVAL_BATCHES,
    progress: bool = False,
    start: dict | None = None,
    device: torch.device | str | None = None,
    on_checkpoint: Callable[[int, nn.Module], None] | None = None,
) -> tuple[nn.Module, dict]:
    """Fine-tune a copy of ``base`` as ``spec`` says; returns the model and its record (uncached).

    ``start`` is the curve's first point, ``curve_point(base, data, eval_batches)``: the same for
    every run on one base, so the lab computes it once. The copy trains on ``device`` (None:
    ``base``'s device), in the precision :data:`LAB_PRECISION` resolves to there, and is returned
    there; ``base`` itself does not move. ``on_checkpoint(step, model)`` is called at every weight
    checkpoint (each quarter of a run with a curve, :data:`WEIGHT_CHECKPOINTS`; the end included),
    for analyses that need the weights there. At the same points the record's ``weight_changes``
    collects DoRA's magnitude and direction changes of the query and value weights
    (:func:`~minigpt.analysis.magnitude_direction_points`, Liu et al., 2024, §3.2).

    A run whose loss or gradient becomes NaN or inf stops there (:class:`TrainingDiverged`) and is
    measured with the weights it kept; its record says ``diverged_at`` (None for a finished run),
    so the learning-forgetting front shows where each method's rates stop working.
    """
    if device is None:
        device = next(base.parameters()).device
    model = prepare_model(base, spec.method, spec.rank, spec.alpha, spec.seed, spec.targets)
    model.to(device)  # before train() builds the optimizer; delta_ratio compares it with base
    train_loader, _, _ = finetune_loaders(
        data, finetune_context(base), spec.batch_size, seed=spec.seed
    )
    curve: list[dict] = []
    weight_changes: list[dict] = []

    # the callback comes at every weight checkpoint; the curve's points are at multiples of
    # curve_every among them
    interval = (
        math.gcd(spec.curve_every, max(1, spec.steps // WEIGHT_CHECKPOINTS))
        if spec.curve_every
        else spec.steps
    )

    def checkpoint(step: int, current: nn.Module) -> None:
        if step < spec.steps:
            if step % spec.curve_every == 0:
                curve.append(curve_point(current, data, eval_batches, step))
            weight_changes.extend(magnitude_direction_points(base, current, step))
            if on_checkpoint is not None:
                on_checkpoint(step, current)

    cfg = TrainConfig(
        steps=spec.steps,
        lr=spec.lr,
        min_lr=spec.lr,
        warmup_steps=min(WARMUP_STEPS, max(1, spec.steps // 10)),
        weight_decay=WEIGHT_DECAY,
        seed=spec.seed,
        device=str(device),
        progress=progress,
        eval_interval=interval,
        precision=LAB_PRECISION,
    )
    diverged_at = None
    try:
        history = train(model, train_loader, None, cfg, callback=checkpoint)
    except TrainingDiverged as err:
        diverged_at, history = err.step, err.history
    model.eval()
    record = {
        "method": spec.method,
        "seed": spec.seed,
        "lr": spec.lr,
        "rank": spec.rank,
        "alpha": spec.alpha,
        "steps": spec.steps,
        "trainable": count_parameters(model)[0],
        **measure(model, data, max_batches=eval_batches),
        "val_accuracy": task_accuracy(model, data.task_val),
        "delta_ratio": delta_ratio(base, model),
        "seconds": history.seconds,
        "checkpoint_bytes": checkpoint_bytes(model, spec.method),
        "train_loss_last": (
            sum(history.train_loss[-20:]) / len(history.train_loss[-20:])
            if history.train_loss
            else math.inf
        ),
        "train_loss": history.train_loss,
        "diverged_at": diverged_at,
    }
    end = diverged_at if diverged_at is not None else spec.steps
    record["curve"] = [
        start or curve_point(base, data, eval_batches),
        *curve,
        {
            "step": end,
            "val_accuracy": record["val_accuracy"],
            "task_accuracy": record["task_accuracy"],
            "shakespeare_loss": record["shakespeare_loss"],
        },
    ]
    if diverged_at is None:
        weight_changes.extend(magnitude_direction_points(base, model, spec.steps))
    record["weight_changes"] = weight_changes
    if on_checkpoint is not None and diverged_at is None:
        on_checkpoint(spec.steps, model)
    return model, record


def trainable_bytes(model: nn.Module) -> bytes:
    """The tensors fine-tuning changed (those that require grad), as the bytes of a safetensors
    file."""
    return save(
        {
            name: p.detach().cpu().contiguous()
            for name, p in model.named_parameters()
            if p.requires_grad
        }
    )
