"""Classroom mode: student versions of the chapters and the autograder.

Grading runs a real kernel, so only chapter 01 and small hand-made notebooks are graded here (a few
seconds each); the student versions of every chapter present are checked without a kernel. Crafted
submissions (attacks on the grader) live in test_grading_attacks.py, the sandbox and the channel to
the worker in test_sandbox.py.
"""

import contextlib
import csv
import io
import json
import re
import shutil
import time
import warnings

import nbformat
import pytest

from minigpt.classroom.checks import checks_for
from minigpt.classroom.grader import grade_notebook, run_checks
from minigpt.classroom.inputs import read_notebook_bytes
from minigpt.classroom.report import CellError, CheckResult, Execution, GradeReport
from minigpt.classroom.sandbox import bwrap_available
from minigpt.classroom.student import (
    DEFAULT_HINT,
    SolutionMarkerError,
    grade_main,
    make_student_notebook,
    student_notebooks_main,
    write_student_notebooks,
)
from minigpt.course.chapters import CHAPTERS_DIR, chapter_paths, read_notebook
from minigpt.course.source import import_notebook

CHAPTERS = chapter_paths()
IDS = [p.stem for p in CHAPTERS]
CH01 = CHAPTERS_DIR / "01_rank_and_low_rank.ipynb"
BWRAP_MISSING = bwrap_available()
LEVELS = [
    pytest.param("none", id="none"),
    pytest.param(
        "bwrap",
        id="bwrap",
        marks=pytest.mark.skipif(
            bool(BWRAP_MISSING), reason=f"bubblewrap unavailable: {BWRAP_MISSING}"
        ),
    ),
]
HINT = re.compile(r"^\s*# BEGIN SOLUTION hint:(.*)$", re.MULTILINE)
CODE_BLOCK = re.compile(
    r"^[ \t]*# BEGIN SOLUTION.*?\n(.*?)^[ \t]*# END SOLUTION", re.MULTILINE | re.DOTALL
)
TEXT_BLOCK = re.compile(r"<!-- BEGIN SOLUTION -->\n(.*?)<!-- END SOLUTION -->", re.DOTALL)


def hints_of(path):
    return {
        h.strip()
        for c in read_notebook(path).cells
        if c.cell_type == "code"
        for h in HINT.findall(c.source)
    }


def notebook(*cells):
    """A notebook from ("code" | "markdown", source) pairs, or plain strings for code cells."""
    nb = nbformat.v4.new_notebook()
    for cell in cells:
        kind, source = ("code", cell) if isinstance(cell, str) else cell
        nb.cells.append(
            nbformat.v4.new_code_cell(source)
            if kind == "code"
            else nbformat.v4.new_markdown_cell(source)
        )
    return nb


def save(nb, path):
    nbformat.write(nb, path)
    return path


