"""The chapters as files: where they are, their numbers, reading and writing a notebook."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat

CHAPTERS_ENV = "MINIGPT_CHAPTERS"
# The chapters live in the repository's checkout, not in the installed package: wherever
# $MINIGPT_CHAPTERS points, else next to the package in a clone (or an editable install).
CHECKOUT_CHAPTERS_DIR = Path(__file__).resolve().parent.parent.parent / "chapters"
CHAPTERS_DIR = Path(os.environ.get(CHAPTERS_ENV) or CHECKOUT_CHAPTERS_DIR)


def chapter_paths(chapters_dir: Path | str = CHAPTERS_DIR) -> list[Path]:
    """The chapter notebooks, in reading order (``NN_name.ipynb``)."""
    return sorted(Path(chapters_dir).glob("[0-9][0-9]_*.ipynb"))


def normalise_chapter(chapter: str | int) -> str:
    """One chapter number as two digits: ``6``, ``"6"``, ``"06"`` or ``"06_lora"`` -> ``"06"``."""
    text = str(chapter).strip()
    match = re.fullmatch(r"0*(\d{1,2})(?:_\w*)?", text)
    number = int(match.group(1)) if match else -1
    if not 1 <= number <= 99:
        raise ValueError(f"chapter must be a chapter number such as 6 or 06, got {chapter!r}")
    return f"{number:02d}"


def parse_chapters(values: list[str | int] | str | int | None) -> list[str] | None:
    """Chapter numbers from a command line -> sorted two-digit strings; ``None`` (or empty) means
    all.

    Accepts ``6``, ``06``, ``"6 7"``, ``"6,7"`` and ranges ``"6-9"``; raises ValueError otherwise.
    The one parser used by ``course``, ``student-notebooks``, ``grade`` and the checks.
    """
    if values is None:
        return None
    items = [values] if isinstance(values, (str, int)) else list(values)
    wanted: set[str] = set()
    for item in items:
        for part in re.split(r"[\s,]+", str(item).strip()):
            if not part:
                continue
            first, dash, last = part.partition("-")
            if dash:
                low, high = int(normalise_chapter(first)), int(normalise_chapter(last))
                if low > high:
                    raise ValueError(f"chapter range {part!r} runs backwards")
                wanted.update(f"{n:02d}" for n in range(low, high + 1))
            else:
                wanted.add(normalise_chapter(part))
    return sorted(wanted) or None


def read_notebook(path: Path | str) -> nbformat.NotebookNode:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"notebook not found: {path}")
    return nbformat.read(path, as_version=4)


def write_notebook_atomic(nb: nbformat.NotebookNode, path: Path | str) -> None:
    """Write a notebook through a temporary file and a rename, so a crash never leaves half a
    file."""
    from minigpt.io import atomic_write_bytes

    text = nbformat.writes(nb)
    atomic_write_bytes(path, (text if text.endswith("\n") else text + "\n").encode("utf-8"))
