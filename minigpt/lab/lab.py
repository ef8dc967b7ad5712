"""The :class:`Lab`: runs cached on disk under a key of their full configuration, trained in worker
processes when several are asked for at once, and the ``compare`` command built on it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
import warnings
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import torch.nn as nn
from safetensors.torch import load as load_safetensors

from minigpt._validate import UserError, check_float, check_int
from minigpt.device import check_record_destination, plain_json, run_record, write_run_record
from minigpt.io import (
    DIGEST_KEY,
    atomic_write_bytes,
    cache_dir,
    writable_cache_dir,
)
from minigpt.lab.pool import LabPool, lab_workers
from minigpt.lab.report import best_lr, format_table
from minigpt.lab.runs import (
    DEFAULT_ALPHA,
    DEFAULT_RANK,
    DEFAULT_SEEDS,
    DEFAULT_STEPS,
    EVAL_BATCHES,
    LAB_PRECISION,
    LAB_VERSION,
    LR_GRID,
    METHODS,
    RECORD_KEYS,
    SMOKE_BATCH_SIZE,
    SMOKE_LR_GRID,
    SMOKE_STEPS,
    RunSpec,
    curve_point,
    finetune,
    prepare_model,
    trainable_bytes,
)
from minigpt.lab.task import (
    finetune_data,
    measure,
)
from minigpt.train import (
    choose_device,
    resolve_precision,
)

if TYPE_CHECKING:
    from minigpt.lab.pretrained import Recipe


# Bounds that keep a typo from starting days of runs (or allocating a rank larger than any
# layer): the lab's models are at most 128 wide.
MAX_SEEDS, MAX_RANK = 100, 1024


def _train_in_worker(state: dict, spec: RunSpec) -> tuple[dict, bytes | None]:
    """One run in a :class:`~minigpt.lab.pool.LabPool` worker: its record, and seed 0's trainable
    tensors."""
    model, record = finetune(
        state["base"], spec, state["data"], state["eval_batches"], start=state["start"]
    )
    return record, trainable_bytes(model) if spec.seed == 0 else None


def _record_sha256(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _entry_problem(entry, spec: RunSpec, run: dict) -> str | None:
    """What is wrong with a lab cache entry for ``spec`` (None: it is a verified record of it).

    ``run`` is everything the entry's key stands for (:meth:`Lab._run_config`): the entry must
    record the same, so a record copied from another run (another rank, recipe, ...) is refused.
    """
    if not isinstance(entry, dict):
        return f"holds a JSON {type(entry).__name__}, not a run record"
    digest = entry.get(DIGEST_KEY)
    if not (isinstance(digest, dict) and isinstance(digest.get("record"), str)):
        return "records no digest"
    if not isinstance(digest.get("run"), dict):
        return "records no run configuration, so it cannot be told from another run's"
    if digest["run"] != run:
        return "is the record of another run (its recorded configuration differs)"
    record = {key: value for key, value in entry.items() if key != DIGEST_KEY}
    if _record_sha256(record) != digest["record"]:
        return "does not match its digest (edited or damaged)"
    if not (digest.get("weights") is None or isinstance(digest.get("weights"), str)):
        return "has an unreadable weights digest"
    missing = [key for key in RECORD_KEYS if key not in record]
    if missing:
        return f"lacks {missing}"
    for key in RECORD_KEYS:
        value, number = record[key], (int, float)
        wanted = str if key == "method" else number
        if isinstance(value, bool) or not isinstance(value, wanted):
            return f"holds {key}={value!r}, not a {'string' if wanted is str else 'number'}"
    fields = ("method", "seed", "lr", "rank", "alpha", "steps")
    if any(record[key] != getattr(spec, key) for key in fields):
        return "is the record of another run"
    return None


class Lab:
    """The pretrained base, the data and the run cache, shared by every experiment of chapters
    06-10.

    ``smoke`` shrinks everything to seconds (micro model, a few steps, a few prompts); ``cache``
    False recomputes every run. Runs asked for together train :attr:`workers` at a time
    (:func:`lab_workers`).

    ``device`` (None: the GPU when there is one, see :func:`~minigpt.train.choose_device`) is where
    :attr:`base` lives and where every run trains and is measured, baselines included, in
    :attr:`precision`; both are part of every cache key. On a GPU the runs train here, one after
    another; worker processes are for CPUs only. Models from :meth:`model` are on that device,
    cached or trained.
    """

    def __init__(
        self,
        smoke: bool | None = None,
        cache: bool = True,
        progress: bool = False,
        device: str | None = None,
    ):
        from minigpt import smoke_mode
        from minigpt.lab.pretrained import get_pretrained

        self.smoke = smoke_mode() if smoke is None else bool(smoke)
        self.cache = cache
        self.progress = progress
        # Everything the lab trains and measures, baselines included, runs on this device in the
        # precision resolved for it: the GPU when there is one (choose_device).
        self.device = choose_device(device)
        self.folder = cache_dir("runs", self.recipe.name)
        if cache:  # before the base is trained or any run: a cache that cannot be written fails now
            writable_cache_dir("runs", self.recipe.name)
        self.base = get_pretrained(smoke=self.smoke, progress=progress, device=str(self.device))
        self.base.eval()
        data = finetune_data()
        if self.smoke:
            data = dataclasses.replace(
                data, task_eval=data.task_eval[:8], task_val=data.task_val[:8]
            )
        self.data = data
        self.eval_batches = 2 if self.smoke else EVAL_BATCHES
        self.grid = SMOKE_LR_GRID if self.smoke else LR_GRID
        # Worker processes only on a CPU: there one single-threaded run per core fills the machine;
        # a GPU runs one run's kernels well, and each worker would hold its own CUDA context.
        self.workers = lab_workers(self.smoke) if self.device.type == "cpu" else 1
        self.precision = resolve_precision(LAB_PRECISION, self.device)
        self._pool: LabPool | None = None
        self._before: dict | None = None
        self._start: dict | None = None

    @property
    def recipe(self) -> Recipe:
        """The pretraining recipe of :attr:`base`, on this lab's device."""
        from minigpt.lab.pretrained import recipe_for

        return dataclasses.replace(recipe_for(self.smoke), device=str(self.device))

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

    def _key_config(self, spec: RunSpec) -> dict:
        config = {
            **dataclasses.asdict(spec),
            "lab": LAB_VERSION,
            "eval_batches": self.eval_batches,
            "precision": self.precision,
        }
        if self.device.type != "cpu":  # off the CPU only: CPU keys stay as short as they are
            config["device"] = self.device.type
        return config

    def _run_config(self, spec: RunSpec) -> dict:
        """Everything an entry of ``spec`` stands for, as its JSON reads back: the key's fields
        and the pretraining recipe (the cache folder's name); every entry records it."""
        config = {**self._key_config(spec), "recipe": self.folder.name}
        return json.loads(json.dumps(config, sort_keys=True))

    def _path(self, spec: RunSpec) -> Path:
        config = self._key_config(spec)
        key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
        return self.folder / f"{spec.method}-{key}.json"

    def _store(self, spec: RunSpec, record: dict, weights: bytes | None) -> None:
        if not self.cache:
            return
        path = self._path(spec)
        entry = {
            **record,
            DIGEST_KEY: {
                "record": _record_sha256(record),
                "weights": None if weights is None else hashlib.sha256(weights).hexdigest(),
                "run": self._run_config(spec),
            },
        }
        try:
            # written before the record: a record in the cache always has its weights
            if weights is not None:
                atomic_write_bytes(path.with_suffix(".safetensors"), weights)
            atomic_write_bytes(path, json.dumps(entry).encode())
        except (OSError, UserError) as err:  # the record is returned all the same
            warnings.warn(
                f"could not cache the {spec.method} run in {path} ({err}); its result is kept for "
                "this session and the run is trained again next time",
                stacklevel=4,
            )

    def _load_weights(self, spec: RunSpec) -> nn.Module | None:
        path = self._path(spec).with_suffix(".safetensors")
        entry = self._entry(spec)
        if entry is None or not path.is_file():
            return None
        data, problem = None, None
        try:
            data = path.read_bytes()  # read once: hashed, then parsed from memory
        except OSError as err:
            problem = f"cannot be read ({err})"
        if data is not None and hashlib.sha256(data).hexdigest() != entry[DIGEST_KEY]["weights"]:
            problem = "does not match the digest its record holds"
        model = prepare_model(
            self.base, spec.method, spec.rank, spec.alpha, spec.seed, spec.targets
        )
        expected = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if problem is None:
            try:
                saved = load_safetensors(data)
                if set(saved) != set(expected):
                    problem = "holds other tensors than the run trains"
                else:
                    wrong = [
                        f"{name} {tuple(saved[name].shape)}, not {tuple(tensor.shape)}"
                        for name, tensor in expected.items()
                        if saved[name].shape != tensor.shape
                    ]
                    if wrong:
                        problem = f"holds tensors of other shapes than the run's ({wrong[0]})"
                    else:
                        model.load_state_dict(saved, strict=False)
            except Exception as err:  # noqa: BLE001 - safetensors' and torch's own error types
                problem = f"cannot be loaded ({err})"
        if problem is not None:
            warnings.warn(
                f"lab cache weights {path} {problem}; the run is trained again", stacklevel=3
            )
            return None
        return model.eval()

    def _entry(self, spec: RunSpec) -> dict | None:
        """The cache file of ``spec`` as stored (record and digest), verified; None when absent or
        unusable, with a warning saying why (the run is then trained again and the entry
        replaced)."""
        path = self._path(spec)
        if not (self.cache and path.is_file()):
            return None
        try:
            entry = json.loads(path.read_bytes().decode("utf-8"))
            problem = _entry_problem(entry, spec, self._run_config(spec))
        except (OSError, ValueError) as err:  # ValueError: bad JSON or bytes that are not UTF-8
            problem = f"cannot be read ({err})"
        if problem is None:
            return entry
        warnings.warn(
            f"lab cache entry {path} {problem}; the run is trained again and the entry replaced",
            stacklevel=4,
        )
        return None

    def _cached(self, spec: RunSpec) -> dict | None:
        entry = self._entry(spec)
        if entry is None:
            return None
        entry.pop(DIGEST_KEY)
        return entry

    def run(self, spec: RunSpec) -> dict:
        """The record of ``spec``, from the cache when this exact run was done before."""
        return self.runs([spec])[0]

    def runs(self, specs: list[RunSpec]) -> list[dict]:
        """The records of ``specs``, in order: cached ones read back, the others trained
        :attr:`workers` at a time in worker processes (:mod:`minigpt.lab.pool`), or here when one
        worker is all there is."""
        records = {spec: self._cached(spec) for spec in specs}
        missing = [spec for spec, record in records.items() if record is None]
        if len(missing) > 1 and self.workers > 1:
            if self._pool is None:
                state = {
                    "base": self.base,
                    "data": self.data,
                    "eval_batches": self.eval_batches,
                    "start": self.start(),
                }
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
        model, record = finetune(
            self.base, spec, self.data, self.eval_batches, self.progress, self.start(), self.device
        )
        return model, self._finish(spec, record, trainable_bytes(model) if spec.seed == 0 else None)

    def model(self, spec: RunSpec) -> nn.Module:
        """The fine-tuned model of ``spec``: seed 0's weights come from the cache, other seeds train
        again."""
        if self._path(spec).is_file():
            cached = self._load_weights(spec)
            if cached is not None:
                return cached
        return self._train(spec)[0]

    def tune(
        self, method: str, grid: tuple[float, ...] | None = None, **changes
    ) -> tuple[float, list[dict]]:
        """Seed 0 at every learning rate of ``grid``; the best by validation accuracy (ties: lower
        train loss)."""
        grid = grid or self.grid
        records = self.runs([self.spec(method, lr, 0, **changes) for lr in grid])
        return best_lr(records), records

    def seeds(self, method: str, lr: float, seeds: int = DEFAULT_SEEDS, **changes) -> list[dict]:
        """One record per seed 0 .. ``seeds``-1 at ``lr``."""
        return self.runs([self.spec(method, lr, seed, **changes) for seed in range(seeds)])


