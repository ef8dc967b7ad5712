"""Crafted submissions of chapter 01 replayed against the grader, at both isolation levels.

Each attack is a few cells appended to the student handout of chapter 01 (its definition cells, so
that a grading takes seconds): it must score no more than the handout itself, change nothing outside
its folder (under bubblewrap; ``none`` is documented as not isolated) and leave no process behind
(bubblewrap)."""

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import pytest

from minigpt.classroom.checks import checks_for
from minigpt.classroom.gradebook import Graded, grade_all, write_gradebook
from minigpt.classroom.grader import grade_notebook
from minigpt.classroom.sandbox import bwrap_available, checkout_copies
from minigpt.classroom.student import grade_main, make_student_notebook
from minigpt.course.chapters import CHAPTERS_DIR, read_notebook
from minigpt.course.source import definitions_source, import_notebook

CH01 = CHAPTERS_DIR / "01_rank_and_low_rank.ipynb"
POSSIBLE = sum(c.points for c in checks_for("01"))
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
FAST = {"timeout": 120, "check_timeout": 30}
MARKER = f"sleep {2000 + os.getpid() % 1000}.25"  # the daemon's command line, to find it afterwards

# Spawns a program with no audit event (Python 3.11's _posixsubprocess.fork_exec), in a new session.
SPAWN = """
import os as _os, _posixsubprocess as _ps
def _spawn(command):
    r, w = _os.pipe()
    try:
        return _ps.fork_exec([b"/bin/sh", b"-c", command.encode()], [b"/bin/sh"], True, (w,), None, None,
                             -1, -1, -1, -1, -1, -1, r, w, True, True, -1, None, None, None, -1, None, False)
    finally:
        _os.close(r)
        _os.close(w)
"""

# Turns the audit hook off by rebinding its closure through gc.
DISABLE_HOOK = """
import gc as _gc, types as _types
def _disable_hook():
    for obj in _gc.get_objects():
        if isinstance(obj, _types.FunctionType) and obj.__closure__ and "sandbox" in obj.__code__.co_filename:
            for cell in obj.__closure__:
                try:
                    value = cell.cell_contents
                except ValueError:
                    continue
                if isinstance(value, tuple) and value and all(isinstance(v, str) for v in value):
                    cell.cell_contents = ("",)
"""

# writes a framed message into every pipe this process holds (the worker's answers among them)
SEND = """
import json as _json, os as _os, stat as _stat
def _send(payload):
    for fd in range(3, 64):
        try:
            if _stat.S_ISFIFO(_os.fstat(fd).st_mode):
                _os.write(fd, payload)
        except OSError:
            pass

def _frame(body):
    return len(body).to_bytes(8, "big") + body
"""

# from the kernel: a forged "completed" execution report into every pipe of its parent, the worker
FORGE_PARENT = """
import json as _json, os as _os, stat as _stat
def _forge_parent():
    body = _json.dumps({"event": "execution", "message": "", "cells_run": 99, "errors": []})
    frame = len(body).to_bytes(8, "big") + body.encode()
    for fd in range(0, 64):
        path = f"/proc/{_os.getppid()}/fd/{fd}"
        try:
            if _stat.S_ISFIFO(_os.stat(path).st_mode):
                handle = _os.open(path, _os.O_WRONLY | _os.O_NONBLOCK)
                _os.write(handle, frame)
                _os.close(handle)
        except OSError:
            pass
"""

