"""The untrusted side of grading: ``python -m minigpt.worker {execute,checks} SPEC_JSON``.

This process runs the student's code -- the whole notebook (``execute``) or the notebook's definitions under
the chapter's checks (``checks``) -- inside the sandbox :mod:`minigpt.sandbox` sets up. It reports back
on its original stdout, one JSON object per line, and only plain data: how the run went, and for every check
the transcript :class:`minigpt.remote.Recorder` wrote. Anything the notebook prints goes to stderr. The
grader treats every line as untrusted data: it decides nothing from what this process says about
itself, it only replays the transcripts (:mod:`minigpt.grader`).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

MESSAGE_LIMIT = 2000


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(source: str) -> str:
    for line in source.splitlines():
        if line.strip() and not line.strip().startswith("#"):
            return _one_line(line.strip(), 60)
    return _one_line(source.strip(), 60)


def _open_protocol():
    """Keep the real stdout for the protocol; send everything else the process prints to stderr."""
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def emit(**event) -> None:
        protocol.write(json.dumps(event, allow_nan=True) + "\n")
        protocol.flush()

    return emit


def execute(spec: dict, emit) -> None:
    """Run the notebook with nbclient in a fresh kernel whose cwd is the sandbox, behind the audit hook."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    from minigpt.sandbox import hook_cell_source

    sandbox, timeout = Path(spec["sandbox"]), float(spec["timeout"])
    nb = nbformat.read(sandbox / spec["notebook"], as_version=4)
    run_nb = nbformat.v4.new_notebook(metadata=nb.metadata)
    hook = nbformat.v4.new_code_cell(hook_cell_source([str(sandbox)], spec["log"], "execution"))
    run_nb.cells = [hook] + [nbformat.from_dict(c) for c in nb.cells]
    result = {"status": "completed", "message": "", "cells_run": 0, "errors": [],
              "code_cells": sum(c.cell_type == "code" and bool(c.source.strip()) for c in nb.cells)}
    start = time.monotonic()
    deadline = start + timeout
    client = NotebookClient(run_nb, kernel_name="python3", allow_errors=True, interrupt_on_timeout=False,
                            shutdown_kernel="immediate", record_timing=False,
                            timeout_func=lambda cell: max(1.0, deadline - time.monotonic()),
                            resources={"metadata": {"path": str(sandbox)}})
    position = 0
    try:
        with client.setup_kernel(env=dict(os.environ), stdout=sys.stderr, stderr=sys.stderr):
            client.execute_cell(hook, 0)
            if any(o.output_type == "error" for o in hook.outputs):
                result.update(status="failed", message="the grader could not install its audit hook in the kernel")
                return
            for position, cell in enumerate(run_nb.cells[1:], start=1):
                if cell.cell_type != "code" or not cell.source.strip():
                    continue
                if time.monotonic() >= deadline:
                    result.update(status="timeout", message=f"the time limit for the whole notebook ({timeout:g} s) "
                                  f"ran out before cell {position}; it and later cells were not run")
                    break
                client.execute_cell(cell, position)
                result["cells_run"] += 1
                if "raises-exception" in cell.metadata.get("tags", []):
                    continue  # the author marked this cell as meant to raise
                for out in cell.outputs:
                    if out.output_type == "error":
                        result["errors"].append({"cell": position, "cell_id": cell.get("id", ""),
                                                 "first_line": _first_line(cell.source), "ename": out.ename,
                                                 "evalue": out.evalue[:MESSAGE_LIMIT]})
    except CellTimeoutError:
        result.update(status="timeout", message=f"cell {position} `{_first_line(run_nb.cells[position].source)}` "
                      f"was still running when the time limit for the whole notebook ({timeout:g} s) ran out; "
                      "later cells were not run")
    except DeadKernelError:
        result.update(status="kernel_died", message=f"the kernel died while running cell {position}; later cells "
                      "were not run")
    except Exception as err:  # noqa: BLE001 - a kernel that cannot start, a notebook nbclient cannot handle
        result.update(status="failed", message=f"could not run the notebook: {type(err).__name__}: {_one_line(err)}")
    finally:
        result["seconds"] = round(time.monotonic() - start, 3)
        emit(event="execution", **result)


def _describe(err: BaseException, notebook_file: str) -> tuple[str, str, str]:
    frames = traceback.extract_tb(err.__traceback__)
    in_notebook = [f for f in frames if f.filename == notebook_file]
    location = in_notebook[-1].name if in_notebook else ""
    if isinstance(err, NotImplementedError):
        return "not_implemented", str(err) or "NotImplementedError", location
    if isinstance(err, AssertionError):
        return "failed", (str(err) or "assertion failed")[:MESSAGE_LIMIT], ""
    return "error", f"{type(err).__name__}: {err}"[:MESSAGE_LIMIT], location


def run_checks(spec: dict, emit) -> None:
    """Run each named check on a fresh import of the notebook, recording its conversation with it."""
    from minigpt.checks import checks_for
    from minigpt.notebooks import import_notebook
    from minigpt.remote import Recorder
    from minigpt.sandbox import install_audit_hook

    checks = {c.name: c for c in checks_for(spec["chapter"])}
    install_audit_hook([spec["sandbox"]], spec["log"], "checks")
    submission = spec["submission"]
    emit(event="importing")
    try:
        import_notebook(submission, name="submission")
    except BaseException as err:  # noqa: BLE001 - a student's import can raise anything, SystemExit included
        status, message, location = _describe(err, submission)
        emit(event="import_error", status=status, message=message, location=location)
        return
    for name in spec["names"]:
        emit(event="start", name=name)
        start = time.perf_counter()
        recorder = None
        try:
            recorder = Recorder(import_notebook(submission, name="submission"), submission)
            checks[name].run(recorder.root)
            status, message, location = "passed", "", ""
        except BaseException as err:  # noqa: BLE001
            status, message, location = _describe(err, submission)
        transcript = recorder.transcript if recorder is not None else []
        emit(event="result", name=name, status=status, message=message, location=location,
             seconds=round(time.perf_counter() - start, 3), transcript=transcript)


def main(argv: list[str]) -> int:
    mode, spec = argv[0], json.loads(argv[1])
    emit = _open_protocol()
    if mode == "execute":
        execute(spec, emit)
    elif mode == "checks":
        run_checks(spec, emit)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
