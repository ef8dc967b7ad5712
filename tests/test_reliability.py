"""Bad input and faults: validated configs (property tests), non-finite runs, atomic writes under a
kill, verified caches and checkpoints."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt import io
from minigpt.data import make_loader
from minigpt.model import GPTConfig, GPTModel
from minigpt.train import (
    TrainConfig,
    TrainingDiverged,
    load_model,
    save_checkpoint,
    train,
)

CFG = GPTConfig(vocab_size=32, context_length=8, n_layer=1, n_head=2, n_embd=16)
IDS = np.tile(np.arange(32), 20)

# ------------------------------------------------------------------------------ TrainConfig,
# properties

INT_FIELDS = {"steps": 0, "warmup_steps": 0, "eval_interval": 1, "eval_batches": 1, "seed": 0}
FLOAT_FIELDS = ("lr", "min_lr", "weight_decay", "grad_clip")
anything = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.integers(-100, 100).map(np.int64),
    st.floats(-10, 10).map(np.float32),
)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted(INT_FIELDS) + list(FLOAT_FIELDS)), value=anything)
def test_trainconfig_accepts_only_valid_values_and_names_the_field(field, value):
    kwargs = {"steps": 10**7, "warmup_steps": 0, "lr": 1.0, "min_lr": 0.0, field: value}
    try:
        cfg = TrainConfig(**kwargs)
    except (ValueError, TypeError) as err:
        assert f"TrainConfig.{field}" in str(err)
        assert isinstance(err, io.UserError)
        return
    stored = getattr(cfg, field)
    if field in INT_FIELDS:
        assert (
            type(stored) is int
            and stored >= INT_FIELDS[field]
            and not isinstance(value, (bool, float))
        )
    elif field == "grad_clip" and value is None:
        assert stored is None
    else:
        assert (
            type(stored) is float
            and math.isfinite(stored)
            and stored >= 0
            and not isinstance(value, bool)
        )
        assert field not in ("lr", "grad_clip") or stored > 0
    assert cfg.min_lr <= cfg.lr and cfg.warmup_steps <= cfg.steps


@settings(max_examples=200, deadline=None)
@given(
    steps=st.integers(0, 2000),
    warmup=st.integers(0, 2000),
    lr=st.floats(1e-6, 10),
    frac=st.floats(0, 1),
)
def test_schedule_is_finite_and_within_lr_for_every_valid_config(steps, warmup, lr, frac):
    if warmup > steps:
        with pytest.raises(ValueError, match="warmup_steps"):
            TrainConfig(steps=steps, warmup_steps=warmup, lr=lr, min_lr=lr * frac)
        return
    cfg = TrainConfig(
        steps=np.int64(steps), warmup_steps=warmup, lr=np.float32(lr), min_lr=lr * frac * 0.999
    )
    for step in {0, warmup, steps // 2, max(0, steps - 1), steps}:
        assert 0 <= cfg.lr_at(step) <= cfg.lr * (1 + 1e-12)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"grad_clip": -1}, "grad_clip"),
        ({"grad_clip": 0}, "grad_clip"),
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"steps": 10.0}, "steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"steps": 10}, "warmup_steps"),
        ({"betas": (0.9, 1.0)}, "betas[1]"),
        ({"betas": 0.9}, "betas"),
        ({"device": "tpu"}, "device"),
        ({"progress": "yes"}, "progress"),
        ({"seed": -1}, "seed"),
        ({"min_lr": 1.0}, "min_lr"),
    ],
)
def test_trainconfig_refuses_the_reported_cases(kwargs, field):
    with pytest.raises(
        (ValueError, TypeError), match=field.replace("[", r"\[").replace("]", r"\]")
    ):
        TrainConfig(**kwargs)


def test_numpy_scalars_become_python_numbers():
    cfg = TrainConfig(
        steps=np.int32(20),
        warmup_steps=np.int64(2),
        lr=np.float32(0.5),
        grad_clip=None,
        betas=[np.float64(0.9), 0.99],
        progress=np.bool_(False),
    )
    assert (type(cfg.steps), type(cfg.lr), cfg.betas, cfg.progress) == (
        int,
        float,
        (0.9, 0.99),
        False,
    )


# ------------------------------------------------------------------------------ non-finite training


def test_training_stops_at_the_first_nan_and_keeps_the_last_good_checkpoint(tmp_path):
    ckpt = tmp_path / "run.safetensors"
    torch.manual_seed(0)
    model = GPTModel(CFG)
    save_checkpoint(ckpt, model, step=0, extra={"note": "good"})
    before = ckpt.read_bytes()

    class PoisonAt:  # a loader whose 4th batch makes the loss NaN
        def __iter__(self):
            for i, (x, y) in enumerate(make_loader(IDS, 8, 4, seed=0)):
                if i == 3:
                    with torch.no_grad():
                        model.tok_emb.weight[x[0, 0]] = float("nan")
                yield x, y

    with pytest.raises(TrainingDiverged) as info:
        train(
            model,
            PoisonAt(),
            None,
            TrainConfig(steps=10, warmup_steps=1, lr=1e-2, progress=False),
            checkpoint=ckpt,
        )
    message = str(info.value)
    assert (
        "step 3" in message
        and "lr" in message
        and "lower learning rate" in message
        and str(ckpt) in message
    )
    assert ckpt.read_bytes() == before  # the last good checkpoint is still there, untouched
    weights = {
        k: v
        for k, v in model.state_dict().items()
        if k != "tok_emb.weight" and k != "lm_head.weight"
    }
    # the NaN update never reached them
    assert all(torch.isfinite(v).all() for v in weights.values())
    with pytest.raises(ValueError, match="tok_emb.weight"):
        save_checkpoint(tmp_path / "nan.safetensors", model)
    assert not (tmp_path / "nan.safetensors").exists()


def test_negative_clip_no_longer_reverses_training():
    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig(steps=30, warmup_steps=3, grad_clip=-1)


# ------------------------------------------------------------------------------ checkpoints on load


def _saved(tmp_path, name="m.safetensors"):
    torch.manual_seed(0)
    model = GPTModel(CFG)
    path = tmp_path / name
    save_checkpoint(path, model, step=1)
    return model, path


def _rewrite(path, mutate):
    """Rewrite a safetensors file with ``mutate(tensors, meta)`` applied, keeping the metadata."""
    from safetensors.torch import save_file

    meta, tensors = io.read_safetensors(path, "checkpoint")
    mutate(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


def test_flipped_bytes_in_a_checkpoint_are_detected(tmp_path):
    _, path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # inside the last tensor's data: still a valid safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(io.UserError, match="corrupted"):
        load_model(path)


def test_non_finite_checkpoint_tensors_are_refused_by_name(tmp_path):
    _, path = _saved(tmp_path)

    def poison(tensors, meta):
        tensors["model.ln_f.weight"][0] = float("inf")
        del meta["digest"]  # a file without a digest: only the finiteness check is left

    _rewrite(path, poison)
    with (
        pytest.warns(UserWarning, match="no digest"),
        pytest.raises(io.UserError, match="model.ln_f.weight"),
    ):
        load_model(path)


def test_bad_checkpoint_metadata_names_the_file(tmp_path):
    _, path = _saved(tmp_path)
    _rewrite(path, lambda tensors, meta: meta.update(config="{not json"))
    with pytest.raises(io.UserError, match=str(path)):
        load_model(path)
    _rewrite(path, lambda tensors, meta: meta.update(config=json.dumps({"n_layer": -1})))
    with pytest.raises(io.UserError, match="invalid GPTConfig"):
        load_model(path)


# ------------------------------------------------------------------------------ atomic writes under
# faults


def _temps(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_failure_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")

    def half_then_interrupt(tmp):
        with open(tmp, "wb") as handle:
            handle.write(b"x" * 100_000)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.atomic_save_file(half_then_interrupt, target)
    assert target.read_bytes() == b"old" and _temps(tmp_path) == []


WRITER = textwrap.dedent("""
    import sys, time
    from minigpt.io import atomic_save_file

    def slow(tmp):
        with open(tmp, "wb") as handle:
            handle.write(b"new" * 1_000_000)
            handle.flush()
            print("writing", flush=True)
            time.sleep(60)

    atomic_save_file(slow, sys.argv[1])