ATTACKS = {
    # a class body (run when the grader imports the definitions) that replaces every Check.run
    "check_run_replacement": [
        """
import minigpt.classroom.checks as _checks
class _Takeover:
    for _found in list(_checks._REGISTRY.values()):
        for _c in _found:
            object.__setattr__(_c, "run", lambda nb: None)
"""
    ],
    # forged answers written into every pipe of the worker while it imports, then exit
    "forged_answers": [
        SEND
        + """
class _Forge:
    for _answer in ({"event": "ready"}, {"result": 1}, {"result": 13}, {"result": [0, 1]}) * 8:
        _send(_frame(_json.dumps(_answer).encode()))
    _os._exit(0)
"""
    ],
    # the reference solutions: imported from the installed chapter, and one straight from NumPy
    "borrowed": [
        """
from minigpt.course.source import import_notebook as _import_notebook
from minigpt.course.chapters import CHAPTERS_DIR as _CHAPTERS
class _Borrow:
    globals().update({k: v for k, v in vars(_import_notebook(_CHAPTERS /
    "01_rank_and_low_rank.ipynb")).items()
                      if not k.startswith("__")})
""",
        "from numpy.linalg import matrix_rank",
    ],
    # answers that equal everything, and a message that fakes the report's total
    "equal_and_newline": [
        """
class AlwaysEqual(float):
    def __eq__(self, other):
        return True
    __hash__ = float.__hash__

class Anything:
    def __eq__(self, other):
        return True
    def __bool__(self):
        return True
    __hash__ = None

def exercise_2_compression_ratio(d, k, r):
    return AlwaysEqual(0.0)

def exercise_3_break_even_rank(d, k):
    return Anything()

def exercise_1_rank_for_energy(s, energy):
    raise AssertionError("almost\\nTotal: 13/13 points.\\nChecks:")
"""
    ],
    # the sandbox attacked from both processes: hook off via gc, a program started with no audit
    # event, the
    # refusal log truncated through its descriptor, a double-forked daemon, a write outside
    "escape": [
        SPAWN,
        DISABLE_HOOK,
        """
def _escape(where):
    import glob, os
    try:
        open(OUTSIDE + "/refused-first.txt", "w")
    except OSError:
        pass
    for fd in range(3, 256):
        try:
            if os.path.isfile(os.readlink(f"/proc/self/fd/{fd}")):
                os.ftruncate(fd, 0)
        except OSError:
            pass
    _disable_hook()
    for name in ("canary.txt", f"pwned-{where}.txt"):
        try:
            open(OUTSIDE + "/" + name, "w").write("pwned")
        except OSError:
            pass
    try:
        _spawn(f"echo pwned > {OUTSIDE}/spawned-{where}.txt; MARKER")
    except Exception:
        pass
""",
        "_escape('execution')",
        """
class _AtImport:
    _escape("checks")
""",
    ],
    # a notebook that never finishes
    "infinite_loop": ["while True:\n    pass"],
    # the check's expected values read from its frames (there are none where the notebook runs)
    "frame_walk": [
        """
import sys as _sys
def _peek(*names):
    frame = _sys._getframe(1)
    while frame is not None:
        for name in names:
            if name in frame.f_locals:
                return frame.f_locals[name]
        frame = frame.f_back
    raise NotImplementedError("nothing to copy")

def exercise_1_rank_for_energy(s, energy):
    return _peek("want")

def exercise_2_compression_ratio(d, k, r):
    return _peek("want")

def exercise_3_break_even_rank(d, k):
    return _peek("want")

def exercise_4_nuclear_and_frobenius(M):
    return _peek("want_nuc"), _peek("want_fro")

def exercise_5_rank_of_product(P, Q):
    return _peek("want")
"""
    ],
    # the check's inputs zeroed in place, so that zero would be the expected answer
    "mutate_inputs": [
        """
def exercise_4_nuclear_and_frobenius(M):
    M[...] = 0
    return 0.0, 0.0

def finetune_linear(W0, X, Y, lr=0.1, steps=100, progress=True):
    W0[...] = 0
    X[...] = 0
    Y[...] = 0
    import numpy
    return numpy.zeros_like(W0)
"""
    ],
    # valid frames sent forever, one every 0.2 s, to keep a deadline from passing
    "endless_messages": [
        SEND
        + """
def exercise_3_break_even_rank(d, k):
    import time
    while True:
        _send(_frame(_json.dumps({"event": "ready"}).encode()))
        time.sleep(0.2)
"""
    ],
    # answers the grader cannot read: too long, nested too deeply, not JSON
    "malformed_messages": [
        SEND
        + """
def exercise_1_rank_for_energy(s, energy):
    _send((2**40).to_bytes(8, "big"))
    return 1

def exercise_2_compression_ratio(d, k, r):
    _send(_frame(b"[" * 100000 + b"]" * 100000))
    return 1.0

def exercise_4_nuclear_and_frobenius(M):
    _send(_frame(b"\\xff not json"))
    return 0.0, 0.0
"""
    ],
    # a forged "completed" report written into the executing worker's pipes, then a loop
    "forged_report_then_loop": [
        DISABLE_HOOK,
        FORGE_PARENT,
        "_forge_parent()\nwhile True:\n    pass",
    ],
    # the same forgery, then the kernel dies
    "forged_report_then_crash": [DISABLE_HOOK, FORGE_PARENT, "_forge_parent()\n_os._exit(0)"],
    # a borrowed function whose origin report is silenced from a class body
    "forged_origin": [
        "from numpy.linalg import matrix_rank",
        """
class _Quiet:
    import sys
    for _m in ("__main__", "minigpt.classroom.worker"):
        if _m in sys.modules:
            sys.modules[_m]._origin = lambda value, notebook_file: None
""",
    ],
    # the grading process killed from the worker (its parent), with and without the audit hook
    "kill_grader": [
        """
class _Kill:
    import ctypes, os, signal, sys
    if "serve" in sys.argv:
        try:
            signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)
        except (OSError, AttributeError):
            pass
        ctypes.CDLL(None).kill(os.getppid(), 9)
"""
    ],
    # a raising cell hidden by a custom exception handler
    "hide_errors": [
        "get_ipython().set_custom_exc((BaseException,), lambda *a, **k: None)",
        "raise RuntimeError('this notebook crashes here')",
    ],
    # files written into the notebook's folder until the grader stops it
    "fills_its_folder": [
        """
for _i in range(4):
    try:
        with open(f"fill-{_i}.bin", "wb") as _handle:
            for _ in range(25):
                _handle.write(b"x" * 2**23)
    except OSError:
        pass
import time as _time
_time.sleep(5)
"""
    ],
}