def run_cli(main, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    code, stdout, _ = run_cli(student_notebooks_main, [str(out)])
    assert code == 0 and "01_rank_and_low_rank.ipynb: 6 code stubs, 5 answers removed" in stdout
    return out


# --- student versions
# ------------------------------------------------------------------------------------


def test_student_notebook_stubs_code_and_removes_answers():
    code = (
        'def f(x):\n    y = 1\n    # BEGIN SOLUTION hint: return "x" plus y\n    return x + y\n'
        "    # END SOLUTION\n\n\nclass C:\n    def g(self):\n        # BEGIN SOLUTION\n        "
        "return 2\n"
        "        # END SOLUTION\n"
    )
    nb = notebook(
        (
            "markdown",
            "Question?\n<!-- BEGIN SOLUTION -->\n**Solution.** 42\n<!-- END SOLUTION -->\nMore.",
        ),
        code,
        "print('untouched')",
    )
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", text="old output")]
    nb.cells[1].execution_count = 7
    nb.cells[1].metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00Z"}
    nb.cells[2].metadata["tags"] = ["keep"]
    before = nbformat.writes(nb)

    student = make_student_notebook(nb, "nb.ipynb")

    assert nbformat.writes(nb) == before, "the reference notebook must not be modified"
    assert student.cells[0].source == "Question?\n*Your answer here.*\nMore."
    assert student.cells[1].source == (
        'def f(x):\n    y = 1\n    raise NotImplementedError("return \\"x\\" plus y")\n\n\nclass '
        "C:\n"
        f'    def g(self):\n        raise NotImplementedError("{DEFAULT_HINT}")\n'
    )
    namespace = {}
    exec(student.cells[1].source, namespace)
    with pytest.raises(NotImplementedError, match='return "x" plus y'):
        namespace["f"](1)
    assert student.cells[1].outputs == [] and student.cells[1].execution_count is None
    assert "execution" not in student.cells[1].metadata
    assert student.cells[2] == nb.cells[2]
    assert student.cells[0].id == nb.cells[0].id


@pytest.mark.parametrize(
    "cell, message",
    [
        (
            "def f():\n    # BEGIN SOLUTION hint: h\n    return 1\n",
            "cell 2 (code), line 2: '# BEGIN SOLUTION' is never closed",
        ),
        (
            "def f():\n    return 1\n    # END SOLUTION\n",
            "cell 2 (code), line 3: '# END SOLUTION' without",
        ),
        (
            "def f():\n    # BEGIN SOLUTION\n    x = 1\n# END SOLUTION\n",
            "cell 2 (code), line 4: '# END SOLUTION' is indented",
        ),
        (
            "# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION\n",
            "cell 2 (code), line 2: '# BEGIN SOLUTION' inside",
        ),
        (
            "# BEGIN SOLUTION oops\n# END SOLUTION\n",
            "cell 2 (code), line 1: expected '# BEGIN SOLUTION' or",
        ),
        (
            ("markdown", "<!-- BEGIN SOLUTION -->\nanswer\n"),
            "cell 2 (markdown), line 1: '<!-- BEGIN SOLUTION -->' is never",
        ),
        (
            ("markdown", "answer\n<!-- END SOLUTION -->\n"),
            "cell 2 (markdown), line 2: '<!-- END SOLUTION -->' without",
        ),
        (
            ("markdown", "x <!-- BEGIN SOLUTION -->\ny\n<!-- END SOLUTION -->"),
            "cell 2 (markdown), line 1: put '<!-- BEGIN SOLUTION -->' on a line of its own",
        ),
    ],
)
def test_unbalanced_markers_name_the_notebook_and_cell(cell, message):
    with pytest.raises(SolutionMarkerError, match=re.escape("nb.ipynb, " + message)):
        make_student_notebook(notebook("import os", cell), "nb.ipynb")


def test_marker_error_writes_nothing_and_cli_reports_it(tmp_path):
    chapters = tmp_path / "chapters"
    chapters.mkdir()
    save(
        notebook("def f():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION\n"),
        chapters / "01_good.ipynb",
    )
    save(notebook("# BEGIN SOLUTION\nx = 1\n"), chapters / "02_bad.ipynb")
    with pytest.raises(ValueError, match="02_bad.ipynb, cell 1"):
        write_student_notebooks(tmp_path / "out", chapters_dir=chapters)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="must not be the chapters folder"):
        write_student_notebooks(chapters, chapters_dir=chapters)
    assert run_cli(student_notebooks_main, [str(tmp_path / "out"), "--chapters", "99"])[0] == 2


def test_generation_is_deterministic(tmp_path, student_dir):
    code, stdout, _ = run_cli(student_notebooks_main, [str(tmp_path), "--chapters", "1"])
    assert code == 0 and [p.name for p in tmp_path.iterdir()] == [CH01.name], stdout
    first = (tmp_path / CH01.name).read_bytes()
    write_student_notebooks(tmp_path, ["01"])
    assert (tmp_path / CH01.name).read_bytes() == first == (student_dir / CH01.name).read_bytes()
    assert first.endswith(b"}\n") and json.loads(first)["cells"]
    for path in CHAPTERS:
        assert (student_dir / path.name).read_bytes() == (
            write_student_notebooks(tmp_path / "again", [path.name[:2]])[0].path
        ).read_bytes()


