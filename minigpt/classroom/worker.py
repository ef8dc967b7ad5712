"""The untrusted side of grading: ``python -m minigpt.classroom.worker {execute,serve} SPEC_JSON``
(the grader starts it with the sandbox folder off ``sys.path``, so that nothing in the student's
folder can stand in for ``minigpt``).

This process runs the student's code inside the sandbox :mod:`minigpt.classroom.sandbox` sets up.

``execute``
    Runs the whole notebook with nbclient in a fresh kernel. Its verdict is its exit status
    (:data:`EXIT_STATUS`), which the grader reads from the operating system: the kernel, a child of
    this process, can write into this process's pipes but cannot choose how it exits. The framed
    JSON report it writes on stdout (which cells raised) is only ever shown, never believed.
``serve``
    Imports the notebook's definitions and answers the grader's requests (:mod:`minigpt.classroom.
    remote`): read an attribute, call, index, ``len``, iterate, truth, set an attribute, run a
    helper of :mod:`minigpt.classroom.checks`. Requests are pickles the grader wrote; answers are
    plain data (:mod:`minigpt.classroom.codec`) or handles to objects kept here. No check runs here.

Anything the notebook prints goes to stderr.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import sys
import time
from pathlib import Path

MESSAGE_LIMIT = 2000


# the exit statuses of ``execute``: the grader's only source for how running the notebook went
EXIT_STATUS = {"completed": 0, "raised": 3, "kernel_died": 4, "timeout": 5, "hook": 6}


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(source: str) -> str:
    for line in source.splitlines():
        if line.strip() and not line.strip().startswith("#"):
            return _one_line(line.strip(), 60)
    return _one_line(source.strip(), 60)


def _open_protocol():
    """Keep the real stdin/stdout for the protocol; send everything else the process prints to
    stderr, and give the notebook an empty stdin."""
    from minigpt.classroom.wire import frame

    protocol_out = os.fdopen(os.dup(1), "wb")
    protocol_in = os.fdopen(os.dup(0), "rb")
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout = sys.stderr

    def emit(**event) -> None:
        protocol_out.write(frame(json.dumps(event, allow_nan=True).encode()))
        protocol_out.flush()

    return emit, protocol_in


def _excused(cell, allowed_ids: set[str]) -> bool:
    """A cell whose error is expected: tagged ``raises-exception`` (as a list of tags) where the
    reference chapter's cell with the same id is tagged too."""
    tags = cell.metadata.get("tags", [])
    return isinstance(tags, list) and "raises-exception" in tags and cell.get("id") in allowed_ids


