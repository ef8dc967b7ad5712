"""The measured-results page, ``docs/results.md``, rendered from the committed records.

Each measuring command writes a JSON record with ``--json`` (``train``, ``compare``,
``dora-analysis``, ``bench``, ``course``): the machine it ran on, the date, the command, whether it
was a smoke run and every number it measured. :func:`render` turns the records of a folder
(``docs/records/``) into the page, so every number on it comes from a record, each table states its
machine and date, and a re-run on another machine replaces the numbers without anyone rewriting
prose. ``python -m minigpt results --check`` fails when the page and the records disagree (CI runs
it; so does ``tests/test_results.py``).

A missing record leaves its section saying which command produces it; a folder with no record at
all is refused. A damaged record is a :class:`~minigpt.UserError` naming the file and the key: not
a regular file, not JSON, the wrong kind, an entry missing, a value of the wrong type or out of its
range (:data:`PAYLOADS`), or entries that contradict each other (a run twice, a seed count other
than the settings', a DoRA summary that does not recompute from its points).
"""

from __future__ import annotations

import os
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from minigpt._validate import UserError
from minigpt.device import (
    check_record_values,
    date_check,
    flag_check,
    number_check,
    plain_json,
    text_check,
)
from minigpt.lab.lab import MAX_SEEDS

# The records live in the repository's checkout, next to the chapters (see minigpt.course.chapters).
CHECKOUT = Path(__file__).resolve().parent.parent.parent
RECORDS_DIR = CHECKOUT / "docs" / "records"
RESULTS_PAGE = CHECKOUT / "docs" / "results.md"

# kind (= the file's stem) -> the command that writes it
PRODUCERS = {
    "pretraining": "python -m minigpt train --json docs/records/pretraining.json",
    "compare": "python -m minigpt compare --seeds 3 --json docs/records/compare.json",
    "dora_analysis": (
        "python -m minigpt dora-analysis --seeds 3 --json docs/records/dora_analysis.json"
    ),
    "bench": "python -m minigpt bench --json docs/records/bench.json",
    "course": "python -m minigpt course --json docs/records/course.json",
}
# the statistics of a compare run that the tables average over the seeds
COMPARE_STATS = (
    *"trainable task_accuracy domain_loss shakespeare_loss".split(),
    *"delta_ratio seconds checkpoint_bytes".split(),
)
DASH = "–"
RECORD_LIMIT = 256 * 2**20  # bytes; a record is far smaller


# --------------------------------------------------------------------------------------------------
# What a record may hold: every value the page prints, with its type and range, in the spec language
# of minigpt.device.check_record_values

