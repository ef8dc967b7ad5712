"""Record and replay a check's conversation with a student's notebook, as plain data.

The classroom grader runs each check twice, in two processes that share no objects:

* the **worker** (untrusted: the student's code runs there) runs the check on the real notebook module
  through a :class:`Recorder`. Every time the check touches the notebook -- reads an attribute, calls a
  function, indexes, iterates -- the recorder performs the operation and writes its result down as plain
  data (numbers, strings, lists, arrays, tensors; see :func:`encode`). Objects that carry behaviour (a
  module instance, a function) are never written down: they become numbered *handles*.
* the **grader** (trusted: it never imports or calls student code) runs the same check on a
  :class:`Replayer` built from that transcript. Each operation the check makes is matched against the next
  entry and answered with the recorded data, so the check computes its expected values itself and makes its
  comparisons on plain NumPy arrays and tensors. A handle supports only the operations that were recorded
  and compares by identity, so an answer whose ``__eq__`` always returns True cannot cross.

The transcript is the only thing the worker can influence: in the worst case it chooses the return values of
the student's functions, which is what writing the functions means. Objects the check passes *into* the
notebook (a reference ``nn.Linear``, an array) are tracked: their state after each operation (values,
gradients, ``requires_grad``, training flags) is recorded and applied to the grader's copies, and so are the
global random number generators, so the two runs see the same inputs. Arguments are fingerprinted so that a
run that drifted apart is reported, never graded.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import math
import random
import sys
from typing import Any

import numpy as np
import torch

# dtypes that travel as raw bytes (object arrays and anything else never do)
NUMPY_DTYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
                "float32", "float64", "complex64", "complex128"}
TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.float16, torch.bfloat16,
    torch.float32, torch.float64, torch.complex64, torch.complex128)}
# exceptions a check may catch; a student's own exception class travels as its nearest builtin base
EXCEPTIONS = {name: getattr(builtins, name) for name in (
    "NotImplementedError", "ValueError", "TypeError", "AssertionError", "AttributeError", "KeyError", "IndexError",
    "RuntimeError", "ZeroDivisionError", "ArithmeticError", "OverflowError", "LookupError", "NameError",
    "PermissionError", "OSError", "FileNotFoundError", "RecursionError", "MemoryError", "StopIteration",
    "ImportError", "ModuleNotFoundError", "UnboundLocalError", "Exception")}
TRUSTED_PREFIXES = ("minigpt.", "torch.", "numpy.", "builtins.", "collections.")
MAX_DEPTH = 20


class TranscriptMismatch(BaseException):
    """The grader's run of a check asked for something the worker's transcript does not hold.

    A BaseException so that a check's ``except Exception`` cannot swallow it."""


