import importlib.util
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.classroom.checks.ch10 import PAPER_NF4
from minigpt.model import GPTConfig, GPTModel
from minigpt.quant import (
    QuantizedLinear,
    dequantize_int8_blockwise,
    dequantize_nf4,
    double_dequantize,
    double_quantize,
    model_storage_bytes,
    nf4_levels,
    quantization_error,
    quantize_int8_blockwise,
    quantize_nf4,
    replace_linear_with_quantized,
)

# QLoRA (arXiv:2305.14314) Appendix E / bitsandbytes: the published NF4 data type, kept once
# beside the chapter 10 check that compares a student's levels with it
PUBLISHED_NF4 = list(PAPER_NF4)
SHAPES_AND_BLOCKS = [((32, 48), 64), ((7, 13), 64), ((5, 11), 7), ((100,), 16), ((3, 4, 5), 1)]


def block_absmax_per_element(w, block_size):
    """absmax of the block each element of w belongs to, shaped like w."""
    flat = w.reshape(-1)
    padded = F.pad(flat, (0, (-flat.numel()) % block_size)).view(-1, block_size)
    return padded.abs().amax(1).repeat_interleave(block_size)[: flat.numel()].view(w.shape)


def roundtrip(w, method, block_size):
    if method == "int8":
        codes, scales = quantize_int8_blockwise(w, block_size)
        return codes, scales, dequantize_int8_blockwise(codes, scales, w.shape, block_size)
    codes, scales = quantize_nf4(w, block_size)
    return codes, scales, dequantize_nf4(codes, scales, w.shape, block_size)


# ----------------------------------------------------------------------------- NF4 levels


