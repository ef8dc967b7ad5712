"""Every artifact proves what it is, destinations are checked before the work, a failed save keeps
the work, and a user's mistake is one line naming the file."""

import errno
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import minigpt.lab.pretrained as pretrained
import minigpt.train
from minigpt import io
from minigpt.__main__ import main
from minigpt.data import make_loader
from minigpt.model import GPTConfig, GPTModel
from minigpt.train import TrainConfig, load_model, save_checkpoint, train

CFG = GPTConfig(vocab_size=32, context_length=8, n_layer=1, n_head=2, n_embd=16)


def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _saved(tmp_path, cfg=CFG, extra=None, name="m.safetensors"):
    torch.manual_seed(0)
    model = GPTModel(cfg)
    path = tmp_path / name
    save_checkpoint(path, model, step=1, extra=extra)
    return model, path


def _rewrite(path, mutate):
    """Rewrite a safetensors file with ``mutate(tensors, meta)`` applied, digest left as it was."""
    meta, tensors = io.read_safetensors(path, "file")
    mutate(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


def _below_a_file(tmp_path, name="model.safetensors"):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a regular file")
    return blocker / name


# ------------------------------------------------------------------------------ checkpoints


def test_a_changed_config_is_refused_naming_the_file_and_the_entry(tmp_path):
    _, path = _saved(tmp_path)
    config = dict(CFG.to_dict(), n_head=4)  # same shapes, other logits
    _rewrite(path, lambda tensors, meta: meta.update(config=json.dumps(config)))
    with pytest.raises(io.UserError, match=r"entry 'config' differs") as info:
        load_model(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_changed_step_or_extra_is_refused(tmp_path):
    _, path = _saved(tmp_path, extra={"recipe": "a"})
    _rewrite(path, lambda tensors, meta: meta.update(extra=json.dumps({"recipe": "b"})))
    with pytest.raises(io.UserError, match=r"entry 'extra' differs"):
        load_model(path)


def test_a_checkpoint_without_a_digest_loads_with_a_warning(tmp_path):
    model, path = _saved(tmp_path)
    _rewrite(path, lambda tensors, meta: meta.pop("digest"))
    with pytest.warns(UserWarning, match="no digest"):
        loaded = load_model(path)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())


def test_a_checkpoint_of_another_vocabulary_is_refused(tmp_path):
    _, path = _saved(tmp_path, extra={"vocab_sha256": "a" * 64})
    with pytest.raises(io.UserError, match="another vocabulary"):
        load_model(path, vocab_sha256="b" * 64)
    load_model(path, vocab_sha256="a" * 64)


def test_generate_refuses_a_checkpoint_of_another_vocabulary(tmp_path, capsys):
    micro = GPTConfig.from_preset("micro")
    _, path = _saved(tmp_path, micro, extra={"vocab_sha256": "0" * 64})
    code, out, err = run_cli(capsys, "generate", "--checkpoint", str(path), "--max-new-tokens", "2")
    assert code == 2 and "another vocabulary" in err and str(path) in err and not out
    assert len(err.strip().splitlines()) == 1


def test_an_absurd_config_is_refused_before_anything_is_allocated():
    with pytest.raises(ValueError, match="parameters"):
        GPTConfig(n_layer=1000, n_embd=65536, n_head=64)


def test_a_config_that_disagrees_with_the_stored_shapes_is_refused_before_allocation(
    tmp_path, monkeypatch
):
    _, path = _saved(tmp_path)
    big = dict(CFG.to_dict(), n_embd=4096, vocab_size=100_000)  # 400M+ parameters if built
    _rewrite(path, lambda tensors, meta: meta.update(config=json.dumps(big)))
    built = []
    real_init = GPTModel.__init__

    def spy(self, cfg):
        built.append(str(torch.get_default_device()))
        real_init(self, cfg)

    monkeypatch.setattr(GPTModel, "__init__", spy)
    with pytest.raises(io.UserError, match="config implies"):
        load_model(path)
    assert all(device == "meta" for device in built)


def test_loading_reads_the_tensors_once(tmp_path, monkeypatch):
    _, path = _saved(tmp_path)
    reads = []
    real = minigpt.train.read_safetensors

    def counting(path, kind, with_tensors=True):
        reads.append(with_tensors)
        return real(path, kind, with_tensors)

    monkeypatch.setattr(minigpt.train, "read_safetensors", counting)
    load_model(path)
    assert reads.count(True) == 1


# ------------------------------------------------------------------------------ before the work


class CountingLoader:
    def __init__(self):
        self.batches = 0

    def __iter__(self):
        for batch in make_loader(np.tile(np.arange(32), 20), 8, 4, seed=0):
            self.batches += 1
            yield batch


def test_train_refuses_a_checkpoint_below_a_file_before_the_first_step(tmp_path):
    loader = CountingLoader()
    target = _below_a_file(tmp_path)
    with pytest.raises(io.WriteError, match="is a file, not a folder") as info:
        train(GPTModel(CFG), loader, None, TrainConfig(steps=3, warmup_steps=1), checkpoint=target)
    assert loader.batches == 0 and str(tmp_path / "notes.txt") in str(info.value)


def test_cli_train_refuses_out_below_a_file_before_training(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(pretrained, "pretrain", lambda *a, **k: calls.append(a))
    target = _below_a_file(tmp_path)
    code, _, err = run_cli(capsys, "train", "--smoke", "--out", str(target))
    assert code == 2 and calls == [] and "--out" in err and "not a folder" in err
    assert len(err.strip().splitlines()) == 1


def test_a_cache_that_is_a_file_fails_before_pretraining(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pretrained, "pretrain", lambda *a, **k: calls.append(a))
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    monkeypatch.setenv("MINIGPT_CACHE", str(cache))
    with pytest.raises(io.WriteError, match="MINIGPT_CACHE"):
        pretrained.get_pretrained(smoke=True, progress=False, device="cpu")
    assert calls == []


def test_the_lab_checks_its_cache_before_the_base_is_trained(tmp_path, monkeypatch):
    from minigpt.lab import Lab

    calls = []
    monkeypatch.setattr(pretrained, "get_pretrained", lambda *a, **k: calls.append(a))
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    monkeypatch.setenv("MINIGPT_CACHE", str(cache))
    with pytest.raises(io.WriteError, match="MINIGPT_CACHE"):
        Lab(smoke=True, device="cpu")
    assert calls == []


@pytest.mark.parametrize("export", ["save_gpt2", "export_peft"])
def test_exports_refuse_a_folder_below_a_file(tmp_path, export):
    from minigpt.adapters import export_peft
    from minigpt.hf import save_gpt2
    from minigpt.lora import replace_linear_with_lora

    folder = _below_a_file(tmp_path, "export")
    model = GPTModel(CFG)
    with pytest.raises(io.WriteError, match="not a folder"):
        if export == "save_gpt2":
            save_gpt2(model, folder)
        else:
            export_peft(replace_linear_with_lora(model, rank=2, alpha=4), folder)


def test_an_os_error_on_a_write_names_the_target(tmp_path):
    target = tmp_path / "a.bin"

    def disk_full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left") as info:
        io.atomic_save_file(disk_full, target)
    assert str(target) in str(info.value)
    with pytest.raises(io.WriteError, match="not a folder"):
        io.atomic_write_bytes(_below_a_file(tmp_path, "b.bin"), b"x")


@pytest.mark.skipif(
    not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
    reason="root writes anywhere",
)
def test_a_folder_without_write_permission_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(io.WriteError, match=str(locked)):
        io.check_writable_file(locked / "m.safetensors", "checkpoint")


# ------------------------------------------------------------------------------ a failed save


def test_a_full_disk_at_the_end_of_training_keeps_the_weights_in_a_fallback(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    real = Path.write_bytes

    def full_disk_in_out(self, data):
        if Path(self).parent == out:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk_in_out)
    torch.manual_seed(0)
    model = GPTModel(CFG)
    loader = make_loader(np.tile(np.arange(32), 20), 8, 4, seed=0)
    cfg = TrainConfig(steps=3, warmup_steps=1, progress=False)
    with pytest.raises(io.WriteError, match="No space left") as info:
        train(model, loader, None, cfg, checkpoint=out / "run.safetensors")
    message = str(info.value)
    kept = [p for p in (tmp_path / "cache" / "unsaved").iterdir()]
    assert len(kept) == 1 and str(kept[0]) in message and str(out / "run.safetensors") in message
    torch.testing.assert_close(load_model(kept[0]).state_dict(), model.state_dict())
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------ vocabulary


@pytest.mark.parametrize("content", [b'{"gpt2_ids": [0, 1, 2', b"\xff\xfe{}", b'{"ids": []}'])
def test_a_damaged_vocabulary_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys, content):
    import minigpt.tokenizer as tokenizer

    bad = tmp_path / "compact_vocab.json"
    bad.write_bytes(content)
    with pytest.raises(io.UserError, match="compact_vocab.json"):
        tokenizer.CompactVocab.load(bad)
    monkeypatch.setattr(tokenizer, "COMPACT_VOCAB_FILE", bad)
    tokenizer.get_compact_vocab.cache_clear()
    try:
        code, _, err = run_cli(capsys, "generate", "--smoke")
    finally:
        tokenizer.get_compact_vocab.cache_clear()
    assert code == 2 and str(bad) in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ adapters, exports


def test_an_edited_adapter_file_is_refused(tmp_path):
    from minigpt.adapters import load_adapter, save_adapter
    from minigpt.lora import replace_linear_with_lora

    torch.manual_seed(0)
    path = tmp_path / "a.safetensors"
    save_adapter(replace_linear_with_lora(GPTModel(CFG), rank=2, alpha=4), path)

    def double_alpha(tensors, meta):
        layers = {k: v | {"alpha": 8.0} for k, v in json.loads(meta["layers"]).items()}
        meta["layers"] = json.dumps(layers)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(GPTModel(CFG), path)  # as saved: silent
    _rewrite(path, double_alpha)
    with pytest.raises(io.UserError, match=r"entry 'layers' differs"):
        load_adapter(GPTModel(CFG), path)


def test_an_exported_folder_with_an_edited_config_is_refused(tmp_path):
    from minigpt.hf import load_gpt2, save_gpt2

    folder = save_gpt2(GPTModel(CFG), tmp_path / "hf")
    load_gpt2(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"n_head": 4}))
    with pytest.raises(io.UserError, match=r"'config.json' differs"):
        load_gpt2(folder)


