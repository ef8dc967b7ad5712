"""Progress bars: a widget in a live Jupyter notebook, a line of text everywhere else.

``tqdm.auto`` alone would also draw widgets while ``python -m minigpt course`` executes a chapter
headless, where no one sees them and the saved notebook keeps only the widget's first state; and
without ``ipywidgets`` it warns. So the widget is used only in a Jupyter kernel that has
``ipywidgets`` and was not started by :func:`minigpt.course.execute.execute_notebook` (which sets
``MINIGPT_PROGRESS=text``); saved outputs keep each text bar as its final line.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from tqdm.std import tqdm as text_tqdm

PROGRESS_ENV = "MINIGPT_PROGRESS"


def use_widget() -> bool:
    """True in a live Jupyter kernel with ``ipywidgets`` installed, unless
    ``MINIGPT_PROGRESS=text``."""
    if os.environ.get(PROGRESS_ENV, "").strip().lower() == "text":
        return False
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None or "IPKernelApp" not in getattr(shell, "config", {}):
        return False
    return importlib.util.find_spec("ipywidgets") is not None


def tqdm(*args, **kwargs) -> text_tqdm:
    """``tqdm.tqdm`` with the same arguments, drawn as a widget where :func:`use_widget` says so."""
    if use_widget():
        from tqdm.notebook import tqdm as widget_tqdm

        return widget_tqdm(*args, **kwargs)
    return text_tqdm(*args, **kwargs)
