"""QLoRA's storage side from scratch: block-wise int8 and 4-bit NormalFloat (Dettmers et al., 2023,
"QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314).

A weight is flattened, zero-padded to a multiple of ``block_size`` and cut into blocks; each block
keeps one float32 constant (its absmax) so that one outlier only hurts its own block (QLoRA section
2, "block-wise k-bit quantization"). ``int8`` rounds ``127 / absmax * x`` (eq. 1); ``nf4`` snaps ``x
/ absmax`` to the nearest of 16 NormalFloat levels (section 3) and packs two 4-bit codes per byte.
``QuantizedLinear`` stores only codes and constants and dequantises on the fly (eq. 5: the frozen
base is used in the compute dtype, LoRA adapters on top stay in full precision).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt._validate import UserError, UserTypeError, check_choice, check_int

METHODS = ("int8", "nf4")
# QLoRA section 3, "Double Quantization": blocks of 256 for the constants
DOUBLE_QUANT_BLOCK_SIZE = 256


# ----------------------------------------------------------------------------- argument checks


def check_method(method: str) -> str:
    return check_choice("method", method, METHODS)


def check_block_size(block_size: int, name: str = "block_size") -> int:
    return check_int(name, block_size, 1)


def check_float_tensor(w: torch.Tensor, name: str = "w") -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise UserTypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise UserTypeError(
            f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), "
            f"got {w.dtype}"
        )
    if w.numel() == 0:
        raise UserError(f"{name} must have at least one element, got shape {tuple(w.shape)}")
    # one NaN/inf would poison its block's absmax and every code
    if not bool(torch.isfinite(w).all()):
        raise UserError(
            f"{name} holds {int((~torch.isfinite(w)).sum())} non-finite value(s) (NaN or inf); "
            "quantisation needs finite weights"
        )
    return w


def check_shape(shape) -> tuple[int, ...]:
    if (
        not isinstance(shape, (tuple, list, torch.Size))
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
        or len(shape) == 0
    ):
        raise UserError(f"shape must be a non-empty tuple of positive integers, got {shape!r}")
    return tuple(shape)


def check_codes(
    codes: torch.Tensor,
    scales: torch.Tensor,
    shape,
    block_size: int,
    dtype: torch.dtype,
    codes_per_byte: int,
) -> tuple[tuple[int, ...], int]:
    shape = check_shape(shape)
    check_block_size(block_size)
    for name, tensor, expected in (("codes", codes, dtype), ("scales", scales, torch.float32)):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != expected or tensor.ndim != 1:
            got = (
                f"{tensor.dtype} of shape {tuple(tensor.shape)}"
                if isinstance(tensor, torch.Tensor)
                else type(tensor).__name__
            )
            raise UserTypeError(f"{name} must be a 1-D {expected} tensor, got {got}")
    n_blocks = math.ceil(math.prod(shape) / block_size)
    n_codes = math.ceil(n_blocks * block_size / codes_per_byte)
    if scales.numel() != n_blocks or codes.numel() != n_codes:
        raise UserError(
            f"codes/scales do not match shape={shape} and block_size={block_size}: expected "
            f"{n_codes} codes and {n_blocks} scales, got {codes.numel()} and {scales.numel()}"
        )
    return shape, n_blocks


def to_blocks(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flatten, zero-pad to a multiple of block_size, view as (n_blocks, block_size) in float32."""
    flat = w.detach().reshape(-1).float()
    pad = (-flat.numel()) % block_size
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.view(-1, block_size)


def safe_absmax(absmax: torch.Tensor) -> torch.Tensor:
    # an all-zero block has absmax 0; dividing by 1 instead keeps its codes at 0 and avoids 0/0 =
    # NaN
    return torch.where(absmax > 0, absmax, torch.ones_like(absmax))


# ----------------------------------------------------------------------------- int8


