"""Where the classroom grader runs a student's code: isolation levels, limits and the audit hook.

Two isolation levels (``python -m minigpt grade --isolation {auto,bwrap,none}``; ``auto`` picks ``bwrap``
when it works on this machine):

``bwrap``
    The worker runs inside Debian's bubblewrap (``apt-get install bubblewrap``): the whole system,
    the installed ``minigpt`` package included, is mounted read-only; ``/tmp`` is an empty private tmpfs; the
    only writable folder is the worker's private copy of the notebook's folder; the course's reference
    ``chapters/`` folder is hidden; there is no network (a private network namespace with only loopback),
    a private PID namespace (``--die-with-parent``: when the grader kills the worker, every process it
    started dies with it, double-forked daemons included), and a new session (no terminal injection).
``none``
    The worker is a plain child process. A Python audit hook (PEP 578, :func:`install_audit_hook`) refuses
    writes, deletions and new programs outside the sandbox folder. It catches accidents, not attacks: C
    extensions, ``ctypes``, ``_posixsubprocess.fork_exec`` and rebinding the hook's closure through ``gc``
    all get past it, and a double-forked daemon outlives grading. Reports say "not isolated".

At both levels the worker gets CPU-time and address-space limits (``resource.setrlimit``), and the grader
never trusts anything it prints: verdicts are computed in the grader (:mod:`minigpt.remote`).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ISOLATION_LEVELS = ("auto", "bwrap", "none")
# Programs that only report on the machine (platform.processor(), matplotlib's font list, ctypes.util).
HARMLESS_PROGRAMS = ("uname", "fc-list", "ldconfig", "ldconfig.real", "lscpu", "nvidia-smi")
DEFAULT_MEMORY_BYTES = 6 * 2**30
REFUSALS_FILE = ".minigpt-refused.jsonl"


@dataclass(frozen=True)
class Limits:
    """Per-process limits for a worker: CPU seconds (RLIMIT_CPU) and address space in bytes (RLIMIT_AS)."""

    cpu_seconds: int
    memory_bytes: int = DEFAULT_MEMORY_BYTES

    def apply(self) -> None:
        """Set the limits on the calling process (run in the child between fork and exec)."""
        cpu = max(1, int(self.cpu_seconds))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
        resource.setrlimit(resource.RLIMIT_AS, (self.memory_bytes, self.memory_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@functools.lru_cache(maxsize=None)
def bwrap_available() -> str:
    """"" when ``bwrap`` runs here with the options the grader uses; otherwise the reason it does not."""
    if not sys.platform.startswith("linux"):
        return "bubblewrap needs Linux"
    program = shutil.which("bwrap")
    if program is None:
        return "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    probe = [program, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
             "--unshare-net", "--unshare-pid", "--die-with-parent", "--new-session", "true"]
    try:
        result = subprocess.run(probe, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return f"bwrap could not start: {err}"
    if result.returncode != 0:
        return "bwrap cannot create namespaces here: " + result.stderr.decode(errors="replace").strip()[:200]
    return ""


def resolve_isolation(level: str) -> str:
    """``auto`` -> ``bwrap`` when it works here, else ``none``; ``bwrap`` raises RuntimeError when it does not."""
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


def bwrap_prefix(writable: Path, hidden: list[Path] = ()) -> list[str]:
    """The ``bwrap`` options that confine a worker to ``writable`` (see the module docstring)."""
    writable = Path(writable).resolve()
    args = [shutil.which("bwrap") or "bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--tmpfs", "/tmp", "--tmpfs", "/dev/shm"]
    # the private /tmp would hide a checkout that lives under /tmp (as CI's may): show the package again
    package_root = Path(__file__).resolve().parents[1]
    args += ["--ro-bind", str(package_root), str(package_root)]
    for path in hidden:
        if Path(path).is_dir():
            args += ["--tmpfs", str(Path(path).resolve()), "--remount-ro", str(Path(path).resolve())]
    args += ["--bind", str(writable), str(writable), "--unshare-net", "--unshare-pid", "--unshare-ipc",
             "--unshare-uts", "--die-with-parent", "--new-session", "--chdir", str(writable), "--"]
    return args


def sandbox_env(sandbox: Path) -> dict[str, str]:
    """The worker's environment: smoke mode, and every cache or config folder inside ``sandbox``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JPY_", "JUPYTER_"))}
    for name, sub in (("MINIGPT_CACHE", "cache"), ("TMPDIR", "tmp"), ("TEMP", "tmp"), ("TMP", "tmp"),
                      ("MPLCONFIGDIR", "config/matplotlib"), ("IPYTHONDIR", "config/ipython"),
                      ("JUPYTER_RUNTIME_DIR", "config/jupyter"), ("HOME", "home"), ("XDG_CACHE_HOME", "cache"),
                      ("TORCHINDUCTOR_CACHE_DIR", "cache/torchinductor"), ("TRITON_CACHE_DIR", "cache/triton")):
        (sandbox / sub).mkdir(parents=True, exist_ok=True)
        env[name] = str(sandbox / sub)
    env["MINIGPT_SMOKE"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the import system would otherwise try to write next to the sources
    env["PYTHONNOUSERSITE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def spawn_worker(argv: list[str], *, isolation: str, sandbox: Path, limits: Limits, stderr,
                 hidden: list[Path] = ()) -> subprocess.Popen:
    """Start ``python -m minigpt.worker ARGV`` in ``sandbox`` at ``isolation`` (``bwrap`` or ``none``),
    with ``limits``, in its own session; its stdout is a pipe the grader reads."""
    command = [sys.executable, "-m", "minigpt.worker", *argv]
    if isolation == "bwrap":
        command = bwrap_prefix(sandbox, hidden) + command
    elif isolation != "none":
        raise ValueError(f"isolation must be bwrap or none here, got {isolation!r}")
    return subprocess.Popen(command, cwd=sandbox, env=sandbox_env(sandbox), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=stderr, start_new_session=True,
                            preexec_fn=limits.apply)


def kill_worker(proc: subprocess.Popen) -> None:
    """Kill the worker's process group (and, under bwrap, its whole PID namespace) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


# --- the audit hook (isolation "none", and a second line of defence under bwrap) ------------------------

def install_audit_hook(allowed: list[str], log_path: str | None = None, phase: str = "",
                       harmless_programs: tuple[str, ...] = HARMLESS_PROGRAMS) -> None:
    """Refuse writes, deletions, renames, permission changes and new programs outside ``allowed`` folders.

    Every refusal raises PermissionError and is appended to ``log_path`` as one JSON line. Everything the
    hook needs lives in its closure. This is PEP 578's audit hook: it sees only what Python code does
    through the standard library, so it is a guard against accidents, not a security boundary.
    """
    allowed_roots = tuple(os.path.realpath(p) for p in allowed)
    log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115 - kept for the process
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    path_events = {"os.truncate": None, "os.chmod": 2, "os.chown": 3, "os.chflags": None, "os.lchmod": None,
                   "os.lchown": None, "os.lchflags": None, "os.utime": 3, "os.setxattr": None,
                   "os.removexattr": None, "os.mkdir": 2, "os.mkfifo": 2, "os.mknod": 3}
    program_events = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "pty.spawn", "os.fork",
                      "os.forkpty")

    def refuse(event, what):
        if log is not None:
            log.write(json.dumps({"phase": phase, "event": event, "path": str(what)}) + "\n")
            log.flush()
        raise PermissionError(errno.EACCES, f"minigpt grader: {event} outside the notebook's folder is not allowed",
                              str(what))

    def check(event, path, dir_fd=None, follow=True):
        if path is None or isinstance(path, int):
            return  # an open file descriptor: it was checked when it was opened
        try:
            target = resolve_path(path, dir_fd, follow)
        except (TypeError, ValueError, OSError):
            refuse(event, repr(path))
        if target != os.devnull and not any(target == root or target.startswith(root + os.sep)
                                            for root in allowed_roots):
            refuse(event, target)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and flags & write_flags):
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
            # args[0] is the program itself (/bin/sh for shell=True), so a command line cannot pose as harmless
            if args[0] is None or os.path.basename(os.fsdecode(os.fspath(args[0]))) not in harmless_programs:
                refuse(event, repr(args[1]))
        elif event in program_events:
            refuse(event, repr(args[1] if event in ("os.exec", "os.posix_spawn", "os.spawn") else args[:1]))
        elif event in ("os.kill", "os.killpg"):
            if args[0] not in (os.getpid(), os.getpgrp()):
                refuse(event, f"process {args[0]}")

    sys.addaudithook(hook)


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
    """The cell the worker injects first into the notebook: install the hook, leave no name behind."""
    return (f"from minigpt.sandbox import install_audit_hook as _minigpt_hook\n"
            f"_minigpt_hook({json.dumps(allowed)}, {json.dumps(log_path)}, {json.dumps(phase)})\n"
            "del _minigpt_hook\n")


def read_refusals(log_path: Path, limit: int = 200) -> list[dict]:
    """The refusals the hook logged (at most ``limit``), skipping lines that are not well formed."""
    found: list[dict] = []
    if not log_path.is_file():
        return found
    with open(log_path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict) and {"phase", "event", "path"} <= set(item):
                found.append({k: str(item[k])[:500] for k in ("phase", "event", "path")})
            if len(found) >= limit:
                break
    return found
