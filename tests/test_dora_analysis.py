"""DoRA's weight-decomposition analysis (Liu et al., 2024, arXiv:2402.09353, §3.2, figure 2):
the per-row measurements on hand-made weights, the lab's wiring, the summary statistics on
synthetic points with known answers, the verdict rule, and the ``dora-analysis`` command."""

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minigpt.__main__ import main as cli_main
from minigpt.analysis import (
    effective_weight,
    magnitude_direction_points,
    random_radial_share,
    row_changes,
)
from minigpt.dora import replace_linear_with_dora
from minigpt.lab.dora_analysis import (
    MAX_SEEDS,
    POINT_KEYS,
    detrended_correlation,
    format_summary,
    paper_correlation,
    record_points,
    summarize_points,
    verdict,
)
from minigpt.lab.runs import RunSpec, finetune
from minigpt.lab.task import finetune_data
from minigpt.lora import replace_linear_with_lora
from minigpt.model import GPTConfig, GPTModel


def micro(seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(GPTConfig.from_preset("micro")).eval()


def set_query(model: GPTModel, layer: int, weight: torch.Tensor) -> GPTModel:
    with torch.no_grad():
        model.blocks[layer].attn.query.weight.copy_(weight)
    return model


# --- the measurements ---------------------------------------------------------------------------


def test_a_pure_rescale_of_rows_changes_only_the_magnitude():
    base = micro()
    w0 = base.blocks[0].attn.query.weight.detach().clone()
    scale = torch.linspace(0.5, 1.5, w0.shape[0])
    tuned = set_query(copy.deepcopy(base), 0, w0 * scale[:, None])
    point = magnitude_direction_points(base, tuned, 7, matrices=("query",))[0]
    assert (point["step"], point["matrix"], point["layer"]) == (7, "query", 0)
    norms = w0.double().norm(dim=1)
    assert point["dD"] < 1e-12
    assert math.isclose(point["dM"], float(((scale - 1).abs() * norms).mean()), rel_tol=1e-5)
    # the whole update lies along its row: a radial share of 1, a first-order change of Δm itself
    assert math.isclose(point["radial"], 1.0, rel_tol=1e-5)
    assert math.isclose(point["radial_change"], float(((scale - 1) * norms).mean()), rel_tol=1e-4)
    assert math.isclose(point["row_norm"], float(norms.mean()), rel_tol=1e-6)


def test_a_rotation_of_each_row_changes_only_the_direction():
    torch.manual_seed(1)
    w0 = torch.randn(8, 16, dtype=torch.double)
    other = torch.randn(8, 16, dtype=torch.double)
    unit = w0 / w0.norm(dim=1, keepdim=True)
    ortho = other - (other * unit).sum(1, keepdim=True) * unit
    ortho = ortho / ortho.norm(dim=1, keepdim=True)
    angle = torch.linspace(0.05, 0.8, 8, dtype=torch.double)[:, None]
    wt = w0.norm(dim=1, keepdim=True) * (torch.cos(angle) * unit + torch.sin(angle) * ortho)
    changes = row_changes(w0, wt)
    assert changes["dM"] < 1e-12
    assert math.isclose(changes["dD"], float((1 - torch.cos(angle)).mean()), rel_tol=1e-10)
    want = (1 - F.cosine_similarity(wt, w0, dim=1)).mean()
    assert math.isclose(changes["dD"], float(want), rel_tol=1e-8)


def test_a_small_orthogonal_update_gives_the_geometric_null_relation():
    """An update orthogonal to a row of norm m: ‖w_t‖ = m / cos, so ΔM = m (1/cos − 1) ≈ m·ΔD."""
    torch.manual_seed(2)
    w0 = torch.randn(6, 32, dtype=torch.double)
    noise = torch.randn(6, 32, dtype=torch.double)
    unit = w0 / w0.norm(dim=1, keepdim=True)
    ortho = noise - (noise * unit).sum(1, keepdim=True) * unit
    for eps in (1e-2, 1e-3):
        wt = w0 + eps * ortho
        changes = row_changes(w0, wt)
        m = w0.norm(dim=1)
        one_minus_cos = 1 - F.cosine_similarity(wt, w0, dim=1)
        exact = (m * (1 / (1 - one_minus_cos) - 1)).mean()
        assert math.isclose(changes["dM"], float(exact), rel_tol=1e-8)
        approx = float((m * one_minus_cos).mean())
        assert math.isclose(changes["dM"], approx, rel_tol=10 * eps**2)
        assert changes["radial"] < 1e-10 and abs(changes["radial_change"]) < 1e-12


def test_the_radial_share_of_random_updates_is_the_random_reference():
    torch.manual_seed(3)
    w0 = torch.randn(4000, 64, dtype=torch.double)
    changes = row_changes(w0, w0 + 1e-3 * torch.randn_like(w0))
    assert math.isclose(changes["radial"], random_radial_share(64), rel_tol=0.03)
    assert math.isclose(random_radial_share(2), 2 / math.pi, rel_tol=1e-12)
    assert math.isclose(random_radial_share(3), 0.5, rel_tol=1e-12)
    assert math.isclose(random_radial_share(128), math.sqrt(2 / (math.pi * 128)), rel_tol=0.01)


def test_rows_are_grouped_by_head_and_ranked_per_row():
    torch.manual_seed(4)
    w0 = torch.randn(8, 5, dtype=torch.double)
    wt = w0.clone()
    wt[:4] *= torch.tensor([1.1, 1.2, 1.3, 1.4], dtype=torch.double)[:, None]  # head 0: lengths
    wt[4:, 0] += torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.double)  # head 1: turns and more
    changes = row_changes(w0, wt, n_head=2)
    dm = (wt.norm(dim=1) - w0.norm(dim=1)).abs()
    dd = 1 - F.cosine_similarity(wt, w0, dim=1)
    torch.testing.assert_close(torch.tensor(changes["head_dM"]).double(), dm.view(2, 4).mean(1))
    torch.testing.assert_close(torch.tensor(changes["head_dD"]).double(), dd.view(2, 4).mean(1))
    assert changes["head_dD"][0] < 1e-12 < changes["head_dD"][1]
    wt[:4, 1] += torch.tensor([0.04, 0.01, 0.03, 0.02], dtype=torch.double)  # every row turns
    changes = row_changes(w0, wt, n_head=2)
    dm = (wt.norm(dim=1) - w0.norm(dim=1)).abs()
    dd = 1 - F.cosine_similarity(wt, w0, dim=1)
    ranks = [np.argsort(np.argsort(v.numpy())) for v in (dm, dd)]
    assert math.isclose(changes["row_corr"], float(np.corrcoef(*ranks)[0, 1]), rel_tol=1e-12)
    assert len(row_changes(w0, wt, n_head=3)["head_dM"]) == 1  # 8 rows do not split in 3


