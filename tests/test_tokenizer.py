import socket

import numpy as np
import pytest

from minigpt import tokenizer as tok


def test_known_ids():
    enc = tok.get_tokenizer()
    assert enc.n_vocab == 50257
    assert enc.encode("Hello, world") == [15496, 11, 995]
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces"
    ids = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114]
    assert enc.encode(text, allowed_special={"<|endoftext|>"}) == ids
    assert enc.decode(ids) == text
    assert enc.eot_token == 50256


def test_special_token_refused_unless_allowed():
    with pytest.raises(ValueError):
        tok.get_tokenizer().encode("a <|endoftext|>")


def test_round_trip_unicode_and_unknown_words():
    enc = tok.get_tokenizer()
    for text in ["Akwirw ier", "naïve café — ünïcödé 🙂", "  spaces\n\ttabs", ""]:
        assert enc.decode(enc.encode(text)) == text
    assert len(enc.encode("Akwirw")) > 1  # an unknown word falls apart into sub-words


def test_built_offline_without_cache(monkeypatch, tmp_path):
    """No socket is opened and tiktoken's cache folder stays empty while the tokenizer is built."""

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path))
    tok.get_tokenizer.cache_clear()
    try:
        assert tok.get_tokenizer().encode("Hello, world") == [15496, 11, 995]
    finally:
        tok.get_tokenizer.cache_clear()
    assert list(tmp_path.iterdir()) == []


def test_ranks_equal_tiktokens_own_conversion(tmp_path, monkeypatch):
    """Our conversion of GPT-2's files equals tiktoken's, on the same local files."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no cache copy
    vocab, encoder = tok.gpt2_files()
    theirs = data_gym_to_mergeable_bpe_ranks(
        str(vocab), str(encoder), tok.VOCAB_BPE_SHA256, tok.ENCODER_JSON_SHA256
    )
    assert tok.get_tokenizer()._mergeable_ranks == theirs


def test_corrupted_file_is_refused(tmp_path):
    bad = tmp_path / "vocab.bpe"
    bad.write_bytes(b"#version: 0.2\nh e\n")
    with pytest.raises(ValueError, match="corrupted"):
        tok._read_verified(bad, tok.VOCAB_BPE_SHA256)


def test_compact_vocab_round_trip_and_fallback():
    vocab = tok.get_compact_vocab()
    enc = tok.get_tokenizer()
    text = (
        "To be, or not to be: that is the question.\nAntidisestablishmentarianism 🙂 <|endoftext|>"
    )
    ids = vocab.encode(text)
    assert vocab.decode(ids) == text
    assert max(ids) < len(vocab) and min(ids) >= 0
    assert vocab.eot_id == ids[-1]
    # every id in the table maps back to itself
    assert np.array_equal(vocab.to_gpt2(vocab.from_gpt2(vocab.gpt2_ids)), vocab.gpt2_ids)
    rare = enc.encode(" Antidisestablishmentarianism")
    assert len(vocab.from_gpt2(rare)) >= len(rare)


def test_compact_vocab_file_is_reproducible():
    from minigpt.data import build_course_vocab

    rebuilt = build_course_vocab()
    assert np.array_equal(rebuilt.gpt2_ids, tok.get_compact_vocab().gpt2_ids)


def test_compact_vocab_bad_input():
    with pytest.raises(ValueError, match="single-byte"):
        tok.CompactVocab([1, 2, 3])
    with pytest.raises(ValueError, match="compact ids"):
        tok.get_compact_vocab().decode([10**6])
    with pytest.raises(ValueError, match="size"):
        tok.build_compact_vocab(["abc"], 10)
