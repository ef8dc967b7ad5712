"""Saved notebooks stay small and readable (one line per progress bar), and every chapter opens in
Colab."""

import io
import re
import sys
import types

import nbformat
import pytest
from tqdm import tqdm

from minigpt.course.chapters import chapter_paths, read_notebook
from minigpt.course.clean import clean_outputs, collapse_carriage_returns, shrink_png
from minigpt.course.colab import (
    COLAB_BADGE_ID,
    COLAB_SETUP_ID,
    COLAB_SETUP_SOURCE,
    REPOSITORY_URL,
    add_colab_cells,
    colab_setup_source,
    colab_url,
    repository_of,
)
from minigpt.course.execute import execute_notebook

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
    # overwrite, as a terminal does
    assert collapse_carriage_returns("long line\rshort") == "shortline"
    # a bar that clears itself
    assert collapse_carriage_returns("bar 50%\rbar 100%\r        \r") == ""


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
    assert path.stat().st_size <= MAX_NOTEBOOK_BYTES, (
        f"{path.name} is {path.stat().st_size / 1024:.0f} KB"
    )
    nb = read_notebook(path)
    for index, cell in enumerate(nb.cells):
        streams = [o for o in cell.get("outputs", []) if o.output_type == "stream"]
        assert all("\r" not in o.text for o in streams), (
            f"{path.name} cell {index}: progress bar not collapsed"
        )
        names = [o.name for o in streams]
        assert all(a != b for a, b in zip(names, names[1:], strict=False)) or len(
            cell.outputs
        ) != len(streams), f"{path.name} cell {index}: consecutive stream outputs not merged"
    assert nbformat.writes(clean_outputs(read_notebook(path))) == nbformat.writes(nb), (
        f"{path.name}: outputs not cleaned (run minigpt.course.chapters.clean_notebook_file)"
    )


MACHINE = re.compile(r"/tmp/|/var/folders/|/root/|/home/|/Users/|site-packages|dist-packages")


def output_texts(cell) -> list[str]:
    texts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            texts.append(out.text)
        elif out.output_type == "error":
            texts.append("\n".join(out.traceback))
        else:
            texts += ["".join(v) for k, v in out.get("data", {}).items() if k.startswith("text/")]
    return texts


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_saved_outputs_hold_no_machine_paths_warnings_or_bare_results(path):
    nb = read_notebook(path)
    for index, cell in enumerate(nb.cells):
        for text in output_texts(cell):
            found = MACHINE.search(text)
            assert not found, (
                f"{path.name} cell {index}: machine path {text[found.start() - 40 :][:120]!r}"
            )
            assert not re.search(r"^\S+\.py:\d+: \w*Warning: ", text, re.MULTILINE), (
                f"{path.name} cell {index}: a Python warning was saved"
            )
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            assert "application/vnd.jupyter.widget-view+json" not in data, f"cell {index}: widget"
            bare = (
                out.output_type == "execute_result" and "".join(data.get("text/plain", "")) == "{}"
            )
            assert not bare, f"{path.name} cell {index}: a bare {{}} result was saved"


def test_cleaning_removes_machine_paths_warnings_widgets_and_bare_results():
    from minigpt.course.clean import scrub_machine

    warning = (
        "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning: "
        "IProgress not found.\n  from .autonotebook import tqdm as notebook_tqdm\n"
    )
    assert scrub_machine(warning + "loss 1.0\n") == "loss 1.0\n"
    assert (
        scrub_machine("checkpoint: /tmp/course9/tiny.safetensors\n")
        == "checkpoint: …/tiny.safetensors\n"
    )
    assert scrub_machine("in /home/ada/.cache/minigpt/gpt2: none") == "in …/gpt2: none"
    assert scrub_machine('File "/usr/lib/python3/dist-packages/x.py", line 3') == (
        'File "<site-packages>/x.py", line 3'
    )
    kept = "rank 1/2, https://example.org/tmp/x, a/b/c and 3/4"
    assert scrub_machine(kept) == kept
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [
        nbformat.v4.new_output("execute_result", {"text/plain": "{}"}, execution_count=1),
        nbformat.v4.new_output(
            "display_data",
            {"application/vnd.jupyter.widget-view+json": {"model_id": "a"}, "text/plain": "HBox()"},
        ),
        nbformat.v4.new_output("stream", name="stderr", text=warning),
        nbformat.v4.new_output("execute_result", {"text/plain": "{'a': 1}"}, execution_count=1),
    ]
    nb.cells = [cell]
    assert [o.data["text/plain"] for o in clean_outputs(nb).cells[0].outputs] == ["{'a': 1}"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_chapter_starts_with_colab_badge_and_setup(path):
    nb = read_notebook(path)
    badge = nb.cells[0]
    assert badge.cell_type == "markdown" and badge.id == COLAB_BADGE_ID
    repository = repository_of(nb)  # the course's address, or a fork's (sync-notebooks)
    assert colab_url(path.name, repository) in badge.source and "colab-badge.svg" in badge.source
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].id == COLAB_SETUP_ID and code[0].source == colab_setup_source(repository), (
        f"{path.name}: the Colab setup cell must be the first code cell (run "
        "minigpt.course.chapters.ensure_colab_cells)"
    )
    assert not add_colab_cells(nb, path.name, repository), f"{path.name}: Colab cells out of date"


def test_colab_url_points_at_the_repository():
    assert colab_url("01_x.ipynb") == (
        "https://colab.research.google.com/github/"
        + REPOSITORY_URL.removeprefix("https://github.com/")
        + "/blob/main/chapters/01_x.ipynb"
    )
    assert REPOSITORY_URL in COLAB_SETUP_SOURCE