def test_the_rank_correlation_gives_ties_their_mean_rank():
    from minigpt.analysis import _rank_correlation

    a = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0])
    b = torch.tensor([2.0, 1.0, 4.0, 4.0, 3.0])
    # ranks (0, 1.5, 1.5, 3, 4) and (1, 0, 3.5, 3.5, 2): Pearson's r of the ranks = 7.5 / 19
    assert math.isclose(_rank_correlation(a, b), 7.5 / 19, rel_tol=1e-12)
    assert _rank_correlation(a, torch.ones(5)) is None


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapters_are_measured_on_their_effective_weights(method):
    base = micro()
    tuned = copy.deepcopy(base)
    wrap = replace_linear_with_lora if method == "lora" else replace_linear_with_dora
    wrap(tuned, 4, 8.0)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.endswith("lora.B"):
                p.normal_(0.0, 0.05)
            if name.endswith("magnitude"):
                p.mul_(1.1)
    points = magnitude_direction_points(base, tuned, 3)
    assert [(p["matrix"], p["layer"]) for p in points] == [
        ("query", 0),
        ("query", 1),
        ("value", 0),
        ("value", 1),
    ]
    for p in points:
        name = f"blocks.{p['layer']}.attn.{p['matrix']}"
        w0 = base.get_submodule(name).weight.detach()
        wt = effective_weight(tuned.get_submodule(name), w0.shape[1])
        dm = (wt.norm(dim=1) - w0.norm(dim=1)).abs().mean()
        dd = (1 - F.cosine_similarity(wt.double(), w0.double(), dim=1)).mean()
        assert math.isclose(p["dM"], float(dm), rel_tol=1e-4)
        assert math.isclose(p["dD"], float(dd), rel_tol=1e-4)
        assert set(p) == set(POINT_KEYS) - {"method", "seed", "lr"}
        assert len(p["head_dM"]) == len(p["head_dD"]) == base.cfg.n_head
    if method == "dora":  # every row's norm is its magnitude: 1.1 times the base's
        assert all(math.isclose(p["dM"], 0.1 * p["row_norm"], rel_tol=1e-4) for p in points)


