"""The head-to-head comparison (minigpt.lab.runs) and the benchmark script (minigpt.lab.bench), in
smoke mode.

No timings are asserted: only that every column is there, that the numbers that are deterministic
(parameter counts, file sizes, memory parts) relate the way the methods imply, and that bad input is
refused with the argument named.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

from minigpt.analysis import delta_ratio
from minigpt.lab import bench
from minigpt.lab.lab import Lab, chosen_records, main, run_comparison
from minigpt.lab.report import (
    best_accuracy,
    exceeds_spread,
    forgetting_at_accuracy,
    format_table,
    front,
    summarize,
    verdict,
)
from minigpt.lab.runs import (
    CURVE_KEYS,
    DEFAULT_RANK,
    METHODS,
    RECORD_KEYS,
    SMOKE_LR_GRID,
    RunSpec,
    finetune,
    prepare_model,
)
from minigpt.lab.task import task_accuracy
from minigpt.lora import replace_linear_with_lora
from minigpt.model import GPTConfig, GPTModel


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One MINIGPT_CACHE for this session: the smoke pretrained model is trained once."""
    path = tmp_path_factory.mktemp("minigpt-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINIGPT_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def every_record(cache):
    return run_comparison(seeds=2, smoke=True)


@pytest.fixture(scope="session")
def records(every_record):
    return chosen_records(every_record)


def test_every_rate_has_every_seed_and_its_curve(every_record):
    assert [(r["method"], r["lr"], r["seed"]) for r in every_record] == [
        (m, lr, s) for m in METHODS for lr in SMOKE_LR_GRID for s in (0, 1)
    ]
    for r in every_record:
        assert [p["step"] for p in r["curve"]][0] == 0 and r["curve"][-1]["step"] == r["steps"]
        assert set(r["curve"][-1]) == set(CURVE_KEYS)
        assert r["diverged_at"] is None
    for method in METHODS:  # one chosen rate per method, and it is the best by validation
        chosen = {r["lr"] for r in every_record if r["method"] == method and r["chosen"]}
        assert len(chosen) == 1


def test_one_record_per_method_and_seed(records):
    assert [(r["method"], r["seed"]) for r in records] == [(m, s) for m in METHODS for s in (0, 1)]
    for r in records:
        assert tuple(r)[: len(RECORD_KEYS)] == RECORD_KEYS
        for key in (
            "domain_loss",
            "shakespeare_loss",
            "shakespeare_loss_before",
            "delta_ratio",
            "seconds",
        ):
            assert math.isfinite(r[key]) and r[key] >= 0, (r["method"], key, r[key])
        assert 0.0 <= r["task_accuracy"] <= 1.0 and r["lr"] in SMOKE_LR_GRID
    by_method = {}
    for r in records:  # the seeds of one method share its tuned lr
        by_method.setdefault(r["method"], set()).add(r["lr"])
    assert all(len(lrs) == 1 for lrs in by_method.values())


def test_numbers_relate_as_the_methods_imply(records):
    by = {r["method"]: r for r in records if r["seed"] == 0}
    base = GPTModel(GPTConfig.from_preset("micro"))
    total = sum(p.numel() for p in base.parameters())
    assert by["full"]["trainable"] == total
    # rank r on every linear but the head: r * (in + out) per layer
    cfg, rank = (
        base.cfg,
        DEFAULT_RANK,
    )
    per_block = 4 * rank * (2 * cfg.n_embd) + 2 * rank * (cfg.n_embd + 4 * cfg.n_embd)
    assert (
        by["lora"]["trainable"]
        == by["rslora"]["trainable"]
        == by["pissa"]["trainable"]
        == cfg.n_layer * per_block
    )
    magnitudes = cfg.n_layer * (4 * cfg.n_embd + 4 * cfg.n_embd + cfg.n_embd)
    assert by["dora"]["trainable"] == by["lora"]["trainable"] + magnitudes
    for method in ("lora", "rslora", "pissa", "dora"):
        assert by[method]["checkpoint_bytes"] < by["full"]["checkpoint_bytes"]
        assert by[method]["delta_ratio"] > 0  # trained adapters moved the effective weights
    # PiSSA's file also holds A0 and B0 (to convert to a LoRA for the original weights): about twice
    # LoRA's
    assert 1.8 < by["pissa"]["checkpoint_bytes"] / by["lora"]["checkpoint_bytes"] < 2.2


def test_runs_are_cached_by_configuration(cache, records):
    lab = Lab(smoke=True)
    spec = lab.spec("lora", SMOKE_LR_GRID[0], seed=0)
    first = lab.run(spec)
    assert lab.run(spec) == first  # read back, not recomputed
    files = list(lab.folder.glob("lora-*.json"))
    assert files
    for f in files:
        f.write_text("{not json")  # a damaged entry is recomputed, not trusted
    with pytest.warns(UserWarning, match="cannot be read"):
        assert lab.run(spec)["method"] == "lora"


@pytest.mark.parametrize("method", ["full", "pissa", "dora"])
def test_seed_zero_models_come_back_from_the_cache(cache, records, method):
    lab = Lab(smoke=True)
    spec = lab.spec(method, SMOKE_LR_GRID[1], seed=0)
    record = lab.run(spec)
    weights = lab._path(spec).with_suffix(".safetensors")
    assert weights.is_file()
    trained = lab.model(spec)  # read back: training again would rewrite the file
    mtime = weights.stat().st_mtime_ns
    again = lab.model(spec)
    assert weights.stat().st_mtime_ns == mtime
    tokens = torch.randint(0, lab.base.cfg.vocab_size, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(trained(tokens), again(tokens), rtol=0, atol=0)
        # the fine-tuned weights, not the base
        assert not torch.equal(trained(tokens), lab.base(tokens))
    assert task_accuracy(trained, lab.data.task_val) == record["val_accuracy"]
    assert delta_ratio(lab.base, trained) == pytest.approx(record["delta_ratio"], rel=1e-6)
    weights.write_bytes(b"damaged")  # a damaged weights file is retrained and replaced
    with pytest.warns(UserWarning, match="digest"):
        assert lab.model(spec) is not None and weights.stat().st_size > 100


def test_format_table_shows_mean_and_spread(records):
    table = format_table(records)
    lines = table.splitlines()
    assert lines[2].startswith("| pretrained |")
    assert [line.split(" | ")[0] for line in lines[3 : 3 + len(METHODS)]] == [
        f"| {m}" for m in METHODS
    ]
    assert all(line.count("±") == 4 for line in lines[3 : 3 + len(METHODS)])
    assert "over 2 seeds" in table


def test_summary_statistics():
    rows = [
        {
            "method": "lora",
            "lr": 1e-3,
            "trainable": 5,
            "task_accuracy": a,
            "domain_loss": 1.0,
            "shakespeare_loss": 2.0,
            "delta_ratio": 0.1,
        }
        for a in (0.5, 0.7, 0.9)
    ]
    summary = summarize(rows)["lora"]
    assert summary["task_accuracy"] == pytest.approx((0.7, 0.2)) and summary["n"] == 3
    assert exceeds_spread([0.5, 0.7, 0.9], [0.1, 0.1, 0.1])
    assert not exceeds_spread([0.5, 0.7, 0.9], [0.6, 0.8, 0.7])
    # means differ, by less than the spread
    assert not exceeds_spread([0.5, 0.7, 0.9], [0.6, 0.8, 0.75])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"methods": ["lora", "qlora"]}, "methods"),
        ({"methods": []}, "methods"),
        ({"rank": 0}, "rank"),
        ({"steps": 0}, "steps"),
        ({"alpha": -1.0}, "alpha"),
        ({"seeds": 0}, "seeds"),
    ],
)
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        run_comparison(smoke=True, **kwargs)


