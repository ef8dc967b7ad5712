"""``scripts/gpu_check.sh`` itself, on a CPU: it parses, refuses bad usage, and its dry run writes
its figures (the chapters step is left to a full ``--dry-run``: it executes three notebooks)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run_script(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


def test_the_script_parses_and_refuses_bad_usage(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    assert run_script().returncode == 2  # no OUT
    bad = run_script("--fast", str(tmp_path))
    assert bad.returncode == 2 and "unknown option --fast" in bad.stderr
    assert "--dry-run" in run_script("--help").stdout


def test_a_dry_run_of_the_env_step_writes_its_figures(tmp_path):
    done = run_script("--dry-run", "--only", "env", str(tmp_path / "out"))
    assert done.returncode == 0, done.stdout + done.stderr
    env = json.loads((tmp_path / "out" / "env.json").read_text())
    assert env["device"] == "cpu" and env["precision_auto"] in ("fp32", "bf16")
    assert "env: exit 0" in (tmp_path / "out" / "summary.txt").read_text()


@pytest.mark.slow
def test_a_dry_run_writes_every_figure_but_the_chapters(tmp_path):
    out = tmp_path / "out"
    done = run_script("--dry-run", "--only", "env,bench,pretrain,lab", str(out), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "device cpu, fp32" in (out / "bench.txt").read_text()
    pretrain = json.loads((out / "pretrain.json").read_text())
    assert pretrain["problems"] == [] and set(pretrain["runs"]) == {
        "cpu-bf16",
        "cpu-fp32",
        "cpu-fp32 (reference)",
    }
    # the same recipe in fp32 on the same device: the reference itself
    assert pretrain["runs"]["cpu-fp32"]["val_loss_minus_cpu"] == 0.0
    lab = json.loads((out / "lab.json").read_text())
    assert lab["problems"] == [] and set(lab["devices"].values()) == {"cpu"}
    assert (out / "cache").is_dir()  # MINIGPT_CACHE stayed inside OUT
    summary = (out / "summary.txt").read_text()
    assert all(f"{step}: exit 0" in summary for step in ("env", "bench", "pretrain", "lab"))
