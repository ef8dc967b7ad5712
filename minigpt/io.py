"""Small file helpers and the checks public entry points share.

* Every write in the course goes through a temporary file in the target's folder, fsynced, then renamed
  onto the target (and the folder fsynced): readers see the old file or the new one, never half of one,
  and a failure (including Ctrl-C) removes the temporary file. A process killed outright (SIGKILL, power
  loss) cannot clean up; the next write to the same target removes such orphans.
* :func:`cache_dir`: the one cache folder, ``$MINIGPT_CACHE`` or ``~/.cache/minigpt``.
* :class:`UserError`: a mistake in what the user gave (an argument, a file). The command line prints it
  as one line and exits with status 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import tempfile
from pathlib import Path

CACHE_ENV = "MINIGPT_CACHE"


class UserError(ValueError):
    """A bad argument or file; the message says what was wrong and what to do. CLI: one line, exit 2."""

    exit_code = 2


class UserTypeError(UserError, TypeError):
    """A :class:`UserError` for an argument of the wrong type (still a ``TypeError`` for callers)."""


def cache_dir(*parts: str) -> Path:
    """The course's cache folder (``$MINIGPT_CACHE``, else ``~/.cache/minigpt``), joined with ``parts``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "minigpt"
    return Path(root).expanduser().joinpath(*parts)


# ---------------------------------------------------------------------------------------------------
# Checks for arguments: numpy scalars count as numbers, bools do not, NaN and inf are refused.


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python int, refusing floats (even 10.0), bools and values out of range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserTypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise UserError(f"{name} must be an integer {bounds}, got {value}")
    return value


def check_float(name: str, value, minimum: float | None = None, maximum: float | None = None,
                strict_min: bool = False, strict_max: bool = False) -> float:
    """``value`` as a finite Python float within the bounds (``strict_*``: the bound itself is excluded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value}")
    low_bad = minimum is not None and (value <= minimum if strict_min else value < minimum)
    high_bad = maximum is not None and (value >= maximum if strict_max else value > maximum)
    if low_bad or high_bad:
        low = "" if minimum is None else f"{'>' if strict_min else '>='} {minimum:g}"
        high = "" if maximum is None else f"{'<' if strict_max else '<='} {maximum:g}"
        raise UserError(f"{name} must be {' and '.join(p for p in (low, high) if p)}, got {value:g}")
    return value


def refuse_non_finite(tensors: dict, source: Path | str) -> None:
    """Raise naming the first floating-point tensor of ``tensors`` that holds NaN or inf."""
    import torch

    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(f"{source}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf); "
                            "the file is corrupted or was saved from a diverged run")


def tensor_digest(tensors: dict) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors``: what a file's content should be."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_json(path: Path | str, what: str = "JSON file"):
    """Parse a JSON file; a missing or malformed file is a :class:`UserError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not a valid {what} ({err})") from None


# ---------------------------------------------------------------------------------------------------
# Atomic writes


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_path(path: Path | str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return  # some platforms (Windows) cannot open a folder; the rename is all they offer
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if Path("/proc/self").exists():  # Linux: no signal needed (a sandbox may refuse os.kill)
        return Path(f"/proc/{pid}").exists()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_orphans(path: Path) -> None:
    """Delete temporary files of earlier writes to ``path`` whose process no longer exists (SIGKILL)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[^.]+\.tmp$")
    for candidate in path.parent.glob(f".{path.name}.*.tmp"):
        match = pattern.match(candidate.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            candidate.unlink(missing_ok=True)


def atomic_save_file(save_fn, path: Path | str) -> None:
    """Call ``save_fn(tmp_path)`` and rename the result onto ``path`` only once it is complete and on disk.

    The temporary file sits next to ``path`` (same file system, so the rename is atomic), is fsynced
    before the rename, and is removed if anything fails, Ctrl-C included; the folder is fsynced after.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        save_fn(tmp)
        _fsync_path(tmp)
        os.chmod(tmp, _default_mode())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_path(path.parent, directory=True)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half of one."""
    atomic_save_file(lambda tmp: Path(tmp).write_bytes(data), path)


def read_safetensors(path: Path | str, kind: str, with_tensors: bool = True) -> tuple[dict, dict]:
    """``(metadata, tensors)`` of a safetensors file, with one clear error for a missing or broken file.

    ``kind`` names what the file should be ("checkpoint", "adapter file") in the messages.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()} if with_tensors else {}
    except Exception as err:  # safetensors raises its own error types for truncated or garbage files
        raise UserError(f"{path} is not a readable safetensors {kind} ({err})") from err
    return metadata, tensors
