"""Checks for chapter 03 (attention): the notebook's attention against PyTorch and the package.

References: ``F.scaled_dot_product_attention`` (Vaswani et al. 2017, eq. (1), with ``is_causal`` or
a boolean ``attn_mask``) and :class:`minigpt.model.CausalSelfAttention`. The checks draw every
weight themselves and copy it into the notebook's layer, so a wrong helper in the notebook cannot
hide a wrong layer and a layer with degenerate weights cannot make the expected value degenerate.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from minigpt.classroom.checks import assign, check, inside
from minigpt.model import CausalSelfAttention, GPTConfig


def _causal(T: int) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool).tril()


def _trusted_weights(
    mha, d_in: int, d_out: int, qkv_bias: bool, seed: int, out_proj: bool = True
) -> dict:
    """Random weights drawn here and copied into the notebook's layer (its projections): the
    expected values come from these copies, never from the layer's own weights."""
    gen = torch.Generator().manual_seed(seed)
    weights: dict = {}
    names = [("W_query", d_in), ("W_key", d_in), ("W_value", d_in)]
    for name, fan_in in names + ([("out_proj", d_out)] if out_proj else []):
        weight = torch.randn(d_out, fan_in, generator=gen) / math.sqrt(fan_in)
        inside(assign, mha, f"{name}.weight", weight)
        bias = None
        if qkv_bias or name == "out_proj":
            bias = 0.1 * torch.randn(d_out, generator=gen)
            inside(assign, mha, f"{name}.bias", bias)
        weights[name] = (weight, bias)
    return weights


def _reference_mha(weights: dict, heads: int, x: torch.Tensor) -> torch.Tensor:
    """The teaching MultiHeadAttention computed from the check's own weights with the fused kernel
    (no dropout)."""
    B, T, _ = x.shape
    q, k, v = (
        F.linear(x, *weights[name]).view(B, T, heads, -1).transpose(1, 2)
        for name in ("W_query", "W_key", "W_value")
    )
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
    return F.linear(y, *weights["out_proj"])


@check(points=2)
def softmax_attention_numpy_matches_sdpa(nb):
    """softmax_attention_numpy equals F.scaled_dot_product_attention, with and without a mask."""
    rng = np.random.default_rng(301)
    for shape_q, shape_k, d_v in (
        ((6, 4), (6, 4), 4),
        ((5, 8), (7, 8), 3),
        ((2, 3, 6, 16), (2, 3, 6, 16), 16),
    ):
        Q, K = rng.normal(size=shape_q), rng.normal(size=shape_k)
        V = rng.normal(size=shape_k[:-1] + (d_v,))
        masks = [None]
        if shape_q[-2] == shape_k[-2]:
            masks.append(_causal(shape_q[-2]).numpy())
        for mask in masks:
            out, weights = nb.softmax_attention_numpy(Q, K, V, mask=mask)
            tq, tk, tv = (torch.as_tensor(a) for a in (Q, K, V))
            want = F.scaled_dot_product_attention(
                tq, tk, tv, attn_mask=None if mask is None else torch.as_tensor(mask)
            )
            label = "with a causal mask" if mask is not None else "without a mask"
            assert np.shape(out) == tuple(want.shape), (
                f"output shape {np.shape(out)}, expected {tuple(want.shape)}"
            )
            np.testing.assert_allclose(
                out,
                want.numpy(),
                rtol=1e-7,
                atol=1e-9,
                err_msg=(
                    f"softmax_attention_numpy {label} differs from softmax(Q K^T / sqrt(d_k)) V; "
                    "check the 1/sqrt(d_k) "
                    "scaling and that masked scores become -inf before the softmax"
                ),
            )
            scores = tq @ tk.transpose(-2, -1) / np.sqrt(shape_q[-1])
            if mask is not None:
                scores = scores.masked_fill(~torch.as_tensor(mask), float("-inf"))
            np.testing.assert_allclose(
                weights,
                torch.softmax(scores, -1).numpy(),
                rtol=1e-7,
                atol=1e-10,
                err_msg=f"the attention weights {label} are wrong",
            )
    big = np.array([[1000.0, 0.0], [0.0, 1000.0]])
    out, weights = nb.softmax_attention_numpy(big, big, np.eye(2))
    assert np.all(np.isfinite(out)), (
        "large scores must not overflow: subtract the row maximum before exp"
    )


