"""What the grader accepts as a submission, read before anything runs.

* :func:`refuse_links`: a symbolic link as the submission or anywhere on its path is refused (git
  and zip keep links, and a link to the reference chapter would otherwise be graded as the
  student's work).
* :func:`read_notebook_bytes`: the notebook validated against nbformat's schema; a file that is not
  UTF-8, not JSON or not a valid notebook is reported as such, and nothing runs.
* :func:`top_level_names`, :func:`graded_names`, :func:`excused_cells`: what the reference chapter
  defines and which of its cells may raise, read from source text without running anything.
"""

from __future__ import annotations

import ast
import math
import os
import shutil
import warnings
from pathlib import Path

import nbformat
from nbformat.reader import NotJSONError

from minigpt.course.chapters import CHAPTERS_DIR, chapter_paths, normalise_chapter

NOTEBOOK_LIMIT = 50 * 2**20  # the largest notebook the grader reads


FOLDER_COPY_LIMIT = 200 * 2**20  # copy the notebook's folder when its files are smaller than this


class SubmissionError(ValueError):
    """A submission the grader refuses to grade at all (exit status 2)."""


def refuse_links(path: Path | str) -> Path:
    """``path`` made absolute (not resolved), or SubmissionError naming the first symbolic link on
    it."""
    absolute = Path(os.path.abspath(path))
    for part in [absolute, *absolute.parents]:
        if part.is_symlink():
            what = "is" if part == absolute else "lies under"
            raise SubmissionError(
                f"the submission {what} a symbolic link, which the grader refuses: {part} -> "
                f"{os.readlink(part)}"
            )
    return absolute


class NotANotebook(Exception):
    """The file is not UTF-8, not JSON or not a valid notebook; ``str()`` says which."""


def read_notebook_bytes(data: bytes) -> nbformat.NotebookNode:
    """The notebook in ``data``, validated against nbformat's schema, or NotANotebook."""
    if len(data) > NOTEBOOK_LIMIT:
        raise NotANotebook(f"larger than {NOTEBOOK_LIMIT // 2**20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise NotANotebook("not UTF-8 text") from None
    with warnings.catch_warnings():
        # duplicate or missing cell ids are repaired quietly (nbformat would warn on stderr)
        warnings.simplefilter("ignore")
        try:
            nb = nbformat.reads(text, as_version=4)
        except NotJSONError:
            raise NotANotebook("not valid JSON") from None
        except Exception as err:  # noqa: BLE001 - nbformat raises many kinds on odd input
            raise NotANotebook(f"not a notebook ({type(err).__name__})") from None
        try:
            nbformat.validate(nb)
        except Exception as err:  # noqa: BLE001 - ValidationError, or odd types the walker trips on
            reason = getattr(err, "message", "") or type(err).__name__
            raise NotANotebook(f"not a notebook ({str(reason)[:200]})") from None
    return nb


def infer_chapter(path: Path | str) -> str:
    """The chapter of ``NN_name.ipynb`` (``"06"`` for ``06_lora.ipynb``)."""
    name = Path(path).name
    head = name.split("_", 1)[0]
    try:
        if "_" not in name or not head.isdigit():
            raise ValueError
        return normalise_chapter(head)
    except ValueError:
        raise ValueError(
            f"cannot tell the chapter from the file name {name!r} (expected NN_name.ipynb); "
            "pass --chapter N"
        ) from None


def check_limit(name: str, value: float) -> float:
    """A time limit must be a finite positive number of seconds."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number of seconds, got {value!r}")
    return value


def copy_folder(source: Path, target: Path, data: bytes, name: str) -> None:
    """A private copy of the notebook's folder (its plain files, when they are small enough; else
    none of them) with the submitted bytes written as ``name``.

    No other notebook is copied (``*.ipynb``, in any case): in a folder that holds several
    submissions (``class/alice.ipynb``, ``class/bob.ipynb``), one student's code must not read
    another's. Data files, modules and the like next to the notebook are copied."""
    target.mkdir(parents=True, exist_ok=True)
    files = (
        [
            p
            for p in source.iterdir()
            if p.is_file() and not p.is_symlink() and not p.name.lower().endswith(".ipynb")
        ]
        if source.is_dir()
        else []
    )
    if sum(p.stat().st_size for p in files) > FOLDER_COPY_LIMIT:
        files = []
    for path in files:
        shutil.copyfile(path, target / path.name)
    (target / name).write_bytes(data)


def top_level_names(nb: nbformat.NotebookNode) -> tuple[set[str], set[str]]:
    """(names whose last top-level binding is a ``def``/``class``, names whose last one is an
    ``import``), read from the notebook's source text in cell order, without running it."""
    last: dict[str, str] = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        source = "\n".join(
            ln for ln in cell.source.splitlines() if not ln.lstrip().startswith(("%", "!"))
        )
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                last[node.name] = "def"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                last.update(((a.asname or a.name).split(".")[0], "import") for a in node.names)
    return {n for n, k in last.items() if k == "def"}, {n for n, k in last.items() if k == "import"}


def _reference(chapter: str) -> nbformat.NotebookNode | None:
    for path in chapter_paths(CHAPTERS_DIR):
        if path.name[:2] == chapter:
            return nbformat.read(path, as_version=4)
    return None


def graded_names(chapter: str) -> set[str]:
    """The functions and classes the chapter's reference notebook defines: the ones a student must
    write."""
    nb = _reference(chapter)
    return top_level_names(nb)[0] if nb is not None else set()


def excused_cells(chapter: str) -> list[str]:
    """The ids of the reference chapter's cells tagged ``raises-exception``: the only cells whose
    errors a submission's own tag may hide."""
    nb = _reference(chapter)
    if nb is None:
        return []
    return [
        str(c.get("id"))
        for c in nb.cells
        if isinstance(c.metadata.get("tags"), list) and "raises-exception" in c.metadata["tags"]
    ]
