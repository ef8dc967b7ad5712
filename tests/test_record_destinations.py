"""Where the record-writing commands may write: an existing target that is not a regular file (a
device, a FIFO) is never replaced, a ``--json`` destination that exists must be a record, the
results page never lands among the records, and ``course`` never writes over the chapters. Each
refusal is one line naming the option, exit status 2, before any work.

Devices are made in a temporary folder (``mkfifo``, ``mknod``), never the system's own."""

import json
import os
import stat
from pathlib import Path

import pytest
from conftest import run_cli

import minigpt.course.execute
import minigpt.lab.bench
import minigpt.lab.dora_analysis
import minigpt.lab.lab
import minigpt.lab.pretrained as pretrained
from minigpt import io
from minigpt.device import check_record_destination, command_line

RECORD = {"kind": "bench", "machine": {}, "date": "2026-12-01", "command": "python -m minigpt"}


def fifo(folder: Path, name: str = "target.json") -> Path:
    path = folder / name
    os.mkfifo(path)
    return path


def char_device(folder: Path, name: str = "null.json") -> Path:
    """A character device with /dev/null's numbers, made in ``folder`` (needs root)."""
    path = folder / name
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError) as err:
        pytest.skip(f"cannot make a device node here ({err})")
    return path


def special(path: Path) -> bool:
    mode = os.lstat(path).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


