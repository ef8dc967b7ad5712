"""DoRA's weight-decomposition analysis (Liu et al., 2024, arXiv:2402.09353, §3.2, figure 2) by the
paper's protocol, on the lab's runs, beside the checks its statistic needs.

**The protocol.** For each method (full fine-tuning, LoRA, DoRA), at its own tuned learning rate
(:meth:`Lab.tune <minigpt.lab.lab.Lab.tune>`: the best validation accuracy on the lab's grid, seed
0) and with no matching of update sizes between methods, every run of the lab records the magnitude
change ΔM and the direction change ΔD (eqs. (3)-(4)) of the query and value weights of every layer
at its four checkpoints (``record["weight_changes"]``, :func:`minigpt.analysis.
magnitude_direction_points`). The paper's statistic is the Pearson correlation of ΔD and ΔM over
layers × checkpoints of one run, query weights in its figure 2 (value weights in its appendix):
FT −0.62, LoRA +0.83, DoRA −0.31. Here it is computed per seed, then averaged over seeds.

**Why the statistic needs company.** Two effects make ΔM and ΔD grow together whatever the method:

1. *Trends.* Both grow with training time and both can grow with depth, so points pooled over
   checkpoints and layers correlate positively through the shared trend. The detrended statistic
   correlates per-head values after removing each (layer, checkpoint) cell's mean (layer × step
   fixed effects), so only differences between heads of the same matrix at the same time remain.
2. *Geometry.* Split a row's update into a part ``a = ⟨Δw, ŵ_0⟩`` along the row (norm ``m``) and a
   part ``b`` orthogonal to it. Then ``1 − cos ≈ b²/(2m²)`` and ``‖w_t‖ − m ≈ a + b²/(2m)``, so
   ``Δm ≈ a + m·(1 − cos)``: an update orthogonal to the row (``a = 0``, where ``‖w_t‖ = m/cos``
   exactly) changes the magnitude by ``m(1/cos − 1) ≈ m·ΔD`` to first order in ΔD, by geometry
   alone. The null-model ratio ``ΔM / (m̄·ΔD)`` is then ≈ 1; well above 1, the first-order radial
   part ``a`` carries the magnitude change. The radial share ``|a|/‖Δw‖`` is compared with a
   random direction's (:func:`~minigpt.analysis.random_radial_share`, ≈ √(2/(π·in))).

**§4.2's argument, per row.** DoRA's direction gradient (eq. (6)) is the row's gradient ``g``
with its component along the row removed, while the magnitude's (eq. (7)) is that component:
for a gradient at angle θ to the row, ``|Δm| ∝ ‖g‖·|cos θ|`` and the turn ``ΔD ∝ ‖g‖²·sin²θ``.
At equal ``‖g‖``, rows that change length more turn less: a negative relation across rows. The
per-row test is Spearman's correlation across the rows of one matrix of ``|Δm|`` and
``1 − cos`` at the last checkpoint (``row_corr``), averaged over layers, then over seeds.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from minigpt._validate import UserError, check_int
from minigpt.analysis import random_radial_share
from minigpt.lab.lab import MAX_SEEDS, Lab
from minigpt.lab.report import best_lr
from minigpt.lab.runs import DEFAULT_SEEDS, LAB_VERSION, METHODS

# The paper's figure 2 (query weights): Pearson correlation of ΔD and ΔM over layers × checkpoints.
PAPER_QUERY = {"full": -0.62, "lora": 0.83, "dora": -0.31}

ANALYSED_METHODS = ("full", "lora", "dora")

MATRICES = ("query", "value")

NAMES = {"full": "FT", "lora": "LoRA", "rslora": "rsLoRA", "pissa": "PiSSA", "dora": "DoRA"}

# The keys of every point: which run, where, when, and minigpt.analysis.row_changes' measurements.
POINT_KEYS = (
    "method",
    "seed",
    "lr",
    "matrix",
    "layer",
    "step",
    "dM",
    "dD",
    "radial",
    "radial_change",
    "row_norm",
    "in_features",
    "head_dM",
    "head_dD",
    "row_corr",
)

# Statistics of summarize_points, each {"per_seed": [...], "mean": x, "std": s} per method, matrix.
STATISTICS = ("corr", "detrended", "null_ratio", "radial", "growth", "row_corr")


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson's correlation of ``x`` and ``y``; None with fewer than two points or a constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2:
        return None
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / den if den > 0 else None


def paper_correlation(points: list[dict]) -> float | None:
    """The paper's statistic (§3.2, figure 2): Pearson's r of ΔD and ΔM over the points of one run
    and one matrix (its layers × checkpoints)."""
    return pearson([p["dD"] for p in points], [p["dM"] for p in points])


def detrended_correlation(points: list[dict]) -> float | None:
    """Pearson's r of per-head ΔD and ΔM after removing each (layer, step) cell's mean: the
    correlation within a cell, pooled over cells, free of any depth or time trend (layer × step
    fixed effects). ``points``: one run, one matrix."""
    dm, dd = [], []
    for p in points:
        head_dm, head_dd = np.asarray(p["head_dM"]), np.asarray(p["head_dD"])
        dm += list(head_dm - head_dm.mean())
        dd += list(head_dd - head_dd.mean())
    return pearson(dd, dm)


def null_ratio(points: list[dict]) -> float | None:
    """Mean over points of ``ΔM / (m̄·ΔD)``: ≈ 1 when the magnitudes change only as an update
    orthogonal to every row makes them (``Δm ≈ m·(1 − cos)``), above 1 when updates along the
    rows add to it (see the module's docstring). Points with ΔD = 0 are left out."""
    ratios = [p["dM"] / (p["row_norm"] * p["dD"]) for p in points if p["dD"] > 0]
    return float(np.mean(ratios)) if ratios else None


def growth(points: list[dict]) -> float | None:
    """Mean over points of ``radial_change / ΔM``: +1 when every row's norm grows by its first-order
    radial change, −1 when every one shrinks, near 0 when growth and shrinkage balance."""
    ratios = [p["radial_change"] / p["dM"] for p in points if p["dM"] > 0]
    return float(np.mean(ratios)) if ratios else None


def last_row_correlation(points: list[dict]) -> float | None:
    """§4.2's per-row test: the mean over layers of ``row_corr`` (Spearman's r across rows of
    ``|Δm|`` and ``1 − cos``) at the run's last checkpoint."""
    if not points:
        return None
    last = max(p["step"] for p in points)
    values = [p["row_corr"] for p in points if p["step"] == last and p["row_corr"] is not None]
    return float(np.mean(values)) if values else None


def _spread(values: list[float | None]) -> dict:
    """``{"per_seed": values, "mean": m, "std": s}`` over the defined values (std with ddof=1, 0.0
    for one value; None for none)."""
    defined = [v for v in values if v is not None]
    return {
        "per_seed": values,
        "mean": float(np.mean(defined)) if defined else None,
        "std": float(np.std(defined, ddof=1)) if len(defined) > 1 else (0.0 if defined else None),
    }


def _finite(point: dict) -> bool:
    return all(math.isfinite(point[key]) for key in ("dM", "dD", "radial_change", "row_norm"))


def summarize_points(points: list[dict]) -> dict:
    """``{method: {matrix: entry}}`` from analysis points (:data:`POINT_KEYS`).

    Each entry holds ``seeds``, ``steps``, ``layers``, ``paper`` (the paper's value, query only),
    ``random_radial`` (a random update's radial share) and, per statistic of :data:`STATISTICS`,
    ``{"per_seed", "mean", "std"}``: ``corr`` (:func:`paper_correlation`), ``detrended``
    (:func:`detrended_correlation`), ``null_ratio``, ``radial`` (mean radial share), ``growth`` and
    ``row_corr`` (:func:`last_row_correlation`). Points with a non-finite value are left out.
    """
    points = [p for p in points if _finite(p)]
    methods = list(dict.fromkeys(p["method"] for p in points))
    summary: dict[str, dict] = {}
    for method in methods:
        mine = [p for p in points if p["method"] == method]
        for matrix in dict.fromkeys(p["matrix"] for p in mine):
            cell = [p for p in mine if p["matrix"] == matrix]
            seeds = sorted({p["seed"] for p in cell})
            runs = [[p for p in cell if p["seed"] == seed] for seed in seeds]
            entry = {
                "seeds": seeds,
                "steps": sorted({p["step"] for p in cell}),
                "layers": sorted({p["layer"] for p in cell}),
                "paper": PAPER_QUERY.get(method) if matrix == "query" else None,
                "random_radial": random_radial_share(cell[0]["in_features"]),
                "corr": _spread([paper_correlation(run) for run in runs]),
                "detrended": _spread([detrended_correlation(run) for run in runs]),
                "null_ratio": _spread([null_ratio(run) for run in runs]),
                "radial": _spread([float(np.mean([p["radial"] for p in run])) for run in runs]),
                "growth": _spread([growth(run) for run in runs]),
                "row_corr": _spread([last_row_correlation(run) for run in runs]),
            }
            summary.setdefault(method, {})[matrix] = entry
    return summary


def _has_sign(stat: dict, sign: float) -> bool | None:
    """The rule's first half: the mean has ``sign`` and |mean| > std (None: undefined)."""
    if stat["mean"] is None:
        return None
    return stat["mean"] * sign > 0 and abs(stat["mean"]) > stat["std"]


def _below(a: dict, b: dict) -> bool | None:
    """The rule's second half: ``a`` below ``b`` beyond the spread, mean_a + std_a < mean_b −
    std_b."""
    if a["mean"] is None or b["mean"] is None:
        return None
    return a["mean"] + a["std"] < b["mean"] - b["std"]


def _word(value: bool | None) -> str:
    return "undefined" if value is None else ("yes" if value else "no")


def verdict(summary: dict, matrix: str = "query") -> list[str]:
    """Three ``Verdict:`` lines for ``matrix``, computed from ``summary`` by one stated rule.

    The rule: a method reproduces the paper's sign when its mean correlation over seeds has the
    sign the paper reports (FT < 0, LoRA > 0, DoRA < 0) and |mean| > std over seeds; DoRA's slope
    sits below LoRA's when mean_DoRA + std_DoRA < mean_LoRA − std_LoRA. It is applied to the
    paper's statistic (``corr``), to the detrended one (``detrended``) and to §4.2's per-row test
    (``row_corr``, where the argument predicts DoRA < 0). Methods absent from ``summary`` are left
    out; "undefined" means a correlation could not be computed (constant values).
    """
    labels = {
        "corr": "the paper's statistic, r(ΔD, ΔM) over layers × checkpoints",
        "detrended": "depth and time trends removed, r of per-head deviations",
        "row_corr": "§4.2 per row, Spearman r(|Δm|, 1 − cos) across rows at the last checkpoint",
    }
    lines = []
    for key, label in labels.items():
        parts = []
        for method, paper in PAPER_QUERY.items():
            if matrix not in summary.get(method, {}):
                continue
            stat = summary[method][matrix][key]
            if key == "row_corr" and method != "dora":
                continue
            shown = "n/a" if stat["mean"] is None else f"{stat['mean']:+.2f} ± {stat['std']:.2f}"
            sign = "−" if paper < 0 else "+"
            whose = "predicted" if key == "row_corr" else "paper's"
            parts.append(
                f"{NAMES[method]} {shown}: {whose} sign ({sign}) {_word(_has_sign(stat, paper))}"
            )
        if matrix in summary.get("dora", {}) and matrix in summary.get("lora", {}):
            below = _below(summary["dora"][matrix][key], summary["lora"][matrix][key])
            parts.append(f"DoRA below LoRA beyond the spread: {_word(below)}")
        if parts:
            lines.append(f"Verdict: {label} ({matrix}): " + "; ".join(parts) + ".")
    return lines


def _cell(stat: dict, digits: int = 2, sign: str = "+") -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:{sign}.{digits}f} ± {stat['std']:.{digits}f}"


