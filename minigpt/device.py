"""Where the course computes and in which precision: the device contract's code.

Every function that places a model or a tensor resolves its device with :func:`choose_device` (None:
the GPU when there is one, else the CPU) and its precision with :func:`resolve_precision` (bf16
only where the hardware has it). ``docs/architecture.md`` ("Device contract") states the rules;
:mod:`minigpt.train` re-exports these names, which is where the chapters import them from.
"""

from __future__ import annotations

import os
import re
import warnings
from contextlib import nullcontext

import torch

from minigpt._validate import UserError

PRECISIONS = ("auto", "fp32", "bf16")


def check_device_name(requested: str | None) -> str | None:
    """``requested`` if it names a device the course supports (None = choose), else a clear
    error."""
    if requested is not None and (
        not isinstance(requested, str)
        or not (requested in {"cpu", "cuda", "mps"} or re.fullmatch(r"cuda:\d+", requested))
    ):
        raise UserError(
            f"device must be one of 'cpu', 'cuda', 'cuda:N', 'mps' (or None), got {requested!r}"
        )
    return requested


def choose_device(requested: str | None = None) -> torch.device:
    """``cuda`` when available, else ``cpu``; ``mps`` only when asked for explicitly (with a
    warning)."""
    if check_device_name(requested) is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"device {requested!r} was requested but torch.cuda.is_available() is False"
        )
    if requested.startswith("cuda:") and int(requested[5:]) >= torch.cuda.device_count():
        # torch itself only fails at the first kernel, with a multi-line CUDA error
        count = torch.cuda.device_count()
        raise UserError(
            f"device {requested!r} was requested but this machine has {count} CUDA "
            f"device{'s' if count != 1 else ''} (cuda:0 .. cuda:{count - 1})"
        )
    if requested == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(
                "device 'mps' was requested but torch.backends.mps.is_available() is False"
            )
        warnings.warn(
            "MPS has produced silently wrong losses in reported PyTorch versions; compare a few "
            "steps with device='cpu' before trusting it",
            stacklevel=2,
        )
    return torch.device(requested)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 arithmetic in hardware (AVX512-BF16 or AMX: AMD Zen 4+, Intel Sapphire
    Rapids+).

    Elsewhere torch emulates bf16 and autocast makes CPU training slower, not faster.
    """
    probes = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", None),
        getattr(torch.cpu, "_is_amx_tile_supported", None),
    )
    # private torch probes: absent -> False
    return any(probe is not None and probe() for probe in probes)


def cuda_has_native_bf16(device: torch.device | str | None = None) -> bool:
    """True on CUDA devices of compute capability 8.0 or newer (Ampere: A100, RTX 30xx, and later).

    Older cards (T4 and RTX 20xx at 7.5, V100 at 7.0) have no bf16 tensor cores: torch emulates
    bf16 there, slower than float32, and some kernels refuse it.
    """
    return torch.cuda.get_device_capability(device) >= (8, 0)


def has_native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 in hardware: :func:`cuda_has_native_bf16` on CUDA,
    :func:`cpu_has_native_bf16` on a CPU, False elsewhere (MPS)."""
    if device.type == "cuda":
        return cuda_has_native_bf16(device)
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"fp32"`` or ``"bf16"`` for a run on ``device``.

    ``"auto"`` follows ``$MINIGPT_PRECISION`` when set, else picks bf16 where the device has it in
    hardware (:func:`has_native_bf16`: CUDA compute capability >= 8.0, CPUs with AVX512-BF16 or AMX)
    and fp32 everywhere else (T4/V100-class GPUs, MPS, older CPUs). An explicit "bf16" is honoured
    on any device.

    Older GPUs get fp32, not fp16 autocast: fp16's narrow exponent range needs a gradient scaler,
    which skips the steps whose scaled gradients overflow; that would hide real divergence from
    :class:`TrainingDiverged` and make a run's steps depend on the scaler's state. The course's
    models are small enough that fp32 on such a card is still fast.

    On the 2-core development machine (AVX512-BF16) the output head's matmul ran 4.4x faster in bf16
    and a pretraining step 1.8x faster together with :func:`minigpt.keep_freed_memory`
    (scripts/load_test.py --speed). Weights and optimizer state stay float32; for evaluation see
    :func:`evaluate`.
    """
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        precision = os.environ.get("MINIGPT_PRECISION", "auto")
        if precision not in PRECISIONS:
            raise UserError(
                f"MINIGPT_PRECISION must be one of {', '.join(PRECISIONS)}, got {precision!r}"
            )
    if precision != "auto":
        return precision
    return "bf16" if has_native_bf16(device) else "fp32"


def eval_precision(precision: str, device: torch.device) -> str:
    """The precision :func:`train` evaluates a run in: the run's own on an accelerator, float32 on
    a CPU.

    CPU evaluation is a small share of a run, and float32 there keeps validation losses
    comparable between CPUs with and without native bf16.
    """
    return precision if device.type != "cpu" else "fp32"


def autocast(device: torch.device, precision: str | None = None):
    """bf16 autocast when ``precision`` is "bf16", else float32 (a no-op context)."""
    # bf16 keeps float32's exponent range, so no loss scaling is needed (unlike fp16).
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


# --------------------------------------------------------------------------------------------------
# Run records: what a measurement ran on, so that a table can state its machine


def machine_description() -> dict:
    """The machine a measurement runs on, for the records behind ``docs/results.md``.

    Returns ``cpu`` (the model name from ``/proc/cpuinfo`` where there is one, else
    ``platform.processor()``), ``cores`` (logical cores), ``cpu_bf16``
    (:func:`cpu_has_native_bf16`), ``gpu`` (the first CUDA device's name, or None), ``torch``,
    ``python`` and ``system``. Nothing that names the machine or its user (host name, user name,
    paths) is included, because the records are committed and published.
    """
    import platform

    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    cpu = value.strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu or platform.processor() or platform.machine() or "unknown CPU",
        "cores": os.cpu_count(),
        "cpu_bf16": bool(cpu_has_native_bf16()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "system": platform.system(),
    }


def command_line(command: str, argv: list[str]) -> str:
    """``python -m minigpt COMMAND ARGS`` as a shell line, each path that leaves the current folder
    (absolute, from ``~``, or climbing out with ``..``) cut to its file name.

    A record states the command that produced it; such a path would publish the machine's folders,
    and only the file name tells a reader anything.
    """
    import shlex
    from pathlib import PurePath

    def shown(arg: str) -> str:
        option, equals, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        climbs = os.path.normpath(value).split(os.sep)[0] == os.pardir
        if os.path.isabs(value) or value.startswith("~") or climbs:
            value = PurePath(value).name or value
        return f"{option}{equals}{value}"

    return shlex.join(["python", "-m", "minigpt", command, *(shown(a) for a in argv)])


def run_record(kind: str, command: str, argv: list[str], payload: dict) -> dict:
    """A measurement's record: ``kind``, ``machine`` (:func:`machine_description`), ``date`` (UTC,
    ISO, day precision), ``command`` (:func:`command_line`), then the ``payload``'s entries."""
    from datetime import datetime, timezone

    return {
        "kind": kind,
        "machine": machine_description(),
        "date": datetime.now(timezone.utc).date().isoformat(),
        "command": command_line(command, argv),
        **payload,
    }


