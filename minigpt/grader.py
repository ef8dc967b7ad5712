"""The autograder's trusted side: it never imports or calls a student's code, it only reads plain data.

Grading one notebook (:func:`grade_notebook`):

1. Copy the notebook's folder into two fresh private folders (one to run the notebook in, one for the
   checks); keep a third copy of the notebook where no worker can write.
2. **Run the notebook** in an untrusted worker (:mod:`minigpt.worker`, ``execute``) at the chosen isolation
   level (:mod:`minigpt.sandbox`: ``bwrap`` or ``none``), smoke mode, under one time limit the grader itself
   enforces by killing the worker. A notebook that crashes, dies or runs out of time is still graded on what
   it defines, but the grade exits 1 and says why.
3. **Run the checks** in a second worker (``checks``): it imports the notebook's definitions and runs each
   check of :mod:`minigpt.checks` on them through :class:`minigpt.remote.Recorder`, which writes down every
   value the notebook hands back as plain data. Each check has its own time limit; a check that loops is
   killed and the worker restarted for the rest.
4. **Decide here**: each check runs again in this process on a :class:`minigpt.remote.Replayer` that answers
   from the transcript, so expected values are computed and compared here, on plain data. A check passes only
   when both runs pass (the worker's verdict can only take points away). A graded function that was not
   defined in the submitted notebook (imported from ``minigpt`` or from another notebook) scores zero.
5. **Report**: every message from the notebook is escaped to one line; the total is written only here.
"""

from __future__ import annotations

import ast
import json
import math
import os
import selectors
import shutil
import tempfile
import time
import traceback
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat
from nbformat.reader import NotJSONError

from minigpt.checks import Check, checks_for
from minigpt.notebooks import CHAPTERS_DIR, chapter_paths, normalise_chapter
from minigpt.remote import Replayer, TranscriptMismatch
from minigpt.sandbox import REFUSALS_FILE, Limits, kill_worker, read_refusals, resolve_isolation, spawn_worker

DEFAULT_TIMEOUT = 600.0
DEFAULT_CHECK_TIMEOUT = 120.0
STARTUP_ALLOWANCE = 60.0  # seconds for a worker to start Python and import torch/numpy
MESSAGE_LIMIT = 2000
LINE_LIMIT = 64 * 2**20  # the longest line a worker may send (one check's transcript)
WORKER_LOG = ".minigpt-worker.log"  # a worker's stderr (the notebook's prints), inside its own sandbox
FOLDER_COPY_LIMIT = 200 * 2**20  # copy the notebook's folder when its files are smaller than this
STATUS_TEXT = {"passed": "passed", "failed": "failed", "not_implemented": "not implemented", "error": "error",
               "timeout": "timeout", "skipped": "not run", "borrowed": "borrowed"}
ISOLATION_TEXT = {"bwrap": "isolated with bubblewrap: read-only system, private folder, no network",
                  "none": "NOT ISOLATED: audit hook only; grade untrusted work with --isolation bwrap"}


@dataclass
class CheckResult:
    """One check of the chapter: status is passed, failed, not_implemented, error, timeout, borrowed or skipped."""

    name: str
    description: str
    possible: int
    points: int = 0
    status: str = "skipped"
    message: str = ""
    location: str = ""  # the notebook function the failure came from, when known
    seconds: float = 0.0


@dataclass
class CellError:
    """A cell that raised while the notebook ran (``cell`` counts all cells from 1, as they appear)."""

    cell: int
    cell_id: str
    first_line: str
    ename: str
    evalue: str


@dataclass
class Execution:
    """How running the notebook went: completed, timeout, kernel_died, failed or not_run."""

    status: str = "not_run"
    message: str = ""
    seconds: float = 0.0
    cells_run: int = 0
    code_cells: int = 0
    errors: list[CellError] = field(default_factory=list)


@dataclass
class Refusal:
    """An operation the audit hook refused: the phase (execution or checks), the audit event and its target."""

    phase: str
    event: str
    path: str


