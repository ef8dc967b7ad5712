"""Checks for chapter 06 (LoRA): the notebook's NumPy LoRA against PyTorch autograd, its LoRA
classes against their contract (zero change at initialisation, scaling alpha/rank, only A and B
train, merge equality) and against ``minigpt.lora``, and the exercises.

Every check builds its own small tensors from a fixed seed and runs in well under a second (LoRA: Hu
et al. 2021, arXiv:2106.09685, eq. (3) and section 4.1).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

import minigpt.lora as lora_pkg
from minigpt.classroom.checks import (
    assign,
    check,
    fetched,
    held,
    inside,
    one_line_verdicts,
    seeded,
    square_sum_backward,
)
from minigpt.model import GPTConfig, GPTModel

# (batch N, in k, out d, rank r): square, wide, tall, rank 1.
SHAPES = ((5, 6, 4, 2), (3, 8, 8, 1), (7, 5, 9, 4), (4, 16, 12, 3))
ALL_LINEAR = ("query", "key", "value", "out_proj", "fc", "proj")


def _case(n: int, k: int, d: int, r: int, seed: int, zero_b: bool = False) -> dict:
    """Random float64 inputs for one LoRA layer: x, weight (d, k), bias, A (k, r), B (r, d),
    scaling, grad_h."""
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(n, k)),
        "weight": rng.normal(size=(d, k)),
        "bias": rng.normal(size=d),
        "A": rng.normal(size=(k, r)),
        "B": np.zeros((r, d)) if zero_b else rng.normal(size=(r, d)),
        "scaling": float(rng.uniform(0.5, 4.0)),
        "grad_h": rng.normal(size=(n, d)),
    }


def _autograd(c: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(h, dL/dA, dL/dB, dL/dx) from torch autograd, with L = sum(h * grad_h) so that dL/dh =
    grad_h."""
    x, A, B = (torch.tensor(c[k], requires_grad=True) for k in ("x", "A", "B"))
    h = x @ torch.tensor(c["weight"]).T + torch.tensor(c["bias"]) + c["scaling"] * (x @ A) @ B
    (h * torch.tensor(c["grad_h"])).sum().backward()
    return h.detach().numpy(), A.grad.numpy(), B.grad.numpy(), x.grad.numpy()


@check(points=1)
def numpy_forward_matches_torch(nb):
    """lora_forward computes x W0^T + b + scaling * x A B (eq. (3), row vectors) like torch."""
    for i, (n, k, d, r) in enumerate(SHAPES):
        c = _case(n, k, d, r, seed=600 + i)
        got = nb.lora_forward(c["x"], c["weight"], c["bias"], c["A"], c["B"], c["scaling"])
        want = _autograd(c)[0]
        assert np.shape(got) == (n, d), (
            f"lora_forward returned shape {np.shape(got)} for N={n}, out={d}"
        )
        np.testing.assert_allclose(
            got,
            want,
            rtol=1e-10,
            atol=1e-10,
            err_msg=(
                "lora_forward must equal x @ weight.T + bias + scaling * (x @ A) @ B; check the "
                "scaling and that "
                "weight is used transposed (it is stored (out, in) like nn.Linear)"
            ),
        )
    c = _case(3, 6, 5, 2, seed=610, zero_b=True)
    np.testing.assert_array_equal(
        nb.lora_forward(c["x"], c["weight"], c["bias"], c["A"], c["B"], c["scaling"]),
        c["x"] @ c["weight"].T + c["bias"],
        err_msg="with B = 0 the layer must be unchanged",
    )


