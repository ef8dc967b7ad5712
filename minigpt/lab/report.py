"""Reading the lab's records: choosing a learning rate, mean ± std over seeds, the spread rule that
every verdict uses, and the comparison table."""

from __future__ import annotations

import statistics


def best_lr(records: list[dict]) -> float:
    """The learning rate of the best record: highest validation accuracy, ties broken by lower
    training loss."""
    return max(records, key=lambda r: (r["val_accuracy"], -r["train_loss_last"]))["lr"]


def summarize(
    records: list[dict], keys=("task_accuracy", "domain_loss", "shakespeare_loss", "delta_ratio")
) -> dict:
    """``{method: {key: (mean, std)}, ...}`` over seeds, plus ``lr``, ``trainable`` and ``n``
    (seeds)."""
    summary: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in records):
        rows = [r for r in records if r["method"] == method]
        entry = {"lr": rows[0]["lr"], "trainable": rows[0]["trainable"], "n": len(rows)}
        for key in keys:
            values = [float(r[key]) for r in rows]
            entry[key] = (
                statistics.fmean(values),
                statistics.stdev(values) if len(values) > 1 else 0.0,
            )
        summary[method] = entry
    return summary


def exceeds_spread(a: list[float], b: list[float]) -> bool:
    """Whether two sets of seeds differ by more than their spread: |mean(a) - mean(b)| > std(a) +
    std(b).

    A deliberately plain rule (no p-value from three seeds): a difference inside the seeds' own
    scatter is reported as "within the spread".
    """
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
    return abs(statistics.fmean(a) - statistics.fmean(b)) > sd(a) + sd(b)


def format_table(records: list[dict]) -> str:
    """Mean ± std over seeds per method, as a Markdown table."""
    summary = summarize(records)
    first = records[0]
    lines = [
        "| method | lr | trainable | task accuracy | domain loss | Shakespeare loss | ‖ΔW‖/‖W0‖ |",
        "|---|---|---|---|---|---|---|",
    ]
    if "task_accuracy_before" in first:
        lines.append(
            f"| pretrained | – | 0 | {100 * first['task_accuracy_before']:.1f} % | "
            f"{first['domain_loss_before']:.3f} | {first['shakespeare_loss_before']:.3f} | 0 |"
        )
    for method, s in summary.items():
        acc, dom, sha, ratio = (
            s[k] for k in ("task_accuracy", "domain_loss", "shakespeare_loss", "delta_ratio")
        )
        lines.append(
            f"| {method} | {s['lr']:g} | {s['trainable']:,} | {100 * acc[0]:.1f} ± "
            f"{100 * acc[1]:.1f} % "
            f"| {dom[0]:.3f} ± {dom[1]:.3f} | {sha[0]:.3f} ± {sha[1]:.3f} | {ratio[0]:.3f} ± "
            f"{ratio[1]:.3f} |"
        )
    n = min(s["n"] for s in summary.values())
    lines.append(f"\nmean ± standard deviation over {n} seeds")
    return "\n".join(lines)


def verdict(text: str) -> str:
    """The one line an experiment prints for its claim: ``Verdict: <text>``."""
    return f"Verdict: {text}"


def forgetting(point: dict, start: dict) -> float:
    """Forgetting at a curve point: its held-out Shakespeare loss minus the pretrained model's."""
    return float(point["shakespeare_loss"]) - float(start["shakespeare_loss"])


def point_at(record: dict, step: int) -> dict | None:
    """The curve point of ``record`` at ``step``: with a constant rate after a fixed warm-up, the
    checkpoint at step s is the s-step run. None when the curve has no point there (or the run
    diverged before it)."""
    return next((p for p in record["curve"] if p["step"] == step), None)


def front(records: list[dict], step: int) -> list[dict]:
    """One method's learning-forgetting points at run length ``step``, one per learning rate (mean
    over the seeds present): ``lr``, ``task_accuracy`` and ``forgetting`` as (mean, std), and the
    number of seeds ``n``. Learning rates whose runs have no point at ``step`` are left out."""
    points = []
    for lr in sorted({r["lr"] for r in records}):
        at = [
            (point_at(r, step), r["curve"][0])
            for r in records
            if r["lr"] == lr and point_at(r, step) is not None
        ]
        if not at:
            continue
        acc = [float(p["task_accuracy"]) for p, _ in at]
        lost = [forgetting(p, start) for p, start in at]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        points.append(
            {
                "lr": lr,
                "task_accuracy": (statistics.fmean(acc), sd(acc)),
                "forgetting": (statistics.fmean(lost), sd(lost)),
                "n": len(at),
            }
        )
    return points


def forgetting_at_accuracy(records: list[dict], level: float, step: int) -> float | None:
    """Forgetting at matched accuracy, read from one seed's front (records of one method and seed,
    one per learning rate): the least forgetting among the rates whose task accuracy at run length
    ``step`` reaches ``level``. None when no rate reaches it."""
    reached = [
        forgetting(p, r["curve"][0])
        for r in records
        if (p := point_at(r, step)) is not None and p["task_accuracy"] >= level
    ]
    return min(reached) if reached else None


def best_accuracy(records: list[dict], step: int) -> float:
    """The highest task accuracy any learning rate reaches at run length ``step`` (one seed)."""
    return max(
        (float(p["task_accuracy"]) for r in records if (p := point_at(r, step)) is not None),
        default=0.0,
    )


def by_seed(records: list[dict]) -> dict[int, list[dict]]:
    """``{seed: records}``, seeds in order."""
    seeds: dict[int, list[dict]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        seeds.setdefault(r["seed"], []).append(r)
    return seeds


def protocol_table(rows: list[tuple[str, str, str]]) -> str:
    """A "paper vs miniature" table in Markdown: one (aspect, the paper, this miniature) per row.

    The chapters build the miniature's column from the run, so its numbers are the run's own.
    """
    lines = ["| | the paper | this miniature |", "|---|---|---|"]
    lines += [f"| {aspect} | {paper} | {ours} |" for aspect, paper, ours in rows]
    return "\n".join(lines)