@check(points=1)
def causal_mask_is_lower_triangular(nb):
    """causal_mask(T) is the boolean lower-triangular (T, T) matrix and rejects T <= 0."""
    for T in (1, 2, 6, 17):
        got = torch.as_tensor(nb.causal_mask(T))
        assert got.dtype == torch.bool, f"causal_mask should be boolean, got {got.dtype}"
        assert torch.equal(got, _causal(T)), (
            f"causal_mask({T}) must be True exactly where key j <= query i"
        )
    try:
        nb.causal_mask(0)
    except ValueError:
        pass
    else:
        raise AssertionError("causal_mask(0) should raise ValueError")


@check(points=1)
def self_attention_and_causal_attention_match_sdpa(nb):
    """SelfAttention matches eq. (1) on its projections; CausalAttention matches SDPA with
    is_causal."""
    torch.manual_seed(302)
    layer = nb.SelfAttention(d_in=5, d_out=3).eval()
    weights = _trusted_weights(layer, 5, 3, False, 312, out_proj=False)
    x = torch.randn(7, 5)
    with torch.no_grad():
        q, k, v = (F.linear(x, *weights[name]) for name in ("W_query", "W_key", "W_value"))
        torch.testing.assert_close(layer(x), F.scaled_dot_product_attention(q, k, v))
    head = nb.CausalAttention(d_in=5, d_out=4, context_length=12, dropout=0.0).eval()
    weights = _trusted_weights(head, 5, 4, False, 313, out_proj=False)
    batch = torch.randn(3, 9, 5)
    with torch.no_grad():
        q, k, v = (F.linear(batch, *weights[name]) for name in ("W_query", "W_key", "W_value"))
        torch.testing.assert_close(
            head(batch),
            F.scaled_dot_product_attention(q, k, v, is_causal=True),
            msg="CausalAttention must mask future keys (and cut the mask to T)",
        )


@check(points=2)
def multi_head_attention_matches_sdpa(nb):
    """MultiHeadAttention (explicit masking) equals SDPA(is_causal) with its weights, for several
    shapes."""
    for seed, (d_in, d_out, heads, T, context, bias) in enumerate(
        (
            (8, 8, 2, 10, 16, False),
            (6, 12, 3, 5, 5, True),
            (16, 16, 4, 1, 8, True),
            (8, 8, 1, 7, 7, False),
        )
    ):
        torch.manual_seed(303 + seed)
        mha = nb.MultiHeadAttention(
            d_in, d_out, context, dropout=0.0, num_heads=heads, qkv_bias=bias
        ).eval()
        weights = _trusted_weights(mha, d_in, d_out, bias, 320 + seed)
        x = torch.randn(2, T, d_in)
        with torch.no_grad():
            got = mha(x)
            want = _reference_mha(weights, heads, x)
        assert tuple(got.shape) == (2, T, d_out), (
            f"output shape {tuple(got.shape)}, expected {(2, T, d_out)}"
        )
        torch.testing.assert_close(
            got,
            want,
            msg=(
                f"MultiHeadAttention(d_in={d_in}, d_out={d_out}, num_heads={heads}) on T={T} "
                "differs from "
                "F.scaled_dot_product_attention(is_causal=True) with the same weights; check the "
                "head split "
                "(view then transpose), the mask cut to [:T, :T] and the 1/sqrt(head_dim) scaling"
            ),
        )
    torch.manual_seed(310)
    mha = nb.MultiHeadAttention(8, 8, 8, dropout=0.5, num_heads=2).train()
    weights = _trusted_weights(mha, 8, 8, False, 330)
    x = torch.randn(2, 8, 8)
    with torch.no_grad():
        train_out = mha(x)
        mha.eval()
        eval_out = mha(x)
    assert not torch.allclose(train_out, eval_out), (
        "dropout=0.5 must change the output in training mode"
    )
    torch.testing.assert_close(
        eval_out, _reference_mha(weights, 2, x), msg="in eval mode dropout must do nothing"
    )