def _seeds(stat: dict) -> str:
    return " ".join("  n/a" if v is None else f"{v:+.2f}" for v in stat["per_seed"])


PARTS = ("paper", "detrended", "geometry", "rows")


def format_summary(summary: dict, parts: tuple[str, ...] = PARTS) -> str:
    """The summary as plain-text tables, one per part of :data:`PARTS`: the paper's statistic
    beside the paper's value, the detrended statistic, the geometric null model and radial share,
    and §4.2's per-row test."""
    rows = [(m, x, e) for m, by in summary.items() for x, e in by.items()]
    out = []
    for part in parts:
        if part == "paper":
            out.append(
                "The paper's statistic: Pearson r(ΔD, ΔM) over layers × checkpoints, per seed"
            )
            out.append(f"{'method':7s} {'matrix':7s} {'per seed':>22s} {'mean ± std':>13s} paper")
            for method, matrix, e in rows:
                paper = "" if e["paper"] is None else f"{e['paper']:+.2f}"
                out.append(
                    f"{NAMES.get(method, method):7s} {matrix:7s} {_seeds(e['corr']):>22s} "
                    f"{_cell(e['corr']):>13s} {paper}"
                )
        elif part == "detrended":
            out.append(
                "Trends removed: r of per-head ΔD, ΔM deviations within each (layer, checkpoint)"
            )
            out.append(f"{'method':7s} {'matrix':7s} {'per seed':>22s} {'mean ± std':>13s}")
            for method, matrix, e in rows:
                out.append(
                    f"{NAMES.get(method, method):7s} {matrix:7s} {_seeds(e['detrended']):>22s} "
                    f"{_cell(e['detrended']):>13s}"
                )
        elif part == "geometry":
            out.append(
                "Geometry: ΔM/(m·ΔD) (1 = orthogonal updates), radial share of the update "
                "(random: see column), first-order Δm / ΔM"
            )
            out.append(
                f"{'method':7s} {'matrix':7s} {'ΔM/(m·ΔD)':>13s} {'radial share':>13s} "
                f"{'random':>7s} {'growth':>13s}"
            )
            for method, matrix, e in rows:
                out.append(
                    f"{NAMES.get(method, method):7s} {matrix:7s} "
                    f"{_cell(e['null_ratio'], 2, ''):>13s} {_cell(e['radial'], 3, ''):>13s} "
                    f"{e['random_radial']:7.3f} {_cell(e['growth']):>13s}"
                )
        elif part == "rows":
            out.append(
                "§4.2 per row: Spearman r(|Δm|, 1 − cos) across rows, last checkpoint, mean "
                "over layers"
            )
            out.append(f"{'method':7s} {'matrix':7s} {'per seed':>22s} {'mean ± std':>13s}")
            for method, matrix, e in rows:
                out.append(
                    f"{NAMES.get(method, method):7s} {matrix:7s} {_seeds(e['row_corr']):>22s} "
                    f"{_cell(e['row_corr']):>13s}"
                )
        else:
            raise UserError(f"parts must be among {PARTS}, got {part!r}")
        out.append("")
    return "\n".join(out).rstrip("\n")


