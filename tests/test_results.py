"""``docs/results.md`` is rendered from the committed records: every section from its record, a
missing record named by the command that writes it, a damaged one named in one line, ``--check``
for CI, the ``--json`` options that write the records, and the committed page equal to its
records."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
from conftest import run_cli

import minigpt.lab.pretrained as pretrained
from minigpt import UserError
from minigpt.course.results import PRODUCERS, RECORDS_DIR, RESULTS_PAGE, render
from minigpt.device import command_line, machine_description, plain_json, run_record
from minigpt.lab.dora_analysis import summarize_points

MACHINE = {
    "cpu": "Example CPU 9000",
    "cores": 2,
    "cpu_bf16": True,
    "gpu": None,
    "torch": "2.13.0",
    "python": "3.11.7",
    "system": "Linux",
}


def header(kind: str, command: str) -> dict:
    return {
        "kind": kind,
        "machine": dict(MACHINE),
        "date": "2026-12-01",
        "command": command,
        "smoke": False,
    }


def pretraining_record() -> dict:
    return {
        **header("pretraining", "python -m minigpt train --json pretraining.json"),
        "recipe": {"preset": "tiny", "steps": 1400, "batch_size": 64, "lr": 0.006, "seed": 123},
        "model": {
            "n_layer": 4,
            "n_head": 4,
            "n_embd": 128,
            "context_length": 32,
            "vocab_size": 4096,
        },
        "parameters": 1321728,
        "device": "cpu",
        "precision": "bf16",
        "seconds": 167.2,
        "train_seconds": 155.4,
        "tokens_per_second": 15849.0,
        "val_loss": 3.5281,
        "held_out": {
            "nats_per_token": 3.5402,
            "nats_per_char": 1.4871,
            "bits_per_char": 2.1454,
            "tokens": 200704,
            "chars": 476252,
        },
        "unseen_in_finetuning": 0.0,
    }


def compare_run(method: str, seed: int, lr: float, accuracy: float, sha: float, **extra) -> dict:
    return {
        "method": method,
        "seed": seed,
        "lr": lr,
        "rank": 32,
        "alpha": 64,
        "steps": 200,
        "trainable": 294912 if method != "full" else 1321728,
        "task_accuracy": accuracy,
        "val_accuracy": accuracy,
        "domain_loss": 3.0,
        "shakespeare_loss": sha,
        "shakespeare_loss_before": 3.5,
        "task_accuracy_before": 0.0,
        "domain_loss_before": 2.9,
        "delta_ratio": 0.4,
        "seconds": 60.0,
        "checkpoint_bytes": 2**20,
        "diverged_at": None,
        "curve": [{"step": 50, "val_accuracy": 0.5, "task_accuracy": 0.5, "shakespeare_loss": 4.0}],
        **extra,
    }


def compare_record() -> dict:
    runs = [
        compare_run("lora", 0, 0.003, 0.90, 4.9),
        compare_run("lora", 0, 0.006, 0.96, 5.0),
        compare_run("lora", 1, 0.006, 0.98, 5.1),
        compare_run("lora", 2, 0.006, 1.00, 5.2),
        compare_run(
            "lora", 0, 0.012, 0.0, None, task_accuracy=None, diverged_at=57, delta_ratio=None
        ),
        compare_run("full", 0, 0.003, 1.00, 5.2),
        compare_run("full", 1, 0.003, 1.00, 5.2),
        compare_run("full", 2, 0.003, 1.00, 5.2),
    ]
    return {
        **header("compare", "python -m minigpt compare --seeds 3 --json compare.json"),
        "settings": {
            "rank": 32,
            "alpha": 64,
            "steps": 200,
            "grid": [0.003, 0.006, 0.012],
            "seeds": 3,
            "eval_tokens": 10240,
        },
        "chosen": {"lora": 0.006, "full": 0.003},
        "records": runs,
    }


def bench_record() -> dict:
    def row(ms: float, memory: int) -> dict:
        return {
            "median_s": ms / 1000,
            "times": [ms / 1000],
            "tokens_per_s": 512 / (ms / 1000),
            "memory": {
                "parameters": memory // 2,
                "gradients": memory // 4,
                "optimizer": memory // 8,
                "activations": memory // 8,
                "total": memory,
            },
        }

    settings = {
        "preset": "tiny",
        "batch_size": 16,
        "rank": 8,
        "alpha": 16.0,
        "warmup": 3,
        "repeats": 20,
        "seed": 0,
    }
    training = {
        "full": row(100.0, 2**24),
        "lora": row(80.0, 2**23),
        "peft-lora": row(82.0, 2**23),
        "dora": row(93.0, 2**23 + 2**20),
        "peft-dora": row(100.0, 2**23 + 2**20),
    }
    inference = {
        name: {"median_s": ms / 1000, "times": [ms / 1000], "tokens_per_s": 512 / (ms / 1000)}
        for name, ms in (("base", 10.0), ("lora-unmerged", 14.7), ("lora-merged", 10.16))
    }
    return {
        **header("bench", "python -m minigpt bench --json bench.json"),
        "settings": settings,
        "seconds": 95.0,
        "result": {
            "settings": settings,
            "device": "cpu",
            "device_name": "",
            "precision": "fp32",
            "tokens_per_batch": 512,
            "training": training,
            "inference": inference,
            "merge_max_abs_diff": 1e-7,
        },
    }


def course_record() -> dict:
    return {
        **header("course", "python -m minigpt course --json course.json"),
        "smoke": False,
        "cache_was_empty": True,
        "chapters": [
            {"chapter": "01", "notebook": "01_rank_and_low_rank", "seconds": 7.2},
            {"chapter": "05", "notebook": "05_pretraining", "seconds": 189.4},
        ],
        "seconds": 872.0,
    }


def dora_points() -> list[dict]:
    """Points of two methods, two matrices, two seeds (the value matrix of LoRA: seed 0 only)."""
    rng = np.random.default_rng(0)
    points = []
    for method, matrix, seeds in (
        ("full", "query", 2),
        ("full", "value", 2),
        ("lora", "query", 2),
        ("lora", "value", 1),
    ):
        for seed in range(seeds):
            for layer in range(2):
                for step in (50, 100):
                    head_dm, head_dd = rng.uniform(0.01, 0.1, 2), rng.uniform(0.001, 0.01, 2)
                    points.append(
                        {
                            "method": method,
                            "seed": seed,
                            "lr": 0.003,
                            "matrix": matrix,
                            "layer": layer,
                            "step": step,
                            "dM": float(head_dm.mean()),
                            "dD": float(head_dd.mean()),
                            "radial": float(rng.uniform(0.1, 0.3)),
                            "radial_change": float(rng.uniform(-0.01, 0.01)),
                            "row_norm": float(rng.uniform(0.5, 1.5)),
                            "in_features": 32,
                            "head_dM": [float(v) for v in head_dm],
                            "head_dD": [float(v) for v in head_dd],
                            "row_corr": float(rng.uniform(-1, 1)),
                        }
                    )
    return points


def dora_record() -> dict:
    points = dora_points()
    return {
        **header("dora_analysis", "python -m minigpt dora-analysis --json dora_analysis.json"),
        "settings": {"seeds": 2},
        "points": points,
        "summary": plain_json(summarize_points(points)),
    }


def course_rerun_record() -> dict:
    return {**course_record(), "cache_was_empty": False, "seconds": 300.0}


# file stem -> the record it holds
RECORDS = {
    "pretraining": pretraining_record,
    "compare": compare_record,
    "bench": bench_record,
    "course": course_record,
    "course_rerun": course_rerun_record,
    "dora_analysis": dora_record,
}


def write_records(folder: Path, kinds=tuple(RECORDS)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        (folder / f"{kind}.json").write_text(json.dumps(RECORDS[kind]()), encoding="utf-8")
    return folder


def table_row(page: str, start: str) -> str:
    rows = [line for line in page.splitlines() if line.startswith(start)]
    assert len(rows) == 1, (start, rows)
    return rows[0]


# --------------------------------------------------------------------------------------------------
# The page


def test_every_section_comes_from_its_record_with_machine_and_date(tmp_path):
    page = render(write_records(tmp_path / "records"))
    assert page.splitlines()[0] == "# Measured results"
    assert "generated by `python -m minigpt results`" in page and "edited by hand" in page
    machine_lines = [line for line in page.splitlines() if line.startswith("*Machine:")]
    assert len(machine_lines) == len(RECORDS)
    for line in machine_lines:
        assert "Example CPU 9000, 2 logical cores" in line and "no GPU" in line
        assert "torch 2.13.0" in line and "2026-12-01" in line
    assert "No record yet" not in page and str(tmp_path) not in page
    # pretraining
    assert "**1.487 nats/char**" in page and "1,321,728" in page
    assert "155 s of training (15,849 tokens/s)" in page
    # compare: chosen learning rate, mean ± std over the seeds
    assert table_row(page, "| lora | 0.006 | 3 | 294,912") == (
        "| lora | 0.006 | 3 | 294,912 | 98.0 ± 2.0 % | 3.000 ± 0.000 | 5.100 ± 0.100 | "
        "0.400 ± 0.000 | 60 | 1.00 MiB |"
    )
    assert table_row(page, "| pretrained |").startswith("| pretrained | – | – | 0 | 0.0 % | 2.900")
    # the learning-forgetting front: every rate, the chosen one and a diverged run marked
    assert table_row(page, "| lora | 0.003 | 1 |") == "| lora | 0.003 | 1 | 90.0 % | +1.400 |  |"
    assert table_row(page, "| lora | 0.006 | 3 | 98.0 %").endswith("| +1.600 | chosen |")
    assert table_row(page, "| lora | 0.012 |") == (
        "| lora | 0.012 | 1 | – | – | seed 0 diverged at step 57 |"
    )
    # dora analysis: the summary of the points, the mean alone where one seed gives it
    assert "| method | matrix | seeds | corr | detrended | null_ratio | radial | growth" in page
    corr = dora_record()["summary"]["lora"]["query"]["corr"]
    row = table_row(page, "| lora | query | 2 |")
    assert row.startswith(f"| lora | query | 2 | {corr['mean']:.3f} ± {corr['std']:.3f} |")
    assert row.endswith("| 0.83 |")
    corr = dora_record()["summary"]["lora"]["value"]["corr"]
    row = table_row(page, "| lora | value | 1 |")
    assert row.startswith(f"| lora | value | 1 | {corr['mean']:.3f} |") and row.endswith("| – |")
    # bench
    assert table_row(page, "| lora step time / peft-lora") == (
        "| lora step time / peft-lora <= 1 | 0.976 | within the target |"
    )
    assert table_row(page, "| lora-unmerged |").endswith("| 1.470 |")
    assert "the bench took 95.0 s" in page
    # course
    assert "| chapter | 01 | 05 | total |" in page
    assert "| seconds | 7 | 189 | 872 s (14.5 min) |" in page
    assert "from an empty cache" in page
    assert render(tmp_path / "records") == page  # the same records, the same bytes


def test_a_missing_record_names_the_command_that_writes_it(tmp_path):
    page = render(write_records(tmp_path / "records", kinds=("bench",)))
    for kind in ("pretraining", "compare", "dora_analysis", "course"):
        assert f"No record yet: `{PRODUCERS[kind]}` writes it." in page
    assert "No record yet: `python -m minigpt bench" not in page
    assert "| lora step time / peft-lora" in page


def damage(kind: str, how: str) -> str:
    record = RECORDS[kind]()
    if how == "json":
        return json.dumps(record)[:-5]
    if how == "kind":
        record["kind"] = "bench" if kind != "bench" else "course"
    elif how == "top":
        del record[{"compare": "records", "bench": "result"}.get(kind, "machine")]
    elif how == "nested" and kind == "compare":
        del record["records"][2]["seed"]
    elif how == "nested" and kind == "bench":
        del record["result"]["training"]["peft-dora"]
    elif how == "nested":
        record["held_out"] = {"nats_per_char": "many"}
    return json.dumps(record)


@pytest.mark.parametrize(
    "kind, how",
    [
        ("pretraining", "json"),
        ("compare", "kind"),
        ("compare", "top"),
        ("compare", "nested"),
        ("bench", "top"),
        ("bench", "nested"),
        ("course", "top"),
        ("pretraining", "nested"),
    ],
)
def test_a_damaged_record_is_one_line_naming_the_file(tmp_path, capsys, kind, how):
    folder = write_records(tmp_path / "records")
    (folder / f"{kind}.json").write_text(damage(kind, how), encoding="utf-8")
    out = tmp_path / "results.md"
    code, stdout, err = run_cli(capsys, "results", "--records", folder, "--out", out)
    assert code == 2 and stdout == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert f"{kind}.json" in err and "damaged" in err and not out.exists()


def edit(kind: str, change) -> str:
    """``kind``'s record after ``change(record)``, as JSON text (NaN and infinity allowed)."""
    record = RECORDS[kind]()
    change(record)
    return json.dumps(record)


