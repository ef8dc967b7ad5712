"""minigpt: the shared package of the minigpt-lora course.

Each chapter notebook builds one piece; the piece lives here once so that later chapters import it.
Data flows one way: tokenizer -> data -> model -> train/generate -> lora -> pissa/dora -> compare.
"""

import os

__version__ = "0.1.0"

# OpenMP threads that sleep while they wait instead of spinning. On 2 cores shared with one other busy
# process, training then slows ~1.4x instead of ~4x; on idle cores it costs ~7 % (scripts/load_test.py,
# README "Under load"). OpenMP reads it once, when torch is imported, so it is set before that: by
# ``python -m minigpt`` (and so for the course's notebook kernels) and by each chapter's first code cell.
CPU_THREAD_SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE"}


def apply_cpu_thread_settings() -> dict[str, str]:
    """Put :data:`CPU_THREAD_SETTINGS` into the environment, keeping any value the user already set.

    Effective for torch imported after this call (in this process or its children). Returns what is in force.
    """
    for key, value in CPU_THREAD_SETTINGS.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in CPU_THREAD_SETTINGS}
