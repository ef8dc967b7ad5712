"""minigpt: the shared package of the minigpt-lora course.

Each chapter notebook builds one piece; the piece lives here once so that later chapters import it.
Data flows one way: tokenizer -> data -> model -> train/generate -> lora -> pissa/dora -> compare.
"""

import ctypes
import os
import sys
import time

# the errors every entry point raises for a user's mistake (one line; exit 2 on the command line)
from minigpt._validate import UserError, UserTypeError  # noqa: E402, F401

__version__ = "0.1.0"

SMOKE_ENV = "MINIGPT_SMOKE"


def smoke_mode() -> bool:
    """True when ``MINIGPT_SMOKE`` is set to a true value: notebooks then use tiny sizes and few
    steps."""
    return os.environ.get(SMOKE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


# What the course sets when other processes already keep the cores busy: OpenMP threads that sleep
# while they wait instead of spinning, and only as many threads as there are cores left (at least
# one). Measured on 2 cores next to one busy training process (scripts/load_test.py,
# docs/results.md, "Under load"), with bf16 steps: pretraining steps run at 1/2.0 of the default's
# idle speed with one passive thread (1/7.4 with the defaults), the lab's small fine-tuning steps at
# 1/1.9 (1/4.8 with the defaults; 1/3.2 with two passive threads). On idle cores both cost speed
# (PASSIVE 15-30 %, one thread ~40 %), which is why nothing is set then. OpenMP reads these once,
# when torch is imported, so they are decided before that: by ``python -m minigpt`` (the course's
# notebook kernels inherit them) and by each chapter's first code cell. None: cores left, see below
CPU_THREAD_SETTINGS = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "OMP_NUM_THREADS": None,
}


def busy_cores(interval: float = 0.3) -> float | None:
    """How many cores are busy right now (from ``/proc/stat`` over ``interval`` seconds); None off
    Linux."""

    def snapshot() -> tuple[float, float]:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait

    try:
        total0, idle0 = snapshot()
        time.sleep(interval)
        total1, idle1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / total) if total > 0 else 0.0


def apply_cpu_thread_settings(busy: float | None = None) -> dict[str, str]:
    """If other work keeps at least half a core busy, put :data:`CPU_THREAD_SETTINGS` into the
    environment (keeping any value the user set): passive waiting, and one OpenMP thread per core
    the others leave free. ``busy`` defaults to :func:`busy_cores` now. Effective for torch imported
    after this call, in this process or its children. Returns the settings in force."""
    busy = busy_cores() if busy is None else busy
    if busy is not None and busy >= 0.5:
        free_cores = max(1, (os.cpu_count() or 1) - round(busy))
        for key, value in CPU_THREAD_SETTINGS.items():
            os.environ.setdefault(key, str(free_cores) if value is None else value)
    return {key: os.environ[key] for key in CPU_THREAD_SETTINGS if key in os.environ}


_HEAP_KEPT = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve large blocks from its heap and keep freed memory for reuse (Linux
    only).

    By default glibc maps each block of 32 MiB or more (one batch's logits: 64 x 32 x 4,096 floats)
    fresh from the kernel and returns it on ``free``, so every training step pays page faults to
    zero that memory again. Measured on the 2-core development machine (scripts/load_test.py
    --speed, and a profile): a tiny-model pretraining step spent a fifth of its time in the kernel;
    keeping the memory cut it from 200 to 168 ms in float32 and from 144 to 111 ms in bf16. The
    cost: the process holds on to its peak memory until it exits. Skipped when the environment
    already configures malloc (``MALLOC_*``, ``GLIBC_TUNABLES``, ``LD_PRELOAD``) or sets
    ``MINIGPT_MALLOC=default``. Returns True when the setting is in force.
    """
    global _HEAP_KEPT
    if _HEAP_KEPT:
        return True
    configured = any(
        key.startswith("MALLOC_") or key in ("GLIBC_TUNABLES", "LD_PRELOAD") for key in os.environ
    )
    if (
        not sys.platform.startswith("linux")
        or configured
        or os.environ.get("MINIGPT_MALLOC") == "default"
    ):
        return False
    try:
        # glibc; absent (AttributeError) with some other C libraries
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's <malloc.h>
    _HEAP_KEPT = bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))
    return _HEAP_KEPT