# ------------------------------------------------------------------------------ pretrained cache


def test_a_cached_pretrained_model_without_a_digest_is_trained_again(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path))
    trained = []

    def fake_pretrain(recipe, progress=True, checkpoint=None, device=None):
        model = GPTModel(GPTConfig.from_preset(recipe.preset))
        save_checkpoint(checkpoint, model, step=1, extra=pretrained.recipe_metadata(recipe))
        trained.append(checkpoint)
        return model, None

    monkeypatch.setattr(pretrained, "pretrain", fake_pretrain)
    pretrained.get_pretrained(smoke=True, progress=False, device="cpu")
    _rewrite(trained[0], lambda tensors, meta: meta.pop("digest"))
    with pytest.warns(UserWarning, match="no digest"):
        pretrained.get_pretrained(smoke=True, progress=False, device="cpu")
    assert len(trained) == 2


# ------------------------------------------------------------------------------ the lab's run cache


@pytest.fixture
def lab(tmp_path):
    """A :class:`Lab` with only what its cache needs: a micro base and a cache folder."""
    from minigpt.lab import Lab

    lab = object.__new__(Lab)
    lab.cache, lab.folder, lab.eval_batches = True, tmp_path / "runs", 2
    lab.precision, lab.device = "fp32", torch.device("cpu")
    torch.manual_seed(0)
    lab.base = GPTModel(GPTConfig.from_preset("micro")).eval()
    return lab


