"""The device contract (docs/architecture.md, "Device contract").

Two kinds of tests: contract tests that run on a CPU with the hardware mocked (compute capability,
device count), and tests parametrised over the devices this machine has, which run on CUDA where a
GPU exists and are skipped elsewhere. ``scripts/gpu_check.sh`` runs this file on a GPU.
"""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minigpt._validate import UserError
from minigpt.data import make_loader
from minigpt.generate import generate, generate_text
from minigpt.model import GPTConfig, GPTModel
from minigpt.train import (
    TrainConfig,
    choose_device,
    eval_precision,
    evaluate,
    load_model,
    make_optimizer,
    resolve_precision,
    save_checkpoint,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
CFG = GPTConfig(vocab_size=64, context_length=16, n_embd=32, n_head=2, n_layer=2)
IDS = np.random.default_rng(0).integers(0, CFG.vocab_size, 2000)
HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device here")),
]


def fake_cuda(monkeypatch, capability=(7, 5), count=1):
    """Make this process believe it has ``count`` CUDA devices of ``capability`` (no kernels)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


# --------------------------------------------------------------------------------------------------
# Mocked hardware, on any machine


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((6, 1), "fp32"), ((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")],
)
def test_bf16_only_on_cuda_devices_that_have_it_natively(monkeypatch, capability, expected):
    monkeypatch.delenv("MINIGPT_PRECISION", raising=False)
    fake_cuda(monkeypatch, capability)
    cuda = torch.device("cuda")
    assert resolve_precision("auto", cuda) == expected  # a T4-like 7.5 device gets fp32
    assert resolve_precision("bf16", cuda) == "bf16"  # asked for by name: honoured
    monkeypatch.setenv("MINIGPT_PRECISION", "fp32")
    assert resolve_precision("auto", cuda) == "fp32"


def test_cpu_precision_follows_native_bf16(monkeypatch):
    monkeypatch.delenv("MINIGPT_PRECISION", raising=False)
    for native, expected in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr("minigpt.device.cpu_has_native_bf16", lambda native=native: native)
        assert resolve_precision("auto", torch.device("cpu")) == expected


def test_a_cuda_index_beyond_the_device_count_is_a_one_line_error(monkeypatch):
    fake_cuda(monkeypatch, count=1)
    assert choose_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(UserError) as err:
        choose_device("cuda:1")
    message = str(err.value)
    assert "\n" not in message and "'cuda:1'" in message and "1 CUDA device " in message
    fake_cuda(monkeypatch, count=2)
    assert choose_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(UserError, match="2 CUDA devices"):
        choose_device("cuda:2")


def test_cuda_without_a_gpu_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0"):
        with pytest.raises(UserError, match=r"torch.cuda.is_available\(\) is False"):
            choose_device(name)
    assert choose_device(None) == torch.device("cpu")


def test_the_cli_reports_a_missing_cuda_index_in_one_line():
    if HAS_CUDA and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    out = subprocess.run(
        [sys.executable, "-m", "minigpt", "bench", "--smoke", "--device", "cuda:7"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "cuda:7" in out.stderr.strip().splitlines()[-1]


def test_evaluation_precision_is_the_runs_off_the_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert eval_precision("fp32", cuda) == "fp32"  # an fp32 run reports fp32 losses
    assert eval_precision("bf16", cuda) == "bf16"
    assert eval_precision("bf16", cpu) == "fp32"  # CPU losses comparable across CPUs


def test_evaluate_honours_the_precision_it_is_given():
    seen = []
    torch.manual_seed(0)
    model = GPTModel(CFG)
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    loader = make_loader(IDS, 8, 4, shuffle=False)
    fp32 = evaluate(model, loader, 2)
    assert set(seen) == {torch.float32}
    seen.clear()
    bf16 = evaluate(model, loader, 2, precision="bf16")
    assert set(seen) == {torch.bfloat16}
    assert fp32 != bf16 and abs(fp32 - bf16) < 0.05
    with pytest.raises(UserError, match="precision must be 'fp32' or 'bf16'"):
        evaluate(model, loader, 2, precision="fp16")


def test_train_evaluates_in_what_eval_precision_says(monkeypatch):
    import minigpt.train as train_module

    asked = []
    real = train_module.evaluate
    monkeypatch.setattr(
        train_module,
        "evaluate",
        lambda *args, **kwargs: asked.append(args[4]) or real(*args, **kwargs),
    )
    torch.manual_seed(0)
    cfg = TrainConfig(steps=4, warmup_steps=1, eval_interval=2, eval_batches=1, progress=False)
    loader = make_loader(IDS, 8, 4, seed=0)
    train(GPTModel(CFG), loader, loader, dataclasses.replace(cfg, precision="bf16"))
    assert asked == ["fp32", "fp32"]  # on the CPU
    asked.clear()
    monkeypatch.setattr(train_module, "eval_precision", lambda precision, device: precision)
    train(GPTModel(CFG), loader, loader, dataclasses.replace(cfg, precision="bf16"))
    assert asked == ["bf16", "bf16"]  # as on a GPU: the run's own precision


@pytest.mark.parametrize(
    ("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)]
)
def test_muon_newton_schulz_follows_the_precision(monkeypatch, precision, dtype):
    monkeypatch.delenv("MINIGPT_PRECISION", raising=False)
    model = GPTModel(CFG)
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"), precision)
    assert optimizer.muon.ns_dtype == dtype
    monkeypatch.setenv("MINIGPT_PRECISION", precision)  # "auto" resolved as train() does
    assert make_optimizer(model, TrainConfig(optimizer="muon")).muon.ns_dtype == dtype


def test_muon_in_float32_matches_bf16_closely():
    from minigpt.muon import newton_schulz

    torch.manual_seed(0)
    stack = torch.randn(3, 16, 24)
    fp32, bf16 = newton_schulz(stack, dtype=torch.float32), newton_schulz(stack)
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    torch.testing.assert_close(fp32, bf16.float(), atol=0.05, rtol=0.05)


def test_the_pretrained_cache_key_names_device_and_precision(monkeypatch):
    from minigpt.lab.pretrained import SMOKE

    monkeypatch.delenv("MINIGPT_PRECISION", raising=False)
    monkeypatch.setattr("minigpt.device.cpu_has_native_bf16", lambda: False)
    cpu_name = dataclasses.replace(SMOKE, device="cpu").name
    assert cpu_name.endswith("-fp32") and "cpu" not in cpu_name
    fake_cuda(monkeypatch, (7, 5))
    assert (
        dataclasses.replace(SMOKE, device="cuda").name == cpu_name[: -len("-fp32")] + "-cuda-fp32"
    )
    fake_cuda(monkeypatch, (8, 0))
    assert dataclasses.replace(SMOKE, device="cuda").name.endswith("-cuda-bf16")
    assert SMOKE.name.endswith("-cuda-bf16")  # None: the default device, here the (fake) GPU


def test_the_lab_cache_key_holds_device_and_precision(monkeypatch, tmp_path):
    from minigpt.lab.lab import Lab
    from minigpt.lab.runs import RunSpec

    lab = Lab.__new__(Lab)  # only what the key reads: no base model needed
    lab.folder, lab.eval_batches, lab.precision = tmp_path, 2, "fp32"
    lab.device = torch.device("cpu")
    spec = RunSpec("lora", 1e-3)
    on_cpu = lab._path(spec)
    lab.precision = "bf16"
    assert lab._path(spec) != on_cpu
    lab.precision, lab.device = "fp32", torch.device("cuda")
    assert lab._path(spec) != on_cpu


def test_weight_deltas_are_cpu_tensors_whatever_the_devices():
    from minigpt.analysis import weight_deltas
    from minigpt.lora import replace_linear_with_lora

    torch.manual_seed(0)
    base = GPTModel(CFG)
    tuned = replace_linear_with_lora(GPTModel(CFG), 2, 4)
    tuned.load_state_dict(base.state_dict(), strict=False)
    for w0, delta in weight_deltas(base, tuned).values():
        assert w0.device.type == delta.device.type == "cpu"


# --------------------------------------------------------------------------------------------------
# On every device this machine has (CUDA where it exists)


@pytest.fixture
def smoke_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("device", DEVICES)
def test_train_leaves_the_model_on_its_device_and_entry_points_follow(device):
    torch.manual_seed(0)
    model = GPTModel(CFG)
    loader = make_loader(IDS, 8, 4, seed=0)
    cfg = TrainConfig(steps=6, warmup_steps=1, eval_interval=3, progress=False, device=device)
    history = train(model, loader, loader, cfg)
    assert next(model.parameters()).device.type == device
    assert np.isfinite(history.val_loss).all()
    # Inputs on the CPU, as a chapter builds them: every entry point moves them.
    assert np.isfinite(evaluate(model, make_loader(IDS, 8, 4, shuffle=False), 2))
    prompt = torch.tensor([[1, 2, 3]])
    out = generate(model, prompt, 5)
    assert out.device.type == device and out.shape == (1, 8)
    sampler = torch.Generator(device=device).manual_seed(0)
    assert generate(model, prompt, 5, temperature=1.0, generator=sampler).shape == (1, 8)
    text = generate_text(model, "ab", lambda s: [ord(c) % 64 for c in s], str, 4, seed=1)
    assert isinstance(text, str)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_token_ids_are_the_courses_value_error_before_any_kernel(device):
    model = GPTModel(CFG).to(device)
    too_long = torch.zeros(1, CFG.context_length + 1, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="exceeds context_length"):
        model(too_long)
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(1, 4, device=device))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 64\)"):
        generate(model, torch.tensor([[1, 64]]), 2)  # checked on the CPU, then moved
    # a long prompt is fine for generate: only the last context_length ids reach the model
    long_prompt = torch.ones(1, CFG.context_length + 5, dtype=torch.long)
    assert generate(model, long_prompt, 1).shape == (1, CFG.context_length + 6)
    ok = torch.ones(1, 3, dtype=torch.long, device=device)
    assert torch.isfinite(model(ok)).all()  # the device is still usable after the refusals


@pytest.mark.parametrize("device", DEVICES)
def test_load_model_puts_the_model_on_the_requested_or_default_device(device, tmp_path):
    model = GPTModel(CFG)
    save_checkpoint(tmp_path / "m.safetensors", model)
    assert next(load_model(tmp_path / "m.safetensors", device).parameters()).device.type == device
    default = next(load_model(tmp_path / "m.safetensors").parameters()).device
    assert default == choose_device(None) or default.type == choose_device(None).type


@pytest.mark.parametrize("device", DEVICES)
def test_get_pretrained_has_one_device_whether_cached_or_trained(device, smoke_cache):
    from minigpt.lab.pretrained import get_pretrained

    trained = get_pretrained(smoke=True, progress=False, device=device)
    assert list(smoke_cache.glob("*.safetensors"))  # the file the second call reads
    cached = get_pretrained(smoke=True, progress=False, device=device)
    for model in (trained, cached):
        assert next(model.parameters()).device.type == device and not model.training
    for a, b in zip(trained.state_dict().values(), cached.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    default = get_pretrained(smoke=True, progress=False)
    assert next(default.parameters()).device.type == choose_device(None).type


@pytest.mark.parametrize("device", DEVICES)
def test_lab_base_runs_and_baselines_share_its_device(device, smoke_cache):
    from minigpt.lab.lab import Lab
    from minigpt.lab.pool import lab_workers
    from minigpt.lab.task import answer

    lab = Lab(smoke=True, device=device)
    assert lab.device.type == device and next(lab.base.parameters()).device.type == device
    assert lab.workers == (lab_workers(True) if device == "cpu" else 1)
    assert lab.precision == resolve_precision("auto", lab.device)
    spec = lab.spec("lora", 1e-3)
    record = lab.run(spec)
    assert (
        np.isfinite(record["domain_loss"])
        and record["domain_loss_before"] == lab.before()["domain_loss"]
    )
    for model in (lab.model(spec), lab._train(spec)[0]):  # cached weights, then trained again
        assert {p.device.type for p in model.parameters()} == {device}
        assert len(answer(model, ["Turn not lord you:"])) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_bench_states_device_and_precision(device):
    pytest.importorskip("peft")
    from minigpt.lab.bench import SMOKE_SETTINGS, format_report, run_benchmarks

    result = run_benchmarks(SMOKE_SETTINGS, device=device, progress=False)
    report = format_report(result)
    assert result["precision"] == "fp32" and f"device {device}" in report and "fp32" in report
    if device == "cuda":  # each variant alone on the device: LoRA's peak below full fine-tuning's
        peaks = {name: row["memory"]["cuda_peak"] for name, row in result["training"].items()}
        assert peaks["lora"] < peaks["full"]
