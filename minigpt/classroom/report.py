"""A grade as data: each check's result, how running the notebook went, and the report's text.

Everything in a report that came from the student's notebook (messages, cell sources, exception
names) is escaped to one line by :func:`escape`, so a submission cannot fake lines of the report.
"""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass, field

MESSAGE_LIMIT = 2000


STATUS_TEXT = {
    "passed": "passed",
    "failed": "failed",
    "not_implemented": "not implemented",
    "error": "error",
    "timeout": "timeout",
    "skipped": "not run",
    "borrowed": "borrowed",
}


ISOLATION_TEXT = {
    "bwrap": "isolated with bubblewrap: read-only system, private folder, no network, no GPU",
    "none": "NOT ISOLATED: audit hook only; grade untrusted work with --isolation bwrap",
}


@dataclass
class CheckResult:
    """One check of the chapter: status is passed, failed, not_implemented, error, timeout, borrowed
    or skipped."""

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
    """A cell that raised while the notebook ran (``cell`` counts all cells from 1, as they
    appear)."""

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
    """An operation the audit hook refused: the phase (execution or checks), the audit event and its
    target."""

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
        """All points, a notebook that ran to its end without an error, nothing refused: the
        condition for exit status 0."""
        return (
            self.points == self.possible
            and self.completed
            and not self.execution.errors
            and not self.refused
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(
            points=self.points, possible=self.possible, passed=self.passed, completed=self.completed
        )
        return data

    def format_text(self) -> str:
        """The report, one line per item; everything that came from the notebook is escaped to one
        line."""
        lines = [
            f"Grading {escape(self.notebook)} as chapter {self.chapter} (smoke mode)",
            f"Isolation: {self.isolation}, {ISOLATION_TEXT.get(self.isolation, '')}",
        ]
        lines += [f"Problem: {escape(p)}" for p in self.problems]
        lines += _execution_lines(self.execution)
        if self.refused:
            lines.append(
                f"Sandbox: refused {len(self.refused)} operation(s) outside the notebook's folder:"
            )
            lines += [
                f"  {escape(r.phase)}: {escape(r.event)} {escape(r.path)}" for r in self.refused
            ]
        lines.append("Checks:")
        for c in self.checks:
            lines.append(
                f"  {STATUS_TEXT[c.status]:<16}{c.points:>2}/{c.possible}  {c.name}: "
                f"{c.description}"
            )
            if c.message:
                prefix = {"not_implemented": "hint", "skipped": "not run"}.get(c.status, c.status)
                where = f" (in {escape(c.location, 80)})" if c.location else ""
                lines.append(f"      {prefix}{where}: {escape(c.message, MESSAGE_LIMIT)}")
        if not self.completed and self.execution.status != "not_run":
            lines.append("The notebook did not run to its end, so the grade exits with status 1.")
        elif self.execution.errors:
            cells = ", ".join(str(e.cell) for e in self.execution.errors[:10])
            lines.append(
                f"The notebook crashed in cell {cells} (an error no tag of the reference excuses), "
                "so the grade exits with status 1."
            )
        lines.append(f"Total: {self.points}/{self.possible} points.")
        if self.sandbox:
            lines.append(f"Sandbox kept at {self.sandbox}")
        return "\n".join(lines)


def _execution_lines(run: Execution) -> list[str]:
    if run.status == "not_run":
        return [f"Execution: not run. {escape(run.message)}".rstrip()]
    summary = (
        f"Execution: {run.status}, {run.cells_run} of {run.code_cells} code cells run in "
        f"{run.seconds:.1f} s"
    )
    lines = [summary + (f"; {len(run.errors)} raised:" if run.errors else "; none raised.")]
    if run.message:
        lines.append(f"  {escape(run.message)}")
    for err in run.errors:
        lines.append(
            f"  cell {err.cell} `{escape(err.first_line, 60)}`: {escape(err.ename, 80)}: "
            f"{escape(err.evalue, 200)}"
        )
    return lines


def escape(text: object, limit: int = 500) -> str:
    """``text`` on one line: newlines and every other control or separator character written as
    escapes."""
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


def clip(text: str) -> str:
    text = str(text)
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 20] + " ... (message cut)"