def _record(spec):
    from minigpt.lab.runs import RECORD_KEYS

    record = {key: 0.5 for key in RECORD_KEYS}
    record.update(
        method=spec.method,
        seed=spec.seed,
        lr=spec.lr,
        rank=spec.rank,
        alpha=spec.alpha,
        steps=spec.steps,
    )
    return record | {"curve": [{"step": 0, "task_accuracy": 0.1}]}


def test_a_lab_record_round_trips_and_a_hit_is_fast(lab):
    from minigpt.lab.runs import RunSpec

    spec = RunSpec("lora", 1e-3, seed=1, steps=3)
    lab._store(spec, _record(spec), None)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lab._cached(spec) == _record(spec)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda path: path.write_text("{}"), "no digest"),
        (lambda path: path.write_bytes(b'{"method": "lora\xff"}'), "cannot be read"),
        (lambda path: path.write_text("[1, 2]"), "JSON list"),
        (
            lambda path: path.write_text(
                path.read_text().replace('"domain_loss": 0.5', '"domain_loss": 0.1')
            ),
            "digest",
        ),
    ],
)
def test_a_damaged_lab_record_is_a_miss_with_a_warning(lab, damage, words):
    from minigpt.lab.runs import RunSpec

    spec = RunSpec("lora", 1e-3, seed=1, steps=3)
    lab._store(spec, _record(spec), None)
    damage(lab._path(spec))
    with pytest.warns(UserWarning, match=words):
        assert lab._cached(spec) is None


