"""Classroom mode: student versions of the chapter notebooks, and the command lines for them and the
grader.

A chapter marks what a student writes (conventions: exercise answers and core implementations such
as ``LoRALayer.forward``, Hu et al. 2021, arXiv:2106.09685, eq. 3)::

    def exercise_2_compression_ratio(d, k, r):
        # BEGIN SOLUTION hint: divide d*k by r*(d + k)
        return d * k / (r * (d + k))
        # END SOLUTION

and :func:`make_student_notebook` turns the lines between the markers into ``raise
NotImplementedError("divide d*k by r*(d + k)")`` at the markers' indentation. Markdown between
``<!-- BEGIN SOLUTION -->`` and ``<!-- END SOLUTION -->`` becomes ``*Your answer here.*``. Outputs,
execution counts and execution timestamps are cleared; every other byte of the notebook is kept.

Grading lives in :mod:`minigpt.classroom.grader` (imported only inside :func:`grade_main`, so
imports flow checks -> grader -> classroom); the checks it runs live only in
:mod:`minigpt.classroom.checks`.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

from minigpt.course.chapters import (
    CHAPTERS_DIR,
    chapter_paths,
    normalise_chapter,  # noqa: F401 - re-exported; the parser lives in minigpt.course.chapters
    parse_chapters,
    read_notebook,
)
from minigpt.io import atomic_write_bytes

DEFAULT_HINT = "write your solution here"


ANSWER_PLACEHOLDER = "*Your answer here.*"


_CODE_MARKER = re.compile(r"^(?P<indent>[ \t]*)# (?P<kind>BEGIN|END) SOLUTION\b(?P<rest>.*)$")


_MARKDOWN_MARKER = re.compile(r"<!--\s*(?P<kind>BEGIN|END) SOLUTION\s*-->")


class SolutionMarkerError(ValueError):
    """Solution markers that do not pair up (the message names the notebook, the cell and the
    line)."""


@dataclass(frozen=True)
class StudentVersion:
    """What :func:`write_student_notebooks` wrote for one chapter."""

    source: Path
    path: Path
    code_stubs: int
    answers_removed: int


def _python_string(text: str) -> str:
    """A double-quoted Python literal for ``text`` (JSON string syntax is valid Python for one
    line)."""
    literal = json.dumps(text, ensure_ascii=False)
    try:
        if ast.literal_eval(literal) == text:
            return literal
    except (ValueError, SyntaxError):
        pass
    return repr(text)


def _stub_code(source: str, where: str) -> tuple[str, int, list[str]]:
    """Replace every marked block of a code cell; returns (new source, number of stubs, hints)."""
    out: list[str] = []
    hints: list[str] = []
    open_marker: tuple[int, str, str] | None = None  # (line number, indent, hint)
    for number, line in enumerate(source.splitlines(keepends=True), start=1):
        match = _CODE_MARKER.match(line.rstrip("\r\n"))
        if match is None:
            if open_marker is None:
                out.append(line)
            continue
        indent, kind, rest = match["indent"], match["kind"], match["rest"].strip()
        if kind == "BEGIN":
            if open_marker is not None:
                raise SolutionMarkerError(
                    f"{where}, line {number}: '# BEGIN SOLUTION' inside the block opened on "
                    f"line {open_marker[0]}; close it with '# END SOLUTION' first"
                )
            if rest and not rest.startswith("hint:"):
                raise SolutionMarkerError(
                    f"{where}, line {number}: expected '# BEGIN SOLUTION' or "
                    f"'# BEGIN SOLUTION hint: TEXT', got {line.strip()!r}"
                )
            hint = rest.removeprefix("hint:").strip() or DEFAULT_HINT
            open_marker = (number, indent, hint)
        else:
            if open_marker is None:
                raise SolutionMarkerError(
                    f"{where}, line {number}: '# END SOLUTION' without a '# BEGIN SOLUTION' "
                    "before it"
                )
            if rest:
                raise SolutionMarkerError(
                    f"{where}, line {number}: expected '# END SOLUTION' alone on its line, "
                    f"got {line.strip()!r}"
                )
            begin_line, begin_indent, hint = open_marker
            if indent != begin_indent:
                raise SolutionMarkerError(
                    f"{where}, line {number}: '# END SOLUTION' is indented {indent!r} but its "
                    f"'# BEGIN SOLUTION' on line {begin_line} is indented {begin_indent!r}; "
                    "both markers must have the same indentation"
                )
            newline = "\n" if line.endswith("\n") else ""
            out.append(f"{indent}raise NotImplementedError({_python_string(hint)}){newline}")
            hints.append(hint)
            open_marker = None
    if open_marker is not None:
        raise SolutionMarkerError(
            f"{where}, line {open_marker[0]}: '# BEGIN SOLUTION' is never closed by "
            "'# END SOLUTION'"
        )
    return "".join(out), len(hints), hints


def _remove_answers(source: str, where: str) -> tuple[str, int]:
    """Replace every ``<!-- BEGIN SOLUTION -->`` ... ``<!-- END SOLUTION -->`` block of a Markdown
    cell."""
    out: list[str] = []
    removed = 0
    begin_line: int | None = None
    for number, line in enumerate(source.splitlines(keepends=True), start=1):
        match = _MARKDOWN_MARKER.search(line)
        if match is None:
            if begin_line is None:
                out.append(line)
            continue
        if line.strip() != match.group(0):
            raise SolutionMarkerError(
                f"{where}, line {number}: put {match.group(0)!r} on a line of its own"
            )
        if match["kind"] == "BEGIN":
            if begin_line is not None:
                raise SolutionMarkerError(
                    f"{where}, line {number}: '<!-- BEGIN SOLUTION -->' inside the block "
                    f"opened on line {begin_line}"
                )
            begin_line = number
        else:
            if begin_line is None:
                raise SolutionMarkerError(
                    f"{where}, line {number}: '<!-- END SOLUTION -->' without a "
                    "'<!-- BEGIN SOLUTION -->' before it"
                )
            out.append(ANSWER_PLACEHOLDER + ("\n" if line.endswith("\n") else ""))
            removed += 1
            begin_line = None
    if begin_line is not None:
        raise SolutionMarkerError(
            f"{where}, line {begin_line}: '<!-- BEGIN SOLUTION -->' is never closed by "
            "'<!-- END SOLUTION -->'"
        )
    return "".join(out), removed


def _student_version(
    nb: nbformat.NotebookNode, name: str
) -> tuple[nbformat.NotebookNode, int, int]:
    student = copy.deepcopy(nb)
    stubs = answers = 0
    for number, cell in enumerate(student.cells, start=1):
        where = f"{name}, cell {number} ({cell.cell_type})"
        if cell.cell_type == "code":
            cell.source, count, _ = _stub_code(cell.source, where)
            stubs += count
            cell.outputs = []
            cell.execution_count = None
        elif cell.cell_type == "markdown":
            cell.source, count = _remove_answers(cell.source, where)
            answers += count
        # nbclient's timestamps belong to the run, like the outputs
        cell.metadata.pop("execution", None)
    return student, stubs, answers


def make_student_notebook(
    nb: nbformat.NotebookNode, name: str = "notebook"
) -> nbformat.NotebookNode:
    """The student version of a chapter notebook (a new object; ``nb`` is not modified).

    Code between ``# BEGIN SOLUTION hint: TEXT`` and ``# END SOLUTION`` (same indentation) becomes
    ``raise NotImplementedError("TEXT")`` (``DEFAULT_HINT`` without a hint); Markdown between ``<!--
    BEGIN SOLUTION -->`` and ``<!-- END SOLUTION -->`` becomes ``*Your answer here.*``; outputs,
    execution counts and execution timestamps are cleared. Raises :class:`SolutionMarkerError` (a
    ValueError naming ``name``, the cell and the line) when the markers do not pair up.
    """
    if not isinstance(nb, nbformat.NotebookNode) or "cells" not in nb:
        raise TypeError(f"nb must be an nbformat.NotebookNode with cells, got {type(nb).__name__}")
    return _student_version(nb, name)[0]


def notebook_bytes(nb: nbformat.NotebookNode) -> bytes:
    """The notebook as nbformat writes it (sorted keys, one-space indent) plus a final newline."""
    text = nbformat.writes(nb, version=4)
    return (text if text.endswith("\n") else text + "\n").encode("utf-8")


def write_student_notebooks(
    out_dir: Path | str, chapters: list[str] | None = None, chapters_dir: Path | str = CHAPTERS_DIR
) -> list[StudentVersion]:
    """Write the student version of every chapter (or of ``chapters``) into ``out_dir``, atomically.

    Every notebook is converted before anything is written, so a marker error leaves ``out_dir``
    untouched.
    """
    out_dir, chapters_dir = Path(out_dir), Path(chapters_dir)
    if out_dir.resolve() == chapters_dir.resolve():
        raise ValueError(
            f"out_dir must not be the chapters folder {chapters_dir} (it would overwrite the "
            "solutions)"
        )
    paths = chapter_paths(chapters_dir)
    if chapters is not None:
        wanted = parse_chapters(chapters) or []
        available = [p.name[:2] for p in paths]
        missing = [c for c in wanted if c not in available]
        if missing:
            raise ValueError(
                f"chapters must be among the existing chapters {', '.join(available) or '(none)'}, "
                f"got {', '.join(missing)}"
            )
        paths = [p for p in paths if p.name[:2] in wanted]
    converted = []
    for path in paths:
        student, stubs, answers = _student_version(read_notebook(path), path.name)
        converted.append((path, notebook_bytes(student), stubs, answers))
    written = []
    for path, data, stubs, answers in converted:
        atomic_write_bytes(out_dir / path.name, data)
        written.append(StudentVersion(path, out_dir / path.name, stubs, answers))
    return written


def student_notebooks_main(argv: list[str]) -> int:
    """``python -m minigpt student-notebooks OUT_DIR [--chapters 01 06]``."""
    from minigpt._cli import make_parser

    parser = make_parser(
        "python -m minigpt student-notebooks",
        "Write student versions of the chapter notebooks: solutions replaced by stubs that raise "
        "NotImplementedError with a hint, solution text removed, outputs cleared.",
        "python -m minigpt student-notebooks handout/ --chapters 01 06",
    )
    parser.add_argument(
        "out_dir", help="folder for the student notebooks (not the chapters folder)"
    )
    parser.add_argument(
        "--chapters", nargs="+", metavar="N", help="chapter numbers, e.g. 01 06 (default: all)"
    )
    args = parser.parse_args(argv)
    try:
        written = write_student_notebooks(args.out_dir, args.chapters)
    except ValueError as err:  # SolutionMarkerError included
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not written:
        print("no chapter notebooks found", file=sys.stderr)
        return 2
    for version in written:
        print(
            f"{version.source.name}: {version.code_stubs} code stubs, {version.answers_removed} "
            "answers removed "
            f"-> {version.path}"
        )
    return 0


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (where it has one to show), and the epilog's examples
    kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS)
        if shown and action.option_strings and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


GRADE_EPILOG = """examples:
  python -m minigpt grade 06_lora.ipynb
  python -m minigpt grade class/ --chapter 6 --jobs 2 --gradebook grades.csv
  python -m minigpt grade submission/06_lora.ipynb --gradescope /autograder/results/results.json

