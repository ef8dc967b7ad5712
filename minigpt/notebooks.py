"""Notebook infrastructure: smoke mode, importing a notebook's definitions, and the single-source check.

Single source of truth
----------------------
A notebook cell that shows code the package also holds starts with a marker line naming the object::

    # minigpt-source: minigpt.lora.LoRALayer

and the rest of the cell must be exactly ``inspect.getsource`` of that object (the classroom markers
``# BEGIN SOLUTION`` / ``# END SOLUTION`` are ignored when comparing). ``tests/test_notebooks.py``
fails as soon as the two drift; ``python -m minigpt sync-notebooks`` rewrites the cells from the package.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import types
from dataclasses import dataclass
from pathlib import Path

import nbformat

SMOKE_ENV = "MINIGPT_SMOKE"
SOURCE_MARKER = "# minigpt-source:"
SOLUTION_LINE = re.compile(r"^\s*# (BEGIN|END) SOLUTION\b.*$")
CHAPTERS_DIR = Path(__file__).resolve().parent.parent / "chapters"
# The course's public repository: the Open-in-Colab badges and the Colab setup cell point here (one place).
REPOSITORY_URL = "https://github.com/minigpt-lora/minigpt-lora"
REPOSITORY_BRANCH = "main"


def smoke_mode() -> bool:
    """True when ``MINIGPT_SMOKE`` is set to a true value: notebooks then use tiny sizes and few steps."""
    return os.environ.get(SMOKE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


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
    """Chapter numbers from a command line -> sorted two-digit strings; ``None`` (or empty) means all.

    Accepts ``6``, ``06``, ``"6 7"``, ``"6,7"`` and ranges ``"6-9"``; raises ValueError otherwise. The one
    parser used by ``course``, ``student-notebooks``, ``grade`` and the checks.
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