def test_finetune_records_the_points_at_every_checkpoint_and_skips_a_diverged_end():
    base = micro()
    data = finetune_data()
    data = dataclasses.replace(data, task_eval=data.task_eval[:4], task_val=data.task_val[:4])
    model, record = finetune(base, RunSpec("dora", 1e-3, 0, steps=4, batch_size=4), data, 1)
    steps = [p["step"] for p in record["weight_changes"]]
    assert steps == sorted(steps) and sorted(set(steps)) == [1, 2, 3, 4]
    assert len(steps) == 4 * 2 * base.cfg.n_layer
    assert [p for p in record["weight_changes"] if p["step"] == 4] == magnitude_direction_points(
        base, model, 4
    )
    _, broken = finetune(base, RunSpec("full", 1e30, 0, steps=4, batch_size=4), data, 1)
    assert broken["diverged_at"] is not None
    assert all(p["step"] < 4 for p in broken["weight_changes"])
    assert all(math.isfinite(p["dM"]) for p in broken["weight_changes"])


# --- the summary and the verdicts ---------------------------------------------------------------


def synthetic_points(method: str, seeds: int = 3, noise: float = 0.0) -> list[dict]:
    """Points whose per-head values follow a shared (layer, step) trend that lifts ΔM and ΔD
    together, plus within-cell head deviations that move ΔM and ΔD in opposite directions."""
    rng = np.random.default_rng(0)
    points = []
    for seed in range(seeds):
        for layer in range(4):
            for step in (50, 100, 150, 200):
                trend = (1 + layer) * step / 200
                spread = np.array([-1.5, -0.5, 0.5, 1.5]) * 0.1 * (1 + 0.1 * seed)
                head_dm = trend + spread + noise * rng.normal(size=4)
                head_dd = 0.01 * (trend - spread) + noise * rng.normal(size=4)
                points.append(
                    {
                        "method": method,
                        "seed": seed,
                        "lr": 1e-3,
                        "matrix": "query",
                        "layer": layer,
                        "step": step,
                        "dM": float(head_dm.mean()),
                        "dD": float(head_dd.mean()),
                        "radial": 0.1,
                        "radial_change": float(head_dm.mean()) / 2,
                        "row_norm": 100 * float(head_dm.mean()) / float(head_dd.mean()),
                        "in_features": 128,
                        "head_dM": [float(v) for v in head_dm],
                        "head_dD": [float(v) for v in head_dd],
                        "row_corr": -0.5 + 0.1 * seed if step == 200 else 0.9,
                    }
                )
    return points


def test_the_detrended_statistic_removes_the_shared_trend():
    summary = summarize_points(synthetic_points("full"))
    entry = summary["full"]["query"]
    assert entry["seeds"] == [0, 1, 2] and entry["steps"] == [50, 100, 150, 200]
    assert entry["paper"] == -0.62
    # the points' means follow the trend alone: the paper's statistic is +1
    assert all(math.isclose(r, 1.0, rel_tol=1e-9) for r in entry["corr"]["per_seed"])
    # within each cell the heads' ΔM and ΔD move oppositely: the detrended statistic is −1
    assert all(math.isclose(r, -1.0, rel_tol=1e-9) for r in entry["detrended"]["per_seed"])
    assert math.isclose(entry["null_ratio"]["mean"], 0.01, rel_tol=1e-9)
    assert math.isclose(entry["growth"]["mean"], 0.5, rel_tol=1e-9)
    assert math.isclose(entry["radial"]["mean"], 0.1) and entry["radial"]["std"] < 1e-12
    # §4.2's test reads the last checkpoint only
    assert entry["row_corr"]["per_seed"] == pytest.approx([-0.5, -0.4, -0.3])
    assert math.isclose(entry["row_corr"]["std"], 0.1, rel_tol=1e-9)
    assert math.isclose(entry["random_radial"], random_radial_share(128))


