"""The fine-tuning lab: full fine-tuning, LoRA, rsLoRA, PiSSA and DoRA on one model, one budget, three seeds.

Every run starts from a deep copy of the course's pretrained mini GPT (:func:`minigpt.pretrained.get_pretrained`),
trains on the shared stream of :mod:`minigpt.finetune` (documentation + the word-reversal task, loss on answers
only) for the same steps and batches, and is measured the same way. The rules that make the comparison fair:

* **The same learning-rate grid for every method** (:data:`LR_GRID`), each method's best chosen on seed 0 by
  task accuracy on *validation* prompts (:attr:`FinetuneData.task_val`), never on the prompts we report;
* **the same weight-decay rule**: none, for every method (fine-tuning for a few hundred steps; PiSSA's authors
  argue decay would pull its principal components towards zero, and applying a rule to one method only
  would confound the comparison);
* **seeds**: every (method, lr) is then run with seeds 0, 1, 2, ...; the seed fixes the adapters'
  random initialisation and the order of the batches. Tables show mean ± standard deviation over seeds.

Finished runs are cached as JSON under ``$MINIGPT_CACHE/runs/<pretrained recipe>/`` keyed by their full
configuration, so chapters that share a run (chapter 06's LoRA baseline is chapter 10's) compute it once.
Seed 0's trained weights (the trainable tensors only) are cached beside its record, because chapters inspect
seed 0's model (:meth:`Lab.model`): reading them back costs milliseconds, training again about fifteen seconds.
Runs asked for together (:meth:`Lab.runs`, and so :meth:`Lab.tune` and :meth:`Lab.seeds`) train one per core
in worker processes (:mod:`minigpt.lab_pool`); ``MINIGPT_LAB_WORKERS=1`` trains them one after another here.

One record per run (:data:`RECORD_KEYS`): ``method``, ``seed``, ``lr``, ``rank``, ``trainable`` parameters,
``task_accuracy`` (held-out prompts), ``val_accuracy`` (the prompts used for choosing lr), ``domain_loss``
(held-out documentation), ``shakespeare_loss`` (forgetting; Biderman et al., 2024, arXiv:2405.09673) and
``shakespeare_loss_before``, ``delta_ratio`` = ‖ΔW‖_F/‖W0‖_F over the block linears, ``seconds``,
``checkpoint_bytes`` and, with ``curve_every``, a learning-forgetting ``curve``.

Methods: LoRA (Hu et al., 2021, arXiv:2106.09685, eq. (3), scaling α/r); rsLoRA (Kalajdzievski, 2023,
arXiv:2312.03732, α/√r); PiSSA (Meng, Wang & Zhang, 2024, arXiv:2404.02948); DoRA (Liu et al., 2024,
arXiv:2402.09353, eq. (5)). Adapters go on every linear layer of the blocks, never the tied output head.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import statistics
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save

from minigpt.adapters import save_adapter
from minigpt.analysis import delta_ratio
from minigpt.dora import replace_linear_with_dora
from minigpt.finetune import FinetuneData, finetune_context, finetune_data, finetune_loaders, measure, task_accuracy
from minigpt.io import UserError, atomic_write_bytes, cache_dir, check_float, check_int
from minigpt.lab_pool import LabPool, lab_workers
from minigpt.lora import count_parameters, replace_linear_with_lora
from minigpt.pissa import replace_linear_with_pissa
from minigpt.train import TrainConfig, evaluate, resolve_precision, save_checkpoint, seed_everything, train

METHODS = ("full", "lora", "rslora", "pissa", "dora")
# One grid for all methods, in steps of 2x: fine enough for LoRA's narrow window of usable rates, and wide
# enough that every method's chosen rate has a tried neighbour on both sides (at 200 steps from the
# Muon-pretrained base; LoRA, rsLoRA and PiSSA diverge at the grid's top rate).
LR_GRID = (1.5e-3, 3e-3, 6e-3, 1.2e-2)
SMOKE_LR_GRID = (1e-3, 5e-3)
# 200 steps: from the Muon-pretrained base the task is learnt by then (400 steps saturated every method at
# 100 %, so accuracy no longer told them apart), and the course keeps to its time with three seeds.
DEFAULT_STEPS, SMOKE_STEPS = 200, 4
DEFAULT_RANK, DEFAULT_ALPHA = 32, 64.0
DEFAULT_SEEDS = 3
BATCH_SIZE, SMOKE_BATCH_SIZE = 16, 4
# Forgetting and domain loss on the first 10 batches of 32 rows (~10 K tokens) of each held-out text. Every
# run is measured on the same batches, so differences between runs are paired; the measurement was a fifth of
# a 200-step run's cost at 20 batches.
EVAL_BATCHES = 10
WEIGHT_DECAY = 0.0
LAB_VERSION = 6  # part of every cache key: raise it when what a run measures changes
# The lab trains in the precision train() picks ("auto": bf16 autocast on CPUs with native bf16 and on CUDA,
# float32 elsewhere; weights, optimizer state and evaluation stay float32). With one thread per worker
# (minigpt.lab_pool), a LoRA step ran 1.37x faster in bf16 on the 2-core development machine (45 against 61 ms);
# with two threads on one step the gain had been within the step's noise. The resolved precision is part of
# every cache key, so float32 and bf16 runs never mix in one table.
LAB_PRECISION = "auto"
RECORD_KEYS = ("method", "seed", "lr", "rank", "alpha", "steps", "trainable", "task_accuracy", "val_accuracy",
               "domain_loss", "shakespeare_loss", "shakespeare_loss_before", "delta_ratio", "seconds",
               "checkpoint_bytes", "task_accuracy_before", "domain_loss_before")


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
    # Evaluate task accuracy and forgetting every this many steps (None: steps // 4; 0: at the start and the end
    # only, for runs whose curve no chapter plots: each point costs about a third of a second).
    curve_every: int | None = None
    targets: tuple[str, ...] | None = None  # module names to adapt (None: every linear layer of the blocks)

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
            object.__setattr__(self, "curve_every", max(1, self.steps // 4))
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))


def prepare_model(base: nn.Module, method: str, rank: int, alpha: float, seed: int = 0,
                  targets: tuple[str, ...] | None = None) -> nn.Module:
    """A deep copy of ``base`` ready to fine-tune with ``method``: adapters on ``targets`` (default: every
    linear layer but ``lm_head``), or every weight trainable for ``full``."""
    model = copy.deepcopy(base)
    seed_everything(seed)  # LoRA's random A: the same draw for every adapter method
    if method == "full":
        model.requires_grad_(True)
    elif method in ("lora", "rslora"):
        replace_linear_with_lora(model, rank, alpha, target_modules=targets, use_rslora=method == "rslora")
    elif method == "pissa":
        replace_linear_with_pissa(model, rank, alpha, target_modules=targets)
    elif method == "dora":
        replace_linear_with_dora(model, rank, alpha, target_modules=targets)
    else:
        raise UserError(f"method must be one of {METHODS}, got {method!r}")
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


def curve_point(model: nn.Module, data: FinetuneData, eval_batches: int = EVAL_BATCHES, step: int = 0,
                val_accuracy: float | None = None) -> dict:
    """One point of a learning-forgetting curve: validation accuracy (unless given), and forgetting on a
    quarter of the evaluation batches (a cheaper estimate than the final one)."""
    _, _, shakespeare_val = finetune_loaders(data, finetune_context(model), BATCH_SIZE)
    if val_accuracy is None:
        val_accuracy = task_accuracy(model, data.task_val)
    return {"step": step, "val_accuracy": val_accuracy,
            "shakespeare_loss": evaluate(model, shakespeare_val, max(1, eval_batches // 4))}


def finetune(base: nn.Module, spec: RunSpec, data: FinetuneData, eval_batches: int = EVAL_BATCHES,
             progress: bool = False, start: dict | None = None) -> tuple[nn.Module, dict]:
    """Fine-tune a copy of ``base`` as ``spec`` says; returns the model and its record (uncached).

    ``start`` is the curve's first point, ``curve_point(base, data, eval_batches)``: the same for every run
    on one base, so the lab computes it once.
    """
    model = prepare_model(base, spec.method, spec.rank, spec.alpha, spec.seed, spec.targets)
    train_loader, _, _ = finetune_loaders(data, finetune_context(base), spec.batch_size, seed=spec.seed)
    curve: list[dict] = []

    def checkpoint(step: int, current: nn.Module) -> None:
        if step < spec.steps:
            curve.append(curve_point(current, data, eval_batches, step))

    cfg = TrainConfig(steps=spec.steps, lr=spec.lr, min_lr=spec.lr / 10, warmup_steps=max(1, spec.steps // 10),
                      weight_decay=WEIGHT_DECAY, seed=spec.seed, device="cpu", progress=progress,
                      eval_interval=spec.curve_every or spec.steps, precision=LAB_PRECISION)
    history = train(model, train_loader, None, cfg, callback=checkpoint)
    model.eval()
    record = {"method": spec.method, "seed": spec.seed, "lr": spec.lr, "rank": spec.rank, "alpha": spec.alpha,
              "steps": spec.steps, "trainable": count_parameters(model)[0],
              **measure(model, data, max_batches=eval_batches),
              "val_accuracy": task_accuracy(model, data.task_val),
              "delta_ratio": delta_ratio(base, model), "seconds": history.seconds,
              "checkpoint_bytes": checkpoint_bytes(model, spec.method),
              "train_loss_last": sum(history.train_loss[-20:]) / len(history.train_loss[-20:]),
              "train_loss": history.train_loss}
    record["curve"] = [start or curve_point(base, data, eval_batches), *curve,
                       curve_point(model, data, eval_batches, spec.steps, record["val_accuracy"])]
    return model, record


def trainable_bytes(model: nn.Module) -> bytes:
    """The tensors fine-tuning changed (those that require grad), as the bytes of a safetensors file."""
    return save({name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad})


def _train_in_worker(state: dict, spec: RunSpec) -> tuple[dict, bytes | None]:
    """One run in a :class:`~minigpt.lab_pool.LabPool` worker: its record, and seed 0's trainable tensors."""
    model, record = finetune(state["base"], spec, state["data"], state["eval_batches"], start=state["start"])
    return record, trainable_bytes(model) if spec.seed == 0 else None