""")


@pytest.mark.skipif(os.name != "posix", reason="signals")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_save_killed_mid_way_keeps_the_old_file(tmp_path, sig):
    target = tmp_path / "run.safetensors"
    target.write_bytes(b"old")
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert len(_temps(tmp_path)) == 1  # the half-written temporary file
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert target.read_bytes() == b"old"
    if sig == signal.SIGINT:  # Ctrl-C: the writer removes its temporary file itself
        assert _temps(tmp_path) == []
    else:  # SIGKILL: nothing can clean up in the killed process; the next write to the target does
        assert len(_temps(tmp_path)) == 1
        io.atomic_write_bytes(target, b"new")
        assert target.read_bytes() == b"new" and _temps(tmp_path) == []


def test_atomic_write_fsyncs_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(
        os,
        "fsync",
        lambda fd: (
            synced.append(
                os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd
            ),
            real(fd),
        )[1],
    )
    io.atomic_write_bytes(tmp_path / "a.bin", b"data")
    assert len(synced) == 2
    if os.path.exists("/proc/self/fd"):
        assert synced[0].endswith(".tmp") and synced[1] == str(tmp_path)


# ------------------------------------------------------------------------------ caches


def test_every_cache_path_follows_minigpt_cache(tmp_path, monkeypatch):
    import minigpt.data
    import minigpt.hf
    import minigpt.lab.pretrained

    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path))
    assert io.cache_dir() == tmp_path
    assert minigpt.data.CACHE_DIR == tmp_path and minigpt.hf.CACHE_DIR == tmp_path / "gpt2"
    assert minigpt.lab.pretrained.cache_dir() == tmp_path


def test_pretrained_cache_is_verified_and_retrained(tmp_path, monkeypatch):
    import minigpt.lab.pretrained as pretrained

    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path))
    recipe = pretrained.SMOKE
    path = tmp_path / f"{recipe.name}.safetensors"
    trained = []

    def fake_pretrain(recipe, progress=True, checkpoint=None, device=None):
        torch.manual_seed(len(trained))
        model = GPTModel(GPTConfig.from_preset(recipe.preset))
        save_checkpoint(
            checkpoint, model, step=recipe.steps, extra=pretrained.recipe_metadata(recipe)
        )
        trained.append(checkpoint)
        return model, None

    monkeypatch.setattr(pretrained, "pretrain", fake_pretrain)
    first = pretrained.get_pretrained(smoke=True, progress=False)
    assert trained == [path]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = pretrained.get_pretrained(smoke=True, progress=False)  # from the cache, silently
    assert len(trained) == 1
    torch.testing.assert_close(again.state_dict(), first.state_dict())

    # another model's weights under this name
    other = GPTModel(GPTConfig.from_preset(recipe.preset))
    save_checkpoint(path, other, extra={"recipe": "someone-else"})
    with pytest.warns(UserWarning, match="someone-else"):
        pretrained.get_pretrained(smoke=True, progress=False)
    assert len(trained) == 2

    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # flipped bytes
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupted"):
        pretrained.get_pretrained(smoke=True, progress=False)
    assert len(trained) == 3


def test_a_cached_gpt2_download_is_checked_before_it_is_returned(tmp_path, monkeypatch):
    import minigpt.hf as hf

    dest = tmp_path / "gpt2"
    dest.mkdir()
    (dest / "config.json").write_text("{}")
    (dest / "model.safetensors").write_bytes(b"junk")
    fetched = []

    def offline(url, timeout):
        fetched.append(url)
        raise ConnectionError("offline")

    monkeypatch.setattr(hf, "_fetch", offline)
    with pytest.warns(UserWarning, match="no recorded SHA-256"), pytest.raises(ConnectionError):
        hf.download_gpt2(dest)
    import hashlib

    good = hashlib.sha256(b"junk").hexdigest()
    assert hf.download_gpt2(dest, sha256=good) == dest and not fetched[1:]
    (dest / "model.safetensors.sha256").write_text("0" * 64)
    with pytest.warns(UserWarning, match="expected 0000"), pytest.raises(ConnectionError):
        hf.download_gpt2(dest)
    (dest / "model.safetensors.sha256").write_text(good)
    assert hf.download_gpt2(dest) == dest


# ------------------------------------------------------------------------------ quantisation


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_quantisation_refuses_non_finite_weights_naming_the_tensor(method):
    from minigpt.quant import quantize_int8_blockwise, quantize_nf4, replace_linear_with_quantized

    w = torch.randn(8, 16)
    w[3, 5] = float("nan")
    quantize = quantize_nf4 if method == "nf4" else quantize_int8_blockwise
    with pytest.raises(ValueError, match="non-finite"):
        quantize(w)
    model = GPTModel(CFG)
    with torch.no_grad():
        model.blocks[0].mlp.fc.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc\.weight"):
        replace_linear_with_quantized(model, method)