def test_a_lab_record_with_missing_keys_or_wrong_types_is_a_miss(lab):
    from minigpt.lab.runs import RunSpec

    spec = RunSpec("lora", 1e-3, seed=1, steps=3)
    for record, words in (
        ({k: v for k, v in _record(spec).items() if k != "task_accuracy"}, "lacks"),
        (_record(spec) | {"task_accuracy": "high"}, "not a number"),
        (_record(spec) | {"seed": 7}, "another run"),
    ):
        lab._store(spec, record, None)
        with pytest.warns(UserWarning, match=words):
            assert lab._cached(spec) is None


def test_cached_seed_0_weights_with_flipped_bytes_are_trained_again(lab):
    from minigpt.lab.runs import RunSpec, prepare_model, trainable_bytes

    spec = RunSpec("lora", 1e-3, seed=0, steps=3)
    model = prepare_model(lab.base, spec.method, spec.rank, spec.alpha, 0, spec.targets)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.25)
    lab._store(spec, _record(spec), trainable_bytes(model))
    loaded = lab._load_weights(spec)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    weights = lab._path(spec).with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="digest"):
        assert lab._load_weights(spec) is None


def test_a_cache_write_that_fails_keeps_the_record(lab, monkeypatch):
    from minigpt.lab import lab as lab_module
    from minigpt.lab.runs import RunSpec

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(lab_module, "atomic_write_bytes", full)
    spec = RunSpec("lora", 1e-3, seed=1, steps=3)
    record = _record(spec)
    with pytest.warns(UserWarning, match="No space left"):
        lab._store(spec, record, None)
    assert record == _record(spec)


# ------------------------------------------------------------------------------ a full disk

FULL_DISK_SCRIPT = """
import resource, signal, sys
import torch
from minigpt.adapters import export_peft, save_adapter
from minigpt.hf import save_gpt2
from minigpt.lora import replace_linear_with_lora
from minigpt.model import GPTConfig, GPTModel
from minigpt.train import save_checkpoint

out = sys.argv[1]
torch.manual_seed(0)
model = GPTModel(GPTConfig(vocab_size=64, context_length=8, n_layer=1, n_head=2, n_embd=64))
lora = replace_linear_with_lora(GPTModel(model.cfg), rank=32, alpha=4)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))  # every file: at most 16 KiB
for name, save, target in (
    ("checkpoint", lambda: save_checkpoint(out + "/m.safetensors", model), "/m.safetensors"),
    ("gpt2", lambda: save_gpt2(model, out + "/hf"), "/hf/model.safetensors"),
    ("adapter", lambda: save_adapter(lora, out + "/a.safetensors"), "/a.safetensors"),
    ("peft", lambda: export_peft(lora, out + "/peft"), "/peft/adapter_model.safetensors"),
):
    try:
        save()
    except OSError as err:
        print(name, "OSError", out + target in str(err), str(err).splitlines()[0][:200])
    except ValueError as err:  # UserError, WriteError
        print(name, type(err).__name__, out + target in str(err), str(err).splitlines()[0][:200])
    except Exception as err:
        print(name, "other", type(err).__name__, err)
"""


