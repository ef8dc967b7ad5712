"""What every ``python -m minigpt`` sub-command's parser shares: no abbreviated options, each
option's default in its help, an example in the epilog and help text without reStructuredText."""

from __future__ import annotations

import argparse
import re


def plain(text: str | None) -> str:
    """A docstring as plain text for ``--help``: ``literal`` and :func:`role` markup removed."""
    text = re.sub(r":[\w:]+:`~?([^`]+)`", r"\1", text or "")
    return re.sub(r"``([^`]+)``", r"\1", text).strip()


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's and the example's line breaks, and adds ``(default: X)`` to each
    option whose help does not already state its default (flags and unset options excepted)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or "default" in text
            or action.default in (None, False, argparse.SUPPRESS)
        ):
            return text
        return f"{text} (default: %(default)s)"


def path_arg(text: str) -> str:
    """An argparse ``type`` for a path option: an empty (or blank) path is refused, not read as
    "none given" (which would silently use the default) nor as the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the path is empty")
    return text


def folder_arg(text: str):
    """:func:`path_arg` as a :class:`~pathlib.Path`, for folder options."""
    from pathlib import Path

    return Path(path_arg(text))


def positive_int(text: str) -> int:
    """An argparse ``type`` for a count or a number of seconds: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def github_repository(text: str) -> str:
    """An argparse ``type`` for a repository address: ``https://github.com/OWNER/NAME``, which the
    Colab badges and the setup cell's ``git clone`` both need."""
    import re

    address = text.strip().removesuffix(".git")
    if not re.fullmatch(
        r"https://github\.com/[A-Za-z0-9](?:[A-Za-z0-9-]*)/[A-Za-z0-9._-]+", address
    ):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a GitHub repository address like https://github.com/OWNER/NAME"
        )
    return address


def make_parser(prog: str, description: str | None, example: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` for a sub-command: ``allow_abbrev=False`` (``--seed`` is not
    ``--seeds``), plain-text description, defaults in the help and ``example`` in the epilog."""
    return argparse.ArgumentParser(
        prog=prog,
        description=plain(description),
        epilog=f"example:\n  {example}",
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
