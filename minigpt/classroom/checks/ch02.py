"""Checks for chapter 02 (tokens and data): the notebook's functions against tiktoken and the
package.

The references are GPT-2's tokenizer (:func:`minigpt.tokenizer.get_tokenizer`, the same ids
tiktoken's downloaded encoding gives), :class:`minigpt.tokenizer.CompactVocab`,
:class:`minigpt.data.TokenWindows` and :class:`minigpt.model.GPTModel`. Toy BPE results are compared
with a brute-force version written here.
"""

from __future__ import annotations

import functools
import math
from collections import Counter

import torch
import torch.nn as nn

from minigpt.classroom.checks import check
from minigpt.data import TokenWindows
from minigpt.model import GPTConfig, GPTModel
from minigpt.tokenizer import (
    END_OF_TEXT,
    END_OF_TEXT_ID,
    get_compact_vocab,
    get_tokenizer,
    gpt2_files,
    mergeable_ranks,
)

# Texts with known GPT-2 ids (the first two are the classic examples; tiktoken gives the same ids).
KNOWN_IDS = {
    "Hello, world": [15496, 11, 995],
    "Hello, do you like tea? In the sunlit terraces": [
        15496,
        11,
        466,
        345,
        588,
        8887,
        30,
        554,
        262,
        4252,
        18250,
        8812,
        2114,
    ],
    "Akwirw ier": [33901, 86, 343, 86, 220, 959],
}
HARD_TEXTS = (
    "naïve café 🙂 — ünïcödé",
    "  indented\n\n\ttabs   and  spaces\n",
    "It's 2024: we'll see, they've 99 problems!!",
    "def f(x):\n    return x**2  # squared",
    "HIPPOLYTA:\nFour days will quickly steep",
)


@functools.lru_cache(maxsize=1)
def _ranks() -> dict[bytes, int]:
    vocab_bpe, encoder_json = gpt2_files()
    return mergeable_ranks(vocab_bpe.read_bytes(), encoder_json.read_bytes())