IMPOSSIBLE = {
    "nan": ("pretraining", lambda r: r["held_out"].update(nats_per_char=float("nan")), "held_out"),
    "inf": ("bench", lambda r: r.update(seconds=float("inf")), "seconds"),
    "1e400": ("course", lambda r: r["chapters"][0].update(seconds="1e400"), "chapters[0].seconds"),
    "negative seconds": ("course", lambda r: r.update(seconds=-5.0), "seconds"),
    "accuracy above 1": (
        "compare",
        lambda r: r["records"][1].update(task_accuracy=1.5),
        "records[1].task_accuracy",
    ),
    "negative accuracy": (
        "compare",
        lambda r: r["records"][0].update(task_accuracy_before=-0.1),
        "records[0].task_accuracy_before",
    ),
    "boolean as a number": ("bench", lambda r: r["settings"].update(repeats=True), "repeats"),
    "numeric string": ("pretraining", lambda r: r.update(parameters="1321728"), "parameters"),
    "huge integer": ("pretraining", lambda r: r.update(parameters=10**30), "parameters"),
    "date not a string": ("course", lambda r: r.update(date=20261201), "date"),
    "impossible date": ("course", lambda r: r.update(date="2026-13-45"), "date"),
    "new line in a name": (
        "bench",
        lambda r: r["result"]["training"].update(
            {"x\n## injected": r["result"]["training"]["lora"]}
        ),
        "training",
    ),
    "new line in the machine": ("compare", lambda r: r["machine"].update(cpu="a\nb"), "cpu"),
    "smoke missing": ("bench", lambda r: r.pop("smoke"), "smoke"),
    "zero median": (
        "bench",
        lambda r: r["result"]["inference"]["base"].update(median_s=0),
        "median_s",
    ),
    "seeds out of bounds": ("compare", lambda r: r["settings"].update(seeds=10**9), "seeds"),
}


