"""The head-to-head comparison (minigpt.compare) and the benchmark script (minigpt.bench), in smoke mode.

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

from minigpt import bench, compare
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
def rows(cache):
    return compare.run_comparison(smoke=True, progress=False)


def test_every_method_has_every_column(rows):
    assert [r["method"] for r in rows] == ["pretrained", *compare.METHODS]
    for row in rows:
        assert tuple(row) == compare.COLUMNS
        for key in ("domain_loss", "shakespeare_loss"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["method"], key, row[key])
        assert 0.0 <= row["task_accuracy"] <= 1.0
    for row in rows[1:]:
        for key in ("lr", "trainable", "checkpoint_bytes", "memory_bytes", "seconds_per_step"):
            assert row[key] > 0, (row["method"], key, row[key])


def test_numbers_relate_as_the_methods_imply(rows, cache):
    by = {r["method"]: r for r in rows}
    base = GPTModel(GPTConfig.from_preset("micro"))
    total = sum(p.numel() for p in base.parameters())
    assert by["full"]["trainable"] == total and by["full"]["trainable_pct"] == pytest.approx(100.0)
    # rank r on every linear but the head: r * (in + out) per layer
    cfg = base.cfg
    per_block = 4 * 8 * (2 * cfg.n_embd) + 2 * 8 * (cfg.n_embd + 4 * cfg.n_embd)
    assert by["lora"]["trainable"] == by["rslora"]["trainable"] == by["pissa"]["trainable"] == cfg.n_layer * per_block
    magnitudes = cfg.n_layer * (4 * cfg.n_embd + 4 * cfg.n_embd + cfg.n_embd)
    assert by["dora"]["trainable"] == by["lora"]["trainable"] + magnitudes
    for method in ("lora", "rslora", "pissa", "dora"):
        assert by[method]["trainable"] < by["full"]["trainable"]
        assert by[method]["checkpoint_bytes"] < by["full"]["checkpoint_bytes"]
    for method in ("lora", "rslora", "pissa"):  # no gradients or AdamW state for the frozen weights
        assert by[method]["memory_bytes"] < by["full"]["memory_bytes"]
    # DoRA keeps extra (batch, tokens, out) activations per layer: more than LoRA, and on the tiny model
    # more than full fine-tuning, so only the first relation is a property of the method
    assert by["dora"]["memory_bytes"] > by["lora"]["memory_bytes"]
    # PiSSA's file also holds A0 and B0 (to convert to a LoRA for the original weights): about twice LoRA's
    assert 1.8 < by["pissa"]["checkpoint_bytes"] / by["lora"]["checkpoint_bytes"] < 2.2
    assert by["full"]["checkpoint_bytes"] > 4 * total  # float32 weights, plus the header


def test_format_table(rows):
    table = compare.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert len({line.count("|") for line in lines}) == 1  # every line has the same number of columns
    for row, line in zip(rows, lines[2:]):
        assert line.startswith(f"| {row['method']} |")
    assert "| – |" in lines[2]  # the pretrained row has no lr, size, memory or time


@pytest.mark.parametrize("kwargs, name", [({"methods": ["lora", "qlora"]}, "methods"), ({"methods": []}, "methods"),
                                          ({"rank": 0}, "rank"), ({"steps": 0}, "steps"), ({"alpha": -1.0}, "alpha"),
                                          ({"lrs": {"lora": -1e-3}}, "lrs"), ({"lrs": {"adam": 1e-3}}, "lrs")])
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        compare.run_comparison(smoke=True, progress=False, **kwargs)


def test_compare_main_rejects_bad_arguments(capsys):
    for argv, name in ((["--methods", "lora,nope"], "methods"), (["--rank", "0"], "rank")):
        with pytest.raises(SystemExit) as exit_info:
            compare.main(argv)
        assert exit_info.value.code == 2
        assert name in capsys.readouterr().err


def test_cli_compare_smoke(cache):
    env = {**os.environ, "MINIGPT_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-m", "minigpt", "compare", "--smoke", "--methods", "full,lora",
                             "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| full |" in result.stdout and "| lora |" in result.stdout and "| dora |" not in result.stdout


def test_training_memory_counts_the_parts():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("micro"))
    batch = bench.random_batch(model.cfg, 2)
    full = bench.training_memory(model, batch)
    n_params = sum(p.numel() for p in model.parameters())
    assert full["parameters"] >= 4 * n_params and full["gradients"] == 4 * n_params
    assert full["optimizer"] >= 2 * full["gradients"]  # AdamW: two moments per parameter (+ step counters)
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
    assert "goals:" in out and sum(("met" in line or "MISS" in line) for line in lines) == 6
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])


def test_prepare_model_builds_each_method():
    from minigpt.dora import LinearWithDoRA
    from minigpt.lora import LinearWithLoRA, adapter_layers
    from minigpt.pissa import LinearWithPiSSA

    torch.manual_seed(0)
    base = GPTModel(GPTConfig.from_preset("micro"))
    full = compare.prepare_model(base, "full", 4, 8.0)
    assert all(p.requires_grad for p in full.parameters()) and not adapter_layers(full)
    expected = {"lora": (LinearWithLoRA, 8.0 / 4), "rslora": (LinearWithLoRA, 8.0 / 2),
                "pissa": (LinearWithPiSSA, 8.0 / 4), "dora": (LinearWithDoRA, 8.0 / 4)}
    for method, (cls, scaling) in expected.items():
        layers = adapter_layers(compare.prepare_model(base, method, 4, 8.0))
        assert len(layers) == 6 * base.cfg.n_layer and "lm_head" not in dict(layers)
        assert all(type(layer) is cls and layer.scaling == pytest.approx(scaling) for _, layer in layers), method
    # the same seed gives every LoRA-initialised method the same A
    a1 = adapter_layers(compare.prepare_model(base, "lora", 4, 8.0, seed=3))[0][1].lora.A
    a2 = adapter_layers(compare.prepare_model(base, "dora", 4, 8.0, seed=3))[0][1].lora.A
    torch.testing.assert_close(a1, a2)
    with pytest.raises(ValueError, match="method"):
        compare.prepare_model(base, "qlora", 4, 8.0)
