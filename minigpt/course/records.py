"""The records behind ``docs/results.md``: reading one and checking every value the page prints.

Each measuring command writes its record with ``--json`` (:func:`minigpt.device.run_record`):
``kind``, ``machine``, ``date``, ``command``, ``smoke`` and what it measured. :func:`load_record`
reads one and refuses, in one line naming the file and the key, a path that is not a regular file
(a link to nothing, a FIFO), text that is not JSON, the wrong kind, a missing entry, a value of the
wrong type or outside its range (:data:`HEADER`, :data:`PAYLOADS`: NaN, infinities, negative
seconds, accuracies outside [0, 1], booleans or strings for numbers, huge integers, multi-line
text), and entries that contradict each other (:data:`CONSISTENCY`: a compare run twice, seeds that
disagree with the settings, a DoRA summary that is not the summary of its points).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from minigpt._validate import UserError
from minigpt.device import plain_json
from minigpt.lab.lab import MAX_SEEDS

# kind (= the file's stem) -> the command that writes it
PRODUCERS = {
    "pretraining": "python -m minigpt train --json docs/records/pretraining.json",
    "compare": "python -m minigpt compare --seeds 3 --json docs/records/compare.json",
    "dora_analysis": (
        "python -m minigpt dora-analysis --seeds 3 --json docs/records/dora_analysis.json"
    ),
    "bench": "python -m minigpt bench --json docs/records/bench.json",
    "course": "python -m minigpt course --json docs/records/course.json",
    "course_rerun": "python -m minigpt course --json docs/records/course_rerun.json",
}

# file stem -> the kind of record it holds, where the two differ: the course's second run, made with
# the cache its first run filled, is a course record of its own
RECORD_KIND = {"course_rerun": "course"}
RECORD_LIMIT = 256 * 2**20  # bytes; a record is far smaller


# --------------------------------------------------------------------------------------------------
# Checking values
#
# A spec is a check (a function returning what is wrong with a value, or None), a dict (an object
# with those keys: "key?" is optional, "*" checks every other key and its name, which a table
# prints) or a one-item list (a non-empty list of such items).


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def number_check(low: float, high: float, integer: bool = False, null: bool = False):  # noqa: ANN201
    """A check: a number (an integer when ``integer``; or None when ``null``) in ``[low, high]``;
    booleans, strings, NaN, infinities and numbers out of range are refused."""
    bounds = f"[{low}, {high}]" if integer else f"[{low:g}, {high:g}]"
    want = f"{'an integer' if integer else 'a number'} in {bounds}"
    want += " or null" if null else ""

    def check(value: object) -> str | None:
        if value is None and null:
            return None
        kinds = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
            return f"must be {want}, got {_brief(value)}"  # NaN fails the comparison too
        return None

    return check


def text_check(pattern: str = r"[^\x00-\x1f\x7f]{1,500}", null: bool = False, want: str = ""):  # noqa: ANN201
    """A check: a string matching ``pattern`` (by default one line of text), or None when
    ``null``."""
    want = (want or "one line of text") + (" or null" if null else "")

    def check(value: object) -> str | None:
        if (value is None and null) or (isinstance(value, str) and re.fullmatch(pattern, value)):
            return None
        return f"must be {want}, got {_brief(value)}"

    return check


def flag_check(value: object) -> str | None:
    """A check: true or false."""
    return None if isinstance(value, bool) else f"must be true or false, got {_brief(value)}"


def date_check(value: object) -> str | None:
    """A check: a date written ``YYYY-MM-DD``, as :func:`minigpt.device.run_record` writes it."""
    from datetime import date

    try:
        date.fromisoformat(value if re.fullmatch(r"\d{4}-\d\d-\d\d", value) else "")
    except (TypeError, ValueError):
        return f"must be a date YYYY-MM-DD, got {_brief(value)}"
    return None


def check_record_values(value: object, spec: object, where: str = "") -> None:
    """Raise ``ValueError`` naming the key path (``records[2].seed``) of the first value in
    ``value`` that ``spec`` refuses; keys the spec does not name are not checked."""
    if callable(spec):
        problem = spec(value)
        if problem:
            raise ValueError(f"{where} {problem}")
    elif isinstance(spec, list):
        if not isinstance(value, list) or not value:
            raise ValueError(f"{where} must be a non-empty list, got {_brief(value)}")
        for index, item in enumerate(value):
            check_record_values(item, spec[0], f"{where}[{index}]")
    else:
        if not isinstance(value, dict):
            raise ValueError(f"{where or 'the record'} must be an object, got {_brief(value)}")
        for key in spec:
            if key != "*" and not key.endswith("?") and key not in value:
                raise ValueError(f"{where + '.' if where else ''}{key!r} is missing")
        for key, item in value.items():
            inner = spec.get(key, spec.get(f"{key}?", spec.get("*")))
            path = f"{where}.{key}" if where else key
            if inner is not None and "*" in spec:  # a name the page prints
                check_record_values(key, text_check(), f"{path} (the name)")
            if inner is not None:
                check_record_values(item, inner, path)


# --------------------------------------------------------------------------------------------------
# What each record may hold: every value the page prints, with its type and range

BIG = 2**53  # the largest integer a JSON reader anywhere keeps exactly
TEXT, TEXT_OR_NULL = text_check(), text_check(null=True)
COUNT, INDEX, INDEX_OR_NULL = (
    number_check(1, BIG, True),
    number_check(0, BIG, True),
    number_check(0, BIG, True, True),
)
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
    "command": text_check(
        r"python -m minigpt [^`\x00-\x1f\x7f]{1,2000}", want="a python -m minigpt line"
    ),
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
        "model": dict.fromkeys(
            ("n_layer", "n_head", "n_embd", "context_length", "vocab_size"), COUNT
        ),
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
            "device_name?": text_check(r"[^\x00-\x1f\x7f]{0,500}", null=True),  # "" on a CPU
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
        "chapters": [
            {"chapter": text_check(r"\d\d", want="a chapter number such as 05"), "seconds": SECONDS}
        ],
        "seconds": SECONDS,
    },
}


# --------------------------------------------------------------------------------------------------
# Reading the records


def _shown(path: Path) -> str:
    """``path`` relative to the current folder when it lies inside it (messages name no more of
    the machine's folders than they must)."""
    try:
        return str(Path(os.path.realpath(path)).relative_to(os.path.realpath(Path.cwd())))
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
        raise _damaged(
            path, kind, f"a symbolic link that leads to no file: {err.strerror}"
        ) from None
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
        check_record_values(record, HEADER)
        if record["kind"] != kind:
            raise ValueError(f"its kind is {record['kind']!r}, not {kind!r}")
        check_record_values(record, PAYLOADS[kind])
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
    """Points with the keys :data:`~minigpt.lab.dora_analysis.POINT_KEYS` and seeds below
    ``settings.seeds``, and a summary that is what
    :func:`~minigpt.lab.dora_analysis.summarize_points` computes from them (so an edited summary or
    point is refused)."""
    from minigpt.lab.dora_analysis import POINT_KEYS, summarize_points

    seeds = record["settings"]["seeds"]
    for index, point in enumerate(record["points"]):
        if set(point) != set(POINT_KEYS):
            raise ValueError(f"points[{index}] has the keys {list(point)}, not {list(POINT_KEYS)}")
        if point["seed"] >= seeds:
            raise ValueError(f"points[{index}] has seed {point['seed']}; settings.seeds is {seeds}")
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