def run_comparison(
    methods=METHODS,
    seeds: int = DEFAULT_SEEDS,
    rank: int = DEFAULT_RANK,
    alpha: float = DEFAULT_ALPHA,
    steps: int | None = None,
    grid: tuple[float, ...] | None = None,
    smoke: bool | None = None,
    cache: bool = True,
    progress: bool = False,
    every_rate: bool = True,
) -> list[dict]:
    """Every method on every learning rate of ``grid`` (seed 0), each method's rate chosen on the
    validation prompts, then ``seeds`` seeds: at every rate (``every_rate``, the whole
    learning-forgetting front with its spread) or at the chosen rate only.

    Returns one record per (method, lr, seed) with :data:`RECORD_KEYS`, ``diverged_at``, the
    ``curve`` and ``chosen`` (whether the rate is the method's choice).
    """
    if isinstance(methods, str):
        methods = tuple(m.strip() for m in methods.split(",") if m.strip())
    methods = tuple(methods)
    if not methods or len(set(methods)) != len(methods) or not set(methods) <= set(METHODS):
        raise UserError(f"methods must be distinct names from {METHODS}, got {list(methods)}")
    check_int("seeds", seeds, 1, MAX_SEEDS)
    changes = {
        "rank": check_int("rank", rank, 1, MAX_RANK),
        "alpha": check_float("alpha", alpha, 0.0, strict_min=True),
    }
    if steps is not None:
        changes["steps"] = check_int("steps", steps, 1)
    # after the checks: a bad argument must not cost a pretraining run
    lab = Lab(smoke, cache, progress)
    grid = tuple(grid or lab.grid)
    start = time.perf_counter()
    # all at once, so that the workers stay busy
    tuning = lab.runs([lab.spec(method, lr, 0, **changes) for method in methods for lr in grid])
    chosen = {method: best_lr([r for r in tuning if r["method"] == method]) for method in methods}
    specs = [
        lab.spec(method, lr, seed, **changes)
        for method in methods
        for lr in grid
        for seed in range(seeds)
        if every_rate or seed == 0 or lr == chosen[method]
    ]
    records = lab.runs(specs)
    if progress:
        lrs = ", ".join(f"{method} {lr:g}" for method, lr in chosen.items())
        print(
            f"learning rates: {lrs} ({time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    return [
        {
            **{key: r[key] for key in RECORD_KEYS},
            "diverged_at": r.get("diverged_at"),
            "curve": r["curve"],
            "chosen": r["lr"] == chosen[r["method"]],
        }
        for r in records
    ]


