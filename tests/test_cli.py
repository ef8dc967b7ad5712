"""The command line turns user errors into one line on stderr and exit status 2; runs never replace another
recipe's checkpoint."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import minigpt.pretrained as pretrained
import minigpt.train
from minigpt.__main__ import main
from minigpt.model import GPTConfig, GPTModel
from minigpt.train import History, save_checkpoint


def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, words", [
    (["train", "--steps", "-5"], "--steps"),
    (["train", "--device", "tpu"], "device"),
    (["generate", "--temperature", "-1"], "temperature"),
    (["generate", "--temperature", "nan"], "temperature"),
    (["generate", "--prompt", ""], "prompt"),
    (["generate", "--top-k", "0"], "top_k"),
    (["generate", "--max-new-tokens", "-1"], "max_new_tokens"),
    (["generate", "--checkpoint", "/no/such/file.safetensors"], "/no/such/file.safetensors"),
    (["bench", "--device", "tpu"], "device"),
    (["compare", "--methods", "lora,nope"], "methods"),
])
def test_user_errors_are_one_line_and_exit_2(capsys, argv, words):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert "Traceback" not in err and words in err.strip().splitlines()[-1]
    assert err.strip().splitlines()[-1].startswith("python -m minigpt")


def test_damaged_checkpoint_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"{not a safetensors file")
    code, _, err = run_cli(capsys, "generate", "--checkpoint", str(bad))
    assert code == 2 and str(bad) in err and len(err.strip().splitlines()) == 1


def test_a_user_error_prints_no_traceback_from_the_real_entry_point():
    result = subprocess.run([sys.executable, "-m", "minigpt", "train", "--steps", "-5"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "python -m minigpt train: error: --steps must be an integer >= 1, got -5"


@pytest.fixture
def fake_training(monkeypatch):
    """pretrain() replaced by an instant one that saves a random model with the recipe's metadata."""
    runs = []

    def fake_pretrain(recipe, progress=True, checkpoint=None, device=None):
        model = GPTModel(GPTConfig.from_preset(recipe.preset))
        save_checkpoint(checkpoint, model, step=recipe.steps, extra=pretrained.recipe_metadata(recipe))
        runs.append((recipe.name, str(checkpoint)))
        history = History(seconds=1.0, tokens=10)
        return model, history

    monkeypatch.setattr(pretrained, "pretrain", fake_pretrain)
    monkeypatch.setattr(pretrained, "shakespeare_split", lambda: (None, np.arange(100)))
    monkeypatch.setattr(minigpt.train, "nats_per_character", lambda *a, **k: {
        "nats_per_token": 1.0, "nats_per_char": 0.5, "bits_per_char": 0.7, "chars": 200})
    return runs


def test_default_output_names_the_recipe_so_short_runs_never_replace_the_real_one(tmp_path, monkeypatch,
                                                                                  capsys, fake_training):
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "train", "--smoke")[0] == 0
    assert run_cli(capsys, "train", "--smoke", "--steps", "2")[0] == 0
    names = [name for name, _ in fake_training]
    assert names[0] != names[1]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(f"{n}.safetensors" for n in names)


def test_another_recipes_checkpoint_is_not_replaced_without_force(tmp_path, capsys, fake_training):
    out = tmp_path / "model.safetensors"
    assert run_cli(capsys, "train", "--smoke", "--out", str(out))[0] == 0
    before = out.read_bytes()
    code, _, err = run_cli(capsys, "train", "--smoke", "--steps", "2", "--out", str(out))
    assert code == 2 and "--force" in err and str(out) in err
    assert out.read_bytes() == before and len(fake_training) == 1
    assert run_cli(capsys, "train", "--smoke", "--out", str(out))[0] == 0  # the same recipe: a rerun
    assert run_cli(capsys, "train", "--smoke", "--steps", "2", "--out", str(out), "--force")[0] == 0
    assert pretrained.checkpoint_recipe(out) == fake_training[-1][0]
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    assert run_cli(capsys, "train", "--smoke", "--out", str(other))[0] == 2
    assert other.read_text() == "mine"