# --- plain data ---------------------------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def is_data(value: Any, depth: int = 0) -> bool:
    """True when ``value`` can be written down by :func:`encode` without a handle."""
    if depth > MAX_DEPTH:
        return False
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, torch.dtype, torch.device,
                                           np.dtype, slice)):
        return True
    if isinstance(value, np.ndarray):
        return value.dtype.name in NUMPY_DTYPES
    if isinstance(value, np.generic):
        return value.dtype.name in NUMPY_DTYPES
    if isinstance(value, torch.Tensor):
        return str(value.dtype).removeprefix("torch.") in TORCH_DTYPES and value.layout == torch.strided \
            and not value.is_meta
    if isinstance(value, (list, tuple)):
        return all(is_data(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(is_data(k, depth + 1) and is_data(v, depth + 1) for k, v in value.items())
    return False


def encode(value: Any, handle_of=None, depth: int = 0) -> Any:
    """``value`` as JSON-able plain data; objects that are not data become ``{"__handle__": n}`` via
    ``handle_of`` (or an error when there is none). Runs in the worker."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if value is None or type(value) in (str, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        value = float(value)
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, str):
        return str(value)
    if isinstance(value, complex):
        return {"__complex__": [encode(value.real), encode(value.imag)]}
    if isinstance(value, bytes):
        return {"__bytes__": _b64(bytes(value))}
    if isinstance(value, slice):
        return {"__slice__": [encode(value.start, handle_of, depth + 1), encode(value.stop, handle_of, depth + 1),
                              encode(value.step, handle_of, depth + 1)]}
    if isinstance(value, torch.dtype):
        return {"__torch_dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"__device__": str(value)}
    if isinstance(value, np.dtype) and value.name in NUMPY_DTYPES:
        return {"__np_dtype__": value.name}
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype.name in NUMPY_DTYPES:
        array = np.array(value, order="C")  # keeps 0-d scalars 0-d
        key = "__ndarray__" if isinstance(value, np.ndarray) else "__npscalar__"
        return {key: [array.dtype.name, list(array.shape), _b64(array.tobytes())]}
    if isinstance(value, torch.Tensor) and is_data(value):
        grad = value.grad if value.requires_grad and value.is_leaf else None
        return {"__tensor__": [str(value.dtype).removeprefix("torch."), list(value.shape),
                               _b64(_tensor_bytes(value)), bool(value.requires_grad),
                               isinstance(value, torch.nn.Parameter),
                               encode(grad, handle_of, depth + 1) if grad is not None else None]}
    if isinstance(value, torch.Size):
        return {"__size__": [int(v) for v in value]}
    if isinstance(value, tuple) and is_data(value, depth):
        return {"__tuple__": [encode(v, handle_of, depth + 1) for v in value]}
    if isinstance(value, list) and is_data(value, depth):
        return [encode(v, handle_of, depth + 1) for v in value]
    if isinstance(value, dict) and is_data(value, depth):
        return {"__dict__": [[encode(k, handle_of, depth + 1), encode(v, handle_of, depth + 1)]
                             for k, v in value.items()]}
    if isinstance(value, (list, tuple)):  # a container holding objects: data where possible, handles elsewhere
        items = [encode(v, handle_of, depth + 1) for v in value]
        return items if isinstance(value, list) else {"__tuple__": items}
    if handle_of is None:
        raise TypeError(f"{type(value).__name__} is not plain data")
    return handle_of(value)


def _frombuffer(dtype_name: str, shape: list, data: str, table: set) -> np.ndarray:
    if dtype_name not in table or not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"bad array in transcript ({dtype_name!r}, {shape!r})")
    array = np.frombuffer(base64.b64decode(data, validate=True), dtype=np.dtype(dtype_name))
    return array.reshape(shape).copy()


def decode(data: Any, handle=None, depth: int = 0) -> Any:
    """The value :func:`encode` wrote down, rebuilt from JSON types only (no pickle, no imports of the
    student's code). ``handle(n, info)`` turns a handle into the grader's stand-in. Runs in the grader."""
    if depth > MAX_DEPTH:
        raise ValueError("transcript nested too deeply")
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [decode(v, handle, depth + 1) for v in data]
    if not isinstance(data, dict) or len(data) != 1 and "__handle__" not in data:
        raise ValueError(f"bad value in transcript: {str(data)[:80]}")
    (key, body), = list(data.items())[:1]
    if key == "__float__":
        return float(body) if body in ("nan", "inf", "-inf") else _bad(data)
    if key == "__complex__":
        return complex(float(decode(body[0])), float(decode(body[1])))
    if key == "__bytes__":
        return base64.b64decode(body, validate=True)
    if key == "__slice__":
        return slice(*(decode(v, handle, depth + 1) for v in body))
    if key == "__torch_dtype__":
        return TORCH_DTYPES[body]
    if key == "__device__":
        return torch.device(str(body))
    if key == "__np_dtype__":
        return np.dtype(body) if body in NUMPY_DTYPES else _bad(data)
    if key == "__ndarray__":
        return _frombuffer(body[0], body[1], body[2], NUMPY_DTYPES)
    if key == "__npscalar__":
        return _frombuffer(body[0], body[1], body[2], NUMPY_DTYPES)[()]
    if key == "__tensor__":
        dtype_name, shape, raw, requires_grad, is_param, grad = body
        if dtype_name not in TORCH_DTYPES:
            _bad(data)
        as_numpy = "int16" if dtype_name == "bfloat16" else ("bool" if dtype_name == "bool" else dtype_name)
        tensor = torch.from_numpy(_frombuffer(as_numpy, shape, raw, NUMPY_DTYPES))
        if dtype_name == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        tensor = tensor.to(TORCH_DTYPES[dtype_name])
        if is_param:
            tensor = torch.nn.Parameter(tensor, requires_grad=bool(requires_grad))
        elif requires_grad and tensor.is_floating_point():
            tensor.requires_grad_(True)
        if grad is not None:
            tensor.grad = decode(grad, handle, depth + 1).detach()
        return tensor
    if key == "__size__":
        return torch.Size([int(v) for v in body])
    if key == "__tuple__":
        return tuple(decode(v, handle, depth + 1) for v in body)
    if key == "__dict__":
        return {decode(k, handle, depth + 1): decode(v, handle, depth + 1) for k, v in body}
    if key == "__handle__" and handle is not None:
        return handle(int(data["__handle__"]), data)
    return _bad(data)


def _bad(data):
    raise ValueError(f"bad value in transcript: {str(data)[:80]}")


def fingerprint(value: Any, handle_id=None, depth: int = 0) -> Any:
    """A short description of a check's argument, the same in both processes when the inputs agree:
    structure, shapes, dtypes and sums rounded to 6 significant digits."""
    if depth > MAX_DEPTH:
        return "..."
    if handle_id is not None:
        hid = handle_id(value)
        if hid is not None:
            return f"handle {hid}"
    if value is None or isinstance(value, (bool, int, str)):
        return value if not isinstance(value, str) or len(value) <= 200 else ["str", _digest(value.encode())]
    if isinstance(value, float):
        return _round(value)
    if isinstance(value, bytes):
        return ["bytes", _digest(value)]
    if isinstance(value, (list, tuple, dict)) and len(value) > 64 and _all_plain(value):
        # a big container of plain values (a vocabulary, a list of ids): its repr is the same in both processes
        return [type(value).__name__, len(value), _digest(repr(value).encode())]
    if isinstance(value, (list, tuple)):
        return [type(value).__name__] + [fingerprint(v, handle_id, depth + 1) for v in value]
    if isinstance(value, dict):
        return ["dict"] + [[fingerprint(k, handle_id, depth + 1), fingerprint(v, handle_id, depth + 1)]
                           for k, v in value.items()]
    if isinstance(value, torch.Tensor) and is_data(value):
        return ["tensor", str(value.dtype), list(value.shape), _digest(_tensor_bytes(value))]
    if isinstance(value, np.ndarray) and value.dtype.name in NUMPY_DTYPES:
        return ["ndarray", value.dtype.name, list(value.shape), _digest(np.ascontiguousarray(value).tobytes())]
    if isinstance(value, torch.nn.Module):
        return ["module", type(value).__name__, sum(int(p.numel()) for p in value.parameters())]
    return ["object", type(value).__name__]


_PLAIN = (bool, int, float, str, bytes, type(None))


def _all_plain(value: list | tuple | dict) -> bool:
    items = (*value.keys(), *value.values()) if isinstance(value, dict) else value
    return all(type(v) in _PLAIN for v in items)


def _round(x: float) -> Any:
    return repr(x) if not math.isfinite(x) else float(f"{x:.6g}")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


# --- state of objects the check passes in, and of the random number generators --------------------------

def _is_tracked(value: Any) -> bool:
    if issubclass(type(value), _Proxy):  # a stand-in may claim a trusted __class__; it is not the check's own
        return False
    return isinstance(value, (np.ndarray, torch.Tensor, torch.nn.Module))


def _tracked_in(value: Any, found: list, depth: int = 0) -> None:
    if depth > 4:
        return
    if _is_tracked(value):
        found.append(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _tracked_in(v, found, depth + 1)
    elif isinstance(value, dict):
        for v in value.values():
            _tracked_in(v, found, depth + 1)


def _state_key(obj: Any) -> Any:
    """Cheap fingerprint of an object's mutable state, to record it only when it changed."""
    def tensor_key(t):
        g = t.grad if isinstance(t, torch.Tensor) and t.is_leaf else None
        return (id(t), t._version, t.requires_grad, id(g), g._version if g is not None else None)
    if isinstance(obj, np.ndarray):
        return _digest(np.ascontiguousarray(obj).tobytes()) if obj.dtype.name in NUMPY_DTYPES else None
    if isinstance(obj, torch.Tensor):
        return tensor_key(obj)
    return (tuple((n, tensor_key(t)) for n, t in obj.named_parameters()),
            tuple((n, tensor_key(t)) for n, t in obj.named_buffers()),
            tuple(m.training for m in obj.modules()))


def _state(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return encode(obj) if obj.dtype.name in NUMPY_DTYPES else None
    if isinstance(obj, torch.Tensor):
        return encode(obj) if is_data(obj) else None
    return {"params": [[n, encode(t)] for n, t in obj.named_parameters()],
            "buffers": [[n, encode(t)] for n, t in obj.named_buffers() if is_data(t)],
            "training": [[n, m.training] for n, m in obj.named_modules()]}


def _copy_tensor(target: torch.Tensor, source: torch.Tensor) -> None:
    with torch.no_grad():
        if target.shape == source.shape:
            target.copy_(source.to(target.dtype))
        if target.is_leaf:
            if target.is_floating_point() or target.is_complex():
                target.requires_grad_(source.requires_grad)
            target.grad = source.grad.to(target.dtype) if source.grad is not None and \
                source.grad.shape == target.shape else None


def _apply_state(obj: Any, state: Any) -> None:
    if state is None:
        return
    if isinstance(obj, np.ndarray):
        value = decode(state)
        if isinstance(value, np.ndarray) and value.shape == obj.shape and obj.flags.writeable:
            obj[...] = value
    elif isinstance(obj, torch.Tensor):
        value = decode(state)
        if isinstance(value, torch.Tensor):
            _copy_tensor(obj, value)
    elif isinstance(obj, torch.nn.Module):
        params, buffers = dict(obj.named_parameters()), dict(obj.named_buffers())
        for name, data in state["params"]:
            if name in params:
                _copy_tensor(params[name], decode(data))
        for name, data in state["buffers"]:
            if name in buffers:
                _copy_tensor(buffers[name], decode(data))
        modules = dict(obj.named_modules())
        for name, training in state["training"]:
            if name in modules:
                modules[name].training = bool(training)


def _rng_state() -> dict:
    state = np.random.get_state()
    return {"torch": encode(torch.get_rng_state()), "numpy": encode([state[0], state[1], *state[2:]]),
            "python": encode(list(random.getstate()[1]))}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(decode(state["torch"]).to(torch.uint8))
    name, keys, pos, has_gauss, cached = decode(state["numpy"])
    np.random.set_state((str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    random.setstate((3, tuple(int(v) for v in decode(state["python"])), None))


# --- the two sides -------------------------------------------------------------------------------------------

def _exception_record(err: BaseException, notebook_file: str) -> dict:
    import traceback
    base = next((c.__name__ for c in type(err).__mro__ if c.__name__ in EXCEPTIONS
                 and getattr(builtins, c.__name__, None) is c), "Exception")
    frames = traceback.extract_tb(err.__traceback__)
    in_notebook = [f for f in frames if f.filename == notebook_file]
    try:
        message = str(err)
    except BaseException:  # noqa: BLE001 - a student's __str__ may raise
        message = "(the exception's message could not be read)"
    return {"type": base, "name": type(err).__name__, "message": message[:4000],
            "location": in_notebook[-1].name if in_notebook else ""}


def _origin(value: Any, notebook_file: str) -> dict | None:
    """Where a function or class fetched from the notebook was defined (the borrowed-solution check)."""
    if isinstance(value, type):
        codes = [v.__code__ for v in vars(value).values() if hasattr(v, "__code__")]
        files = {c.co_filename for c in codes}
        inside = bool(codes) and files == {notebook_file}
        return {"kind": "class", "module": str(getattr(value, "__module__", "")), "in_notebook": inside,
                "files": sorted(files)[:5]}
    code = getattr(value, "__code__", None)
    if callable(value) and code is not None:
        return {"kind": "function", "module": str(getattr(value, "__module__", "")),
                "in_notebook": code.co_filename == notebook_file, "files": [code.co_filename]}
    if callable(value):
        return {"kind": "other", "module": str(getattr(value, "__module__", "")), "in_notebook": False,
                "files": []}
    return None


class Recorder:
    """Worker side: performs each operation on the real object and writes the result down."""

    def __init__(self, root: Any, notebook_file: str):
        self.notebook_file = notebook_file
        self.objects: list[Any] = [root]
        self.ids: dict[int, int] = {id(root): 0}
        self.tracked: list[Any] = []
        self.states: list[Any] = []
        self.transcript: list[dict] = []
        self.pending_sync = False
        self.root = RecordProxy(self, 0)

    def handle_of(self, value: Any) -> dict:
        for index, obj in enumerate(self.tracked):
            if obj is value:  # an object the check passed in comes back as itself
                return {"__handle__": -1, "tracked": index}
        hid = self.ids.get(id(value))
        if hid is None:
            hid = len(self.objects)
            self.objects.append(value)
            self.ids[id(value)] = hid
        cls = type(value)
        return {"__handle__": hid, "type": f"{cls.__module__}.{cls.__qualname__}"}

    def _unwrap(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, RecordProxy):
            return self.objects[object.__getattribute__(value, "_hid")]
        if depth < 4 and type(value) in (list, tuple):
            return type(value)(self._unwrap(v, depth + 1) for v in value)
        if depth < 4 and type(value) is dict:
            return {k: self._unwrap(v, depth + 1) for k, v in value.items()}
        return value

    def _handle_id(self, value: Any) -> int | None:
        return object.__getattribute__(value, "_hid") if isinstance(value, RecordProxy) else None

    def _wrap(self, value: Any) -> Any:
        if is_data(value):
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                value.register_hook(self._backward_hook)
            return value
        if isinstance(value, (list, tuple)):
            items = [self._wrap(v) for v in value]
            return items if isinstance(value, list) else tuple(items)
        if any(value is t for t in self.tracked):
            return value
        self.handle_of(value)
        return RecordProxy(self, self.ids[id(value)])

    def _backward_hook(self, grad):
        if not self.pending_sync:
            self.pending_sync = True
            torch.autograd.Variable._execution_engine.queue_callback(self._sync_after_backward)
        return None

    def _sync_after_backward(self) -> None:
        self.pending_sync = False
        entry = {"op": "sync"}
        self._after(entry)
        self.transcript.append(entry)

    def _after(self, entry: dict) -> None:
        changes = []
        for index, obj in enumerate(self.tracked):
            key = _state_key(obj)
            if key != self.states[index]:
                self.states[index] = key
                changes.append([index, _state(obj)])
        if changes:
            entry["state"] = changes
        rng = _rng_state()
        if rng != getattr(self, "_last_rng", None):
            entry["rng"] = self._last_rng = rng

    def operate(self, hid: int, op: str, name: Any = None, args: tuple = (), kwargs: dict | None = None,
                value: Any = None) -> Any:
        kwargs = kwargs or {}
        entry = {"op": op, "target": hid, "name": name if isinstance(name, (str, int)) or name is None else None}
        if op in ("call", "getitem", "setitem", "setattr", "apply"):
            entry["args"] = fingerprint((args, kwargs, None if op == "apply" else value), self._handle_id)
            found: list = []
            _tracked_in((args, kwargs, None if op == "apply" else value), found)  # handles are not tracked
            for obj in found:
                if not any(obj is t for t in self.tracked):
                    self.tracked.append(obj)
                    self.states.append(_state_key(obj))
        self._last_rng = _rng_state()
        target = self.objects[hid]
        try:
            if op == "getattr":
                result = getattr(target, name)
            elif op == "setattr":
                setattr(target, name, self._unwrap(value))
                result = None
            elif op == "call":
                result = target(*self._unwrap(args), **self._unwrap(kwargs))
            elif op == "getitem":
                result = target[self._unwrap(args[0])]
            elif op == "setitem":
                target[self._unwrap(args[0])] = self._unwrap(value)
                result = None
            elif op == "len":
                result = int(len(target))
            elif op == "bool":
                result = bool(target)
            elif op == "iter":
                result = list(iter(target))
            elif op == "apply":
                result = value(*self._unwrap(args), **self._unwrap(kwargs))
            else:
                raise ValueError(f"unknown operation {op}")
        except BaseException as err:  # noqa: BLE001 - the student's code may raise anything
            entry["error"] = _exception_record(err, self.notebook_file)
            self._after(entry)
            self.transcript.append(entry)
            raise
        if op == "getattr" and hid == 0:
            entry["origin"] = _origin(result, self.notebook_file)
        entry["result"] = encode(result, self.handle_of)
        self._after(entry)
        self.transcript.append(entry)
        return self._wrap(result)


class Replayer:
    """Grader side: answers each operation from the transcript, checking it is the one that was recorded."""

    def __init__(self, transcript: list):
        if not isinstance(transcript, list):
            raise TranscriptMismatch("the transcript is not a list")
        self.transcript = transcript
        self.position = 0
        self.proxies: dict[int, ReplayProxy] = {}
        self.tracked: list[Any] = []
        self.pending_sync = False
        self.fetched: dict[str, dict | None] = {}  # top-level names the check read, with their recorded origin
        self.root = self._proxy(0, "builtins.module")

    def _proxy(self, hid: int, type_name: str) -> ReplayProxy:
        if hid not in self.proxies:
            self.proxies[hid] = ReplayProxy(self, hid, str(type_name))
        return self.proxies[hid]

    def _handle(self, hid: int, info: dict) -> Any:
        if hid == -1:
            index = info.get("tracked")
            if not isinstance(index, int) or not 0 <= index < len(self.tracked):
                raise TranscriptMismatch("the transcript names an object the check never passed in")
            return self.tracked[index]
        if hid < 0:
            raise TranscriptMismatch("bad handle in the transcript")
        return self._proxy(hid, info.get("type", "object"))

    def _handle_id(self, value: Any) -> int | None:
        return object.__getattribute__(value, "_hid") if isinstance(value, ReplayProxy) else None

    def _apply(self, entry: dict) -> None:
        for index, state in entry.get("state", []):
            if isinstance(index, int) and 0 <= index < len(self.tracked):
                _apply_state(self.tracked[index], state)
        if entry.get("rng"):
            _set_rng_state(entry["rng"])

    def _next(self) -> dict:
        while self.position < len(self.transcript) and isinstance(self.transcript[self.position], dict) \
                and self.transcript[self.position].get("op") == "sync":
            self._apply(self.transcript[self.position])  # a backward pass the grader's copy did not reach
            self.position += 1
        if self.position >= len(self.transcript):
            raise TranscriptMismatch("the check asked the notebook for more than the worker recorded")
        entry = self.transcript[self.position]
        self.position += 1
        if not isinstance(entry, dict):
            raise TranscriptMismatch("a transcript entry is not an object")
        return entry

    def _backward_hook(self, grad):
        if not self.pending_sync:
            self.pending_sync = True
            torch.autograd.Variable._execution_engine.queue_callback(self._sync_after_backward)
        return None

    def _sync_after_backward(self) -> None:
        self.pending_sync = False
        if self.position < len(self.transcript) and self.transcript[self.position].get("op") == "sync":
            self._apply(self.transcript[self.position])
            self.position += 1

    def _wrap(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.requires_grad:
            value.register_hook(self._backward_hook)
        return value

    def operate(self, hid: int, op: str, name: Any = None, args: tuple = (), kwargs: dict | None = None,
                value: Any = None) -> Any:
        kwargs = kwargs or {}
        if op == "apply":
            value = None  # the helper runs in the worker only; the grader checks its name
        if op in ("call", "getitem", "setitem", "setattr", "apply"):
            found: list = []
            _tracked_in((args, kwargs, value), found)
            for obj in found:
                if not any(obj is t for t in self.tracked):
                    self.tracked.append(obj)
        entry = self._next()
        expected = {"op": op, "target": hid, "name": name if isinstance(name, (str, int)) or name is None else None}
        got = {k: entry.get(k) for k in expected}
        if got != expected:
            raise TranscriptMismatch(f"the check's run in the grader drifted from the worker's: expected {expected}, "
                                     f"the transcript holds {got}")
        if "args" in entry or op in ("call", "getitem", "setitem", "setattr", "apply"):
            mine = fingerprint((args, kwargs, value), self._handle_id)
            if _normalise(mine) != _normalise(entry.get("args")):
                raise TranscriptMismatch(f"the inputs of {op} {name or ''} differ between the worker and the grader "
                                         "(the check saw different values in the two processes)")
        try:
            self._apply(entry)
            if entry.get("error"):
                error = _rebuild_exception(entry["error"])
            else:
                error, result = None, decode(entry.get("result"), self._handle)
        except TranscriptMismatch:
            raise
        except Exception as err:  # noqa: BLE001 - a malformed transcript is the worker's fault, never a verdict
            raise TranscriptMismatch(f"the transcript could not be read ({type(err).__name__}: {err})") from None
        if error is not None:
            raise error
        if op == "getattr" and hid == 0:
            self.fetched.setdefault(str(name), entry.get("origin"))
        if isinstance(result, list) and op == "iter":
            return [self._wrap(v) for v in result]
        return self._wrap(result)


def _normalise(value: Any) -> Any:
    """Tuples and lists compare alike once they went through JSON."""
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def apply_inside(fn, args: tuple, kwargs: dict) -> Any:
    """``fn(*args, **kwargs)`` where the notebook's objects live (see :func:`minigpt.checks.inside`)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, _Proxy):
            side = object.__getattribute__(value, "_side")
            name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"
            return side.operate(object.__getattribute__(value, "_hid"), "apply", name, args, kwargs, fn)
    return fn(*args, **kwargs)


class RemoteError(Exception):
    """An exception the student's code raised, rebuilt in the grader (its class is not a builtin)."""


def _rebuild_exception(record: dict) -> BaseException:
    if not isinstance(record, dict):
        raise TranscriptMismatch("bad error record in the transcript")
    cls = EXCEPTIONS.get(str(record.get("type")), RemoteError)
    message = str(record.get("message", ""))
    try:
        err = cls(message)
    except Exception:  # noqa: BLE001 - e.g. an OSError subclass with other arguments
        err = RemoteError(message)
    err.remote_name = str(record.get("name", cls.__name__))  # type: ignore[attr-defined]
    err.remote_location = str(record.get("location", ""))  # type: ignore[attr-defined]
    return err


def _resolve_trusted_class(type_name: str) -> type | None:
    """The class behind a recorded type name, for isinstance: only from a trusted package the grader has
    already imported (a transcript never makes the grader import anything)."""
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


class _Proxy:
    """Stands in for an object that lives in the worker: attribute reads, calls, indexing, len, iteration
    and truth go through the transcript; equality is identity; everything else is unsupported."""

    __slots__ = ("_side", "_hid", "_type")

    def __init__(self, side, hid: int, type_name: str = "object"):
        object.__setattr__(self, "_side", side)
        object.__setattr__(self, "_hid", hid)
        object.__setattr__(self, "_type", type_name)

    def _op(self, op, name=None, args=(), kwargs=None, value=None):
        return object.__getattribute__(self, "_side").operate(object.__getattribute__(self, "_hid"), op, name,
                                                               args, kwargs, value)

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
        return bool(self._op("bool")) is True

    def __iter__(self):
        return iter(self._op("iter"))

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    __hash__ = object.__hash__

    def __repr__(self):
        return f"<notebook object of type {self._type_name()}>"

    def _type_name(self):
        return object.__getattribute__(self, "_type").rpartition(".")[2]

    @property
    def __class__(self):
        cls = _resolve_trusted_class(object.__getattribute__(self, "_type"))
        return cls if cls is not None else type(self)


class RecordProxy(_Proxy):
    __slots__ = ()

    def __init__(self, recorder: Recorder, hid: int):
        obj = recorder.objects[hid]
        super().__init__(recorder, hid, f"{type(obj).__module__}.{type(obj).__qualname__}")


class ReplayProxy(_Proxy):
    __slots__ = ()
