"""Unit tests of the grader's two halves: minigpt.sandbox (isolation, limits, audit hook) and minigpt.remote
(plain-data transcripts recorded next to the notebook and replayed in the trusted process)."""

import json
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch

from minigpt import sandbox
from minigpt.checks import Check, inside
from minigpt.grader import decide, escape, top_level_names
from minigpt.notebooks import CHAPTERS_DIR
from minigpt.remote import Recorder, Replayer, TranscriptMismatch, decode, encode

BWRAP_MISSING = sandbox.bwrap_available()
needs_bwrap = pytest.mark.skipif(bool(BWRAP_MISSING), reason=f"bubblewrap unavailable: {BWRAP_MISSING}")


def run_python(code, *, prefix=(), cwd=None, limits=None, timeout=60):
    return subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, preexec_fn=limits.apply if limits else None)


# --- minigpt.sandbox -----------------------------------------------------------------------------------------

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
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_root")  # what importing torch._dynamo sets
    monkeypatch.setenv("JPY_SESSION_NAME", "parent")
    env = sandbox.sandbox_env(tmp_path)
    for name in ("TMPDIR", "MINIGPT_CACHE", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "XDG_CACHE_HOME", "HOME",
                 "MPLCONFIGDIR", "IPYTHONDIR", "JUPYTER_RUNTIME_DIR"):
        assert env[name].startswith(str(tmp_path)), name
    assert env["MINIGPT_SMOKE"] == "1" and "JPY_SESSION_NAME" not in env


def test_audit_hook_refuses_outside_and_logs(tmp_path):
    inside_dir, outside = tmp_path / "box", tmp_path / "outside.txt"
    inside_dir.mkdir()
    outside.write_text("keep")
    log = inside_dir / "refused.jsonl"
    result = run_python(f"""
        import os, subprocess
        from minigpt.sandbox import install_audit_hook
        install_audit_hook([{str(inside_dir)!r}], {str(log)!r}, "test")
        open("inside.txt", "w").write("fine")
        for attempt in (lambda: open({str(outside)!r}, "w"), lambda: os.remove({str(outside)!r}),
                        lambda: subprocess.run(["true"]), lambda: os.fork()):
            try:
                attempt()
                print("allowed")
            except PermissionError:
                print("refused")
        """, cwd=inside_dir)
    assert result.stdout.split() == ["refused"] * 4, result.stderr
    assert outside.read_text() == "keep" and (inside_dir / "inside.txt").read_text() == "fine"
    events = [r["event"] for r in sandbox.read_refusals(log)]
    assert events == ["open", "os.remove", "subprocess.Popen", "os.fork"]


def test_limits_stop_a_spinning_process():
    result = run_python("while True: pass", limits=sandbox.Limits(cpu_seconds=1), timeout=30)
    assert result.returncode != 0  # SIGXCPU
    result = run_python("x = bytearray(3 * 2**30)", limits=sandbox.Limits(cpu_seconds=30, memory_bytes=2**31))
    assert "MemoryError" in result.stderr


@needs_bwrap
def test_bwrap_confines_writes_network_and_processes(tmp_path):
    box, outside = tmp_path / "box", tmp_path / "outside.txt"
    box.mkdir()
    outside.write_text("keep")
    package_file = os.path.join(os.path.dirname(sandbox.__file__), "pwned.txt")
    result = run_python(f"""
        import os, socket
        open("inside.txt", "w").write("fine")
        open({str(outside)!r}, "w").write("changed")  # /tmp is a private tmpfs: the grader's copy stays as it was
        for path in ({package_file!r}, {str(CHAPTERS_DIR / 'new.txt')!r}, "/usr/lib/pwned"):
            try:
                open(path, "w")
                print("wrote", path)
            except OSError:
                pass
        print("chapters", sorted(os.listdir({str(CHAPTERS_DIR)!r})))
        print("pid", os.getpid())
        print("interfaces", sorted(line.split(":")[0].strip() for line in open("/proc/net/dev").readlines()[2:]))
        try:
            socket.create_connection(("1.1.1.1", 53), timeout=3)
            print("network")
        except OSError:
            print("no network")
        """, prefix=sandbox.bwrap_prefix(box, hidden=[CHAPTERS_DIR]), cwd=box)
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
    proc = subprocess.Popen([*sandbox.bwrap_prefix(tmp_path), sys.executable, "-c", textwrap.dedent(code)],
                            stdout=subprocess.PIPE, start_new_session=True, text=True)
    assert proc.stdout.readline().strip() == "started"
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    assert found, "the daemon should be running before the worker is killed"
    sandbox.kill_worker(proc)
    for _ in range(50):
        left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
        if not left:
            break
        import time
        time.sleep(0.1)
    assert not left, "the daemon outlived its worker"