def test_summary_statistics_match_numpy_on_noisy_points():
    points = synthetic_points("lora", noise=0.05)
    summary = summarize_points(points)["lora"]["query"]
    for seed in range(3):
        run = [p for p in points if p["seed"] == seed]
        want = np.corrcoef([p["dD"] for p in run], [p["dM"] for p in run])[0, 1]
        assert math.isclose(summary["corr"]["per_seed"][seed], want, rel_tol=1e-9)
        assert math.isclose(paper_correlation(run), want, rel_tol=1e-9)
        dev_m = np.concatenate([np.subtract(p["head_dM"], np.mean(p["head_dM"])) for p in run])
        dev_d = np.concatenate([np.subtract(p["head_dD"], np.mean(p["head_dD"])) for p in run])
        want = np.corrcoef(dev_d, dev_m)[0, 1]
        assert math.isclose(detrended_correlation(run), want, rel_tol=1e-9)
    values = summary["corr"]["per_seed"]
    assert math.isclose(summary["corr"]["mean"], float(np.mean(values)))
    assert math.isclose(summary["corr"]["std"], float(np.std(values, ddof=1)))


def test_points_with_non_finite_values_are_left_out():
    points = synthetic_points("dora")
    broken = dict(points[0], dM=math.nan)
    assert summarize_points([*points, broken]) == summarize_points(points)


def fake_summary(values: dict[str, tuple[float, float]]) -> dict:
    def stat(mean, std):
        return {"per_seed": [mean - std, mean, mean + std], "mean": mean, "std": std}

    return {
        method: {
            "query": {key: stat(*pair) for key in ("corr", "detrended", "row_corr")},
        }
        for method, pair in values.items()
    }


def test_the_verdict_rule_both_ways():
    paper_like = fake_summary({"full": (-0.6, 0.1), "lora": (0.8, 0.1), "dora": (-0.3, 0.1)})
    lines = verdict(paper_like)
    assert len(lines) == 3 and all(line.startswith("Verdict: ") for line in lines)
    assert lines[0].count("sign (−) yes") == 2 and "sign (+) yes" in lines[0]
    assert "DoRA below LoRA beyond the spread: yes" in lines[0]
    assert "predicted sign (−) yes" in lines[2]
    opposite = fake_summary({"full": (0.5, 0.1), "lora": (0.6, 0.1), "dora": (0.4, 0.3)})
    lines = verdict(opposite)
    assert "sign (−) yes" not in lines[0] and "sign (+) yes" in lines[0]
    # DoRA lower than LoRA, but its spread reaches LoRA's: not beyond the spread
    assert "DoRA below LoRA beyond the spread: no" in lines[0]
    small = fake_summary({"full": (-0.05, 0.1), "lora": (0.8, 0.1)})  # |mean| < std; no DoRA
    lines = verdict(small)
    assert "FT -0.05 ± 0.10: paper's sign (−) no" in lines[0]
    assert "DoRA" not in lines[0] and len(lines) == 2  # no per-row line without DoRA
    assert verdict(paper_like, matrix="value") == []


# --- the command --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--seeds", "0"], "seeds"),
        (["--seeds", "1000000000"], "seeds"),
        (["--seeds", str(MAX_SEEDS + 1)], str(MAX_SEEDS)),
        (["--methods", "full,nope"], "methods"),
        (["--json", "FILE/inside/out.json"], "--json"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_before_any_work(argv, words, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MINIGPT_CACHE", str(cache))
    (tmp_path / "FILE").write_text("a file, not a folder")
    argv = [str(tmp_path / a) if a.startswith("FILE") else a for a in argv]
    err = subprocess.run(
        [sys.executable, "-m", "minigpt", "dora-analysis", "--smoke", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MINIGPT_CACHE": str(cache)},
    )
    assert err.returncode == 2
    lines = err.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], err.stderr
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))  # nothing was trained