def _is_definition(node: ast.stmt) -> bool:
    """Statements kept when importing a notebook: imports, defs, classes and CONSTANT = literal."""
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return True
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if node.value is None or not all(isinstance(t, ast.Name) and t.id.isupper() for t in targets):
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
    """Import the functions, classes and constants a notebook defines, without running its experiments.

    Only top-level ``import``, ``def``, ``class`` and ``UPPER_CASE = <literal>`` statements are executed,
    so tests and the grader check the notebook's own code in milliseconds.
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
    """Drop solution markers and trailing blank space, the only differences allowed between copies."""
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
        target = first[len(SOURCE_MARKER):].strip()
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


def write_notebook_atomic(nb: nbformat.NotebookNode, path: Path | str) -> None:
    """Write a notebook through a temporary file and a rename, so a crash never leaves half a file."""
    from minigpt.io import atomic_write_bytes

    text = nbformat.writes(nb)
    atomic_write_bytes(path, (text if text.endswith("\n") else text + "\n").encode("utf-8"))


def execute_notebook(path: Path | str, *, smoke: bool = True, timeout: int = 600,
                     cwd: Path | str | None = None, progress: bool = False) -> nbformat.NotebookNode:
    """Run a notebook top to bottom in a fresh kernel (smoke mode by default) and return it with outputs.

    The outputs are cleaned with :func:`clean_outputs` (each progress bar saved as its final line). With
    ``progress=True`` the cell being run ("cell 12/40") and its latest output line are shown on stderr.
    On POSIX the kernel talks over local IPC sockets instead of TCP on localhost (no transport warning).
    """
    import tempfile

    from nbclient import NotebookClient
    from traitlets.config import Config

    path = Path(path)
    nb = read_notebook(path)
    reporter = _CellProgress(path.name, nb) if progress else None

    class _Client(NotebookClient):
        def output(self, outs, msg, display_id, cell_index):  # noqa: ANN001 - nbclient's signature
            if reporter is not None and msg["msg_type"] == "stream":
                reporter.text(msg["content"].get("text", ""))
            return super().output(outs, msg, display_id, cell_index)

    previous = os.environ.get(SMOKE_ENV)
    os.environ[SMOKE_ENV] = "1" if smoke else "0"
    try:
        with tempfile.TemporaryDirectory(prefix="minigpt-kernel-") as ipc_dir:
            config = Config()
            if os.name == "posix":
                config.KernelManager.transport = "ipc"
                config.KernelManager.ip = str(Path(ipc_dir) / "kernel")
            hooks = {"on_cell_start": reporter.start, "on_cell_complete": reporter.complete} if reporter else {}
            client = _Client(nb, timeout=timeout, kernel_name="python3", config=config,
                             resources={"metadata": {"path": str(cwd or path.parent)}}, **hooks)
            client.execute()
    finally:
        if reporter is not None:
            reporter.close()
        if previous is None:
            os.environ.pop(SMOKE_ENV, None)
        else:
            os.environ[SMOKE_ENV] = previous
    return clean_outputs(nb)


class _CellProgress:
    """What ``python -m minigpt course`` shows while a chapter runs: the cell and its latest output line.

    On a terminal one status line is redrawn in place; in a log (not a TTY) a line is printed for each
    cell that took more than ``slow`` seconds, with its last output line.
    """

    def __init__(self, name: str, nb: nbformat.NotebookNode, stream=None, slow: float = 10.0):
        import sys

        self.name, self.stream, self.slow = name, stream or sys.stderr, slow
        code = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and cell.source.strip()]
        self.ordinal = {index: k + 1 for k, index in enumerate(code)}
        self.total = len(code)
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.current, self.line, self.started, self.drawn = 0, "", 0.0, 0.0

    def start(self, cell, cell_index: int, **_) -> None:  # noqa: ANN001 - nbclient hook
        import time

        if cell_index not in self.ordinal:  # markdown and empty cells
            return
        self.current = self.ordinal[cell_index]
        self.line, self.started = "", time.perf_counter()
        self._draw(force=True)

    def text(self, text: str) -> None:
        lines = [ln for ln in collapse_carriage_returns(text).splitlines() if ln.strip()]
        if lines:
            self.line = lines[-1].strip()
            self._draw()

    def complete(self, cell, cell_index: int, **_) -> None:  # noqa: ANN001 - nbclient hook
        import time

        seconds = time.perf_counter() - self.started
        if cell_index in self.ordinal and not self.tty and seconds >= self.slow:
            last = f": {self.line}" if self.line else ""
            print(f"  {self.name} cell {self.current}/{self.total} took {seconds:.0f} s{last}",
                  file=self.stream, flush=True)

    def _draw(self, force: bool = False) -> None:
        import shutil
        import time

        if not self.tty or (not force and time.perf_counter() - self.drawn < 0.2):
            return
        self.drawn = time.perf_counter()
        status = f"  {self.name} cell {self.current}/{self.total}" + (f"  {self.line}" if self.line else "")
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write("\r\x1b[K" + status[:width])
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def collapse_carriage_returns(text: str) -> str:
    """Text as a terminal or Jupyter shows it: each ``\\r`` returns to the start of the line and what follows
    overwrites it, so a progress bar's hundreds of updates become its final line."""
    text = re.sub(r"\r+\n", "\n", text)
    if "\r" not in text:
        return text
    lines = []
    for line in text.split("\n"):
        if "\r" in line:
            shown = ""
            for part in line.split("\r"):
                shown = part + shown[len(part):]
            line = shown.rstrip()
        lines.append(line)
    return "\n".join(lines)


