"""Saved notebooks stay small and readable (one line per progress bar), and every chapter opens in Colab."""

import io
import sys
import types

import nbformat
import pytest
from tqdm import tqdm

from minigpt.notebooks import (COLAB_BADGE_ID, COLAB_SETUP_ID, COLAB_SETUP_SOURCE, REPOSITORY_URL, add_colab_cells,
                               chapter_paths, clean_outputs, collapse_carriage_returns, colab_url, execute_notebook,
                               read_notebook, shrink_png)

NOTEBOOKS = chapter_paths()
IDS = [p.stem for p in NOTEBOOKS]
MAX_NOTEBOOK_BYTES = 300 * 1024


def tqdm_text(steps: int = 400) -> str:
    """What a plain tqdm bar writes while it runs: hundreds of carriage-return redraws."""
    out = io.StringIO()
    for _ in tqdm(range(steps), desc="train", file=out, mininterval=0, miniters=1, ascii=True):
        pass
    return out.getvalue()


def test_carriage_returns_collapse_to_the_final_line():
    text = tqdm_text()
    assert text.count("\r") >= 400
    shown = collapse_carriage_returns("before\n" + text + "after\n")
    assert shown.splitlines() == ["before", shown.splitlines()[1], "after"]
    assert shown.splitlines()[1].startswith("train: 100%") and "400/400" in shown
    assert collapse_carriage_returns("a\r\nb\n") == "a\nb\n"  # \r\n is a plain newline
    assert collapse_carriage_returns("long line\rshort") == "shortline"  # overwrite, as a terminal does
    assert collapse_carriage_returns("bar 50%\rbar 100%\r        \r") == ""  # a bar that clears itself


def test_clean_outputs_merges_one_stream_output_per_redraw():
    nb = nbformat.v4.new_notebook()
    redraws = [part + "\r" for part in tqdm_text().split("\r") if part]
    outputs = [nbformat.v4.new_output("stream", name="stdout", text="start\n")]
    outputs += [nbformat.v4.new_output("stream", name="stderr", text=t) for t in redraws]
    outputs += [nbformat.v4.new_output("stream", name="stdout", text="done\n")]
    nb.cells.append(nbformat.v4.new_code_cell("train()", outputs=outputs))
    assert len(nb.cells[0].outputs) > 400
    clean_outputs(nb)
    kinds = [(o.name, o.text) for o in nb.cells[0].outputs]
    assert [k[0] for k in kinds] == ["stdout", "stderr", "stdout"]
    assert kinds[1][1].count("\n") == 1 and kinds[1][1].startswith("train: 100%")
    again = nbformat.writes(nb)
    assert nbformat.writes(clean_outputs(nb)) == again  # idempotent


def test_shrink_png_keeps_the_picture_and_is_idempotent():
    import base64

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    ax.plot(np.sin(np.linspace(0, 6, 200)))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    small = shrink_png(data)
    assert len(small) < len(data)
    before = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), dtype=float)
    after = np.asarray(Image.open(io.BytesIO(base64.b64decode(small))).convert("RGB"), dtype=float)
    assert before.shape == after.shape and np.abs(before - after).mean() < 2.0
    assert shrink_png(small) == small
    assert shrink_png("not base64 png") == "not base64 png"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_saved_chapter_is_small_and_its_bars_are_one_line(path):
    assert path.stat().st_size <= MAX_NOTEBOOK_BYTES, f"{path.name} is {path.stat().st_size / 1024:.0f} KB"
    nb = read_notebook(path)
    for index, cell in enumerate(nb.cells):
        streams = [o for o in cell.get("outputs", []) if o.output_type == "stream"]
        assert all("\r" not in o.text for o in streams), f"{path.name} cell {index}: progress bar not collapsed"
        names = [o.name for o in streams]
        assert all(a != b for a, b in zip(names, names[1:])) or len(cell.outputs) != len(streams), \
            f"{path.name} cell {index}: consecutive stream outputs not merged"
    assert nbformat.writes(clean_outputs(read_notebook(path))) == nbformat.writes(nb), \
        f"{path.name}: outputs not cleaned (run minigpt.notebooks.clean_notebook_file)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_chapter_starts_with_colab_badge_and_setup(path):
    nb = read_notebook(path)
    badge = nb.cells[0]
    assert badge.cell_type == "markdown" and badge.id == COLAB_BADGE_ID
    assert colab_url(path.name) in badge.source and "colab-badge.svg" in badge.source
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].id == COLAB_SETUP_ID and code[0].source == COLAB_SETUP_SOURCE, \
        f"{path.name}: the Colab setup cell must be the first code cell (run minigpt.notebooks.ensure_colab_cells)"
    assert not add_colab_cells(nb, path.name), f"{path.name}: Colab cells out of date"