def chosen_records(records: list[dict]) -> list[dict]:
    """The records at each method's chosen rate (what the head-to-head table shows)."""
    return [r for r in records if r.get("chosen", True)]


def main(argv: list[str] | None = None) -> int:
    """``python -m minigpt compare [--seeds N] [--json OUT] [--methods full,lora,...] [--steps N]
    [--smoke]``."""
    from minigpt._cli import make_parser, path_arg

    parser = make_parser(
        "python -m minigpt compare",
        "Fine-tune the pretrained model with every method (full, LoRA, rsLoRA, PiSSA, DoRA) at the "
        "same budget and print the head-to-head table of chapter 10.",
        "python -m minigpt compare --smoke --seeds 1 --methods lora,dora --json out.json",
    )
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="seeds per method")
    parser.add_argument(
        "--steps", type=int, default=None, help=f"steps per run (default: {DEFAULT_STEPS})"
    )
    parser.add_argument("--rank", type=int, default=DEFAULT_RANK, help="adapter rank r")
    parser.add_argument(
        "--alpha", type=float, default=DEFAULT_ALPHA, help="adapter scale alpha (alpha/r)"
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of the methods"
    )
    parser.add_argument("--smoke", action="store_true", help="micro model, a few steps: seconds")
    parser.add_argument(
        "--json",
        default=None,
        type=path_arg,
        help="write one record per run to this JSON file (default: none)",
    )
    parser.add_argument("--no-cache", action="store_true", help="recompute runs found in the cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.json is not None:  # before the runs: a bad destination must not cost them
        try:
            check_record_destination(args.json, "--json", "compare")
        except UserError as err:
            parser.error(str(err))
    from minigpt import smoke_mode

    smoke = args.smoke or smoke_mode()  # MINIGPT_SMOKE=1 shrinks the runs as --smoke does
    start = time.perf_counter()
    try:
        records = run_comparison(
            args.methods,
            args.seeds,
            args.rank,
            args.alpha,
            args.steps,
            smoke=args.smoke or None,
            cache=not args.no_cache,
            progress=not args.no_progress,
        )
    except UserError as err:
        parser.error(str(err))
    print(format_table(chosen_records(records)))
    print(f"\n{len(records)} runs in {time.perf_counter() - start:.0f} s")
    if args.json is not None:
        document = run_record(
            "compare",
            "compare",
            sys.argv[1:] if argv is None else argv,
            {
                "smoke": smoke,
                "settings": {
                    "rank": args.rank,
                    "alpha": args.alpha,
                    "steps": records[0]["steps"],
                    "grid": sorted({r["lr"] for r in records}),
                    "seeds": args.seeds,
                    "eval_tokens": (2 if smoke else EVAL_BATCHES) * 32 * 32,
                },
                "chosen": {r["method"]: r["lr"] for r in records if r["chosen"]},
                "records": plain_json(records),
            },
        )
        write_run_record(args.json, document)
        print(f"records: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
