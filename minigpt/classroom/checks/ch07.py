"""Checks for chapter 07 (rsLoRA, Kalajdzievski 2023, arXiv:2312.03732).

The notebook's scaling functions are compared with the package's ``LoRALayer`` and with PEFT
(``LoraConfig(use_rslora=True)``); its PEFT bridge must reproduce PEFT's outputs; the exercises are
compared with independent computations (NumPy's polyfit, one step of ``torch.optim.SGD``).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn

from minigpt.classroom.checks import check, one_line_verdicts
from minigpt.lora import LoRALayer

ALPHAS_AND_RANKS = ((16.0, 1), (16.0, 4), (8.0, 16), (32.5, 64), (1.0, 128), (16, 256))


class _TwoLayers(nn.Module):
    def __init__(self, d_in: int = 20, d_hidden: int = 24, d_out: int = 12):
        super().__init__()
        self.fc, self.proj = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.fc(x)))


def _peft_model(rank: int, alpha: float, use_rslora: bool, seed: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(
        copy.deepcopy(_TwoLayers()),
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=["fc", "proj"], use_rslora=use_rslora),
    )
    for name in ("fc", "proj"):  # PEFT starts B at zero; make the adapter path matter
        nn.init.normal_(getattr(model.base_model.model, name).lora_B["default"].weight, std=0.2)
    return model


@check(points=2)
def rslora_scaling_matches_package_and_peft(nb):
    """rslora_scaling(alpha, rank) = alpha / sqrt(rank), as LoRALayer(use_rslora=True) and PEFT
    compute it."""
    for alpha, rank in ALPHAS_AND_RANKS:
        got = nb.rslora_scaling(alpha, rank)
        want = LoRALayer(256, 256, rank, alpha, use_rslora=True).scaling
        assert math.isclose(got, want, rel_tol=1e-12), (
            f"rslora_scaling({alpha}, {rank}) returned {got!r}; rsLoRA's factor is alpha / "
            f"sqrt(rank) = {want:.6g}"
        )
    peft_scaling = _peft_model(16, 8, True, 0).base_model.model.fc.scaling["default"]
    assert math.isclose(nb.rslora_scaling(8, 16), peft_scaling), (
        f"rslora_scaling(8, 16) = {nb.rslora_scaling(8, 16)!r} but PEFT's use_rslora=True scaling "
        f"is {peft_scaling}"
    )
    for bad in (0, -4):
        try:
            nb.rslora_scaling(16.0, bad)
        except (ValueError, TypeError):
            continue
        raise AssertionError(
            f"rslora_scaling(16.0, {bad}) should raise ValueError: rank must be >= 1"
        )


@check(points=1)
def lora_scaling_matches_package_and_peft(nb):
    """lora_scaling(alpha, rank) = alpha / rank, as LoRALayer and PEFT compute it."""
    for alpha, rank in ALPHAS_AND_RANKS:
        got, want = nb.lora_scaling(alpha, rank), LoRALayer(256, 256, rank, alpha).scaling
        assert math.isclose(got, want, rel_tol=1e-12), (
            f"lora_scaling({alpha}, {rank}) = {got!r}, expected {want}"
        )
    peft_scaling = _peft_model(16, 8, False, 0).base_model.model.fc.scaling["default"]
    assert math.isclose(nb.lora_scaling(8, 16), peft_scaling), (
        "lora_scaling(8, 16) must equal PEFT's 8 / 16"
    )


@check(points=2)
def lora_from_peft_reproduces_peft(nb):
    """lora_from_peft copies a PEFT lora.Linear (use_rslora False/True) into a LinearWithLoRA with
    equal outputs."""
    x = torch.randn(7, 20, generator=torch.Generator().manual_seed(3))
    for use_rslora in (False, True):
        for rank, alpha in ((1, 4.0), (4, 8.0), (12, 16.0)):
            reference = _peft_model(rank, alpha, use_rslora, seed=rank)
            inner = reference.base_model.model
            ours_fc, ours_proj = nb.lora_from_peft(inner.fc), nb.lora_from_peft(inner.proj)
            assert ours_fc.lora.rank == rank and math.isclose(
                ours_fc.scaling, inner.fc.scaling["default"]
            ), (
                f"lora_from_peft must keep rank {rank} and PEFT's scaling "
                f"{inner.fc.scaling['default']:.4f} "
                f"(use_rslora={use_rslora}); got rank {ours_fc.lora.rank}, scaling "
                f"{ours_fc.scaling:.4f}"
            )
            with torch.no_grad():
                got, want = ours_proj(torch.relu(ours_fc(x))), reference(x)
            torch.testing.assert_close(
                got,
                want,
                rtol=1e-6,
                atol=1e-6,
                msg=lambda m, use_rslora=use_rslora, rank=rank: (
                    f"outputs differ from PEFT's (use_rslora={use_rslora}, rank={rank}): {m}. "
                    "PEFT's lora_A.weight is "
                    "(rank, in) and lora_B.weight (out, rank): our A and B are their transposes"
                ),
            )


@check(points=1)
def adapter_probe_shows_the_scaling_law(nb):
    """adapter_probe: LoRA's gradient norm falls like r^-1/2 and its output faster; rsLoRA's stay
    flat."""
    ranks = (4, 16, 64)
    slopes = {}
    for use_rslora in (False, True):
        probes = [
            nb.adapter_probe(r, 4.0, use_rslora, in_dim=96, out_dim=64, n=32, steps=2)
            for r in ranks
        ]
        for key in ("output_norm", "grad_norm_B"):
            slopes[use_rslora, key] = np.polyfit(
                np.log(ranks), np.log([p[key] for p in probes]), 1
            )[0]
    assert -0.75 < slopes[False, "grad_norm_B"] < -0.3 and abs(slopes[True, "grad_norm_B"]) < 0.2, (
        f"gradient-norm slopes LoRA {slopes[False, 'grad_norm_B']:+.2f} (expected about -0.5), "
        "rsLoRA "
        f"{slopes[True, 'grad_norm_B']:+.2f} (expected about 0)"
    )
    assert slopes[False, "output_norm"] < slopes[True, "output_norm"] - 0.5, (
        f"output-norm slopes LoRA {slopes[False, 'output_norm']:+.2f} vs rsLoRA "
        f"{slopes[True, 'output_norm']:+.2f}: "
        "alpha/r should shrink the output much faster than alpha/sqrt(r)"
    )


@check(points=1)
def exercise_1_equivalent_lora_alpha_is_exact(nb):
    """exercise_1_equivalent_lora_alpha(alpha, r) = alpha * sqrt(r): same scaling for LoRA as
    rsLoRA."""
    for alpha, rank in ALPHAS_AND_RANKS:
        got = nb.exercise_1_equivalent_lora_alpha(alpha, rank)
        assert math.isclose(
            LoRALayer(256, 256, rank, got).scaling,
            LoRALayer(256, 256, rank, alpha, use_rslora=True).scaling,
            rel_tol=1e-12,
        ), (
            f"exercise_1_equivalent_lora_alpha({alpha}, {rank}) returned {got!r}; LoRA with that "
            "alpha has scaling "
            f"{got / rank:.6g} but rsLoRA with alpha {alpha} has {alpha / math.sqrt(rank):.6g}"
        )


@check(points=1)
def exercise_2_loglog_slope_matches_polyfit(nb):
    """exercise_2_loglog_slope equals np.polyfit's slope on log-log data."""
    rng = np.random.default_rng(7)
    assert math.isclose(
        nb.exercise_2_loglog_slope([1, 2, 4, 8], [3.0, 1.5, 0.75, 0.375]), -1.0, abs_tol=1e-12
    ), "y = 3 / r has slope -1 on log-log axes"
    for _ in range(5):
        ranks = np.sort(rng.choice(np.arange(1, 300), size=6, replace=False))
        values = np.exp(rng.normal(size=6)) * ranks ** rng.uniform(-2, 2)
        want = np.polyfit(np.log(ranks), np.log(values), 1)[0]
        got = nb.exercise_2_loglog_slope(list(ranks), list(values))
        assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12), (
            f"exercise_2_loglog_slope returned {got!r}, np.polyfit's slope is {want:.6f}"
        )