@check(points=3)
def numpy_gradients_match_autograd(nb):
    """lora_backward's dL/dA, dL/dB, dL/dx equal torch autograd's, and dL/dA = 0 when B = 0."""
    for i, (n, k, d, r) in enumerate(SHAPES):
        for zero_b in (False, True):
            c = _case(n, k, d, r, seed=620 + i, zero_b=zero_b)
            _, gA, gB, gx = _autograd(c)
            got = nb.lora_backward(c["x"], c["weight"], c["A"], c["B"], c["scaling"], c["grad_h"])
            assert len(got) == 3, "lora_backward must return the tuple (grad_A, grad_B, grad_x)"
            for name, mine, ref in zip(
                ("grad_A", "grad_B", "grad_x"), got, (gA, gB, gx), strict=False
            ):
                assert np.shape(mine) == ref.shape, (
                    f"{name} has shape {np.shape(mine)}; a gradient has the shape of what it "
                    "differentiates, "
                    f"{ref.shape} here (N={n}, in={k}, out={d}, rank={r})"
                )
                np.testing.assert_allclose(
                    mine,
                    ref,
                    rtol=1e-9,
                    atol=1e-10,
                    err_msg=(
                        f"{name} differs from autograd (N={n}, in={k}, out={d}, rank={r}, B zero: "
                        f"{zero_b}). "
                        "Expected grad_B = s (xA)^T G, grad_A = s x^T G B^T, grad_x = G W0 + s G "
                        "B^T A^T"
                    ),
                )
            if zero_b:
                assert np.all(got[0] == 0), "with B = 0 the gradient of A must be exactly zero"


@check(points=1)
def numpy_training_takes_gradient_steps(nb):
    """train_lora_numpy does plain gradient descent on A and B for the mean squared error, leaving
    inputs intact."""
    rng = np.random.default_rng(630)
    k, d, r, n = 6, 5, 2, 40
    x, weight, bias = rng.normal(size=(n, k)), rng.normal(size=(d, k)), rng.normal(size=d)
    y = x @ (weight + 0.3 * rng.normal(size=(d, 1)) @ rng.normal(size=(1, k))).T + bias
    A0, B0 = rng.uniform(-0.4, 0.4, size=(k, r)), np.zeros((r, d))
    A_in, B_in = held(nb, A0), held(nb, B0)  # the notebook's copies, to see whether they change
    lr, scaling = 0.05, 2.0
    A1, B1, losses = nb.train_lora_numpy(x, y, weight, bias, A_in, B_in, scaling, lr, 1)
    assert np.array_equal(fetched(A_in), A0) and np.array_equal(fetched(B_in), B0), (
        "train_lora_numpy must not modify A and B in place"
    )
    A_t, B_t = torch.tensor(A0, requires_grad=True), torch.tensor(B0, requires_grad=True)
    h = (
        torch.tensor(x) @ torch.tensor(weight).T
        + torch.tensor(bias)
        + scaling * torch.tensor(x) @ A_t @ B_t
    )
    loss = ((h - torch.tensor(y)) ** 2).mean()
    loss.backward()
    assert len(losses) == 1 and abs(losses[0] - loss.item()) < 1e-10, (
        f"losses[0] = {losses[:1]} but the mean squared error before the step is {loss.item():.6f}"
    )
    np.testing.assert_allclose(
        A1,
        A0 - lr * A_t.grad.numpy(),
        rtol=1e-9,
        atol=1e-12,
        err_msg="one step must be A - lr * dL/dA for L = mean((h - y)^2)",
    )
    np.testing.assert_allclose(
        B1,
        B0 - lr * B_t.grad.numpy(),
        rtol=1e-9,
        atol=1e-12,
        err_msg="one step must be B - lr * dL/dB for L = mean((h - y)^2)",
    )
    _, _, losses = nb.train_lora_numpy(x, y, weight, bias, A0, B0, scaling, lr, 100)
    assert losses[-1] < 0.5 * losses[0], (
        f"100 steps should halve the loss at least, got {losses[0]} -> {losses[-1]}"
    )