@pytest.mark.parametrize("path", CHAPTERS, ids=IDS)
def test_every_student_version_is_valid_and_free_of_solutions(path, student_dir):
    reference = read_notebook(path)
    student = nbformat.read(student_dir / path.name, as_version=4)
    nbformat.validate(student)
    assert len(student.cells) == len(reference.cells)
    stubs = 0
    for index, (ref, stu) in enumerate(zip(reference.cells, student.cells, strict=False)):
        where = f"{path.name} cell {index + 1}"
        assert "BEGIN SOLUTION" not in stu.source and "END SOLUTION" not in stu.source, where
        blocks = (
            CODE_BLOCK.findall(ref.source)
            if ref.cell_type == "code"
            else TEXT_BLOCK.findall(ref.source)
        )
        for block in blocks:
            assert block.strip() not in stu.source, f"{where} still holds its solution"
        if not blocks:
            assert stu.source == ref.source, f"{where} changed although it has no solution markers"
        if stu.cell_type == "code":
            assert stu.outputs == [] and stu.execution_count is None, where
            stubs += stu.source.count("raise NotImplementedError(") - ref.source.count(
                "raise NotImplementedError("
            )
            body = "\n".join(
                ln for ln in stu.source.splitlines() if not ln.lstrip().startswith(("%", "!"))
            )
            compile(body, where, "exec")  # every cell compiles, stubs included
    markers = sum(
        c.source.count("# BEGIN SOLUTION") for c in reference.cells if c.cell_type == "code"
    )
    assert stubs == markers > 0


@pytest.mark.parametrize("path", CHAPTERS, ids=IDS)
def test_student_checks_are_passed_or_not_implemented_with_a_hint(path, student_dir):
    """In-process version of grading a student notebook: untouched checks pass, stubbed ones show a
    hint."""
    hints, outcomes, checks = hints_of(path), [], checks_for(path.name[:2])
    if not checks:
        pytest.skip(f"chapter {path.name[:2]} has no checks yet")
    for chk in checks:
        try:
            chk.run(import_notebook(student_dir / path.name))
            outcomes.append("passed")
        except NotImplementedError as err:
            assert str(err) in hints, f"{chk.name}: {err!r} is not one of the chapter's hints"
            outcomes.append("stub")
    assert "stub" in outcomes


# --- grading
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
def test_reference_chapter_gets_full_marks(level, tmp_path):
    results = tmp_path / "results.json"
    argv = [str(CH01), "--json", "--isolation", level, "--gradescope", str(results)]
    code, stdout, _ = run_cli(grade_main, argv)
    report = json.loads(stdout)
    gradescope = json.loads(results.read_text())
    assert gradescope["score"] == gradescope["max_score"] == report["possible"]
    assert [t["name"].split(":")[0] for t in gradescope["tests"]] == [
        c.name for c in checks_for("01")
    ]
    assert all(
        t["score"] == t["max_score"] and t["output"] == "passed" for t in gradescope["tests"]
    )
    assert code == 0 and report["passed"] and report["isolation"] == level
    assert report["points"] == report["possible"] == sum(c.points for c in checks_for("01"))
    assert {c["status"] for c in report["checks"]} == {"passed"}
    assert report["execution"]["status"] == "completed" and report["execution"]["errors"] == []
    assert report["execution"]["cells_run"] == report["execution"]["code_cells"] > 0
    assert report["refused"] == [] and report["problems"] == []


