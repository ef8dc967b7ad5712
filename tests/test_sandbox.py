"""Unit tests of the grader's parts: minigpt.classroom.sandbox (isolation, limits, audit hook),
minigpt.classroom.codec (plain data), and minigpt.classroom.remote / wire (checks in the trusted
process talking to a real worker that holds the notebook's objects)."""

import contextlib
import json
import os
import random
import subprocess
import sys
import textwrap
import time
import types

import nbformat
import numpy as np
import pytest
import torch

from minigpt.classroom import sandbox
from minigpt.classroom.checks import (
    Check,
    assign,
    checks_for,
    fetched,
    held,
    inside,
    square_sum_backward,
)
from minigpt.classroom.codec import decode, encode
from minigpt.classroom.grader import _Worker, borrowed, run_one
from minigpt.classroom.inputs import graded_names, top_level_names
from minigpt.classroom.remote import Remote
from minigpt.classroom.report import escape
from minigpt.classroom.wire import ChannelError, CheckTimeout
from minigpt.course.chapters import CHAPTERS_DIR

BWRAP_MISSING = sandbox.bwrap_available()
needs_bwrap = pytest.mark.skipif(
    bool(BWRAP_MISSING), reason=f"bubblewrap unavailable: {BWRAP_MISSING}"
)


