"""The autograder's trusted side: every check runs here, on answers that are plain data.

Grading one notebook (:func:`grade_notebook`):

1. **Read the submission** (:mod:`minigpt.classroom.inputs`): symbolic links are refused, the
   notebook is validated against nbformat's schema; copy its folder (no other notebook) into two
   fresh private folders (one to run the notebook in, one for the checks).
2. **Run the notebook** in an untrusted worker (:mod:`minigpt.classroom.worker`, ``execute``) at
   the chosen isolation level (:mod:`minigpt.classroom.sandbox`), smoke mode. How it went is
   decided here from what this process observes: its own timer (it kills the worker at the time
   limit), the worker's exit status, and the size of the sandbox folder. The worker's report only
   adds details (which cells raised). A notebook that crashes, dies or runs out of time is still
   graded on what it defines, but the grade exits 1 and says why.
3. **Run the checks here**, one after the other, each on a fresh import of the notebook's
   definitions in a second worker (``serve``). A check talks to the notebook through
   :class:`minigpt.classroom.remote.RemoteProxy`: arguments leave as copies, results come back as
   plain data or as handles, so its inputs, reference objects and random state are its own. Each
   check has a deadline fixed here when it starts, and the whole phase has one; a worker that
   misses one, sends a malformed answer or dies is killed, the check is graded with a one-line
   reason, and a fresh worker serves the next check. A graded function that was not defined in the
   submitted notebook (imported from ``minigpt`` or from another notebook) scores zero.
4. **Report** (:mod:`minigpt.classroom.report`): everything from the notebook is escaped to one
   line; the total is written only here.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from minigpt.classroom.checks import Check, checks_for
from minigpt.classroom.inputs import (
    NOTEBOOK_LIMIT,
    NotANotebook,
    check_limit,
    copy_folder,
    excused_cells,
    graded_names,
    infer_chapter,
    read_notebook_bytes,
    refuse_links,
    top_level_names,
)
from minigpt.classroom.remote import Remote, dumps
from minigpt.classroom.report import (
    CellError,
    CheckResult,
    Execution,
    GradeReport,
    Refusal,
    clip,
    escape,
)
from minigpt.classroom.sandbox import (
    FOLDER_LIMIT,
    REFUSALS_FILE,
    WORKERS_FILE,
    Limits,
    checkout_copies,
    folder_size,
    kill_worker,
    read_refusals,
    resolve_isolation,
    spawn_worker,
)
from minigpt.classroom.wire import HEADER, Channel, ChannelError, CheckTimeout, parse_answer
from minigpt.classroom.worker import EXIT_STATUS
from minigpt.course.chapters import CHAPTERS_DIR, normalise_chapter

DEFAULT_TIMEOUT = 600.0


DEFAULT_CHECK_TIMEOUT = 120.0


DEFAULT_CHECKS_TIMEOUT = 900.0  # all the checks of one notebook together


STARTUP_ALLOWANCE = 60.0  # seconds for a worker to start Python and import torch/numpy


REPORT_LIMIT = 2**20  # the most of an execution worker's output the grader keeps


WORKER_LOG = ".minigpt-worker.log"  # a worker's stderr (the notebook's prints), in its sandbox


def _worker_limits(wall_seconds: float) -> Limits:
    return Limits(cpu_seconds=int(wall_seconds * max(1, os.cpu_count() or 1)) + 60)


def _spawn(mode: str, spec: dict, sandbox: Path, isolation: str, seconds: float, requests: bool):
    with open(sandbox / WORKER_LOG, "ab") as stderr:  # inside the sandbox: the worker may write
        proc = spawn_worker(
            [mode, json.dumps(spec)],
            isolation=isolation,
            sandbox=sandbox,
            limits=_worker_limits(seconds),
            stderr=stderr,
            hidden=[CHAPTERS_DIR, *checkout_copies()],
            requests=requests,
        )
    # the supervisor ends these process groups if this process dies before it can
    with open(sandbox.parent / WORKERS_FILE, "a", encoding="utf-8") as pids:
        pids.write(f"{proc.pid}\n")
    return proc


def run_notebook(
    notebook_name: str,
    sandbox: Path,
    timeout: float,
    isolation: str,
    excused: list[str] = (),
) -> Execution:
    """Run the notebook in a worker; the verdict comes from this process's timer, the worker's exit
    status and the sandbox folder's size, never from what the worker writes."""
    spec = {
        "sandbox": str(sandbox),
        "notebook": notebook_name,
        "timeout": timeout,
        "log": str(sandbox / REFUSALS_FILE),
        "excused_cells": list(excused),
    }
    start = time.monotonic()
    deadline = start + timeout + STARTUP_ALLOWANCE
    proc = _spawn("execute", spec, sandbox, isolation, timeout + STARTUP_ALLOWANCE, False)
    output, stopped = bytearray(), ""
    next_size_check = start
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            open_pipe, exited_by = True, None
            while proc.poll() is None or open_pipe:
                now = time.monotonic()
                if proc.returncode is not None:
                    # a process the notebook left behind may hold the pipe open: stop reading soon
                    exited_by = exited_by or now + 2.0
                    if now >= exited_by:
                        break
                if now >= deadline:
                    stopped = "timeout"
                    break
                if now >= next_size_check:
                    next_size_check = now + 0.5
                    if folder_size(sandbox, FOLDER_LIMIT) > FOLDER_LIMIT:
                        stopped = "folder"
                        break
                if open_pipe and selector.select(timeout=min(0.25, deadline - now)):
                    chunk = os.read(proc.stdout.fileno(), 1 << 16)
                    if not chunk:
                        open_pipe = False
                        selector.unregister(proc.stdout)
                    elif len(output) < REPORT_LIMIT:
                        output += chunk[: REPORT_LIMIT - len(output)]
                elif not open_pipe:
                    time.sleep(0.05)
    finally:
        proc.stdout.close()
        kill_worker(proc)  # also when it exited: its group may hold leftovers it started
    seconds = round(time.monotonic() - start, 3)
    if stopped == "timeout":
        return Execution(
            "timeout",
            f"the notebook was still running when the time limit for the whole notebook "
            f"({timeout:g} s) ran out; it was stopped",
            seconds,
        )
    if stopped == "folder":
        return Execution(
            "failed",
            f"the notebook wrote more than {FOLDER_LIMIT // 2**20} MiB into its folder; it was "
            "stopped",
            seconds,
        )
    return _execution_from(proc.returncode, _last_report(bytes(output)), seconds)