@pytest.mark.parametrize("level", LEVELS)
def test_student_version_gets_zero_on_stubs_and_full_marks_elsewhere(student_dir, level):
    report = grade_notebook(student_dir / CH01.name, isolation=level)
    status = {c.name: c.status for c in report.checks}
    stubbed = {"truncated_svd_matches_numpy", "low_rank_factors_give_best_rank_r"} | {
        c.name for c in report.checks if c.name.startswith("exercise_")
    }
    assert {n for n, s in status.items() if s == "not_implemented"} == stubbed
    assert {n for n, s in status.items() if s == "passed"} == set(status) - stubbed
    hints = hints_of(CH01)
    for c in report.checks:
        assert c.points == (0 if c.name in stubbed else c.possible)
        if c.name in stubbed:
            assert c.message in hints and c.location
    assert 0 < report.points < report.possible and not report.passed
    assert report.execution.status == "completed"
    assert report.execution.errors and {e.ename for e in report.execution.errors} >= {
        "NotImplementedError"
    }
    text = report.format_text()
    assert (
        "hint (in exercise_2_compression_ratio): divide the full count d*k by lora_parameter_count"
        in text
    )
    assert f"Total: {report.points}/{report.possible} points." in text


@pytest.mark.parametrize(
    "content, reason",
    [
        (b'{"cells": [', "not valid JSON"),
        (b"[1, 2]", "not a notebook"),
        (b"\xff\xfe", "not UTF-8 text"),
        (
            json.dumps(
                {
                    "cells": [{"cell_type": "code", "id": "a", "metadata": {}, "outputs": []}],
                    "metadata": {},
                    "nbformat": 4,
                    "nbformat_minor": 5,
                }
            ).encode(),
            "not a notebook",
        ),
        (
            json.dumps(
                {
                    "cells": [{"cell_type": "code", "source": 5, "metadata": {}, "outputs": []}],
                    "metadata": {},
                    "nbformat": 4,
                    "nbformat_minor": 4,
                }
            ).encode(),
            "not a notebook",
        ),
    ],
)
def test_unreadable_notebook_gets_a_report_not_a_traceback(tmp_path, content, reason):
    path = tmp_path / "01_broken.ipynb"
    path.write_bytes(content)
    code, stdout, stderr = run_cli(grade_main, [str(path)])
    assert code == 1 and "Traceback" not in stdout + stderr
    assert (
        reason in stdout and f"Total: 0/{sum(c.points for c in checks_for('01'))} points." in stdout
    )
    assert run_cli(grade_main, [str(tmp_path / "missing.ipynb")])[0] == 2
    assert run_cli(grade_main, [str(path), "--chapter", "nope"])[0] == 2


def test_loops_hit_the_time_limits(tmp_path):
    path = save(
        notebook(
            "import numpy as np",
            "def matrix_rank(M, tol=None):\n    while True:\n        pass",
            "def exercise_2_compression_ratio(d, k, r):\n    return d * k / (r * (d + k))",
            "while True:\n    pass",
            "print('never reached')",
        ),
        tmp_path / "loops.ipynb",
    )
    report = grade_notebook(path, chapter=1, timeout=10, check_timeout=5)
    assert report.execution.status == "timeout"
    status = {c.name: c.status for c in report.checks}
    assert status["matrix_rank_matches_numpy"] == "timeout"
    assert status["exercise_2_compression_ratio_is_exact"] == "passed", (
        "checks after a timeout still run"
    )
    assert status["lora_parameter_count_is_exact"] == "error"  # not defined at all
    text = report.format_text()
    assert "timeout" in text and "did not run to its end" in text and not report.passed
    code, stdout, _ = run_cli(
        grade_main, [str(path), "--chapter", "01", "--timeout", "10", "--check-timeout", "5"]
    )
    assert code == 1 and "Execution: timeout" in stdout