def execute(spec: dict, emit) -> int:
    """Run the notebook with nbclient in a fresh kernel whose cwd is the sandbox, behind the audit
    hook; return the exit status that says how it went."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    from minigpt.classroom.sandbox import hook_cell_source

    sandbox, timeout = Path(spec["sandbox"]), float(spec["timeout"])
    allowed = set(spec.get("excused_cells", []))
    nb = nbformat.read(sandbox / spec["notebook"], as_version=4)
    run_nb = nbformat.v4.new_notebook(metadata=nb.metadata)
    hook = nbformat.v4.new_code_cell(hook_cell_source([str(sandbox)], spec["log"], "execution"))
    run_nb.cells = [hook] + [nbformat.from_dict(c) for c in nb.cells]
    result = {"message": "", "cells_run": 0, "errors": []}
    verdict = "completed"
    deadline = time.monotonic() + timeout
    replies: dict[int, dict] = {}  # cell index -> the kernel's execute_reply content

    def on_cell_executed(cell, cell_index, execute_reply, **_):
        content = (execute_reply or {}).get("content", {})
        replies[cell_index] = content if isinstance(content, dict) else {}

    client = NotebookClient(
        run_nb,
        on_cell_executed=on_cell_executed,
        kernel_name="python3",
        allow_errors=True,
        interrupt_on_timeout=False,
        shutdown_kernel="immediate",
        record_timing=False,
        timeout_func=lambda cell: max(1.0, deadline - time.monotonic()),
        resources={"metadata": {"path": str(sandbox)}},
    )
    position = 0
    try:
        with client.setup_kernel(env=dict(os.environ), stdout=sys.stderr, stderr=sys.stderr):
            client.execute_cell(hook, 0)
            if any(o.output_type == "error" for o in hook.outputs):
                result["message"] = "the grader could not install its audit hook in the kernel"
                return EXIT_STATUS["hook"]
            for position, cell in enumerate(run_nb.cells[1:], start=1):
                if cell.cell_type != "code" or not cell.source.strip():
                    continue
                client.execute_cell(cell, position)
                result["cells_run"] += 1
                if _excused(cell, allowed):
                    continue
                errors = [
                    (out.get("ename", ""), out.get("evalue", ""))
                    for out in cell.outputs
                    if out.output_type == "error"
                ]
                reply = replies.get(position, {})
                if not errors and reply.get("status") == "error":
                    # an error the kernel did not display (a custom exception handler hides it):
                    # the execute_reply this process received still says the cell raised
                    errors = [(str(reply.get("ename", "")), str(reply.get("evalue", "")))]
                for ename, evalue in errors:
                    verdict = "raised"
                    result["errors"].append(
                        {
                            "cell": position,
                            "cell_id": cell.get("id", ""),
                            "first_line": _first_line(cell.source),
                            "ename": str(ename)[:MESSAGE_LIMIT],
                            "evalue": str(evalue)[:MESSAGE_LIMIT],
                        }
                    )
    except CellTimeoutError:
        verdict = "timeout"
        result["message"] = (
            f"cell {position} `{_first_line(run_nb.cells[position].source)}` was still running "
            "when the time limit ran out; later cells were not run"
        )
    except DeadKernelError:
        verdict = "kernel_died"
        result["message"] = (
            f"the kernel died while running cell {position}; later cells were not run"
        )
    except Exception as err:  # noqa: BLE001 - a kernel that cannot start, a notebook nbclient rejects
        verdict = "failed"
        result["message"] = f"could not run the notebook: {type(err).__name__}: {_one_line(err)}"
    finally:
        emit(event="execution", **result)
    return EXIT_STATUS.get(verdict, 1)


class ObjectServer:
    """The worker's table of the notebook's objects, and the operations the grader may ask for."""

    def __init__(self, submission: str):
        self.submission = submission
        self.objects: list = []
        self.ids: dict[int, int] = {}

    def load(self) -> None:
        """A fresh import of the notebook's definitions; every earlier handle is forgotten."""
        from minigpt.course.source import import_notebook

        module = import_notebook(self.submission, name="submission")
        self.objects, self.ids = [module], {id(module): 0}

    def handle_of(self, value) -> dict:
        hid = self.ids.get(id(value))
        if hid is None:
            hid = len(self.objects)
            self.objects.append(value)
            self.ids[id(value)] = hid
        cls = type(value)
        return {"__handle__": hid, "type": f"{cls.__module__}.{cls.__qualname__}"}

    def unpickle(self, data: bytes):
        objects = self.objects

        class _Unpickler(pickle.Unpickler):
            def persistent_load(self, pid):
                kind, hid = pid
                if kind != "handle" or not 0 <= hid < len(objects):
                    raise pickle.UnpicklingError("unknown handle")
                return objects[hid]

        return _Unpickler(io.BytesIO(data)).load()

    def perform(self, request: dict):
        op, name = request["op"], request.get("name")
        args, kwargs, value = request["args"], request["kwargs"], request.get("value")
        target = self.objects[request["target"]]
        if op == "getattr":
            return getattr(target, name)
        if op == "setattr":
            setattr(target, name, value)
            return None
        if op == "call":
            return target(*args, **kwargs)
        if op == "getitem":
            return target[args[0]]
        if op == "setitem":
            target[args[0]] = value
            return None
        if op == "len":
            return int(len(target))
        if op == "bool":
            return bool(target)
        if op == "iter":
            return list(iter(target))
        if op in ("put", "get"):
            return value if op == "put" else target
        if op == "apply":
            module, _, qualname = request["helper"].partition(":")
            package = "minigpt.classroom.checks"
            if module != package and not module.startswith(package + "."):
                raise ValueError(f"not a helper: {module}")
            fn = importlib.import_module(module)
            for part in qualname.split("."):
                fn = getattr(fn, part)
            return fn(*args, **kwargs)
        raise ValueError(f"unknown operation {op}")

    def answer(self, request: dict) -> dict:
        from minigpt.classroom.codec import encode
        from minigpt.classroom.remote import exception_record

        try:
            result = self.perform(request)
            if request["op"] == "put":  # kept here: the grader gets a handle, whatever it is
                reply = {"result": self.handle_of(result)}
            else:
                reply = {"result": encode(result, self.handle_of)}
        except BaseException as err:  # noqa: BLE001 - the student's code may raise anything
            if isinstance(err, KeyboardInterrupt):
                raise
            return {"error": exception_record(err, self.submission)}
        if request["op"] == "getattr" and request["target"] == 0:
            reply["origin"] = _origin(result, self.submission)
        return reply


