"""Where the classroom grader runs a student's code: isolation levels, limits and the audit hook.

Two isolation levels (``python -m minigpt grade --isolation {auto,bwrap,none}``; ``auto`` picks
``bwrap`` when it works on this machine):

``bwrap``
    The worker runs inside Debian's bubblewrap (``apt-get install bubblewrap``): the whole system,
    the installed ``minigpt`` package included, is mounted read-only; ``/tmp`` and ``/dev/shm`` are
    empty private tmpfs mounts of at most :data:`TMPFS_BYTES` each (``--size``; on a bubblewrap too
    old for it they are unbounded, see :func:`tmpfs_size_supported`); the only writable folder is
    the worker's private copy of the notebook's folder; every copy of the reference solutions the
    grader knows of is hidden: the course's ``chapters/`` folder and every folder of the checkout
    but the ``minigpt`` package (``.git``, site builds, ``runs/``, see :func:`checkout_copies`;
    a copy elsewhere on the machine stays readable); there is no network (a private network
    namespace with only loopback), a private PID namespace (``--die-with-parent``: when the
    grader kills the worker, every process it started dies with it, double-forked daemons
    included), a new session (no terminal injection), no
    capabilities when the grader runs as root, and no GPU (``--dev`` shows no device nodes).
``none``
    The worker is a plain child process. A Python audit hook (PEP 578, :func:`install_audit_hook`)
    refuses writes, deletions and new programs outside the sandbox folder. It catches accidents,
    not attacks: C extensions, ``ctypes``, ``_posixsubprocess.fork_exec`` and rebinding the hook's
    closure through ``gc`` all get past it, and a double-forked daemon outlives grading. It can
    read whatever the grader's account can, the reference chapters and the checkout's ``.git``
    included. Reports say "not isolated".

At both levels the worker gets CPU-time, address-space and file-size limits
(``resource.setrlimit``), an environment that hides every GPU (:data:`NO_GPU`), and the grader
watches the size of the sandbox folder (:data:`FOLDER_LIMIT`). The grader never trusts anything
the worker prints: checks run in the grader (:mod:`minigpt.classroom.remote`).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ISOLATION_LEVELS = ("auto", "bwrap", "none")


# Programs that only report on the machine (platform.processor(), matplotlib's font list,
# ctypes.util).
HARMLESS_PROGRAMS = ("uname", "fc-list", "ldconfig", "ldconfig.real", "lscpu", "nvidia-smi")


DEFAULT_MEMORY_BYTES = 6 * 2**30


FILE_LIMIT = 256 * 2**20  # the largest file a worker may write (RLIMIT_FSIZE)


FOLDER_LIMIT = 512 * 2**20  # the most the sandbox folder may hold; the grader stops a worker above


TMPFS_BYTES = 256 * 2**20  # the size of the private /tmp and /dev/shm under bubblewrap


# every variable CUDA, ROCm, oneAPI and torch read to pick an accelerator: none is visible
NO_GPU = {
    "CUDA_VISIBLE_DEVICES": "",
    "HIP_VISIBLE_DEVICES": "",
    "ROCR_VISIBLE_DEVICES": "",
    "ONEAPI_DEVICE_SELECTOR": "opencl:cpu",
    "PYTORCH_ENABLE_MPS_FALLBACK": "0",
    "PYTORCH_MPS_HIGH_WATERMARK_RATIO": "0.0",
}


REFUSALS_FILE = ".minigpt-refused.jsonl"


WORKERS_FILE = "workers.pid"  # beside the sandboxes: the process group of every worker started


# how a worker starts: its folder (the student's files) off sys.path before anything is imported,
# so that a minigpt.py or minigpt/ there cannot stand in for the course package
WORKER_MAIN = "import sys; del sys.path[0]; from minigpt.classroom.worker import run; run()"


@dataclass(frozen=True)
class Limits:
    """Per-process limits for a worker: CPU seconds (RLIMIT_CPU) and address space in bytes
    (RLIMIT_AS)."""

    cpu_seconds: int
    memory_bytes: int = DEFAULT_MEMORY_BYTES
    file_bytes: int = FILE_LIMIT

    def apply(self) -> None:
        """Set the limits on the calling process (run in the child between fork and exec)."""
        cpu = max(1, int(self.cpu_seconds))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
        resource.setrlimit(resource.RLIMIT_AS, (self.memory_bytes, self.memory_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.file_bytes, self.file_bytes))


@functools.cache
def bwrap_available() -> str:
    """ "" when ``bwrap`` runs here with the options the grader uses; otherwise the reason it does
    not."""
    if not sys.platform.startswith("linux"):
        return "bubblewrap needs Linux"
    program = shutil.which("bwrap")
    if program is None:
        return "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    # the probe starts the interpreter that grading will start, through the same mounts, and imports
    # the package: a bwrap that runs `true` but hides a virtual environment under /tmp is not
    # available
    import tempfile

    with tempfile.TemporaryDirectory(prefix="minigpt-bwrap-probe-") as folder:
        probe = bwrap_prefix(Path(folder)) + [sys.executable, "-c", "import minigpt"]
        try:
            result = subprocess.run(probe, capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as err:
            return f"bwrap could not start: {err}"
    if result.returncode != 0:
        return (
            "bwrap cannot start this Python here: "
            + result.stderr.decode(errors="replace").strip()[:200]
        )
    return ""


def resolve_isolation(level: str) -> str:
    """``auto`` -> ``bwrap`` when it works here, else ``none``; ``bwrap`` raises RuntimeError when
    it does not."""
    if level not in ISOLATION_LEVELS:
        raise ValueError(f"isolation must be one of {', '.join(ISOLATION_LEVELS)}, got {level!r}")
    if level == "none":
        return "none"
    reason = bwrap_available()
    if not reason:
        return "bwrap"
    if level == "bwrap":
        raise RuntimeError(f"--isolation bwrap was asked for but {reason}")
    return "none"


def visible_paths() -> list[str]:
    """The folders a worker needs to start this interpreter and import the package: the checkout,
    the interpreter's prefixes and every existing ``sys.path`` entry, outermost first and without
    repeats."""
    import sys

    candidates = [
        Path(__file__).resolve().parents[2],
        Path(sys.executable).resolve().parent,
        Path(sys.executable).parent,
        Path(sys.prefix),
        Path(sys.base_prefix),
        *(Path(entry or ".") for entry in sys.path),
    ]
    kept: list[Path] = []
    for path in sorted({p.resolve() for p in candidates if p.exists()}, key=lambda p: len(p.parts)):
        if not any(path == k or k in path.parents for k in kept) and path != Path("/"):
            kept.append(path)
    return [str(p) for p in kept]


@functools.cache
def tmpfs_size_supported() -> bool:
    """Whether this bubblewrap takes ``--size`` before ``--tmpfs`` (bubblewrap 0.5 and later)."""
    program = shutil.which("bwrap")
    if program is None:
        return False
    try:
        result = subprocess.run([program, "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return "--size" in result.stdout + result.stderr


def _tmpfs(target: str) -> list[str]:
    size = ["--size", str(TMPFS_BYTES)] if tmpfs_size_supported() else []
    return [*size, "--tmpfs", target]


def bwrap_prefix(writable: Path, hidden: list[Path] = ()) -> list[str]:
    """The ``bwrap`` options that confine a worker to ``writable`` (see the module docstring)."""
    writable = Path(writable).resolve()
    args = [
        shutil.which("bwrap") or "bwrap",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        *_tmpfs("/tmp"),
        *_tmpfs("/dev/shm"),
    ]
    if os.geteuid() == 0:  # as root bubblewrap would keep every capability
        args += ["--cap-drop", "ALL"]
    # the private /tmp would hide a checkout or a virtual environment that lives under /tmp: show
    # the
    # package, the interpreter and everything on sys.path again, read-only
    for path in visible_paths():
        args += ["--ro-bind", path, path]
    for path in hidden:
        if Path(path).is_dir():
            args += [
                "--tmpfs",
                str(Path(path).resolve()),
                "--remount-ro",
                str(Path(path).resolve()),
            ]
    args += [
        "--bind",
        str(writable),
        str(writable),
        "--unshare-net",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--die-with-parent",
        "--new-session",
        "--chdir",
        str(writable),
        "--",
    ]
    return args


def checkout_copies(checkout: Path | None = None) -> list[Path]:
    """Every folder of the course's checkout a worker could read a reference solution from: all of
    them but the ``minigpt`` package, its ``*.egg-info`` and folders that hold the interpreter
    (``.git``, ``chapters/``, site builds, ``runs/``, ``tests/``, ...), and the git folder a
    ``.git`` file (a worktree) points to."""
    checkout = Path(checkout or Path(__file__).resolve().parents[2]).resolve()
    if not (checkout / "minigpt" / "__init__.py").is_file():
        return []  # an installed package: no checkout next to it
    needed = [Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.executable)]
    hidden: list[Path] = []
    for entry in sorted(checkout.iterdir()):
        if entry.name == "minigpt" or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir() and not entry.is_symlink():
            if not any(entry == p or entry in p.parents for p in needed):
                hidden.append(entry)
        elif entry.name == ".git" and entry.is_file():  # a worktree: "gitdir: PATH"
            text = read_capped(entry, 4096).decode(errors="replace").strip()
            if text.startswith("gitdir:"):
                gitdir = (checkout / text.split(":", 1)[1].strip()).resolve()
                common = gitdir / "commondir"
                if common.is_file():
                    hidden.append((gitdir / common.read_text().strip()).resolve())
                hidden.append(gitdir)
    return hidden


def sandbox_env(sandbox: Path) -> dict[str, str]:
    """The worker's environment: smoke mode, and every cache or config folder inside ``sandbox``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JPY_", "JUPYTER_"))}
    for name, sub in (
        ("MINIGPT_CACHE", "cache"),
        ("TMPDIR", "tmp"),
        ("TEMP", "tmp"),
        ("TMP", "tmp"),
        ("MPLCONFIGDIR", "config/matplotlib"),
        ("IPYTHONDIR", "config/ipython"),
        ("JUPYTER_RUNTIME_DIR", "config/jupyter"),
        ("HOME", "home"),
        ("XDG_CACHE_HOME", "cache"),
        ("TORCHINDUCTOR_CACHE_DIR", "cache/torchinductor"),
        ("TRITON_CACHE_DIR", "cache/triton"),
    ):
        (sandbox / sub).mkdir(parents=True, exist_ok=True)
        env[name] = str(sandbox / sub)
    env["MINIGPT_SMOKE"] = "1"
    # the import system would otherwise try to write next to the sources
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONNOUSERSITE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(NO_GPU)  # student code never gets the grader's accelerator
    return env