@check(points=2)
def multi_head_attention_equals_package(nb):
    """MultiHeadAttention equals minigpt.model.CausalSelfAttention; fused_multi_head_attention and
    to_package_attention give the same outputs."""
    torch.manual_seed(304)
    cfg = GPTConfig(vocab_size=16, context_length=12, n_layer=1, n_head=4, n_embd=16)
    for bias in (False, True):
        mha = nb.MultiHeadAttention(16, 16, 12, dropout=0.0, num_heads=4, qkv_bias=bias).eval()
        package = CausalSelfAttention(cfg).eval()
        weights = _trusted_weights(mha, 16, 16, bias, 340 + bias)
        with torch.no_grad():
            for target, name in (
                (package.query, "W_query"),
                (package.key, "W_key"),
                (package.value, "W_value"),
                (package.out_proj, "out_proj"),
            ):
                weight, source_bias = weights[name]
                target.weight.copy_(weight)
                if source_bias is None:
                    target.bias.zero_()
                else:
                    target.bias.copy_(source_bias)
            x = torch.randn(3, 11, 16)
            want = package(x)
            torch.testing.assert_close(
                mha(x), want, msg="MultiHeadAttention must equal the package's layer"
            )
            torch.testing.assert_close(
                nb.fused_multi_head_attention(mha, x),
                want,
                msg="fused_multi_head_attention must equal the package's layer",
            )
            converted = nb.to_package_attention(mha)
            assert isinstance(converted, CausalSelfAttention), (
                "to_package_attention must return minigpt.model.CausalSelfAttention, got "
                f"{type(converted).__name__}"
            )
            torch.testing.assert_close(
                converted.eval()(x), want, msg="to_package_attention must copy all four projections"
            )


@check(points=1)
def exercise_1_parameter_count_is_exact(nb):
    """exercise_1_attention_parameter_count matches the layers' parameter counts for any number of
    heads."""
    for d, heads, bias in ((8, 2, False), (8, 8, True), (12, 3, True), (64, 4, False)):
        layer = nb.MultiHeadAttention(d, d, 4, num_heads=heads, qkv_bias=bias)
        want = sum(p.numel() for p in layer.parameters())
        got = nb.exercise_1_attention_parameter_count(d, bias)
        assert got == want, (
            f"exercise_1_attention_parameter_count({d}, {bias}) returned {got!r}, the layer has "
            f"{want}"
        )
    assert (
        nb.exercise_1_attention_parameter_count(768, True)
        == 4 * 768 * 768 + 4 * 768
        == sum(p.numel() for p in CausalSelfAttention(GPTConfig()).parameters())
    )


@check(points=1)
def exercise_2_padding_mask_matches_sdpa(nb):
    """exercise_2_padded_causal_attention equals SDPA with causal AND not-padding as the boolean
    mask."""
    torch.manual_seed(305)
    q, k, v = (torch.randn(3, 2, 6, 4) for _ in range(3))
    key_padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2, [False] + [True] * 5])
    got = nb.exercise_2_padded_causal_attention(q, k, v, key_padding)
    want = F.scaled_dot_product_attention(
        q, k, v, attn_mask=_causal(6) & ~key_padding[:, None, None, :]
    )
    torch.testing.assert_close(
        got, want, msg="queries must see only past keys that are not padding"
    )


@check(points=1)
def exercise_3_last_token_equals_last_row(nb):
    """exercise_3_attend_last_token equals the last row of full causal attention."""
    torch.manual_seed(306)
    for T in (1, 5, 13):
        q, k, v = (torch.randn(2, 3, T, 8) for _ in range(3))
        got = nb.exercise_3_attend_last_token(q[:, :, -1:], k, v)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, :, -1:]
        assert tuple(got.shape) == (2, 3, 1, 8), (
            f"expected shape (2, 3, 1, 8), got {tuple(got.shape)}"
        )
        torch.testing.assert_close(
            got, want, msg=f"T={T}: the newest query attends to every key, scaled by 1/sqrt(d)"
        )


@check(points=1)
def exercise_4_sliding_window_mask_is_a_band(nb):
    """exercise_4_sliding_window_mask(T, w) is True exactly where 0 <= i - j < w."""
    for T in (1, 4, 9):
        for window in (1, 2, 3, T, T + 2):
            got = torch.as_tensor(nb.exercise_4_sliding_window_mask(T, window))
            want = torch.tensor([[0 <= i - j < window for j in range(T)] for i in range(T)])
            assert torch.equal(got.bool(), want), (
                f"exercise_4_sliding_window_mask({T}, {window}) is wrong:\n{got.int()}"
            )
    try:
        nb.exercise_4_sliding_window_mask(4, 0)
    except ValueError:
        pass
    else:
        raise AssertionError("exercise_4_sliding_window_mask(4, 0) should raise ValueError")
