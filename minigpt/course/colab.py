"""The Open-in-Colab badge and the Colab setup cell of every chapter, and the repository they point
at."""

from __future__ import annotations

from pathlib import Path

import nbformat

from minigpt.course.chapters import (
    CHAPTERS_DIR,
    CHAPTERS_ENV,
    read_notebook,
    write_notebook_atomic,
)

# The course's public repository: the Open-in-Colab badges and the Colab setup cell point here. A
# fork changes it here, or rewrites the chapters for its own address with
# `python -m minigpt sync-notebooks --repository https://github.com/OWNER/NAME`. pyproject.toml and
# CITATION.cff repeat it for package indexes and citations; a test keeps the copies equal.
REPOSITORY_URL = "https://github.com/minigpt-lora/minigpt-lora"
REPOSITORY_BRANCH = "main"
COLAB_BADGE_ID = "colab-badge"
COLAB_SETUP_ID = "colab-setup"
# Where the setup cell clones the course to, next to the notebook on the Colab runtime.
CLONE_DIR = "minigpt-lora"

COLAB_SETUP_TEMPLATE = """\
# Setup. On Google Colab: fetch the course and install what the runtime lacks, keeping Colab's own
# torch, numpy and Jupyter packages (anywhere else that part does nothing). Then, before torch is
# imported: if other processes keep the cores busy, use only the cores they leave free, with
# threads that sleep instead of spinning while they wait (README, "Under load").
import sys

if "google.colab" in sys.modules:
    import os
    import subprocess

    def stop(sentence):  # end the cell with this sentence only, no traceback
        error = RuntimeError(sentence)
        error._render_traceback_ = lambda: [sentence]
        raise error

    repository = "{repository}"
    if not os.path.isdir("{clone}"):
        if subprocess.run(["git", "clone", "--depth", "1", repository, "{clone}"]).returncode:
            stop(
                f"Could not clone {{repository}}: check the address and the internet access, "
                "then run this cell again."
            )
    install = [sys.executable, "-I", "{clone}/minigpt/course/colab_install.py", "{clone}"]
    if subprocess.run(install).returncode != 0:
        stop(
            "Installing the course failed (pip says why above): fix that, or delete the "
            "{clone} folder, then run this cell again."
        )
    sys.path.insert(0, os.path.abspath("{clone}"))  # importable now, without restarting
from minigpt import apply_cpu_thread_settings

apply_cpu_thread_settings();"""


def chapters_missing_message(chapters_dir: Path | str = CHAPTERS_DIR) -> str:
    """One line saying where the chapters were expected and how to get them (they come with the
    repository, not with the installed package)."""
    return (
        f"no chapter notebooks (NN_name.ipynb) in {chapters_dir}: the chapters come with the "
        f"repository (git clone {REPOSITORY_URL}); point --chapters-dir or ${CHAPTERS_ENV} at "
        "its chapters/ folder"
    )


def colab_setup_source(repository: str = REPOSITORY_URL) -> str:
    """The setup cell's code for the course at ``repository`` (a git address or a local path)."""
    return COLAB_SETUP_TEMPLATE.format(repository=repository, clone=CLONE_DIR)


COLAB_SETUP_SOURCE = colab_setup_source()


def colab_url(name: str, repository: str = REPOSITORY_URL) -> str:
    """The address that opens chapter ``name`` (``01_rank_and_low_rank.ipynb``) from GitHub in
    Colab."""
    repo = repository.removeprefix("https://github.com/").removesuffix(".git")
    return (
        f"https://colab.research.google.com/github/{repo}/blob/{REPOSITORY_BRANCH}/chapters/{name}"
    )


def colab_badge_source(name: str, repository: str = REPOSITORY_URL) -> str:
    return (
        "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"({colab_url(name, repository)})"
    )


def repository_of(nb: nbformat.NotebookNode) -> str | None:
    """The repository a chapter's badge points at (``https://github.com/OWNER/NAME``), or None."""
    import re

    for cell in nb.cells:
        if cell.get("id") == COLAB_BADGE_ID:
            match = re.search(
                r"colab\.research\.google\.com/github/([^/\s]+/[^/\s]+)/blob/", cell.source
            )
            return f"https://github.com/{match.group(1)}" if match else None
    return None


def add_colab_cells(nb: nbformat.NotebookNode, name: str, repository: str = REPOSITORY_URL) -> bool:
    """Make the chapter start with the Open-in-Colab badge and put the Colab setup cell before its
    first code cell. Idempotent: cells already present (found by their ids) are only brought up to
    date. Returns True when the notebook changed."""
    before = nbformat.writes(nb)
    cells = [c for c in nb.cells if c.get("id") not in (COLAB_BADGE_ID, COLAB_SETUP_ID)]
    badge = nbformat.v4.new_markdown_cell(colab_badge_source(name, repository), id=COLAB_BADGE_ID)
    setup = nbformat.v4.new_code_cell(colab_setup_source(repository), id=COLAB_SETUP_ID)
    for old in nb.cells:  # keep the existing cells' metadata (and outputs, none expected)
        if old.get("id") == COLAB_BADGE_ID:
            badge.metadata = old.metadata
        elif old.get("id") == COLAB_SETUP_ID:
            setup.metadata, setup.outputs, setup.execution_count = (
                old.metadata,
                old.get("outputs", []),
                old.get("execution_count"),
            )
    first_code = next((i for i, c in enumerate(cells) if c.cell_type == "code"), len(cells))
    cells.insert(first_code, setup)
    nb.cells = [badge] + cells
    if nb.nbformat_minor < 5:
        nb.nbformat_minor = 5  # cell ids need nbformat 4.5
    return nbformat.writes(nb) != before


def ensure_colab_cells(path: Path | str, repository: str = REPOSITORY_URL) -> bool:
    """Add or refresh the Colab badge and setup cell of one chapter file; True when the file
    changed."""
    path = Path(path)
    nb = read_notebook(path)
    if not add_colab_cells(nb, path.name, repository):
        return False
    write_notebook_atomic(nb, path)
    return True
