"""Small file helpers and the checks public entry points share.

* Every write in the course goes through a temporary file in the target's folder, fsynced, then
  renamed onto the target (and the folder fsynced): readers see the old file or the new one, never
  half of one, and a failure (including Ctrl-C) removes the temporary file. A process killed
  outright (SIGKILL, power loss) cannot clean up; the next write to the same target removes such
  orphans.
* :func:`cache_dir`: the one cache folder, ``$MINIGPT_CACHE`` or ``~/.cache/minigpt``.
* :class:`UserError`: a mistake in what the user gave (an argument, a file). The command line prints
  it as one line and exits with status 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
import time
from pathlib import Path

from minigpt._validate import (  # noqa: F401 - the errors and checks other modules import from here too
    UserError,
    UserTypeError,
    WriteError,
    check_float,
    check_int,
)

CACHE_ENV = "MINIGPT_CACHE"


def cache_dir(*parts: str) -> Path:
    """The course's cache folder (``$MINIGPT_CACHE``, else ``~/.cache/minigpt``), joined with
    ``parts``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "minigpt"
    return Path(root).expanduser().joinpath(*parts)


def refuse_non_finite(tensors: dict, source: Path | str) -> None:
    """Raise naming the first floating-point tensor of ``tensors`` that holds NaN or inf."""
    import torch

    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(
                f"{source}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf); "
                "the file is corrupted or was saved from a diverged run"
            )