def test_a_loop_at_import_time_times_out_every_check(tmp_path):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    submission = save(
        notebook("import itertools\ndef f(x=sum(itertools.count())):\n    pass"),
        sandbox / "s.ipynb",
    )
    checks = checks_for("01")
    start = time.monotonic()
    outcomes, problems = run_checks(
        submission, checks, sandbox, check_timeout=2, checks_timeout=60, isolation="none"
    )
    assert time.monotonic() - start < 60, "one import that loops stops every check at once"
    assert any("importing the notebook's definitions did not finish" in p for p in problems)
    assert [o.status for o in outcomes] == ["timeout"] * len(checks)


def test_the_checks_phase_has_one_deadline(tmp_path):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    source = "def matrix_rank(M, tol=None):\n    import time\n    time.sleep(1.5)\n    return 0"
    submission = save(notebook(source), sandbox / "s.ipynb")
    checks = checks_for("01")
    start = time.monotonic()
    outcomes, _ = run_checks(
        submission, checks[:1] * 8, sandbox, check_timeout=30, checks_timeout=6, isolation="none"
    )
    assert time.monotonic() - start < 30, "the phase stops before a check's own limit"
    statuses = [o.status for o in outcomes]
    assert statuses[0] == "failed" and statuses[-1] == "timeout", statuses
    assert outcomes[-1].message == "the time for all checks (6 s) ran out"


def test_checks_stop_when_the_folder_grows_past_its_cap(tmp_path, monkeypatch):
    import minigpt.classroom.grader as grader

    monkeypatch.setattr(grader, "FOLDER_LIMIT", 2**20)
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    source = "def matrix_rank(M, tol=None):\n    open('fill.bin', 'wb').write(b'x' * 2**21)\n"
    submission = save(notebook(source), sandbox / "s.ipynb")
    checks = checks_for("01")
    outcomes, problems = run_checks(
        submission, checks, sandbox, check_timeout=30, checks_timeout=120, isolation="none"
    )
    assert outcomes[0].status == "failed" and len(outcomes) == len(checks)
    assert all(
        o.message == "the notebook wrote more than 1 MiB into its folder" for o in outcomes[1:]
    )
    assert problems == [
        "the notebook wrote more than 1 MiB into its folder; the checks were stopped"
    ]


def test_sandbox_refuses_changes_outside_its_folder(tmp_path):
    outside = tmp_path / "outside"
    (outside / "tree").mkdir(parents=True)
    canary, leaf = outside / "canary.txt", outside / "tree" / "leaf.txt"
    canary.write_text("keep me")
    leaf.write_text("keep me too")
    path = save(
        notebook(
            "import os, shutil, subprocess, tempfile",
            f"os.remove({str(canary)!r})",
            f"shutil.rmtree({str(outside / 'tree')!r})",
            f"open({str(canary)!r}, 'w').write('overwritten')",
            f"subprocess.run(['rm', '-f', {str(canary)!r}])",
            "assert os.environ['MINIGPT_SMOKE'] == '1'\nopen('inside.txt', 'w').write('fine')\n"
            "handle, name = "
            "tempfile.mkstemp()\nos.close(handle)\nos.remove(name)\nos.remove('inside.txt')",
            f"def matrix_rank(M, tol=None):\n    import os\n    os.remove({str(canary)!r})\n    "
            "return 0",
        ),
        tmp_path / "01_vandal.ipynb",
    )

    report = grade_notebook(path, isolation="none")  # the audit hook is what refuses here

    assert canary.read_text() == "keep me" and leaf.read_text() == "keep me too"
    raised = {e.cell: e.ename for e in report.execution.errors}
    assert raised == {
        2: "PermissionError",
        3: "PermissionError",
        4: "PermissionError",
        5: "PermissionError",
    }
    refused = {(r.phase, r.event) for r in report.refused}
    assert refused == {
        ("execution", "os.remove"),
        ("execution", "shutil.rmtree"),
        ("execution", "open"),
        ("execution", "subprocess.Popen"),
        ("checks", "os.remove"),
    }
    assert str(canary.resolve()) in {r.path for r in report.refused}
    matrix_rank = next(c for c in report.checks if c.name == "matrix_rank_matches_numpy")
    assert matrix_rank.status == "error" and "PermissionError" in matrix_rank.message
    text = report.format_text()
    assert "Sandbox: refused 5 operation(s)" in text and str(canary.resolve()) in text
    assert not report.passed