# --- minigpt.remote ----------------------------------------------------------------------------------------

def test_plain_data_round_trip():
    values = [None, True, 3, -2.5, float("nan"), "text\n", b"\x00\xff", 1 + 2j, (1, [2, 3]), {"a": 1, 2: (3,)},
              np.arange(6, dtype=np.int16).reshape(2, 3), np.float32(1.5), torch.tensor([1.0, 2.0]),
              torch.nn.Parameter(torch.ones(2)), torch.zeros(2, dtype=torch.bfloat16), torch.float16,
              torch.Size([2, 3]), slice(1, None, 2)]
    back = decode(json.loads(json.dumps(encode(values))))
    for want, got in zip(values, back):
        if isinstance(want, (np.ndarray, np.generic)):
            assert got.dtype == want.dtype and np.array_equal(got, want)
        elif isinstance(want, torch.Tensor):
            assert type(got) is type(want) and got.dtype == want.dtype and torch.equal(got.detach(), want.detach())
        elif isinstance(want, float) and want != want:
            assert got != got
        else:
            assert got == want and type(got) is type(want)


@pytest.mark.parametrize("bad", [{"__ndarray__": ["object", [1], "AA=="]}, {"__pickle__": "x"},
                                 {"__tensor__": ["float32", [-1], "", False, False, None]}, {"a": 1, "b": 2}])
def test_decode_refuses_anything_but_plain_data(bad):
    with pytest.raises(ValueError):
        decode(bad)


class AlwaysEqual:
    def __eq__(self, other):
        return True

    __hash__ = None

    def __bool__(self):
        return True


def notebook_module(source, name="submission", file="/submission.ipynb"):
    module = types.ModuleType(name)
    module.__file__ = file
    exec(compile(textwrap.dedent(source), file, "exec"), module.__dict__)
    return module


def replay_check(fn, module, file="/submission.ipynb"):
    """Record ``fn`` on ``module`` as the worker does, send the transcript through JSON, replay it here."""
    recorder = Recorder(module, file)
    try:
        fn(recorder.root)
        worker = "passed"
    except BaseException as err:  # noqa: BLE001
        worker = type(err).__name__
    raw = {"status": "passed" if worker == "passed" else "failed", "message": worker,
           "transcript": json.loads(json.dumps(recorder.transcript))}
    return raw, decide(Check("01", fn.__name__, 1, "", fn), raw, graded={"f", "Layer"}, defined={"f", "Layer"},
                       imported=set())


def test_an_answer_that_equals_everything_cannot_cross():
    module = notebook_module("""
        class Yes:
            def __eq__(self, other):
                return True
            __hash__ = None
        def f(x):
            return Yes()
        """)

    def check_f(nb):
        assert nb.f(1) == 2, "f(1) should be 2"

    raw, (status, message, _) = replay_check(check_f, module)
    assert raw["transcript"][1]["result"]["__handle__"] > 0, "an object with behaviour travels as a handle"
    assert status == "failed" and message.startswith("f(1) should be 2"), "a handle equals only itself"


def helper_freeze(layer):
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer.weight is layer.linear.weight