def test_colab_setup_installs_only_on_colab(monkeypatch, tmp_path):
    import subprocess

    calls = []

    def fake_run(cmd, **kw):
        calls.append((cmd, kw))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    path_before = list(sys.path)
    exec(COLAB_SETUP_SOURCE, {})  # noqa: S102 - the cell's own code
    assert calls == [] and sys.path == path_before  # off Colab it only applies the thread settings

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    exec(COLAB_SETUP_SOURCE, {})  # noqa: S102
    assert calls[0][0][:2] == ["git", "clone"] and REPOSITORY_URL in calls[0][0]
    assert calls[1][0] == [
        sys.executable,
        "-I",
        "minigpt-lora/minigpt/course/colab_install.py",
        "minigpt-lora",
    ]
    assert sys.path[0] == str(tmp_path / "minigpt-lora")


@pytest.mark.parametrize("failing, words", [(0, "Could not clone"), (1, "Installing the course")])
def test_a_failed_colab_setup_stops_with_one_sentence(monkeypatch, tmp_path, failing, words):
    import subprocess

    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1 if len(calls) - 1 == failing else 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(RuntimeError) as info:
        exec(COLAB_SETUP_SOURCE, {})  # noqa: S102
    shown = info.value._render_traceback_()  # what IPython prints instead of a traceback
    assert len(shown) == 1 and shown[0].startswith(words) and shown[0].endswith("again.")
    assert len(calls) == failing + 1


def test_colab_install_keeps_the_runtimes_packages():
    from minigpt.course.colab_install import plan

    requirements = ["numpy>=1.24", "torch>=2.2,<=2.13.0", "tqdm>=4.66", "nbclient>=0.9", "x==1"]
    installed = {
        "numpy": "1.26.4",
        "torch": "2.99.0+cu128",  # outside the course's range: kept anyway
        "tqdm": "4.60.0",  # too old: installed
        "nbclient": "0.10.2",
        "notebook": "6.5.5",
        "ipykernel": "5.5.6",
        "jupyter-client": "6.1.12",
    }
    to_install, pins, notes = plan(requirements, installed)
    assert to_install == ["tqdm>=4.66", "x==1"]
    assert sorted(pins) == sorted(
        [
            "numpy==1.26.4",
            "torch==2.99.0+cu128",
            "notebook==6.5.5",
            "ipykernel==5.5.6",
            "jupyter-client==6.1.12",
        ]
    )
    assert len(notes) == 1 and "torch 2.99.0+cu128" in notes[0]
    # numpy outside the range is replaced, so it is not pinned
    to_install, pins, _ = plan(["numpy>=1.24"], {"numpy": "1.21.0"})
    assert to_install == ["numpy>=1.24"] and pins == []


def test_colab_install_reads_the_runtime_dependencies():
    from pathlib import Path

    from minigpt.course.colab_install import runtime_requirements

    requirements = runtime_requirements(Path(__file__).resolve().parent.parent)
    names = " ".join(requirements)
    assert "torch" in names and "numpy" in names
    for heavy in ("playwright", "sphinx", "pytest", "transformers", "peft", "notebook>="):
        assert heavy not in names, f"{heavy} is not a runtime dependency"


def test_add_colab_cells_is_idempotent_and_goes_before_the_first_code_cell():
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Title"),
        nbformat.v4.new_code_cell("import os"),
        nbformat.v4.new_code_cell("x = 1"),
    ]
    assert add_colab_cells(nb, "01_x.ipynb")
    assert [c.get("id") for c in nb.cells][:3] == [COLAB_BADGE_ID, nb.cells[1].id, COLAB_SETUP_ID]
    assert nb.cells[3].source == "import os"
    snapshot = nbformat.writes(nb)
    assert not add_colab_cells(nb, "01_x.ipynb") and nbformat.writes(nb) == snapshot
    nb.cells[2].source = "old setup"
    assert add_colab_cells(nb, "01_x.ipynb") and nbformat.writes(nb) == snapshot


def test_execute_notebook_collapses_bars_reports_cells_and_skips_the_tcp_warning(tmp_path, capfd):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "from tqdm import tqdm\nfor _ in tqdm(range(300), mininterval=0, "
            "miniters=1, desc='steps'):\n    pass"
        ),
        nbformat.v4.new_code_cell("print('done')"),
    ]
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nb, path)
    out = execute_notebook(path, smoke=True, timeout=120, progress=True)
    first = out.cells[0].outputs
    assert len(first) == 1 and first[0].text.count("\n") == 1 and "300/300" in first[0].text
    err = capfd.readouterr().err
    assert "without encryption" not in err


def test_cell_progress_shows_cell_number_and_latest_bar_line():
    from minigpt.course.execute import _CellProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# t"),
        nbformat.v4.new_code_cell("a"),
        nbformat.v4.new_code_cell("b"),
    ]
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


def test_progress_bars_are_widgets_only_in_a_live_jupyter_kernel(monkeypatch):
    import importlib.util

    from minigpt import _progress as progress

    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    assert not progress.use_widget()  # no IPython kernel in the test process
    assert type(progress.tqdm(range(2), disable=True)).__module__ == "tqdm.std"

    class Shell:
        config = {"IPKernelApp": {}}

    fake_ipython = types.ModuleType("IPython")
    fake_ipython.get_ipython = lambda: Shell()
    monkeypatch.setitem(sys.modules, "IPython", fake_ipython)
    has_widgets = importlib.util.find_spec("ipywidgets") is not None
    assert progress.use_widget() == has_widgets
    monkeypatch.setenv(progress.PROGRESS_ENV, "text")  # what execute_notebook gives its kernels
    assert not progress.use_widget()
