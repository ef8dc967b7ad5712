"""The command line turns user errors into one line on stderr and exit status 2; runs never replace
another recipe's checkpoint."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import minigpt.lab.pretrained as pretrained
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


@pytest.mark.parametrize(
    "argv, words",
    [
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
    ],
)
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
    result = subprocess.run(
        [sys.executable, "-m", "minigpt", "train", "--steps", "-5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        == "python -m minigpt train: error: --steps must be an integer >= 1, got -5"
    )


@pytest.fixture
def fake_training(monkeypatch):
    """pretrain() replaced by an instant one that saves a random model with the recipe's
    metadata."""
    runs = []

    def fake_pretrain(recipe, progress=True, checkpoint=None, device=None):
        model = GPTModel(GPTConfig.from_preset(recipe.preset))
        save_checkpoint(
            checkpoint, model, step=recipe.steps, extra=pretrained.recipe_metadata(recipe)
        )
        runs.append((recipe.name, str(checkpoint)))
        history = History(seconds=1.0, tokens=10)
        return model, history

    monkeypatch.setattr(pretrained, "pretrain", fake_pretrain)
    monkeypatch.setattr(pretrained, "shakespeare_split", lambda: (None, np.arange(100)))
    monkeypatch.setattr(
        minigpt.train,
        "nats_per_character",
        lambda *a, **k: {
            "nats_per_token": 1.0,
            "nats_per_char": 0.5,
            "bits_per_char": 0.7,
            "chars": 200,
        },
    )
    return runs


def test_default_output_names_the_recipe_so_short_runs_never_replace_the_real_one(
    tmp_path, monkeypatch, capsys, fake_training
):
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "train", "--smoke")[0] == 0
    assert run_cli(capsys, "train", "--smoke", "--steps", "2")[0] == 0
    names = [name for name, _ in fake_training]
    assert names[0] != names[1]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(
        f"{n}.safetensors" for n in names
    )


def test_another_recipes_checkpoint_is_not_replaced_without_force(tmp_path, capsys, fake_training):
    out = tmp_path / "model.safetensors"
    assert run_cli(capsys, "train", "--smoke", "--out", str(out))[0] == 0
    before = out.read_bytes()
    code, _, err = run_cli(capsys, "train", "--smoke", "--steps", "2", "--out", str(out))
    assert code == 2 and "--force" in err and str(out) in err
    assert out.read_bytes() == before and len(fake_training) == 1
    # the same recipe: a rerun
    assert run_cli(capsys, "train", "--smoke", "--out", str(out))[0] == 0
    assert run_cli(capsys, "train", "--smoke", "--steps", "2", "--out", str(out), "--force")[0] == 0
    assert pretrained.checkpoint_recipe(out) == fake_training[-1][0]
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    assert run_cli(capsys, "train", "--smoke", "--out", str(other))[0] == 2
    assert other.read_text() == "mine"


COMMANDS = [
    "course",
    "train",
    "generate",
    "sync-notebooks",
    "compare",
    "bench",
    "site",
    "student-notebooks",
]


def test_compare_seed_is_not_read_as_seeds_and_exits_at_once():
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "minigpt", "compare", "--seed", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "unrecognized arguments: --seed 3" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert time.perf_counter() - start < 60  # a usage error, not a lab run


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "--seed", "3"],
        ["compare", "--meth", "lora"],
        ["bench", "--repeat", "2"],
        ["train", "--step", "3"],
        ["generate", "--temp", "1"],
        ["course", "--smok"],
        ["site", "out", "--cle"],
        ["student-notebooks", "out", "--chapter", "01"],
        ["sync-notebooks", "--repo", "https://github.com/a/b"],
    ],
)
def test_no_command_accepts_an_abbreviated_option(capsys, argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and "unrecognized arguments" in err and out == ""


def help_text(capsys, command: str) -> str:
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    return out


def option_entries(text: str) -> list[str]:
    """Each option's block of ``--help``: its first line and the indented lines under it."""
    entries: list[str] = []
    open_entry = False
    for line in text.split("\n\nexample:")[0].splitlines():
        if re.match(r"^  -", line):
            entries.append(line.strip())
            open_entry = True
        elif open_entry and re.match(r"^ {6,}\S", line):
            entries[-1] += "  " + line.strip()
        else:
            open_entry = False
    return [e for e in entries if not e.startswith("-h, --help")]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_plain_text_with_an_example_and_every_options_default(capsys, command):
    text = help_text(capsys, command)
    assert f"example:\n  python -m minigpt {command}" in text
    assert "``" not in text and not re.search(r":\w+:`", text), "reStructuredText in --help"
    for entry in option_entries(text):
        flag, _, rest = entry.partition("  ")
        assert rest.strip(), f"{command}: {flag} has no help"
        takes_value = re.search(r"--[\w-]+ \[?[A-Z_]+", flag)
        assert not takes_value or "default" in rest, f"{command}: {flag} does not show its default"


def test_top_level_help_lists_every_command(capsys):
    code, text, _ = run_cli(capsys, "--help")
    assert code == 0
    for command in COMMANDS + ["grade"]:
        assert f"\n    {command}" in text
    assert "--version" in text and "example:" in text


def test_version_from_the_module_and_the_console_script(capsys):
    from minigpt import __version__

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"minigpt-lora {__version__}"
    script = shutil.which("minigpt") or str(Path(sys.executable).with_name("minigpt"))
    if not Path(script).is_file():
        pytest.skip("the console script is not installed (pip install -e . installs it)")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"minigpt-lora {__version__}"


def test_course_without_chapters_says_where_they_are_expected_in_one_line(tmp_path, capsys):
    empty = tmp_path / "no-chapters"
    empty.mkdir()
    code, out, err = run_cli(capsys, "course", "--smoke", "--chapters-dir", str(empty))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert str(empty) in err and "git clone" in err and "--chapters-dir" in err


def test_the_chapters_folder_follows_the_environment(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "minigpt", "course", "--smoke", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MINIGPT_CHAPTERS": str(tmp_path)},
    )
    assert result.returncode == 2 and str(tmp_path) in result.stderr
    assert "MINIGPT_CHAPTERS" in result.stderr and not (tmp_path / "out").exists()


def test_sync_notebooks_points_a_copy_at_a_fork(tmp_path, capsys):
    from minigpt.course.chapters import chapter_paths, read_notebook
    from minigpt.course.colab import COLAB_SETUP_ID, colab_setup_source, repository_of

    source = chapter_paths()[0]
    shutil.copyfile(source, tmp_path / source.name)
    fork = "https://github.com/someone/my-fork"
    argv = ["sync-notebooks", "--chapters-dir", str(tmp_path), "--repository", fork]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0 and "Colab badge and setup cell updated" in out
    nb = read_notebook(tmp_path / source.name)
    assert repository_of(nb) == fork
    setup = next(c for c in nb.cells if c.get("id") == COLAB_SETUP_ID)
    assert setup.source == colab_setup_source(fork)
    before = [c.source for c in read_notebook(source).cells if c.get("id") != COLAB_SETUP_ID]
    after = [c.source for c in nb.cells if c.get("id") != COLAB_SETUP_ID]
    assert len(before) == len(after) and before[1:] == after[1:]  # only the badge and setup