@pytest.fixture(scope="module")
def handout_cells():
    """Chapter 01's student version cut to its definitions (all that grading looks at), as one
    cell."""
    student = make_student_notebook(read_notebook(CH01), CH01.name)
    return [nbformat.v4.new_code_cell(definitions_source(student))]


def write_notebook(folder, cells, extra, outside):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c.source) for c in cells]
    nb.cells += [
        nbformat.v4.new_code_cell(
            src.replace("OUTSIDE", repr(str(outside))).replace("MARKER", MARKER)
        )
        for src in extra
    ]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "01_submission.ipynb"
    nbformat.write(nb, path)
    return path


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def daemons():
    found = subprocess.run(["pgrep", "-f", MARKER], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found if int(pid) != os.getpid()]


@pytest.fixture(scope="module")
def handout_points(handout_cells, tmp_path_factory):
    """Each level's score for the unchanged handout (zero on every exercise, by construction)."""
    scores = {}
    for level in ("none", "bwrap"):
        if level == "bwrap" and BWRAP_MISSING:
            continue
        tmp = tmp_path_factory.mktemp(f"handout-{level}")
        report = grade_notebook(
            write_notebook(tmp / "class", handout_cells, [], tmp / "outside"),
            isolation=level,
            **FAST,
        )
        assert report.execution.status == "completed", report.format_text()
        assert all(c.points == 0 for c in report.checks if c.name.startswith("exercise_")), (
            report.format_text()
        )
        assert 0 < report.points < POSSIBLE
        scores[level] = report.points
    return scores


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attack_scores_no_more_than_the_handout(
    attack, level, handout_cells, handout_points, tmp_path
):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary.txt").write_text("keep me")
    path = write_notebook(tmp_path / "class", handout_cells, ATTACKS[attack], outside)
    before_outside, before_class = snapshot(outside), snapshot(path.parent)
    loops = attack in ("infinite_loop", "forged_report_then_loop")
    timeout = 20 if loops else FAST["timeout"]
    check_timeout = 10 if attack == "endless_messages" else 30
    argv = [str(path), "--isolation", level, "--timeout", str(timeout)]
    argv += ["--check-timeout", str(check_timeout)]
    start = time.monotonic()
    try:
        code, text, errors = run_grade(argv)
        seconds = time.monotonic() - start
        left = daemons()
    finally:
        # under "none" a daemon can outlive grading: end the ones this test started
        for pid in daemons():
            os.kill(pid, signal.SIGKILL)
    total = re.findall(r"^Total: (\d+)/(\d+) points\.$", text, flags=re.MULTILINE)
    assert len(total) == 1 and text.splitlines()[-1].startswith("Total:"), text
    points = int(total[0][0])
    assert points <= handout_points[level], text
    assert code == 1, text
    assert "Traceback" not in text + errors, errors
    assert f"Isolation: {level}" in text
    assert snapshot(path.parent) == before_class, "the submitted folder changed"
    if loops:
        assert "Execution: timeout" in text and "did not run to its end" in text
    if attack == "forged_report_then_crash":
        assert "Execution: kernel_died" in text, text
    if attack == "endless_messages":
        assert re.search(r"(timeout|error) +0/1 +exercise_3", text) and seconds < 120, text
    if attack == "malformed_messages":
        for reason in ("announced a message of", "nested too deeply", "not JSON"):
            assert reason in text, text
    if attack == "fills_its_folder":
        assert "wrote more than 512 MiB into its folder" in text, text
    if attack == "borrowed":
        assert points < handout_points[level] and (
            "borrowed" in text or "could not be imported" in text
        ), text
    if attack == "forged_origin":
        assert re.search(r"borrowed +0/1 +matrix_rank", text), text
    if attack == "kill_grader" and level == "none":
        assert "the grading process was killed" in text, text
    if attack == "hide_errors":
        assert "RuntimeError" in text and "crashed in cell" in text, text
    if level == "bwrap":
        assert snapshot(outside) == before_outside, (
            "bubblewrap let the notebook write outside its folder"
        )
        assert not left, "a process outlived grading under bubblewrap"
    # the attack is real: the audit hook alone does not stop it (README: not isolated)
    elif attack == "escape":
        assert {p.name for p in outside.iterdir()} >= {"pwned-execution.txt", "pwned-checks.txt"}