@pytest.fixture
def no_work(monkeypatch):
    """Every command's work replaced by a failure: a refusal must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the work started before the destination was checked")

    monkeypatch.setattr(pretrained, "pretrain", refuse)
    monkeypatch.setattr(minigpt.lab.bench, "run_benchmarks", refuse)
    monkeypatch.setattr(minigpt.course.execute, "execute_notebook", refuse)
    monkeypatch.setattr(minigpt.lab.lab, "run_comparison", refuse)
    monkeypatch.setattr(minigpt.lab.dora_analysis, "run_dora_analysis", refuse)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------------------------------
# The shared checks


@pytest.mark.parametrize("make", [fifo, char_device])
def test_check_writable_file_refuses_an_existing_special_file(tmp_path, make):
    target = make(tmp_path)
    with pytest.raises(io.WriteError, match="not a regular file") as info:
        io.check_writable_file(target, "--json")
    assert "--json" in str(info.value) and str(target) in str(info.value)
    link = tmp_path / "link.json"
    link.symlink_to(target)  # followed: what a write would reach
    with pytest.raises(io.WriteError, match="not a regular file"):
        io.check_writable_file(link, "--json")
    assert special(target)
    # a regular file, a new file and a link to nothing remain writable destinations
    (tmp_path / "plain.json").write_text("{}")
    io.check_writable_file(tmp_path / "plain.json")
    io.check_writable_file(tmp_path / "new.json")
    (tmp_path / "dangling.json").symlink_to(tmp_path / "nowhere")
    io.check_writable_file(tmp_path / "dangling.json")


def test_the_atomic_writer_never_renames_onto_a_special_file(tmp_path):
    target = fifo(tmp_path)
    with pytest.raises(io.WriteError, match="a FIFO, not a regular file"):
        io.atomic_write_bytes(target, b"{}")
    assert special(target) and sorted(p.name for p in tmp_path.iterdir()) == ["target.json"]


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\x01safetensors header and tensors",
        b"# README\n\nNot a record.\n",
        b"[1, 2, 3]",
        b'{"precious": 1}',
        b'{"kind": 3}',
    ],
    ids=["binary", "readme", "json-list", "no-kind", "kind-not-text"],
)
def test_a_json_destination_that_is_not_a_record_is_refused(tmp_path, content):
    target = tmp_path / "x.json"
    target.write_bytes(content)
    with pytest.raises(io.UserError, match="not a record written by --json") as info:
        check_record_destination(target, "--json", "bench")
    assert "--json" in str(info.value) and "\n" not in str(info.value)
    assert target.read_bytes() == content


def test_a_json_destination_may_replace_a_record_of_its_kind_only(tmp_path):
    target = tmp_path / "bench.json"
    target.write_text(json.dumps(RECORD))
    assert check_record_destination(target, "--json", "bench") == target
    assert check_record_destination(target, "--json") == target
    with pytest.raises(io.UserError, match="not a course record but a 'bench' one"):
        check_record_destination(target, "--json", "course")
    assert check_record_destination(tmp_path / "new" / "x.json", "--json", "bench")


def test_a_recorded_command_keeps_no_path_that_leaves_the_current_folder():
    argv = ["--json", "../../home/alice/x.json", "--out=../y.md", "--records", "a/../../z"]
    assert command_line("results", [*argv, "docs/records/b.json", "--seeds", "3"]) == (
        "python -m minigpt results --json x.json --out=y.md --records z docs/records/b.json "
        "--seeds 3"
    )


# --------------------------------------------------------------------------------------------------
# Every command: a device or a FIFO as the destination is refused before the work


def chapters(folder: Path) -> Path:
    import nbformat

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("01_first.ipynb", "02_second.ipynb"):
        nbformat.write(nbformat.v4.new_notebook(), folder / name)
    return folder


def commands(tmp_path: Path) -> dict[str, list]:
    """Each command with everything but its destination, which the test appends."""
    model = tmp_path / "m.safetensors"
    return {
        "train --out": ["train", "--smoke", "--out"],
        "train --json": ["train", "--smoke", "--out", model, "--json"],
        "bench --json": ["bench", "--smoke", "--json"],
        "compare --json": ["compare", "--smoke", "--json"],
        "dora-analysis --json": ["dora-analysis", "--smoke", "--json"],
        "course --json": [
            "course",
            "--smoke",
            "--chapters-dir",
            chapters(tmp_path / "ch"),
            "--out",
            tmp_path / "out",
            "--json",
        ],
    }


@pytest.mark.parametrize(
    "command",
    [
        "train --out",
        "train --json",
        "bench --json",
        "compare --json",
        "dora-analysis --json",
        "course --json",
    ],
)
@pytest.mark.parametrize("make", [fifo, char_device])
def test_no_command_replaces_a_device_or_a_fifo(
    tmp_path, capsys, monkeypatch, no_work, command, make
):
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    target = make(tmp_path)
    code, out, err = run_cli(capsys, *commands(tmp_path)[command], target)
    assert code == 2 and "Traceback" not in err, err
    # compare reports through argparse (usage, then the line); the others print one line
    last = err.strip().splitlines()[-1] if command.startswith("compare") else one_line(err)
    assert command.split()[1] in last and str(target) in last and "not a regular file" in last
    assert special(target) and not (tmp_path / "m.safetensors").exists()


def test_course_refuses_a_device_among_the_executed_notebooks(tmp_path, capsys, no_work):
    out = tmp_path / "out"
    out.mkdir()
    target = fifo(out, "02_second.ipynb")
    argv = ["course", "--smoke", "--chapters-dir", chapters(tmp_path / "ch"), "--out", out]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "--out" in one_line(err) and "not a regular file" in err
    assert special(target)


@pytest.mark.parametrize("make", [fifo, char_device])
def test_results_refuses_a_device_as_its_page(tmp_path, capsys, make):
    from test_results import write_records

    records = write_records(tmp_path / "records", kinds=("bench",))
    target = make(tmp_path)
    for check in ([], ["--check"]):
        code, _, err = run_cli(capsys, "results", "--records", records, "--out", target, *check)
        assert code == 2 and "--out" in one_line(err), err
        assert special(target)


# --------------------------------------------------------------------------------------------------
# --json over a file that is not a record, with every command that writes one


@pytest.mark.parametrize(
    "command", ["train --json", "bench --json", "dora-analysis --json", "course --json"]
)
def test_no_command_replaces_a_file_that_is_not_a_record(
    tmp_path, capsys, monkeypatch, no_work, command
):
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "cache"))
    readme = tmp_path / "README.md"
    readme.write_text("# A README\n")
    code, _, err = run_cli(capsys, *commands(tmp_path)[command], readme)
    assert code == 2 and "--json" in one_line(err) and "not a record" in err
    assert readme.read_text() == "# A README\n"


def test_train_json_refuses_another_kind_of_record(tmp_path, capsys, no_work):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(RECORD))
    argv = ["train", "--smoke", "--out", tmp_path / "m.safetensors", "--json", bench]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "not a pretraining record but a 'bench' one" in one_line(err)


# --------------------------------------------------------------------------------------------------
# results: the page never lands among the records


def test_results_out_inside_the_records_folder_is_refused(tmp_path, capsys):
    from test_results import write_records

    records = write_records(tmp_path / "records")
    before = {p.name: p.read_bytes() for p in records.iterdir()}
    for out in (records / "compare.json", records / "results.md", records / "sub" / "x.md"):
        code, _, err = run_cli(capsys, "results", "--records", records, "--out", out)
        assert code == 2 and "--out" in one_line(err) and "records folder" in err
    assert {p.name: p.read_bytes() for p in records.iterdir()} == before


def test_results_check_of_a_folder_says_so(tmp_path, capsys):
    from test_results import write_records

    records = write_records(tmp_path / "records")
    (tmp_path / "page").mkdir()
    code, _, err = run_cli(
        capsys, "results", "--records", records, "--out", tmp_path / "page", "--check"
    )
    assert (
        code == 2 and "--out" in one_line(err) and "folder" in err and "does not exist" not in err
    )


# --------------------------------------------------------------------------------------------------
# course: never over the chapters, never a record among the notebooks


def course(tmp_path: Path, *argv) -> list:
    return ["course", "--smoke", "--chapters-dir", tmp_path / "ch", *argv]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--out", "ch"], "--out"),
        (["--out", "ch/executed"], "--out"),
        (["--out", "out", "--json", "out/course.json"], "inside the --out folder"),
        (["--out", "out", "--json", "out/01_first.ipynb"], "inside the --out folder"),
        (["--out", "out", "--json", "ch/course.json"], "inside the --chapters-dir folder"),
        (["--out", "out", "--json", "elsewhere/course.ipynb"], "notebook"),
        (["--out", "a-file"], "--out"),
        (["--out", "out", "--chapters", "abc"], "--chapters"),
    ],
)
def test_course_refuses_destinations_among_the_notebooks(tmp_path, capsys, no_work, argv, words):
    chapters(tmp_path / "ch")
    (tmp_path / "a-file").write_text("a file, not a folder")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ch").iterdir()}
    argv = [tmp_path / a if a in ("ch", "out", "a-file") or "/" in a else a for a in argv]
    code, out, err = run_cli(capsys, *course(tmp_path, *argv))
    line = one_line(err)
    assert code == 2 and out == "" and words in line and line.startswith("python -m minigpt course")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ch").iterdir()} == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "elsewhere").exists()


def test_course_through_a_link_to_the_chapters_is_refused(tmp_path, capsys, no_work):
    chapters(tmp_path / "ch")
    (tmp_path / "link").symlink_to(tmp_path / "ch")
    code, _, err = run_cli(capsys, *course(tmp_path, "--out", tmp_path / "link"))
    assert code == 2 and "chapters folder" in one_line(err)
