"""The autograder: run a student's notebook in a sandbox, then run the chapter's checks on what it defines.

Grading one notebook (:func:`grade_notebook`):

1. Copy it into a fresh temporary folder (the *sandbox*); ``MINIGPT_SMOKE=1``, and ``MINIGPT_CACHE``,
   ``TMPDIR``, ``MPLCONFIGDIR`` and ``IPYTHONDIR`` point inside the sandbox.
2. Execute it there with nbclient (``allow_errors=True``) under one time limit for the whole notebook.
   The first cell, injected by the grader, installs a Python audit hook (PEP 578, ``sys.addaudithook``)
   that refuses writes, deletions, renames and permission changes outside the sandbox, and starting other
   programs (a few that only report on the machine, such as ``uname``, excepted), and
   logs every refusal to a file outside the sandbox.
3. In a separate process (same hook, a time limit per check), import the notebook's definitions with
   :func:`minigpt.notebooks.import_notebook` and run :func:`minigpt.checks.checks_for` -- the very checks
   ``tests/test_notebooks.py`` runs on the reference notebooks.

What the sandbox does not do (it guards against accidents, it is not a security boundary): code in C
extensions (NumPy, PyTorch, safetensors, sqlite) and ``ctypes`` write without raising audit events,
reading files is allowed everywhere, the network is not blocked, and a determined student can work around
an audit hook. Grade untrusted submissions inside a container or a throwaway account.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat
from nbformat.reader import NotJSONError

DEFAULT_TIMEOUT = 600.0
DEFAULT_CHECK_TIMEOUT = 120.0
STARTUP_ALLOWANCE = 60.0  # seconds for the check process to start Python and import torch/numpy
MESSAGE_LIMIT = 2000
STATUS_TEXT = {"passed": "passed", "failed": "failed", "not_implemented": "not implemented", "error": "error",
               "timeout": "timeout", "skipped": "not run"}
# Programs that only report on the machine (platform.processor(), matplotlib's font list, ctypes.util).
HARMLESS_PROGRAMS = ("uname", "fc-list", "ldconfig", "ldconfig.real", "lscpu", "nvidia-smi")

# The audit hook. It is source text because it runs in two other processes: the notebook's kernel (as the
# injected first cell) and the check process. Everything it needs lives in a closure, so the notebook's
# namespace only sees one underscore-prefixed name, deleted at the end of the cell.
HOOK_SOURCE = r'''
def _minigpt_grader_sandbox(allowed, log_path, phase, harmless_programs):
    import errno, json, os, sys
    allowed = tuple(os.path.realpath(p) for p in allowed)
    log = open(log_path, "a", encoding="utf-8")  # opened before the hook exists, outside the sandbox
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    path_events = {"os.truncate": None, "os.chmod": 2, "os.chown": 3, "os.chflags": None, "os.lchmod": None,
                   "os.lchown": None, "os.lchflags": None, "os.utime": 3, "os.setxattr": None,
                   "os.removexattr": None, "os.mkdir": 2, "os.mkfifo": 2, "os.mknod": 3}
    program_events = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "pty.spawn")

    def refuse(event, what):
        log.write(json.dumps({"phase": phase, "event": event, "path": what}) + "\n")
        log.flush()
        raise PermissionError(errno.EACCES, f"minigpt grader: {event} outside the notebook's folder is not allowed",
                              what)

    def resolve(path, dir_fd, follow):
        path = os.fsdecode(os.fspath(path))
        if not os.path.isabs(path):
            base = os.getcwd()
            if isinstance(dir_fd, int) and dir_fd >= 0:
                try:
                    base = os.readlink(f"/proc/self/fd/{dir_fd}")
                except OSError:
                    pass
            path = os.path.join(base, path)
        if follow:
            return os.path.realpath(path)
        # removing or renaming an entry changes its folder, not what a symbolic link points to
        return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))

    def check(event, path, dir_fd=None, follow=True):
        if path is None or isinstance(path, int):
            return  # an open file descriptor: it was checked when it was opened
        try:
            target = resolve(path, dir_fd, follow)
        except (TypeError, ValueError, OSError):
            refuse(event, repr(path))
        if target != os.devnull and not any(target == root or target.startswith(root + os.sep) for root in allowed):
            refuse(event, target)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and flags & write_flags):
                check(event, path)
        elif event in ("os.remove", "os.rmdir"):
            check(event, args[0], args[1], follow=False)
        elif event == "os.rename":
            check(event, args[0], args[2], follow=False)
            check(event, args[1], args[3], follow=False)
        elif event == "os.link":
            check(event, args[0], args[2])
            check(event, args[1], args[3], follow=False)
        elif event == "os.symlink":
            check(event, args[1], args[2], follow=False)
        elif event in path_events:
            index = path_events[event]
            check(event, args[0], args[index] if index is not None else None)
        elif event == "shutil.rmtree":
            check(event, args[0], args[1] if len(args) > 1 else None, follow=False)
        elif event in ("shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.copytree"):
            check(event, args[1])
        elif event == "shutil.move":
            check(event, args[0], follow=False)
            check(event, args[1])
        elif event == "subprocess.Popen":
            # args[0] is the program itself (/bin/sh for shell=True), so a command line cannot pose as harmless
            if args[0] is None or os.path.basename(os.fsdecode(os.fspath(args[0]))) not in harmless_programs:
                refuse(event, repr(args[1]))
        elif event in program_events:
            refuse(event, repr(args[1] if event in ("os.exec", "os.posix_spawn", "os.spawn") else args[0]))
        elif event in ("os.kill", "os.killpg"):
            if args[0] not in (os.getpid(), os.getpgrp()):
                refuse(event, f"process {args[0]}")

    sys.addaudithook(hook)
'''


@dataclass
class CheckResult:
    """One check of the chapter: status is passed, failed, not_implemented, error, timeout or skipped."""

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
    """An operation the sandbox refused: the phase (execution or checks), the audit event and its target."""

    phase: str
    event: str
    path: str


@dataclass
class GradeReport:
    notebook: str
    chapter: str
    checks: list[CheckResult]
    execution: Execution
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
    def passed(self) -> bool:
        """All points earned and nothing refused: the condition for exit status 0."""
        return self.points == self.possible and not self.refused

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(points=self.points, possible=self.possible, passed=self.passed)
        return data

    def format_text(self) -> str:
        lines = [f"Grading {self.notebook} as chapter {self.chapter} (smoke mode, sandboxed)"]
        lines += [f"Problem: {p}" for p in self.problems]
        run = self.execution
        if run.status == "not_run":
            lines.append(f"Execution: not run. {run.message}".rstrip())
        else:
            summary = (f"Execution: {run.status}, {run.cells_run} of {run.code_cells} code cells run "
                       f"in {run.seconds:.1f} s")
            lines.append(summary + (f"; {len(run.errors)} raised:" if run.errors else "; none raised."))
            if run.message:
                lines.append(f"  {run.message}")
            for err in run.errors:
                lines.append(f"  cell {err.cell} `{err.first_line}`: {err.ename}: {_one_line(err.evalue)}")
        if self.refused:
            lines.append(f"Sandbox: refused {len(self.refused)} operation(s) outside the notebook's folder:")
            lines += [f"  {r.phase}: {r.event} {r.path}" for r in self.refused]
        else:
            lines.append("Sandbox: nothing refused.")
        lines.append("Checks:")
        for c in self.checks:
            lines.append(f"  {STATUS_TEXT[c.status]:<16}{c.points:>2}/{c.possible}  {c.name}: {c.description}")
            if c.message:
                prefix = {"not_implemented": "hint", "skipped": "not run"}.get(c.status, c.status)
                where = f" (in {c.location})" if c.location else ""
                text = f"{prefix}{where}: {c.message}"
                lines += ["      " + ln for ln in text.splitlines()]
        lines.append(f"Total: {self.points}/{self.possible} points.")
        if self.sandbox:
            lines.append(f"Sandbox kept at {self.sandbox}")
        return "\n".join(lines)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clip(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 20] + "\n... (message cut)"


def infer_chapter(path: Path | str) -> str:
    """The chapter of ``NN_name.ipynb`` (``"06"`` for ``06_lora.ipynb``)."""
    match = re.match(r"(\d{2})_", Path(path).name)
    if match is None:
        raise ValueError(f"cannot tell the chapter from the file name {Path(path).name!r} (expected NN_name.ipynb); "
                         "pass --chapter N")
    return match.group(1)


def hook_cell_source(allowed: list[str], log_path: str, phase: str) -> str:
    """The injected first cell: install the sandbox's audit hook, then remove its name from the namespace."""
    call = (f"_minigpt_grader_sandbox({json.dumps(allowed)}, {json.dumps(log_path)}, {json.dumps(phase)}, "
            f"{json.dumps(list(HARMLESS_PROGRAMS))})")
    return HOOK_SOURCE + call + "\ndel _minigpt_grader_sandbox\n"