def run_python(code, *, prefix=(), cwd=None, limits=None, timeout=60):
    return subprocess.run(
        [*prefix, sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        preexec_fn=limits.apply if limits else None,
    )


# --- minigpt.classroom.sandbox
# -----------------------------------------------------------------------------------------


def test_isolation_levels(monkeypatch):
    assert sandbox.resolve_isolation("none") == "none"
    with pytest.raises(ValueError, match="isolation must be one of"):
        sandbox.resolve_isolation("docker")
    monkeypatch.setattr(sandbox, "bwrap_available", lambda: "bwrap is not installed")
    assert sandbox.resolve_isolation("auto") == "none"
    with pytest.raises(RuntimeError, match="bwrap is not installed"):
        sandbox.resolve_isolation("bwrap")
    monkeypatch.setattr(sandbox, "bwrap_available", lambda: "")
    assert sandbox.resolve_isolation("auto") == "bwrap"


def test_worker_environment_keeps_caches_inside_the_sandbox(tmp_path, monkeypatch):
    # what importing torch._dynamo sets
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_root")
    monkeypatch.setenv("JPY_SESSION_NAME", "parent")
    env = sandbox.sandbox_env(tmp_path)
    for name in (
        "TMPDIR",
        "MINIGPT_CACHE",
        "TORCHINDUCTOR_CACHE_DIR",
        "TRITON_CACHE_DIR",
        "XDG_CACHE_HOME",
        "HOME",
        "MPLCONFIGDIR",
        "IPYTHONDIR",
        "JUPYTER_RUNTIME_DIR",
    ):
        assert env[name].startswith(str(tmp_path)), name
    assert env["MINIGPT_SMOKE"] == "1" and "JPY_SESSION_NAME" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["HIP_VISIBLE_DEVICES"] == ""


def test_worker_sees_no_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    result = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
        env=sandbox.sandbox_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.split() == ["0"], result.stderr


def test_audit_hook_refuses_outside_and_logs(tmp_path):
    inside_dir, outside = tmp_path / "box", tmp_path / "outside.txt"
    inside_dir.mkdir()
    outside.write_text("keep")
    log = inside_dir / "refused.jsonl"
    result = run_python(
        f"""
        import os, subprocess
        from minigpt.classroom.sandbox import install_audit_hook
        install_audit_hook([{str(inside_dir)!r}], {str(log)!r}, "test")
        open("inside.txt", "w").write("fine")
        folder = os.open({str(tmp_path)!r}, os.O_RDONLY)
        for attempt in (lambda: open({str(outside)!r}, "w"), lambda: os.remove({str(outside)!r}),
                        lambda: subprocess.run(["true"]), lambda: os.fork(),
                        lambda: os.open("outside.txt", os.O_WRONLY, dir_fd=folder)):
            try:
                attempt()
                print("allowed")
            except PermissionError:
                print("refused")
        """,
        cwd=inside_dir,
    )
    assert result.stdout.split() == ["refused"] * 5, result.stderr
    assert outside.read_text() == "keep" and (inside_dir / "inside.txt").read_text() == "fine"
    events = [r["event"] for r in sandbox.read_refusals(log)]
    assert events[:4] == ["open", "os.remove", "subprocess.Popen", "os.fork"]
    assert events[4].startswith("os.open")


def test_files_from_the_sandbox_are_read_with_a_cap(tmp_path):
    log = tmp_path / "refused.jsonl"
    line = json.dumps({"phase": "x", "event": "open", "path": "/p"})
    log.write_text(line + "\n" + "y" * (3 * 2**20) + "\n" + line + "\n")
    assert sandbox.read_refusals(log) == [{"phase": "x", "event": "open", "path": "/p"}]
    assert len(sandbox.read_capped(log, 1000)) == 1000
    (tmp_path / "link").symlink_to(log)
    assert sandbox.read_capped(tmp_path / "link", 1000) == b""
    assert sandbox.folder_size(tmp_path, 2**20) > 2**20


@needs_bwrap
def test_bwrap_tmpfs_mounts_are_size_limited(tmp_path):
    assert sandbox.tmpfs_size_supported()
    code = """
        import os
        for folder in ("/tmp", "/dev/shm"):
            written = 0
            try:
                with open(folder + "/fill", "wb") as handle:
                    for _ in range(64):
                        handle.write(b"x" * 2**23)
                        written += 2**23
            except OSError:
                pass
            print(folder, written // 2**20)
            os.remove(folder + "/fill")
        """
    result = run_python(code, prefix=sandbox.bwrap_prefix(tmp_path), cwd=tmp_path)
    sizes = dict(line.split() for line in result.stdout.splitlines())
    assert set(sizes) == {"/tmp", "/dev/shm"}, result.stderr
    assert all(int(v) <= sandbox.TMPFS_BYTES // 2**20 for v in sizes.values()), sizes


def test_limits_stop_a_spinning_process():
    result = run_python("while True: pass", limits=sandbox.Limits(cpu_seconds=1), timeout=30)
    assert result.returncode != 0  # SIGXCPU
    result = run_python(
        "x = bytearray(3 * 2**30)", limits=sandbox.Limits(cpu_seconds=30, memory_bytes=2**31)
    )
    assert "MemoryError" in result.stderr


@needs_bwrap
def test_bwrap_confines_writes_network_and_processes(tmp_path):
    box, outside = tmp_path / "box", tmp_path / "outside.txt"
    box.mkdir()
    outside.write_text("keep")
    package_file = os.path.join(os.path.dirname(sandbox.__file__), "pwned.txt")
    result = run_python(
        f"""
        import os, socket
        open("inside.txt", "w").write("fine")
        open({str(outside)!r}, "w").write("changed")  # /tmp is a private tmpfs: the grader's copy stays as it was
        for path in ({package_file!r}, {str(CHAPTERS_DIR / "new.txt")!r}, "/usr/lib/pwned"):
            try:
                open(path, "w")
                print("wrote", path)
            except OSError:
                pass
        print("chapters", sorted(os.listdir({str(CHAPTERS_DIR)!r})))
        print("pid", os.getpid())
        print("interfaces", sorted(line.split(":")[0].strip() for line in
        open("/proc/net/dev").readlines()[2:]))
        try:
            socket.create_connection(("1.1.1.1", 53), timeout=3)
            print("network")
        except OSError:
            print("no network")
        """,
        prefix=sandbox.bwrap_prefix(box, hidden=[CHAPTERS_DIR]),
        cwd=box,
    )
    out = result.stdout
    assert "wrote" not in out and "no network" in out and "chapters []" in out, out + result.stderr
    assert "interfaces ['lo']" in out and int(out.split("pid ")[1].split()[0]) < 10
    assert outside.read_text() == "keep" and (box / "inside.txt").read_text() == "fine"
    assert not os.path.exists(package_file) and not (CHAPTERS_DIR / "new.txt").exists()


@needs_bwrap
def test_killing_a_bwrap_worker_kills_its_double_forked_daemon(tmp_path):
    marker = f"sleep {os.getpid() % 1000 + 1000}.4321"
    code = f"""
        import os, subprocess, sys, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv("/bin/sh", ["sh", "-c", "{marker}"])
            os._exit(0)
        print("started", flush=True)
        time.sleep(60)
        """
    proc = subprocess.Popen(
        [*sandbox.bwrap_prefix(tmp_path), sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        start_new_session=True,
        text=True,
    )
    assert proc.stdout.readline().strip() == "started"
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    assert found, "the daemon should be running before the worker is killed"
    sandbox.kill_worker(proc)
    for _ in range(50):
        left = subprocess.run(
            ["pgrep", "-f", marker], capture_output=True, text=True
        ).stdout.split()
        if not left:
            break
        import time

        time.sleep(0.1)
    assert not left, "the daemon outlived its worker"


# --- minigpt.classroom.codec
# ----------------------------------------------------------------------------------------


def test_plain_data_round_trip():
    values = [
        None,
        True,
        3,
        -2.5,
        float("nan"),
        "text\n",
        b"\x00\xff",
        1 + 2j,
        (1, [2, 3]),
        {"a": 1, 2: (3,)},
        np.arange(6, dtype=np.int16).reshape(2, 3),
        np.float32(1.5),
        torch.tensor([1.0, 2.0]),
        torch.nn.Parameter(torch.ones(2)),
        torch.zeros(2, dtype=torch.bfloat16),
        torch.float16,
        torch.Size([2, 3]),
        slice(1, None, 2),
    ]
    back = decode(json.loads(json.dumps(encode(values))))
    for want, got in zip(values, back, strict=True):
        if isinstance(want, (np.ndarray, np.generic)):
            assert got.dtype == want.dtype and np.array_equal(got, want)
        elif isinstance(want, torch.Tensor):
            assert (
                type(got) is type(want)
                and got.dtype == want.dtype
                and torch.equal(got.detach(), want.detach())
            )
        elif isinstance(want, float) and want != want:
            assert got != got
        else:
            assert got == want and type(got) is type(want)


@pytest.mark.parametrize(
    "bad",
    [
        {"__ndarray__": ["object", [1], "AA=="]},
        {"__pickle__": "x"},
        {"__tensor__": ["float32", [-1], "", False, False, None]},
        {"a": 1, "b": 2},
        json.loads("[" * 25 + "1" + "]" * 25),
    ],
)
def test_decode_refuses_anything_but_plain_data(bad):
    with pytest.raises(ValueError):
        decode(bad)


# --- minigpt.classroom.remote and wire: checks here, objects in a real worker
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def served(tmp_path, source):
    """A ``serve`` worker (isolation none) holding ``source``'s definitions; yields a function
    that opens a session with a deadline ``seconds`` from now."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(textwrap.dedent(source))]
    path = tmp_path / "submission.ipynb"
    nbformat.write(nb, path)
    spec = {"submission": str(path), "sandbox": str(tmp_path), "log": str(tmp_path / "log")}
    worker = _Worker(spec, tmp_path, "none", 300)
    try:
        end = time.monotonic() + 120
        assert worker.ready(60, end, fresh=False, startup_end=end)["event"] == "ready"
        yield lambda seconds=60: Remote(worker.channel, time.monotonic() + seconds)
    finally:
        worker.close()


def run_check(session, fn, name="c"):
    return run_one(Check("01", name, 1, "", fn), session())


# writes ``payload`` into every pipe this process holds: the worker's answer channel among them
SEND = """
def _send(payload):
    import os, stat
    for fd in range(3, 64):
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.write(fd, payload)
        except OSError:
            pass

def _frame(body):
    return len(body).to_bytes(8, "big") + body

def _answer(result):
    # the id of the request being answered, read from this process's memory
    import gc
    number = next(o["id"] for o in gc.get_objects() if isinstance(o, dict) and o.get("op") == "call")
    return _frame(b'{"id": %d, "result": %s}' % (number, result))
"""


def test_an_answer_that_equals_everything_cannot_cross(tmp_path):
    source = """
        class Yes:
            def __eq__(self, other):
                return True
            __hash__ = None
        def f(x):
            return Yes()
        """

    def check_f(nb):
        assert nb.f(1) == 2, "f(1) should be 2"

    with served(tmp_path, source) as session:
        outcome = run_check(session, check_f)
    assert outcome.status == "failed" and outcome.message.startswith("f(1) should be 2")


def test_arguments_are_copies_and_the_check_lives_only_here(tmp_path):
    """The notebook zeroes its inputs in place and walks every frame it can reach for the check's
    locals: the check's own objects stay as they were, and its locals are nowhere to be found."""
    source = """
        import sys
        import torch
        def spoil(matrix, layer):
            matrix[...] = 0
            with torch.no_grad():
                layer.weight.zero_()
            found, frame = [], sys._getframe()
            while frame is not None:
                found += [k for k, v in frame.f_locals.items() if isinstance(v, str) and v == "secret"]
                frame = frame.f_back
            return found
        """

    def check_spoil(nb):
        matrix = np.ones((3, 3))
        layer = torch.nn.Linear(3, 3)
        weight = layer.weight.detach().clone()
        expected = "secret"
        assert nb.spoil(matrix, layer) == [], "the check's locals were found"
        assert np.all(matrix == 1) and torch.equal(layer.weight, weight), "inputs changed"
        assert expected == "secret"

    with served(tmp_path, source) as session:
        outcome = run_check(session, check_spoil)
    assert outcome.status == "passed", outcome.message


def test_the_worker_random_state_never_reaches_the_grader(tmp_path):
    source = """
        import random
        import numpy as np
        import torch
        def reseed_the_generators():
            torch.manual_seed(0)
            np.random.seed(0)
            random.seed(0)
            return torch.rand(3)
        """
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    with served(tmp_path, source) as session:
        remote = session()
        remote.root.reseed_the_generators()
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]


def helper_freeze_and_check(layer) -> bool:
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer.weight is layer.linear.weight


def test_handles_held_objects_and_helpers_act_on_the_worker(tmp_path):
    source = """
        import torch
        class Layer(torch.nn.Module):
            def __init__(self, linear):
                super().__init__()
                self.linear = linear
                self.weight = torch.nn.Parameter(torch.zeros(3, 3))
            def forward(self, x):
                return self.linear(x) + x @ self.weight
        def double_in_place(a):
            a *= 2
        """

    def check_layer(nb):
        linear = torch.nn.Linear(3, 3)
        base = held(nb, linear)
        layer = nb.Layer(base)
        assert layer.linear is base, "a held object comes back as the same proxy"
        inside(assign, layer, "weight", torch.eye(3))
        x = torch.randn(2, 3)
        torch.testing.assert_close(layer(x), linear(x) + x)
        out = inside(square_sum_backward, layer, x)
        torch.testing.assert_close(out, linear(x) + x)
        torch.testing.assert_close(layer.weight.grad, 2 * x.T @ out)
        with pytest.raises(TypeError, match="helpers of minigpt.classroom.checks"):
            inside(helper_freeze_and_check, layer)  # a test's own function never runs there
        assert isinstance(layer.linear, torch.nn.Linear)
        array = held(nb, np.ones(2))
        nb.double_in_place(array)
        assert np.array_equal(fetched(array), [2.0, 2.0])

    with served(tmp_path, source) as session:
        outcome = run_check(session, check_layer)
    assert outcome.status == "passed", outcome.message


@pytest.mark.parametrize(
    "payload, reason",
    [
        ("(2**40).to_bytes(8, 'big')", "announced a message of"),
        ("(200003).to_bytes(8, 'big') + b'[' * 100000 + b'1' + b']' * 100000 + b' '", "nested"),
        ("_frame(b'not json!')", "not JSON"),
        ("_frame(b'[]')", "not a JSON object"),
        ("_frame(b'{\"result\": 1}')", "an answer to another request"),
        ("_answer(b'{}')", "malformed answer"),
        ("_answer(b'[' * 30 + b']' * 30)", "malformed answer"),
    ],
)
def test_malformed_answers_fail_the_check_with_one_line(tmp_path, payload, reason):
    source = SEND + f"\ndef f():\n    _send({payload})\n    return 1\n"

    def check_f(nb):
        assert nb.f() == 1

    with served(tmp_path, source) as session:
        with pytest.raises(ChannelError) as caught:
            run_check(session, check_f)
    message = str(caught.value)
    assert reason in message and "\n" not in message and len(message) < 300


def test_a_worker_cannot_extend_its_deadline(tmp_path):
    """A check's deadline is fixed before it starts: a notebook function that keeps the channel
    busy, one byte at a time, is stopped when the deadline passes."""
    source = (
        SEND
        + """
def chatty():
    import time
    _send((1000).to_bytes(8, "big"))  # an answer announced, then sent one byte at a time
    while True:
        _send(b"\\x00")
        time.sleep(0.2)
"""
    )

    def check_chatty(nb):
        nb.chatty()
        nb.chatty()

    with served(tmp_path, source) as session:
        start = time.monotonic()
        with pytest.raises(CheckTimeout):
            run_check(lambda: session(3), check_chatty)
        assert time.monotonic() - start < 10


def test_borrowed_functions_score_zero(tmp_path):
    def check_f(nb):
        assert nb.f([1, 2]) == 3

    with served(tmp_path, "from numpy import sum as f\n") as session:
        outcome = run_check(session, check_f)
    assert outcome.status == "passed"
    message = borrowed(outcome.fetched, {"f"}, {"f"}, set())
    assert "f was not defined in the submitted notebook" in message
    defined, imported = top_level_names(
        types.SimpleNamespace(
            cells=[
                types.SimpleNamespace(
                    cell_type="code",
                    source="from minigpt.lora import LoRALayer\nclass LoRALayer: pass",
                ),
                types.SimpleNamespace(cell_type="code", source="def f(): pass\nfrom x import f"),
            ]
        )
    )
    assert defined == {"LoRALayer"} and imported == {"f"}


def test_escape_keeps_one_line():
    text = escape("a\nTotal: 13/13 points.\r\x1b[2J\u2028b\x85")
    assert "\n" not in text and len(text.splitlines()) == 1 and "\\nTotal" in text


def test_package_classes_imported_into_chapter_06_score_zero(tmp_path):
    """``from minigpt.lora import LoRALayer, LinearWithLoRA`` passes the LoRA checks and earns
    nothing: the trusted side reads the notebook's source, and the worker says where the class came
    from."""
    source = "from minigpt.lora import LoRALayer, LinearWithLoRA\n"
    nb = types.SimpleNamespace(cells=[types.SimpleNamespace(cell_type="code", source=source)])
    defined, imported = top_level_names(nb)
    graded = graded_names("06")
    assert {"LoRALayer", "LinearWithLoRA"} <= graded
    lora_checks = [
        c for c in checks_for("06") if "lora_layer" in c.name or "linear_with_lora" in c.name
    ]
    assert lora_checks
    with served(tmp_path, source) as session:
        for check in lora_checks:
            outcome = run_one(check, session())
            assert outcome.status == "passed", (check.name, outcome.message)
            message = borrowed(outcome.fetched, graded, defined, imported)
            assert "is not defined by a def/class" in message, (check.name, message)
            assert "comes from minigpt.lora" in borrowed(
                outcome.fetched, graded, {"LoRALayer", "LinearWithLoRA"}, set()
            ), "the worker's origin report"


def test_error_hiding_tags_need_a_list_and_the_reference():
    from minigpt.classroom.worker import _excused

    def cell(tags, cell_id="a1"):
        return nbformat.from_dict(
            {"cell_type": "code", "id": cell_id, "metadata": {"tags": tags}, "source": "1 / 0"}
        )

    assert _excused(cell(["raises-exception"]), {"a1"})
    assert not _excused(cell(["raises-exception"]), set()), "not tagged in the reference"
    assert not _excused(cell(["raises-exception"], "b2"), {"a1"}), "another cell of the reference"
    assert not _excused(cell("raises-exception"), {"a1"}), "a string, not a list of tags"
