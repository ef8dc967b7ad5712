"""The compact vocabulary as a ``transformers`` tokenizer, so exported tiny models generate there.

:class:`CompactTokenizer` wraps :class:`minigpt.tokenizer.CompactVocab`: GPT-2's byte-pair encoding
(built offline, as in :func:`minigpt.tokenizer.get_tokenizer`), then the compact table with byte
fallback. Its ids are the compact vocabulary's own, so ``tokenizer(text).input_ids`` equals
``get_compact_vocab().encode(text)`` and ``tokenizer.decode(ids)`` equals ``vocab.decode(ids)``.

This module imports ``transformers``; import it through ``minigpt.hf.CompactTokenizer``, which
loads it only when asked (the base install does not include ``transformers``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from transformers import PreTrainedTokenizer

from minigpt._validate import UserError
from minigpt.io import DIGEST_KEY, atomic_write_bytes, digest_fields, sha256_file
from minigpt.tokenizer import END_OF_TEXT, CompactVocab, get_compact_vocab, get_tokenizer

# the file minigpt.hf.save_gpt2 writes next to a compact-vocabulary model
VOCAB_FILE = "compact_vocab.json"


def byte_to_char() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable non-space bytes stand for themselves, the others are
    shown as ``chr(256 + n)``, the spelling of GPT-2's own ``vocab.json``."""
    table, extra = {}, 0
    for b in range(256):
        if chr(b).isprintable() and chr(b) != " ":
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class CompactTokenizer(PreTrainedTokenizer):
    """A ``transformers`` tokenizer over the course's compact vocabulary (GPT-2 BPE + byte
    fallback).

    ``CompactTokenizer()`` uses the course's vocabulary;
    ``CompactTokenizer.from_pretrained(folder)`` the one :func:`minigpt.hf.save_gpt2` wrote next to
    the model. ``<|endoftext|>`` is the beginning, end and padding token, as in GPT-2. Tokens are
    spelled in GPT-2's byte-level alphabet (``Ġ`` for a leading space).
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str | os.PathLike | None = None, **kwargs):
        if vocab_file is None:
            self.vocab = get_compact_vocab()
        else:  # a damaged file, or one other than the model's (its digest), is one line naming it
            self.vocab = CompactVocab.load(vocab_file)
            check_tokenizer_file(vocab_file)
        enc, chars = get_tokenizer(), byte_to_char()
        self._id_to_token = [
            END_OF_TEXT
            if i == self.vocab.eot_id
            else "".join(chars[b] for b in enc.decode_single_token_bytes(int(g)))
            for i, g in enumerate(self.vocab.gpt2_ids.tolist())
        ]
        self._token_to_id = {token: i for i, token in enumerate(self._id_to_token)}
        for name in ("bos_token", "eos_token", "pad_token"):
            kwargs.setdefault(name, END_OF_TEXT)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._token_to_id)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        # <|endoftext|> was split off before this call (it is a special token); the rest is text
        return [self._id_to_token[i] for i in self.vocab.encode(text, allow_special=False)]

    def _convert_token_to_id(self, token: str) -> int:
        if token not in self._token_to_id:
            raise KeyError(f"{token!r} is not a token of the compact vocabulary")
        return self._token_to_id[token]

    def _convert_id_to_token(self, index: int) -> str:
        return self._id_to_token[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.vocab.decode([self._token_to_id[t] for t in tokens])

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs,
    ) -> str:
        # straight through the compact vocabulary: transformers' generic decoding would put spaces
        # around special tokens in some versions, and decode must equal minigpt's exactly
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        if skip_special_tokens:
            ids = [i for i in ids if i != self.vocab.eot_id]
        return self.vocab.decode(ids)

    def save_vocabulary(
        self, save_directory: str, filename_prefix: str | None = None
    ) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE
        path = Path(save_directory) / name
        atomic_write_bytes(path, json.dumps({"gpt2_ids": self.vocab.gpt2_ids.tolist()}).encode())
        return (str(path),)


def check_tokenizer_file(path: Path | str) -> None:
    """Refuse a tokenizer file (``compact_vocab.json``) that differs from the one
    :func:`save_gpt2` wrote next to the model in the same folder, when that model records a digest
    of it (other folders: nothing to compare with)."""
    from safetensors import safe_open

    path = Path(path)
    weights = path.parent / "model.safetensors"
    if not weights.is_file():
        return
    try:
        with safe_open(str(weights), framework="pt") as handle:
            recorded = (handle.metadata() or {}).get(DIGEST_KEY)
    except Exception as err:  # noqa: BLE001 - safetensors' own error types for broken headers
        raise UserError(f"{weights} is not a readable safetensors file ({err})") from None
    saved = digest_fields(recorded).get(path.name)
    if saved is None:
        return
    if hashlib.sha256(sha256_file(path).encode()).hexdigest() != saved:
        raise UserError(
            f"{path} is not the vocabulary saved with {weights} (its digest differs); the file "
            "was edited or replaced: export the model again"
        )