@dataclass
class GradeReport:
    notebook: str
    chapter: str
    checks: list[CheckResult]
    execution: Execution
    isolation: str = "none"
    refused: list[Refusal] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    sandbox: str = ""  # kept only with keep_sandbox=True

    @property
    def points(self) -> int:
        return sum(c.points for c in self.checks)

    @property
    def possible(self) -> int:
        return sum(c.possible for c in self.checks)

    @property
    def completed(self) -> bool:
        """The notebook ran to its end (it did not crash, die or run out of time)."""
        return self.execution.status == "completed"

    @property
    def passed(self) -> bool:
        """All points, a notebook that ran to its end, nothing refused: the condition for exit status 0."""
        return self.points == self.possible and self.completed and not self.refused

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(points=self.points, possible=self.possible, passed=self.passed, completed=self.completed)
        return data

    def format_text(self) -> str:
        """The report, one line per item; everything that came from the notebook is escaped to one line."""
        lines = [f"Grading {escape(self.notebook)} as chapter {self.chapter} (smoke mode)",
                 f"Isolation: {self.isolation}, {ISOLATION_TEXT.get(self.isolation, '')}"]
        lines += [f"Problem: {escape(p)}" for p in self.problems]
        lines += _execution_lines(self.execution)
        if self.refused:
            lines.append(f"Sandbox: refused {len(self.refused)} operation(s) outside the notebook's folder:")
            lines += [f"  {escape(r.phase)}: {escape(r.event)} {escape(r.path)}" for r in self.refused]
        lines.append("Checks:")
        for c in self.checks:
            lines.append(f"  {STATUS_TEXT[c.status]:<16}{c.points:>2}/{c.possible}  {c.name}: {c.description}")
            if c.message:
                prefix = {"not_implemented": "hint", "skipped": "not run"}.get(c.status, c.status)
                where = f" (in {escape(c.location, 80)})" if c.location else ""
                lines.append(f"      {prefix}{where}: {escape(c.message, MESSAGE_LIMIT)}")
        if not self.completed and self.execution.status != "not_run":
            lines.append("The notebook did not run to its end, so the grade exits with status 1.")
        lines.append(f"Total: {self.points}/{self.possible} points.")
        if self.sandbox:
            lines.append(f"Sandbox kept at {self.sandbox}")
        return "\n".join(lines)


def _execution_lines(run: Execution) -> list[str]:
    if run.status == "not_run":
        return [f"Execution: not run. {escape(run.message)}".rstrip()]
    summary = f"Execution: {run.status}, {run.cells_run} of {run.code_cells} code cells run in {run.seconds:.1f} s"
    lines = [summary + (f"; {len(run.errors)} raised:" if run.errors else "; none raised.")]
    if run.message:
        lines.append(f"  {escape(run.message)}")
    for err in run.errors:
        lines.append(f"  cell {err.cell} `{escape(err.first_line, 60)}`: {escape(err.ename, 80)}: "
                     f"{escape(err.evalue, 200)}")
    return lines


def escape(text: object, limit: int = 500) -> str:
    """``text`` on one line: newlines and every other control or separator character written as escapes."""
    out = []
    for ch in str(text):
        if ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append(" ")
        elif unicodedata.category(ch)[0] == "C" or unicodedata.category(ch) in ("Zl", "Zp"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    result = "".join(out)
    return result if len(result) <= limit else result[: limit - 3] + "..."


def _clip(text: str) -> str:
    text = str(text)
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 20] + " ... (message cut)"


def infer_chapter(path: Path | str) -> str:
    """The chapter of ``NN_name.ipynb`` (``"06"`` for ``06_lora.ipynb``)."""
    name = Path(path).name
    head = name.split("_", 1)[0]
    try:
        if "_" not in name or not head.isdigit():
            raise ValueError
        return normalise_chapter(head)
    except ValueError:
        raise ValueError(f"cannot tell the chapter from the file name {name!r} (expected NN_name.ipynb); "
                         "pass --chapter N") from None


