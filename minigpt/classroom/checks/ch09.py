"""Checks for chapter 09 (DoRA, Liu et al. 2024, arXiv:2402.09353): the notebook's functions against
the package (``minigpt.dora.LinearWithDoRA``), PEFT (``LoraConfig(use_dora=True)``) and PyTorch
autograd.

Every check builds its own small tensors from a fixed seed, so each runs in well under a second or
two. Shapes are non-square on purpose: a norm over the wrong dimension then fails on shape or on
values."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.classroom.checks import check, inside, one_line_verdicts

# (in_features, out_features, rank): wide, tall and square layers.
SHAPES = ((12, 7, 3), (5, 16, 2), (9, 9, 4))


def _dora_layer(
    in_features: int, out_features: int, rank: int, seed: int, detach_norm: bool = True
):
    """A float64 LinearWithDoRA whose adapter and magnitude are non-trivial (as after some
    training)."""
    from minigpt.dora import LinearWithDoRA

    torch.manual_seed(seed)
    layer = LinearWithDoRA(
        nn.Linear(in_features, out_features), rank=rank, alpha=2 * rank, detach_norm=detach_norm
    ).double()
    with torch.no_grad():
        layer.lora.B.normal_(0.0, 0.3)
        layer.magnitude.mul_(1 + 0.2 * torch.rand(out_features, dtype=torch.double))
    return layer


def _regression(out_features: int, in_features: int, seed: int):
    """Inputs X, targets T and the weight-gradient function of L = ||X W^T - T||^2 / (2N), in
    NumPy."""
    rng = np.random.default_rng(seed)
    V = rng.normal(size=(out_features, in_features))
    m = rng.uniform(0.5, 2.0, size=out_features)
    X, T = rng.normal(size=(11, in_features)), rng.normal(size=(11, out_features))
    return V, m, X, T


def _autograd_grads(V, m, X, T, detach: bool):
    """(grad_W' from autograd's view, grad_V, grad_m) of the squared error through W' = m V /
    ||V||."""
    V_t = torch.tensor(V, requires_grad=True)
    m_t = torch.tensor(m, requires_grad=True)
    norm = torch.linalg.norm(V_t, dim=1, keepdim=True)
    W = m_t[:, None] * V_t / (norm.detach() if detach else norm)
    W.retain_grad()
    loss = 0.5 * ((torch.tensor(X) @ W.T - torch.tensor(T)) ** 2).sum() / len(X)
    loss.backward()
    return W.grad.numpy(), V_t.grad.numpy(), m_t.grad.numpy()


@check(points=2)
def decompose_round_trip(nb):
    """decompose returns one magnitude per output feature (row) and unit rows that rebuild the
    weight."""
    torch.manual_seed(901)
    for out_features, in_features in ((7, 12), (16, 5), (9, 9)):
        weight = torch.randn(out_features, in_features, dtype=torch.double)
        magnitude, direction = nb.decompose(weight)
        assert tuple(magnitude.shape) == (out_features,), (
            f"decompose on a ({out_features}, {in_features}) nn.Linear weight returned a magnitude "
            "of shape "
            f"{tuple(magnitude.shape)}; DoRA has one magnitude per OUTPUT feature, shape "
            f"({out_features},): the "
            "paper's column norm is a row norm (dim=1) of nn.Linear's (out, in) weight"
        )
        assert tuple(direction.shape) == (out_features, in_features), (
            "direction must have the weight's shape"
        )
        torch.testing.assert_close(
            magnitude,
            torch.linalg.norm(weight, dim=1),
            msg="magnitude must be the L2 norm of each row (dim=1)",
        )
        torch.testing.assert_close(
            torch.linalg.norm(direction, dim=1),
            torch.ones(out_features, dtype=torch.double),
            msg="every row of direction must have norm 1",
        )
        torch.testing.assert_close(
            magnitude[:, None] * direction,
            weight,
            msg="magnitude[:, None] * direction must give the weight back (eq. (2))",
        )


@check(points=1)
def decompose_matches_peft_magnitude(nb):
    """decompose's magnitude equals PEFT's and the package's initial DoRA magnitude."""
    from peft import LoraConfig, get_peft_model

    from minigpt.dora import LinearWithDoRA

    torch.manual_seed(902)
    net = nn.Sequential(nn.Linear(10, 6))
    twin = get_peft_model(
        copy.deepcopy(net), LoraConfig(r=2, lora_alpha=4, target_modules=["0"], use_dora=True)
    )
    peft_magnitude = twin.base_model.model[0].lora_magnitude_vector["default"].weight.detach()
    magnitude, _ = nb.decompose(net[0].weight.detach())
    torch.testing.assert_close(
        magnitude,
        peft_magnitude,
        rtol=1e-6,
        atol=1e-6,
        msg="decompose's magnitude differs from PEFT's DoRA magnitude at initialisation",
    )
    torch.testing.assert_close(
        magnitude, LinearWithDoRA(net[0], rank=2, alpha=4).magnitude.detach()
    )