class Lab:
    """The pretrained base, the data and the run cache, shared by every experiment of chapters 06-10.

    ``smoke`` shrinks everything to seconds (micro model, a few steps, a few prompts); ``cache`` False
    recomputes every run. Runs asked for together train :attr:`workers` at a time (:func:`lab_workers`).
    """

    def __init__(self, smoke: bool | None = None, cache: bool = True, progress: bool = False):
        from minigpt.notebooks import smoke_mode
        from minigpt.pretrained import get_pretrained, recipe_for

        self.smoke = smoke_mode() if smoke is None else bool(smoke)
        self.cache = cache
        self.progress = progress
        self.base = get_pretrained(smoke=self.smoke, progress=progress).to("cpu").eval()
        data = finetune_data()
        if self.smoke:
            data = dataclasses.replace(data, task_eval=data.task_eval[:8], task_val=data.task_val[:8])
        self.data = data
        self.eval_batches = 2 if self.smoke else EVAL_BATCHES
        self.folder = cache_dir("runs", recipe_for(self.smoke).name)
        self.grid = SMOKE_LR_GRID if self.smoke else LR_GRID
        self.workers = lab_workers(self.smoke)
        self.precision = resolve_precision(LAB_PRECISION, torch.device("cpu"))
        self._pool: LabPool | None = None
        self._before: dict | None = None
        self._start: dict | None = None

    def spec(self, method: str, lr: float, seed: int = 0, **changes) -> RunSpec:
        """A :class:`RunSpec` with this lab's defaults (smoke: a few steps, small batches)."""
        if self.smoke:
            changes.setdefault("steps", SMOKE_STEPS)
            changes.setdefault("batch_size", SMOKE_BATCH_SIZE)
            changes.pop("curve_every", None)
        return RunSpec(method, lr, seed, **changes)

    def before(self) -> dict:
        """The pretrained model's own measurements: the reference for learning and forgetting."""
        if self._before is None:
            self._before = measure(self.base, self.data, max_batches=self.eval_batches)
        return self._before

    def start(self) -> dict:
        """The first point of every run's learning-forgetting curve: the pretrained model's."""
        if self._start is None:
            self._start = curve_point(self.base, self.data, self.eval_batches)
        return self._start

    def _path(self, spec: RunSpec) -> Path:
        config = {**dataclasses.asdict(spec), "lab": LAB_VERSION, "eval_batches": self.eval_batches,
                  "precision": self.precision}
        key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
        return self.folder / f"{spec.method}-{key}.json"

    def _store(self, spec: RunSpec, record: dict, weights: bytes | None) -> None:
        if not self.cache:
            return
        path = self._path(spec)
        if weights is not None:  # written before the record: a record in the cache always has its weights
            atomic_write_bytes(path.with_suffix(".safetensors"), weights)
        atomic_write_bytes(path, json.dumps(record).encode())

    def _load_weights(self, spec: RunSpec) -> nn.Module | None:
        path = self._path(spec).with_suffix(".safetensors")
        if not (self.cache and path.is_file()):
            return None
        model = prepare_model(self.base, spec.method, spec.rank, spec.alpha, spec.seed, spec.targets)
        try:
            saved = load_file(path)
        except Exception:  # noqa: BLE001 - a damaged cache file is retrained and replaced
            return None
        expected = {name for name, p in model.named_parameters() if p.requires_grad}
        if set(saved) != expected:
            return None
        model.load_state_dict(saved, strict=False)
        return model.eval()

    def _cached(self, spec: RunSpec) -> dict | None:
        path = self._path(spec)
        if self.cache and path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                pass  # a damaged cache entry is recomputed and replaced
        return None

    def run(self, spec: RunSpec) -> dict:
        """The record of ``spec``, from the cache when this exact run was done before."""
        return self.runs([spec])[0]

    def runs(self, specs: list[RunSpec]) -> list[dict]:
        """The records of ``specs``, in order: cached ones read back, the others trained :attr:`workers` at a
        time in worker processes (:mod:`minigpt.lab_pool`), or here when one worker is all there is."""
        records = {spec: self._cached(spec) for spec in specs}
        missing = [spec for spec, record in records.items() if record is None]
        if len(missing) > 1 and self.workers > 1:
            if self._pool is None:
                state = {"base": self.base, "data": self.data, "eval_batches": self.eval_batches,
                         "start": self.start()}
                self._pool = LabPool(_train_in_worker, state, self.workers)
                weakref.finalize(self, self._pool.close)

            def done(spec: RunSpec, record: dict, weights: bytes | None) -> None:
                records[spec] = self._finish(spec, record, weights)

            try:
                self._pool.map(missing, done)
            except BaseException:
                self._pool = None  # map() stopped it; a later call starts a new one
                raise
        else:
            for spec in missing:
                records[spec] = self._train(spec)[1]
        return [records[spec] for spec in specs]

    def _finish(self, spec: RunSpec, record: dict, weights: bytes | None) -> dict:
        record.update({f"{key}_before": value for key, value in self.before().items()})
        self._store(spec, record, weights)
        return record

    def _train(self, spec: RunSpec) -> tuple[nn.Module, dict]:
        model, record = finetune(self.base, spec, self.data, self.eval_batches, self.progress, self.start())
        return model, self._finish(spec, record, trainable_bytes(model) if spec.seed == 0 else None)

    def model(self, spec: RunSpec) -> nn.Module:
        """The fine-tuned model of ``spec``: seed 0's weights come from the cache, other seeds train again."""
        if self._path(spec).is_file():
            cached = self._load_weights(spec)
            if cached is not None:
                return cached
        return self._train(spec)[0]

    def tune(self, method: str, grid: tuple[float, ...] | None = None, **changes) -> tuple[float, list[dict]]:
        """Seed 0 at every learning rate of ``grid``; the best by validation accuracy (ties: lower train loss)."""
        grid = grid or self.grid
        records = self.runs([self.spec(method, lr, 0, **changes) for lr in grid])
        return best_lr(records), records

    def seeds(self, method: str, lr: float, seeds: int = DEFAULT_SEEDS, **changes) -> list[dict]:
        """One record per seed 0 .. ``seeds``-1 at ``lr``."""
        return self.runs([self.spec(method, lr, seed, **changes) for seed in range(seeds)])