def check_limit(name: str, value: float) -> float:
    """A time limit must be a finite positive number of seconds."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number of seconds, got {value!r}")
    return value


# --- reading a worker --------------------------------------------------------------------------------------

class WorkerStream:
    """The lines a worker writes on its stdout, read with deadlines; each line is one JSON object."""

    def __init__(self, proc):
        self.proc = proc
        self.selector = selectors.DefaultSelector()
        self.selector.register(proc.stdout, selectors.EVENT_READ)
        self.buffer = b""
        self.ended = False

    def next_event(self, deadline: float) -> dict | str:
        """The next event, or ``"timeout"`` when ``deadline`` passes, or ``"ended"`` when the worker closed."""
        while b"\n" not in self.buffer:
            if self.ended:
                return "ended"
            wait = deadline - time.monotonic()
            if wait <= 0 or not self.selector.select(timeout=wait):
                return "timeout"
            chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
            if not chunk:
                self.ended = True
                continue
            self.buffer += chunk
            if len(self.buffer) > LINE_LIMIT and b"\n" not in self.buffer:
                self.ended, self.buffer = True, b""
                return "ended"
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            event = json.loads(line)
        except ValueError:
            return {"event": "garbage"}
        return event if isinstance(event, dict) else {"event": "garbage"}

    def close(self) -> None:
        self.selector.close()
        self.proc.stdout.close()
        kill_worker(self.proc)  # also when it exited: its group may hold leftovers it started


def _worker_limits(wall_seconds: float) -> Limits:
    return Limits(cpu_seconds=int(wall_seconds * max(1, os.cpu_count() or 1)) + 60)


# --- step 2: run the notebook ------------------------------------------------------------------------------

def run_notebook(notebook_name: str, sandbox: Path, timeout: float, isolation: str) -> Execution:
    """Run the notebook in a worker; the time limit is enforced here by killing it."""
    spec = {"sandbox": str(sandbox), "notebook": notebook_name, "timeout": timeout,
            "log": str(sandbox / REFUSALS_FILE)}
    start = time.monotonic()
    with open(sandbox / WORKER_LOG, "ab") as stderr:  # inside the sandbox: the worker may write there
        proc = spawn_worker(["execute", json.dumps(spec)], isolation=isolation, sandbox=sandbox,
                            limits=_worker_limits(timeout + STARTUP_ALLOWANCE), stderr=stderr, hidden=[CHAPTERS_DIR])
    stream = WorkerStream(proc)
    try:
        event = stream.next_event(start + timeout + STARTUP_ALLOWANCE)
    finally:
        stream.close()
    seconds = round(time.monotonic() - start, 3)
    if event == "timeout":
        return Execution("timeout", f"the notebook was still running when the time limit for the whole notebook "
                         f"({timeout:g} s) ran out; it was stopped", seconds)
    if not isinstance(event, dict) or event.get("event") != "execution":
        return Execution("failed", f"the notebook's process ended without a report (exit status {proc.returncode})",
                         seconds)
    return _execution_from(event, seconds)


def _execution_from(event: dict, seconds: float) -> Execution:
    """The worker's account of the run, kept as text and numbers only (it is the student's to write)."""
    status = event.get("status") if event.get("status") in ("completed", "timeout", "kernel_died", "failed") \
        else "failed"
    errors = []
    for err in event.get("errors", [])[:100] if isinstance(event.get("errors"), list) else []:
        if isinstance(err, dict):
            errors.append(CellError(_int(err.get("cell")), _clip(err.get("cell_id", ""))[:80],
                                    _clip(err.get("first_line", ""))[:100], _clip(err.get("ename", ""))[:100],
                                    _clip(err.get("evalue", ""))))
    return Execution(status, _clip(event.get("message", "")), seconds, _int(event.get("cells_run")),
                     _int(event.get("code_cells")), errors)


def _int(value: object) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0


# --- step 3: record the checks in a worker -----------------------------------------------------------------

@dataclass
class _Pending:
    """What the checks phase knows while the worker runs."""

    names: list[str]
    raw: dict[str, dict] = field(default_factory=dict)  # check name -> the worker's result event
    timeouts: dict[str, str] = field(default_factory=dict)  # check name -> why it has no result
    problems: list[str] = field(default_factory=list)
    import_error: dict | None = None


def record_checks(submission: Path, chapter: str, names: list[str], sandbox: Path, check_timeout: float,
                  isolation: str) -> _Pending:
    """Run the checks in workers (restarting after a check that loops); collect their raw transcripts."""
    pending = _Pending(list(names))
    while pending.names:
        spec = {"chapter": chapter, "names": pending.names, "submission": str(submission), "sandbox": str(sandbox),
                "log": str(sandbox / REFUSALS_FILE)}
        with open(sandbox / WORKER_LOG, "ab") as stderr:
            proc = spawn_worker(["checks", json.dumps(spec)], isolation=isolation, sandbox=sandbox, stderr=stderr,
                                limits=_worker_limits(STARTUP_ALLOWANCE + check_timeout * (len(pending.names) + 1)),
                                hidden=[CHAPTERS_DIR])
        stream = WorkerStream(proc)
        try:
            _follow_worker(stream, pending, check_timeout)
        finally:
            stream.close()
    return pending


def _follow_worker(stream: WorkerStream, pending: _Pending, check_timeout: float) -> None:
    """Read one worker's events until it ends, runs out of time, or has answered every remaining check."""
    current: str | None = None
    phase = "starting the check process"
    deadline = time.monotonic() + STARTUP_ALLOWANCE + check_timeout
    while pending.names:
        event = stream.next_event(deadline)
        if event in ("timeout", "ended"):
            _worker_stopped(pending, current, phase, event, check_timeout)
            return
        kind = event.get("event")
        if kind == "importing":
            phase, deadline = "importing the notebook's definitions", time.monotonic() + check_timeout
        elif kind == "import_error":
            pending.import_error = event
            pending.names.clear()
        elif kind == "start" and event.get("name") in pending.names:
            current, phase = event["name"], "running a check"
            deadline = time.monotonic() + check_timeout
        elif kind == "result" and event.get("name") in pending.names:
            pending.raw[event["name"]] = event
            pending.names.remove(event["name"])
            current = None
        # anything else (garbage, events for other checks) is ignored: it cannot change a verdict