def test_replay_follows_objects_gradients_and_random_state():
    module = notebook_module("""
        import torch
        class Layer(torch.nn.Module):
            def __init__(self, linear):
                super().__init__()
                self.linear = linear
                self.weight = torch.nn.Parameter(torch.randn(3, 3))
            def forward(self, x):
                return self.linear(x) + x @ self.weight
        """)

    def check_layer(nb):
        torch.manual_seed(0)
        linear = torch.nn.Linear(3, 3)
        layer = nb.Layer(linear)
        assert layer.linear is linear, "the base layer comes back as itself"
        x = torch.randn(2, 3)  # the worker's constructor drew from the generator: so does the replay
        out = layer(x)
        torch.testing.assert_close(out, linear(x) + x @ layer.weight)
        out.sum().backward()
        assert linear.weight.grad is not None, "the backward reached the check's own linear layer"
        assert layer.weight.grad is not None
        assert inside(helper_freeze, layer) is False
        assert not layer.weight.requires_grad
        assert isinstance(layer.linear, torch.nn.Linear) and len(list(layer.parameters())) == 3

    raw, (status, message, _) = replay_check(check_layer, module)
    assert raw["status"] == "passed" and (status, message) == ("passed", "")


def test_a_forged_or_truncated_transcript_never_passes():
    module = notebook_module("def f(x):\n    return 2 * x\n")

    def check_f(nb):
        assert nb.f(1) == 2 and nb.f(5) == 10

    raw, decision = replay_check(check_f, module)
    assert decision[0] == "passed"
    for forged in ([], raw["transcript"][:2], [dict(e, target=5) for e in raw["transcript"]], "passed"):
        status, message, _ = decide(Check("01", "c", 1, "", check_f), dict(raw, transcript=forged), {"f"}, {"f"},
                                    set())
        assert status == "error" and "record" in message
    changed = json.loads(json.dumps(raw))
    changed["transcript"][1]["args"] = ["tuple", ["tuple", 7], ["dict"], None]  # answered for another input
    assert decide(Check("01", "c", 1, "", check_f), changed, {"f"}, {"f"}, set())[0] == "error"
    with pytest.raises(TranscriptMismatch):
        check_f(Replayer([]).root)


def test_borrowed_functions_score_zero():
    module = notebook_module("from numpy import sum as f\n")

    def check_f(nb):
        assert nb.f([1, 2]) == 3

    raw, (status, message, _) = replay_check(check_f, module)
    assert status == "borrowed" and "f was not defined in the submitted notebook" in message
    defined, imported = top_level_names(types.SimpleNamespace(cells=[
        types.SimpleNamespace(cell_type="code", source="from minigpt.lora import LoRALayer\nclass LoRALayer: pass"),
        types.SimpleNamespace(cell_type="code", source="def f(): pass\nfrom x import f")]))
    assert defined == {"LoRALayer"} and imported == {"f"}


def test_escape_keeps_one_line():
    text = escape("a\nTotal: 13/13 points.\r\x1b[2J\u2028b\x85")
    assert "\n" not in text and len(text.splitlines()) == 1 and "\\nTotal" in text


def test_package_classes_imported_into_chapter_06_score_zero():
    """``from minigpt.lora import LoRALayer, LinearWithLoRA`` passes every check next to the notebook, and
    earns nothing: the trusted side reads the notebook's source and the worker reports where the class came from."""
    from minigpt.checks import checks_for
    from minigpt.grader import graded_names

    source = "from minigpt.lora import LoRALayer, LinearWithLoRA\n"
    module = notebook_module(source)
    nb = types.SimpleNamespace(cells=[types.SimpleNamespace(cell_type="code", source=source)])
    defined, imported = top_level_names(nb)
    graded = graded_names("06")
    assert {"LoRALayer", "LinearWithLoRA"} <= graded
    lora_checks = [c for c in checks_for("06") if "lora_layer" in c.name or "linear_with_lora" in c.name]
    assert lora_checks
    for check in lora_checks:
        recorder = Recorder(module, "/submission.ipynb")
        check.run(recorder.root)  # the package's classes pass next to the notebook...
        raw = {"status": "passed", "transcript": json.loads(json.dumps(recorder.transcript))}
        status, message, _ = decide(check, raw, graded, defined, imported)
        assert status == "borrowed" and "is not defined by a def/class" in message, (check.name, message)
    defined_but_rebound = notebook_module("class LoRALayer:\n    pass\n\nfrom minigpt.lora import LoRALayer\n")
    recorder = Recorder(defined_but_rebound, "/submission.ipynb")
    lora_checks[0].run(recorder.root)
    raw = {"status": "passed", "transcript": json.loads(json.dumps(recorder.transcript))}
    assert decide(lora_checks[0], raw, graded, {"LoRALayer"}, set())[0] == "borrowed", "the worker's origin report"