@check(points=2)
def dora_weight_matches_package(nb):
    """dora_weight(W0, A, B, s, m) is the weight LinearWithDoRA applies; it is W0 when B = 0 and m =
    ||W0||."""
    for i, (in_features, out_features, rank) in enumerate(SHAPES):
        layer = _dora_layer(in_features, out_features, rank, seed=910 + i)
        x = torch.randn(4, in_features, dtype=torch.double)
        with torch.no_grad():
            W = nb.dora_weight(
                layer.linear.weight, layer.lora.A, layer.lora.B, layer.scaling, layer.magnitude
            )
            assert tuple(W.shape) == (out_features, in_features), (
                f"dora_weight returned shape {tuple(W.shape)}, expected nn.Linear's "
                f"({out_features}, {in_features})"
            )
            torch.testing.assert_close(
                F.linear(x, W, layer.linear.bias),
                layer(x),
                msg="x @ dora_weight(...).T + bias differs from LinearWithDoRA(x) (eq. (5))",
            )
            W_init = nb.dora_weight(
                layer.linear.weight,
                layer.lora.A,
                torch.zeros_like(layer.lora.B),
                layer.scaling,
                torch.linalg.norm(layer.linear.weight, dim=1),
            )
            torch.testing.assert_close(
                W_init,
                layer.linear.weight,
                msg="with B = 0 and m = ||W0|| (per row), dora_weight must return W0",
            )