@check(points=2)
def exercise_3_one_step_output_matches_sgd(nb):
    """exercise_3_one_step_output equals the adapter output after one torch.optim.SGD step from B =
    0."""
    for seed, (n, d_in, d_out, rank, use_rslora, lr) in enumerate(
        ((6, 10, 8, 2, False, 0.1), (12, 32, 20, 8, True, 0.03))
    ):
        torch.manual_seed(seed)
        layer = LoRALayer(d_in, d_out, rank, alpha=4.0, use_rslora=use_rslora)
        x, target = torch.randn(n, d_in), torch.randn(n, d_out)
        optimizer = torch.optim.SGD(layer.parameters(), lr=lr)
        (0.5 * ((layer(x) - target) ** 2).sum(dim=1).mean()).backward()
        optimizer.step()
        with torch.no_grad():
            want = layer(x)
            got = nb.exercise_3_one_step_output(
                x, layer.A.detach().clone(), target, layer.scaling, lr
            )
        torch.testing.assert_close(
            got,
            want,
            rtol=1e-5,
            atol=1e-6,
            msg=lambda m, n=n, rank=rank: (
                f"exercise_3_one_step_output differs from one SGD step (n={n}, rank={rank}): {m}. "
                "Remember the 1/n of "
                "the mean and that the scaling appears twice"
            ),
        )


@check(points=1)
def exercise_4_decide_tells_the_outcomes_apart(nb):
    """Exercise 4: the decision rule returns a one-line verdict, tells the hypothesis's outcome
    from the opposite one, and takes math.inf for a diverged run."""
    stays, drops = [1.44, 1.46, 1.43], [1.94, 1.97, 1.95]
    moves = ([2.70, 2.72, 2.69], drops)  # the next rate up helps, far beyond the spread
    holds, fails, diverged = one_line_verdicts(
        nb.exercise_4_decide,
        (
            (moves, (stays, [1.45, 1.44, 1.46])),
            ((stays, [1.45, 1.44, 1.46]), moves),
            (moves, (stays, [1.45, math.inf, 1.46])),
        ),
    )
    assert holds != fails, (
        "exercise_4_decide gives the same verdict when only LoRA gains from the higher rate and "
        f"when only rsLoRA does ({holds!r}): the rule cannot decide the question"
    )
    assert diverged, "a diverged run (math.inf) must still give a verdict"