BIG = 2**53  # the largest integer a JSON reader anywhere keeps exactly
TEXT, TEXT_OR_NULL = text_check(), text_check(null=True)
COUNT, INDEX, INDEX_OR_NULL = number_check(1, BIG, True), number_check(0, BIG, True), number_check(0, BIG, True, True)
SECONDS, SECONDS_OR_NULL = number_check(0, 1e9), number_check(0, 1e9, null=True)
DURATION = number_check(1e-12, 1e9)  # a divisor: never 0
LR, POSITIVE = number_check(1e-12, 10), number_check(1e-12, 1e9)
LOSS, LOSS_OR_NULL = number_check(0, 1e4), number_check(0, 1e4, null=True)
FRACTION_OR_NULL = number_check(0, 1, null=True)
RATE, RATE_OR_NULL = number_check(0, 1e15), number_check(0, 1e15, null=True)
FINITE, FINITE_OR_NULL = number_check(-1e12, 1e12), number_check(-1e12, 1e12, null=True)
SEEDS = number_check(1, MAX_SEEDS, True)
HEADER = {
    "kind": TEXT,
    "machine": {
        "cpu": TEXT,
        "cores": number_check(1, 2**20, True, null=True),
        "cpu_bf16?": flag_check,
        "gpu": TEXT_OR_NULL,
        "torch": TEXT,
        "python?": TEXT,
        "system?": TEXT,
    },
    "date": date_check,
    "command": text_check(r"python -m minigpt [^`\x00-\x1f\x7f]{1,2000}", want="a python -m minigpt line"),
    "smoke": flag_check,
}
TIMING = {"median_s": DURATION, "tokens_per_s": RATE}
PAYLOADS = {
    "pretraining": {
        "recipe": {
            "preset": TEXT,
            "steps": COUNT,
            "batch_size": COUNT,
            "lr": LR,
            "seed": INDEX,
            "optimizer?": TEXT,
            "precision?": TEXT,
        },
        "recipe_name?": TEXT,
        "model": dict.fromkeys(("n_layer", "n_head", "n_embd", "context_length", "vocab_size"), COUNT),
        "parameters": COUNT,
        "device?": TEXT,
        "precision?": TEXT,
        "seconds": SECONDS,
        "train_seconds": SECONDS,
        "tokens_per_second?": RATE_OR_NULL,
        "val_loss?": LOSS_OR_NULL,
        "held_out": {
            **dict.fromkeys(("nats_per_token", "nats_per_char", "bits_per_char"), LOSS),
            "chars": COUNT,
        },
        "unseen_in_finetuning?": FRACTION_OR_NULL,
    },
    "compare": {
        "settings": {
            "rank": COUNT,
            "alpha": POSITIVE,
            "steps": COUNT,
            "grid": [LR],
            "seeds": SEEDS,
            "eval_tokens": COUNT,
        },
        "chosen": {"*": LR},
        "records": [
            {
                "method": TEXT,
                "seed": INDEX,
                "lr": LR,
                "diverged_at": INDEX_OR_NULL,
                "trainable": INDEX,
                "task_accuracy": FRACTION_OR_NULL,
                "domain_loss": LOSS_OR_NULL,
                "shakespeare_loss": LOSS_OR_NULL,
                "delta_ratio": number_check(0, 1e6, null=True),
                "seconds": SECONDS_OR_NULL,
                "checkpoint_bytes": INDEX_OR_NULL,
                "shakespeare_loss_before": LOSS_OR_NULL,
                "task_accuracy_before": FRACTION_OR_NULL,
                "domain_loss_before": LOSS_OR_NULL,
            }
        ],
    },
    "dora_analysis": {
        "settings": {"seeds": SEEDS},
        "points": [
            {
                **dict.fromkeys(("method", "matrix"), TEXT),
                **dict.fromkeys(("seed", "layer", "step"), INDEX),
                "lr": LR,
                **dict.fromkeys(("dM", "dD", "radial", "radial_change", "row_norm"), FINITE),
                "in_features": COUNT,
                **dict.fromkeys(("head_dM", "head_dD"), [FINITE]),
                "row_corr": FINITE_OR_NULL,
            }
        ],
        "summary": {"*": {"*": {}}},  # recomputed from the points and compared
    },
    "bench": {
        "settings": {
            "preset": TEXT,
            "batch_size": COUNT,
            "rank": COUNT,
            "alpha": POSITIVE,
            "warmup": INDEX,
            "repeats": COUNT,
        },
        "seconds": SECONDS,
        "result": {
            "device": TEXT,
            "device_name?": TEXT_OR_NULL,
            "precision?": TEXT_OR_NULL,
            "tokens_per_batch": COUNT,
            "training": dict.fromkeys(
                ("full", "lora", "peft-lora", "dora", "peft-dora", "*"),
                {**TIMING, "memory": {"total": COUNT}},
            ),
            "inference": dict.fromkeys(("base", "lora-merged", "*"), TIMING),
        },
    },
    "course": {
        "cache_was_empty?": flag_check,
        "every_chapter?": flag_check,
        "chapters": [{"chapter": text_check(r"\d\d", want="a chapter number such as 05"), "seconds": SECONDS}],
        "seconds": SECONDS,
    },
}


# --------------------------------------------------------------------------------------------------
# Reading the records