def _origin(value, notebook_file: str) -> dict | None:
    """Where a function or class fetched from the notebook was defined (the borrowed-solution
    check: it can only take points away, so the worker may be asked)."""
    if isinstance(value, type):
        codes = [v.__code__ for v in vars(value).values() if hasattr(v, "__code__")]
        files = {c.co_filename for c in codes}
        return {
            "module": str(getattr(value, "__module__", "")),
            "in_notebook": bool(codes) and files == {notebook_file},
        }
    code = getattr(value, "__code__", None)
    if callable(value):
        return {
            "module": str(getattr(value, "__module__", "")),
            "in_notebook": code is not None and code.co_filename == notebook_file,
        }
    return None


def _describe(err: BaseException, notebook_file: str) -> dict:
    from minigpt.classroom.remote import exception_record

    record = exception_record(err, notebook_file)
    if record["type"] == "NotImplementedError":
        status = "not_implemented"
    else:
        status = "error"
        record["message"] = f"{record['name']}: {record['message']}"
    return {
        "status": status,
        "message": record["message"][:MESSAGE_LIMIT],
        "location": record["location"],
    }


def serve(spec: dict, emit, requests) -> int:
    """Import the notebook, say so, then answer requests until the grader closes the channel."""
    from minigpt.classroom.sandbox import install_audit_hook
    from minigpt.classroom.wire import read_frame

    install_audit_hook([spec["sandbox"]], spec["log"], "checks")
    server = ObjectServer(spec["submission"])
    emit(event="importing")
    try:
        server.load()
    except BaseException as err:  # noqa: BLE001 - a student's import can raise anything
        emit(event="import_error", **_describe(err, spec["submission"]))
        return 0
    emit(event="ready")
    while True:
        data = read_frame(requests)
        if data is None:
            return 0
        request = server.unpickle(data)
        number = request.get("id")
        if request.get("op") == "reset":
            try:
                server.load()
                emit(event="ready", id=number)
            except BaseException as err:  # noqa: BLE001
                emit(event="import_error", id=number, **_describe(err, spec["submission"]))
            continue
        emit(id=number, **server.answer(request))


def main(argv: list[str]) -> int:
    mode, spec = argv[0], json.loads(argv[1])
    emit, requests = _open_protocol()
    if mode == "execute":
        return execute(spec, emit)
    if mode == "serve":
        return serve(spec, emit, requests)
    raise SystemExit(f"unknown mode {mode!r}")


def run() -> None:
    """The worker's entry point (:data:`minigpt.classroom.sandbox.WORKER_MAIN`)."""
    code = main(sys.argv[1:])
    sys.stderr.flush()
    # no interpreter shutdown: a student's atexit handler or __del__ cannot change the status
    os._exit(code)


if __name__ == "__main__":
    run()