def test_seeds_are_bounded_in_the_function_too():
    from minigpt.lab.dora_analysis import run_dora_analysis

    with pytest.raises(ValueError, match="seeds"):
        run_dora_analysis(seeds=MAX_SEEDS + 1, lab=object())  # refused before the lab is used


def test_the_record_holds_clean_points_whose_summary_recomputes(tmp_path, monkeypatch, capsys):
    """NaN or infinite measurements are dropped from the written points and from the summary
    alike, the record is dated in UTC by the helper every record uses, states whether it was a
    smoke run, and the results page reads it back (its summary recomputes from its points)."""
    import datetime

    import minigpt.lab.dora_analysis as dora_analysis
    from minigpt.course.records import load_record

    points = synthetic_points("full") + synthetic_points("lora", noise=0.05)
    points[0] = dict(points[0], dM=math.nan)  # dropped by summarize_points too
    points[1] = dict(points[1], radial=math.inf)  # would be null in the file
    points[2] = dict(points[2], head_dD=[0.1, math.nan, 0.1, 0.1])
    points[40] = dict(points[40], row_corr=math.nan)  # kept: a null row_corr is skipped
    result = {
        "settings": {"seeds": 3, "smoke": True},
        "lrs": {"full": 1e-3, "lora": 1e-3},
        "points": points,
        "summary": None,  # the command summarises the points it writes
    }
    monkeypatch.setattr(dora_analysis, "run_dora_analysis", lambda *a, **k: result)
    out = tmp_path / "records" / "dora_analysis.json"
    code = cli_main(["dora-analysis", "--seeds", "3", "--json", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    text = out.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    document = json.loads(text)
    assert len(document["points"]) == len(points) - 3
    assert document["points"] == record_points(points)
    assert document["summary"] == json.loads(json.dumps(summarize_points(document["points"])))
    assert document["smoke"] is True and document["machine"]["cores"]
    assert document["date"] == datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    assert str(tmp_path) not in document["command"]
    assert format_summary(document["summary"]) in capsys.readouterr().out
    assert load_record(out, "dora_analysis")["summary"] == document["summary"]


def test_the_command_is_registered(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["dora-analysis", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--seeds" in out and "--json" in out and "--no-cache" in out


@pytest.mark.slow
def test_cli_smoke_writes_every_point_and_the_summary_recomputes(tmp_path):
    out = tmp_path / "dora.json"
    env = {**os.environ, "MINIGPT_CACHE": str(tmp_path / "cache")}
    argv = ["--smoke", "--seeds", "2", "--json", str(out), "--no-progress"]
    result = subprocess.run(
        [sys.executable, "-m", "minigpt", "dora-analysis", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    document = json.loads(out.read_text())
    assert document["kind"] == "dora_analysis" and document["smoke"] is True
    assert {"date", "command", "settings", "lrs", "points", "summary"} <= set(document)
    assert str(tmp_path) not in document["command"]
    settings = document["settings"]
    assert set(document["lrs"]) == {"full", "lora", "dora"} and settings["seeds"] == 2
    points = document["points"]
    layers = GPTConfig.from_preset("micro").n_layer
    assert len(points) == 3 * 2 * 2 * layers * len(settings["checkpoints"])
    assert len(settings["checkpoints"]) == 4
    assert all(tuple(p) == POINT_KEYS for p in points)
    assert all(p["lr"] == document["lrs"][p["method"]] for p in points)
    # the summary is a function of the points alone, and so is every printed table
    assert summarize_points(points) == document["summary"]
    assert format_summary(document["summary"]) in result.stdout
    for line in verdict(document["summary"]):
        assert line in result.stdout
    for method in ("full", "lora", "dora"):
        for seed in (0, 1):
            run = [
                p
                for p in points
                if (p["method"], p["seed"], p["matrix"]) == (method, seed, "query")
            ]
            want = np.corrcoef([p["dD"] for p in run], [p["dM"] for p in run])[0, 1]
            got = document["summary"][method]["query"]["corr"]["per_seed"][seed]
            assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
            assert f"{got:+.2f}" in result.stdout
