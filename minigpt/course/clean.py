"""Cleaning executed notebooks before they are saved: each progress bar as its final line, images
shrunk, and nothing that depends on the machine they ran on."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat

from minigpt.course.chapters import write_notebook_atomic


def collapse_carriage_returns(text: str) -> str:
    """Text as a terminal or Jupyter shows it: each ``\\r`` returns to the start of the line and
    what follows overwrites it, so a progress bar's hundreds of updates become its final line."""
    text = re.sub(r"\r+\n", "\n", text)
    if "\r" not in text:
        return text
    lines = []
    for line in text.split("\n"):
        if "\r" in line:
            shown = ""
            for part in line.split("\r"):
                shown = part + shown[len(part) :]
            line = shown.rstrip()
        lines.append(line)
    return "\n".join(lines)


# An absolute path under a temporary or home folder: where the notebook happened to run.
_MACHINE_PATH = re.compile(
    r"(?<![\w.~/])(?:/tmp|/var/tmp|/private/var/folders|/var/folders|/root|/home/[^/\s]+"
    r"|/Users/[^/\s]+|/opt|/usr|/work)((?:/[^\s/:'\",()\[\]]+)+)"
)
_PACKAGES_PATH = re.compile(r"[^\s\"']*[/\\](?:site|dist)-packages[/\\]")
# A Python warning as the warnings module prints it: "file.py:12: SomeWarning: text" and the
# source line under it; it depends on the installed versions, not on the chapter.
_WARNING = re.compile(r"^\S+\.py:\d+: \w*Warning: .*\n(?:[ \t]+.*\n)?", re.MULTILINE)
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def scrub_machine(text: str) -> str:
    """``text`` without what depends on the machine: Python warnings (with their installation
    paths) removed, installed packages' folders written ``<site-packages>/``, and absolute paths
    under temporary, home or system folders shortened to ``…/`` and their last component."""
    text = _WARNING.sub("", text)
    text = _PACKAGES_PATH.sub("<site-packages>/", text)
    return _MACHINE_PATH.sub(lambda m: "…/" + m.group(1).rsplit("/", 1)[-1], text)


def _bare_empty_result(out: nbformat.NotebookNode) -> bool:
    """An ``Out[n]: {}`` that a cell's last call returned by accident (it says nothing)."""
    data = out.get("data", {})
    return (
        out.output_type == "execute_result"
        and set(data) == {"text/plain"}
        and ("".join(data["text/plain"]).strip() == "{}")
    )


def clean_outputs(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Merge each cell's consecutive stream outputs and collapse progress bars to their final line;
    remove what depends on the machine (:func:`scrub_machine`), widgets (a saved notebook keeps no
    widget state, so they would show nothing) and bare ``{}`` results.

    tqdm redraws its bar with ``\\r`` many times a second, and every redraw is saved as one output;
    after cleaning, each bar is one line, as it looked when it finished. Changes ``nb`` in place and
    returns it.
    """
    for cell in nb.cells:
        if cell.cell_type != "code" or not cell.get("outputs"):
            continue
        merged: list = []
        for out in cell.outputs:
            if (
                out.output_type == "stream"
                and merged
                and merged[-1].output_type == "stream"
                and merged[-1].name == out.name
            ):
                merged[-1].text += out.text
            else:
                merged.append(out)
        cleaned = []
        for out in merged:
            if out.output_type == "stream":
                out.text = scrub_machine(collapse_carriage_returns(out.text))
                if not out.text:
                    continue
            elif WIDGET_MIME in out.get("data", {}) or _bare_empty_result(out):
                continue
            else:
                if "image/png" in out.get("data", {}):
                    out.data["image/png"] = shrink_png(out.data["image/png"])
                if "text/plain" in out.get("data", {}):
                    out.data["text/plain"] = scrub_machine("".join(out.data["text/plain"]))
            cleaned.append(out)
        cell.outputs = cleaned
    return nb


def shrink_png(data: str) -> str:
    """A base64 PNG re-encoded with a 256-colour palette when that is smaller (about 3x for plots).

    Matplotlib's figures are flat colours plus anti-aliasing, so the palette version looks the same
    and keeps each notebook small. Images already in palette mode are returned unchanged
    (idempotent)."""
    import base64
    import binascii
    import io

    from PIL import Image

    try:
        raw = base64.b64decode(data)
        image = Image.open(io.BytesIO(raw))
        if image.mode == "P":
            return data
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] == 255:  # fully opaque: quantize the colours only
            small = rgba.convert("RGB").quantize(
                256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
            )
        else:
            small = rgba.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        buffer = io.BytesIO()
        small.save(buffer, "PNG", optimize=True, dpi=image.info.get("dpi", (72, 72)))
    except (OSError, ValueError, binascii.Error):
        return data  # not a PNG we can read: keep it as it is
    if len(buffer.getvalue()) >= len(raw):
        return data
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def clean_notebook_file(path: Path | str) -> bool:
    """Clean a saved notebook's outputs in place (read, clean, write at once); True when it
    changed."""
    path = Path(path)
    before = path.read_bytes()
    nb = clean_outputs(nbformat.reads(before.decode("utf-8"), as_version=4))
    after = (nbformat.writes(nb) + "\n").encode("utf-8")
    if after == before:
        return False
    write_notebook_atomic(nb, path)
    return True