def test_nf4_levels_match_the_published_table():
    levels = nf4_levels()
    assert levels.shape == (16,) and levels.dtype == torch.float32
    assert torch.equal(levels, levels.sort().values) and levels.unique().numel() == 16
    assert levels.min() == -1.0 and levels.max() == 1.0
    assert (levels == 0).sum() == 1
    assert (levels > 0).sum() == 8 and (levels < 0).sum() == 7  # the asymmetric construction
    torch.testing.assert_close(levels, torch.tensor(PUBLISHED_NF4), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("shape,block_size", SHAPES_AND_BLOCKS)
def test_int8_roundtrip_within_half_a_step(shape, block_size):
    torch.manual_seed(0)
    w = torch.randn(shape)
    codes, scales, restored = roundtrip(w, "int8", block_size)
    n_blocks = math.ceil(w.numel() / block_size)
    assert codes.dtype == torch.int8 and codes.shape == (n_blocks * block_size,)
    assert scales.dtype == torch.float32 and scales.shape == (n_blocks,)
    assert restored.shape == w.shape and restored.dtype == torch.float32
    assert codes.abs().max() == 127  # each block's absmax maps to +-127 (QLoRA eq. 1)
    bound = block_absmax_per_element(w, block_size) / 254 + 1e-6
    assert ((w - restored).abs() <= bound).all()


@pytest.mark.parametrize("shape,block_size", SHAPES_AND_BLOCKS)
def test_nf4_roundtrip_within_half_the_largest_gap(shape, block_size):
    torch.manual_seed(0)
    w = torch.randn(shape)
    codes, absmax, restored = roundtrip(w, "nf4", block_size)
    n_blocks = math.ceil(w.numel() / block_size)
    assert codes.dtype == torch.uint8 and codes.shape == (math.ceil(n_blocks * block_size / 2),)
    assert absmax.dtype == torch.float32 and absmax.shape == (n_blocks,)
    assert restored.shape == w.shape and restored.dtype == torch.float32
    half_gap = nf4_levels().diff().max() / 2
    bound = half_gap * block_absmax_per_element(w, block_size) + 1e-6
    assert ((w - restored).abs() <= bound).all()
    # every restored value is a level times its block's absmax
    ratio = restored / block_absmax_per_element(w, block_size)
    assert (ratio.reshape(-1, 1) - nf4_levels()).abs().min(1).values.max() < 1e-6


def test_nf4_packs_two_codes_per_byte_high_nibble_first():
    codes, absmax = quantize_nf4(nf4_levels(), block_size=16)  # level i -> code i
    assert codes.tolist() == [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]
    torch.testing.assert_close(absmax, torch.ones(1))
    torch.testing.assert_close(
        dequantize_nf4(codes, absmax, (16,), 16), nf4_levels(), atol=0, rtol=0
    )
    # odd number of codes: the last byte holds one code and a zero pad nibble
    codes, _ = quantize_nf4(nf4_levels()[:3], block_size=3)
    assert codes.tolist() == [0x01, 0x20]


def test_values_on_the_grid_survive_exactly():
    torch.manual_seed(0)
    scales = torch.rand(4) + 0.5
    levels = torch.randint(-127, 128, (4, 8)).float()
    levels[:, 0] = 127  # make each row's absmax exactly 127 * scale
    w = levels * scales[:, None] / 127
    torch.testing.assert_close(roundtrip(w, "int8", 8)[2], w)
    w = nf4_levels()[torch.randint(0, 16, (4, 8))]
    w[:, 0] = 1.0
    w = w * scales[:, None]
    torch.testing.assert_close(roundtrip(w, "nf4", 8)[2], w)


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_zero_blocks_give_zeros_not_nan(method):
    w = torch.randn(4, 16)
    w[1] = 0.0
    codes, scales, restored = roundtrip(w, method, 16)
    assert torch.isfinite(restored).all() and (restored[1] == 0).all() and scales[1] == 0
    # the zero block's codes point at the exact zero: int8 code 0, NF4 level 7 (0x77 for a pair)
    assert codes.view(4, -1)[1].tolist() == ([0] * 16 if method == "int8" else [0x77] * 8)
    restored = roundtrip(torch.zeros(3, 5), method, 4)[2]
    assert torch.equal(restored, torch.zeros(3, 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_accepted(dtype):
    w = torch.randn(8, 8).to(dtype)
    for method in ("int8", "nf4"):
        restored = roundtrip(w, method, 16)[2]
        assert restored.dtype == torch.float32
        torch.testing.assert_close(restored, w.float(), atol=0.35, rtol=0)


def test_nf4_beats_uniform_4bit_on_gaussian_weights():
    # QLoRA section 3: quantile levels suit normally distributed weights better than even spacing
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    nf4_mse = (w - roundtrip(w, "nf4", 64)[2]).pow(2).mean()
    blocks = w.view(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    # symmetric int4, 15 levels
    uniform = (torch.round(blocks / absmax * 7) / 7 * absmax).view_as(w)
    assert nf4_mse < 0.8 * (w - uniform).pow(2).mean()


def test_double_quantization_of_the_block_constants():
    torch.manual_seed(0)
    absmax = torch.rand(600) + 0.1
    codes, scales, mean = double_quantize(absmax)
    assert codes.dtype == torch.int8 and scales.shape == (3,) and mean.shape == (1,)
    restored = double_dequantize(codes, scales, mean, 600)
    step = (absmax - absmax.mean()).abs().max() / 127
    assert ((restored - absmax).abs() <= step / 2 + 1e-6).all()


# ----------------------------------------------------------------------------- QuantizedLinear


@pytest.mark.parametrize("method", ["int8", "nf4"])
@pytest.mark.parametrize("bias", [True, False])
def test_quantized_linear_forward_is_f_linear_with_the_dequantised_weight(method, bias):
    torch.manual_seed(0)
    linear = nn.Linear(24, 10, bias=bias)
    layer = QuantizedLinear.from_linear(linear, method, block_size=16)
    assert (layer.in_features, layer.out_features, layer.method, layer.block_size) == (
        24,
        10,
        method,
        16,
    )
    assert list(layer.parameters()) == []
    weight = layer.dequantize()
    assert weight.shape == (10, 24) and weight.dtype == torch.float32
    torch.testing.assert_close(layer.weight, weight)
    assert not isinstance(layer.weight, nn.Parameter)
    codes, scales = (quantize_nf4 if method == "nf4" else quantize_int8_blockwise)(
        linear.weight, 16
    )
    assert torch.equal(layer.codes, codes) and torch.equal(layer.scales, scales)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(layer(x), F.linear(x, weight, linear.bias))
    out64 = layer(x.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(
        out64, F.linear(x.double(), weight.double(), None if not bias else linear.bias.double())
    )
    # close to the float layer it came from
    relative_error = ((layer(x) - linear(x)).norm() / linear(x).norm()).item()
    assert relative_error < (0.15 if method == "nf4" else 0.01)
    with pytest.raises(AttributeError):
        layer.weight = torch.zeros(10, 24)


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantized_linear_survives_a_module_dtype_cast(double_quant):
    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(
        nn.Linear(32, 8), "nf4", block_size=16, double_quant=double_quant
    )
    x = torch.randn(2, 32)
    expected = layer(x)
    layer.to(torch.bfloat16)  # casts the float buffers (constants, bias), not the integer codes
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16 and layer.codes.dtype == torch.uint8
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.05)


def test_quantized_linear_state_dict_round_trip():
    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(nn.Linear(20, 6), "nf4", block_size=8, double_quant=True)
    fresh = QuantizedLinear(20, 6, bias=True, method="nf4", block_size=8, double_quant=True)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 20)
    torch.testing.assert_close(fresh(x), layer(x))


def test_storage_bytes_nf4_is_about_an_eighth_of_fp32():
    # 4 bits per weight + one float32 per 64 weights (0.5 bit) + the float32 bias
    linear = nn.Linear(256, 128)
    fp32 = model_storage_bytes(linear)
    assert fp32 == (256 * 128 + 128) * 4
    n_blocks = 256 * 128 // 64
    nf4 = QuantizedLinear.from_linear(linear, "nf4")
    assert (
        nf4.storage_bytes() == 256 * 128 // 2 + 4 * n_blocks + 4 * 128 == model_storage_bytes(nf4)
    )
    int8 = QuantizedLinear.from_linear(linear, "int8")
    assert int8.storage_bytes() == 256 * 128 + 4 * n_blocks + 4 * 128
    dq = QuantizedLinear.from_linear(linear, "nf4", double_quant=True)
    # 512 int8 codes: 2 blocks
    assert dq.storage_bytes() == 256 * 128 // 2 + n_blocks + 4 * 2 + 4 + 4 * 128
    assert (
        dq.storage_bytes() < nf4.storage_bytes() < fp32 / 6.5 and int8.storage_bytes() < fp32 / 3.5
    )
    torch.testing.assert_close(dq.dequantize(), nf4.dequantize(), atol=0.01, rtol=0)


def test_replace_linear_with_quantized_keeps_the_tied_head():
    torch.manual_seed(0)
    model = GPTModel(
        GPTConfig(vocab_size=64, context_length=8, n_layer=2, n_head=2, n_embd=32)
    ).eval()
    idx = torch.randint(0, 64, (2, 8))
    before_logits, before_bytes = model(idx), model_storage_bytes(model)
    assert (
        replace_linear_with_quantized(model, "nf4", exclude=("lm_head", "blocks.1.mlp.fc")) is model
    )
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["lm_head"] is nn.Linear and kinds["blocks.1.mlp.fc"] is nn.Linear
    assert (
        kinds["blocks.0.mlp.fc"] is QuantizedLinear
        and kinds["blocks.1.attn.query"] is QuantizedLinear
    )
    assert not any(
        isinstance(m, nn.Linear)
        for n, m in model.named_modules()
        if n not in ("lm_head", "blocks.1.mlp.fc")
    )
    assert model.lm_head.weight is model.tok_emb.weight
    assert model_storage_bytes(model) < before_bytes
    torch.testing.assert_close(model(idx), before_logits, atol=0.5, rtol=0)


def test_quantization_error_norms():
    torch.manual_seed(0)
    w = torch.randn(48, 32)
    errors = {m: quantization_error(w, m, 16) for m in ("int8", "nf4")}
    for method, error in errors.items():
        diff = (w - roundtrip(w, method, 16)[2]).double()
        assert error["frobenius"] == pytest.approx(diff.norm().item(), rel=1e-6)
        assert error["nuclear"] == pytest.approx(torch.linalg.svdvals(diff).sum().item(), rel=1e-6)
        assert error["frobenius"] <= error["nuclear"]
    assert errors["int8"]["frobenius"] < errors["nf4"]["frobenius"] / 5
    assert quantization_error(torch.zeros(4, 4), "nf4") == {"frobenius": 0.0, "nuclear": 0.0}


# ----------------------------------------------------------------------------- LoRA on top (QLoRA
# eq. 5)


class TinyAdapter(nn.Module):
    """Stand-in for LinearWithLoRA: linear(x) + scaling * x A B."""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.A = nn.Parameter(torch.randn(linear.in_features, rank) * 0.1)
        self.B = nn.Parameter(torch.zeros(rank, linear.out_features))
        self.scaling = alpha / rank

    def forward(self, x):
        return self.linear(x) + self.scaling * (x @ self.A @ self.B)


def check_only_adapter_trains(model, adapter_params):
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapter_params}
    before = [p.detach().clone() for p in adapter_params]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    torch.manual_seed(1)
    x, target = torch.randn(8, 16), torch.randn(8, 12)
    for _ in range(2):  # B starts at zero, so A's gradient is nonzero only from the second step
        optimizer.zero_grad()
        F.mse_loss(model(x), target).backward()
        optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, adapter_params, strict=False))
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]) and buffer.grad is None, name


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_only_the_adapter_trains_on_a_quantized_base(method):
    torch.manual_seed(0)
    model = TinyAdapter(QuantizedLinear.from_linear(nn.Linear(16, 12), method, block_size=32), 4, 8)
    check_only_adapter_trains(model, [model.A, model.B])


