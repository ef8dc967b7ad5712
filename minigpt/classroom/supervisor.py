"""Each submission is graded in its own supervised process, so that no notebook can take the grader
down with it.

:func:`grade_supervised` starts ``python -m minigpt.classroom.supervisor`` (with the current
folder off ``sys.path``, so that a ``minigpt`` folder where the grader is started cannot stand in
for the course package) in a new session, with a private folder this process made and a secret key
on its standard input. The child grades with :func:`minigpt.classroom.grader.grade_notebook` and
writes its result signed with the key. The workers that run the student's code are the child's
children, never this process's: a notebook that kills its parent (``os.kill(os.getppid(), …)``,
``signal.pidfd_send_signal``) kills only the child. This process then grades that submission zero
("the grading process was killed"), ends the worker process groups the child recorded and removes
the private folder.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minigpt.classroom.report import escape
from minigpt.classroom.sandbox import WORKERS_FILE, read_capped


@dataclass
class Graded:
    """One submission's outcome: the report as data (None when it could not be graded at all),
    the exit status (0 all points, 1 graded, 2 not gradable) and, for status 2, why."""

    path: str
    student: str
    report: dict | None
    exit_status: int
    error: str = ""
    text: str = ""
    checks: list[dict] = field(default_factory=list)


# the child's command: the current folder off sys.path before anything is imported
CHILD = "import sys; del sys.path[0]; from minigpt.classroom.supervisor import main; main()"


def _allowance(options: dict) -> float:
    """The longest a grading child may take: both phases, their startups and a margin."""
    from minigpt.classroom.grader import (
        DEFAULT_CHECKS_TIMEOUT,
        DEFAULT_TIMEOUT,
        STARTUP_ALLOWANCE,
    )

    seconds = 0.0
    for name, default in (("timeout", DEFAULT_TIMEOUT), ("checks_timeout", DEFAULT_CHECKS_TIMEOUT)):
        try:
            value = float(options.get(name) or default)
        except (TypeError, ValueError):
            value = default
        # a limit that is not finite and positive is refused by the child (exit status 2)
        seconds += value if math.isfinite(value) and value > 0 else default
    return seconds + 4 * STARTUP_ALLOWANCE + 120


def _sign(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).hexdigest().encode()


def grade_supervised(path: str, student: str, options: dict):
    """Grade one submission in a child process; a :class:`Graded`, never an exception."""
    key = secrets.token_bytes(32)
    workdir = Path(tempfile.mkdtemp(prefix="minigpt-grade-")).resolve()
    request = {"path": path, "student": student, "options": options, "workdir": str(workdir)}
    finished = False
    try:  # whatever happens here, the private folder is removed and the workers are ended
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(request)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(key, timeout=_allowance(options))
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)  # not yet reaped: the group is still the child's
            proc.communicate()
            return _killed(
                path, student, options, "the grading process did not finish in time and was stopped"
            )
        signature, _, body = out.partition(b"\n")
        try:
            if not hmac.compare_digest(signature, _sign(key, body)):
                raise ValueError
            graded = Graded(**json.loads(body))
        except (ValueError, TypeError, RecursionError):
            why = (
                f"the grading process was killed (signal {-proc.returncode})"
                if proc.returncode < 0
                else f"the grading process ended without a result (exit status {proc.returncode})"
            )
            return _killed(path, student, options, why)
        finished = True  # the child ended and reaped its workers itself
        return graded
    finally:
        if not finished:  # the child died first: end the workers it left (their own sessions)
            for line in _read_small(workdir / WORKERS_FILE).split():
                if line.isdigit():
                    _kill_group(int(line))
        if not options.get("keep_sandbox"):
            shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def _read_small(path: Path) -> str:
    return read_capped(path, 2**16).decode(errors="replace")


def _killed(path: str, student: str, options: dict, why: str):
    """A submission whose grading process died: zero points, every check says why."""
    from minigpt.classroom.checks import checks_for
    from minigpt.classroom.inputs import infer_chapter
    from minigpt.classroom.report import CheckResult, Execution, GradeReport
    from minigpt.course.chapters import normalise_chapter

    chapter = options.get("chapter")
    try:
        chapter = normalise_chapter(chapter) if chapter is not None else infer_chapter(path)
        checks = checks_for(chapter)
    except ValueError:
        return Graded(path, student, None, 2, why)
    message = f"{why}; the notebook was not graded"
    results = [
        CheckResult(c.name, c.description, c.points, status="error", message=message)
        for c in checks
    ]
    isolation = str(options.get("isolation", ""))
    report = GradeReport(str(path), chapter, results, Execution("failed", message), isolation)
    report.problems.append(message)
    return Graded(path, student, report.to_dict(), 1, text=report.format_text())


def grade_in_process(path: str, student: str, options: dict, workdir: Path | None = None):
    """Grade one submission here (the child's work); never raises (a problem that stops grading is
    exit status 2)."""
    from minigpt.classroom.grader import grade_notebook

    try:
        report = grade_notebook(path, workdir=workdir, **options)
    except (FileNotFoundError, ValueError) as err:
        return Graded(path, student, None, 2, escape(err, 500))
    except Exception as err:  # noqa: BLE001 - one line for the class's table, never a traceback
        return Graded(path, student, None, 2, f"the grader failed: {type(err).__name__}: {err}")
    data = report.to_dict()
    return Graded(path, student, data, 0 if report.passed else 1, text=report.format_text())


def main() -> None:
    """The child: read the key, grade, write the signed result on stdout."""
    key = sys.stdin.buffer.read(32)
    request = json.loads(sys.argv[1])
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed while grading goes to stderr, never into the result
    graded = grade_in_process(
        request["path"], request["student"], request["options"], Path(request["workdir"])
    )
    body = json.dumps(asdict(graded)).encode()
    out.write(_sign(key, body) + b"\n" + body)
    out.flush()
    os._exit(0)
