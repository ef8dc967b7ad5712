"""The measured-results page, ``docs/results.md``, rendered from the committed records.

Each measuring command writes a JSON record with ``--json`` (``train``, ``compare``,
``dora-analysis``, ``bench``, ``course``): the machine it ran on, the date, the command, whether it
was a smoke run and every number it measured (``course`` twice: ``course.json`` from an empty cache,
``course_rerun.json`` right after it, with the cache the first run filled). :func:`render` turns the
records of a folder (``docs/records/``) into the page, so every number on it comes from a record,
each table states its machine and date, and a re-run on another machine replaces the numbers without
anyone rewriting prose. ``python -m minigpt results --check`` fails when the page and the records
disagree (CI runs it; so does ``tests/test_results.py``).

A missing record leaves its section saying which command produces it; a folder with no record at
all is refused; a damaged record (:mod:`minigpt.course.records` checks every value the page
prints) is a :class:`~minigpt.UserError` naming the file and the key.
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from minigpt._validate import UserError
from minigpt.course.records import PRODUCERS, RECORD_KIND, _damaged, _shown, load_record

# The records live in the repository's checkout, next to the chapters (see minigpt.course.chapters).
CHECKOUT = Path(__file__).resolve().parent.parent.parent
RECORDS_DIR = CHECKOUT / "docs" / "records"
RESULTS_PAGE = CHECKOUT / "docs" / "results.md"

# the statistics of a compare run that the tables average over the seeds
COMPARE_STATS = (
    *"trainable task_accuracy domain_loss shakespeare_loss".split(),
    *"delta_ratio seconds checkpoint_bytes".split(),
)
DASH = "–"


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


def _mean_std(values: list[float | None]) -> tuple[float, float | None] | None:
    """Mean and standard deviation of the known values (a diverged run's are None); the deviation
    is None for a single value, which has no spread to state."""
    known = [float(v) for v in values if v is not None]
    if not known:
        return None
    return statistics.fmean(known), statistics.stdev(known) if len(known) > 1 else None


def _pm(
    stats: tuple[float, float | None] | None, digits: int = 3, scale: float = 1.0, unit: str = ""
) -> str:
    """``mean ± std``, or the mean alone when there is no spread to state (one value)."""
    if stats is None:
        return DASH
    spread = "" if stats[1] is None else f" ± {scale * stats[1]:.{digits}f}"
    return f"{scale * stats[0]:.{digits}f}{spread}{unit}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _minutes(seconds: float) -> str:
    return f"{seconds:,.0f} s ({seconds / 60:.1f} min)"


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
        f"`python -m minigpt train` trains {_recipe_words(recipe)} on Shakespeare's training "
        "plays plus a share of Python's documentation, then measures the loss on the held-out "
        "plays per token and per character: the total nats over the characters the predicted "
        "tokens spell out (chapter 05, eq. 3), a measure that compares a word-piece model with a "
        "character-level one.",
        "",
        machine_line(record),
        "",
        "| measure | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
    ]


def _recipe_words(recipe: dict) -> str:
    """Which recipe a pretraining record holds, in words: the course's, the smoke one or
    another."""
    from dataclasses import asdict

    from minigpt.lab.pretrained import SMOKE, TINY

    for name, known, words in (
        ("TINY", TINY, "the course's pretraining recipe"),
        ("SMOKE", SMOKE, "the smoke recipe"),
    ):
        fields = {k: v for k, v in asdict(known).items() if k != "device"}
        if all(recipe.get(key, value) == value for key, value in fields.items()):
            return f"{words} (`minigpt.lab.pretrained.{name}`)"
    return "a recipe other than the course's (`minigpt.lab.pretrained.TINY`), stated below,"


def _compare(record: dict) -> list[str]:
    settings, chosen, rows = record["settings"], record["chosen"], record["records"]
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
        f"{_plural(settings['seeds'], 'seed')}, evaluation on {settings['eval_tokens']:,} tokens.",
        "",
        "Mean ± standard deviation over the seeds (the mean alone where one run gives it), at "
        "each method's chosen learning rate:",
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
        runs = [r for r in rows if r["method"] == method and r["lr"] == chosen[method]]
        ok = [r for r in runs if r["diverged_at"] is None]
        diverged = len(runs) - len(ok)
        seeds = f"{len(runs)}" + (f" ({diverged} diverged)" if diverged else "")
        stat = {key: _mean_std([r[key] for r in ok]) for key in COMPARE_STATS}
        size, seconds = stat["checkpoint_bytes"], stat["seconds"]
        lines.append(
            f"| {_cell(method)} | {chosen[method]:g} | {seeds} | {runs[0]['trainable']:,} | "
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
                f"| {_cell(method)} | {lr:g} | {len(runs)} | {_pct(accuracy and accuracy[0])} | "
                f"{DASH if rise is None else f'{rise[0]:+.3f}'} | {'; '.join(notes)} |"
            )
    return lines


def _dora_analysis(record: dict) -> list[str]:
    from minigpt.lab.dora_analysis import STATISTICS

    lines = [
        "`python -m minigpt dora-analysis` (chapter 09) follows each method's updates through "
        "training and splits them into a change of magnitude (ΔM) and of direction (ΔD), as Liu et "
        "al. (2024) do.",
        "",
        machine_line(record),
        "",
        "Mean ± standard deviation over the seeds of each statistic (the mean alone where one seed "
        "gives it), per method and matrix (`minigpt.lab.dora_analysis` defines them); the paper's "
        "column is its reported value.",
        "",
        "| method | matrix | seeds | " + " | ".join(STATISTICS) + " | paper |",
        "|---|---|---|" + "---|" * (len(STATISTICS) + 1),
    ]
    # the summary is the summary of the record's points (minigpt.course.records checked it)
    for method, by_matrix in record["summary"].items():
        for matrix, entry in by_matrix.items():
            cells = [_pm(_spread(entry[key])) for key in STATISTICS]
            paper = DASH if entry["paper"] is None else f"{entry['paper']:g}"
            lines.append(
                f"| {_cell(method)} | {_cell(matrix)} | {len(entry['seeds'])} | "
                f"{' | '.join(cells)} | {paper} |"
            )
    return lines


def _spread(stat: dict) -> tuple[float, float | None] | None:
    """A summary statistic's ``(mean, std)``; no std when fewer than two seeds define it."""
    if stat["mean"] is None:
        return None
    defined = [v for v in stat["per_seed"] if v is not None]
    return stat["mean"], stat["std"] if len(defined) > 1 else None


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
            f"| {_cell(name)} | {1000 * row['median_s']:.1f} | {row['tokens_per_s']:,.0f} | "
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
            f"| {_cell(name)} | {1000 * row['median_s']:.2f} | {row['tokens_per_s']:,.0f} | "
            f"{row['median_s'] / infer['base']['median_s']:.3f} |"
        )
    return lines


