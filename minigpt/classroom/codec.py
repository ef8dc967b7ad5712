"""Plain data between the untrusted worker and the trusted grader: :func:`encode` and
:func:`decode`.

The worker answers every request with plain data only: numbers, strings, bytes, lists, tuples,
dicts, slices, dtypes, NumPy arrays and tensors (raw bytes with a dtype from a fixed table), and for
anything else a numbered *handle* to an object that stays in the worker. :func:`decode` rebuilds
values from JSON types alone: no pickle, no import, nothing of the student's code, and a nesting
depth bounded by :data:`MAX_DEPTH`; every decoded value is a fresh object the grader owns.
"""

from __future__ import annotations

import base64
import builtins
import math
from typing import Any

import numpy as np
import torch

# dtypes that travel as raw bytes (object arrays and anything else never do)
NUMPY_DTYPES = {
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
}


TORCH_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.bool,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
    )
}


# exceptions a check may catch; a student's own exception class travels as its nearest builtin base
EXCEPTIONS = {
    name: getattr(builtins, name)
    for name in (
        "NotImplementedError",
        "ValueError",
        "TypeError",
        "AssertionError",
        "AttributeError",
        "KeyError",
        "IndexError",
        "RuntimeError",
        "ZeroDivisionError",
        "ArithmeticError",
        "OverflowError",
        "LookupError",
        "NameError",
        "PermissionError",
        "OSError",
        "FileNotFoundError",
        "RecursionError",
        "MemoryError",
        "StopIteration",
        "ImportError",
        "ModuleNotFoundError",
        "UnboundLocalError",
        "Exception",
    )
}


TRUSTED_PREFIXES = ("minigpt.", "torch.", "numpy.", "builtins.", "collections.")


MAX_DEPTH = 20


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
    if value is None or isinstance(
        value, (bool, int, float, complex, str, bytes, torch.dtype, torch.device, np.dtype, slice)
    ):
        return True
    if isinstance(value, np.ndarray):
        return value.dtype.name in NUMPY_DTYPES
    if isinstance(value, np.generic):
        return value.dtype.name in NUMPY_DTYPES
    if isinstance(value, torch.Tensor):
        return (
            str(value.dtype).removeprefix("torch.") in TORCH_DTYPES
            and value.layout == torch.strided
            and not value.is_meta
        )
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
        return {
            "__slice__": [
                encode(value.start, handle_of, depth + 1),
                encode(value.stop, handle_of, depth + 1),
                encode(value.step, handle_of, depth + 1),
            ]
        }
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
        return {
            "__tensor__": [
                str(value.dtype).removeprefix("torch."),
                list(value.shape),
                _b64(_tensor_bytes(value)),
                bool(value.requires_grad),
                isinstance(value, torch.nn.Parameter),
                encode(grad, handle_of, depth + 1) if grad is not None else None,
            ]
        }
    if isinstance(value, torch.Size):
        return {"__size__": [int(v) for v in value]}
    if isinstance(value, tuple) and is_data(value, depth):
        return {"__tuple__": [encode(v, handle_of, depth + 1) for v in value]}
    if isinstance(value, list) and is_data(value, depth):
        return [encode(v, handle_of, depth + 1) for v in value]
    if isinstance(value, dict) and is_data(value, depth):
        return {
            "__dict__": [
                [encode(k, handle_of, depth + 1), encode(v, handle_of, depth + 1)]
                for k, v in value.items()
            ]
        }
    # a container holding objects: data where possible, handles elsewhere
    if isinstance(value, (list, tuple)):
        items = [encode(v, handle_of, depth + 1) for v in value]
        return items if isinstance(value, list) else {"__tuple__": items}
    if handle_of is None:
        raise TypeError(f"{type(value).__name__} is not plain data")
    return handle_of(value)


def _frombuffer(dtype_name: str, shape: list, data: str, table: set) -> np.ndarray:
    if (
        dtype_name not in table
        or not isinstance(shape, list)
        or not all(isinstance(n, int) and n >= 0 for n in shape)
    ):
        raise ValueError(f"bad array ({dtype_name!r}, {shape!r})")
    array = np.frombuffer(base64.b64decode(data, validate=True), dtype=np.dtype(dtype_name))
    return array.reshape(shape).copy()


def decode(data: Any, handle=None, depth: int = 0) -> Any:
    """The value :func:`encode` wrote down, rebuilt from JSON types only (no pickle, no imports of
    the student's code). ``handle(n, info)`` turns a handle into the grader's stand-in. Runs in the
    grader."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [decode(v, handle, depth + 1) for v in data]
    if not isinstance(data, dict) or len(data) != 1 and "__handle__" not in data:
        raise ValueError(f"bad value: {str(data)[:80]}")
    ((key, body),) = list(data.items())[:1]
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
        as_numpy = (
            "int16"
            if dtype_name == "bfloat16"
            else ("bool" if dtype_name == "bool" else dtype_name)
        )
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
    raise ValueError(f"bad value: {str(data)[:80]}")