@pytest.mark.parametrize("case", IMPOSSIBLE)
def test_an_impossible_value_is_refused_naming_the_file_and_the_key(tmp_path, capsys, case):
    kind, change, key = IMPOSSIBLE[case]
    folder = write_records(tmp_path / "records")
    text = edit(kind, change).replace('"1e400"', "1e400")  # a number JSON reads as infinity
    (folder / f"{kind}.json").write_text(text, encoding="utf-8")
    out = tmp_path / "results.md"
    code, stdout, err = run_cli(capsys, "results", "--records", folder, "--out", out)
    assert code == 2 and stdout == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert f"{kind}.json is a damaged" in err and key in err and not out.exists()


INCONSISTENT = {
    "a run twice": ("compare", lambda r: r["records"].append(dict(r["records"][1])), "repeats"),
    "more seeds than the settings": (
        "compare",
        lambda r: r["records"].append(compare_run("full", 3, 0.003, 1.0, 5.2)),
        "seed 3",
    ),
    "fewer seeds than the settings": (
        "compare",
        lambda r: r["records"].remove(r["records"][3]),
        "settings.seeds",
    ),
    "a chosen rate without runs": ("compare", lambda r: r["chosen"].update(dora=0.003), "chosen"),
    "an edited summary": (
        "dora_analysis",
        lambda r: r["summary"]["full"]["query"]["corr"].update(mean=-0.62),
        "summary",
    ),
    "an edited point": ("dora_analysis", lambda r: r["points"][0].update(dM=9.0), "summary"),
    "no points": ("dora_analysis", lambda r: r.update(points=[]), "points"),
    "no summary": ("dora_analysis", lambda r: r.pop("summary"), "summary"),
    "a point of a seed beyond the settings": (
        "dora_analysis",
        lambda r: r["settings"].update(seeds=1),
        "seed 1",
    ),
    "a chapter twice": ("course", lambda r: r["chapters"].append(r["chapters"][0]), "twice"),
}