def quantize_int8_blockwise(
    w: torch.Tensor, block_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 quantisation per block (QLoRA eq. 1: X_int8 = round(127 / absmax(X) *
    X)).

    Returns ``codes``: int8 of length ``n_blocks * block_size`` (the flattened, zero-padded tensor)
    and ``scales``: float32 ``absmax / 127`` per block, i.e. 1 / c of the paper, so dequantisation
    (eq. 2) is a multiplication. Every element's error is at most half a step, ``absmax / 254``.
    """
    check_float_tensor(w)
    check_block_size(block_size)
    blocks = to_blocks(w, block_size)
    scales = blocks.abs().amax(dim=1) / 127.0
    codes = torch.round(blocks / safe_absmax(scales)[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes.reshape(-1), scales


def dequantize_int8_blockwise(
    codes: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...], block_size: int = 64
) -> torch.Tensor:
    """Inverse of :func:`quantize_int8_blockwise` (QLoRA eq. 2: X = X_int8 / c); float32 of
    ``shape``."""
    shape, n_blocks = check_codes(codes, scales, shape, block_size, torch.int8, codes_per_byte=1)
    values = codes.view(n_blocks, block_size).float() * scales[:, None]
    return values.reshape(-1)[: math.prod(shape)].view(shape)


# ----------------------------------------------------------------------------- NF4


def nf4_levels() -> torch.Tensor:
    """The 16 levels of 4-bit NormalFloat (QLoRA section 3, eq. 4 and Appendix E), float32, sorted.

    Quantiles of N(0, 1) estimated at evenly spaced probabilities, made asymmetric so that zero is
    exact: 8 positive quantiles from probability ``offset`` down to 0.5 (exclusive), 7 negative ones
    likewise, plus 0, all divided by the largest so the levels span [-1, 1]. ``offset`` = 0.9677
    (Appendix E), the average of 1 - 1/(2*15) and 1 - 1/(2*16), stops short of probability 1 where
    the quantile is infinite.
    """
    normal = torch.distributions.Normal(
        torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    )
    offset = 1.0 - 0.5 * (1.0 / 30.0 + 1.0 / 32.0)
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.max()).float()


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    if codes.numel() % 2:
        codes = F.pad(codes, (0, 1))
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]  # first code in the high nibble, as bitsandbytes does


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n]


def quantize_nf4(w: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise NF4 quantisation (QLoRA section 3): each block divided by its absmax, each value
    mapped to the nearest NF4 level (bucketize on the midpoints between levels).

    Returns ``codes``: uint8 with two 4-bit level indices per byte (length ``ceil(n_blocks *
    block_size / 2)``), and ``absmax``: float32 per block.
    """
    check_float_tensor(w)
    check_block_size(block_size)
    blocks = to_blocks(w, block_size)
    absmax = blocks.abs().amax(dim=1)
    levels = nf4_levels().to(blocks.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    indices = torch.bucketize(blocks / safe_absmax(absmax)[:, None], midpoints).to(torch.uint8)
    return pack_nibbles(indices.reshape(-1)), absmax


def dequantize_nf4(
    codes: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], block_size: int = 64
) -> torch.Tensor:
    """Inverse of :func:`quantize_nf4`: level[code] * absmax of the block; float32 of ``shape``."""
    shape, n_blocks = check_codes(codes, absmax, shape, block_size, torch.uint8, codes_per_byte=2)
    indices = unpack_nibbles(codes, n_blocks * block_size).long()
    values = nf4_levels().to(codes.device)[indices].view(n_blocks, block_size) * absmax[:, None]
    return values.reshape(-1)[: math.prod(shape)].view(shape)


def double_quantize(
    absmax: torch.Tensor, block_size: int = DOUBLE_QUANT_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QLoRA's Double Quantization (section 3): quantise the per-block constants themselves.

    The constants are positive, so their mean is subtracted first and the centred values are
    quantised symmetrically in blocks of 256. The paper uses 8-bit floats for this second level; we
    use the int8 of eq. 1 (same 8 bits, simpler). Returns (int8 codes, float32 scales, float32
    mean).
    """
    check_float_tensor(absmax, "absmax")
    mean = absmax.float().mean().reshape(1)
    codes, scales = quantize_int8_blockwise(absmax.float() - mean, block_size)
    return codes, scales, mean


def double_dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    mean: torch.Tensor,
    n: int,
    block_size: int = DOUBLE_QUANT_BLOCK_SIZE,
) -> torch.Tensor:
    """Inverse of :func:`double_quantize` (the inner dequantisation of QLoRA eq. 6): ``n`` float32
    constants."""
    return dequantize_int8_blockwise(codes, scales, (n,), block_size) + mean


# ----------------------------------------------------------------------------- the layer


class QuantizedLinear(nn.Module):
    """A frozen ``nn.Linear`` stored as int8 or NF4 codes plus per-block constants (QLoRA eq. 5).

    Everything is a buffer, nothing a Parameter: the quantised base is never trained; LoRA adapters
    wrapped around it (``minigpt.lora.LinearWithLoRA``) are. ``forward`` dequantises in the input's
    dtype and calls ``F.linear``. Build one with :meth:`from_linear`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        method: str = "nf4",
        block_size: int = 64,
        double_quant: bool = False,
    ):
        super().__init__()
        check_quantized_args(in_features, out_features, method, block_size, double_quant)
        self.in_features, self.out_features = in_features, out_features
        self.method, self.block_size, self.double_quant = method, block_size, double_quant
        # buffers: codes; scales (int8: absmax / 127, nf4: absmax) or, with double_quant, their int8
        # codes scale_codes + second-level scale_scales + scale_mean; bias (float) or None
        n_blocks = math.ceil(in_features * out_features / block_size)
        if method == "int8":
            self.register_buffer("codes", torch.zeros(n_blocks * block_size, dtype=torch.int8))
        else:
            self.register_buffer(
                "codes", torch.zeros(math.ceil(n_blocks * block_size / 2), dtype=torch.uint8)
            )
        if double_quant:
            n_scale_blocks = math.ceil(n_blocks / DOUBLE_QUANT_BLOCK_SIZE)
            self.register_buffer(
                "scale_codes",
                torch.zeros(n_scale_blocks * DOUBLE_QUANT_BLOCK_SIZE, dtype=torch.int8),
            )
            self.register_buffer("scale_scales", torch.zeros(n_scale_blocks))
            self.register_buffer("scale_mean", torch.zeros(1))
        else:
            self.register_buffer("scales", torch.zeros(n_blocks))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        method: str = "nf4",
        block_size: int = 64,
        double_quant: bool = False,
    ) -> "QuantizedLinear":
        """Quantise ``linear.weight`` (bias kept in float32) on the weight's device."""
        check_linear(linear)
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            method,
            block_size,
            double_quant,
        ).to(linear.weight.device)
        quantize = quantize_nf4 if method == "nf4" else quantize_int8_blockwise
        codes, scales = quantize(linear.weight, block_size)
        layer.codes.copy_(codes)
        if double_quant:
            scale_codes, scale_scales, scale_mean = double_quantize(scales)
            layer.scale_codes.copy_(scale_codes)
            layer.scale_scales.copy_(scale_scales)
            layer.scale_mean.copy_(scale_mean)
        else:
            layer.scales.copy_(scales)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().float())
        return layer

    def block_scales(self) -> torch.Tensor:
        """The per-block float32 constants (decoded from the second level with double
        quantisation)."""
        # .float(): module.half() / .to(bfloat16) casts floating buffers, the codecs work in float32
        if not self.double_quant:
            return self.scales.float()
        n_blocks = math.ceil(self.in_features * self.out_features / self.block_size)
        return double_dequantize(
            self.scale_codes, self.scale_scales.float(), self.scale_mean.float(), n_blocks
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stored weight, decoded: a fresh ``(out_features, in_features)`` tensor of
        ``dtype``."""
        dequantize = dequantize_nf4 if self.method == "nf4" else dequantize_int8_blockwise
        shape = (self.out_features, self.in_features)
        return dequantize(self.codes, self.block_scales(), shape, self.block_size).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Read-only view for code that inspects ``.weight`` (shape, device, dtype): the dequantised
        float32 weight, recomputed on each access. It is NOT a Parameter and not stored: writing to
        it changes nothing."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def storage_bytes(self) -> int:
        """Bytes actually stored: codes + block constants (+ second-level constants) + bias."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
            f"method={self.method!r}, block_size={self.block_size}, "
            f"double_quant={self.double_quant}"
        )