def plain_json(value):  # noqa: ANN001, ANN201 - any value a record holds
    """``value`` with dataclasses, tuples, NumPy and torch scalars made plain JSON, and NaN or
    infinite numbers made None (JSON has no such numbers; a diverged run's loss is unknown)."""
    import dataclasses
    import math

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy":
        value = value.tolist()  # arrays and scalars alike
    if isinstance(value, dict):
        return {str(key): plain_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # a torch.device, a path given as an object


# The largest file check_record_destination reads to decide whether it is a record.
RECORD_READ_LIMIT = 256 * 2**20


def check_record_destination(
    path: str | os.PathLike, option: str = "--json", kind: str | None = None
) -> str | os.PathLike:
    """Check a ``--json`` destination before the measurement: writable
    (:func:`minigpt.io.check_writable_file`) and, when it exists, a record written by ``--json`` (a
    JSON object with a ``kind``; of ``kind`` when given), which the new record replaces: that is
    measuring again. Anything else there (a checkpoint, a README, a notebook, another command's
    record) is a one-line :class:`UserError` naming ``option`` and the file. Returns ``path``."""
    import json

    from minigpt.io import check_writable_file

    target = check_writable_file(path, option)
    if not target.exists():
        return path
    refuse = f"{option} {target} exists and is not "
    try:
        if target.stat().st_size > RECORD_READ_LIMIT:
            raise ValueError("too large")
        existing = json.loads(target.read_bytes().decode("utf-8"))
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        existing = None
    if not isinstance(existing, dict) or not isinstance(existing.get("kind"), str):
        raise UserError(
            refuse + "a record written by --json (a JSON object with a 'kind'); the record would "
            "replace it: choose another file, or move that one away first"
        )
    if kind is not None and existing["kind"] != kind:
        raise UserError(
            refuse + f"a {kind} record but a {existing['kind']!r} one; the {kind} record would "
            "replace it: choose another file"
        )
    return path


def write_run_record(path: str | os.PathLike, record: dict) -> None:
    """Write ``record`` as indented JSON (:func:`plain_json`), atomically; the destination was
    checked before the run with :func:`check_record_destination`."""
    import json

    from minigpt.io import atomic_write_bytes

    text = json.dumps(plain_json(record), indent=1, ensure_ascii=False, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode("utf-8"))