def _last_report(data: bytes) -> dict:
    """The last well-formed ``execution`` frame in the worker's output (details only)."""
    found, position = {}, 0
    while position + HEADER.size <= len(data):
        (size,) = HEADER.unpack(data[position : position + HEADER.size])
        body = data[position + HEADER.size : position + HEADER.size + size]
        if len(body) < size:
            break
        position += HEADER.size + size
        try:
            event = parse_answer(body)
        except ChannelError:
            continue
        if event.get("event") == "execution":
            found = event
    return found


def _execution_from(returncode: int, event: dict, seconds: float) -> Execution:
    """How running the notebook went, from the worker's exit status; ``event`` adds details."""
    details = _details(event)
    if returncode in (EXIT_STATUS["completed"], EXIT_STATUS["raised"]):
        run = Execution("completed", "", seconds, details.cells_run, 0, [])
        if returncode == EXIT_STATUS["raised"]:
            run.errors = details.errors or [
                CellError(0, "", "", "", "a cell raised (the worker gave no details)")
            ]
        return run
    if returncode == EXIT_STATUS["kernel_died"]:
        status = "kernel_died"
    elif returncode == EXIT_STATUS["timeout"]:
        status = "timeout"
    else:
        status = "failed"
    message = details.message or (
        f"the notebook's process was killed by signal {-returncode}"
        if returncode < 0
        else f"the notebook's process ended with exit status {returncode}"
    )
    return Execution(status, message, seconds, details.cells_run, 0, details.errors)


def _details(event: dict) -> Execution:
    errors = []
    raw = event.get("errors")
    for err in raw[:100] if isinstance(raw, list) else []:
        if isinstance(err, dict):
            errors.append(
                CellError(
                    _int(err.get("cell")),
                    clip(err.get("cell_id", ""))[:80],
                    clip(err.get("first_line", ""))[:100],
                    clip(err.get("ename", ""))[:100],
                    clip(err.get("evalue", "")),
                )
            )
    return Execution(
        "completed", clip(event.get("message", "")), 0.0, _int(event.get("cells_run")), 0, errors
    )


def _int(value: object) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0


