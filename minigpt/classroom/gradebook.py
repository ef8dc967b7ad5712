"""A whole class at once: submissions found in files and folders, graded in parallel, written to a
gradebook (CSV, one row per submission) and to Gradescope's autograder results format.

Each submission is graded by :func:`minigpt.classroom.grader.grade_notebook` in its own process
(its own sandbox and workers): the checks seed the grader's random number generators, so two
gradings never share one process.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from minigpt.classroom.report import escape

SKIPPED_FOLDERS = (".ipynb_checkpoints", "__pycache__", ".git")


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
    """Grade one submission; never raises (a problem that stops grading is exit status 2)."""
    from minigpt.classroom.grader import grade_notebook

    try:
        report = grade_notebook(path, **options)
    except (FileNotFoundError, ValueError) as err:
        return Graded(path, student, None, 2, escape(err, 500))
    except Exception as err:  # noqa: BLE001 - one line for the class's table, never a traceback
        return Graded(path, student, None, 2, f"the grader failed: {type(err).__name__}: {err}")
    data = report.to_dict()
    return Graded(path, student, data, 0 if report.passed else 1, text=report.format_text())


def grade_all(
    submissions: list[tuple[Path, str]],
    options: dict,
    jobs: int = 1,
    progress=None,
) -> list[Graded]:
    """Grade every submission, ``jobs`` at a time, each in its own process; results in order."""
    results: list[Graded | None] = [None] * len(submissions)
    context = multiprocessing.get_context("spawn")  # no grader state is inherited between gradings
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=context) as pool:
        futures = {
            pool.submit(grade_one, str(path), student, options): index
            for index, (path, student) in enumerate(submissions)
        }
        done = 0
        for future in as_completed(futures):
            index = futures[future]
            try:
                results[index] = future.result()
            except Exception as err:  # noqa: BLE001 - a grading process that died
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


def write_gradebook(results: list[Graded], path: Path | str) -> None:
    columns, rows = gradebook_rows(results)
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