@pytest.mark.skipif(
    importlib.util.find_spec("minigpt.lora") is None, reason="minigpt/lora.py not written yet"
)
def test_linear_with_lora_wraps_a_quantized_linear():
    from minigpt.lora import LinearWithLoRA

    torch.manual_seed(0)
    base = QuantizedLinear.from_linear(nn.Linear(16, 12), "nf4", block_size=32)
    model = LinearWithLoRA(base, rank=4, alpha=8)
    x = torch.randn(3, 16)
    torch.testing.assert_close(model(x), base(x))  # B = 0 at initialisation
    check_only_adapter_trains(model, list(model.lora.parameters()))


# ----------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"method must be one of \('int8', 'nf4'\), got 'fp4'"):
        QuantizedLinear.from_linear(nn.Linear(8, 4), method="fp4")
    with pytest.raises(ValueError, match="method must be one of"):
        quantization_error(w, "int4")
    with pytest.raises(ValueError, match="method must be one of"):
        replace_linear_with_quantized(nn.Sequential(nn.Linear(2, 2)), method="fp8")
    with pytest.raises(ValueError, match=r"block_size must be an integer >= 1, got 0"):
        quantize_nf4(w, 0)
    with pytest.raises(TypeError, match="block_size must be an integer, got float 64.0"):
        quantize_int8_blockwise(w, 64.0)
    with pytest.raises(TypeError, match="block_size must be an integer"):
        quantize_int8_blockwise(w, True)
    with pytest.raises(TypeError, match="w must be a floating-point tensor"):
        quantize_nf4(torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="linear.weight must be a floating-point tensor"):
        QuantizedLinear.from_linear(_int_linear())
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        QuantizedLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="w must be a 2-D weight matrix"):
        quantization_error(torch.randn(8), "nf4")
    with pytest.raises(ValueError, match="double_quant is only available with method='nf4'"):
        QuantizedLinear.from_linear(nn.Linear(8, 4), "int8", double_quant=True)
    with pytest.raises(TypeError, match="exclude must be a tuple of module names"):
        replace_linear_with_quantized(nn.Sequential(nn.Linear(2, 2)), exclude="lm_head")