def test_compare_main_rejects_bad_arguments(capsys):
    for argv, name in (
        (["--methods", "lora,nope"], "methods"),
        (["--rank", "0"], "rank"),
        (["--seeds", "0"], "seeds"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert name in capsys.readouterr().err


@pytest.mark.slow
def test_cli_compare_smoke_writes_json_records(cache, tmp_path):
    import json

    env = {**os.environ, "MINIGPT_CACHE": str(cache)}
    out = tmp_path / "out.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "minigpt",
            "compare",
            "--smoke",
            "--methods",
            "full,lora",
            "--seeds",
            "2",
            "--json",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "| full |" in result.stdout
        and "| lora |" in result.stdout
        and "| dora |" not in result.stdout
    )
    document = json.loads(out.read_text())
    assert document["kind"] == "compare" and document["settings"]["grid"] == list(SMOKE_LR_GRID)
    assert str(tmp_path) not in out.read_text()  # no machine paths in a record
    records = document["records"]
    assert [(r["method"], r["lr"], r["seed"]) for r in records] == [
        (m, lr, s) for m in ("full", "lora") for lr in SMOKE_LR_GRID for s in (0, 1)
    ]
    assert set(document["chosen"]) == {"full", "lora"}
    assert all(len(r["curve"]) >= 2 for r in records)
    required = {
        "method",
        "seed",
        "lr",
        "rank",
        "trainable",
        "task_accuracy",
        "domain_loss",
        "shakespeare_loss",
        "shakespeare_loss_before",
        "seconds",
    }
    assert all(required <= set(r) for r in records)


def test_training_memory_counts_the_parts():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("micro"))
    batch = bench.random_batch(model.cfg, 2)
    full = bench.training_memory(model, batch)
    n_params = sum(p.numel() for p in model.parameters())
    assert full["parameters"] >= 4 * n_params and full["gradients"] == 4 * n_params
    # AdamW: two moments per parameter (+ step counters)
    assert full["optimizer"] >= 2 * full["gradients"]
    assert full["activations"] > 0
    assert full["total"] == sum(v for k, v in full.items() if k != "total")
    replace_linear_with_lora(model, 4, 8)
    lora = bench.training_memory(model, batch)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora["gradients"] == 4 * trainable and lora["total"] < full["total"]
    assert all(p.grad is None for p in model.parameters())  # measured on a copy