def _check_methods(methods) -> tuple[str, ...]:
    if isinstance(methods, str):
        methods = tuple(m.strip() for m in methods.split(",") if m.strip())
    methods = tuple(methods)
    if not methods or len(set(methods)) != len(methods) or not set(methods) <= set(METHODS):
        raise UserError(f"methods must be distinct names from {METHODS}, got {list(methods)}")
    return methods


def run_dora_analysis(
    seeds: int = DEFAULT_SEEDS,
    methods: tuple[str, ...] | str = ANALYSED_METHODS,
    smoke: bool | None = None,
    cache: bool = True,
    progress: bool = False,
    lab: Lab | None = None,
) -> dict:
    """The analysis by the paper's protocol (§3.2): each method at its own tuned rate, ``seeds``
    seeds, four checkpoints per run, query and value weights of every layer.

    Returns ``{"settings", "lrs", "points", "summary"}``: ``points`` holds one dict per (method,
    seed, matrix, layer, step) with :data:`POINT_KEYS`, ``summary`` is
    :func:`summarize_points` of them. The runs are the lab's (``lab``, else a new :class:`Lab` with
    ``smoke``, ``cache`` and ``progress``), cached and shared with chapters 06-10: each method's
    grid is run in one batch, then the other seeds, so they train one per core.
    """
    check_int("seeds", seeds, 1, MAX_SEEDS)
    methods = _check_methods(methods)
    lab = lab if lab is not None else Lab(smoke, cache, progress)  # after the checks
    start = time.perf_counter()
    tuning = lab.runs([lab.spec(method, lr, 0) for method in methods for lr in lab.grid])
    lrs = {m: best_lr([r for r in tuning if r["method"] == m]) for m in methods}
    chosen = {(r["method"], 0): r for r in tuning if r["lr"] == lrs[r["method"]] and r["seed"] == 0}
    more = [(m, s) for m in methods for s in range(1, seeds)]
    records = lab.runs([lab.spec(m, lrs[m], s) for m, s in more])
    for key, record in zip(more, records, strict=True):
        chosen[key] = record
    points = []
    for method in methods:
        for seed in range(seeds):
            record = chosen[method, seed]
            if "weight_changes" not in record:
                raise UserError(
                    f"the lab's {method} run (seed {seed}) records no weight changes; "
                    "run it again with --no-cache"
                )
            for p in record["weight_changes"]:
                if p["matrix"] in MATRICES:
                    points.append({"method": method, "seed": seed, "lr": lrs[method], **p})
    points = [{key: p[key] for key in POINT_KEYS} for p in points]
    if progress:
        shown = ", ".join(f"{NAMES[m]} {lr:g}" for m, lr in lrs.items())
        print(
            f"learning rates: {shown} ({time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    spec = lab.spec(methods[0], lrs[methods[0]], 0)
    settings = {
        "methods": list(methods),
        "seeds": seeds,
        "matrices": list(MATRICES),
        "steps": spec.steps,
        "checkpoints": sorted({p["step"] for p in points}),
        "rank": spec.rank,
        "alpha": spec.alpha,
        "batch_size": spec.batch_size,
        "lr_grid": list(lab.grid),
        "smoke": lab.smoke,
        "recipe": lab.recipe.name,
        "device": str(lab.device),
        "precision": lab.precision,
        "lab_version": LAB_VERSION,
    }
    return {"settings": settings, "lrs": lrs, "points": points, "summary": summarize_points(points)}


# The measurements of a point that must be finite numbers for it to enter the summary.
MEASURED = ("dM", "dD", "radial", "radial_change", "row_norm")


def record_points(points: list[dict]) -> list[dict]:
    """``points`` as a record holds them: plain JSON (:func:`minigpt.device.plain_json`, which
    turns NaN and inf into None), without the points whose measurements (:data:`MEASURED` and the
    per-head values) are not all finite numbers, as :func:`summarize_points` leaves them out. The
    record's summary is :func:`summarize_points` of these points, so it recomputes from the record
    alone (``python -m minigpt results`` checks that it does)."""
    from minigpt.device import plain_json

    def usable(point: dict) -> bool:
        values = [point[key] for key in MEASURED] + [*point["head_dM"], *point["head_dD"]]
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)

    return [p for p in plain_json(points) if usable(p)]