@check(points=2)
def dora_weight_matches_peft(nb):
    """dora_weight equals the weight PEFT's use_dora=True merges, on the same weights (to 1e-5)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(920)
    net = nn.Sequential(nn.Linear(13, 8))
    twin = get_peft_model(
        copy.deepcopy(net), LoraConfig(r=3, lora_alpha=5, target_modules=["0"], use_dora=True)
    )
    peft_layer = twin.base_model.model[0]
    A = torch.randn(13, 3) / 4
    B = torch.randn(3, 8) / 2
    magnitude = torch.linalg.norm(net[0].weight, dim=1).detach() * (1 + 0.3 * torch.rand(8))
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(A.T)
        peft_layer.lora_B["default"].weight.copy_(B.T)
        peft_layer.lora_magnitude_vector["default"].weight.copy_(magnitude)
        x = torch.randn(5, 13)
        peft_out = twin(x)
        ours = nb.dora_weight(net[0].weight.detach(), A, B, 5 / 3, magnitude)
        torch.testing.assert_close(
            F.linear(x, ours, net[0].bias),
            peft_out,
            rtol=1e-5,
            atol=1e-5,
            msg="output with dora_weight differs from PEFT's DoRA layer",
        )
        torch.testing.assert_close(
            ours,
            twin.merge_and_unload()[0].weight,
            rtol=1e-5,
            atol=1e-5,
            msg="dora_weight differs from PEFT's merged DoRA weight",
        )


@check(points=2)
def direction_grad_matches_autograd(nb):
    """direction_grad (eq. (6)) equals autograd's gradient with respect to V' when the norm is in
    the graph."""
    for i, (in_features, out_features, _) in enumerate(SHAPES):
        V, m, X, T = _regression(out_features, in_features, seed=930 + i)
        grad_W, grad_V, _ = _autograd_grads(V, m, X, T, detach=False)
        ours = np.asarray(nb.direction_grad(V, m, grad_W))
        np.testing.assert_allclose(
            ours,
            grad_V,
            rtol=1e-9,
            atol=1e-12,
            err_msg="direction_grad must be (m/||v||)(I - v v^T/||v||^2) grad_W per row",
        )
        assert np.abs(np.sum(ours * V, axis=1)).max() < 1e-10, (
            "eq. (6)'s gradient is orthogonal to each row of V"
        )


@check(points=1)
def direction_grad_detached_matches_autograd(nb):
    """direction_grad_detached equals autograd's gradient when the norm is detached (section
    4.3)."""
    for i, (in_features, out_features, _) in enumerate(SHAPES):
        V, m, X, T = _regression(out_features, in_features, seed=940 + i)
        grad_W, grad_V, _ = _autograd_grads(V, m, X, T, detach=True)
        np.testing.assert_allclose(
            np.asarray(nb.direction_grad_detached(V, m, grad_W)),
            grad_V,
            rtol=1e-9,
            atol=1e-12,
            err_msg="with the norm held constant the gradient is (m/C) grad_W",
        )


@check(points=2)
def magnitude_direction_change_definitions(nb):
    """magnitude_direction_change computes ΔM and ΔD (eqs. (3)-(4)) per output feature on known
    examples."""
    W_0 = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    W_t = torch.tensor([[6.0, 8.0], [0.0, 2.0]])
    got = tuple(float(v) for v in nb.magnitude_direction_change(W_t, W_0))
    np.testing.assert_allclose(
        got,
        (3.0, 0.5),
        atol=1e-6,
        err_msg=(
            "rows [3,4] -> [6,8] (length 5 -> 10, same direction) and [1,0] -> [0,2] (length 1 -> "
            "2, orthogonal) give "
            "ΔM = (5 + 1)/2 = 3 and ΔD = (0 + 1)/2 = 0.5"
        ),
    )
    # non-square: rows are output features; a column-wise computation gives other numbers
    torch.manual_seed(950)
    W_0 = torch.randn(5, 8, dtype=torch.double)
    W_t = W_0 * torch.linspace(0.5, 1.5, 5, dtype=torch.double)[:, None] + 0.1 * torch.randn(
        5, 8, dtype=torch.double
    )
    want_m = (torch.linalg.norm(W_t, dim=1) - torch.linalg.norm(W_0, dim=1)).abs().mean()
    want_d = (1 - F.cosine_similarity(W_t, W_0, dim=1)).mean()
    got = tuple(float(v) for v in nb.magnitude_direction_change(W_t, W_0))
    np.testing.assert_allclose(
        got,
        (float(want_m), float(want_d)),
        rtol=1e-6,
        err_msg="ΔM and ΔD average over output features (rows of the (out, in) weight)",
    )
    scaled = tuple(float(v) for v in nb.magnitude_direction_change(2 * W_0, W_0))
    assert abs(scaled[1]) < 1e-6, "scaling a weight changes only its magnitude: ΔD must be 0"


@check(points=1)
def effective_weight_matches_layers(nb):
    """effective_weight returns the weight each layer applies: plain, LoRA (W0 + ΔW) and DoRA
    (W')."""
    from minigpt.lora import LinearWithLoRA

    torch.manual_seed(960)
    plain = nn.Linear(7, 5).double()
    lora = LinearWithLoRA(copy.deepcopy(plain), rank=2, alpha=4).double()
    with torch.no_grad():
        lora.lora.B.normal_()
    dora = _dora_layer(7, 5, 2, seed=961)
    x = torch.randn(3, 7, dtype=torch.double)
    for module in (plain, lora, dora):
        bias = module.linear.bias if isinstance(module, LinearWithLoRA) else module.bias
        with torch.no_grad():
            torch.testing.assert_close(
                F.linear(x, nb.effective_weight(module), bias),
                module(x),
                msg=f"effective_weight is wrong for {type(module).__name__}",
            )


def _saved_bytes(saved_tensor_bytes, case: str):
    """What ``saved_tensor_bytes`` counts for one of three computations, built where it runs (a
    closure cannot travel; see minigpt.classroom.checks.inside)."""
    from minigpt.dora import LinearWithDoRA

    x = torch.randn(250, generator=torch.Generator().manual_seed(971), requires_grad=True)
    if case == "exp":
        return saved_tensor_bytes(lambda: x.exp().sum())[1]
    if case == "detached branch":
        return saved_tensor_bytes(lambda: x.exp().detach().sum() + x.sum())[1]
    torch.manual_seed(970)
    layer = LinearWithDoRA(nn.Linear(64, 32), rank=4, alpha=8, detach_norm=case == "dora True")
    inputs = torch.randn(2, 64, generator=torch.Generator().manual_seed(972))
    return saved_tensor_bytes(lambda: layer(inputs).sum(), exclude=tuple(layer.parameters()))[1]


@check(points=1)
def saved_tensor_bytes_counts_live_tensors(nb):
    """saved_tensor_bytes counts what autograd keeps for the backward, and nothing from detached
    branches."""
    kept = inside(_saved_bytes, nb.saved_tensor_bytes, "exp")
    assert kept == 250 * 4, f"exp saves its float32 output (1000 bytes); counted {kept}"
    kept = inside(_saved_bytes, nb.saved_tensor_bytes, "detached branch")
    assert kept == 0, f"a detached branch keeps nothing for the backward; counted {kept}"
    kept = {
        detach: inside(_saved_bytes, nb.saved_tensor_bytes, f"dora {detach}")
        for detach in (True, False)
    }
    assert kept[False] - kept[True] >= 64 * 32 * 4, (
        "the norm in the graph keeps W0 + ΔW (8192 bytes) that the detached norm does not; "
        f"counted {kept}"
    )


@check(points=1)
def exercise_1_parameter_count(nb):
    """Exercise 1: DoRA's trainable parameters on one layer equal LinearWithDoRA's adapter
    parameters."""
    from minigpt.dora import LinearWithDoRA
    from minigpt.lora import adapter_parameters

    for in_features, out_features, rank in SHAPES + ((128, 512, 8),):
        layer = LinearWithDoRA(nn.Linear(in_features, out_features), rank=rank, alpha=2 * rank)
        want = sum(p.numel() for p in adapter_parameters(layer))
        got = nb.exercise_1_dora_trainable_parameters(in_features, out_features, rank)
        assert got == want, (
            f"exercise_1_dora_trainable_parameters({in_features}, {out_features}, {rank}) returned "
            f"{got}; LinearWithDoRA trains {want} (A, B and one magnitude per output feature)"
        )


@check(points=2)
def exercise_2_magnitude_gradient(nb):
    """Exercise 2: eq. (7) in NumPy equals autograd's gradient of the magnitude."""
    for i, (in_features, out_features, _) in enumerate(SHAPES):
        V, m, X, T = _regression(out_features, in_features, seed=980 + i)
        # the magnitude's gradient does not depend on the detached norm
        for detach in (
            False,
            True,
        ):
            grad_W, _, grad_m = _autograd_grads(V, m, X, T, detach=detach)
            got = np.asarray(nb.exercise_2_magnitude_gradient(V, grad_W))
            np.testing.assert_allclose(
                got,
                grad_m,
                rtol=1e-9,
                atol=1e-12,
                err_msg="dL/dm_i is the dot product of grad_W[i] with V[i] / ||V[i]||",
            )


@check(points=2)
def exercise_3_unmerge(nb):
    """Exercise 3: W0 is recovered from a merged DoRA weight, as the package's unmerge does."""
    for i, (in_features, out_features, rank) in enumerate(SHAPES):
        layer = _dora_layer(in_features, out_features, rank, seed=990 + i)
        W0 = layer.linear.weight.detach().clone()
        delta = layer.delta_weight().detach()
        norm = torch.linalg.norm(W0 + delta, dim=1)
        layer.merge()
        got = nb.exercise_3_unmerge(
            layer.linear.weight.detach(), layer.magnitude.detach(), norm, delta
        )
        torch.testing.assert_close(got, W0, msg="W0 = W' * (norm / m) per row - ΔW")


@check(points=1)
def exercise_5_decide_tells_a_cost_from_none(nb):
    """Exercise 5: the decision rule returns a one-line verdict, not the same one for a clear cost
    and for none."""
    in_graph = [1.51, 1.50, 1.52]
    free, costly = one_line_verdicts(
        nb.exercise_5_decide, (([1.50, 1.52, 1.51], in_graph), ([2.00, 2.02, 2.01], in_graph))
    )
    assert free != costly, (
        "exercise_5_decide gives the same verdict when detaching the norm changes nothing and when "
        f"it costs half a nat ({free!r}): the rule cannot decide the question"
    )


def _head_points(seed: int) -> list[dict]:
    """One run's points for one matrix: per-head ΔM, ΔD on a (layer, step) trend plus noise."""
    rng = np.random.default_rng(seed)
    points = []
    for layer in range(3):
        for step in (10, 20, 30, 40):
            trend = (1 + layer) * step / 40
            spread = rng.normal(size=4)
            points.append(
                {
                    "layer": layer,
                    "step": step,
                    "head_dM": [float(v) for v in trend + 0.2 * spread],
                    "head_dD": [float(v) for v in 0.01 * (trend + rng.normal(size=4) - spread)],
                }
            )
    return points


@check(points=2)
def exercise_4_detrended_correlation(nb):
    """Exercise 4: the correlation of per-head deviations within each (layer, checkpoint) cell
    equals the lab's detrended statistic (minigpt.lab.dora_analysis)."""
    from minigpt.lab.dora_analysis import detrended_correlation

    for seed in (991, 992, 993):
        points = _head_points(seed)
        got = float(nb.exercise_4_detrended_correlation(points))
        np.testing.assert_allclose(
            got,
            detrended_correlation(points),
            rtol=1e-9,
            err_msg="subtract each point's mean over its heads from head_dM and from head_dD, "
            "pool the deviations of all points, then np.corrcoef(ΔD deviations, ΔM deviations)",
        )
    # a trend shared by every head and opposite deviations: +1 pooled, −1 once the trend is removed
    opposite = [
        {
            "layer": layer,
            "step": step,
            "head_dM": [layer + step + d for d in (-0.1, 0.0, 0.1)],
            "head_dD": [layer + step - d for d in (-0.1, 0.0, 0.1)],
        }
        for layer in range(2)
        for step in (1, 2)
    ]
    got = float(nb.exercise_4_detrended_correlation(opposite))
    assert abs(got + 1.0) < 1e-9, (
        "heads that gain length where they lose direction within every cell give -1; got "
        f"{got:+.3f} (was the trend shared by the whole cell removed before correlating?)"
    )