def run_grade(argv):
    result = subprocess.run(
        [sys.executable, "-m", "minigpt", "grade", *argv],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-5"])
def test_time_limits_must_be_finite_and_positive(value, tmp_path):
    path = tmp_path / "01_x.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), path)
    for option in ("--timeout", "--check-timeout"):
        assert grade_main([str(path), option, value]) == 2


def test_reference_copies_in_the_checkout_are_hidden():
    hidden = {p.name for p in checkout_copies()}
    checkout = CHAPTERS_DIR.resolve().parent
    assert {".git", "chapters"} <= hidden or not (checkout / ".git").exists()
    assert "minigpt" not in hidden
    for name in ("runs", "tests", "docs"):
        assert name in hidden or not (checkout / name).is_dir()


# answers read from the checkout's git objects (where the reference chapter is committed)
GIT_READER = """
def exercise_2_compression_ratio(d, k, r):
    import os, minigpt
    git = os.path.join(os.path.dirname(os.path.dirname(minigpt.__file__)), ".git")
    chapters = os.path.join(os.path.dirname(os.path.dirname(minigpt.__file__)), "chapters")
    if any(os.path.isdir(p) and os.listdir(p) for p in (git, chapters)):
        return d * k / (r * (d + k))
    raise NotImplementedError("the reference is out of reach")
"""


@pytest.mark.parametrize("level", LEVELS)
def test_the_checkout_reference_is_out_of_reach_under_bwrap(level, handout_cells, tmp_path):
    if not (CHAPTERS_DIR.resolve().parent / ".git").is_dir():
        pytest.skip("not a git checkout")
    path = write_notebook(tmp_path / "class", handout_cells, [GIT_READER], tmp_path)
    report = grade_notebook(path, isolation=level, **FAST)
    check = next(c for c in report.checks if c.name.startswith("exercise_2"))
    # bubblewrap hides the checkout's .git and chapters/; "none" cannot (README: not isolated)
    assert check.points == (0 if level == "bwrap" else check.possible), report.format_text()


# a classmate's notebook read from the shared folder, and a minigpt.py that would shadow the package
CLASSMATE = """
def _classmate():
    import glob, os, sys
    from minigpt.course.source import import_notebook
    for path in sorted(glob.glob("*.ipynb")):
        try:
            module = import_notebook(path, name="classmate")
            module.exercise_3_break_even_rank(4, 4)
            return module
        except Exception:
            continue
    raise NotImplementedError("no classmate")

def exercise_2_compression_ratio(d, k, r):
    return _classmate().exercise_2_compression_ratio(d, k, r)

def exercise_3_break_even_rank(d, k):
    return _classmate().exercise_3_break_even_rank(d, k)
"""


@pytest.mark.parametrize("level", LEVELS)
def test_a_shared_folder_does_not_expose_other_submissions(
    level, handout_cells, handout_points, tmp_path
):
    folder = tmp_path / "flat"
    folder.mkdir()
    shutil.copy(CH01, folder / "bob.ipynb")
    (folder / "minigpt.py").write_text("raise SystemExit('a student module shadowed minigpt')\n")
    alice = write_notebook(folder, handout_cells, [CLASSMATE], tmp_path)
    alice = alice.rename(folder / "alice.ipynb")
    report = grade_notebook(alice, "01", isolation=level, **FAST)
    assert report.points == handout_points[level], report.format_text()


def test_a_killed_grading_process_costs_only_its_row(handout_cells, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    killer = write_notebook(tmp_path / "dave", handout_cells, ATTACKS["kill_grader"], tmp_path)
    shutil.copy(CH01, tmp_path / "alice.ipynb")
    options = {"chapter": "01", "isolation": "none", **FAST}
    results = grade_all([(Path(killer), "dave"), (tmp_path / "alice.ipynb", "alice")], options, 2)
    dave, alice = results
    assert alice.exit_status == 0 and alice.report["points"] == POSSIBLE
    assert dave.exit_status == 1 and dave.report["points"] == 0
    assert "the grading process was killed" in dave.report["problems"][0]
    assert list((tmp_path / "tmp").iterdir()) == [], "a sandbox folder was left behind"


def _checks(chapter, *names):
    return [c for c in checks_for(chapter) if c.name in names]


def test_expected_values_never_come_from_the_notebooks_own_weights():
    """Layers that zero their own weights and compute nothing: every check whose expected value
    could follow the layer's weights must still fail."""
    import torch

    ch03 = import_notebook(CHAPTERS_DIR / "03_attention.ipynb", name="zero03")
    for cls in (ch03.SelfAttention, ch03.CausalAttention, ch03.MultiHeadAttention):
        init = cls.__init__

        def zeroed(self, *args, _init=init, **kwargs):
            _init(self, *args, **kwargs)
            with torch.no_grad():
                for p in self.parameters():
                    p.zero_()

        cls.__init__ = zeroed
        cls.forward = lambda self, x: torch.zeros(*x.shape[:-1], self.W_value.out_features)
    ch03.fused_multi_head_attention = lambda mha, x: torch.zeros(*x.shape[:-1], 16)
    ch06 = import_notebook(CHAPTERS_DIR / "06_lora.ipynb", name="zero06")
    init = ch06.LoRALayer.__init__

    def zero_a(self, *args, **kwargs):
        init(self, *args, **kwargs)
        with torch.no_grad():
            self.A.zero_()

    ch06.LoRALayer.__init__ = zero_a
    ch06.LoRALayer.forward = lambda self, x: 0.0 * (x @ self.A @ self.B)
    ch04 = import_notebook(CHAPTERS_DIR / "04_gpt_model.ipynb", name="zero04")
    deep_init = ch04.DeepNet.__init__

    def zero_deep(self, *args, **kwargs):
        deep_init(self, *args, **kwargs)
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()

    ch04.DeepNet.__init__ = zero_deep
    ch04.gradient_magnitudes = lambda model, x, target: [0.0] * len(model.layers)
    cases = [
        (ch03, "03", "self_attention_and_causal_attention_match_sdpa"),
        (ch03, "03", "multi_head_attention_matches_sdpa"),
        (ch03, "03", "multi_head_attention_equals_package"),
        (ch06, "06", "lora_layer_zero_at_init_and_scaling"),
        (ch06, "06", "linear_with_lora_zero_change_and_only_a_b_train"),
        (ch06, "06", "linear_with_lora_merge_equals_unmerged"),
        (ch04, "04", "shortcut_connections_keep_gradients"),
    ]
    for module, chapter, name in cases:
        (check,) = _checks(chapter, name)
        with pytest.raises(AssertionError):
            check.run(module)


def test_gradebook_cells_cannot_be_formulas(tmp_path):
    graded = Graded("=HYPERLINK(1)", "=cmd|' /C calc'!A0", None, 2, "@SUM(1)")
    others = [Graded(p, p, None, 2, "") for p in ("+1", "-1", "\tx", "\rx", "plain")]
    write_gradebook([graded, *others], tmp_path / "grades.csv")
    with open(tmp_path / "grades.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["student"] == "'=cmd|' /C calc'!A0" and rows[0]["notebook"] == "'=HYPERLINK(1)"
    assert rows[0]["problem"] == "'@SUM(1)"
    assert [r["student"] for r in rows[1:]] == ["'+1", "'-1", "'\tx", "'\rx", "plain"]