def test_symbolic_links_are_refused_naming_the_link(tmp_path):
    link = tmp_path / "01_mine.ipynb"
    link.symlink_to(CH01)
    code, stdout, stderr = run_cli(grade_main, [str(link)])
    assert code == 2 and f"symbolic link, which the grader refuses: {link}" in stderr
    real = tmp_path / "real"
    real.mkdir()
    shutil.copy(CH01, real / CH01.name)
    (tmp_path / "linked").symlink_to(real)
    code, _, stderr = run_cli(grade_main, [str(tmp_path / "linked" / CH01.name)])
    assert code == 2 and (
        f"lies under a symbolic link, which the grader refuses: {tmp_path}/linked" in stderr
    )
    assert "Traceback" not in stderr


def test_error_hiding_tags_count_only_where_the_reference_has_them(tmp_path):
    nb = notebook("raise ValueError('tagged')", "raise KeyError('untagged')")
    nb.cells[0].metadata["tags"] = ["raises-exception"]
    path = save(nb, tmp_path / "01_tags.ipynb")
    report = grade_notebook(path, isolation="none", timeout=60, check_timeout=10)
    assert report.execution.status == "completed"
    assert [e.ename for e in report.execution.errors] == ["ValueError", "KeyError"]
    raw = json.loads(path.read_text())
    raw["cells"][1]["metadata"]["tags"] = "raises-exception"  # a string: not the schema's list
    path.write_text(json.dumps(raw))
    report = grade_notebook(path, isolation="none")
    assert report.execution.status == "not_run" and "not a notebook" in report.problems[0]


def test_a_class_is_graded_in_parallel_into_a_gradebook(tmp_path, student_dir):
    folder = tmp_path / "class"
    for student, source in (("alice", CH01), ("bob", student_dir / CH01.name), ("carol", None)):
        (folder / student).mkdir(parents=True)
        target = folder / student / CH01.name
        if source is None:
            target.write_text('{"cells": [')
        else:
            shutil.copy(source, target)
    book = tmp_path / "grades.csv"
    argv = [str(folder), "--jobs", "2", "--gradebook", str(book), "--isolation", "none"]
    code, stdout, stderr = run_cli(grade_main, argv)
    assert code == 1 and "Traceback" not in stdout + stderr
    assert "graded 3/3" in stderr
    rows = {row["student"]: row for row in csv.DictReader(book.open())}
    assert sorted(rows) == ["alice", "bob", "carol"]
    names = [c.name for c in checks_for("01")]
    possible = sum(c.points for c in checks_for("01"))
    alice, bob, carol = rows["alice"], rows["bob"], rows["carol"]
    assert (alice["total"], alice["maximum"], alice["exit_status"]) == (
        str(possible),
        str(possible),
        "0",
    )
    assert all(int(alice[n]) == c.points for n, c in zip(names, checks_for("01"), strict=True))
    assert 0 < int(bob["total"]) < possible and bob["exit_status"] == "1"
    assert all(bob[n] == "0" for n in names if n.startswith("exercise_"))
    assert int(bob["total"]) == sum(int(bob[n]) for n in names)
    assert (carol["total"], carol["execution"], carol["exit_status"]) == ("0", "not_run", "1")
    assert {r["chapter"] for r in rows.values()} == {"01"}
    assert {r["isolation"] for r in rows.values()} == {"none"}
    assert {r["execution"] for r in (alice, bob)} == {"completed"}
    code, _, stderr = run_cli(grade_main, [str(folder), "--gradescope", str(tmp_path / "r.json")])
    assert code == 2 and "one submission" in stderr