def clean_outputs(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Merge each cell's consecutive stream outputs and collapse progress bars to their final line.

    tqdm redraws its bar with ``\\r`` many times a second, and every redraw is saved as one output; after
    cleaning, each bar is one line, as it looked when it finished. Changes ``nb`` in place and returns it.
    """
    for cell in nb.cells:
        if cell.cell_type != "code" or not cell.get("outputs"):
            continue
        merged: list = []
        for out in cell.outputs:
            if (out.output_type == "stream" and merged and merged[-1].output_type == "stream"
                    and merged[-1].name == out.name):
                merged[-1].text += out.text
            else:
                merged.append(out)
        cleaned = []
        for out in merged:
            if out.output_type == "stream":
                out.text = collapse_carriage_returns(out.text)
                if not out.text:
                    continue
            elif "image/png" in out.get("data", {}):
                out.data["image/png"] = shrink_png(out.data["image/png"])
            cleaned.append(out)
        cell.outputs = cleaned
    return nb


def shrink_png(data: str) -> str:
    """A base64 PNG re-encoded with a 256-colour palette when that is smaller (about 3x for plots).

    Matplotlib's figures are flat colours plus anti-aliasing, so the palette version looks the same and
    keeps each notebook small. Images already in palette mode are returned unchanged (idempotent).
    """
    import base64
    import binascii
    import io

    from PIL import Image

    try:
        raw = base64.b64decode(data)
        image = Image.open(io.BytesIO(raw))
        if image.mode == "P":
            return data
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] == 255:  # fully opaque: quantize the colours only
            small = rgba.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        else:
            small = rgba.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        buffer = io.BytesIO()
        small.save(buffer, "PNG", optimize=True, dpi=image.info.get("dpi", (72, 72)))
    except (OSError, ValueError, binascii.Error):
        return data  # not a PNG we can read: keep it as it is
    if len(buffer.getvalue()) >= len(raw):
        return data
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def clean_notebook_file(path: Path | str) -> bool:
    """Clean a saved notebook's outputs in place (read, clean, write at once); True when it changed."""
    path = Path(path)
    before = path.read_bytes()
    nb = clean_outputs(nbformat.reads(before.decode("utf-8"), as_version=4))
    after = (nbformat.writes(nb) + "\n").encode("utf-8")
    if after == before:
        return False
    write_notebook_atomic(nb, path)
    return True


COLAB_BADGE_ID = "colab-badge"
COLAB_SETUP_ID = "colab-setup"
COLAB_SETUP_SOURCE = f"""\
# Setup. On Google Colab: fetch the course and install it (anywhere else that part does nothing). Then, before
# torch is imported: if other processes keep the cores busy, use only the cores they leave free, with threads
# that sleep instead of spinning while they wait (README, "Under load").
import sys

if "google.colab" in sys.modules:
    import os
    import subprocess

    if not os.path.isdir("minigpt-lora"):
        subprocess.run(["git", "clone", "--depth", "1", "{REPOSITORY_URL}"], check=True)
    # Colab keeps its own torch (it satisfies the requirements' range); this installs the rest.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", "requirements.txt"],
                   cwd="minigpt-lora", check=True)
    sys.path.insert(0, os.path.abspath("minigpt-lora"))  # importable now, without restarting the kernel
from minigpt import apply_cpu_thread_settings

apply_cpu_thread_settings()"""


def colab_url(name: str) -> str:
    """The address that opens chapter ``name`` (``01_rank_and_low_rank.ipynb``) from GitHub in Colab."""
    repo = REPOSITORY_URL.removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{repo}/blob/{REPOSITORY_BRANCH}/chapters/{name}"


def colab_badge_source(name: str) -> str:
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(name)})")


def add_colab_cells(nb: nbformat.NotebookNode, name: str) -> bool:
    """Make the chapter start with the Open-in-Colab badge and put the Colab setup cell before its first
    code cell. Idempotent: cells already present (found by their ids) are only brought up to date.
    Returns True when the notebook changed."""
    before = nbformat.writes(nb)
    cells = [c for c in nb.cells if c.get("id") not in (COLAB_BADGE_ID, COLAB_SETUP_ID)]
    badge = nbformat.v4.new_markdown_cell(colab_badge_source(name), id=COLAB_BADGE_ID)
    setup = nbformat.v4.new_code_cell(COLAB_SETUP_SOURCE, id=COLAB_SETUP_ID)
    for old in nb.cells:  # keep the existing cells' metadata (and outputs, none expected)
        if old.get("id") == COLAB_BADGE_ID:
            badge.metadata = old.metadata
        elif old.get("id") == COLAB_SETUP_ID:
            setup.metadata, setup.outputs, setup.execution_count = old.metadata, old.get("outputs", []), \
                old.get("execution_count")
    first_code = next((i for i, c in enumerate(cells) if c.cell_type == "code"), len(cells))
    cells.insert(first_code, setup)
    nb.cells = [badge] + cells
    if nb.nbformat_minor < 5:
        nb.nbformat_minor = 5  # cell ids need nbformat 4.5
    return nbformat.writes(nb) != before


def ensure_colab_cells(path: Path | str) -> bool:
    """Add or refresh the Colab badge and setup cell of one chapter file; True when the file changed."""
    path = Path(path)
    nb = read_notebook(path)
    if not add_colab_cells(nb, path.name):
        return False
    write_notebook_atomic(nb, path)
    return True