def _worker_stopped(pending: _Pending, current: str | None, phase: str, how: str, check_timeout: float) -> None:
    if current is not None:
        pending.timeouts[current] = (f"the check did not finish within {check_timeout:g} s" if how == "timeout" else
                                     "the check ended the grading process")
        pending.names.remove(current)
        return
    what = f"{phase} did not finish within the time limit" if how == "timeout" else \
        f"the check process ended early ({phase})"
    pending.problems.append(what)
    for name in pending.names:
        pending.timeouts[name] = what
    pending.names.clear()


# --- step 4: decide here -----------------------------------------------------------------------------------

def top_level_names(nb: nbformat.NotebookNode) -> tuple[set[str], set[str]]:
    """(names whose last top-level binding is a ``def``/``class``, names whose last one is an ``import``),
    read from the notebook's source text in cell order, without running it."""
    last: dict[str, str] = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        source = "\n".join(ln for ln in cell.source.splitlines() if not ln.lstrip().startswith(("%", "!")))
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                last[node.name] = "def"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                last.update(((a.asname or a.name).split(".")[0], "import") for a in node.names)
    return {n for n, k in last.items() if k == "def"}, {n for n, k in last.items() if k == "import"}


def graded_names(chapter: str) -> set[str]:
    """The functions and classes the chapter's reference notebook defines: the ones a student must write."""
    for path in chapter_paths(CHAPTERS_DIR):
        if path.name[:2] == chapter:
            return top_level_names(nbformat.read(path, as_version=4))[0]
    return set()


def decide(check: Check, raw: dict, graded: set[str], defined: set[str], imported: set[str]) -> tuple[str, str, str]:
    """(status, message, location) for one check: replay it here on the worker's transcript."""
    replayer = Replayer(raw.get("transcript") if isinstance(raw.get("transcript"), list) else [])
    status, message, location = _replay(check, replayer)
    borrowed = _borrowed(replayer.fetched, graded, defined, imported)
    if borrowed:
        return "borrowed", borrowed, ""
    worker_status = raw.get("status")
    if status == "passed" and worker_status != "passed":
        # the worker's own run can only take points away
        status = worker_status if worker_status in ("failed", "not_implemented", "error") else "error"
        message = "when run next to the notebook: " + _clip(raw.get("message", ""))
        location = _clip(raw.get("location", ""))[:80]
    return status, message, location


def _replay(check: Check, replayer: Replayer) -> tuple[str, str, str]:
    try:
        check.run(replayer.root)
    except TranscriptMismatch as err:
        return "error", f"the worker's record of this check does not match the check ({_clip(err)})", ""
    except NotImplementedError as err:
        return "not_implemented", _clip(str(err) or "NotImplementedError"), getattr(err, "remote_location", "")
    except AssertionError as err:
        message = str(err)
        if not message:
            frames = traceback.extract_tb(err.__traceback__)
            line = frames[-1].line if frames else ""
            message = f"assertion failed: {line}" if line else "assertion failed"
        return "failed", _clip(message), ""
    except Exception as err:  # noqa: BLE001 - the student's errors, rebuilt from the transcript
        name = getattr(err, "remote_name", type(err).__name__)
        return "error", _clip(f"{name}: {err}"), getattr(err, "remote_location", "")
    return "passed", "", ""


def _borrowed(fetched: dict, graded: set[str], defined: set[str], imported: set[str]) -> str:
    """A message when a graded function the check used was not written in the submitted notebook."""
    for name, origin in fetched.items():
        if name not in graded or origin is None:
            continue
        if name not in defined or name in imported:
            return (f"{name} is not defined by a def/class in the submitted notebook (it is imported); "
                    "write it yourself")
        if not (isinstance(origin, dict) and origin.get("in_notebook") is True):
            where = escape(origin.get("module", "?"), 80) if isinstance(origin, dict) else "?"
            return f"{name} was not defined in the submitted notebook (it comes from {where}); write it yourself"
    return ""


# --- putting it together -----------------------------------------------------------------------------------