@check(points=2)
def lora_layer_zero_at_init_and_scaling(nb):
    """LoRALayer: A (in, rank) in U(-1/sqrt(in), 1/sqrt(in)), B = 0, output zero at init, scaling
    alpha/rank."""
    for in_dim, out_dim, rank, alpha in ((16, 12, 4, 8), (10, 30, 1, 3.0), (32, 32, 8, 16)):
        layer = inside(seeded, 640, nb.LoRALayer, in_dim, out_dim, rank, alpha)
        assert tuple(layer.A.shape) == (in_dim, rank) and tuple(layer.B.shape) == (rank, out_dim), (
            f"A must be (in_dim, rank) = {(in_dim, rank)} and B (rank, out_dim) = "
            f"{(rank, out_dim)}, got "
            f"{tuple(layer.A.shape)} and {tuple(layer.B.shape)}"
        )
        assert torch.all(layer.B == 0), "B must start at zero so that Delta W = 0 at initialisation"
        assert 0 < layer.A.abs().max() <= 1 / math.sqrt(in_dim), (
            "A must be Kaiming-uniform with bound 1/sqrt(in_dim)"
        )
        assert math.isclose(layer.scaling, alpha / rank), (
            f"scaling must be alpha / rank = {alpha / rank}"
        )
        assert math.isclose(
            nb.LoRALayer(in_dim, out_dim, rank, alpha, use_rslora=True).scaling,
            alpha / math.sqrt(rank),
        ), "with use_rslora the scaling is alpha / sqrt(rank)"
        x = torch.randn(3, 5, in_dim, generator=torch.Generator().manual_seed(641))
        out = layer(x)
        assert tuple(out.shape) == (3, 5, out_dim), (
            f"output shape {tuple(out.shape)}, expected {(3, 5, out_dim)}"
        )
        assert torch.equal(out, torch.zeros_like(out)), (
            "the update must be exactly zero at initialisation"
        )
        A, B = _trusted_adapter(layer, in_dim, out_dim, rank, 642)
        torch.testing.assert_close(
            layer(x),
            alpha / rank * (x @ A @ B),
            msg="forward must be scaling * (x @ A @ B)",
        )


@check(points=2)
def lora_layer_matches_package(nb):
    """The notebook's LoRALayer gives the package's A, outputs and gradients for the same seed."""
    for in_dim, out_dim, rank, alpha, rslora in ((12, 20, 4, 8, False), (20, 12, 3, 5.0, True)):
        mine = inside(seeded, 650, nb.LoRALayer, in_dim, out_dim, rank, alpha, use_rslora=rslora)
        ref = seeded(650, lora_pkg.LoRALayer, in_dim, out_dim, rank, alpha, use_rslora=rslora)
        torch.testing.assert_close(mine.A, ref.A, msg="same seed, same A as minigpt.lora.LoRALayer")
        with torch.no_grad():
            B = torch.randn(rank, out_dim, generator=torch.Generator().manual_seed(651))
            ref.B.copy_(B)
        inside(assign, mine, "B", B)
        x = torch.randn(6, in_dim, generator=torch.Generator().manual_seed(652))
        torch.testing.assert_close(
            mine(x), ref(x), msg="output differs from minigpt.lora.LoRALayer"
        )
        inside(square_sum_backward, mine, x)
        ref(x).square().sum().backward()
        torch.testing.assert_close(mine.A.grad, ref.A.grad)
        torch.testing.assert_close(mine.B.grad, ref.B.grad)


def _trusted_adapter(layer, in_dim: int, out_dim: int, rank: int, seed: int, prefix: str = ""):
    """Non-zero A and B drawn here, copied into the notebook's layer: expected values come from
    these copies, never from the layer's own A and B (which a notebook could leave at zero)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(in_dim, rank, generator=gen) / math.sqrt(in_dim)
    B = torch.randn(rank, out_dim, generator=gen)
    inside(assign, layer, prefix + "A", A)
    inside(assign, layer, prefix + "B", B)
    return A, B


def _train_only_the_adapter(layer) -> bool:
    """True when the adapter holds exactly lora.A and lora.B; then freeze the rest and randomise B
    (runs next to the notebook's objects, see minigpt.classroom.checks.inside)."""
    params = lora_pkg.adapter_parameters(layer)
    if not (len(params) == 2 and params[0] is layer.lora.A and params[1] is layer.lora.B):
        return False
    for p in layer.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():
        layer.lora.B.normal_(generator=torch.Generator().manual_seed(663))
    return True


@check(points=2)
def linear_with_lora_zero_change_and_only_a_b_train(nb):
    """LinearWithLoRA: unchanged output at init (also with dropout), scaling alpha/rank, gradients
    only in A and B."""
    linear = seeded(660, nn.Linear, 10, 7)
    base = held(nb, linear)  # the notebook's copy, which the layer must wrap, not copy
    layer = inside(seeded, 661, nb.LinearWithLoRA, base, rank=3, alpha=6, dropout=0.5)
    assert layer.linear is base, "LinearWithLoRA must keep the base layer as .linear"
    assert math.isclose(layer.scaling, 2.0), (
        f"scaling must be alpha / rank = 2, got {layer.scaling}"
    )
    layer.train()
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(662))
    assert torch.equal(layer(x), linear(x)), (
        "at initialisation (B = 0) the wrapped layer must equal the base layer exactly, in "
        "training mode with "
        "dropout too: dropout belongs on the adapter's input only"
    )
    assert inside(_train_only_the_adapter, layer), (
        "the adapter (everything but .linear) must hold exactly two parameters, lora.A and lora.B"
    )
    A, B = _trusted_adapter(layer, 10, 7, 3, 664, "lora.")
    layer.eval()
    out = layer(x)
    torch.testing.assert_close(
        out,
        linear(x) + 2.0 * (x @ A @ B),
        msg="the output must be the base output plus scaling * x A B (with the check's A and B)",
    )
    inside(square_sum_backward, layer, x)
    assert base.weight.grad is None and base.bias.grad is None, (
        "the frozen base must receive no gradient"
    )
    assert layer.lora.A.grad is not None and layer.lora.B.grad is not None, (
        "A and B must receive gradients"
    )