def test_a_full_disk_under_every_safetensors_save_is_an_error_naming_the_file(tmp_path):
    import os
    import subprocess
    import sys

    resource = pytest.importorskip("resource")
    if not hasattr(resource, "RLIMIT_FSIZE"):
        pytest.skip("no file size limit on this platform")
    out = tmp_path / "out"
    out.mkdir()
    env = os.environ | {"MINIGPT_CACHE": str(tmp_path / "cache"), "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK_SCRIPT, str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = {line.split()[0]: line.split(maxsplit=3)[1:] for line in done.stdout.splitlines()}
    assert results["checkpoint"][:2] == ["WriteError", "True"], results
    for name in ("gpt2", "adapter", "peft"):
        assert results[name][:2] == ["OSError", "True"], results
    # no temporary file is left behind
    assert not [p for p in out.rglob("*") if p.is_file()]


def _can_mount_tmpfs(folder):
    import os
    import subprocess

    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(folder)],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def test_cli_train_on_a_full_disk_keeps_the_run_in_one_line(tmp_path, capsys, monkeypatch):
    import subprocess

    full = tmp_path / "full"
    full.mkdir()
    if not _can_mount_tmpfs(full):
        pytest.skip("needs root and tmpfs to fill a disk")
    try:
        monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))

        def fake_pretrain(recipe, progress=True, checkpoint=None, device=None):
            torch.manual_seed(0)
            model = GPTModel(GPTConfig.from_preset(recipe.preset))  # larger than the disk
            save_checkpoint(checkpoint, model, step=1, extra=pretrained.recipe_metadata(recipe))
            return model, None

        monkeypatch.setattr(pretrained, "pretrain", fake_pretrain)
        out = full / "x.safetensors"
        code, _, err = run_cli(capsys, "train", "--smoke", "--out", str(out))
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "No space left" in err and str(out) in err
        kept = list((tmp_path / "cache" / "unsaved").iterdir())
        assert len(kept) == 1 and str(kept[0]) in err
        load_model(kept[0])
        assert not list(full.iterdir())
    finally:
        subprocess.run(["umount", str(full)], check=False, timeout=30)


# ------------------------------------------------------------------------------ checkpoint entries


@pytest.mark.parametrize("config", ["null", "[1, 2]", '"abc"'])
@pytest.mark.parametrize("digest", ["kept", "recomputed"])
def test_a_stored_config_that_is_not_an_object_is_one_line_naming_the_file(
    tmp_path, config, digest
):
    _, path = _saved(tmp_path)

    def replace_config(tensors, meta):
        meta["config"] = config
        if digest == "recomputed":
            fields = {k: v for k, v in meta.items() if k != io.DIGEST_KEY}
            meta[io.DIGEST_KEY] = json.dumps(io.content_digest(tensors, fields))

    _rewrite(path, replace_config)
    words = "digest" if digest == "kept" else "'config' entry"
    with pytest.raises(io.UserError, match=words) as info:
        minigpt.train.load_checkpoint(path, GPTModel(CFG))
    assert str(path) in str(info.value)
    loader = make_loader(np.tile(np.arange(32), 20), 8, 4, seed=0)
    cfg = TrainConfig(steps=3, warmup_steps=1, progress=False)
    with pytest.raises(io.UserError, match=words):
        train(GPTModel(CFG), loader, None, cfg, checkpoint=path, resume=True)


# ------------------------------------------------------------------------------ exported vocabulary