def test_colab_url_points_at_the_repository():
    assert colab_url("01_x.ipynb") == ("https://colab.research.google.com/github/"
                                       + REPOSITORY_URL.removeprefix("https://github.com/")
                                       + "/blob/main/chapters/01_x.ipynb")
    assert REPOSITORY_URL in COLAB_SETUP_SOURCE


def test_colab_setup_installs_only_on_colab(monkeypatch, tmp_path):
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    path_before = list(sys.path)
    exec(COLAB_SETUP_SOURCE, {})  # noqa: S102 - the cell's own code
    assert calls == [] and sys.path == path_before  # off Colab it only applies the thread settings

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    exec(COLAB_SETUP_SOURCE, {})  # noqa: S102
    assert calls[0][0][:2] == ["git", "clone"] and calls[0][0][-1] == REPOSITORY_URL
    assert calls[1][0][1:4] == ["-m", "pip", "install"] and calls[1][1]["cwd"] == "minigpt-lora"
    assert sys.path[0] == str(tmp_path / "minigpt-lora")


def test_add_colab_cells_is_idempotent_and_goes_before_the_first_code_cell():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Title"), nbformat.v4.new_code_cell("import os"),
                nbformat.v4.new_code_cell("x = 1")]
    assert add_colab_cells(nb, "01_x.ipynb")
    assert [c.get("id") for c in nb.cells][:3] == [COLAB_BADGE_ID, nb.cells[1].id, COLAB_SETUP_ID]
    assert nb.cells[3].source == "import os"
    snapshot = nbformat.writes(nb)
    assert not add_colab_cells(nb, "01_x.ipynb") and nbformat.writes(nb) == snapshot
    nb.cells[2].source = "old setup"
    assert add_colab_cells(nb, "01_x.ipynb") and nbformat.writes(nb) == snapshot


def test_execute_notebook_collapses_bars_reports_cells_and_skips_the_tcp_warning(tmp_path, capfd):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from tqdm import tqdm\nfor _ in tqdm(range(300), mininterval=0, "
                                          "miniters=1, desc='steps'):\n    pass"),
                nbformat.v4.new_code_cell("print('done')")]
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nb, path)
    out = execute_notebook(path, smoke=True, timeout=120, progress=True)
    first = out.cells[0].outputs
    assert len(first) == 1 and first[0].text.count("\n") == 1 and "300/300" in first[0].text
    err = capfd.readouterr().err
    assert "without encryption" not in err


def test_cell_progress_shows_cell_number_and_latest_bar_line():
    from minigpt.notebooks import _CellProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell("a"), nbformat.v4.new_code_cell("b")]
    screen = Terminal()
    progress = _CellProgress("ch.ipynb", nb, stream=screen)
    progress.start(nb.cells[2], 2)
    progress.text("train:  10%|#    | 1/10\r")
    progress._draw(force=True)
    assert "ch.ipynb cell 2/2" in screen.getvalue() and "train:  10%" in screen.getvalue()

    log = io.StringIO()  # not a terminal: one line per slow cell
    progress = _CellProgress("ch.ipynb", nb, stream=log, slow=0.0)
    progress.start(nb.cells[1], 1)
    progress.text("train: 100%|#####| 10/10\n")
    progress.complete(nb.cells[1], 1)
    assert log.getvalue().startswith("  ch.ipynb cell 1/2 took") and "train: 100%" in log.getvalue()
