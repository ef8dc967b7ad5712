"""Checks for chapter 05 (pretraining): the notebook's loss, loop, decoding and exercises against
references.

References: ``F.cross_entropy``, ``minigpt.train.evaluate``, ``TrainConfig.lr_at``,
``nats_per_character`` and straightforward NumPy/PyTorch re-computations. The training-loop check
runs a few steps of the notebook's ``train_simple`` on a very small model (about a second). Where a
checked function calls another notebook function (``cross_entropy_manual``), the check swaps in
``F.cross_entropy``, so one mistake fails one check.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from minigpt.classroom.checks import check, fetched, held, inside, using
from minigpt.data import make_loader
from minigpt.model import GPTConfig, GPTModel
from minigpt.train import TrainConfig, evaluate, nats_per_character

SMALL = GPTConfig(vocab_size=64, context_length=16, n_layer=1, n_head=2, n_embd=32)
PATTERN = np.tile(np.arange(64), 30)  # next token = current + 1 (mod 64): learnable in a few steps


def _ref_cross_entropy(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@check(points=2)
def cross_entropy_manual_matches_torch(nb):
    """cross_entropy_manual equals F.cross_entropy on (N, V) and (B, T, V) logits, and stays finite
    for large logits."""
    g = torch.Generator().manual_seed(501)
    for shape in ((6, 11), (2, 5, 17), (1, 1, 4096)):
        logits = 3 * torch.randn(shape, generator=g)
        targets = torch.randint(0, shape[-1], shape[:-1], generator=g)
        got = nb.cross_entropy_manual(logits, targets)
        torch.testing.assert_close(
            got,
            _ref_cross_entropy(logits, targets),
            msg=lambda m, shape=shape: (
                f"cross_entropy_manual on logits {shape} differs from F.cross_entropy: {m}. It is "
                "the mean over all "
                "positions of logsumexp(z) - z[target]"
            ),
        )
        assert got.dim() == 0, (
            f"cross_entropy_manual must return a scalar (the mean), got shape {tuple(got.shape)}"
        )
    huge = 1000 * torch.randn(5, 9, generator=g)
    targets = torch.randint(0, 9, (5,), generator=g)
    got = nb.cross_entropy_manual(huge, targets)
    assert torch.isfinite(got), (
        "cross_entropy_manual overflowed on logits of size 1000: use torch.logsumexp"
    )
    torch.testing.assert_close(got, F.cross_entropy(huge, targets))
    logits, targets = torch.randn(3, 7, generator=g), torch.tensor([1, 2, 3])
    grad = inside(_logits_gradient, nb.cross_entropy_manual, logits, targets)
    assert grad is not None, (
        "cross_entropy_manual must be differentiable (no .item() or NumPy inside)"
    )
    torch.testing.assert_close(
        fetched(grad),
        _logits_gradient(F.cross_entropy, logits, targets),
        msg=lambda m: f"the gradient of cross_entropy_manual differs from F.cross_entropy's: {m}",
    )


def _logits_gradient(fn, logits: torch.Tensor, targets: torch.Tensor):
    """The gradient of ``fn(logits, targets)`` with respect to the logits (None when it has none);
    runs beside ``fn``, see minigpt.classroom.checks.inside."""
    logits = logits.detach().clone().requires_grad_(True)
    fn(logits, targets).backward()
    return logits.grad


@check(points=1)
def perplexity_is_exp_of_loss(nb):
    """perplexity(loss) = exp(loss) for floats and 0-d tensors."""
    for loss in (0.0, 1.0, math.log(4096), 2.5):
        for value in (loss, torch.tensor(loss)):
            got = nb.perplexity(value)
            assert math.isclose(float(got), math.exp(loss), rel_tol=1e-6), (
                f"perplexity({value!r}) returned {got!r}; expected exp(loss) = {math.exp(loss):.6g}"
            )


@check(points=2)
def train_simple_reduces_the_loss(nb):
    """train_simple returns one loss per step, updates the weights, and lowers the loss within 25
    steps."""
    torch.manual_seed(502)
    trusted = GPTModel(SMALL)
    before = [p.detach().clone() for p in trusted.parameters()]
    model = held(nb, trusted)  # trained in place beside the notebook
    loader = make_loader(PATTERN, SMALL.context_length, batch_size=8, seed=0)
    with using(nb, cross_entropy_manual=_ref_cross_entropy):
        losses = nb.train_simple(model, loader, 25, lr=1e-2, device="cpu", progress=False)
        short = nb.train_simple(
            GPTModel(SMALL), make_loader(PATTERN[:40], SMALL.context_length, 1), 5, progress=False
        )
    assert len(losses) == 25, f"train_simple(steps=25) should return 25 losses, got {len(losses)}"
    assert all(isinstance(x, float) for x in losses), "losses should be Python floats (loss.item())"
    assert abs(losses[0] - math.log(SMALL.vocab_size)) < 0.5, (
        f"the first loss ({losses[0]:.3f}) should be close to ln(V) = "
        f"{math.log(SMALL.vocab_size):.3f}"
    )
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, (
        f"the loss should fall on a learnable pattern: first 5 mean {np.mean(losses[:5]):.3f}, "
        "last 5 mean "
        f"{np.mean(losses[-5:]):.3f}. Check zero_grad, backward and optimizer.step"
    )
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=False)), (
        "the weights did not change"
    )
    assert len(short) == 5, (
        "train_simple must cycle through a loader shorter than the number of steps"
    )


@check(points=1)
def evaluate_loss_matches_package(nb):
    """evaluate_loss equals minigpt.train.evaluate, uses eval mode, and restores the training
    mode."""
    torch.manual_seed(503)
    model = GPTModel(GPTConfig(**{**SMALL.to_dict(), "dropout": 0.3}))
    loader = make_loader(PATTERN, SMALL.context_length, batch_size=4, shuffle=False)
    model.train()
    theirs = held(nb, model)
    with using(nb, cross_entropy_manual=_ref_cross_entropy):
        got = nb.evaluate_loss(theirs, loader, 3)
    assert theirs.training, "evaluate_loss must put the model back in training mode"
    want = evaluate(model, loader, 3)
    assert math.isclose(got, want, rel_tol=1e-5), (
        f"evaluate_loss = {got:.6f}, minigpt.train.evaluate = {want:.6f}: average the first "
        "max_batches batch "
        "losses in eval mode (dropout off) without gradients"
    )


@check(points=2)
def next_token_probs_applies_temperature_and_top_k(nb):
    """next_token_probs matches softmax(z / T) with top-k masking; T = 0 is one-hot on the
    arg-max."""
    g = torch.Generator().manual_seed(504)
    logits = 2 * torch.randn(3, 50, generator=g)
    for temperature in (0.5, 1.0, 2.0):
        for top_k in (None, 1, 5, 50):
            got = nb.next_token_probs(logits, temperature, top_k)
            z = logits / temperature
            if top_k is not None:
                z = z.masked_fill(z < torch.topk(z, top_k, dim=-1).values[:, -1:], float("-inf"))
            torch.testing.assert_close(
                got,
                torch.softmax(z, dim=-1),
                msg=lambda m, temperature=temperature, top_k=top_k: (
                    f"next_token_probs(T={temperature}, top_k={top_k}) is wrong: {m}. Divide by T, "
                    "keep the k "
                    "largest logits (the rest -inf), then softmax"
                ),
            )
    greedy = nb.next_token_probs(logits, 0.0)
    torch.testing.assert_close(
        greedy, F.one_hot(logits.argmax(-1), 50).float(), msg="T = 0 must be one-hot"
    )
    single = nb.next_token_probs(logits[0], 1.0, 3)
    assert single.shape == (50,) and int((single > 0).sum()) == 3, (
        "a 1-D logits vector must work too"
    )


@check(points=1)
def exercise_1_bits_per_character_matches(nb):
    """exercise_1_bits_per_character agrees with nats_per_character's bits_per_char."""
    torch.manual_seed(505)
    model = GPTModel(SMALL)
    ids = PATTERN[:200]
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"

    def decode(tokens):  # tokens spell 1 to 3 characters each
        return "".join(letters[t % 36] * (1 + t % 3) for t in tokens)

    ref = nats_per_character(model, ids, decode)
    got = nb.exercise_1_bits_per_character(ref["nats_per_token"], ref["tokens"], ref["chars"])
    assert math.isclose(got, ref["bits_per_char"], rel_tol=1e-9), (
        f"exercise_1_bits_per_character returned {got!r}, expected {ref['bits_per_char']:.6f}: "
        "total nats = "
        "nats_per_token * n_tokens, divided by n_chars and by ln 2"
    )
    assert math.isclose(nb.exercise_1_bits_per_character(math.log(2), 10, 5), 2.0), (
        "ln 2 nats/token, 2 chars/token"
    )