def test_bench_smoke_prints_every_row(capsys):
    assert bench.main(["--smoke", "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name in (*bench.TRAINING_VARIANTS, *bench.INFERENCE_VARIANTS):
        assert any(line.startswith(name + " ") for line in lines), f"no row for {name}:\n{out}"
    assert "targets" in out and sum(line.endswith(" the target") for line in lines) == 6
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])


def test_prepare_model_builds_each_method():
    from minigpt.dora import LinearWithDoRA
    from minigpt.lora import LinearWithLoRA, adapter_layers
    from minigpt.pissa import LinearWithPiSSA

    torch.manual_seed(0)
    base = GPTModel(GPTConfig.from_preset("micro"))
    full = prepare_model(base, "full", 4, 8.0)
    assert all(p.requires_grad for p in full.parameters()) and not adapter_layers(full)
    expected = {
        "lora": (LinearWithLoRA, 8.0 / 4),
        "rslora": (LinearWithLoRA, 8.0 / 2),
        "pissa": (LinearWithPiSSA, 8.0 / 4),
        "dora": (LinearWithDoRA, 8.0 / 4),
    }
    for method, (cls, scaling) in expected.items():
        layers = adapter_layers(prepare_model(base, method, 4, 8.0))
        assert len(layers) == 6 * base.cfg.n_layer and "lm_head" not in dict(layers)
        assert all(
            type(layer) is cls and layer.scaling == pytest.approx(scaling) for _, layer in layers
        ), method
    # the same seed gives every LoRA-initialised method the same A
    a1 = adapter_layers(prepare_model(base, "lora", 4, 8.0, seed=3))[0][1].lora.A
    a2 = adapter_layers(prepare_model(base, "dora", 4, 8.0, seed=3))[0][1].lora.A
    torch.testing.assert_close(a1, a2)
    with pytest.raises(ValueError, match="method"):
        prepare_model(base, "qlora", 4, 8.0)


