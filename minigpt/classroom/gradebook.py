"""A whole class at once: submissions found in files and folders, graded in parallel, written to a
gradebook (CSV, one row per submission) and to Gradescope's autograder results format.

Each submission is graded by :func:`minigpt.classroom.grader.grade_notebook` in its own supervised
process (:mod:`minigpt.classroom.supervisor`; its own sandbox and workers): the checks seed the
grader's random number generators, so two gradings never share one process, and a notebook that
kills its grading process costs only its own row.
"""

from __future__ import annotations

import csv
import json
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from minigpt.classroom.report import escape
from minigpt.classroom.supervisor import Graded, grade_supervised

SKIPPED_FOLDERS = (".ipynb_checkpoints", "__pycache__", ".git")

__all__ = ["Graded", "find_submissions", "grade_all", "grade_one", "write_gradebook"]


def find_submissions(paths: list[str | Path]) -> list[tuple[Path, str]]:
    """(notebook, student) for every ``.ipynb`` given or found under a given folder, in order.

    The student is the first folder under the given folder (``class/alice/06_lora.ipynb`` ->
    ``alice``), else the file's name (``class/alice.ipynb`` -> ``alice``); a file given directly
    whose name is a chapter's (``NN_name.ipynb``) is its folder's student."""
    found: list[tuple[Path, str]] = []
    for given in map(Path, paths):
        if given.is_dir() and not given.is_symlink():
            for path in sorted(given.rglob("*.ipynb")):
                relative = path.relative_to(given)
                if any(part in SKIPPED_FOLDERS for part in relative.parts):
                    continue
                student = relative.parts[0] if len(relative.parts) > 1 else path.stem
                found.append((path, student))
        else:
            chapter_like = given.name[:2].isdigit() and given.name[2:3] == "_"
            parent = Path(given.absolute()).parent.name
            found.append((given, parent if chapter_like and parent else given.stem))
    return found


def grade_one(path: str, student: str, options: dict) -> Graded:
    """Grade one submission in its own supervised process (:mod:`minigpt.classroom.supervisor`);
    never raises (a problem that stops grading is exit status 2)."""
    return grade_supervised(path, student, options)


def grade_all(
    submissions: list[tuple[Path, str]],
    options: dict,
    jobs: int = 1,
    progress=None,
) -> list[Graded]:
    """Grade every submission, ``jobs`` at a time, each in its own process; results in order. A
    grading process that dies costs only its own submission."""
    results: list[Graded | None] = [None] * len(submissions)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {
            pool.submit(grade_one, str(path), student, options): index
            for index, (path, student) in enumerate(submissions)
        }
        done = 0
        for future in as_completed(futures):
            index = futures[future]
            try:
                results[index] = future.result()
            except Exception as err:  # noqa: BLE001 - grade_one never raises; kept as a guard
                path, student = submissions[index]
                results[index] = Graded(
                    str(path), student, None, 2, f"the grading process failed: {err}"
                )
            done += 1
            if progress is not None:
                progress(done, len(submissions), results[index])
    return [r for r in results if r is not None]


def progress_line(stream=None):
    """A callback that keeps one progress line up to date on a terminal (a line each otherwise),
    on ``stream`` (default: standard error at the time of the call)."""

    def show(done: int, total: int, graded: Graded) -> None:
        out = stream if stream is not None else sys.stderr
        score = (
            f"{graded.report['points']}/{graded.report['possible']}"
            if graded.report is not None
            else "not graded"
        )
        line = f"graded {done}/{total}: {escape(graded.student, 60)} {score}"
        if out.isatty():
            out.write("\r\033[K" + line + ("\n" if done == total else ""))
        else:
            out.write(line + "\n")
        out.flush()

    return show


def gradebook_rows(results: list[Graded]) -> tuple[list[str], list[dict]]:
    """(columns, rows): student, notebook, chapter, one column per check (its points), total,
    maximum, execution status, isolation level, exit status and, for ungraded ones, why."""
    check_names: list[str] = []
    for graded in results:
        for check in (graded.report or {}).get("checks", []):
            if check["name"] not in check_names:
                check_names.append(check["name"])
    columns = ["student", "notebook", "chapter", *check_names]
    columns += ["total", "maximum", "execution", "isolation", "exit_status", "problem"]
    rows = []
    for graded in results:
        report = graded.report
        row = {
            "student": graded.student,
            "notebook": graded.path,
            "exit_status": graded.exit_status,
        }
        if report is None:
            row.update(chapter="", total="", maximum="", execution="not graded", isolation="")
            row["problem"] = graded.error
        else:
            row.update(
                chapter=report["chapter"],
                total=report["points"],
                maximum=report["possible"],
                execution=report["execution"]["status"],
                isolation=report["isolation"],
                problem=escape("; ".join(report["problems"]), 500),
            )
            row.update({c["name"]: c["points"] for c in report["checks"]})
        rows.append(row)
    return columns, rows


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value):
    """A text cell a spreadsheet would read as a formula (``=``, ``+``, ``-``, ``@``, tab, carriage
    return first) prefixed with a single quote; anything else as it is."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def write_gradebook(results: list[Graded], path: Path | str) -> None:
    """The gradebook as CSV; every text cell (student names, paths, problems) is made safe to open
    in a spreadsheet (:func:`spreadsheet_safe`)."""
    columns, rows = gradebook_rows(results)
    rows = [{k: spreadsheet_safe(v) for k, v in row.items()} for row in rows]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def gradescope_results(graded: Graded) -> dict:
    """Gradescope's autograder ``results.json`` for one submission: score and one test per check
    (name, score, max_score, output)."""
    report = graded.report
    if report is None:
        return {
            "score": 0,
            "output": f"The notebook could not be graded: {graded.error}",
            "tests": [],
        }
    tests = []
    for check in report["checks"]:
        output = check["status"].replace("_", " ")
        if check["message"]:
            output += ": " + escape(check["message"], 2000)
        tests.append(
            {
                "name": f"{check['name']}: {check['description']}",
                "score": check["points"],
                "max_score": check["possible"],
                "output": output,
                "visibility": "visible",
            }
        )
    execution = report["execution"]
    summary = f"Execution: {execution['status']}."
    if execution["message"]:
        summary += " " + escape(execution["message"], 500)
    if report["problems"]:
        summary += " Problems: " + escape("; ".join(report["problems"]), 1000)
    return {
        "score": report["points"],
        "max_score": report["possible"],
        "output": summary,
        "tests": tests,
    }


def write_gradescope(graded: Graded, path: Path | str) -> None:
    Path(path).write_text(json.dumps(gradescope_results(graded), indent=2) + "\n", encoding="utf-8")