@check(points=2)
def linear_with_lora_merge_equals_unmerged(nb):
    """merge() folds scaling (A B)^T into the weight: same outputs to 1e-5; unmerge() restores
    W0."""
    for in_f, out_f, rank in ((9, 5, 2), (6, 6, 3)):
        linear = seeded(670, nn.Linear, in_f, out_f)
        w0 = linear.weight.detach().clone()
        base = held(nb, linear)
        layer = inside(seeded, 671, nb.LinearWithLoRA, base, rank=rank, alpha=4.0)
        A, B = _trusted_adapter(layer, in_f, out_f, rank, 672, "lora.")
        x = torch.randn(8, in_f, generator=torch.Generator().manual_seed(673))
        with torch.no_grad():
            before = layer(x)
            torch.testing.assert_close(
                before,
                linear(x) + 4.0 / rank * (x @ A @ B),
                msg="the unmerged output must be the base output plus scaling * x A B",
            )
            layer.merge()
            assert layer.merged, "merge() must set .merged"
            torch.testing.assert_close(
                layer(x),
                before,
                rtol=1e-5,
                atol=1e-5,
                msg="merged output must equal the unmerged output",
            )
            torch.testing.assert_close(
                base.weight,
                w0 + 4.0 / rank * (A @ B).T,
                msg="the merged weight must be W0 + scaling * (A B)^T",
            )
            layer.unmerge()
            torch.testing.assert_close(base.weight, w0, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(layer(x), before, rtol=1e-6, atol=1e-6)


@check(points=1)
def linear_with_lora_matches_package(nb):
    """The notebook's LinearWithLoRA equals minigpt.lora.LinearWithLoRA on the same base layer and
    seed."""
    linear = seeded(680, nn.Linear, 12, 8)
    mine = inside(seeded, 681, nb.LinearWithLoRA, linear, rank=4, alpha=8)
    ref = seeded(681, lora_pkg.LinearWithLoRA, linear, rank=4, alpha=8)
    B = torch.randn(4, 8, generator=torch.Generator().manual_seed(682))
    inside(assign, mine, "lora.B", B)
    with torch.no_grad():
        ref.lora.B.copy_(B)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(683))
    torch.testing.assert_close(mine(x), ref(x))
    torch.testing.assert_close(mine.delta_weight(), ref.delta_weight())


@check(points=1)
def exercise_1_parameter_count_is_exact(nb):
    """exercise_1_lora_parameter_count equals the count on a real model, and 18,874,368 for GPT-3
    q/v rank 4."""
    assert nb.exercise_1_lora_parameter_count(96, 12288, 4, ("query", "value")) == 18_874_368, (
        "GPT-3 175B with rank 4 on query and value: 96 * 2 * 4 * (12288 + 12288) = 18,874,368"
    )
    cfg = GPTConfig.from_preset("micro")
    for rank, targets in (
        (2, ("query", "value")),
        (3, ALL_LINEAR),
        (4, ("fc",)),
        (1, ("proj", "key")),
    ):
        model = lora_pkg.replace_linear_with_lora(
            GPTModel(cfg), rank=rank, alpha=1.0, target_modules=list(targets)
        )
        want = lora_pkg.count_parameters(model)[0]
        got = nb.exercise_1_lora_parameter_count(cfg.n_layer, cfg.n_embd, rank, targets)
        assert got == want, f"rank {rank} on {targets}: got {got}, a real model trains {want}"


