"""The grader's view of a student's notebook: proxies that forward each operation to the worker.

A check runs only in the trusted grader. It receives ``nb``, a :class:`RemoteProxy` for the
notebook's module in the worker, and everything it does to it -- read an attribute, call, index,
take ``len``, iterate, test truth, set an attribute -- becomes one request to the worker
(:mod:`minigpt.classroom.worker`). Arguments travel as pickles, so the worker always receives fresh
copies: it can change its copy of a reference layer or of an input matrix, never the check's.
Results come back as plain data (:mod:`minigpt.classroom.codec`), fresh objects the grader owns, or
as proxies for objects that stay in the worker. Nothing in an answer touches the grader's random
number generators, and a check's frames and locals never exist where the student's code runs.

Every request of one check shares one deadline, fixed by the grader before the check starts.
"""

from __future__ import annotations

import builtins
import io
import pickle
import secrets
import sys
from typing import Any

from minigpt.classroom.codec import EXCEPTIONS, TRUSTED_PREFIXES, decode
from minigpt.classroom.wire import Channel, ChannelError

OPERATIONS = ("getattr", "setattr", "call", "getitem", "setitem", "len", "bool", "iter", "apply")


HELPER_PACKAGE = "minigpt.classroom.checks"  # `apply` names helpers of this package only


class RemoteError(Exception):
    """An exception raised by the student's code whose class is not a builtin the grader knows."""


class _Pickler(pickle.Pickler):
    """Pickles a request; a proxy travels as its handle number, never as an object."""

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is RemoteProxy:
            return ("handle", object.__getattribute__(obj, "_hid"))
        return None


def dumps(value: Any) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


class Remote:
    """One check's session with a worker: the channel, the check's deadline, what it fetched."""

    def __init__(self, channel: Channel, deadline: float):
        self.channel = channel
        self.deadline = deadline
        # notebook names the check read (the worker returned a value), with their origin
        self.fetched: dict[str, Any] = {}
        self.proxies: dict[int, RemoteProxy] = {}
        self.root = self._proxy(0, "builtins.module")

    def _proxy(self, hid: int, type_name: str) -> RemoteProxy:
        if hid not in self.proxies:
            self.proxies[hid] = RemoteProxy(self, hid, type_name)
        return self.proxies[hid]

    def _handle(self, hid: int, info: dict) -> RemoteProxy:
        if not isinstance(hid, int) or hid < 0:
            raise ValueError("bad handle")
        return self._proxy(hid, str(info.get("type", "object"))[:200])

    def operate(
        self,
        hid: int,
        op: str,
        name: Any = None,
        args: tuple = (),
        kwargs: dict | None = None,
        value: Any = None,
    ) -> Any:
        # a fresh random id per request: an answer written ahead of time cannot carry it
        number = secrets.randbits(62)
        request = {"op": op, "target": hid, "name": name, "args": args, "kwargs": kwargs or {}}
        request["id"] = number
        if op == "apply":
            request["helper"] = _helper_name(value)
        else:
            request["value"] = value
        answer = self.channel.request(dumps(request), self.deadline)
        if answer.get("id") != number:
            raise ChannelError("the worker sent an answer to another request")
        try:
            if "error" in answer:
                error = rebuild_exception(answer["error"])
            else:
                error, result = None, decode(answer.get("result"), self._handle)
        except Exception as err:  # noqa: BLE001 - a malformed answer is the worker's fault
            raise ChannelError(
                f"the worker sent a malformed answer ({type(err).__name__})"
            ) from None
        if op == "getattr" and hid == 0 and isinstance(name, str) and error is None:
            origin = answer.get("origin")
            self.fetched.setdefault(name, origin if isinstance(origin, dict) else None)
        if error is not None:
            raise error
        if op == "len" and (type(result) is not int or result < 0):
            raise ChannelError("the worker answered len() with something that is not a length")
        if op == "iter" and not isinstance(result, list):
            raise ChannelError("the worker answered iter() with something that is not a list")
        return result


def _helper_name(fn: Any) -> str:
    module, qualname = getattr(fn, "__module__", ""), getattr(fn, "__qualname__", "")
    inside_package = module == HELPER_PACKAGE or str(module).startswith(HELPER_PACKAGE + ".")
    if not inside_package or "<" in str(qualname):
        raise TypeError(
            f"inside() runs module-level helpers of minigpt.classroom.checks only, not {fn!r}"
        )
    return f"{module}:{qualname}"