def test_grade_help_shows_defaults_and_an_example():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        grade_main(["--help"])
    text = out.getvalue()
    assert done.value.code == 0 and "(default: 1)" in text and "--gradebook grades.csv" in text
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as done:
        grade_main([str(CH01), "--job", "2"])
    assert done.value.code == 2, "no abbreviations"


# --- one chapter-number parser
# -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, wanted",
    [
        (["6"], ["06"]),
        (["06", "7"], ["06", "07"]),
        ("6-8", ["06", "07", "08"]),
        (["1,3"], ["01", "03"]),
        ([6], ["06"]),
        (None, None),
        ([], None),
    ],
)
def test_chapter_numbers_parse_one_way(given, wanted):
    from minigpt.course.chapters import parse_chapters

    assert parse_chapters(given) == wanted


@pytest.mark.parametrize("bad", ["x", "0", "100", "8-6", "6.5"])
def test_bad_chapter_numbers_are_refused(bad):
    from minigpt.course.chapters import normalise_chapter, parse_chapters

    with pytest.raises(ValueError):
        parse_chapters([bad])
    with pytest.raises(ValueError):
        checks_for(bad) if "-" not in bad else normalise_chapter(bad)


def test_course_student_notebooks_and_grade_read_chapter_6_alike(tmp_path, monkeypatch):
    import minigpt.course.chapters as notebooks
    import minigpt.course.execute as execute
    from minigpt.__main__ import main

    ran = []
    monkeypatch.setattr(
        execute,
        "execute_notebook",
        lambda path, **kw: ran.append(path.name) or read_notebook(path),
    )
    monkeypatch.setattr(notebooks, "write_notebook_atomic", lambda nb, path: None)
    for spelling in ("6", "06"):
        ran.clear()
        code, _, _ = run_cli(
            main, ["course", "--smoke", "--out", str(tmp_path / "run"), "--chapters", spelling]
        )
        assert code == 0 and ran == ["06_lora.ipynb"]
        code, stdout, _ = run_cli(
            student_notebooks_main, [str(tmp_path / spelling), "--chapters", spelling]
        )
        assert code == 0 and [p.name for p in (tmp_path / spelling).iterdir()] == ["06_lora.ipynb"]
    assert [c.name for c in checks_for(6)] == [c.name for c in checks_for("06")]


def test_a_cell_that_raised_is_not_full_marks():
    checks = [CheckResult("a", "a check", 2, points=2, status="passed")]
    run = Execution("completed", "", 1.0, 3, 3)
    assert GradeReport("x.ipynb", "01", checks, run).passed
    run.errors = [CellError(2, "id", "raise", "RuntimeError", "boom")]
    report = GradeReport("x.ipynb", "01", checks, run)
    assert not report.passed and report.points == report.possible
    assert "crashed in cell 2" in report.format_text()


def test_duplicate_cell_ids_are_repaired_quietly():
    nb = notebook("x = 1", "y = 2", "z = 3")
    raw = json.loads(nbformat.writes(nb))
    for cell in raw["cells"]:
        cell["id"] = "same"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read = read_notebook_bytes(json.dumps(raw).encode())
    assert not caught, [str(w.message) for w in caught]
    assert len({c.id for c in read.cells}) == 3


def test_a_minigpt_folder_where_the_grader_starts_does_not_shadow_the_package(
    tmp_path, monkeypatch
):
    (tmp_path / "minigpt").mkdir()
    (tmp_path / "minigpt" / "__init__.py").write_text("raise SystemExit(7)\n")
    (tmp_path / "01_x.ipynb").write_text("{")
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run_cli(grade_main, ["01_x.ipynb", "--isolation", "none"])
    assert code == 1 and "not valid JSON" in stdout, stdout + stderr
