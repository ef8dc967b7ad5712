"""Chapter checks: one copy, used both by the test suite and by the classroom grader.

Each ``minigpt/checks/chNN.py`` registers functions with :func:`check`. A check receives the module
returned by :func:`minigpt.notebooks.import_notebook` (the notebook's own definitions) and raises
``AssertionError`` (or any exception) when the notebook's code is wrong.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from minigpt.notebooks import normalise_chapter

CHAPTERS = ("01", "02", "03", "04", "05", "06", "07", "08", "09", "10")


@dataclass(frozen=True)
class Check:
    chapter: str
    name: str
    points: int
    description: str
    run: Callable[[object], None]


_REGISTRY: dict[str, list[Check]] = {}


def check(points: int = 1) -> Callable[[Callable[[object], None]], Callable[[object], None]]:
    """Register a chapter check; the chapter is taken from the module name (``minigpt.checks.ch06``)."""
    if points <= 0:
        raise ValueError(f"points must be a positive integer, got {points!r}")

    def register(fn: Callable[[object], None]) -> Callable[[object], None]:
        chapter = fn.__module__.rsplit(".", 1)[-1].removeprefix("ch")
        doc = (fn.__doc__ or fn.__name__).strip().splitlines()[0]
        _REGISTRY.setdefault(chapter, []).append(Check(chapter, fn.__name__, points, doc, fn))
        return fn

    return register


def checks_for(chapter: str | int) -> list[Check]:
    """The checks of one chapter (``"06"`` or ``6``), in the order they are defined."""
    chapter = normalise_chapter(chapter)
    if chapter not in CHAPTERS:
        raise ValueError(f"chapter must be one of {', '.join(CHAPTERS)}, got {chapter!r}")
    try:
        importlib.import_module(f"minigpt.checks.ch{chapter}")
    except ModuleNotFoundError as err:
        if err.name != f"minigpt.checks.ch{chapter}":
            raise
        return []
    return list(_REGISTRY.get(chapter, []))


@contextmanager
def using(nb, **replacements):
    """Temporarily replace notebook globals (helpers a checked function calls) with references, so one
    mistake in a notebook fails only the check of the function that holds it."""
    saved = {name: getattr(nb, name, None) for name in replacements}
    for name, value in replacements.items():
        setattr(nb, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(nb, name, value)


def inside(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, run where the notebook's objects live.

    The grader runs a check twice: next to the notebook (where ``nb`` and what it returns are real objects)
    and in its own trusted process (where they are stand-ins answering from a record, see
    :mod:`minigpt.remote`). A check that needs identities or in-place changes of the notebook's objects
    (``params[0] is layer.lora.A``, ``p.requires_grad_(False)``) puts those lines in a module-level helper and
    calls it through ``inside``: the helper runs next to the notebook and only its result, as plain data,
    reaches the trusted process. In the test suite (a real module) it is a plain call.
    """
    from minigpt.remote import apply_inside

    return apply_inside(fn, args, kwargs)