def main(argv: list[str] | None = None) -> int:
    """``python -m minigpt dora-analysis [--seeds N] [--json OUT] [--methods full,lora,dora]
    [--smoke] [--no-cache] [--no-progress]``: DoRA's magnitude/direction analysis (Liu et al.,
    2024, §3.2, figure 2) by the paper's protocol, with its trend and geometry checks."""
    from minigpt._cli import make_parser, path_arg
    from minigpt.device import check_record_destination, run_record, write_run_record

    parser = make_parser(
        "python -m minigpt dora-analysis",
        "DoRA's weight-decomposition analysis (Liu et al., 2024, figure 2) on the lab's runs: each "
        "method at its own tuned rate, every layer's query and value weights at four checkpoints, "
        "several seeds. Prints the paper's statistic, the detrended one, the geometric null model "
        "and the per-row test of section 4.2, with verdicts; --json writes every point.",
        "python -m minigpt dora-analysis --smoke --seeds 2 --json dora.json",
    )
    parser.add_argument(
        "--seeds", type=int, default=DEFAULT_SEEDS, help=f"seeds per method (at most {MAX_SEEDS})"
    )
    parser.add_argument(
        "--methods",
        default=",".join(ANALYSED_METHODS),
        help="comma-separated methods from " + ",".join(METHODS),
    )
    parser.add_argument("--smoke", action="store_true", help="micro model, a few steps: seconds")
    parser.add_argument(
        "--json",
        default=None,
        type=path_arg,
        help="write the settings, the learning rates, every point and the summary to this JSON "
        "file (default: none)",
    )
    parser.add_argument("--no-cache", action="store_true", help="recompute runs found in the cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    given = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(given)
    # every argument before any work: a bad one must not cost a pretraining run
    check_int("--seeds", args.seeds, 1, MAX_SEEDS)
    methods = _check_methods(args.methods)
    if args.json is not None:
        check_record_destination(args.json, "--json", "dora_analysis")
    start = time.perf_counter()
    result = run_dora_analysis(
        args.seeds,
        methods,
        smoke=args.smoke or None,
        cache=not args.no_cache,
        progress=not args.no_progress,
    )
    # the points the record holds, and the summary of exactly those, printed and recorded
    points = record_points(result["points"])
    summary = summarize_points(points)
    print("learning rates: " + ", ".join(f"{NAMES[m]} {lr:g}" for m, lr in result["lrs"].items()))
    print(format_summary(summary))
    for matrix in MATRICES:
        for line in verdict(summary, matrix):
            print(line)
    print(f"\n{len(points)} points from {args.seeds} seed(s) per method in ", end="")
    print(f"{time.perf_counter() - start:.0f} s")
    if args.json is not None:
        payload = {
            "smoke": result["settings"]["smoke"],  # MINIGPT_SMOKE=1 counts as --smoke does
            "settings": result["settings"],
            "lrs": result["lrs"],
            "points": points,
            "summary": summary,
        }
        write_run_record(args.json, run_record("dora_analysis", "dora-analysis", given, payload))
        print(f"points: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