@check(points=1)
def exercise_2_unigram_loss_matches(nb):
    """exercise_2_unigram_loss is the validation cross-entropy of an add-one smoothed unigram
    model."""
    rng = np.random.default_rng(506)
    for vocab_size in (5, 50):
        train_ids = rng.integers(0, vocab_size - 1, 300)  # the last id never occurs in training
        val_ids = rng.integers(0, vocab_size, 80)
        counts = np.bincount(train_ids, minlength=vocab_size)
        p = (counts + 1) / (len(train_ids) + vocab_size)
        want = float(-np.log(p[val_ids]).mean())
        got = nb.exercise_2_unigram_loss(train_ids, val_ids, vocab_size)
        assert math.isclose(got, want, rel_tol=1e-9), (
            f"exercise_2_unigram_loss returned {got!r}, expected {want:.6f} (p_v = (count_v + 1) / "
            "(N + V), "
            "loss = -mean log p over the validation ids)"
        )


@check(points=1)
def exercise_3_lr_schedule_matches_trainconfig(nb):
    """exercise_3_lr_at equals TrainConfig.lr_at at every step, for several schedules."""
    for steps, warmup, lr, min_lr in (
        (100, 10, 3e-3, 3e-4),
        (37, 5, 1.0, 0.0),
        (20, 0, 1e-3, 1e-4),
        (10, 10, 2.0, 1.0),
    ):
        cfg = TrainConfig(steps=steps, lr=lr, min_lr=min_lr, warmup_steps=warmup)
        for step in range(steps + 3):
            got, want = nb.exercise_3_lr_at(step, lr, min_lr, warmup, steps), cfg.lr_at(step)
            assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-15), (
                f"exercise_3_lr_at(step={step}, lr={lr}, min_lr={min_lr}, warmup_steps={warmup}, "
                f"total_steps={steps}) = {got!r}, TrainConfig.lr_at gives {want!r}"
            )


