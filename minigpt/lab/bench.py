"""Speed and memory benchmarks: our LoRA and DoRA against ``peft``'s, full fine-tuning, and merged
inference.

Run ``python -m minigpt bench`` (a minute or two on 2 CPU cores) or ``--smoke`` (seconds). Every
variant is built from the same randomly initialised mini GPT and fed the same batch; the timed
repeats are interleaved (variant 1, 2, ..., 1, 2, ...) after a warm-up, so a change in machine load
hits every variant alike, and the report gives medians and ratios, not single absolute times.

Everything runs in float32 on one device (the report names both). On a GPU every timed call is
synchronised, and each variant's peak memory is measured with only that variant resident (the
others wait on the CPU) and the allocator's peak reset.

Peak training memory: on CUDA, ``torch.cuda.max_memory_allocated`` over one training step. On CPU
there is no allocator counter, so :func:`training_memory` adds up what a step keeps alive:
parameters and buffers, gradients, AdamW's state (read from the optimizer after a real step) and the
peak of the activations that autograd saves for the backward pass (counted with
``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters excluded). It ignores
short-lived temporaries and allocator slack, so it is a lower bound that ranks methods the way a
real allocator would.

Goals: our LoRA/DoRA no slower than peft's and no more memory; merged-LoRA inference
within 3 % of the base model; LoRA's training memory below full fine-tuning's.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt._progress import tqdm
from minigpt.dora import replace_linear_with_dora
from minigpt.lora import merge_and_unload, replace_linear_with_lora
from minigpt.model import GPTConfig, GPTModel
from minigpt.train import choose_device

TRAINING_VARIANTS = ("full", "lora", "peft-lora", "dora", "peft-dora")


INFERENCE_VARIANTS = ("base", "lora-unmerged", "lora-merged")


# every linear layer but the head
TARGET_MODULES = (
    "query",
    "key",
    "value",
    "out_proj",
    "fc",
    "proj",
)


@dataclass(frozen=True)
class BenchSettings:
    preset: str = "tiny"
    batch_size: int = 16
    rank: int = 8
    alpha: float = 16.0
    warmup: int = 3
    repeats: int = 20
    seed: int = 0


SMOKE_SETTINGS = BenchSettings(preset="micro", batch_size=4, warmup=1, repeats=3)


class _SavedActivations:
    """Live bytes of the tensors autograd saves for backward, each storage counted once (its peak
    too)."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude  # storages of parameters and buffers: counted as parameters already
        self.live: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self.current = self.peak = 0

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self.exclude:
            return tensor
        entry = self.live.setdefault(ptr, [0, storage.nbytes()])
        if entry[0] == 0:
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        return _Held(tensor, ptr, self)

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[ptr]


class _Held:
    """A saved tensor; when autograd drops it (after backward, or with a discarded graph) it is
    uncounted."""

    __slots__ = ("tensor", "ptr", "meter")

    def __init__(self, tensor: torch.Tensor, ptr: int, meter: _SavedActivations):
        self.tensor, self.ptr, self.meter = tensor, ptr, meter

    def __del__(self):
        self.meter.release(self.ptr)