@pytest.mark.parametrize("case", INCONSISTENT)
def test_a_record_that_contradicts_itself_is_refused(tmp_path, capsys, case):
    kind, change, words = INCONSISTENT[case]
    folder = write_records(tmp_path / "records")
    (folder / f"{kind}.json").write_text(edit(kind, change), encoding="utf-8")
    code, _, err = run_cli(capsys, "results", "--records", folder, "--out", tmp_path / "r.md")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{kind}.json is a damaged" in err and words in err


def test_a_vertical_bar_in_a_name_is_escaped_in_the_tables(tmp_path):
    folder = write_records(tmp_path / "records")
    record = compare_record()
    for row in record["records"]:
        row["method"] = row["method"].replace("lora", "lo|ra")
    record["chosen"] = {"lo|ra": 0.006, "full": 0.003}
    (folder / "compare.json").write_text(json.dumps(record))
    page = render(folder)
    assert "| lo\\|ra | 0.006 | 3 |" in page and "| lo|ra |" not in page


def test_no_records_no_page(tmp_path, capsys):
    out = tmp_path / "results.md"
    out.write_text("the page as it was\n")
    empty = tmp_path / "records"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a record")
    code, _, err = run_cli(capsys, "results", "--records", empty, "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "holds no record" in err
    assert out.read_text() == "the page as it was\n"


@pytest.mark.parametrize("how", ["dangling", "loop", "folder", "fifo"])
def test_a_record_that_is_not_a_regular_file_is_damaged_not_absent(tmp_path, capsys, how):
    folder = write_records(tmp_path / "records")
    path = folder / "course.json"
    path.unlink()
    if how == "dangling":
        path.symlink_to(tmp_path / "nowhere.json")
    elif how == "loop":
        path.symlink_to(path)
    elif how == "folder":
        path.mkdir()
    else:  # a FIFO must not block the read: in a process of its own, with a time limit
        os.mkfifo(path)
        result = subprocess.run(
            [sys.executable, "-m", "minigpt", "results", "--records", str(folder), "--check"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2 and "course.json is a damaged" in result.stderr
        return
    code, _, err = run_cli(capsys, "results", "--records", folder, "--out", tmp_path / "r.md")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "course.json is a damaged" in err


def test_the_page_states_only_what_its_records_hold(tmp_path):
    folder = write_records(tmp_path / "my-records")
    page = render(folder)
    # the folder actually read, named without the machine's folders
    assert "from the records in `my-records/`" in page and str(tmp_path) not in page
    assert "the course's pretraining recipe (`minigpt.lab.pretrained.TINY`)" in page
    assert "smoke run" not in page
    # a course record of some chapters does not speak of the whole course
    assert "whole course" not in page and "These 2 chapters ran with default settings" in page
    record = course_record()
    record["every_chapter"] = True
    (folder / "course.json").write_text(json.dumps(record))
    assert "All 2 chapters ran" in render(folder) and "the whole course" in render(folder)
    # one seed: "1 seed", and a mean without a spread it does not have
    record = compare_record()
    record["settings"]["seeds"] = 1
    record["records"] = [r for r in record["records"] if r["seed"] == 0]
    (folder / "compare.json").write_text(json.dumps(record))
    page = render(folder)
    assert "1 seed," in page and "1 seeds" not in page and "± 0.000" not in page
    assert table_row(page, "| lora | 0.006 | 1 | 294,912").startswith(
        "| lora | 0.006 | 1 | 294,912 | 96.0 % | 3.000 | 5.000 | 0.400 |"
    )
    # smoke records say so, and a pretraining record names the recipe it holds
    for kind in ("pretraining", "bench"):
        record = RECORDS[kind]()
        record["smoke"] = True
        if kind == "pretraining":
            record["recipe"].update(preset="micro", steps=30, batch_size=8, lr=0.003)
        (folder / f"{kind}.json").write_text(json.dumps(record))
    page = render(folder)
    assert page.count("A smoke run (tiny sizes, few steps)") == 2
    assert "the smoke recipe (`minigpt.lab.pretrained.SMOKE`)" in page
    record = pretraining_record()
    record["recipe"]["steps"] = 12
    (folder / "pretraining.json").write_text(json.dumps(record))
    page = render(folder)
    assert "a recipe other than the course's (`minigpt.lab.pretrained.TINY`)" in page
    assert "the course's pretraining recipe" not in page


def test_check_passes_on_a_fresh_page_and_fails_on_a_changed_or_missing_one(tmp_path, capsys):
    folder = write_records(tmp_path / "records")
    out = tmp_path / "docs" / "results.md"
    code, _, err = run_cli(capsys, "results", "--records", folder, "--out", out, "--check")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "does not exist" in err
    assert run_cli(capsys, "results", "--records", folder, "--out", out)[0] == 0
    assert out.read_text(encoding="utf-8") == render(folder)
    code, stdout, _ = run_cli(capsys, "results", "--records", folder, "--out", out, "--check")
    assert code == 0 and "matches" in stdout
    out.write_text(out.read_text(encoding="utf-8").replace("1.487", "1.400"), encoding="utf-8")
    code, _, err = run_cli(capsys, "results", "--records", folder, "--out", out, "--check")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "differs" in err
    # a record that changed makes the page stale too
    assert run_cli(capsys, "results", "--records", folder, "--out", out)[0] == 0
    record = pretraining_record()
    record["held_out"]["nats_per_char"] = 1.2
    (folder / "pretraining.json").write_text(json.dumps(record))
    assert run_cli(capsys, "results", "--records", folder, "--out", out, "--check")[0] == 1


def test_a_records_folder_that_does_not_exist_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "results", "--records", tmp_path / "nope", "--check")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nope" in err


def test_results_help_states_its_defaults_without_machine_paths(capsys):
    code, out, _ = run_cli(capsys, "results", "--help")
    assert code == 0 and "example:\n  python -m minigpt results" in out
    assert "docs/records/" in out and "docs/results.md" in out
    assert str(RECORDS_DIR) not in out and "``" not in out


# --------------------------------------------------------------------------------------------------
# The records' header


def test_a_record_names_the_machine_and_date_but_no_host_user_or_path():
    description = machine_description()
    assert set(description) == {"cpu", "cores", "cpu_bf16", "gpu", "torch", "python", "system"}
    assert description["cores"] == os.cpu_count() and description["cpu"]
    host = socket.gethostname()
    if len(host) > 4:
        assert host not in json.dumps(description)
    record = run_record("bench", "bench", ["--json", "/home/someone/x/bench.json"], {"a": 1})
    assert record["command"] == "python -m minigpt bench --json bench.json"
    assert record["kind"] == "bench" and record["a"] == 1
    assert len(record["date"]) == 10 and record["date"][4] == "-"
    assert command_line("train", ["--out=/tmp/a b/m.safetensors", "--steps", "3"]) == (
        "python -m minigpt train --out=m.safetensors --steps 3"
    )


# --------------------------------------------------------------------------------------------------
# The --json options: checked before any work, records the renderer reads


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started before --json was checked")

    monkeypatch.setattr(pretrained, "pretrain", refuse)


@pytest.mark.parametrize("command", ["train", "bench", "course"])
def test_a_bad_json_destination_fails_in_one_line_before_any_work(
    tmp_path, capsys, monkeypatch, no_training, command
):
    import minigpt.course.execute
    import minigpt.lab.bench

    def refuse(*args, **kwargs):
        raise AssertionError("work started before --json was checked")

    monkeypatch.setattr(minigpt.lab.bench, "run_benchmarks", refuse)
    monkeypatch.setattr(minigpt.course.execute, "execute_notebook", refuse)
    extra = {
        "train": ["--smoke", "--out", tmp_path / "m.safetensors"],
        "bench": ["--smoke"],
        "course": ["--smoke", "--chapters", "01", "--out", tmp_path / "course"],
    }[command]
    start = time.perf_counter()
    code, out, err = run_cli(capsys, command, *extra, "--json", tmp_path)  # a folder
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "--json" in err and str(tmp_path) in err
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "course").exists() and not (tmp_path / "m.safetensors").exists()


def test_train_refuses_a_record_that_would_replace_its_checkpoint(tmp_path, capsys, no_training):
    model = tmp_path / "m.safetensors"
    code, _, err = run_cli(capsys, "train", "--smoke", "--out", model, "--json", model)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "same file" in err


def test_course_json_records_each_chapters_time(tmp_path, capsys, monkeypatch):
    import minigpt.course.execute

    chapters = tmp_path / "chapters"
    chapters.mkdir()
    for name in ("01_first.ipynb", "02_second.ipynb"):
        nbformat.write(nbformat.v4.new_notebook(), chapters / name)
    monkeypatch.setattr(
        minigpt.course.execute, "execute_notebook", lambda path, **_: nbformat.read(path, 4)
    )
    monkeypatch.setenv("MINIGPT_CACHE", str(tmp_path / "empty-cache"))
    records = tmp_path / "records"
    argv = ["course", "--smoke", "--chapters-dir", chapters, "--out", tmp_path / "out"]
    code, _, err = run_cli(capsys, *argv, "--json", records / "course.json")
    assert code == 0, err
    record = json.loads((records / "course.json").read_text())
    assert record["kind"] == "course" and record["smoke"] is True
    assert record["cache_was_empty"] is True
    assert [c["chapter"] for c in record["chapters"]] == ["01", "02"]
    assert record["seconds"] >= sum(c["seconds"] for c in record["chapters"])
    assert str(tmp_path) not in record["command"]
    assert "| chapter | 01 | 02 | total |" in render(records)


def test_bench_json_records_settings_and_results(tmp_path, capsys, monkeypatch):
    import minigpt.lab.bench

    pytest.importorskip("peft", reason="the bench refuses to run without peft")

    result = bench_record()["result"]
    result["settings"] = minigpt.lab.bench.SMOKE_SETTINGS  # as run_benchmarks returns it
    monkeypatch.setattr(minigpt.lab.bench, "run_benchmarks", lambda *a, **k: result)
    monkeypatch.setattr(minigpt.lab.bench, "format_report", lambda result: "report")
    records = tmp_path / "records"
    code, _, err = run_cli(capsys, "bench", "--smoke", "--json", records / "bench.json")
    assert code == 0, err
    record = json.loads((records / "bench.json").read_text())
    assert record["kind"] == "bench" and record["settings"]["preset"] == "micro"
    assert record["result"]["settings"]["repeats"] == 3 and record["seconds"] >= 0
    assert "| lora step time / peft-lora <= 1 | 0.976 |" in render(records)


def test_a_smoke_training_record_renders(tmp_path, capsys):
    records = tmp_path / "records"
    argv = ["train", "--smoke", "--out", tmp_path / "m.safetensors"]
    code, out, err = run_cli(capsys, *argv, "--json", records / "pretraining.json")
    assert code == 0, err
    record = json.loads((records / "pretraining.json").read_text())
    assert record["kind"] == "pretraining" and record["recipe"]["preset"] == "micro"
    assert record["parameters"] > 0 and record["train_seconds"] > 0
    assert record["seconds"] >= record["train_seconds"]
    assert record["held_out"]["nats_per_char"] > 0 and record["val_loss"] > 0
    assert str(tmp_path) not in json.dumps(record)
    page = render(records)
    assert f"**{record['held_out']['nats_per_char']:.3f} nats/char**" in page


# --------------------------------------------------------------------------------------------------
# The committed page


def test_results_page_matches_records():
    if not RECORDS_DIR.is_dir():
        pytest.skip("docs/records/ does not exist yet: the records come from an idle run")
    assert RESULTS_PAGE.read_bytes() == render(RECORDS_DIR).encode("utf-8"), (
        "docs/results.md differs from its records: run python -m minigpt results"
    )


def test_a_second_course_run_has_its_own_section_and_must_start_from_a_filled_cache(tmp_path):
    folder = write_records(tmp_path / "records", kinds=("course",))
    page = render(folder)
    assert f"No record yet: `{PRODUCERS['course_rerun']}` writes it." in page
    rerun = course_rerun_record()
    (folder / "course_rerun.json").write_text(json.dumps(rerun), encoding="utf-8")
    page = render(folder)
    second = page.split("## Chapter run times, a second run")[1]
    assert "from a cache already filled, in 300 s (5.0 min)" in second
    assert "from an empty cache" in page.split("## Chapter run times, a second run")[0]
    unsaid = {k: v for k, v in rerun.items() if k != "cache_was_empty"}
    for damaged in ({**rerun, "cache_was_empty": True}, {**rerun, "smoke": True}, unsaid):
        (folder / "course_rerun.json").write_text(json.dumps(damaged), "utf-8")
        with pytest.raises(UserError, match="course_rerun.json.*filled"):
            render(folder)
    (folder / "course_rerun.json").write_text(json.dumps({**rerun, "kind": "bench"}), "utf-8")
    with pytest.raises(UserError, match="course_rerun.json"):
        render(folder)
