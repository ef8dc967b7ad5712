"""The figures of ``scripts/gpu_check.sh``: one step per call, each writing JSON into OUT.

    python scripts/gpu_check.py env OUT --device cuda
    python scripts/gpu_check.py pretrain OUT --device cuda [--smoke] [--steps N]
    python scripts/gpu_check.py lab OUT --device cuda [--smoke]
    python scripts/gpu_check.py chapters OUT --device cuda [--smoke] [--chapters 05,06,08]

``pretrain`` trains the course's recipe (shortened to ``--steps``) on the device in bf16 and in fp32
and on the CPU in fp32 as the reference, and reports losses, tokens/s and the differences; without
``--smoke`` it also trains the full recipe on the device through ``get_pretrained`` (which caches
it for ``lab``). ``lab`` times one fine-tuning run of the lab and checks that base, run and cached
model share the device. ``chapters`` executes chapters in smoke mode from an empty cache. A step
exits with status 1 when a figure breaks the device contract (a model on the wrong device, a
non-finite loss, a loss far from the CPU reference); the figures are written first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

# A loss within this many nats per token of the CPU reference counts as agreeing: runs on different
# hardware take different rounding paths, so their trajectories part after a few hundred steps.
LOSS_TOLERANCE = 0.1


def write(out: Path, name: str, figures: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    print(json.dumps(figures, indent=2, default=str))


def device_of(model) -> str:
    return str(next(model.parameters()).device)


def env(out: Path, device: str) -> int:
    import numpy as np
    import torch

    from minigpt.train import choose_device, cpu_has_native_bf16, resolve_precision

    chosen = choose_device(device)
    figures = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "device": str(chosen),
        "precision_auto": resolve_precision("auto", chosen),
        "MINIGPT_PRECISION": os.environ.get("MINIGPT_PRECISION"),
    }
    if chosen.type == "cuda":
        figures.update(
            device_name=torch.cuda.get_device_name(chosen),
            capability=".".join(map(str, torch.cuda.get_device_capability(chosen))),
            memory_gib=round(torch.cuda.get_device_properties(chosen).total_memory / 2**30, 1),
            device_count=torch.cuda.device_count(),
        )
    write(out, "env", figures)
    return 0


def _pretrain_once(recipe, device: str, precision: str) -> dict:
    import numpy as np
    import torch

    from minigpt.lab.pretrained import pretrain, shakespeare_split
    from minigpt.tokenizer import get_compact_vocab
    from minigpt.train import nats_per_character

    model, history = pretrain(replace(recipe, precision=precision), progress=False, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    val_ids = shakespeare_split()[1][:20_000]
    measured = nats_per_character(model, val_ids, get_compact_vocab().decode)
    return {
        "device": device,
        "model_device": device_of(model),
        "precision": history.precision,
        "steps": len(history.steps),
        "seconds": round(history.seconds, 2),
        "tokens_per_s": round(history.tokens / history.seconds),
        "train_loss_last20": float(np.mean(history.train_loss[-20:])),
        "val_loss": history.val_loss,
        "nats_per_char_20k": measured["nats_per_char"],
    }


def pretrain_check(out: Path, device: str, smoke: bool, steps: int | None) -> int:
    from minigpt.lab.pretrained import SMOKE, TINY, get_pretrained, shakespeare_split
    from minigpt.tokenizer import get_compact_vocab
    from minigpt.train import nats_per_character

    recipe = SMOKE if smoke else TINY
    if steps is not None:
        recipe = replace(recipe, steps=steps)
    runs = {
        f"{device}-bf16": _pretrain_once(recipe, device, "bf16"),
        f"{device}-fp32": _pretrain_once(recipe, device, "fp32"),
        "cpu-fp32 (reference)": _pretrain_once(recipe, "cpu", "fp32"),
    }
    reference = runs["cpu-fp32 (reference)"]["val_loss"][-1]
    problems = []
    for name, run in runs.items():
        run["val_loss_minus_cpu"] = run["val_loss"][-1] - reference
        if not all(math.isfinite(v) for v in run["val_loss"]):
            problems.append(f"{name}: non-finite validation loss")
        elif abs(run["val_loss_minus_cpu"]) > LOSS_TOLERANCE:
            problems.append(
                f"{name}: final validation loss {run['val_loss_minus_cpu']:+.3f} from CPU"
            )
        if run["model_device"].split(":")[0] != run["device"].split(":")[0]:
            problems.append(f"{name}: model ended on {run['model_device']}")
    figures = {"recipe": asdict(recipe), "tolerance": LOSS_TOLERANCE, "runs": runs}
    if not smoke:  # the course's own base, as chapters 06-10 get it (and cached for the lab step)
        start = time.perf_counter()
        model = get_pretrained(smoke=False, progress=False, device=device)
        seconds = time.perf_counter() - start
        full = nats_per_character(model, shakespeare_split()[1], get_compact_vocab().decode)
        again = get_pretrained(smoke=False, progress=False, device=device)
        figures["full_recipe"] = {
            "recipe": asdict(TINY),
            "seconds_with_caching": round(seconds, 1),
            "nats_per_char": full["nats_per_char"],
            "trained_on": device_of(model),
            "cached_on": device_of(again),
        }
        if device_of(model) != device_of(again):
            problems.append("get_pretrained: trained and cached models on different devices")
    figures["problems"] = problems
    write(out, "pretrain", figures)
    return 1 if problems else 0


def lab_check(out: Path, device: str, smoke: bool) -> int:
    import torch

    from minigpt.lab.lab import Lab
    from minigpt.lab.runs import LR_GRID, SMOKE_LR_GRID

    start = time.perf_counter()
    lab = Lab(smoke=smoke, device=device)
    ready = time.perf_counter() - start
    spec = lab.spec("lora", (SMOKE_LR_GRID if smoke else LR_GRID)[1])
    start = time.perf_counter()
    record = lab.run(spec)
    if lab.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    cached = lab.model(spec)
    devices = {
        "base": device_of(lab.base),
        "cached_model": device_of(cached),
        "trained_model": device_of(lab._train(spec)[0]),
    }
    keys = (
        "task_accuracy",
        "val_accuracy",
        "domain_loss",
        "shakespeare_loss",
        "shakespeare_loss_before",
        "delta_ratio",
        "seconds",
    )
    figures = {
        "device": str(lab.device),
        "precision": lab.precision,
        "workers": lab.workers,
        "spec": asdict(spec),
        "lab_ready_seconds": round(ready, 1),
        "run_seconds_with_measurements": round(seconds, 1),
        "record": {key: record[key] for key in keys},
        "devices": devices,
        "cache_folder": str(lab.folder),
    }
    problems = [f"{k} on {v}" for k, v in devices.items() if v.split(":")[0] != lab.device.type]
    if lab.device.type != "cpu" and lab.workers != 1:
        problems.append(f"{lab.workers} worker processes on {lab.device}")
    figures["problems"] = problems
    write(out, "lab", figures)
    return 1 if problems else 0


def chapters_check(out: Path, device: str, smoke: bool, chapters: list[str]) -> int:
    import nbformat

    from minigpt.course.chapters import chapter_paths
    from minigpt.course.execute import execute_notebook

    paths = {p.name[:2]: p for p in chapter_paths()}
    folder = out / "chapters"
    folder.mkdir(parents=True, exist_ok=True)
    figures, problems = {"device": device, "smoke": smoke, "chapters": {}}, []
    for number in chapters:
        path = paths[number]
        start = time.perf_counter()
        try:
            nb = execute_notebook(path, smoke=smoke, cwd=path.parent)
            error = None
        except Exception as err:  # noqa: BLE001 - recorded as a figure, then the next chapter
            nb, error = None, f"{type(err).__name__}: {str(err)[-2000:]}"
        seconds = round(time.perf_counter() - start, 1)
        first = ""
        if nb is not None:
            nbformat.write(nb, folder / path.name)
            text = "".join(
                o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
            )
            first = next((ln for ln in text.splitlines() if ln.startswith("device:")), "")
            if f"device: {device}" not in first:
                problems.append(f"{path.name}: first cell reports {first!r}")
        if error:
            problems.append(f"{path.name}: {error.splitlines()[0] if error else ''}")
        figures["chapters"][path.name] = {"seconds": seconds, "device_line": first, "error": error}
    figures["problems"] = problems
    write(out, "chapters", figures)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("env", "pretrain", "lab", "chapters"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="smoke sizes (the dry run)")
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps per run")
    parser.add_argument("--chapters", default="05,06,08")
    args = parser.parse_args(argv)
    if args.step == "env":
        return env(args.out, args.device)
    if args.step == "pretrain":
        return pretrain_check(args.out, args.device, args.smoke, args.steps)
    if args.step == "lab":
        return lab_check(args.out, args.device, args.smoke)
    return chapters_check(args.out, args.device, args.smoke, args.chapters.split(","))


if __name__ == "__main__":
    sys.exit(main())
