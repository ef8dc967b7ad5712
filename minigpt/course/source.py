"""Importing a notebook's definitions, and the single-source check.

Single source of truth
----------------------
A notebook cell that shows code the package also holds starts with a marker line naming the object::

    # minigpt-source: minigpt.lora.LoRALayer

and the rest of the cell must be exactly ``inspect.getsource`` of that object (the classroom markers
``# BEGIN SOLUTION`` / ``# END SOLUTION`` are ignored when comparing). ``tests/test_notebooks.py``
fails as soon as the two drift; ``python -m minigpt sync-notebooks`` rewrites the cells from the
package.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import types
from dataclasses import dataclass
from pathlib import Path

import nbformat

from minigpt.course.chapters import read_notebook, write_notebook_atomic

SOURCE_MARKER = "# minigpt-source:"


SOLUTION_LINE = re.compile(r"^\s*# (BEGIN|END) SOLUTION\b.*$")


def _is_definition(node: ast.stmt) -> bool:
    """Statements kept when importing a notebook: imports, defs, classes and CONSTANT = literal."""
    if isinstance(
        node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    ):
        return True
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if node.value is None or not all(
            isinstance(t, ast.Name) and t.id.isupper() for t in targets
        ):
            return False
        try:
            ast.literal_eval(node.value)
        except ValueError:
            return False
        return True
    return False


def definitions_source(nb: nbformat.NotebookNode) -> str:
    """The source of every top-level definition in the notebook's code cells, in order.

    Cells with IPython magics (``%time``, ``!pip``) are parsed after dropping those lines.
    """
    chunks = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        lines = [ln for ln in cell.source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
        source = "\n".join(lines)
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue  # a student's half-written cell must not stop the others from importing
        for node in tree.body:
            if _is_definition(node):
                chunks.append(ast.get_source_segment(source, node, padded=True) or "")
    return "\n\n".join(chunks) + "\n"


def import_notebook(path: Path | str, name: str | None = None) -> types.ModuleType:
    """Import the functions, classes and constants a notebook defines, without running its
    experiments.

    Only top-level ``import``, ``def``, ``class`` and ``UPPER_CASE = <literal>`` statements are
    executed, so tests and the grader check the notebook's own code in milliseconds.
    """
    path = Path(path)
    nb = read_notebook(path)
    module = types.ModuleType(name or f"notebook_{path.stem}")
    module.__file__ = str(path)
    code = compile(definitions_source(nb), str(path), "exec")
    exec(code, module.__dict__)  # noqa: S102 - executing the course's (or a student's) own notebook
    return module


@dataclass(frozen=True)
class SourceCell:
    notebook: Path
    index: int
    target: str
    cell_source: str
    package_source: str

    @property
    def in_sync(self) -> bool:
        return normalise_source(self.cell_source) == normalise_source(self.package_source)


def normalise_source(source: str) -> str:
    """Drop solution markers and trailing blank space, the only differences allowed between
    copies."""
    lines = [ln.rstrip() for ln in source.splitlines() if not SOLUTION_LINE.match(ln)]
    return "\n".join(lines).strip() + "\n"


def resolve_object(target: str) -> object:
    """``minigpt.lora.LoRALayer`` -> the object, importing the longest module prefix."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"cannot resolve {target!r}")


def source_cells(path: Path | str) -> list[SourceCell]:
    """Every cell of the notebook that declares itself a copy of package code."""
    path = Path(path)
    found = []
    for index, cell in enumerate(read_notebook(path).cells):
        if cell.cell_type != "code" or not cell.source.startswith(SOURCE_MARKER):
            continue
        first, _, body = cell.source.partition("\n")
        target = first[len(SOURCE_MARKER) :].strip()
        package_source = inspect.getsource(resolve_object(target))
        found.append(SourceCell(path, index, target, body, package_source))
    return found


def sync_notebook(path: Path | str) -> int:
    """Rewrite out-of-sync source cells from the package; returns how many cells changed.

    Solution markers in a cell are lost by a rewrite, so re-add them after syncing a marked cell.
    """
    path = Path(path)
    nb = read_notebook(path)
    changed = 0
    for cell in source_cells(path):
        if not cell.in_sync:
            marker = nb.cells[cell.index].source.partition("\n")[0]
            nb.cells[cell.index].source = marker + "\n" + cell.package_source.rstrip() + "\n"
            changed += 1
    if changed:
        write_notebook_atomic(nb, path)
    return changed