def _unique_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def training_memory(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] = _adamw,
    device: torch.device | str | None = None,
) -> dict[str, int]:
    """Bytes one AdamW training step of ``model`` on ``batch`` needs, by part (see the module
    docstring).

    Runs one real step on a deep copy (``model`` itself is not changed). Returns ``parameters``
    (parameters and buffers), ``gradients``, ``optimizer`` (AdamW's two moments and step counters),
    ``activations`` (peak live saved tensors), ``total`` (their sum) and, on CUDA, ``cuda_peak``
    from the allocator."""
    # The copy is made where ``model`` is, then moved: on ``device`` (default: the model's) only
    # the copy is resident while the step is measured when ``model`` lives elsewhere.
    model = copy.deepcopy(model).train()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    batch = tuple(t.to(device) for t in batch)
    optimizer = make_optimizer(model)
    weights = [*model.parameters(), *model.buffers()]
    meter = _SavedActivations({t.untyped_storage().data_ptr() for t in weights})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        loss = _loss(model, batch)
    loss.backward()
    del loss
    optimizer.step()
    result = {
        "parameters": _unique_bytes(weights),
        "gradients": _unique_bytes(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer": _unique_bytes(
            v
            for state in optimizer.state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor)
        ),
        "activations": meter.peak,
    }
    result["total"] = sum(result.values())
    if device.type == "cuda":
        result["cuda_peak"] = torch.cuda.max_memory_allocated(device)
    return result


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device; empty for a CPU."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _training_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch) -> None:
    loss = _loss(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def interleaved_times(
    steps: dict[str, Callable[[], None]],
    warmup: int,
    repeats: int,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` times after ``warmup`` calls, in round-robin
    order."""
    device = torch.device(device)
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in tqdm(range(repeats), desc="repeats", disable=not progress, leave=False):
        for name, fn in steps.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _peft_variant(model: nn.Module, rank: int, alpha: float, use_dora: bool) -> nn.Module:
    from peft import (  # optional dependency, only the benchmark needs it
        LoraConfig,
        get_peft_model,
    )

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(TARGET_MODULES),
        use_dora=use_dora,
    )
    return get_peft_model(model, config)


def build_training_variants(
    base: nn.Module, rank: int, alpha: float, variants: tuple[str, ...] = TRAINING_VARIANTS
) -> dict[str, nn.Module]:
    """Deep copies of ``base``: fully trainable, or with our / peft's LoRA or DoRA on every linear
    but the head.

    The adapters get the same random ``A`` (seeded) in ours and peft's; ``B = 0`` in both.
    """
    models = {}
    for name in variants:
        model = copy.deepcopy(base)
        torch.manual_seed(0)
        if name == "full":
            model.requires_grad_(True)
        elif name == "lora":
            replace_linear_with_lora(model, rank, alpha, target_modules=TARGET_MODULES)
        elif name == "dora":
            replace_linear_with_dora(model, rank, alpha, target_modules=TARGET_MODULES)
        elif name in ("peft-lora", "peft-dora"):
            model = _peft_variant(model, rank, alpha, use_dora=name == "peft-dora")
        else:
            raise ValueError(f"variants entries must be in {TRAINING_VARIANTS}, got {name!r}")
        models[name] = model.train()
    return models


def random_batch(
    cfg: GPTConfig, batch_size: int, seed: int = 0, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of shape (batch_size, context_length), uniform random token
    ids."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(cfg.vocab_size, (batch_size, cfg.context_length + 1), generator=generator)
    return ids[:, :-1].to(device), ids[:, 1:].to(device)


def _check_settings(settings: BenchSettings) -> None:
    for name in ("batch_size", "rank", "repeats"):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if (
        isinstance(settings.warmup, bool)
        or not isinstance(settings.warmup, int)
        or settings.warmup < 0
    ):
        raise ValueError(f"warmup must be an integer >= 0, got {settings.warmup!r}")


def run_benchmarks(
    settings: BenchSettings = BenchSettings(), device: str | None = None, progress: bool = True
) -> dict:
    """Training step time/memory of every training variant and inference time of
    base/unmerged/merged LoRA.

    Returns ``{"settings", "device", "tokens_per_batch", "training": {variant: {...}}, "inference":
    {variant: {...}}}`` with per-variant ``median_s``, ``times`` and (training) ``tokens_per_s`` and
    ``memory`` (see :func:`training_memory`).
    """
    _check_settings(settings)
    device = choose_device(device)
    torch.manual_seed(settings.seed)
    cfg = GPTConfig.from_preset(settings.preset)
    base = GPTModel(cfg)  # on the CPU until each variant is measured
    batch = random_batch(cfg, settings.batch_size, settings.seed, device)
    tokens = batch[0].numel()

    models = build_training_variants(base, settings.rank, settings.alpha)
    memory = {}
    for name, model in models.items():  # alone on the device: its copy is all that is resident
        memory[name] = training_memory(model, batch, device=device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base.to(device)
    for model in models.values():
        model.to(device)
    optimizers = {name: _adamw(model) for name, model in models.items()}
    train_times = interleaved_times(
        {
            name: (lambda m=model, o=optimizers[name]: _training_step(m, o, batch))
            for name, model in models.items()
        },
        settings.warmup,
        settings.repeats,
        device,
        progress,
    )
    training = {}
    for name in models:
        median = statistics.median(train_times[name])
        training[name] = {
            "median_s": median,
            "times": train_times[name],
            "tokens_per_s": tokens / median,
            "memory": memory[name],
        }

    # inference: the same trained-looking LoRA (B made non-zero so merging really changes the
    # weights)
    unmerged = copy.deepcopy(base)
    replace_linear_with_lora(unmerged, settings.rank, settings.alpha, target_modules=TARGET_MODULES)
    with torch.no_grad():
        for name, param in unmerged.named_parameters():
            if name.endswith("lora.B"):
                param.normal_(0.0, 0.01)
    # deployment: the base model's modules, merged weights
    merged = merge_and_unload(copy.deepcopy(unmerged))
    inference_models = {
        "base": base.eval(),
        "lora-unmerged": unmerged.eval(),
        "lora-merged": merged.eval(),
    }
    with torch.no_grad():
        max_diff = (unmerged(batch[0]) - merged(batch[0])).abs().max().item()
        infer_times = interleaved_times(
            {name: (lambda m=m: m(batch[0])) for name, m in inference_models.items()},
            settings.warmup,
            settings.repeats,
            device,
            progress,
        )
    inference = {
        name: {
            "median_s": statistics.median(t),
            "times": t,
            "tokens_per_s": tokens / statistics.median(t),
        }
        for name, t in infer_times.items()
    }
    return {
        "settings": settings,
        "device": str(device),
        "device_name": device_name(device),
        "precision": "fp32",  # every variant runs in float32: no autocast in the benchmark
        "tokens_per_batch": tokens,
        "training": training,
        "inference": inference,
        "merge_max_abs_diff": max_diff,
    }


def goals(result: dict) -> list[tuple[str, float, bool]]:
    """``(goal, measured ratio, met)`` for the four goals (ratios < 1 mean ours is
    faster/smaller)."""
    train, infer = result["training"], result["inference"]
    rows = []
    for ours, theirs in (("lora", "peft-lora"), ("dora", "peft-dora")):
        speed = train[ours]["median_s"] / train[theirs]["median_s"]
        rows.append((f"{ours} step time / {theirs} <= 1", speed, speed <= 1.0))
        mem = train[ours]["memory"]["total"] / train[theirs]["memory"]["total"]
        rows.append((f"{ours} memory / {theirs} <= 1", mem, mem <= 1.0))
    merged = infer["lora-merged"]["median_s"] / infer["base"]["median_s"]
    rows.append(("merged-LoRA inference / base <= 1.03", merged, merged <= 1.03))
    mem = train["lora"]["memory"]["total"] / train["full"]["memory"]["total"]
    rows.append(("lora memory / full memory < 1", mem, mem < 1.0))
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def format_report(result: dict) -> str:
    """Plain-text tables: training (time, tokens/s, memory parts, ratios), inference, goals."""
    s = result["settings"]
    train, infer = result["training"], result["inference"]
    lines = [
        f"model preset {s.preset!r}, batch {s.batch_size} x "
        f"{result['tokens_per_batch'] // s.batch_size} tokens, "
        f"rank {s.rank}, alpha {s.alpha:g}, device {result['device']}"
        + (f" ({result['device_name']})" if result.get("device_name") else "")
        + f", {result.get('precision', 'fp32')}, median of {s.repeats} repeats after "
        f"{s.warmup} warm-up",
        "",
        f"{'training':<11}{'ms/step':>9}{'tokens/s':>10}{'vs full':>9}{'vs peft':>9}"
        f"{'memory MiB':>12}"
        f"{'params':>8}{'grads':>8}{'optim':>8}{'activ':>8}{'mem vs full':>13}",
    ]
    full = train["full"]
    for name, row in train.items():
        peft_name = f"peft-{name}" if f"peft-{name}" in train else None
        vs_peft = f"{row['median_s'] / train[peft_name]['median_s']:.2f}x" if peft_name else "-"
        m = row["memory"]
        lines.append(
            f"{name:<11}{1000 * row['median_s']:>9.1f}{row['tokens_per_s']:>10,.0f}"
            f"{row['median_s'] / full['median_s']:>8.2f}x{vs_peft:>9}{_mib(m['total']):>12}"
            f"{_mib(m['parameters']):>8}{_mib(m['gradients']):>8}{_mib(m['optimizer']):>8}"
            f"{_mib(m['activations']):>8}{m['total'] / full['memory']['total']:>12.2f}x"
        )
    if "cuda_peak" in full["memory"]:
        lines.append(
            "cuda max_memory_allocated MiB (each variant alone on the device): "
            + ", ".join(f"{name} {_mib(row['memory']['cuda_peak'])}" for name, row in train.items())
        )
    lines += ["", f"{'inference':<15}{'ms/batch':>10}{'tokens/s':>11}{'vs base':>9}"]
    for name, row in infer.items():
        lines.append(
            f"{name:<15}{1000 * row['median_s']:>10.2f}{row['tokens_per_s']:>11,.0f}"
            f"{row['median_s'] / infer['base']['median_s']:>8.3f}x"
        )
    lines.append(
        f"merged vs unmerged outputs: max |difference| = {result['merge_max_abs_diff']:.2e}"
    )
    lines += ["", "targets (a single timing run moves by a few percent; repeat before concluding):"]
    for goal, ratio, met in goals(result):
        verdict = "within" if met else "outside"
        lines.append(f"  {goal:<42} measured {ratio:.3f}: {verdict} the target")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m minigpt bench [--smoke] [--repeats N] [--batch-size B] [--rank R] [--device
    D] [--json OUT]``."""
    from dataclasses import asdict

    from minigpt._cli import make_parser, path_arg
    from minigpt.device import check_record_destination, run_record, write_run_record

    argv = sys.argv[1:] if argv is None else list(argv)

    defaults = BenchSettings()
    parser = make_parser(
        "python -m minigpt bench",
        __doc__.split("\n\n")[0],
        "python -m minigpt bench --smoke --device cpu",
    )
    parser.add_argument("--smoke", action="store_true", help="micro model, 3 repeats: seconds")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed repeats per variant, median reported (default: {defaults.repeats})",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"untimed calls per variant first (default: {defaults.warmup})",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help=f"batch size (default: {defaults.batch_size})"
    )
    parser.add_argument(
        "--rank", type=int, default=None, help=f"adapter rank (default: {defaults.rank})"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--json",
        default=None,
        type=path_arg,
        help="also write the settings, every measurement and the machine to this JSON file "
        "(default: none; docs/records/bench.json feeds docs/results.md)",
    )
    args = parser.parse_args(argv)
    settings = SMOKE_SETTINGS if args.smoke else BenchSettings()
    overrides = {
        k: v
        for k, v in (
            ("repeats", args.repeats),
            ("warmup", args.warmup),
            ("batch_size", args.batch_size),
            ("rank", args.rank),
        )
        if v is not None
    }
    settings = BenchSettings(**{**settings.__dict__, **overrides})
    try:
        _check_settings(settings)
        # 'tpu', or 'cuda' without one, is a usage error, not a traceback
        choose_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    if args.json is not None:  # before the benchmarks; one line from the command line's handler
        check_record_destination(args.json, "--json", "bench")
    try:
        import peft  # noqa: F401 - the bench compares against it
    except ImportError:
        parser.error(
            "the bench compares against peft, which is not installed: pip install '.[notebooks]'"
        )
    start = time.perf_counter()
    result = run_benchmarks(settings, args.device, progress=not args.no_progress)
    print(format_report(result))
    seconds = time.perf_counter() - start
    print(f"\nbenchmark wall time {seconds:.1f} s")
    if args.json is not None:
        payload = {
            "smoke": args.smoke,
            "settings": asdict(settings),
            "seconds": seconds,
            "result": result,
        }
        write_run_record(args.json, run_record("bench", "bench", argv, payload))
        print(f"record: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