def best_lr(records: list[dict]) -> float:
    """The learning rate of the best record: highest validation accuracy, ties broken by lower training loss."""
    return max(records, key=lambda r: (r["val_accuracy"], -r["train_loss_last"]))["lr"]


def run_comparison(methods=METHODS, seeds: int = DEFAULT_SEEDS, rank: int = DEFAULT_RANK,
                   alpha: float = DEFAULT_ALPHA, steps: int | None = None, grid: tuple[float, ...] | None = None,
                   smoke: bool | None = None, cache: bool = True, progress: bool = False) -> list[dict]:
    """Tune each method's lr on ``grid`` (seed 0, validation prompts), then run ``seeds`` seeds at the best.

    Returns one record per (method, seed) with :data:`RECORD_KEYS`.
    """
    if isinstance(methods, str):
        methods = tuple(m.strip() for m in methods.split(",") if m.strip())
    methods = tuple(methods)
    if not methods or len(set(methods)) != len(methods) or not set(methods) <= set(METHODS):
        raise UserError(f"methods must be distinct names from {METHODS}, got {list(methods)}")
    check_int("seeds", seeds, 1)
    changes = {"rank": check_int("rank", rank, 1), "alpha": check_float("alpha", alpha, 0.0, strict_min=True)}
    if steps is not None:
        changes["steps"] = check_int("steps", steps, 1)
    lab = Lab(smoke, cache, progress)  # after the checks: a bad argument must not cost a pretraining run
    grid = grid or lab.grid
    start = time.perf_counter()
    tuning = lab.runs([lab.spec(method, lr, 0, **changes) for method in methods for lr in grid])  # all at once
    chosen = {method: best_lr([r for r in tuning if r["method"] == method]) for method in methods}
    records = lab.runs([lab.spec(method, chosen[method], seed, **changes) for method in methods
                        for seed in range(seeds)])
    if progress:
        lrs = ", ".join(f"{method} {lr:g}" for method, lr in chosen.items())
        print(f"learning rates: {lrs} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return [{key: r[key] for key in RECORD_KEYS} for r in records]


def summarize(records: list[dict], keys=("task_accuracy", "domain_loss", "shakespeare_loss", "delta_ratio")) -> dict:
    """``{method: {key: (mean, std)}, ...}`` over seeds, plus ``lr``, ``trainable`` and ``n`` (seeds)."""
    summary: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in records):
        rows = [r for r in records if r["method"] == method]
        entry = {"lr": rows[0]["lr"], "trainable": rows[0]["trainable"], "n": len(rows)}
        for key in keys:
            values = [float(r[key]) for r in rows]
            entry[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        summary[method] = entry
    return summary


def exceeds_spread(a: list[float], b: list[float]) -> bool:
    """Whether two sets of seeds differ by more than their spread: |mean(a) - mean(b)| > std(a) + std(b).

    A deliberately plain rule (no p-value from three seeds): a difference inside the seeds' own scatter
    is reported as "within the spread".
    """
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
    return abs(statistics.fmean(a) - statistics.fmean(b)) > sd(a) + sd(b)


def format_table(records: list[dict]) -> str:
    """Mean ± std over seeds per method, as a Markdown table."""
    summary = summarize(records)
    first = records[0]
    lines = ["| method | lr | trainable | task accuracy | domain loss | Shakespeare loss | ‖ΔW‖/‖W0‖ |",
             "|---|---|---|---|---|---|---|"]
    if "task_accuracy_before" in first:
        lines.append(f"| pretrained | – | 0 | {100 * first['task_accuracy_before']:.1f} % | "
                     f"{first['domain_loss_before']:.3f} | {first['shakespeare_loss_before']:.3f} | 0 |")
    for method, s in summary.items():
        acc, dom, sha, ratio = (s[k] for k in ("task_accuracy", "domain_loss", "shakespeare_loss", "delta_ratio"))
        lines.append(f"| {method} | {s['lr']:g} | {s['trainable']:,} | {100 * acc[0]:.1f} ± {100 * acc[1]:.1f} % "
                     f"| {dom[0]:.3f} ± {dom[1]:.3f} | {sha[0]:.3f} ± {sha[1]:.3f} | {ratio[0]:.3f} ± {ratio[1]:.3f} |")
    n = min(s["n"] for s in summary.values())
    lines.append(f"\nmean ± standard deviation over {n} seeds")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m minigpt compare [--seeds N] [--json OUT] [--methods full,lora,...] [--steps N] [--smoke]``."""
    parser = argparse.ArgumentParser(prog="python -m minigpt compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="seeds per method (default 3)")
    parser.add_argument("--steps", type=int, default=None, help=f"steps per run (default {DEFAULT_STEPS})")
    parser.add_argument("--rank", type=int, default=DEFAULT_RANK)
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--smoke", action="store_true", help="micro model, a few steps: seconds")
    parser.add_argument("--json", default=None, help="write one record per (method, seed) to this JSON file")
    parser.add_argument("--no-cache", action="store_true", help="recompute runs found in the cache")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.json and Path(args.json).exists() and not Path(args.json).is_file():
        parser.error(f"--json {args.json} exists and is not a file")
    start = time.perf_counter()
    try:
        records = run_comparison(args.methods, args.seeds, args.rank, args.alpha, args.steps,
                                 smoke=args.smoke or None, cache=not args.no_cache, progress=not args.no_progress)
    except UserError as err:
        parser.error(str(err))
    print(format_table(records))
    print(f"\n{len(records)} runs in {time.perf_counter() - start:.0f} s")
    if args.json:
        atomic_write_bytes(args.json, json.dumps(records, indent=2).encode())
        print(f"records: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
