"""Checks for chapter 08 (PiSSA, Meng, Wang & Zhang 2024, arXiv:2404.02948).

The notebook's ``pissa_split`` is compared with ``minigpt.pissa.pissa_init``, with the exact
truncated SVD and with PEFT's ``init_lora_weights="pissa"``. Singular vectors are defined only up to
sign, so products ``scaling * (A B)^T`` and residuals are compared, never the factors themselves.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from minigpt.classroom.checks import check, one_line_verdicts
from minigpt.pissa import LinearWithPiSSA, pissa_init, pissa_to_lora_weights
from minigpt.quant import quantization_error

# (out, in, rank, scaling): tall, wide, square, full rank, scaling above and below 1
CASES = ((24, 16, 4, 2.0), (16, 40, 16, 0.5), (10, 10, 10, 1.0), (33, 21, 1, 4.0))


def _weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


def _best_rank_r(weight: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return ((U[:, :rank] * S[:rank]) @ Vh[:rank]).float()


@check(points=2)
def pissa_split_matches_package(nb):
    """pissa_split: shapes (in, r) / (r, out), and products and residual equal to
    minigpt.pissa.pissa_init."""
    for seed, (out_f, in_f, rank, scaling) in enumerate(CASES):
        weight = _weight(out_f, in_f, seed)
        A, B, residual = nb.pissa_split(weight.clone(), rank, scaling)
        shapes = (tuple(A.shape), tuple(B.shape), tuple(residual.shape))
        assert shapes == ((in_f, rank), (rank, out_f), (out_f, in_f)), (
            f"for a weight (out, in) = {(out_f, in_f)} at rank {rank} expected A {(in_f, rank)}, B "
            f"{(rank, out_f)}, "
            f"residual {(out_f, in_f)}; got {shapes}"
        )
        A_ref, B_ref, residual_ref = pissa_init(weight, rank, scaling)
        torch.testing.assert_close(
            scaling * (A @ B).T,
            scaling * (A_ref @ B_ref).T,
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m, scaling=scaling: (
                f"scaling * (A B)^T differs from pissa_init's (scaling={scaling}): {m}"
            ),
        )
        torch.testing.assert_close(
            residual,
            residual_ref,
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m, scaling=scaling: (
                f"residual differs from pissa_init's (scaling={scaling}): {m}"
            ),
        )


@check(points=2)
def pissa_split_is_the_principal_part_and_keeps_the_output(nb):
    """scaling (A B)^T is the best rank-r approximation, and residual + scaling (A B)^T rebuilds the
    layer."""
    for seed, (out_f, in_f, rank, scaling) in enumerate(CASES):
        weight = _weight(out_f, in_f, 100 + seed)
        A, B, residual = nb.pissa_split(weight.clone(), rank, scaling)
        torch.testing.assert_close(
            scaling * (A @ B).T,
            _best_rank_r(weight, rank),
            rtol=1e-4,
            atol=1e-5,
            msg=lambda m, rank=rank, scaling=scaling: (
                f"scaling * (A B)^T must be the top-{rank} SVD part of W; divide the "
                f"singular values by the scaling ({scaling}) before the square root: {m}"
            ),
        )
        torch.testing.assert_close(
            residual + scaling * (A @ B).T,
            weight,
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m: (
                f"residual + scaling (A B)^T must equal W (compute it by subtraction): {m}"
            ),
        )
    # the whole layer: a LinearWithPiSSA built from the notebook's split gives the original outputs
    torch.manual_seed(0)
    linear = nn.Linear(20, 14)
    layer = LinearWithPiSSA(copy.deepcopy(linear), 5, alpha=10.0)
    A, B, residual = nb.pissa_split(linear.weight.detach().clone(), 5, layer.scaling)
    with torch.no_grad():
        layer.linear.weight.copy_(residual)
        layer.lora.A.copy_(A)
        layer.lora.B.copy_(B)
        x = torch.randn(9, 20)
        torch.testing.assert_close(
            layer(x),
            linear(x),
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m: f"a layer built from pissa_split must reproduce the original: {m}",
        )


@check(points=2)
def pissa_split_matches_peft(nb):
    """pissa_split's product and residual equal PEFT's init_lora_weights="pissa" to 1e-5."""
    from peft import LoraConfig, get_peft_model

    for rank, alpha in ((3, 6), (8, 4)):
        torch.manual_seed(rank)
        original = nn.Sequential(nn.Linear(18, 26))
        reference = get_peft_model(
            copy.deepcopy(original),
            LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], init_lora_weights="pissa"),
        )
        peft_layer = reference.base_model.model[0]
        scaling = peft_layer.scaling["default"]
        peft_update = (
            scaling * peft_layer.lora_B["default"].weight @ peft_layer.lora_A["default"].weight
        ).detach()
        A, B, residual = nb.pissa_split(original[0].weight.detach().clone(), rank, scaling)
        torch.testing.assert_close(
            scaling * (A @ B).T,
            peft_update,
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m, rank=rank: f"product differs from PEFT's pissa init (rank {rank}): {m}",
        )
        torch.testing.assert_close(
            residual,
            peft_layer.base_layer.weight.detach(),
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m: f"residual differs from PEFT's base weight after pissa init: {m}",
        )


@check(points=1)
def exercise_1_captured_energy_is_exact(nb):
    """exercise_1_captured_energy = sum of the top-r squared singular values / sum of all."""
    diag = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0]))
    got = nb.exercise_1_captured_energy(diag, 1)
    assert math.isclose(got, 9 / 14, rel_tol=1e-6), (
        f"diag(3, 2, 1, 0) at rank 1 holds 9/14 of the energy, got {got!r}"
    )
    for seed, (out_f, in_f, rank, _) in enumerate(CASES):
        weight = _weight(out_f, in_f, 200 + seed)
        want = (_best_rank_r(weight, rank).norm() ** 2 / weight.norm() ** 2).item()
        got = nb.exercise_1_captured_energy(weight, rank)
        assert math.isclose(got, want, rel_tol=1e-4), (
            f"exercise_1_captured_energy on a {out_f}x{in_f} weight at rank {rank} returned "
            f"{got!r}, expected {want:.6f}"
        )


@check(points=2)
def exercise_2_pissa_to_lora_reproduces_the_trained_layer(nb):
    """exercise_2_pissa_to_lora equals minigpt.pissa.pissa_to_lora_weights and rebuilds W_res + s
    (AB)^T on W."""
    torch.manual_seed(1)
    linear = nn.Linear(16, 12)
    original = linear.weight.detach().clone()
    layer = LinearWithPiSSA(linear, 4, alpha=8.0)
    with torch.no_grad():  # pretend it was trained
        layer.lora.A.add_(0.1 * torch.randn_like(layer.lora.A))
        layer.lora.B.add_(0.1 * torch.randn_like(layer.lora.B))
    A2, B2 = nb.exercise_2_pissa_to_lora(
        layer.lora.A.detach(), layer.lora.B.detach(), layer.A0, layer.B0
    )
    A_ref, B_ref = pissa_to_lora_weights(
        layer.lora.A.detach(), layer.lora.B.detach(), layer.A0, layer.B0
    )
    assert tuple(A2.shape) == (16, 8) and tuple(B2.shape) == (8, 12), (
        f"rank doubles: expected A' (16, 8) and B' (8, 12), got {tuple(A2.shape)} and "
        f"{tuple(B2.shape)}"
    )
    torch.testing.assert_close(
        A2 @ B2,
        A_ref @ B_ref,
        rtol=1e-6,
        atol=1e-6,
        msg=lambda m: f"A' B' differs from pissa_to_lora_weights: {m}",
    )
    s = layer.scaling
    with torch.no_grad():
        torch.testing.assert_close(
            original + s * (A2 @ B2).T,
            layer.linear.weight + s * (layer.lora.A @ layer.lora.B).T,
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m: f"W + s (A'B')^T must equal the trained W_res + s (AB)^T: {m}",
        )


@check(points=1)
def exercise_3_fast_svd_error_matches_reference(nb):
    """exercise_3_fast_svd_error: relative distance of the seeded svd_lowrank top-r part from the
    exact one."""
    weight = _weight(40, 30, 300)
    for niter in (0, 2):
        torch.manual_seed(5)
        U, S, V = torch.svd_lowrank(weight, q=6, niter=niter)
        exact = _best_rank_r(weight, 6)
        want = (((U * S) @ V.T - exact).norm() / exact.norm()).item()
        got = nb.exercise_3_fast_svd_error(weight, 6, niter, seed=5)
        assert math.isclose(got, want, rel_tol=1e-3, abs_tol=1e-6), (
            f"exercise_3_fast_svd_error(niter={niter}, seed=5) returned {got!r}, expected "
            f"{want:.6f}"
        )
    low_rank = _weight(40, 3, 301) @ _weight(3, 30, 302)
    assert nb.exercise_3_fast_svd_error(low_rank, 3, 2, seed=0) < 1e-4, (
        "a rank-3 matrix is found exactly at q=3"
    )


@check(points=1)
def exercise_4_qpissa_error_ratio_matches_quant(nb):
    """exercise_4_qpissa_error_ratio = nuclear quantisation error of W_res / that of W
    (minigpt.quant)."""
    # uneven columns: a non-trivial spectrum
    weight = _weight(32, 64, 400) * torch.linspace(0.2, 3.0, 64)
    for method in ("nf4", "int8"):
        _, _, residual = pissa_init(weight, 4)
        want = (
            quantization_error(residual, method)["nuclear"]
            / quantization_error(weight, method)["nuclear"]
        )
        got = nb.exercise_4_qpissa_error_ratio(weight, 4, method)
        assert math.isclose(got, want, rel_tol=1e-3), (
            f"exercise_4_qpissa_error_ratio(method={method!r}) returned {got!r}, expected "
            f"{want:.5f}"
        )


@check(points=1)
def exercise_5_decide_tells_a_lead_from_none(nb):
    """Exercise 5: the decision rule returns a one-line verdict, not the same one for a clear lead
    and for none."""
    lora = [4.30, 4.31, 4.29]
    lead, level = one_line_verdicts(
        nb.exercise_5_decide, (([4.10, 4.12, 4.11], lora), ([4.30, 4.28, 4.31], lora))
    )
    assert lead != level, (
        "exercise_5_decide gives the same verdict when PiSSA starts far lower than LoRA at the "
        f"same rate and when the two are level ({lead!r}): the rule cannot decide the question"
    )