@check(points=1)
def exercise_2_merge_by_hand_matches_package(nb):
    """exercise_2_merge_by_hand returns W0 + scaling (A B)^T, like LinearWithLoRA.merge, without
    side effects."""
    for in_f, out_f, rank in ((7, 4, 2), (5, 5, 5)):
        linear = seeded(690, nn.Linear, in_f, out_f)
        layer = seeded(691, lora_pkg.LinearWithLoRA, linear, rank=rank, alpha=3.0)
        with torch.no_grad():
            layer.lora.B.normal_(generator=torch.Generator().manual_seed(692))
            w0 = linear.weight.clone()
            theirs = held(nb, linear.weight)  # the notebook's copy, to see whether it changes
            got = nb.exercise_2_merge_by_hand(theirs, layer.lora.A, layer.lora.B, layer.scaling)
            assert torch.equal(fetched(theirs), w0), (
                "exercise_2_merge_by_hand must not modify the weight in place"
            )
            layer.merge()
        torch.testing.assert_close(
            got, linear.weight, msg="merged weight must be W0 + scaling * (A @ B).T"
        )


@check(points=1)
def exercise_3_effective_rank_is_exp_entropy(nb):
    """exercise_3_effective_rank: exp of the entropy of normalised singular values; 1 for rank 1, n
    for I_n."""
    gen = torch.Generator().manual_seed(700)
    rank_one = torch.outer(torch.randn(8, generator=gen), torch.randn(5, generator=gen))
    assert abs(nb.exercise_3_effective_rank(rank_one) - 1.0) < 1e-6, (
        "a rank-1 matrix has effective rank 1"
    )
    assert abs(nb.exercise_3_effective_rank(torch.eye(7)) - 7.0) < 1e-6, "I_7 has effective rank 7"
    assert nb.exercise_3_effective_rank(torch.zeros(4, 3)) == 0.0, (
        "the zero matrix has effective rank 0"
    )
    for rank in (2, 3):
        M = torch.randn(10, rank, generator=gen) @ torch.randn(rank, 9, generator=gen)
        s = np.linalg.svd(M.double().numpy(), compute_uv=False)
        p = s / s.sum()
        p = p[p > 1e-15]
        want = float(np.exp(-(p * np.log(p)).sum()))
        got = nb.exercise_3_effective_rank(M)
        assert abs(got - want) < 1e-6 and got <= rank + 1e-6, (
            f"got {got}, expected {want} (rank {rank})"
        )


@check(points=1)
def exercise_4_alpha_from_raschka_gives_same_output(nb):
    """exercise_4_alpha_from_raschka(alpha, rank) makes LoRALayer compute alpha * x A B (appendix
    E)."""
    for alpha, rank in ((16, 16), (8, 2), (1.5, 4)):
        ours = seeded(
            710, lora_pkg.LoRALayer, 6, 5, rank, nb.exercise_4_alpha_from_raschka(alpha, rank)
        )
        with torch.no_grad():
            ours.B.normal_(generator=torch.Generator().manual_seed(711))
            x = torch.randn(3, 6, generator=torch.Generator().manual_seed(712))
            torch.testing.assert_close(
                ours(x),
                alpha * (x @ ours.A @ ours.B),
                msg=f"Raschka's alpha={alpha}, rank={rank} must give the same output",
            )


@check(points=1)
def exercise_5_decide_tells_a_gap_from_none(nb):
    """Exercise 5: the decision rule returns a one-line verdict, not the same one for a clear gap
    and for none."""
    rank32 = [0.91, 0.94, 0.92]
    level, behind = one_line_verdicts(
        nb.exercise_5_decide, (([0.92, 0.93, 0.90], rank32), ([0.10, 0.14, 0.12], rank32))
    )
    assert level != behind, (
        "exercise_5_decide gives the same verdict when rank 2 matches rank 32 and when it falls "
        f"far behind ({level!r}): the rule cannot decide the question"
    )