def spawn_worker(
    argv: list[str],
    *,
    isolation: str,
    sandbox: Path,
    limits: Limits,
    stderr,
    hidden: list[Path] = (),
    requests: bool = False,
) -> subprocess.Popen:
    """Start the worker (:data:`WORKER_MAIN`) with ``ARGV`` in ``sandbox`` at ``isolation``
    (``bwrap`` or ``none``), with ``limits``, in its own session; its stdout is a pipe the grader
    reads."""
    command = [sys.executable, "-c", WORKER_MAIN, *argv]
    if isolation == "bwrap":
        command = bwrap_prefix(sandbox, hidden) + command
    elif isolation != "none":
        raise ValueError(f"isolation must be bwrap or none here, got {isolation!r}")
    return subprocess.Popen(
        command,
        cwd=sandbox,
        env=sandbox_env(sandbox),
        stdin=subprocess.PIPE if requests else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        start_new_session=True,
        preexec_fn=limits.apply,
    )


def kill_worker(proc: subprocess.Popen) -> None:
    """Kill the worker's process group (and, under bwrap, its whole PID namespace) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def install_audit_hook(
    allowed: list[str],
    log_path: str | None = None,
    phase: str = "",
    harmless_programs: tuple[str, ...] = HARMLESS_PROGRAMS,
) -> None:
    """Refuse writes, deletions, renames, permission changes and new programs outside ``allowed``
    folders.

    Every refusal raises PermissionError and is appended to ``log_path`` as one JSON line.
    Everything the hook needs lives in its closure. This is PEP 578's audit hook: it sees only what
    Python code does through the standard library, so it is a guard against accidents, not a
    security boundary.
    """
    allowed_roots = tuple(os.path.realpath(p) for p in allowed)
    log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115 - kept for the process
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    path_events = {
        "os.truncate": None,
        "os.chmod": 2,
        "os.chown": 3,
        "os.chflags": None,
        "os.lchmod": None,
        "os.lchown": None,
        "os.lchflags": None,
        "os.utime": 3,
        "os.setxattr": None,
        "os.removexattr": None,
        "os.mkdir": 2,
        "os.mkfifo": 2,
        "os.mknod": 3,
    }
    program_events = (
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "pty.spawn",
        "os.fork",
        "os.forkpty",
    )

    def refuse(event, what):
        if log is not None:
            log.write(json.dumps({"phase": phase, "event": event, "path": str(what)}) + "\n")
            log.flush()
        raise PermissionError(
            errno.EACCES,
            f"minigpt grader: {event} outside the notebook's folder is not allowed",
            str(what),
        )

    def check(event, path, dir_fd=None, follow=True):
        if path is None or isinstance(path, int):
            return  # an open file descriptor: it was checked when it was opened
        try:
            target = resolve_path(path, dir_fd, follow)
        except (TypeError, ValueError, OSError):
            refuse(event, repr(path))
        if target != os.devnull and not any(
            target == root or target.startswith(root + os.sep) for root in allowed_roots
        ):
            refuse(event, target)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags
            ):
                if mode is None and isinstance(path, (str, bytes)) and not os.path.isabs(path):
                    # os.open's event does not carry dir_fd, so a relative path may name any
                    # folder: refuse rather than guess
                    refuse("os.open (relative path, folder unknown)", path)
                check(event, path)
        elif event in ("os.remove", "os.rmdir"):
            check(event, args[0], args[1], follow=False)
        elif event == "os.rename":
            check(event, args[0], args[2], follow=False)
            check(event, args[1], args[3], follow=False)
        elif event == "os.link":
            check(event, args[0], args[2])
            check(event, args[1], args[3], follow=False)
        elif event == "os.symlink":
            check(event, args[1], args[2], follow=False)
        elif event in path_events:
            index = path_events[event]
            check(event, args[0], args[index] if index is not None else None)
        elif event == "shutil.rmtree":
            check(event, args[0], args[1] if len(args) > 1 else None, follow=False)
        elif event in ("shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.copytree"):
            check(event, args[1])
        elif event == "shutil.move":
            check(event, args[0], follow=False)
            check(event, args[1])
        elif event == "subprocess.Popen":
            # args[0] is the program itself (/bin/sh for shell=True), so a command line cannot pose
            # as harmless
            if (
                args[0] is None
                or os.path.basename(os.fsdecode(os.fspath(args[0]))) not in harmless_programs
            ):
                refuse(event, repr(args[1]))
        elif event in program_events:
            refuse(
                event,
                repr(args[1] if event in ("os.exec", "os.posix_spawn", "os.spawn") else args[:1]),
            )
        elif event in ("os.kill", "os.killpg"):
            if args[0] not in (os.getpid(), os.getpgrp()):
                refuse(event, f"process {args[0]}")

    sys.addaudithook(hook)
    _guard_process_handles(refuse)


def _guard_process_handles(refuse) -> None:
    """Signals through process handles raise no audit event: ``os.pidfd_open`` of another process
    and ``signal.pidfd_send_signal`` are refused by replacing them (a guard against accidents too:
    the originals stay reachable from C and through the replacements' closures)."""
    import posix
    import signal as signal_module

    try:
        import _signal
    except ImportError:  # pragma: no cover - CPython always has it
        _signal = None
    real_open = getattr(os, "pidfd_open", None)
    if real_open is not None:

        def pidfd_open(pid, flags=0):
            if pid != os.getpid():
                refuse("os.pidfd_open", f"process {pid}")
            return real_open(pid, flags)

        os.pidfd_open = posix.pidfd_open = pidfd_open

    def pidfd_send_signal(*args, **kwargs):
        refuse("signal.pidfd_send_signal", "a process handle")

    for module in (signal_module, _signal):
        if module is not None and hasattr(module, "pidfd_send_signal"):
            module.pidfd_send_signal = pidfd_send_signal


def resolve_path(path, dir_fd=None, follow: bool = True) -> str:
    """The absolute path an audit event's ``path`` (relative to ``dir_fd`` or the cwd) refers to."""
    path = os.fsdecode(os.fspath(path))
    if not os.path.isabs(path):
        base = os.getcwd()
        if isinstance(dir_fd, int) and dir_fd >= 0:
            try:
                base = os.readlink(f"/proc/self/fd/{dir_fd}")
            except OSError:
                pass
        path = os.path.join(base, path)
    if follow:
        return os.path.realpath(path)
    # removing or renaming an entry changes its folder, not what a symbolic link points to
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def hook_cell_source(allowed: list[str], log_path: str | None, phase: str) -> str:
    """The cell the worker injects first into the notebook: install the hook, leave no name
    behind."""
    return (
        f"from minigpt.classroom.sandbox import install_audit_hook as _minigpt_hook\n"
        f"_minigpt_hook({json.dumps(allowed)}, {json.dumps(log_path)}, {json.dumps(phase)})\n"
        "del _minigpt_hook\n"
    )


def read_capped(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of a file the sandbox may have written (never a link, never more)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return b""
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            return b""
        return handle.read(limit)


def folder_size(folder: Path, limit: int) -> int:
    """The bytes the files under ``folder`` hold, counting up to just past ``limit``."""
    total, pending = 0, [str(folder)]
    while pending and total <= limit:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue
    return total


def read_refusals(log_path: Path, limit: int = 200) -> list[dict]:
    """The refusals the hook logged (at most ``limit``, from the log's first 1 MiB), skipping lines
    that are not well formed."""
    found: list[dict] = []
    text = read_capped(log_path, 2**20).decode("utf-8", errors="replace")
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(item, dict) and {"phase", "event", "path"} <= set(item):
            found.append({k: str(item[k])[:500] for k in ("phase", "event", "path")})
        if len(found) >= limit:
            break
    return found
