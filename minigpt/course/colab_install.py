"""Install the course into a running Colab runtime without replacing what the runtime provides.

The Colab setup cell of every chapter runs this file from the fresh clone, as a script
(``python -I minigpt-lora/minigpt/course/colab_install.py minigpt-lora``), before the package or
its dependencies exist; so it uses the standard library and ``packaging`` only (both ship with
every Colab runtime; pip's own copy of ``packaging`` is the fallback).

Colab pins its own torch, numpy, notebook, ipykernel and jupyter_client, and upgrading them has
broken its runtime. So: the runtime dependencies of ``pyproject.toml`` that are missing, or
installed at a version outside the course's range, are installed with every package of
:data:`KEEP` pinned to its installed version (and numpy too when its version fits the course's
range); the package itself is then installed with ``--no-deps``. A kept package outside the
course's range stays as it is, with a note. Exit status 0 when everything is in place.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tempfile
from pathlib import Path

# Never replaced, even outside the course's range: the runtime's own machinery and its torch build.
KEEP = ("torch", "notebook", "ipykernel", "jupyter_client")
# Kept when the installed version satisfies the course's range, replaced otherwise.
KEEP_IF_FITS = ("numpy",)


def _packaging():
    try:
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
    except ImportError:  # not installed: pip carries its own copy
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.utils import canonicalize_name
    return Requirement, canonicalize_name


def runtime_requirements(checkout: Path | str) -> list[str]:
    """The ``[project] dependencies`` of the checkout's ``pyproject.toml``."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: pip carries tomli
        from pip._vendor import tomli as tomllib
    with open(Path(checkout) / "pyproject.toml", "rb") as handle:
        return list(tomllib.load(handle)["project"]["dependencies"])


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def plan(
    requirements: list[str], installed: dict[str, str | None] | None = None
) -> tuple[list[str], list[str], list[str]]:
    """``(to_install, pins, notes)`` for ``requirements`` given the installed versions (looked up
    when ``installed`` is None): what pip must install, the ``name==version`` constraints that keep
    the runtime's packages, and one line for each kept package outside the course's range."""
    Requirement, canonical = _packaging()
    keep = {canonical(n) for n in KEEP}
    keep_if_fits = {canonical(n) for n in KEEP_IF_FITS}

    def version(name: str) -> str | None:
        if installed is None:
            return installed_version(name)
        return {canonical(k): v for k, v in installed.items()}.get(canonical(name))

    to_install, notes, fits = [], [], {}
    for line in requirements:
        req = Requirement(line)
        name, have = canonical(req.name), version(req.name)
        fits[name] = have is not None and req.specifier.contains(have, prereleases=True)
        if fits[name]:
            continue
        if have is not None and name in keep:
            notes.append(f"keeping the runtime's {req.name} {have} (the course asks for {line})")
            continue
        to_install.append(line)
    pins = []
    for name in sorted(keep | keep_if_fits):
        have = version(name)
        if have is not None and (name in keep or fits.get(name, True)):
            pins.append(f"{name}=={have}")
    return to_install, pins, notes


def pip(*args: str) -> int:
    return subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args]).returncode


def install(checkout: Path | str) -> int:
    """Install the course from ``checkout`` as described above; returns pip's exit status."""
    to_install, pins, notes = plan(runtime_requirements(checkout))
    for note in notes:
        print(note, file=sys.stderr)
    if to_install:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
            handle.write("\n".join(pins) + "\n")
        try:
            code = pip("-c", handle.name, *to_install)
        finally:
            Path(handle.name).unlink()
        if code:
            return code
    # an absolute path: pip reads a bare "minigpt-lora" as the name of a package on the index
    return pip("--no-deps", str(Path(checkout).resolve()))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not (Path(argv[0]) / "pyproject.toml").is_file():
        print("usage: colab_install.py CHECKOUT (a folder holding pyproject.toml)", file=sys.stderr)
        return 2
    return install(argv[0])


if __name__ == "__main__":
    sys.exit(main())