BIG_VOCAB_CFG = GPTConfig(vocab_size=4096, context_length=8, n_layer=1, n_head=2, n_embd=16)


def _exported_with_vocab(tmp_path):
    from minigpt.hf import save_gpt2
    from minigpt.tokenizer import get_compact_vocab

    torch.manual_seed(0)
    return save_gpt2(GPTModel(BIG_VOCAB_CFG), tmp_path / "hf", vocab=get_compact_vocab())


@pytest.mark.parametrize("content", [b'{"gpt2_ids": [0, 1, 2', b"\xff\xfe{}", b"[1, 2]"])
def test_compact_tokenizer_from_a_damaged_vocabulary_is_one_line_naming_it(tmp_path, content):
    pytest.importorskip("transformers")
    from minigpt.hf import CompactTokenizer

    folder = _exported_with_vocab(tmp_path)
    (folder / "compact_vocab.json").write_bytes(content)
    with pytest.raises(io.UserError, match="compact_vocab.json"):
        CompactTokenizer.from_pretrained(folder)


def test_an_exported_folder_with_a_permuted_vocabulary_is_refused(tmp_path):
    pytest.importorskip("transformers")
    from minigpt.hf import CompactTokenizer, load_gpt2

    folder = _exported_with_vocab(tmp_path)
    load_gpt2(folder)
    CompactTokenizer.from_pretrained(folder)
    vocab_file = folder / "compact_vocab.json"
    ids = json.loads(vocab_file.read_text())["gpt2_ids"]
    ids[-1], ids[-2] = ids[-2], ids[-1]  # still a valid vocabulary, with two tokens swapped
    vocab_file.write_text(json.dumps({"gpt2_ids": ids}))
    with pytest.raises(io.UserError, match=r"'compact_vocab.json' differs"):
        load_gpt2(folder)
    with pytest.raises(io.UserError, match="compact_vocab.json") as info:
        CompactTokenizer.from_pretrained(folder)
    assert "digest" in str(info.value)
    vocab_file.unlink()
    with pytest.raises(io.UserError, match=r"'compact_vocab.json' is missing"):
        load_gpt2(folder)


# ------------------------------------------------------------------------------ adapter mismatches


def _adapter_file(tmp_path, cfg=CFG, **lora):
    from minigpt.adapters import save_adapter
    from minigpt.lora import replace_linear_with_lora

    torch.manual_seed(0)
    path = tmp_path / "adapter.safetensors"
    save_adapter(replace_linear_with_lora(GPTModel(cfg), **({"rank": 2, "alpha": 4} | lora)), path)
    return path


def _wrapped(method, rank):
    from minigpt.dora import LinearWithDoRA
    from minigpt.lora import replace_linear_with_lora

    model = GPTModel(CFG)
    if method == "dora":
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and name.startswith("blocks."):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, LinearWithDoRA(module, rank, 4))
        return model
    return replace_linear_with_lora(model, rank=rank, alpha=4)


@pytest.mark.parametrize(
    "case",
    ["shape", "not a linear layer", "rank", "dora file on lora", "lora file on dora"],
)
def test_an_adapter_that_does_not_fit_is_a_user_error_naming_the_file(tmp_path, case):
    from minigpt.adapters import load_adapter

    if case == "shape":
        path, model = _adapter_file(tmp_path, GPTConfig.from_preset("micro")), GPTModel(CFG)
    elif case == "not a linear layer":
        cfg = GPTConfig(vocab_size=32, context_length=8, n_layer=2, n_head=2, n_embd=16)
        path, model = _adapter_file(tmp_path, cfg), GPTModel(CFG)
    elif case == "rank":
        path, model = _adapter_file(tmp_path), _wrapped("lora", 4)
    elif case == "dora file on lora":
        path = tmp_path / "dora.safetensors"
        from minigpt.adapters import save_adapter

        save_adapter(_wrapped("dora", 2), path)
        model = _wrapped("lora", 2)
    else:
        path, model = _adapter_file(tmp_path), _wrapped("dora", 2)
    with pytest.raises(io.UserError) as info:
        load_adapter(model, path)
    assert str(path) in str(info.value), info.value