class _Worker:
    """A ``serve`` worker and the channel to it."""

    def __init__(self, spec: dict, sandbox: Path, isolation: str, seconds: float):
        self.proc = _spawn("serve", spec, sandbox, isolation, seconds, True)
        self.channel = Channel(self.proc)
        self.started = 0.0  # when Python had started and the import began

    def ready(self, seconds: float, end: float, fresh: bool, startup_end: float = 0.0) -> dict:
        """Wait for the notebook's import, which gets ``seconds`` (never past ``end``); a fresh
        worker first has until ``startup_end`` to start Python; ``fresh``: ask for a new import
        first. Every deadline is set here. The worker's event: ``ready`` or ``import_error``."""
        number = None
        if fresh:
            deadline = min(time.monotonic() + seconds, end)
            number = secrets.randbits(62)
            self.channel.send(dumps({"op": "reset", "id": number}), deadline)
        else:
            event = self.channel.receive(min(startup_end, end))
            if event.get("event") != "importing":
                raise ChannelError("the worker did not start as it should")
            self.started = time.monotonic()
            deadline = min(self.started + seconds, end)
        event = self.channel.receive(deadline)
        if event.get("event") not in ("ready", "import_error") or event.get("id") != number:
            raise ChannelError("the worker sent something else than its import's outcome")
        return event

    def close(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        kill_worker(self.proc)


@dataclass
class Outcome:
    """A check's result before points: status, message, location, seconds, names it fetched."""

    status: str
    message: str = ""
    location: str = ""
    seconds: float = 0.0
    fetched: dict = field(default_factory=dict)


def run_checks(
    submission: Path,
    checks: list[Check],
    sandbox: Path,
    check_timeout: float,
    checks_timeout: float,
    isolation: str,
) -> tuple[list[Outcome], list[str]]:
    """Run each check here against a fresh import of the notebook in a worker: (one outcome per
    check, problems)."""
    spec = {
        "submission": str(submission),
        "sandbox": str(sandbox),
        "log": str(sandbox / REFUSALS_FILE),
    }
    # the phase's deadline: checks_timeout from the moment the first worker has started Python
    phase_end = time.monotonic() + STARTUP_ALLOWANCE + checks_timeout
    started = False
    worker: _Worker | None = None
    outcomes: list[Outcome] = []
    problems: list[str] = []
    try:
        for check in checks:
            now = time.monotonic()
            if now >= phase_end:
                outcomes.append(
                    Outcome("timeout", f"the time for all checks ({checks_timeout:g} s) ran out")
                )
                continue
            fresh = worker is not None
            step = "starting the check process"
            try:
                if worker is None:
                    worker = _Worker(spec, sandbox, isolation, STARTUP_ALLOWANCE + checks_timeout)
                step = "importing the notebook's definitions"
                event = worker.ready(
                    check_timeout, phase_end, fresh, startup_end=now + STARTUP_ALLOWANCE
                )
                if not started:
                    started, phase_end = True, min(phase_end, worker.started + checks_timeout)
                if event["event"] == "import_error":
                    failure = _import_failure(event)
                    problems.append(failure.message)
                    outcomes += [failure] * (len(checks) - len(outcomes))
                    break
                step = "running the check"
                start = time.monotonic()
                remote = Remote(worker.channel, min(start + check_timeout, phase_end))
                outcome = run_one(check, remote)
                outcome.seconds = round(time.monotonic() - start, 3)
            except (CheckTimeout, ChannelError) as err:
                if isinstance(err, CheckTimeout):
                    outcome = Outcome("timeout", f"{step} did not finish within the time limit")
                    if time.monotonic() >= phase_end:
                        outcome.message = f"the time for all checks ({checks_timeout:g} s) ran out"
                    elif step == "running the check":
                        outcome.message = f"the check did not finish within {check_timeout:g} s"
                else:
                    outcome = Outcome("error", f"{step}: {escape(err, 300)}")
                if worker is not None:  # a worker that broke the protocol serves no further check
                    worker.close()
                    worker = None
                if step == "importing the notebook's definitions":
                    # the same import would stop every later check the same way
                    problems.append(outcome.message)
                    outcomes += [outcome] * (len(checks) - len(outcomes))
                    break
            outcomes.append(outcome)
            if folder_size(sandbox, FOLDER_LIMIT) > FOLDER_LIMIT:
                message = (
                    f"the notebook wrote more than {FOLDER_LIMIT // 2**20} MiB into its folder"
                )
                problems.append(message + "; the checks were stopped")
                outcomes += [Outcome("error", message)] * (len(checks) - len(outcomes))
                break
    finally:
        if worker is not None:
            worker.close()
    return outcomes, problems


def _import_failure(event: dict) -> Outcome:
    status = "not_implemented" if event.get("status") == "not_implemented" else "error"
    location = clip(event.get("location", ""))[:80]
    where = f" (in {escape(location, 80)})" if location else ""
    return Outcome(
        status,
        f"the notebook's definitions could not be imported{where}: "
        f"{escape(event.get('message', ''), 300)}",
        location,
    )


def run_one(check: Check, remote: Remote) -> Outcome:
    """One check, here, on the notebook's proxy: its verdict as an Outcome."""
    try:
        check.run(remote.root)
    except (ChannelError, KeyboardInterrupt):
        raise
    except NotImplementedError as err:
        return Outcome(
            "not_implemented",
            clip(str(err) or "NotImplementedError"),
            getattr(err, "remote_location", ""),
            fetched=remote.fetched,
        )
    except AssertionError as err:
        message = str(err)
        if not message:
            frames = traceback.extract_tb(err.__traceback__)
            line = frames[-1].line if frames else ""
            message = f"assertion failed: {line}" if line else "assertion failed"
        return Outcome("failed", clip(message), fetched=remote.fetched)
    except Exception as err:  # noqa: BLE001 - the student's errors, and answers the check cannot use
        name = getattr(err, "remote_name", type(err).__name__)
        return Outcome(
            "error",
            clip(f"{name}: {err}"),
            getattr(err, "remote_location", ""),
            fetched=remote.fetched,
        )
    return Outcome("passed", fetched=remote.fetched)


def borrowed(fetched: dict, graded: set[str], defined: set[str], imported: set[str]) -> str:
    """A message when a graded function the check used was not written in the submitted notebook.

    The evidence read here from the submitted source text (the name is imported, or never bound by a
    ``def``/``class``) decides on its own; the worker's report of where an object was defined can
    only add evidence, never remove it (a notebook can silence it)."""
    for name in fetched:
        if name in graded and (name not in defined or name in imported):
            return (
                f"{name} is not defined by a def/class in the submitted notebook (it is imported); "
                "write it yourself"
            )
    for name, origin in fetched.items():
        if name not in graded or not isinstance(origin, dict):
            continue
        if origin.get("in_notebook") is not True:
            where = escape(origin.get("module", "?"), 80)
            return (
                f"{name} was not defined in the submitted notebook (it comes from {where}); "
                "write it yourself"
            )
    return ""


def _read_submission(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(NOTEBOOK_LIMIT + 1)


def grade_notebook(
    path: Path | str,
    chapter: str | int | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    check_timeout: float = DEFAULT_CHECK_TIMEOUT,
    checks_timeout: float = DEFAULT_CHECKS_TIMEOUT,
    isolation: str = "auto",
    keep_sandbox: bool = False,
    workdir: Path | None = None,
) -> GradeReport:
    """Grade a student's notebook: run it in a worker, then run every check here against it.

    Raises FileNotFoundError for a missing file, SubmissionError (a ValueError) for a symbolic link,
    and ValueError for an unknown chapter, bad limits or an isolation level this machine cannot
    provide; every problem with the notebook itself (not a notebook, crashes, loops, refused
    operations, borrowed solutions, a broken protocol) ends up in the report.
    """
    path = refuse_links(path)
    if not path.is_file():
        raise FileNotFoundError(f"notebook not found: {path}")
    timeout = check_limit("timeout", timeout)
    check_timeout = check_limit("check_timeout", check_timeout)
    checks_timeout = check_limit("checks_timeout", checks_timeout)
    chapter = normalise_chapter(chapter) if chapter is not None else infer_chapter(path)
    checks = checks_for(chapter)
    if not checks:
        raise ValueError(f"chapter {chapter} has no checks yet")
    try:
        level = resolve_isolation(isolation)
    except RuntimeError as err:
        raise ValueError(str(err)) from None
    results = [CheckResult(c.name, c.description, c.points) for c in checks]
    report = GradeReport(str(path), chapter, results, Execution(), isolation=level)
    data = _read_submission(path)
    try:
        nb = read_notebook_bytes(data)
    except NotANotebook as err:
        report.problems.append(f"the file is {err}; nothing was run")
        report.execution.message = "the notebook could not be read"
        for r in results:
            r.message = "the notebook could not be read"
        return report
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="minigpt-grade-"))
    workdir = Path(workdir).resolve()
    try:
        run_dir, check_dir = workdir / "run", workdir / "checks"
        copy_folder(path.parent, run_dir, data, path.name)
        report.execution = run_notebook(path.name, run_dir, timeout, level, excused_cells(chapter))
        report.execution.code_cells = sum(
            c.cell_type == "code" and bool(c.source.strip()) for c in nb.cells
        )
        copy_folder(path.parent, check_dir, data, "submission.ipynb")
        outcomes, problems = run_checks(
            check_dir / "submission.ipynb", checks, check_dir, check_timeout, checks_timeout, level
        )
        report.problems += problems
        _fill_results(report, outcomes, nb)
        report.refused = [
            Refusal(**r)
            for r in read_refusals(run_dir / REFUSALS_FILE)
            + read_refusals(check_dir / REFUSALS_FILE)
        ]
        return report
    finally:
        if keep_sandbox:
            report.sandbox = str(workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _fill_results(report: GradeReport, outcomes: list[Outcome], nb) -> None:
    graded = graded_names(report.chapter)
    defined, imported = top_level_names(nb)
    for result, outcome in zip(report.checks, outcomes, strict=True):
        status, message = outcome.status, outcome.message
        taken = borrowed(outcome.fetched, graded, defined, imported)
        if taken:
            status, message = "borrowed", taken
        result.status, result.message = status, message
        result.location, result.seconds = outcome.location, outcome.seconds
        result.points = result.possible if status == "passed" else 0