def _sandbox_env(sandbox: Path) -> dict[str, str]:
    env = dict(os.environ)
    for name, sub in (("MINIGPT_CACHE", "cache"), ("TMPDIR", "tmp"), ("TEMP", "tmp"), ("TMP", "tmp"),
                      ("MPLCONFIGDIR", "config/matplotlib"), ("IPYTHONDIR", "config/ipython")):
        (sandbox / sub).mkdir(parents=True, exist_ok=True)
        env[name] = str(sandbox / sub)
    env["MINIGPT_SMOKE"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the import system would otherwise try to write next to the sources
    return env


def _first_line(source: str) -> str:
    for line in source.splitlines():
        if line.strip() and not line.strip().startswith("#"):
            return _one_line(line.strip(), 60)
    return _one_line(source.strip(), 60)


def execute_in_sandbox(nb: nbformat.NotebookNode, sandbox: Path, log_path: Path, timeout: float) -> Execution:
    """Run ``nb`` in a fresh kernel whose cwd is ``sandbox``, behind the audit hook, within ``timeout`` seconds."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    run_nb = nbformat.v4.new_notebook(metadata=nb.metadata)
    hook = nbformat.v4.new_code_cell(hook_cell_source([str(sandbox)], str(log_path), "execution"))
    run_nb.cells = [hook] + [nbformat.from_dict(c) for c in nb.cells]
    result = Execution(status="completed",
                       code_cells=sum(c.cell_type == "code" and bool(c.source.strip()) for c in nb.cells))
    start = time.monotonic()
    deadline = start + timeout
    client = NotebookClient(run_nb, kernel_name="python3", allow_errors=True, interrupt_on_timeout=False,
                            shutdown_kernel="immediate", record_timing=False,
                            timeout_func=lambda cell: max(1.0, deadline - time.monotonic()),
                            resources={"metadata": {"path": str(sandbox)}})
    position = 0
    try:
        with open(log_path.parent / "kernel.log", "ab") as kernel_log, \
                client.setup_kernel(env=_sandbox_env(sandbox), stdout=kernel_log, stderr=kernel_log):
            client.execute_cell(hook, 0)
            if any(o.output_type == "error" for o in hook.outputs):
                result.status, result.message = "failed", "the grader could not install its sandbox in the kernel"
                return result
            for position, cell in enumerate(run_nb.cells[1:], start=1):
                if cell.cell_type != "code" or not cell.source.strip():
                    continue
                if time.monotonic() >= deadline:
                    result.status = "timeout"
                    result.message = (f"the time limit for the whole notebook ({timeout:g} s) ran out before cell "
                                      f"{position}; it and later cells were not run")
                    break
                client.execute_cell(cell, position)
                result.cells_run += 1
                if "raises-exception" in cell.metadata.get("tags", []):
                    continue  # the author marked this cell as meant to raise
                for out in cell.outputs:
                    if out.output_type == "error":
                        result.errors.append(CellError(position, cell.get("id", ""), _first_line(cell.source),
                                                       out.ename, _clip(out.evalue)))
    except CellTimeoutError:
        result.status = "timeout"
        result.message = (f"cell {position} `{_first_line(run_nb.cells[position].source)}` was still running when the "
                          f"time limit for the whole notebook ({timeout:g} s) ran out; later cells were not run")
    except DeadKernelError:
        result.status = "kernel_died"
        result.message = f"the kernel died while running cell {position}; later cells were not run"
    except Exception as err:  # a kernel that cannot start, a notebook nbclient cannot handle
        result.status = "failed"
        result.message = f"could not run the notebook: {type(err).__name__}: {_one_line(str(err))}"
    finally:
        result.seconds = round(time.monotonic() - start, 3)
    return result


# --- the check process -----------------------------------------------------------------------------------

def _describe(err: BaseException, notebook_file: str) -> tuple[str, str, str]:
    """(status, message, location) for an exception raised by a check."""
    frames = traceback.extract_tb(err.__traceback__)
    in_notebook = [f for f in frames if f.filename == notebook_file]
    location = in_notebook[-1].name if in_notebook else ""
    if isinstance(err, NotImplementedError):
        return "not_implemented", str(err) or "NotImplementedError", location
    if isinstance(err, AssertionError):
        message = str(err)
        if not message:
            last = frames[-1] if frames else None
            message = f"assertion failed: {last.line}" if last is not None and last.line else "assertion failed"
        return "failed", _clip(message), ""
    return "error", _clip(f"{type(err).__name__}: {err}"), location


def _worker_main(argv: list[str]) -> int:
    """The check process: ``python -m minigpt.grader SPEC_JSON``; one JSON line per event on stdout."""
    spec = json.loads(argv[0])
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # whatever the notebook prints goes to stderr, not into the protocol
    sys.stdout = sys.stderr

    def emit(**event) -> None:
        protocol.write(json.dumps(event) + "\n")
        protocol.flush()

    from minigpt.checks import checks_for
    from minigpt.notebooks import import_notebook

    checks = {c.name: c for c in checks_for(spec["chapter"])}
    exec(hook_cell_source([spec["sandbox"]], spec["log"], "checks"), {})  # noqa: S102 - our own hook source
    submission = spec["submission"]
    emit(event="importing")
    try:
        import_notebook(submission, name="submission")
    except BaseException as err:  # noqa: BLE001 - a student's import can raise anything, SystemExit included
        status, message, location = _describe(err, submission)
        emit(event="import_error", status=status, message=message, location=location)
        return 0
    for name in spec["names"]:
        emit(event="start", name=name)
        start = time.perf_counter()
        try:
            checks[name].run(import_notebook(submission, name="submission"))  # fresh module per check, as in tests
            status, message, location = "passed", "", ""
        except BaseException as err:  # noqa: BLE001
            status, message, location = _describe(err, submission)
        emit(event="result", name=name, status=status, message=message, location=location,
             seconds=round(time.perf_counter() - start, 3))
    return 0


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group we created with start_new_session=True
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_checks(submission: Path, chapter: str, results: list[CheckResult], sandbox: Path, log_path: Path,
               check_timeout: float) -> list[str]:
    """Fill ``results`` by running the checks in a separate process; returns notebook-level problems.

    A check that runs past ``check_timeout`` (or kills its process) is recorded and the process is
    restarted for the remaining checks.
    """
    problems: list[str] = []
    by_name = {r.name: r for r in results}
    remaining = [r.name for r in results]
    env = _sandbox_env(sandbox)
    while remaining:
        spec = {"chapter": chapter, "names": remaining, "submission": str(submission), "sandbox": str(sandbox),
                "log": str(log_path)}
        with open(sandbox.parent / "checks.stderr", "ab") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "minigpt.grader", json.dumps(spec)], cwd=sandbox, env=env,
                                    stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
        current: str | None = None
        importing = False
        deadline = time.monotonic() + STARTUP_ALLOWANCE + check_timeout
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        buffer = b""
        finished = False
        try:
            while not finished:
                wait = deadline - time.monotonic()
                if wait <= 0 or not selector.select(timeout=wait):
                    _kill(proc)
                    if current is not None:
                        by_name[current].status = "timeout"
                        by_name[current].message = f"the check did not finish within {check_timeout:g} s"
                        by_name[current].seconds = check_timeout
                        remaining.remove(current)
                    else:
                        what = "importing the notebook's definitions" if importing else "starting the check process"
                        problems.append(f"{what} did not finish within the time limit")
                        for name in remaining:
                            by_name[name].status = "timeout"
                            by_name[name].message = f"{what} did not finish within the time limit"
                        remaining.clear()
                    break
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:  # the process ended
                    code = proc.wait()
                    if current is not None:
                        by_name[current].status = "error"
                        by_name[current].message = f"the check ended the grading process (exit status {code})"
                        remaining.remove(current)
                    elif remaining:
                        problems.append(f"the check process ended early (exit status {code})")
                        for name in remaining:
                            by_name[name].status = "error"
                            by_name[name].message = f"the check process ended early (exit status {code})"
                        remaining.clear()
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    event = json.loads(line)
                    kind = event["event"]
                    if kind == "importing":
                        importing, deadline = True, time.monotonic() + check_timeout
                    elif kind == "import_error":
                        where = f" (in {event['location']})" if event["location"] else ""
                        problems.append(f"the notebook's definitions could not be imported{where}: "
                                        f"{_one_line(event['message'])}")
                        for name in remaining:
                            by_name[name].status = event["status"] if event["status"] == "not_implemented" else "error"
                            by_name[name].message = event["message"]
                            by_name[name].location = event["location"]
                        remaining.clear()
                    elif kind == "start":
                        importing, current = False, event["name"]
                        deadline = time.monotonic() + check_timeout
                    elif kind == "result":
                        result = by_name[event["name"]]
                        result.status, result.message = event["status"], event["message"]
                        result.location, result.seconds = event["location"], event["seconds"]
                        result.points = result.possible if result.status == "passed" else 0
                        remaining.remove(event["name"])
                        current = None
                if not remaining:
                    finished = True
        finally:
            selector.close()
            proc.stdout.close()
            if proc.poll() is None:
                _kill(proc)
    return problems


def _read_refusals(log_path: Path) -> list[Refusal]:
    if not log_path.exists():
        return []
    refusals = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            refusals.append(Refusal(**json.loads(line)))
        except (ValueError, TypeError):
            continue
    return refusals


def grade_notebook(path: Path | str, chapter: str | int | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                   check_timeout: float = DEFAULT_CHECK_TIMEOUT, keep_sandbox: bool = False) -> GradeReport:
    """Grade a student's notebook: run it sandboxed, then run the chapter's checks on its definitions.

    Raises FileNotFoundError for a missing file and ValueError for an unknown chapter or bad limits; every
    problem with the notebook itself (not JSON, crashes, loops, refused operations) ends up in the report.
    """
    from minigpt.checks import checks_for
    from minigpt.classroom import normalise_chapter

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"notebook not found: {path}")
    if timeout <= 0 or check_timeout <= 0:
        raise ValueError(f"timeout and check_timeout must be positive numbers of seconds, got {timeout} and "
                         f"{check_timeout}")
    chapter = normalise_chapter(chapter) if chapter is not None else infer_chapter(path)
    checks = checks_for(chapter)
    if not checks:
        raise ValueError(f"chapter {chapter} has no checks yet (minigpt/checks/ch{chapter}.py)")
    results = [CheckResult(c.name, c.description, c.points) for c in checks]
    report = GradeReport(str(path), chapter, results, Execution())

    workdir = Path(tempfile.mkdtemp(prefix="minigpt-grade-"))
    sandbox, log_path, submission = workdir / "sandbox", workdir / "refused.jsonl", workdir / "submission.ipynb"
    sandbox.mkdir()
    try:
        data = path.read_bytes()
        submission.write_bytes(data)  # outside the sandbox: the notebook cannot change what gets graded
        (sandbox / path.name).write_bytes(data)
        try:
            nb = nbformat.reads(data.decode("utf-8"), as_version=4)
        except Exception as err:  # noqa: BLE001 - not UTF-8, not JSON, not a notebook
            reason = ("not UTF-8 text" if isinstance(err, UnicodeDecodeError) else
                      "not valid JSON" if isinstance(err, NotJSONError) else "not a notebook")
            report.problems.append(f"the file is {reason} ({type(err).__name__}: {_one_line(str(err))}); "
                                   "nothing was run")
            report.execution.message = "the notebook could not be read"
            for r in results:
                r.message = "the notebook could not be read"
            return report
        report.execution = execute_in_sandbox(nb, sandbox, log_path, timeout)
        report.problems += run_checks(submission, chapter, results, sandbox, log_path, check_timeout)
        report.refused = _read_refusals(log_path)
        return report
    finally:
        if keep_sandbox:
            report.sandbox = str(workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