# ------------------------------------------------------------------------------ the lab: other runs


def test_a_lab_record_of_another_run_is_a_miss(lab):
    from minigpt.lab.runs import RunSpec, prepare_model, trainable_bytes

    rank2, rank4 = RunSpec("lora", 1e-3, seed=0, steps=3), RunSpec("lora", 1e-3, 0, rank=4, steps=3)
    model4 = prepare_model(lab.base, "lora", 4, rank4.alpha, 0, None)
    lab._store(rank4, _record(rank4), trainable_bytes(model4))
    for suffix in (".json", ".safetensors"):  # the rank-4 entry copied over the rank-2 one
        lab._path(rank2).with_suffix(suffix).write_bytes(
            lab._path(rank4).with_suffix(suffix).read_bytes()
        )
    with pytest.warns(UserWarning, match="another run"):
        assert lab._cached(rank2) is None
    with pytest.warns(UserWarning, match="another run"):
        assert lab._load_weights(rank2) is None
    # the same fields but another recipe (cache folder) or batch size
    lab._store(rank2, _record(rank2), None)
    assert lab._cached(rank2) is not None
    entry = json.loads(lab._path(rank2).read_text())
    for change in ({"recipe": "another"}, {"batch_size": 1}, {"targets": ["attn.query"]}):
        entry[io.DIGEST_KEY]["run"] = entry[io.DIGEST_KEY]["run"] | change
        lab._path(rank2).write_text(json.dumps(entry))
        with pytest.warns(UserWarning, match="another run"):
            assert lab._cached(rank2) is None


def test_lab_weights_of_other_shapes_are_a_miss_not_a_crash(lab):
    from minigpt.lab.runs import RunSpec, prepare_model, trainable_bytes

    spec = RunSpec("lora", 1e-3, seed=0, steps=3)
    other = prepare_model(lab.base, "lora", 4, spec.alpha, 0, None)  # rank 4 under rank-2 names
    lab._store(spec, _record(spec), trainable_bytes(other))
    with pytest.warns(UserWarning, match="shapes"):
        assert lab._load_weights(spec) is None


# ------------------------------------------------------------------------------ paths as given


class Stop(Exception):
    pass


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--checkpoint", ""],
        ["generate", "--checkpoint", " "],
        ["train", "--smoke", "--out", ""],
        ["compare", "--smoke", "--json", ""],
        ["course", "--chapters-dir", ""],
        ["course", "--out", ""],
        ["sync-notebooks", "--chapters-dir", ""],
        ["site", ""],
    ],
)
def test_an_empty_path_option_is_refused(capsys, monkeypatch, argv):
    def never(*args, **kwargs):
        raise Stop("ran with an empty path")

    monkeypatch.setattr(pretrained, "get_pretrained", never)
    monkeypatch.setattr(pretrained, "pretrain", never)
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "empty" in err, err


def test_train_out_ending_with_a_separator_is_a_folder(tmp_path, capsys, monkeypatch):
    import os

    seen = []

    def fake_pretrain(recipe, progress=True, checkpoint=None, device=None):
        seen.append((recipe.name, checkpoint))
        raise Stop

    monkeypatch.setattr(pretrained, "pretrain", fake_pretrain)
    for out in (str(tmp_path / "new") + os.sep, str(tmp_path)):
        with pytest.raises(Stop):
            main(["train", "--smoke", "--out", out])
        name, checkpoint = seen.pop()
        assert Path(checkpoint) == Path(out) / f"{name}.safetensors"
    assert (tmp_path / "new").is_dir()
    with pytest.raises(io.WriteError, match="separator"):
        io.check_writable_file(str(tmp_path / "json") + os.sep, "--json")
    with pytest.raises(io.WriteError, match="separator"):
        io.atomic_write_bytes(str(tmp_path / "file") + os.sep, b"x")
    assert not (tmp_path / "json").exists() and not (tmp_path / "file").exists()
