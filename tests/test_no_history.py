"""What a user reads describes the course as it is: no development history (git holds that) in the
README, the docs, the chapters (text, code and saved outputs), the package and the tests."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HISTORY = re.compile(
    r"\bthis round\b|\bprevious round\b|\blast round\b|\bthe round before\b"
    r"|\bearlier versions? of\b|\bprevious version of\b|\bearlier runs of the course\b"
    r"|\bthe committed run\b|\bissue \d+|\bissue #\d+",
    re.IGNORECASE,
)
# A verdict word of the kind a progress log prints; checked in what the code says, since a saved
# output shows what the code printed when the chapter last ran.
LOG_WORDS = re.compile(r"\bgoal reached\b|(?-i:\bMISS\b)", re.IGNORECASE)


def history_phrases(text: str, source: bool = True) -> list[str]:
    found = [m.group(0) for m in HISTORY.finditer(text)]
    return found + ([m.group(0) for m in LOG_WORDS.finditer(text)] if source else [])


def readable_texts() -> dict[str, tuple[str, bool]]:
    """Every text a user reads, with whether it is source (True) or a saved output (False)."""
    texts = {"README.md": ((ROOT / "README.md").read_text(encoding="utf-8"), True)}
    for pattern in ("docs/*.md", "minigpt/**/*.py", "tests/*.py", "scripts/*.py"):
        for path in sorted(ROOT.glob(pattern)):
            if path.name != Path(__file__).name:
                texts[str(path.relative_to(ROOT))] = (path.read_text(encoding="utf-8"), True)
    for path in sorted((ROOT / "chapters").glob("*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        for index, cell in enumerate(nb["cells"]):
            texts[f"{path.name} cell {index}"] = ("".join(cell["source"]), True)
            outputs = []
            for output in cell.get("outputs", []):
                text = output.get("text", output.get("data", {}).get("text/plain", ""))
                outputs.append("".join(text) if isinstance(text, list) else str(text))
            texts[f"{path.name} cell {index} output"] = ("\n".join(outputs), False)
    return texts


def test_the_finder_finds_history():
    assert history_phrases("As in the previous round, LoRA wins (issue 12).") == [
        "previous round",
        "issue 12",
    ]
    assert history_phrases("The previous layer's output feeds the next one.") == []
    assert history_phrases("  MISS  dora step time") == ["MISS"]
    assert history_phrases("  MISS  dora step time", source=False) == []
    assert history_phrases("a cache miss") == []
    assert history_phrases("The previous version of this course ran longer.") == [
        "previous version of"
    ]


def test_nothing_a_user_reads_speaks_of_the_projects_history():
    found = {where: history_phrases(*text) for where, text in readable_texts().items()}
    assert {where: phrases for where, phrases in found.items() if phrases} == {}