def _course_rerun(record: dict) -> list[str]:
    return [
        "The same command again, right after the run above, with the cache it filled: the lab's "
        "runs and the pretrained model are read back, and what each chapter computes in its own "
        "cells runs again.",
        "",
        *_course(record)[2:],
    ]


def _course(record: dict) -> list[str]:
    chapters = record["chapters"]
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
        f"{'All' if record.get('every_chapter') else 'These'} {_plural(len(chapters), 'chapter')} "
        f"ran {mode}, from {start}, in {_minutes(total)}"
        + ("; that is the whole course." if record.get("every_chapter") else "."),
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
    ("course_rerun", "Chapter run times, a second run", _course_rerun),
)

INTRO = [
    "# Measured results",
    "",
    "This page is generated by `python -m minigpt results` from the records in `{records}` "
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


def _folder_name(folder: Path) -> str:
    """``folder`` as the page names it: relative to the checkout, else to the current folder, else
    its name alone (the page names no machine's folders)."""
    for root in (CHECKOUT, Path.cwd()):
        try:
            return (
                f"{Path(os.path.realpath(folder)).relative_to(os.path.realpath(root)).as_posix()}/"
            )
        except ValueError:
            continue
    return f"{Path(os.path.realpath(folder)).name}/"


def render(records_dir: Path | str) -> str:
    """The whole page from the records in ``records_dir`` (see the module docstring); a folder
    without any record is refused, so that no page is written from nothing."""
    records_dir = Path(records_dir)
    if not records_dir.is_dir():
        raise UserError(f"records folder {_shown(records_dir)} does not exist or is not a folder")
    records = {
        stem: load_record(records_dir / f"{stem}.json", RECORD_KIND.get(stem, stem))
        for stem, *_ in SECTIONS
    }
    rerun = records.get("course_rerun")
    if rerun is not None and (rerun.get("cache_was_empty") is not False or rerun["smoke"]):
        raise _damaged(
            records_dir / "course_rerun.json",
            "course_rerun",
            "a second run must start from the cache a first run filled, with default settings",
        )
    if not any(records.values()):
        raise UserError(
            f"records folder {_shown(records_dir)} holds no record ({', '.join(PRODUCERS)}.json): "
            f"write one first, e.g. with {PRODUCERS['bench']}"
        )
    lines = [line.format(records=_folder_name(records_dir)) for line in INTRO]
    for kind, title, section in SECTIONS:
        lines += ["", f"## {title}", ""]
        if records[kind] is None:
            lines.append(f"No record yet: `{PRODUCERS[kind]}` writes it.")
            continue
        try:
            lines += section(records[kind])
        except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as err:
            # a bug or a value the records' checks let through: still one line naming the file
            raise _damaged(
                records_dir / f"{kind}.json", kind, f"{type(err).__name__}: {err}"
            ) from None
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
    records = args.records if args.records is not None else RECORDS_DIR
    real = Path(os.path.realpath(out))
    if Path(os.path.realpath(records)) in (real, *real.parents):
        raise UserError(
            f"--out {_shown(out)} is inside the records folder {_shown(records)}: the page would "
            "replace a record or sit among them; write it elsewhere"
        )
    if not args.check:
        check_writable_file(out, "--out")
    elif out.exists() and not out.is_file():
        raise UserError(f"--out {_shown(out)} is a folder or a special file, not the page to check")
    page = render(records)
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