@pytest.mark.slow
def test_worker_processes_give_the_same_records_and_cache(cache, records, monkeypatch):
    """Runs trained in worker processes (one thread each) equal those trained here, and land in the
    cache."""
    specs = [
        Lab(smoke=True).spec(method, 2e-3, seed)
        for method, seed in (("lora", 0), ("dora", 1), ("full", 0))
    ]
    here = Lab(smoke=True, cache=False)
    expected = here.runs(specs)
    monkeypatch.setenv("MINIGPT_LAB_WORKERS", "2")
    lab = Lab(smoke=True)
    assert lab.workers == 2
    got = lab.runs(specs)
    assert lab._pool is not None  # the workers trained them, not this process
    for a, b in zip(expected, got, strict=False):
        assert (a["method"], a["seed"]) == (b["method"], b["seed"])
        for key in (
            "task_accuracy",
            "val_accuracy",
            "domain_loss",
            "shakespeare_loss",
            "delta_ratio",
        ):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["method"], key)
    assert lab.runs(specs) == got  # read back from the cache the parent wrote
    assert lab._path(specs[0]).with_suffix(".safetensors").is_file()
    # weights are kept for seed 0 only
    assert not lab._path(specs[1]).with_suffix(".safetensors").exists()
    lab._pool.close()


@pytest.mark.parametrize("value", ["0", "two", "-1", ""])
def test_bad_worker_count_is_named(monkeypatch, value):
    from minigpt.lab.pool import lab_workers

    monkeypatch.setenv("MINIGPT_LAB_WORKERS", value)
    with pytest.raises(ValueError, match="MINIGPT_LAB_WORKERS"):
        lab_workers()