def _merge_reference(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _train_reference(text: str, num_merges: int) -> list[tuple[str, str]]:
    symbols, merges = list(text), []
    for _ in range(num_merges):
        counts = Counter(zip(symbols, symbols[1:], strict=False))
        if not counts:
            break
        best = max(counts.values())
        if best < 2:
            break
        # first occurrence wins ties
        pair = next(p for p in zip(symbols, symbols[1:], strict=False) if counts[p] == best)
        merges.append(pair)
        symbols = _merge_reference(symbols, pair)
    return merges


@check(points=1)
def merge_pair_joins_left_to_right(nb):
    """merge_pair replaces every occurrence of the pair, left to right, without overlaps."""
    cases = [
        (list("the three thin thieves"), ("t", "h")),
        (list("aaa"), ("a", "a")),
        (list("aaaa"), ("a", "a")),
        (list("abab"), ("b", "a")),
        (["ab", "c", "ab", "c", "d"], ("ab", "c")),
        (list("xyz"), ("q", "r")),
        ([], ("a", "b")),
        (["a"], ("a", "b")),
    ]
    for symbols, pair in cases:
        want = _merge_reference(symbols, pair)
        got = nb.merge_pair(list(symbols), pair)
        assert got == want, f"merge_pair({symbols}, {pair}) returned {got}, expected {want}"


@check(points=1)
def most_frequent_pair_and_train_bpe_match_reference(nb):
    """most_frequent_pair breaks ties by first occurrence; train_bpe/apply_merges learn and replay
    the merges."""
    assert nb.most_frequent_pair(list("abcab")) == ("a", "b"), "'ab' occurs twice in 'abcab'"
    assert nb.most_frequent_pair(list("xyzw")) == ("x", "y"), (
        "all pairs occur once: the first one wins"
    )
    assert nb.most_frequent_pair(["x"]) is None, "a single symbol has no pair: return None"
    for text, num_merges in (
        ("the three thin thieves thought the theatre thrilled them", 12),
        ("low lower lowest newer newest wider widest", 10),
        ("aaaaaaaa", 5),
        ("abcdefg", 3),
    ):
        want = _train_reference(text, num_merges)
        merges, symbols = nb.train_bpe(text, num_merges)
        assert [tuple(m) for m in merges] == want, (
            f"train_bpe({text!r}, {num_merges}) learned {merges}, expected {want}"
        )
        # the expected symbols: the reference merges replayed here, not the notebook's own answer
        want_symbols = list(text)
        for pair in want:
            want_symbols = _merge_reference(want_symbols, pair)
        assert list(symbols) == want_symbols, (
            f"train_bpe({text!r}, {num_merges}) ended with {symbols}, expected {want_symbols}"
        )
        assert nb.apply_merges(text, [tuple(m) for m in want]) == want_symbols, (
            "replaying the merges must give the training symbols"
        )


@check(points=2)
def teaching_bpe_equals_gpt2_tokenizer(nb):
    """gpt2_encode_teaching gives GPT-2's known ids and tiktoken's ids on hard texts."""
    enc, ranks = get_tokenizer(), _ranks()
    for text, want in KNOWN_IDS.items():
        got = nb.gpt2_encode_teaching(text, ranks)
        assert list(got) == want, (
            f"gpt2_encode_teaching({text!r}) returned {got}, GPT-2's ids are {want}"
        )
    for text in HARD_TEXTS:
        got, want = list(nb.gpt2_encode_teaching(text, ranks)), enc.encode_ordinary(text)
        assert got == want, f"gpt2_encode_teaching({text!r}) returned {got}, tiktoken gives {want}"
    pieces = nb.pretokenize("Hello, world! It's 2024   ok")
    assert pieces == ["Hello", ",", " world", "!", " It", "'s", " 2024", "  ", " ok"], (
        f"pretokenize split 'Hello, world! It's 2024   ok' into {pieces}"
    )
    assert list(nb.bpe_encode_piece(b" world", ranks)) == [995], (
        "b' world' is a single GPT-2 token (995)"
    )


@check(points=2)
def sliding_windows_match_token_windows(nb):
    """sliding_windows returns exactly TokenWindows' (input, target) pairs, and validates its
    arguments."""
    generator = torch.Generator().manual_seed(201)
    for n, max_length, stride in (
        (13, 4, 1),
        (13, 4, 4),
        (13, 3, 2),
        (13, 12, 5),
        (40, 7, 3),
        (9, 8, 8),
    ):
        ids = torch.randint(0, 4096, (n,), generator=generator).tolist()
        inputs, targets = nb.sliding_windows(ids, max_length, stride)
        dataset = TokenWindows(ids, max_length, stride)
        assert tuple(inputs.shape) == tuple(targets.shape) == (len(dataset), max_length), (
            f"for {n} tokens, max_length {max_length}, stride {stride} expected {len(dataset)} "
            "windows of "
            f"{max_length}; got inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)}"
        )
        want_x = torch.stack([dataset[i][0] for i in range(len(dataset))])
        want_y = torch.stack([dataset[i][1] for i in range(len(dataset))])
        assert torch.equal(inputs.long(), want_x), (
            f"inputs differ from TokenWindows (n={n}, T={max_length}, s={stride})"
        )
        assert torch.equal(targets.long(), want_y), (
            "targets must be the inputs shifted by one token"
        )
    for bad in ((list(range(4)), 4, 1), (list(range(10)), 0, 1), (list(range(10)), 3, 0)):
        try:
            nb.sliding_windows(*bad)
        except ValueError:
            continue
        raise AssertionError(
            f"sliding_windows(ids of length {len(bad[0])}, max_length={bad[1]}, stride={bad[2]}) "
            "should raise ValueError"
        )


@check(points=1)
def embeddings_match_the_model(nb):
    """one_hot_embedding equals nn.Embedding; input_embeddings equals GPTModel's tok_emb +
    pos_emb."""
    torch.manual_seed(202)
    table = nn.Embedding(11, 5)
    ids = torch.randint(0, 11, (3, 7))
    torch.testing.assert_close(nb.one_hot_embedding(ids, table.weight), table(ids))
    model = GPTModel(GPTConfig.from_preset("micro"))
    idx = torch.randint(0, model.cfg.vocab_size, (4, 9))
    got = nb.input_embeddings(idx, model.tok_emb, model.pos_emb)
    want = model.tok_emb(idx) + model.pos_emb.weight[:9]
    assert tuple(got.shape) == (4, 9, model.cfg.n_embd), (
        f"expected (4, 9, {model.cfg.n_embd}), got {tuple(got.shape)}"
    )
    torch.testing.assert_close(
        got, want, msg="h0 must be token embeddings plus the first T position embeddings"
    )


@check(points=1)
def exercise_1_num_windows_matches_token_windows(nb):
    """exercise_1_num_windows(n, T, s) equals len(TokenWindows) (and 0 when there are too few
    tokens)."""
    for n in range(1, 30, 3):
        for max_length in (1, 4, 7, 12):
            for stride in (1, 2, 5, 12):
                want = len(range(0, n - max_length, stride))
                got = nb.exercise_1_num_windows(n, max_length, stride)
                assert got == want, (
                    f"exercise_1_num_windows({n}, {max_length}, {stride}) returned {got}, expected "
                    f"{want}"
                )
    assert nb.exercise_1_num_windows(1_955_746, 128, 128) == math.ceil((1_955_746 - 128) / 128)


@check(points=1)
def exercise_2_byte_fallback_matches_compact_vocab(nb):
    """exercise_2_byte_fallback equals CompactVocab.from_gpt2 on common and rare tokens."""
    enc, vocab = get_tokenizer(), get_compact_vocab()
    table = vocab.gpt2_ids.tolist()
    text = "To be, or not to be: Antidisestablishmentarianism, naïve 🙂 Zxqv kwyjibo <|endoftext|>"
    gpt2_ids = enc.encode(text, allowed_special={END_OF_TEXT})
    got = list(nb.exercise_2_byte_fallback(gpt2_ids, table, enc))
    want = vocab.from_gpt2(gpt2_ids).tolist()
    assert got == want, (
        f"byte fallback gave {got[:12]}..., CompactVocab.from_gpt2 gives {want[:12]}..."
    )
    small = table[:257]  # bytes and <|endoftext|> only: everything is spelled out
    got = list(nb.exercise_2_byte_fallback(enc.encode("Hello"), small, enc))
    assert [small[i] for i in got] == [enc.encode_single_token(bytes([b])) for b in b"Hello"], (
        "with a table of single bytes only, 'Hello' must become its five byte tokens"
    )


@check(points=1)
def exercise_3_sinusoids_follow_vaswani(nb):
    """exercise_3_sinusoidal_positions follows Vaswani et al. (2017) §3.5 and rejects an odd
    d_model."""
    for context_length, d_model in ((16, 8), (50, 64), (3, 2)):
        pe = torch.as_tensor(nb.exercise_3_sinusoidal_positions(context_length, d_model)).double()
        assert tuple(pe.shape) == (context_length, d_model), (
            f"expected {(context_length, d_model)}, got {tuple(pe.shape)}"
        )
        pos = torch.arange(context_length, dtype=torch.float64)[:, None]
        i = torch.arange(d_model // 2, dtype=torch.float64)[None, :]
        angle = pos / 10000 ** (2 * i / d_model)
        torch.testing.assert_close(
            pe[:, 0::2],
            torch.sin(angle),
            atol=1e-6,
            rtol=1e-5,
            msg="even columns must be sin(pos / 10000^(2i/d_model))",
        )
        torch.testing.assert_close(
            pe[:, 1::2],
            torch.cos(angle),
            atol=1e-6,
            rtol=1e-5,
            msg="odd columns must be cos(pos / 10000^(2i/d_model))",
        )
    try:
        nb.exercise_3_sinusoidal_positions(8, 5)
    except ValueError:
        pass
    else:
        raise AssertionError(
            "exercise_3_sinusoidal_positions(8, 5) should raise ValueError: d_model must be even"
        )


@check(points=1)
def exercise_4_join_documents_is_safe(nb):
    """exercise_4_join_documents ends each document with id 50256 and never turns typed text into
    it."""
    enc = get_tokenizer()
    documents = ["First document.", "Second one, with a fake <|endoftext|> inside.", "", "Last"]
    want = []
    for text in documents:
        want += enc.encode_ordinary(text) + [END_OF_TEXT_ID]
    got = list(nb.exercise_4_join_documents(documents, enc))
    assert got.count(END_OF_TEXT_ID) == len(documents), (
        f"expected exactly {len(documents)} separators (one per document), got "
        f"{got.count(END_OF_TEXT_ID)}; "
        "the typed '<|endoftext|>' must stay ordinary text"
    )
    assert got == want, f"expected {want}, got {got}"
    assert list(nb.exercise_4_join_documents([], enc)) == [], "no documents, no ids"
