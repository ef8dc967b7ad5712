"""Checks for chapter 10 (comparison and QLoRA): the notebook's quantisers and exercises against the
package.

References are ``minigpt.quant`` (whose own tests check it against the QLoRA paper's definitions),
the NF4 table of the QLoRA paper's Appendix E, and small independent re-implementations written
here. Every check uses fixed seeds and small tensors, so each runs in well under a second.
"""

from __future__ import annotations

import torch

from minigpt.classroom.checks import check
from minigpt.pissa import pissa_init
from minigpt.quant import (
    dequantize_int8_blockwise,
    nf4_levels,
    quantization_error,
    quantize_int8_blockwise,
    quantize_nf4,
    unpack_nibbles,
)

# QLoRA (Dettmers et al., 2023, arXiv:2305.14314), Appendix E: the 16 NF4 values
PAPER_NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def _weights() -> list[torch.Tensor]:
    """A padded case (3000 values, blocks of 64), one with an outlier and an all-zero block, and a
    3-D one."""
    generator = torch.Generator().manual_seed(10)
    with_outlier = torch.randn(16, 12, generator=generator)
    with_outlier[:6] = 0.0  # the first 72 values: a whole block of 64 (or 16) is zero
    with_outlier[9, 3] = 40.0
    return [
        torch.randn(100, 30, generator=generator),
        with_outlier,
        torch.randn(2, 5, 7, generator=generator),
    ]


@check(points=2)
def absmax_quantize_matches_package(nb):
    """absmax_quantize gives the package's int8 codes and steps; absmax_dequantize stays within half
    a step."""
    for block_size in (64, 16):
        for w in _weights():
            codes, steps = nb.absmax_quantize(w, block_size)
            want_codes, want_steps = quantize_int8_blockwise(w, block_size)
            assert isinstance(codes, torch.Tensor) and codes.dtype == torch.int8, (
                f"codes must be an int8 tensor, got {getattr(codes, 'dtype', type(codes).__name__)}"
            )
            assert codes.shape == want_codes.shape and steps.shape == want_steps.shape, (
                f"for {w.numel()} values and block_size={block_size} expected {want_codes.numel()} "
                "codes (padded to "
                f"whole blocks) and {want_steps.numel()} steps, got shapes {tuple(codes.shape)} "
                f"and {tuple(steps.shape)}"
            )
            torch.testing.assert_close(
                steps.float(),
                want_steps,
                rtol=1e-6,
                atol=0,
                msg="steps must be absmax / 127 of each block",
            )
            assert torch.equal(codes, want_codes), (
                "codes differ from round(x / step) clamped to [-127, 127] "
                f"(first mismatch at {int((codes != want_codes).nonzero()[0])})"
            )
            restored = nb.absmax_dequantize(codes, steps, tuple(w.shape), block_size)
            assert torch.isfinite(restored).all(), (
                "dequantisation produced NaN/inf (an all-zero block?)"
            )
            torch.testing.assert_close(
                restored,
                dequantize_int8_blockwise(want_codes, want_steps, tuple(w.shape), block_size),
            )
            bound = want_steps.repeat_interleave(block_size)[: w.numel()].view(w.shape) / 2
            assert ((w - restored).abs() <= bound + 1e-6).all(), (
                "round-trip error above half a step (absmax / 254)"
            )


@check(points=2)
def nearest_level_indices_matches_nf4(nb):
    """nearest_level_indices picks the closest level (ties low) and reproduces the package's NF4
    codes."""
    levels = nf4_levels()
    x = torch.tensor([-1.0, -0.04, 0.0, 0.03, 0.5, 0.99, -0.7])
    got = nb.nearest_level_indices(x, levels)
    assert torch.as_tensor(got).tolist() == [0, 7, 7, 7, 12, 15, 1], (
        f"nearest_level_indices({x.tolist()}) returned {torch.as_tensor(got).tolist()}; expected "
        "the index of the "
        "closest NF4 level: [0, 7, 7, 7, 12, 15, 1]"
    )
    tie = torch.tensor([0.5, 1.5])  # exactly between levels 0/1 and 1/2
    assert nb.nearest_level_indices(tie, torch.tensor([0.0, 1.0, 2.0])).tolist() == [0, 1], (
        "a value exactly between two levels must go to the lower one (as torch.argmin and the "
        "package do)"
    )
    generator = torch.Generator().manual_seed(11)
    w = torch.randn(64, 48, generator=generator)
    codes, absmax = quantize_nf4(w, 64)
    blocks = w.reshape(-1, 64) / absmax[:, None]
    got = nb.nearest_level_indices(blocks, levels)
    assert tuple(got.shape) == tuple(blocks.shape), (
        f"the result must have x's shape {tuple(blocks.shape)}, got {tuple(got.shape)}"
    )
    assert torch.equal(got.reshape(-1).long(), unpack_nibbles(codes, w.numel()).long()), (
        "the indices differ from minigpt.quant.quantize_nf4's codes on normalised N(0,1) blocks"
    )


