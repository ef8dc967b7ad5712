import os

import nbformat
import pytest

from minigpt.course.source import (
    definitions_source,
    import_notebook,
    normalise_source,
    source_cells,
    sync_notebook,
)


def make_nb(tmp_path, *cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    return path


def test_import_keeps_definitions_only(tmp_path):
    path = make_nb(
        tmp_path,
        "import math\nRATE = 0.5\nx = expensive()\n",
        "def area(r):\n    return math.pi * r * r * RATE\n",
        "%time area(2)\nprint(area(1))",
        "def broken(:\n",
    )
    module = import_notebook(path)
    assert module.area(1) == pytest.approx(3.14159265 / 2)
    assert not hasattr(module, "x")
    assert "print" not in definitions_source(nbformat.read(path, as_version=4))


def test_single_source_detects_drift_and_syncs(tmp_path):
    import inspect

    from minigpt.data import train_val_split

    good = "# minigpt-source: minigpt.data.train_val_split\n" + inspect.getsource(train_val_split)
    marked = good.replace(
        "    token_ids = np.asarray", "    # BEGIN SOLUTION hint: x\n    token_ids = np.asarray", 1
    )
    drifted = good.replace("1 - val_fraction", "1 - 2 * val_fraction")
    path = make_nb(tmp_path, good, marked, drifted)
    assert [c.in_sync for c in source_cells(path)] == [True, True, False]
    assert sync_notebook(path) == 1
    assert all(c.in_sync for c in source_cells(path))


def test_normalise_ignores_markers_only():
    assert normalise_source("a\n    # BEGIN SOLUTION hint: h\nb\n# END SOLUTION\n") == "a\nb\n"
    assert normalise_source("a\nb") != normalise_source("a\nc")


def test_cpu_thread_settings_only_when_the_cores_are_busy(monkeypatch):
    import minigpt
    from minigpt.course.chapters import chapter_paths, read_notebook

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    # idle cores: torch's defaults are fastest
    assert minigpt.apply_cpu_thread_settings(busy=0.1) == {}
    # 1.4 busy cores of 4: one thread each for the 3 cores left, sleeping while they wait
    assert minigpt.apply_cpu_thread_settings(busy=1.4) == {
        "OMP_WAIT_POLICY": "PASSIVE",
        "OMP_NUM_THREADS": "3",
    }
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # a user's own choice wins
    assert minigpt.apply_cpu_thread_settings(busy=5.0) == {
        "OMP_WAIT_POLICY": "ACTIVE",
        "OMP_NUM_THREADS": "1",
    }
    busy = minigpt.busy_cores(0.05)
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1) + 1e-9
    # each chapter decides in its first code cell, before any torch import
    for path in chapter_paths():
        code = [c.source for c in read_notebook(path).cells if c.cell_type == "code"]
        assert "apply_cpu_thread_settings()" in code[0], path.name
        assert "import torch" not in code[0], path.name