def _copy_folder(source: Path, target: Path, data: bytes, name: str) -> None:
    """A private copy of the notebook's folder (its plain files, when they are small enough; else none of
    them) with the submitted bytes written as ``name``."""
    target.mkdir(parents=True, exist_ok=True)
    files = [p for p in source.iterdir() if p.is_file() and not p.is_symlink()] if source.is_dir() else []
    if sum(p.stat().st_size for p in files) > FOLDER_COPY_LIMIT:
        files = []
    for path in files:
        shutil.copyfile(path, target / path.name)
    (target / name).write_bytes(data)


def grade_notebook(path: Path | str, chapter: str | int | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                   check_timeout: float = DEFAULT_CHECK_TIMEOUT, isolation: str = "auto",
                   keep_sandbox: bool = False) -> GradeReport:
    """Grade a student's notebook: run it in a worker, record the checks in another, decide here.

    Raises FileNotFoundError for a missing file and ValueError for an unknown chapter, bad limits or an
    isolation level this machine cannot provide; every problem with the notebook itself (not JSON, crashes,
    loops, refused operations, borrowed solutions) ends up in the report.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"notebook not found: {path}")
    timeout, check_timeout = check_limit("timeout", timeout), check_limit("check_timeout", check_timeout)
    chapter = normalise_chapter(chapter) if chapter is not None else infer_chapter(path)
    checks = checks_for(chapter)
    if not checks:
        raise ValueError(f"chapter {chapter} has no checks yet (minigpt/checks/ch{chapter}.py)")
    try:
        level = resolve_isolation(isolation)
    except RuntimeError as err:
        raise ValueError(str(err)) from None
    results = [CheckResult(c.name, c.description, c.points) for c in checks]
    report = GradeReport(str(path), chapter, results, Execution(), isolation=level)

    workdir = Path(tempfile.mkdtemp(prefix="minigpt-grade-")).resolve()
    try:
        data = path.read_bytes()
        (workdir / "submission.ipynb").write_bytes(data)  # where no worker can write: this copy is graded
        try:
            nb = nbformat.reads(data.decode("utf-8"), as_version=4)
        except Exception as err:  # noqa: BLE001 - not UTF-8, not JSON, not a notebook
            reason = ("not UTF-8 text" if isinstance(err, UnicodeDecodeError) else
                      "not valid JSON" if isinstance(err, NotJSONError) else "not a notebook")
            report.problems.append(f"the file is {reason} ({type(err).__name__}: {escape(err, 200)}); nothing was run")
            report.execution.message = "the notebook could not be read"
            for r in results:
                r.message = "the notebook could not be read"
            return report
        run_dir, check_dir = workdir / "run", workdir / "checks"
        _copy_folder(path.parent, run_dir, data, path.name)
        report.execution = run_notebook(path.name, run_dir, timeout, level)
        _copy_folder(path.parent, check_dir, data, "submission.ipynb")
        pending = record_checks(check_dir / "submission.ipynb", chapter, [c.name for c in checks], check_dir,
                                check_timeout, level)
        _fill_results(report, checks, pending, nb)
        report.refused = [Refusal(**r) for r in read_refusals(run_dir / REFUSALS_FILE)
                          + read_refusals(check_dir / REFUSALS_FILE)]
        return report
    finally:
        if keep_sandbox:
            report.sandbox = str(workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _fill_results(report: GradeReport, checks: list[Check], pending: _Pending, nb: nbformat.NotebookNode) -> None:
    report.problems += pending.problems
    graded = graded_names(report.chapter)
    defined, imported = top_level_names(nb)
    for check, result in zip(checks, report.checks):
        if pending.import_error is not None:
            err = pending.import_error
            result.status = "not_implemented" if err.get("status") == "not_implemented" else "error"
            result.message, result.location = _clip(err.get("message", "")), _clip(err.get("location", ""))[:80]
        elif check.name in pending.timeouts:
            result.status, result.message = "timeout", pending.timeouts[check.name]
        elif check.name in pending.raw:
            raw = pending.raw[check.name]
            result.status, result.message, result.location = decide(check, raw, graded, defined, imported)
            seconds = raw.get("seconds")
            result.seconds = float(seconds) if isinstance(seconds, (int, float)) and math.isfinite(seconds) else 0.0
        result.points = result.possible if result.status == "passed" else 0
    if pending.import_error is not None:
        where = f" (in {escape(pending.import_error.get('location', ''), 80)})" \
            if pending.import_error.get("location") else ""
        report.problems.append(f"the notebook's definitions could not be imported{where}: "
                               f"{escape(pending.import_error.get('message', ''), 200)}")
