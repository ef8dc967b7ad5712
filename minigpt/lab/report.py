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