def apply_inside(fn, args: tuple, kwargs: dict) -> Any:
    """``fn(*args, **kwargs)`` in the worker when an argument is a proxy, else here."""
    for value in (*args, *kwargs.values()):
        if type(value) is RemoteProxy:
            side = object.__getattribute__(value, "_side")
            return side.operate(
                object.__getattribute__(value, "_hid"), "apply", None, args, kwargs, fn
            )
    return fn(*args, **kwargs)


def rebuild_exception(record: Any) -> BaseException:
    """A builtin exception (or RemoteError) carrying the student's message, name and location."""
    if not isinstance(record, dict):
        raise ValueError("bad error record")
    name = str(record.get("type"))
    cls = EXCEPTIONS.get(name, RemoteError)
    message = str(record.get("message", ""))[:4000]
    try:
        err = cls(message)
    except Exception:  # noqa: BLE001 - e.g. an OSError subclass with other arguments
        err = RemoteError(message)
    err.remote_name = str(record.get("name", cls.__name__))[:200]  # type: ignore[attr-defined]
    err.remote_location = str(record.get("location", ""))[:200]  # type: ignore[attr-defined]
    return err


def exception_record(err: BaseException, notebook_file: str) -> dict:
    """The worker's description of an exception: nearest builtin base, name, message, location."""
    import traceback

    base = next(
        (
            c.__name__
            for c in type(err).__mro__
            if c.__name__ in EXCEPTIONS and getattr(builtins, c.__name__, None) is c
        ),
        "Exception",
    )
    frames = traceback.extract_tb(err.__traceback__)
    in_notebook = [f for f in frames if f.filename == notebook_file]
    try:
        message = str(err)
    except BaseException:  # noqa: BLE001 - a student's __str__ may raise
        message = "(the exception's message could not be read)"
    return {
        "type": base,
        "name": type(err).__name__,
        "message": message[:4000],
        "location": in_notebook[-1].name if in_notebook else "",
    }


def _resolve_trusted_class(type_name: str) -> type | None:
    """The class behind a reported type name, for isinstance: only from a trusted package the
    grader has already imported (an answer never makes the grader import anything)."""
    if not type_name.startswith(TRUSTED_PREFIXES):
        return None
    parts = type_name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        obj: Any = sys.modules.get(".".join(parts[:cut]))
        if obj is None:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part, None)
        return obj if isinstance(obj, type) else None
    return None


class RemoteProxy:
    """Stands in for an object that lives in the worker: attribute reads, calls, indexing, len,
    iteration and truth are requests; equality is identity; everything else is unsupported."""

    __slots__ = ("_side", "_hid", "_type")

    def __init__(self, side: Remote, hid: int, type_name: str = "object"):
        object.__setattr__(self, "_side", side)
        object.__setattr__(self, "_hid", hid)
        object.__setattr__(self, "_type", type_name)

    def _op(self, op, name=None, args=(), kwargs=None, value=None):
        return object.__getattribute__(self, "_side").operate(
            object.__getattribute__(self, "_hid"), op, name, args, kwargs, value
        )

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self._op("getattr", name)

    def __setattr__(self, name, value):
        self._op("setattr", name, value=value)

    def __call__(self, *args, **kwargs):
        return self._op("call", args=args, kwargs=kwargs)

    def __getitem__(self, key):
        return self._op("getitem", args=(key,))

    def __setitem__(self, key, value):
        self._op("setitem", args=(key,), value=value)

    def __len__(self):
        return self._op("len")

    def __bool__(self):
        return self._op("bool") is True

    def __iter__(self):
        return iter(self._op("iter"))

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    __hash__ = object.__hash__

    def __reduce__(self):
        raise TypeError("a notebook object travels as its handle only")

    def __repr__(self):
        kind = object.__getattribute__(self, "_type").rpartition(".")[2]
        return f"<notebook object of type {kind}>"

    @property
    def __class__(self):
        cls = _resolve_trusted_class(object.__getattribute__(self, "_type"))
        return cls if cls is not None else type(self)