def _int_linear():
    linear = nn.Linear(8, 4)
    linear.weight = nn.Parameter(torch.ones(4, 8, dtype=torch.int32), requires_grad=False)
    return linear


def test_bad_codes_on_dequantize():
    codes, scales = quantize_nf4(torch.randn(4, 8), 16)
    int8_codes, int8_scales = quantize_int8_blockwise(torch.randn(4, 8), 16)
    with pytest.raises(TypeError, match=r"codes must be a 1-D torch.uint8 tensor, got torch.int8"):
        dequantize_nf4(int8_codes, scales, (4, 8), 16)
    with pytest.raises(TypeError, match=r"codes must be a 1-D torch.int8 tensor"):
        dequantize_int8_blockwise(codes, int8_scales, (4, 8), 16)
    with pytest.raises(TypeError, match=r"scales must be a 1-D torch.float32 tensor"):
        dequantize_nf4(codes, scales.double(), (4, 8), 16)
    with pytest.raises(ValueError, match=r"expected 16 codes and 2 scales, got 15 and 2"):
        dequantize_nf4(codes[:-1], scales, (4, 8), 16)
    with pytest.raises(
        ValueError, match=r"codes/scales do not match shape=\(8, 8\) and block_size=16"
    ):
        dequantize_nf4(codes, scales, (8, 8), 16)
    with pytest.raises(
        ValueError, match=r"codes/scales do not match shape=\(4, 8\) and block_size=8"
    ):
        dequantize_int8_blockwise(int8_codes, int8_scales, (4, 8), 8)
    with pytest.raises(ValueError, match="shape must be a non-empty tuple of positive integers"):
        dequantize_nf4(codes, scales, (4, -8), 16)
