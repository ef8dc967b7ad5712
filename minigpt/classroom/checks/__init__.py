"""Chapter checks: one copy, used both by the test suite and by the classroom grader.

Each ``minigpt/classroom/checks/chNN.py`` registers functions with :func:`check`. A check receives
the notebook's definitions -- in the test suite the module :func:`minigpt.course.source.
import_notebook` returns, in the grader a proxy for that module in the worker
(:mod:`minigpt.classroom.remote`) -- and raises ``AssertionError`` (or any exception) when the
notebook's code is wrong. Every input a check uses comes from a generator it owns
(``torch.Generator``, ``np.random.default_rng``) or a seed it sets in its own process, and expected
values come from its own reference objects.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from minigpt.course.chapters import normalise_chapter

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
    """Register a chapter check; the chapter is taken from the module name
    (``minigpt.classroom.checks.ch06``)."""
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
        importlib.import_module(f"minigpt.classroom.checks.ch{chapter}")
    except ModuleNotFoundError as err:
        if err.name != f"minigpt.classroom.checks.ch{chapter}":
            raise
        return []
    return list(_REGISTRY.get(chapter, []))


@contextmanager
def using(nb, **replacements):
    """Temporarily replace notebook globals (helpers a checked function calls) with references, so
    one mistake in a notebook fails only the check of the function that holds it."""
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

    The grader runs every check in its own trusted process, where ``nb`` and what it returns are
    proxies for objects that stay in the worker (:mod:`minigpt.classroom.remote`); a call sends
    copies of its arguments. A check that needs in-place changes, identities or a backward pass on
    the notebook's objects (``p.requires_grad_(False)``, ``params[0] is layer.lora.A``, the
    gradients of a forward pass) puts those lines in a module-level helper of its chapter module
    and calls it through ``inside``: the helper runs in the worker on the worker's objects and on
    copies of everything else, and only its result, as plain data or handles, comes back. A helper
    never sees an expected value, so nothing it does can change a verdict but its own answer. In
    the test suite (a real module) it is a plain call.
    """
    from minigpt.classroom.remote import apply_inside

    return apply_inside(fn, args, kwargs)


def _remote(value):
    from minigpt.classroom.remote import RemoteProxy

    return value if type(value) is RemoteProxy else None


def held(nb, value):
    """``value`` kept beside the notebook's objects: in the grader a proxy for the worker's copy
    (so that a notebook function can change it in place and the check can look at the result with
    :func:`fetched`), in the test suite ``value`` itself."""
    proxy = _remote(nb)
    if proxy is None:
        return value
    return object.__getattribute__(proxy, "_side").operate(0, "put", value=value)


def fetched(value):
    """A plain-data copy of what a proxy stands for (an array, a tensor, a list); anything else
    as it is."""
    proxy = _remote(value)
    if proxy is None:
        return value
    side, hid = object.__getattribute__(proxy, "_side"), object.__getattribute__(proxy, "_hid")
    return side.operate(hid, "get")


def one_line_verdicts(decide, cases) -> list[str]:
    """An experiment exercise's decision rule called on each tuple of arguments in ``cases``; each
    verdict must be a one-line str (the notebook prints it after ``Verdict:``)."""
    verdicts = []
    for args in cases:
        verdict = fetched(decide(*args))
        assert isinstance(verdict, str) and verdict.strip() and "\n" not in verdict.strip(), (
            f"the decision rule must return a one-line verdict (a str), got {verdict!r}"
        )
        verdicts.append(verdict)
    return verdicts


# Helpers for `inside`: they run beside the notebook's objects and return what they observed.


def seeded(seed: int, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` after ``torch.manual_seed(seed)`` in the process ``fn`` lives in."""
    torch.manual_seed(seed)
    return fn(*args, **kwargs)


def assign(obj, path: str, value) -> None:
    """Copy ``value`` into the tensor at the dotted attribute ``path`` of ``obj``, in place."""
    target = obj
    for part in path.split("."):
        target = getattr(target, part)
    with torch.no_grad():
        target.copy_(torch.as_tensor(value, dtype=target.dtype))


def square_sum_backward(module, *inputs) -> torch.Tensor:
    """``module(*inputs)``, then a backward pass of its squared sum; the output, detached."""
    out = module(*inputs)
    out.square().sum().backward()
    return out.detach()


def gradients(module) -> dict:
    """Each named parameter's gradient (None where there is none)."""
    return {
        name: None if p.grad is None else p.grad.detach().clone()
        for name, p in module.named_parameters()
    }