def tensor_digest(tensors: dict) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors``: what a file's content should
    be."""
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


# --------------------------------------------------------------------------------------------------
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
    """Delete temporary files of earlier writes to ``path`` whose process no longer exists
    (SIGKILL)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[^.]+\.tmp$")
    for candidate in path.parent.glob(f".{path.name}.*.tmp"):
        match = pattern.match(candidate.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            candidate.unlink(missing_ok=True)


def names_a_folder(path: Path | str) -> bool:
    """Whether ``path`` as written ends with a path separator (``runs/``): it then names a folder,
    though :class:`~pathlib.Path` drops the separator."""
    text = os.fspath(path)
    return isinstance(text, str) and text.endswith(tuple(s for s in (os.sep, os.altsep) if s))


def _refuse_folder_syntax(path: Path | str, what: str = "file") -> None:
    if names_a_folder(path):
        raise WriteError(
            f"cannot write {what} {os.fspath(path)}: the path ends with a separator, so it names a "
            "folder; give the file's name too"
        )


def _not_a_regular_file(path: Path) -> str | None:
    """What ``path`` is when it exists (symbolic links followed) and is not a regular file: a
    rename onto it would replace a folder, a device, a FIFO or a socket with a file. None when it
    is a regular file or does not exist."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None  # absent (or a link to nothing, which the rename replaces)
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"))
    kinds += ((stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"))
    kind = next((name for test, name in kinds if test(mode)), "a socket or other special file")
    return f"it is {kind}, not a regular file"


def atomic_save_file(save_fn, path: Path | str) -> None:
    """Call ``save_fn(tmp_path)`` and rename the result onto ``path`` only once it is complete and
    on disk.

    The temporary file sits next to ``path`` (same file system, so the rename is atomic), is fsynced
    before the rename, and is removed if anything fails, Ctrl-C included; the folder is fsynced
    after. A ``path`` written with a trailing separator (a folder) is refused, and so is an existing
    target that is not a regular file (a folder, a device such as ``/dev/null``, a FIFO), which the
    rename would replace.
    """
    _refuse_folder_syntax(path)
    path = Path(path)
    problem = _not_a_regular_file(path)
    if problem:
        raise WriteError(f"cannot write {path}: {problem}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphans(path)
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"
        )
    except OSError as err:
        raise WriteError(f"cannot write {path}: {_os_reason(path.parent, err)}") from None
    os.close(fd)
    try:
        save_fn(tmp)
        _fsync_path(tmp)
        os.chmod(tmp, _default_mode())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None and err.filename in (None, tmp):
            err.filename = str(path)  # "No space left on device" alone names no file
        raise
    _fsync_path(path.parent, directory=True)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half of
    one."""
    atomic_save_file(lambda tmp: Path(tmp).write_bytes(data), path)


def safetensors_writer(tensors: dict, metadata: dict | None = None):
    """A ``save_fn`` for :func:`atomic_save_file` and :func:`save_or_keep` that writes ``tensors``
    (and ``metadata``) as a safetensors file.

    The file's bytes are built in memory first and written by Python's own file write, so a full
    disk or a refused write is an ``OSError`` that the callers name and recover from: the writer of
    the ``safetensors`` package reports such failures as its own exception type, which names no
    file and cannot be told apart from a bug.
    """
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    return lambda tmp: Path(tmp).write_bytes(data)


def save_safetensors(tensors: dict, path: Path | str, metadata: dict | None = None) -> None:
    """Write ``tensors`` to the safetensors file ``path`` atomically (see
    :func:`safetensors_writer`)."""
    atomic_save_file(safetensors_writer(tensors, metadata), path)


def read_safetensors(path: Path | str, kind: str, with_tensors: bool = True) -> tuple[dict, dict]:
    """``(metadata, tensors)`` of a safetensors file, with one clear error for a missing or broken
    file.

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
    # safetensors raises its own error types for truncated or garbage files
    except Exception as err:
        raise UserError(f"{path} is not a readable safetensors {kind} ({err})") from err
    return metadata, tensors


# --------------------------------------------------------------------------------------------------
# Writable destinations, checked before the work that fills them


def _os_reason(folder: Path, err: OSError) -> str:
    """Why ``folder`` cannot take a file, in words: the part of the path that is a file, else the
    OS's reason."""
    if isinstance(err, (FileExistsError, NotADirectoryError)):
        for part in (folder, *folder.parents):
            if part.exists() and not part.is_dir():
                return f"{part} is a file, not a folder"
    return err.strerror or str(err)


def _folder_problem(folder: Path) -> str | None:
    """Why no file can be created in ``folder`` (created if needed), or None when one can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".minigpt-write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return _os_reason(folder, err)
    return None


def check_writable_folder(folder: Path | str, what: str = "folder") -> Path:
    """Create ``folder`` if needed and prove that a file can be created in it; else one
    :class:`WriteError` naming it.

    Called before training or exporting, so that a bad destination costs seconds, not a finished
    run. The probe creates and removes a file, because permission bits do not tell the whole story
    (root, read-only mounts, ACLs).
    """
    folder = Path(folder)
    problem = _folder_problem(folder)
    if problem:
        raise WriteError(f"cannot write to {what} {folder}: {problem}")
    return folder


def check_writable_file(path: Path | str, what: str = "file") -> Path:
    """Refuse, before the work, a file destination that exists and is not a regular file after
    symbolic links are followed (a folder, a device such as ``/dev/null``, a FIFO: the write's
    rename would replace it), that is written as a folder (a trailing separator), or whose folder
    cannot take a file (see :func:`check_writable_folder`)."""
    _refuse_folder_syntax(path, what)
    path = Path(path)
    problem = _not_a_regular_file(path) or _folder_problem(path.parent)
    if problem:
        raise WriteError(f"cannot write {what} {path}: {problem}")
    return path


def writable_cache_dir(*parts: str) -> Path:
    """:func:`cache_dir` joined with ``parts``, created and checked writable; the message names
    ``$MINIGPT_CACHE`` when it is set."""
    where = "the cache folder"
    if os.environ.get(CACHE_ENV):
        where += f" (set by ${CACHE_ENV})"
    return check_writable_folder(cache_dir(*parts), where)


def save_or_keep(save_fn, path: Path | str, what: str) -> None:
    """:func:`atomic_save_file`; when the OS refuses the write (disk full, permissions), the same
    content is written to a fallback file (next to ``path``, else in the cache, else in the
    temporary folder) and one :class:`WriteError` names both, so a finished run is never lost.
    """
    target, path = path, Path(path)
    try:
        atomic_save_file(save_fn, target)  # as given: a trailing separator is refused there
        return
    except (OSError, WriteError) as err:
        reason = str(err)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tried = []
    for folder in (path.parent, cache_dir("unsaved"), Path(tempfile.gettempdir())):
        kept = folder / f"{path.stem}.unsaved-{stamp}{path.suffix}"
        try:
            atomic_save_file(save_fn, kept)
        except (OSError, WriteError):
            tried.append(str(folder))
            continue
        raise WriteError(
            f"could not save the {what} ({reason}); it was kept in {kept}: move it to {path} "
            "once there is room, or load it from there"
        )
    raise WriteError(
        f"could not save the {what} ({reason}), nor a copy in {', '.join(tried)}; the work is lost"
    )


# --------------------------------------------------------------------------------------------------
# Digests: what an artifact should be, verified on every load

DIGEST_KEY = "digest"


def _tensor_sha256(tensor) -> str:
    import torch

    tensor = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # hashed in place, no copy
    return digest.hexdigest()


def content_digest(tensors: dict, fields: dict[str, str]) -> dict:
    """One SHA-256 per tensor (dtype, shape, bytes) and per text field: what an artifact holds.

    Recorded at save time and recomputed on load from the tensors just read (the file is read
    once); per-part hashes let a mismatch name what differs.
    """
    return {
        "tensors": {name: _tensor_sha256(tensors[name]) for name in sorted(tensors)},
        "fields": {
            name: hashlib.sha256(str(fields[name]).encode()).hexdigest() for name in sorted(fields)
        },
    }


def digest_differences(recorded: dict, actual: dict) -> list[str]:
    """What differs between two :func:`content_digest` results, in words (empty: they agree)."""
    out = []
    for part, noun in (("tensors", "tensor"), ("fields", "entry")):
        saved, now = recorded.get(part, {}), actual.get(part, {})
        for name in sorted(set(saved) | set(now)):
            if name not in now:
                out.append(f"{noun} {name!r} is missing")
            elif name not in saved:
                out.append(f"{noun} {name!r} was added")
            elif saved[name] != now[name]:
                out.append(f"{noun} {name!r} differs")
    return out


def verify_digest(path: Path | str, kind: str, recorded, tensors: dict, fields: dict) -> bool:
    """Check ``tensors`` and ``fields`` against the digest ``recorded`` (JSON text) at save time.

    Returns False when nothing was recorded (the caller decides what an unverifiable file means);
    raises one :class:`UserError` naming the file and the parts that differ.
    """
    if recorded is None:
        return False
    try:
        recorded = json.loads(recorded) if isinstance(recorded, str) else recorded
        if not isinstance(recorded, dict) or not all(
            isinstance(recorded.get(part), dict) for part in ("tensors", "fields")
        ):
            raise ValueError("not a map of tensors and fields")
    except ValueError as err:
        raise UserError(
            f"{kind} {path} has an unreadable digest ({err}); the file is damaged"
        ) from None
    differences = digest_differences(recorded, content_digest(tensors, fields))
    if differences:
        more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
        raise UserError(
            f"{kind} {path} does not match the digest recorded when it was saved: "
            f"{'; '.join(differences[:3])}{more}; the file was edited or corrupted, save or copy "
            "it again"
        )
    return True


def sha256_file(path: Path | str) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safetensors_shapes(path: Path | str, kind: str) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor a safetensors file holds, from its header alone (nothing
    allocated)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors' own error types for broken headers
        raise UserError(f"{path} is not a readable safetensors {kind} ({err})") from None


def digest_fields(recorded) -> dict:
    """The ``fields`` part of a digest as stored (JSON text); empty when there is none or it cannot
    be read (:func:`~minigpt.io.verify_digest` then says so)."""
    try:
        fields = json.loads(recorded).get("fields") if isinstance(recorded, str) else None
    except (ValueError, AttributeError):
        return {}
    return fields if isinstance(fields, dict) else {}