def _shown(path: Path) -> str:
    """``path`` relative to the current folder when it lies inside it (messages name no more of
    the machine's folders than they must)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _damaged(path: Path, kind: str, reason: object) -> UserError:
    reason = " ".join(str(reason).split())  # one line, whatever the reason holds
    return UserError(
        f"{_shown(path)} is a damaged {kind} record ({reason}); write it again with "
        f"{PRODUCERS[kind]}"
    )


def load_record(path: Path, kind: str) -> dict | None:
    """The record of ``kind`` at ``path``, every value the page prints checked (:data:`HEADER`,
    :data:`PAYLOADS`) and its entries checked against each other; None when there is no such file.
    A symbolic link to nothing (or a loop of links) is damaged, not absent, and a path that is not a
    regular file is refused before it is opened (a FIFO would block the read)."""
    import json
    import stat

    if not os.path.lexists(path):
        return None
    try:
        info = path.stat()
    except OSError as err:  # a link to nothing, a loop of links
        raise _damaged(path, kind, f"a symbolic link that leads to no file: {err.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise _damaged(path, kind, "not a regular file")
    if info.st_size > RECORD_LIMIT:
        raise _damaged(path, kind, f"larger than {RECORD_LIMIT // 2**20} MiB")
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise UserError(f"cannot read record {_shown(path)}: {err.strerror or err}") from None
    except (ValueError, RecursionError) as err:  # not UTF-8, not JSON, nested too deep
        raise _damaged(path, kind, f"not JSON: {err}") from None
    try:
        check_record_values(record, {**HEADER, **PAYLOADS[kind]})
        if record["kind"] != kind:
            raise ValueError(f"its kind is {record['kind']!r}, not {kind!r}")
        CONSISTENCY.get(kind, lambda _: None)(record)
    except ValueError as err:
        raise _damaged(path, kind, err) from None
    return record


def _compare_consistency(record: dict) -> None:
    """Each (method, lr, seed) once, seeds below ``settings.seeds``, every seed at each method's
    chosen rate and no more runs at a rate than seeds, rates from the grid, a chosen rate per
    method."""
    rows, seeds = record["records"], record["settings"]["seeds"]
    grid, chosen = record["settings"]["grid"], record["chosen"]
    seen = set()
    for index, row in enumerate(rows):
        key = (row["method"], row["lr"], row["seed"])
        if key in seen:
            raise ValueError(f"records[{index}] repeats the run {key} (method, lr, seed)")
        seen.add(key)
        if row["seed"] >= seeds or row["lr"] not in grid:
            raise ValueError(
                f"records[{index}] has seed {row['seed']} and lr {row['lr']:g}, outside the "
                f"settings ({seeds} seeds, grid {grid})"
            )
    methods = {row["method"] for row in rows}
    if set(chosen) != methods:
        raise ValueError(f"'chosen' names {sorted(chosen)}, the runs {sorted(methods)}")
    for method in methods:
        at = {row["seed"] for row in rows if (row["method"], row["lr"]) == (method, chosen[method])}
        if at != set(range(seeds)):
            raise ValueError(
                f"{method} has {len(at)} run(s) at its chosen rate {chosen[method]:g}, not one per "
                f"seed of settings.seeds = {seeds}"
            )


def _dora_consistency(record: dict) -> None:
    """The summary must be what :func:`~minigpt.lab.dora_analysis.summarize_points` computes from
    the record's points (so an edited summary or point is refused)."""
    from minigpt.lab.dora_analysis import POINT_KEYS, summarize_points

    for index, point in enumerate(record["points"]):
        if tuple(point) != POINT_KEYS:
            raise ValueError(f"points[{index}] has the keys {list(point)}, not {list(POINT_KEYS)}")
    if not _same(plain_json(summarize_points(record["points"])), record["summary"]):
        raise ValueError("its summary is not the summary of its points (edited?)")


