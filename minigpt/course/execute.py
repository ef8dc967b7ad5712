"""Running a chapter top to bottom in a fresh kernel, with the cell being run shown as progress."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat

from minigpt import SMOKE_ENV
from minigpt._progress import PROGRESS_ENV
from minigpt.course.chapters import read_notebook
from minigpt.course.clean import clean_outputs, collapse_carriage_returns


def execute_notebook(
    path: Path | str,
    *,
    smoke: bool = True,
    timeout: int = 600,
    cwd: Path | str | None = None,
    progress: bool = False,
) -> nbformat.NotebookNode:
    """Run a notebook top to bottom in a fresh kernel (smoke mode by default) and return it with
    outputs.

    The outputs are cleaned with :func:`clean_outputs` (each progress bar saved as its final line).
    With ``progress=True`` the cell being run ("cell 12/40") and its latest output line are shown on
    stderr. On POSIX the kernel talks over local IPC sockets instead of TCP on localhost (no
    transport warning).
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
    previous_progress = os.environ.get(PROGRESS_ENV)
    os.environ[SMOKE_ENV] = "1" if smoke else "0"
    os.environ[PROGRESS_ENV] = "text"  # the saved notebook keeps text bars, not widgets
    try:
        with tempfile.TemporaryDirectory(prefix="minigpt-kernel-") as ipc_dir:
            config = Config()
            if os.name == "posix":
                config.KernelManager.transport = "ipc"
                config.KernelManager.ip = str(Path(ipc_dir) / "kernel")
            hooks = (
                {"on_cell_start": reporter.start, "on_cell_complete": reporter.complete}
                if reporter
                else {}
            )
            client = _Client(
                nb,
                timeout=timeout,
                kernel_name="python3",
                config=config,
                resources={"metadata": {"path": str(cwd or path.parent)}},
                **hooks,
            )
            client.execute()
    finally:
        if reporter is not None:
            reporter.close()
        if previous is None:
            os.environ.pop(SMOKE_ENV, None)
        else:
            os.environ[SMOKE_ENV] = previous
        if previous_progress is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = previous_progress
    return clean_outputs(nb)


class _CellProgress:
    """What ``python -m minigpt course`` shows while a chapter runs: the cell and its latest output
    line.

    On a terminal one status line is redrawn in place; in a log (not a TTY) a line is printed for
    each cell that took more than ``slow`` seconds, with its last output line.
    """

    def __init__(self, name: str, nb: nbformat.NotebookNode, stream=None, slow: float = 10.0):
        import sys

        self.name, self.stream, self.slow = name, stream or sys.stderr, slow
        code = [
            i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and cell.source.strip()
        ]
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
            print(
                f"  {self.name} cell {self.current}/{self.total} took {seconds:.0f} s{last}",
                file=self.stream,
                flush=True,
            )

    def _draw(self, force: bool = False) -> None:
        import shutil
        import time

        if not self.tty or (not force and time.perf_counter() - self.drawn < 0.2):
            return
        self.drawn = time.perf_counter()
        status = f"  {self.name} cell {self.current}/{self.total}" + (
            f"  {self.line}" if self.line else ""
        )
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write("\r\x1b[K" + status[:width])
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