@check(points=1)
def nf4_levels_match_the_paper(nb):
    """The notebook's nf4_levels: 16 sorted levels equal to QLoRA's Appendix E, with an exact
    zero."""
    levels = nb.nf4_levels()
    assert levels.shape == (16,), f"NF4 has 16 levels, got shape {tuple(levels.shape)}"
    torch.testing.assert_close(
        levels.double(), torch.tensor(PAPER_NF4, dtype=torch.double), rtol=0, atol=1e-6
    )
    assert levels[7].item() == 0.0 and levels[0].item() == -1.0 and levels[-1].item() == 1.0


@check(points=1)
def exercise_1_bits_per_parameter_is_exact(nb):
    """exercise_1_bits_per_parameter: code bits + 32/B, or + 8/B + 32/(B·B2) with Double
    Quantization."""
    cases = {
        (4, 64, None): 4.5,
        (8, 64, None): 8.5,
        (4, 64, 256): 4 + 8 / 64 + 32 / (64 * 256),
        (4, 128, None): 4.25,
        (3, 32, 128): 3 + 8 / 32 + 32 / (32 * 128),
        (8, 2048, None): 8 + 32 / 2048,
    }
    for (bits, block, second), want in cases.items():
        got = nb.exercise_1_bits_per_parameter(bits, block, second)
        assert abs(got - want) < 1e-12, (
            f"exercise_1_bits_per_parameter({bits}, {block}, {second}) returned {got!r}, expected "
            f"{want:.6f}"
        )


def _int4_reference(w: torch.Tensor, block_size: int) -> torch.Tensor:
    flat = w.reshape(-1).double()
    pad = (-flat.numel()) % block_size
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, block_size)
    step = blocks.abs().amax(dim=1, keepdim=True) / 7
    step[step == 0] = 1.0
    return (torch.round(blocks / step) * step).reshape(-1)[: w.numel()].view(w.shape).float()


@check(points=2)
def exercise_2_int4_roundtrip_matches_reference(nb):
    """exercise_2_int4_absmax_roundtrip: round(7 x / absmax) per block, dequantised, padded blocks
    handled."""
    for block_size in (64, 10):
        for w in _weights():
            got = nb.exercise_2_int4_absmax_roundtrip(w, block_size)
            assert tuple(got.shape) == tuple(w.shape), (
                f"expected shape {tuple(w.shape)}, got {tuple(got.shape)}"
            )
            torch.testing.assert_close(
                got.float(),
                _int4_reference(w, block_size),
                rtol=1e-5,
                atol=1e-6,
                msg=f"int4 absmax round trip differs (block_size={block_size})",
            )


@check(points=2)
def exercise_3_qpissa_errors_match_package(nb):
    """exercise_3_qpissa_errors: NF4 error of W and of its PiSSA residual, as
    quantization_error/pissa_init give."""
    generator = torch.Generator().manual_seed(12)
    for shape, rank in (((48, 32), 4), ((32, 64), 8)):
        w = torch.randn(*shape, generator=generator) * 0.1
        w += (
            2.0
            * torch.randn(shape[0], 1, generator=generator)
            @ torch.randn(1, shape[1], generator=generator)
        )
        full, residual = nb.exercise_3_qpissa_errors(w, rank)
        _, _, w_res = pissa_init(w, rank)
        want_full = quantization_error(w, "nf4")["frobenius"]
        want_res = quantization_error(w_res, "nf4")["frobenius"]
        assert abs(full - want_full) < 1e-4 * max(1.0, want_full), (
            f"||W - nf4(W)|| = {full}, expected {want_full} (shape {shape})"
        )
        assert abs(residual - want_res) < 1e-3 * max(1.0, want_res), (
            f"||Wres - nf4(Wres)|| = {residual}, expected {want_res} (shape {shape}, rank {rank}): "
            "the residual is W "
            "minus its top-rank singular triplets"
        )
        assert residual < full, (
            "with a dominant rank-1 part the residual must quantise with less error"
        )


@check(points=1)
def exercise_4_pick_method_respects_the_budget(nb):
    """exercise_4_pick_method: lowest domain loss among rows within the memory budget; None if none
    fits."""
    rows = [
        {"method": "pretrained", "memory_bytes": None, "domain_loss": 9.0},
        {"method": "full", "memory_bytes": 1000, "domain_loss": 3.0},
        {"method": "lora", "memory_bytes": 400, "domain_loss": 3.5},
        {"method": "pissa", "memory_bytes": 400, "domain_loss": 3.4},
        {"method": "dora", "memory_bytes": 600, "domain_loss": 3.2},
    ]
    for budget, want in (
        (10**9, "full"),
        (1000, "full"),
        (999, "dora"),
        (599, "pissa"),
        (400, "pissa"),
        (399, None),
    ):
        got = nb.exercise_4_pick_method(rows, budget)
        assert got == want, (
            f"exercise_4_pick_method(rows, {budget}) returned {got!r}, expected {want!r}"
        )