def test_worker_count_follows_the_free_cores(monkeypatch):
    from minigpt.lab import pool as lab_pool

    monkeypatch.delenv("MINIGPT_LAB_WORKERS", raising=False)
    monkeypatch.setattr(lab_pool.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert lab_pool.lab_workers() == 4 and lab_pool.lab_workers(smoke=True) == 1
    # what apply_cpu_thread_settings sets when 3 cores are busy
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert lab_pool.lab_workers() == 1


@pytest.mark.slow
def test_a_failed_worker_run_is_raised_and_nothing_of_it_is_cached(cache, records, monkeypatch):
    """A run that fails in a worker raises here with its own message; the pool is stopped, the runs
    that finished are kept, nothing is cached for the failed one, and the next call starts a new
    pool."""
    monkeypatch.setenv("MINIGPT_LAB_WORKERS", "2")
    lab = Lab(smoke=True)
    good = lab.spec("lora", 3e-3, 0)
    bad = lab.spec("lora", 3e-3, 0, targets=("no_such_layer",))
    with pytest.raises(ValueError, match="no_such_layer"):
        lab.runs([good, bad])
    assert lab._pool is None
    assert not lab._path(bad).exists()
    # a new pool (or the cache for a run that finished)
    fresh = lab.runs([good, lab.spec("lora", 3e-3, 1)])
    assert [r["seed"] for r in fresh] == [0, 1] and lab._path(good).is_file()
    if lab._pool is not None:
        lab._pool.close()


def test_curve_points_do_not_change_the_run(cache, records):
    """``curve_every=0`` keeps only the curve's start and end; the evaluations in between leave
    training alone, and the start the lab computes once equals the one a run would compute for
    itself."""
    lab = Lab(smoke=True, cache=False)
    plain = RunSpec("lora", 3e-3, 0, steps=8, batch_size=4, curve_every=0)
    _, without = finetune(lab.base, plain, lab.data, lab.eval_batches)
    _, with_curve = finetune(
        lab.base,
        RunSpec("lora", 3e-3, 0, steps=8, batch_size=4, curve_every=2),
        lab.data,
        lab.eval_batches,
        start=lab.start(),
    )
    assert [p["step"] for p in without["curve"]] == [0, 8]
    assert [p["step"] for p in with_curve["curve"]] == [0, 2, 4, 6, 8]
    assert without["curve"][0] == lab.start() == with_curve["curve"][0]
    assert without["curve"][-1] == with_curve["curve"][-1]
    assert without["curve"][-1]["val_accuracy"] == without["val_accuracy"]
    for key in ("train_loss", "task_accuracy", "domain_loss", "shakespeare_loss", "delta_ratio"):
        assert without[key] == with_curve[key], key
    with pytest.raises(ValueError, match="curve_every"):
        RunSpec("lora", 3e-3, curve_every=-1)


def test_default_curve_has_two_run_lengths_and_four_weight_checkpoints(cache, records):
    """By default a run is evaluated at half its length and at the end (the fronts' two run
    lengths), while DoRA's weight changes are taken at each quarter (the paper's four
    checkpoints)."""
    lab = Lab(smoke=True, cache=False)
    spec = RunSpec("dora", 3e-3, 0, steps=8, batch_size=4)
    assert spec.curve_every == 4
    _, record = finetune(lab.base, spec, lab.data, lab.eval_batches, start=lab.start())
    assert [p["step"] for p in record["curve"]] == [0, 4, 8]
    assert sorted({p["step"] for p in record["weight_changes"]}) == [2, 4, 6, 8]


def _run(lr, seed, points, before=4.0):
    """A record with a hand-made curve: ``points`` = [(step, task accuracy, Shakespeare loss)]."""
    curve = [{"step": 0, "val_accuracy": 0.0, "task_accuracy": 0.0, "shakespeare_loss": before}]
    curve += [
        {"step": s, "val_accuracy": a, "task_accuracy": a, "shakespeare_loss": loss}
        for s, a, loss in points
    ]
    return {"method": "m", "lr": lr, "seed": seed, "curve": curve}


def test_front_and_forgetting_at_matched_accuracy():
    seed0 = [
        _run(1e-4, 0, [(100, 0.0, 4.2), (200, 0.1, 4.3)]),
        _run(1e-3, 0, [(100, 0.5, 4.8), (200, 0.9, 5.0)]),
        _run(1e-2, 0, [(100, 0.7, 6.0), (200, 0.6, 6.5)]),
    ]
    # at 200 steps only 1e-3 reaches 0.8: its forgetting, 1.0; at 100 steps 0.5 is reached by 1e-3
    # (0.8) and 1e-2 (2.0): the least
    assert forgetting_at_accuracy(seed0, 0.8, 200) == pytest.approx(1.0)
    assert forgetting_at_accuracy(seed0, 0.5, 100) == pytest.approx(0.8)
    assert forgetting_at_accuracy(seed0, 0.95, 200) is None
    assert best_accuracy(seed0, 200) == 0.9 and best_accuracy(seed0, 100) == 0.7
    seed1 = [_run(1e-3, 1, [(100, 0.3, 4.6), (200, 0.7, 5.2)])]
    points = front(seed0 + seed1, 200)
    assert [p["lr"] for p in points] == [1e-4, 1e-3, 1e-2]
    mid = points[1]
    assert mid["n"] == 2 and mid["task_accuracy"][0] == pytest.approx(0.8)
    assert mid["forgetting"][0] == pytest.approx(1.1) and mid["forgetting"][1] > 0
    assert front(seed0, 150) == []  # no checkpoint there
    assert verdict("x").startswith("Verdict: ")


def test_a_diverging_run_is_kept_as_a_point(cache):
    """A rate high enough to make the loss NaN stops that run, and its record says where."""
    lab = Lab(smoke=True, cache=False)
    _, record = finetune(
        lab.base, RunSpec("full", 1e6, 0, steps=6, batch_size=4), lab.data, lab.eval_batches
    )
    assert record["diverged_at"] is not None and record["diverged_at"] < 6
    assert record["curve"][-1]["step"] == record["diverged_at"]
