"""Several fine-tuning runs at once: one worker process per core, one thread each.

The lab's steps are small (16 windows of 32 tokens through a 4 x 128 model), too small for two
threads to share one step well: they spend much of it waiting for each other. Two processes with one
thread each keep both cores busy instead. On the 2-core development machine (``scripts/load_test.py
--pool 2 --workload finetune``, README "Under load" and "Chapter run times") two one-thread
processes together ran 1.2-1.5x the tokens/s of one two-thread process in float32 and 1.4-2.0x in
bf16, which pays again with one thread: 1.6-1.7x the lab's former float32 single-process setting. A
course run gains ~1.3-1.5x per chapter: groups of three runs leave one core idle for a third of the
time, and each run's evaluation is a fixed cost.

A worker gets the shared state (for the lab: the base model and the data) once, when it starts, and
sends back only what the work function returns; the lab's parent process writes the cache, so only
one process writes (:meth:`minigpt.lab.runs.Lab.runs`).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

from minigpt._validate import UserError

# each worker holds its own torch and its own copy of the state (the base model, the data)
MAX_WORKERS = 8


_STATE: dict = {}


def lab_workers(smoke: bool = False) -> int:
    """How many runs the lab trains at once: ``$MINIGPT_LAB_WORKERS`` when set, 1 in smoke mode,
    else one per core this process may use (fewer when ``OMP_NUM_THREADS`` says fewer cores are
    free, as :func:`minigpt.apply_cpu_thread_settings` does when other work is running), at most
    :data:`MAX_WORKERS`."""
    value = os.environ.get("MINIGPT_LAB_WORKERS")
    if value is not None:
        if not value.strip().isdigit() or int(value) < 1:
            raise UserError(
                f"MINIGPT_LAB_WORKERS must be a whole number of processes >= 1, got {value!r}"
            )
        return int(value)
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    # spawned workers re-import __main__
    if smoke or (main_file is not None and not os.path.isfile(main_file)):
        return 1
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    budget = os.environ.get("OMP_NUM_THREADS", "")
    if budget.strip().isdigit() and int(budget) >= 1:
        cores = min(cores, int(budget))
    return max(1, min(cores, MAX_WORKERS))


def _start_worker(work: Callable, state: bytes) -> None:
    from minigpt import keep_freed_memory

    # Ctrl-C is the parent's to handle: it stops the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    keep_freed_memory()
    _STATE.update(work=work, state=torch.load(io.BytesIO(state), weights_only=False))


def _run(item):
    return _STATE["work"](_STATE["state"], item)


class LabPool:
    """``workers`` spawned processes, each calling ``work(state, item)`` for the items it is given.

    ``work`` must be a module-level function (it is pickled by name); ``state`` (the base model, the
    data) is sent to each worker once, when it starts.
    """

    def __init__(self, work: Callable, state: dict, workers: int):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.executor = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(work, buffer.getvalue()),
        )

    def map(self, items: list, done: Callable[..., None]) -> None:
        """Run ``work`` on every item; ``done(item, *result)`` is called here, in this process, as
        each one finishes, so finished runs are kept even if a later one fails. The first failure is
        raised."""
        futures = {self.executor.submit(_run, item): item for item in items}
        try:
            for future in as_completed(futures):
                done(futures[future], *future.result())
        # a failed run or Ctrl-C: stop the others too, nothing of theirs is kept
        except BaseException:
            self.close(stop=True)
            raise

    def close(self, stop: bool = False) -> None:
        """Shut the workers down once idle, or at once with ``stop`` (their runs are lost, never
        half-cached)."""
        processes = list((self.executor._processes or {}).values()) if stop else []
        self.executor.shutdown(wait=not stop, cancel_futures=True)
        for process in processes:
            process.terminate()