def _same(a: object, b: object) -> bool:
    """Equal JSON values, numbers to within rounding."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b)) + 1e-12 if numbers else a == b


def _course_consistency(record: dict) -> None:
    chapters = [c["chapter"] for c in record["chapters"]]
    if len(set(chapters)) != len(chapters):
        raise ValueError(f"a chapter appears twice in {chapters}")


CONSISTENCY = {
    "compare": _compare_consistency,
    "dora_analysis": _dora_consistency,
    "course": _course_consistency,
}


def _cell(text: object) -> str:
    """``text`` for a Markdown table cell: ``|`` escaped, line breaks made spaces."""
    return " ".join(str(text).split("\n")).replace("|", "\\|")


def machine_line(record: dict) -> str:
    """One line naming the machine, the date and the command of a record, for above its table; a
    smoke run says so."""
    m = record["machine"]
    cores = m["cores"]
    parts = [
        str(m["cpu"]),
        f"{cores} logical core{'s' if cores != 1 else ''}" if cores else "cores unknown",
    ]
    if m.get("cpu_bf16"):
        parts.append("native bf16")
    parts.append(f"GPU {m['gpu']}" if m["gpu"] else "no GPU")
    parts.append(f"torch {m['torch']}")
    if m.get("python"):
        parts.append(f"Python {m['python']}")
    if m.get("system"):
        parts.append(str(m["system"]))
    smoke = (
        " A smoke run (tiny sizes, few steps): a check of the machinery, not the course's numbers."
        if record["smoke"]
        else ""
    )
    return (
        f"*Machine: {', '.join(parts)}. Date: {record['date']}. Command: `{record['command']}`."
        f"{smoke}*"
    )


# --------------------------------------------------------------------------------------------------
# Number formats


def _num(value: float | None, digits: int = 3) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return DASH if value is None else f"{100 * value:.1f} %"


def _mean_std(values: list[float | None]) -> tuple[float, float] | None:
    """Mean and standard deviation of the known values (a diverged run's are None)."""
    known = [float(v) for v in values if v is not None]
    if not known:
        return None
    return statistics.fmean(known), statistics.stdev(known) if len(known) > 1 else 0.0


def _pm(
    stats: tuple[float, float] | None, digits: int = 3, scale: float = 1.0, unit: str = ""
) -> str:
    if stats is None:
        return DASH
    return f"{scale * stats[0]:.{digits}f} ± {scale * stats[1]:.{digits}f}{unit}"


def _minutes(seconds: float) -> str:
    return f"{seconds:,.0f} s ({seconds / 60:.1f} min)"


def _scalar(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return DASH if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and all(not isinstance(v, (list, dict)) for v in value):
        return ", ".join(_scalar(v) for v in value)
    return str(value)


# --------------------------------------------------------------------------------------------------
# The sections


def _pretraining(record: dict) -> list[str]:
    recipe, cfg, held = record["recipe"], record["model"], record["held_out"]
    speed = record.get("tokens_per_second")
    unseen = record.get("unseen_in_finetuning")
    rows = [
        (
            "recipe",
            f"preset {recipe['preset']} ({cfg['n_layer']} layers, {cfg['n_head']} heads, width "
            f"{cfg['n_embd']}, context {cfg['context_length']}, {cfg['vocab_size']:,}-token "
            f"vocabulary), {recipe['steps']:,} steps of {recipe['batch_size']} × "
            f"{cfg['context_length']} tokens, lr {recipe['lr']:g}, optimizer "
            f"{recipe.get('optimizer', 'adamw')}, seed {recipe['seed']}",
        ),
        ("parameters", f"{record['parameters']:,}"),
        (
            "device and precision of the training steps",
            f"{record.get('device', DASH)}, {record.get('precision', DASH)}",
        ),
        (
            "wall time",
            f"{record['seconds']:,.0f} s for the whole command, {record['train_seconds']:,.0f} s "
            "of training" + (f" ({speed:,.0f} tokens/s)" if speed is not None else ""),
        ),
        ("validation loss at the last evaluation", f"{_num(record.get('val_loss'))} nats/token"),
        (
            "all of held-out Shakespeare",
            f"{held['nats_per_token']:.3f} nats/token, **{held['nats_per_char']:.3f} nats/char** "
            f"({held['bits_per_char']:.3f} bits/char) over {held['chars']:,} characters",
        ),
    ]
    if unseen is not None:
        rows.append(
            ("fine-tuning tokens that pretraining never saw", f"{100 * unseen:.2f} % (goal 0)")
        )
    rows.append(
        (
            "nanoGPT's documented CPU Shakespeare recipe (character-level, about 3 minutes; its "
            "README, not measured here)",
            "1.88 nats/char",
        )
    )
    return [
        "`python -m minigpt train` trains the course's pretraining recipe "
        "(`minigpt.lab.pretrained.TINY`) on Shakespeare's training plays plus a share of Python's "
        "documentation, then measures the loss on the held-out plays per token and per character: "
        "the total nats over the characters the predicted tokens spell out (chapter 05, eq. 3), a "
        "measure that compares a word-piece model with a character-level one.",
        "",
        machine_line(record),
        "",
        "| measure | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
    ]


def _compare_rows(record: dict) -> list[dict]:
    rows = record["records"]
    if not isinstance(rows, list) or not rows:
        raise KeyError("'records' must be a non-empty list")
    for index, row in enumerate(rows):
        missing = [
            key for key in COMPARE_RECORD_KEYS if not isinstance(row, dict) or key not in row
        ]
        if missing:
            raise KeyError(f"records[{index}] has no {', '.join(repr(k) for k in missing)}")
    return rows


def _compare(record: dict) -> list[str]:
    settings, chosen = record["settings"], record["chosen"]
    rows = _compare_rows(record)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [
        "`python -m minigpt compare` (chapter 10) fine-tunes the pretrained model with every "
        "method on documentation mixed with the word-reversal task. Each method's learning rate is "
        "the best of the same grid by accuracy on validation prompts (seed 0); then every seed "
        "trains at that rate. Task accuracy is exact match on prompts whose word triples never "
        "occur in training, domain loss is on held-out documentation, and the loss on held-out "
        "Shakespeare measures forgetting. Runs that diverged are left out of the means.",
        "",
        machine_line(record),
        "",
        f"Settings: rank {settings['rank']}, α {settings['alpha']:g}, {settings['steps']:,} steps, "
        f"learning-rate grid {', '.join(f'{lr:g}' for lr in settings['grid'])}, "
        f"{settings['seeds']} seeds, evaluation on {settings['eval_tokens']:,} tokens.",
        "",
        "Mean ± standard deviation over the seeds, at each method's chosen learning rate:",
        "",
        "| method | lr | seeds | trainable | task accuracy | domain loss | Shakespeare loss "
        "| ‖ΔW‖/‖W0‖ | seconds per run | checkpoint |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    first = rows[0]
    lines.append(
        f"| pretrained | {DASH} | {DASH} | 0 | {_pct(first['task_accuracy_before'])} | "
        f"{_num(first['domain_loss_before'])} | {_num(first['shakespeare_loss_before'])} | 0 | "
        f"{DASH} | {DASH} |"
    )
    for method in methods:
        if method not in chosen:
            raise KeyError(f"'chosen' names no learning rate for {method!r}")
        runs = [r for r in rows if r["method"] == method and r["lr"] == chosen[method]]
        if not runs:
            raise KeyError(f"no run of {method!r} at its chosen learning rate {chosen[method]!r}")
        ok = [r for r in runs if r["diverged_at"] is None]
        diverged = len(runs) - len(ok)
        seeds = f"{len(runs)}" + (f" ({diverged} diverged)" if diverged else "")
        stat = {key: _mean_std([r[key] for r in ok]) for key in COMPARE_STATS}
        size, seconds = stat["checkpoint_bytes"], stat["seconds"]
        lines.append(
            f"| {method} | {chosen[method]:g} | {seeds} | {runs[0]['trainable']:,} | "
            f"{_pm(stat['task_accuracy'], 1, 100, ' %')} | {_pm(stat['domain_loss'])} | "
            f"{_pm(stat['shakespeare_loss'])} | {_pm(stat['delta_ratio'])} | "
            f"{DASH if seconds is None else f'{seconds[0]:,.0f}'} | "
            f"{DASH if size is None else f'{size[0] / 2**20:.2f} MiB'} |"
        )
    lines += [
        "",
        "Learning and forgetting at every learning rate tried: the mean over the seeds run at that "
        "rate of the final task accuracy and of the rise of the Shakespeare loss (after "
        "fine-tuning minus before). A run that diverged stopped at the step named.",
        "",
        "| method | lr | seeds | task accuracy | Shakespeare loss rise | note |",
        "|---|---|---|---|---|---|",
    ]
    for method in methods:
        for lr in sorted({r["lr"] for r in rows if r["method"] == method}):
            runs = [r for r in rows if r["method"] == method and r["lr"] == lr]
            ok = [r for r in runs if r["diverged_at"] is None]
            accuracy = _mean_std([r["task_accuracy"] for r in ok])
            sha = [(r["shakespeare_loss"], r["shakespeare_loss_before"]) for r in ok]
            rise = _mean_std([after - before for after, before in sha if after is not None])
            notes = ["chosen"] if lr == chosen[method] else []
            notes += [
                f"seed {r['seed']} diverged at step {r['diverged_at']}"
                for r in runs
                if r["diverged_at"] is not None
            ]
            lines.append(
                f"| {method} | {lr:g} | {len(runs)} | {_pct(accuracy and accuracy[0])} | "
                f"{DASH if rise is None else f'{rise[0]:+.3f}'} | {'; '.join(notes)} |"
            )
    return lines


def _dora_analysis(record: dict) -> list[str]:
    lines = [
        "`python -m minigpt dora-analysis` (chapter 09) follows each method's updates through "
        "training and splits them into a change of magnitude (ΔM) and of direction (ΔD), as Liu et "
        "al. (2024) do.",
        "",
        machine_line(record),
        "",
    ]
    summary = record.get("summary")
    table = _dora_table(summary) if isinstance(summary, dict) else None
    if table is None:
        return [*lines, "The record holds no summary this page can show; chapter 09 plots it."]
    return [
        *lines,
        "Mean ± standard deviation over the seeds of each statistic, per method and matrix "
        "(`minigpt.lab.dora_analysis` defines them); the paper's column is its reported value.",
        "",
        *table,
    ]


def _dora_table(summary: dict) -> list[str] | None:
    """``{method: {matrix: {statistic: {"mean", "std"}, ...}}}`` as one table; None for another
    shape."""
    rows = []
    for method, by_matrix in summary.items():
        if not isinstance(by_matrix, dict):
            return None
        for matrix, entry in by_matrix.items():
            if not isinstance(entry, dict):
                return None
            rows.append((method, matrix, entry))
    stats = list(
        dict.fromkeys(
            key
            for *_, entry in rows
            for key, value in entry.items()
            if isinstance(value, dict) and "mean" in value and "std" in value
        )
    )
    if not rows or not stats:
        return None
    lines = [
        "| method | matrix | seeds | " + " | ".join(stats) + " | paper |",
        "|---|---|---|" + "---|" * (len(stats) + 1),
    ]
    for method, matrix, entry in rows:
        seeds = entry.get("seeds")
        cells = [
            _pm((e["mean"], e["std"] or 0.0))
            if isinstance(e, dict) and e.get("mean") is not None
            else DASH
            for e in (entry.get(key) for key in stats)
        ]
        lines.append(
            f"| {method} | {matrix} | {len(seeds) if isinstance(seeds, list) else _scalar(seeds)} "
            f"| {' | '.join(cells)} | {_scalar(entry.get('paper'))} |"
        )
    return lines


def _bench(record: dict) -> list[str]:
    from minigpt.lab.bench import goals

    s, result = record["settings"], record["result"]
    train, infer = result["training"], result["inference"]
    tokens = result["tokens_per_batch"]
    precision = {"fp32": "float32", "bf16": "bf16"}.get(result.get("precision"), DASH)
    plural = "s" if s["warmup"] != 1 else ""
    device = result["device"] + (f" ({result['device_name']})" if result.get("device_name") else "")
    lines = [
        "`python -m minigpt bench` builds every variant from the same randomly initialised model "
        "and feeds it the same batch; the timed repeats are interleaved after a warm-up, so a "
        "change in the machine's load hits every variant alike, and the tables give medians and "
        "ratios. Everything runs in float32 in one process. A ratio below 1 means ours is faster "
        "or smaller; a single timing run moves by a few percent.",
        "",
        machine_line(record),
        "",
        f"Settings: preset {s['preset']}, batch {s['batch_size']} × {tokens // s['batch_size']} "
        f"tokens, rank {s['rank']}, α {s['alpha']:g} on every linear layer of the blocks, median "
        f"of {s['repeats']} repeats after {s['warmup']} untimed call{plural}, "
        f"device {device}, {precision}; the bench took {record['seconds']:,.1f} s.",
        "",
        "| goal | measured | |",
        "|---|---|---|",
        *(
            f"| {goal} | {ratio:.3f} | {'within' if met else 'outside'} the target |"
            for goal, ratio, met in goals(result)
        ),
        "",
        "| training step | ms | tokens/s | time vs full | memory MiB | memory vs full |",
        "|---|---|---|---|---|---|",
    ]
    full = train["full"]
    for name, row in train.items():
        memory = row["memory"]["total"]
        lines.append(
            f"| {name} | {1000 * row['median_s']:.1f} | {row['tokens_per_s']:,.0f} | "
            f"{row['median_s'] / full['median_s']:.2f} | {memory / 2**20:.2f} | "
            f"{memory / full['memory']['total']:.2f} |"
        )
    lines += [
        "",
        "| inference | ms per batch | tokens/s | time vs base |",
        "|---|---|---|---|",
    ]
    for name, row in infer.items():
        lines.append(
            f"| {name} | {1000 * row['median_s']:.2f} | {row['tokens_per_s']:,.0f} | "
            f"{row['median_s'] / infer['base']['median_s']:.3f} |"
        )
    return lines


def _course(record: dict) -> list[str]:
    chapters = record["chapters"]
    if not isinstance(chapters, list) or not chapters:
        raise KeyError("'chapters' must be a non-empty list")
    start = "an empty cache" if record.get("cache_was_empty") else "a cache already filled"
    mode = (
        "in smoke mode (tiny sizes and few steps: a check of the machinery, not the course's times)"
        if record["smoke"]
        else "with default settings"
    )
    total = record["seconds"]
    return [
        "`python -m minigpt course` runs the chapters one after another, each in a fresh kernel. "
        "Runs that several chapters share are computed once and cached by configuration, so a "
        "second run of a chapter reads them back and takes a fraction of the time; each "
        "notebook's last cell prints the time and machine of the run whose outputs it carries.",
        "",
        machine_line(record),
        "",
        f"The chapters ran {mode}, from {start}; the whole course took {_minutes(total)}.",
        "",
        "| chapter | " + " | ".join(str(c["chapter"]) for c in chapters) + " | total |",
        "|---|" + "---|" * (len(chapters) + 1),
        "| seconds | "
        + " | ".join(f"{c['seconds']:,.0f}" for c in chapters)
        + f" | {_minutes(total)} |",
    ]


SECTIONS: tuple[tuple[str, str, Callable[[dict], list[str]]], ...] = (
    ("pretraining", "Pretraining the tiny model", _pretraining),
    ("compare", "The fine-tuning lab", _compare),
    ("dora_analysis", "DoRA's magnitude and direction", _dora_analysis),
    ("bench", "Benchmarks against peft", _bench),
    ("course", "Chapter run times", _course),
)

INTRO = [
    "# Measured results",
    "",
    "This page is generated by `python -m minigpt results` from the records in `docs/records/` "
    "and must not be edited by hand.",
    "",
    "Each table names the machine, the date and the command of the run behind it. Another machine "
    "gives other numbers, and the chapters print their own. To measure again, run the command of a "
    "section on idle cores, one command at a time, then `python -m minigpt results`; "
    "`python -m minigpt results --check` fails when this page and the records disagree.",
]

OUTRO = [
    "## Not recorded here",
    "",
    '- **Precision and memory.** `TrainConfig(precision="auto")` runs the matrix products in bf16 '
    "autocast where the hardware computes bf16 natively (CUDA compute capability 8.0 or newer, "
    "CPUs with AVX512-BF16 or AMX) and float32 elsewhere; weights and optimizer state stay "
    "float32 (`MINIGPT_PRECISION=fp32` turns autocast off). `minigpt.keep_freed_memory` keeps the "
    "memory glibc would hand back to the kernel after each step (`MINIGPT_MALLOC=default` turns "
    "it off). `python scripts/load_test.py --speed` measures both on your machine.",
    "- **The lab's worker pool.** On a CPU the lab trains one run per core, one thread each "
    "(`minigpt.lab.pool`); `python scripts/load_test.py --pool 2 --workload finetune` measures "
    "the speed-up, and `MINIGPT_LAB_WORKERS=1` trains the runs one after another in the "
    "notebook's process.",
    "- **Under load.** When the cores are already busy, `python -m minigpt` and each chapter's "
    "first code cell set `OMP_WAIT_POLICY=PASSIVE` and `OMP_NUM_THREADS` to the cores the others "
    "leave free (`minigpt.busy_cores`); a value you set yourself is kept. "
    "`scripts/load_test.py` measures each thread setting idle and next to a busy process.",
    "- **GPU.** On a CUDA machine `bash scripts/gpu_check.sh OUT` runs the device tests, the "
    "bench, the pretraining recipe and chapters in smoke mode on the GPU and writes every figure "
    "into `OUT`; a section above names a GPU when its record was measured on one.",
]


def render(records_dir: Path | str) -> str:
    """The whole page from the records in ``records_dir`` (see the module docstring)."""
    records_dir = Path(records_dir)
    if not records_dir.is_dir():
        raise UserError(f"records folder {_shown(records_dir)} does not exist or is not a folder")
    lines = list(INTRO)
    for kind, title, section in SECTIONS:
        lines += ["", f"## {title}", ""]
        path = records_dir / f"{kind}.json"
        record = load_record(path, kind)
        if record is None:
            lines.append(f"No record yet: `{PRODUCERS[kind]}` writes it.")
            continue
        try:
            lines += section(record)
        except (
            KeyError,
            IndexError,
            TypeError,
            ValueError,
            AttributeError,
            ZeroDivisionError,
        ) as err:
            reason = err.args[0] if isinstance(err, KeyError) and err.args else err
            what = reason if isinstance(reason, str) and " " in reason else f"entry {reason!r}"
            raise _damaged(path, kind, f"{type(err).__name__}: {what}") from None
    lines += ["", *OUTRO]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# The command


def main(argv: list[str] | None = None) -> int:
    """Write ``docs/results.md`` from the measurement records in ``docs/records/``; with
    ``--check``, only compare the two and fail when they differ (for CI)."""
    from minigpt._cli import folder_arg, make_parser, path_arg
    from minigpt.io import atomic_write_bytes, check_writable_file

    parser = make_parser(
        "python -m minigpt results",
        "Write docs/results.md from the measurement records in docs/records/;\nwith --check, "
        "only compare the two and fail when they differ (for CI).",
        "python -m minigpt results --check",
    )
    parser.add_argument(
        "--records",
        type=folder_arg,
        default=None,
        help="folder holding the records (default: the checkout's docs/records/)",
    )
    parser.add_argument(
        "--out",
        type=path_arg,
        default=None,
        help="the page to write or check (default: the checkout's docs/results.md)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 when the page differs from what the records render",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out) if args.out is not None else RESULTS_PAGE
    if not args.check:
        check_writable_file(out, "--out")
    page = render(args.records if args.records is not None else RECORDS_DIR)
    if args.check:
        current = out.read_bytes() if out.is_file() else None
        if current != page.encode("utf-8"):
            state = "does not exist" if current is None else "differs from the records"
            print(
                f"python -m minigpt results: {_shown(out)} {state}: run python -m minigpt results",
                file=sys.stderr,
            )
            return 1
        print(f"{_shown(out)} matches the records")
        return 0
    atomic_write_bytes(out, page.encode("utf-8"))
    print(f"wrote {_shown(out)}")
    return 0