@check(points=1)
def exercise_4_top_p_keeps_the_nucleus(nb):
    """exercise_4_top_p_probs keeps the smallest most-likely set with mass >= p, renormalised."""
    probs = torch.tensor([0.5, 0.05, 0.3, 0.15])
    logits = probs.log()
    cases = {
        0.5: [1.0, 0, 0, 0],
        0.6: [0.625, 0, 0.375, 0],
        0.75: [0.625, 0, 0.375, 0],
        0.9: [0.5 / 0.95, 0, 0.3 / 0.95, 0.15 / 0.95],
        1.0: [0.5, 0.05, 0.3, 0.15],
    }
    for top_p, want in cases.items():
        got = nb.exercise_4_top_p_probs(logits, top_p)
        torch.testing.assert_close(
            got,
            torch.tensor(want),
            msg=lambda m, top_p=top_p: (
                f"exercise_4_top_p_probs(probs [0.5, 0.05, 0.3, 0.15], top_p={top_p}) is wrong: {m}"
            ),
        )
    g = torch.Generator().manual_seed(507)
    batch = torch.randn(4, 30, generator=g)
    got = nb.exercise_4_top_p_probs(batch, 0.7)
    assert got.shape == (4, 30), "top-p must work row by row on (..., V) logits"
    for row, p_row in zip(batch, got, strict=False):
        p_sorted, order = torch.softmax(row, -1).sort(descending=True)
        k = int((p_sorted.cumsum(0) - p_sorted < 0.7).sum())
        want = torch.zeros(30)
        want[order[:k]] = p_sorted[:k] / p_sorted[:k].sum()
        torch.testing.assert_close(p_row, want)
