"""The one lint: `ruff check` and `ruff format --check` pass on the package, the tests, the scripts
and the chapters (configuration in pyproject.toml)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def ruff(*args: str) -> subprocess.CompletedProcess:
    program = shutil.which("ruff") or pytest.skip("ruff is not installed (pip install -e .[test])")
    return subprocess.run([program, *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_check_passes():
    result = ruff("check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_check_passes():
    result = ruff("format", "--check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_lint_finds_a_long_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1  # " + "a" * 120 + "\n")
    result = subprocess.run(
        [
            shutil.which("ruff") or sys.executable,
            "check",
            "--no-cache",
            "--config",
            str(ROOT / "pyproject.toml"),
            str(bad),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "E501" in result.stdout