# ----------------------------------------------------------------------------- model helpers


def check_quantized_args(
    in_features: int, out_features: int, method: str, block_size: int, double_quant: bool
) -> None:
    """The arguments of a :class:`QuantizedLinear`, each named when it is wrong."""
    check_method(method)
    check_block_size(block_size)
    check_block_size(in_features, "in_features")
    check_block_size(out_features, "out_features")
    if double_quant and method != "nf4":
        raise UserError(f"double_quant is only available with method='nf4', got method={method!r}")


def check_linear(linear: nn.Module) -> None:
    """What :meth:`QuantizedLinear.from_linear` quantises: an ``nn.Linear`` with finite float
    weights."""
    if not isinstance(linear, nn.Linear):
        raise UserTypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
    check_float_tensor(linear.weight, "linear.weight")


def replace_linear_with_quantized(
    model: nn.Module,
    method: str = "nf4",
    block_size: int = 64,
    exclude: tuple[str, ...] = ("lm_head",),
    double_quant: bool = False,
    _prefix: str = "",
) -> nn.Module:
    """Swap every ``nn.Linear`` in ``model`` for a :class:`QuantizedLinear`, in place; returns
    ``model``.

    A module is skipped when its name or its dotted path is in ``exclude``; the default keeps
    ``lm_head`` in float because GPT-2 ties it to the token embedding (quantising it would untie
    them). QLoRA quantises all linear layers of the base model (section 4) and trains LoRA on top.
    """
    check_method(method)
    check_block_size(block_size)
    if isinstance(exclude, str) or not all(isinstance(name, str) for name in exclude):
        raise UserTypeError(f"exclude must be a tuple of module names (str), got {exclude!r}")
    for name, child in model.named_children():
        path = f"{_prefix}{name}"
        if name in exclude or path in exclude:
            continue
        if isinstance(child, nn.Linear):
            # names the layer when a weight holds NaN/inf
            check_float_tensor(child.weight, f"{path}.weight")
            setattr(
                model, name, QuantizedLinear.from_linear(child, method, block_size, double_quant)
            )
        else:
            replace_linear_with_quantized(
                child, method, block_size, exclude, double_quant, f"{path}."
            )
    return model


def quantization_error(w: torch.Tensor, method: str, block_size: int = 64) -> dict[str, float]:
    """Frobenius and nuclear norms of ``W - Q(W)`` for a 2-D weight (computed in float64).

    PiSSA (Meng et al., 2024, section 3.3, QPiSSA) compares this error for the full weight with that
    of the residual ``W_res = W - A B`` left after removing the principal singular components.
    """
    check_method(method)
    check_float_tensor(w)
    if w.ndim != 2:
        raise UserError(f"w must be a 2-D weight matrix, got shape {tuple(w.shape)}")
    if method == "nf4":
        restored = dequantize_nf4(*quantize_nf4(w, block_size), w.shape, block_size)
    else:
        restored = dequantize_int8_blockwise(
            *quantize_int8_blockwise(w, block_size), w.shape, block_size
        )
    error = w.detach().double() - restored.double()
    # matrix_norm("nuc") is ~50x slower here
    return {
        "frobenius": torch.linalg.matrix_norm(error, "fro").item(),
        "nuclear": torch.linalg.svdvals(error).sum().item(),
    }


def model_storage_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (shared tensors counted once): fp32 vs int8 vs nf4
    models."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
