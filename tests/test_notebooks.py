"""The notebooks themselves: they run headless in smoke mode, copies of package code stay in sync,
and each chapter's checks (the ones the classroom grader uses) pass on the reference notebook."""

import pytest

from minigpt.classroom.checks import checks_for
from minigpt.course.chapters import chapter_paths
from minigpt.course.execute import execute_notebook
from minigpt.course.source import import_notebook, source_cells

NOTEBOOKS = chapter_paths()
IDS = [p.stem for p in NOTEBOOKS]


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One cache for the session: the smoke pretrained model is trained once, then reused by later
    chapters."""
    return tmp_path_factory.mktemp("minigpt-cache")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_executes_in_smoke_mode(path, shared_cache, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE", str(shared_cache))
    execute_notebook(path, smoke=True, timeout=600)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_source_cells_match_the_package(path):
    for cell in source_cells(path):
        assert cell.in_sync, (
            f"{path.name} cell {cell.index} drifted from {cell.target}; "
            f"run python -m minigpt sync-notebooks"
        )


CHECKS = [(p, c) for p in NOTEBOOKS for c in checks_for(p.name[:2])]


@pytest.mark.parametrize("path, chk", CHECKS, ids=[f"{p.stem[:2]}-{c.name}" for p, c in CHECKS])
def test_chapter_check_passes_on_reference(path, chk):
    chk.run(import_notebook(path))


def test_every_chapter_has_checks():
    for path in NOTEBOOKS:
        assert checks_for(path.name[:2]), (
            f"{path.name} has no checks in minigpt/checks/ch{path.name[:2]}.py"
        )