exit status: 0 when every submission earned all its points, ran to its end and nothing was
refused; 1 when one was graded but lost points, crashed, looped or was not a notebook; 2 when
one could not be graded at all (missing file, symbolic link, unknown chapter, bad limits,
isolation unavailable)."""


def grade_main(argv: list[str]) -> int:
    """``python -m minigpt grade PATH... [--chapter N] [--jobs N] [--gradebook CSV]
    [--gradescope JSON] [--json] [--isolation auto|bwrap|none] [--timeout S] [--check-timeout S]
    [--checks-timeout S]``: exit status 0, 1 or 2 as the epilog says (the highest over all
    submissions)."""
    from minigpt.classroom.gradebook import (
        find_submissions,
        grade_all,
        grade_one,
        progress_line,
        write_gradebook,
        write_gradescope,
    )
    from minigpt.classroom.grader import (
        DEFAULT_CHECK_TIMEOUT,
        DEFAULT_CHECKS_TIMEOUT,
        DEFAULT_TIMEOUT,
    )
    from minigpt.classroom.sandbox import ISOLATION_LEVELS

    parser = argparse.ArgumentParser(
        prog="python -m minigpt grade",
        description="Grade students' notebooks: run each in an isolated worker (smoke mode, time "
        "limit), then run the chapter's checks in this process against the functions it defines, "
        "served by a second worker. Files and folders of submissions; several are graded in "
        "parallel, each in its own sandbox.",
        epilog=GRADE_EPILOG,
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help=".ipynb files or folders of them")
    parser.add_argument(
        "--chapter",
        help="chapter number, e.g. 6 or 06 (default: from each file name, NN_name.ipynb)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the report as JSON (a list for several)"
    )
    parser.add_argument(
        "--isolation",
        choices=ISOLATION_LEVELS,
        default="auto",
        help="bwrap: bubblewrap sandbox (read-only system, private folder, no network); none: "
        "audit hook only, not isolated; auto: bwrap when it works here, else none",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds for running one whole notebook",
    )
    parser.add_argument(
        "--check-timeout", type=float, default=DEFAULT_CHECK_TIMEOUT, help="seconds for each check"
    )
    parser.add_argument(
        "--checks-timeout",
        type=float,
        default=DEFAULT_CHECKS_TIMEOUT,
        help="seconds for all the checks of one notebook together",
    )
    parser.add_argument("--jobs", type=int, default=1, help="submissions graded at the same time")
    parser.add_argument(
        "--gradebook", metavar="CSV", help="write one row per submission to this CSV file"
    )
    parser.add_argument(
        "--gradescope",
        metavar="JSON",
        help="write Gradescope's autograder results for the (single) submission to this file",
    )
    parser.add_argument(
        "--keep-sandbox", action="store_true", help="keep the sandbox folder and print its path"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    submissions = find_submissions(args.paths)
    if not submissions:
        print("error: no .ipynb files found", file=sys.stderr)
        return 2
    if args.gradescope and len(submissions) != 1:
        print(
            f"error: --gradescope writes one submission's results (Gradescope grades one student "
            f"per run), but {len(submissions)} were found",
            file=sys.stderr,
        )
        return 2
    options = {
        "chapter": args.chapter,
        "timeout": args.timeout,
        "check_timeout": args.check_timeout,
        "checks_timeout": args.checks_timeout,
        "isolation": args.isolation,
        "keep_sandbox": args.keep_sandbox,
    }
    if len(submissions) == 1:
        path, student = submissions[0]
        results = [grade_one(str(path), student, options)]
    else:
        results = grade_all(submissions, options, args.jobs, progress_line())
    if args.gradebook:
        write_gradebook(results, args.gradebook)
    if args.gradescope:
        write_gradescope(results[0], args.gradescope)
    for graded in results:
        if graded.report is None:
            print(f"error: {graded.path}: {graded.error}", file=sys.stderr)
    if args.json:
        reports = [g.report for g in results if g.report is not None]
        if len(submissions) == 1:
            if reports:
                print(json.dumps(reports[0], indent=2))
        else:
            print(json.dumps(reports, indent=2))
    elif len(submissions) == 1:
        if results[0].text:
            print(results[0].text)
    else:
        for graded in results:
            score = (
                f"{graded.report['points']}/{graded.report['possible']}"
                if graded.report
                else "not graded"
            )
            print(f"{graded.student}\t{graded.path}\t{score}\texit {graded.exit_status}")
    return max(g.exit_status for g in results)
