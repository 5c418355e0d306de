"""Weight-only quantization: int8 per output channel and int4 in groups along the input.

Pure functions over tensors; nothing here reads or writes a file (`albor.model.quantized` stores
and loads quantized checkpoints, `albor.stages.quantize` makes and measures them).

- int8, symmetric per output row: scale = max|row| / 127, q = round(w / scale) in [-127, 127].
  Symmetric because a weight row of a trained model is centred on zero, and a zero point would
  cost a subtraction per weight for nothing.
- int4, asymmetric per group of `group_size` (32 or 128) consecutive inputs of a row:
  scale = (max - min) / 15, q = round((w - min) / scale) in [0, 15], w' = q · scale + min.
  Asymmetric because a group of 32 weights is rarely centred: the 16 levels then span the
  group's own range (symmetric int4 spends one of its 16 levels on -8, which only the most
  negative weight can use, and half the range on a sign the group may hardly have). torch's
  CPU int4 kernel takes a scale and a zero per group anyway, so the zero point costs nothing.
  Two values are packed per byte, the even input in the low nibble.
- A row (or group) whose weights are all equal gets scale 1 (int8: its weights are all zero)
  so that the round trip is exact there instead of dividing by zero.

Round-trip error: at most scale / 2 per element, up to float rounding (the tests' contract).

The forward pass, measured on this CPU (2 cores, AVX-512, torch 2.13; the demo model's FFN
matrix, 768 x 256, ms per call; `benchmarks/quantize.py` times whole-model decoding):

    rows    fp32    int8 fused  int8 dequantized  int4 fused  int4 dequantized
    1       0.018   0.083       0.241             0.177       0.420
    16      0.078   1.369       0.330             2.762       0.449
    2048    4.561   173.6       4.329             347.1       4.376

torch's fused kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) are matrix-vector
kernels: the fastest way to decode a token, and ruinous for a prefill or a scoring batch. So
`int8_linear` / `int4_linear` use them for at most `FUSED_MAX_ROWS` rows on the CPU (float32,
bfloat16, float16) and otherwise dequantize the weight and run one matmul. Whole-model decode,
ms/token (`benchmarks/quantize.py`, median of interleaved runs):

    model   fp32   int8 fused  int8 dequantized  torchao int8  int4 fused  int4 dequantized
    demo    2.52   2.66        2.32              2.22          4.39        4.16
    50m     20.4   25.8        54.1              34.8          41.0        67.1

On the demo model (whose fp32 weights fit in the CPU's caches) the three int8 paths are within
run-to-run noise of each other, and so are the two int4 paths; at 50m the fused kernels are
2x faster than dequantizing, and torchao 0.18 (it installs alone and its int8 weight-only runs
here) is slower than them and does not export its int4 CPU layout: albor uses plain PyTorch.
On this CPU a weight-only quantized model decodes slower than fp32 (MKL's fp32 matrix-vector
product is that good): int8 / int4 buy memory and disk here, not time. The int4 linear keeps
its stored form beside the kernel's copy (prefill and scoring dequantize the stored form), so
its resident bytes exceed int8's where the kernel runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from albor.errors import ConfigError

INT8_MAX = 127
INT4_LEVELS = 15
GROUP_SIZES = (32, 128)
# torch's int4 kernel reads each weight as (q - 8) · scale + zero.
_INT4_KERNEL_OFFSET = 8
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FUSED_MAX_ROWS = 8
"""Rows up to which the fused kernels run (decoding); beyond, dequantize and matmul (see above:
at 16 rows the fused kernels are already 4 to 6 times slower)."""


def _safe_scale(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _fits(x: torch.Tensor) -> bool:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES and rows <= FUSED_MAX_ROWS


# ---------------------------------------------------------------------------------------------
# int8, per output channel


def int8_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), scales float32 (out,)) of a float weight (out, in)."""
    w = weight.detach().float()
    scale = _safe_scale(w.abs().amax(dim=1) / INT8_MAX)
    q = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def int8_dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weight (out, in) that `int8_quantize` stands for."""
    return q.float() * scales.float()[:, None]


def int8_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    fused: bool = True,
) -> torch.Tensor:
    """x @ dequant(q, scales).T + bias, in x's dtype; torch's fused int8 kernel when `fused`
    and it applies (a CPU tensor of a float dtype), else the dequantized weight."""
    if fused and _fits(x):
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), q, scales.to(x.dtype))
        y = y.reshape(*shape[:-1], q.shape[0])
        return y + bias if bias is not None else y
    return F.linear(x, int8_dequantize(q, scales).to(x.dtype), bias)


# ---------------------------------------------------------------------------------------------
# int4, groups along the input


def check_group_size(in_features: int, group_size: int, name: str = "weight") -> None:
    """ConfigError naming the tensor when its inputs do not split into groups (or are odd)."""
    if group_size <= 0 or group_size % 2:
        raise ConfigError(f"int4 group_size {group_size} must be a positive even number")
    if in_features % group_size:
        raise ConfigError(
            f"{name}: {in_features} inputs do not split into groups of {group_size}: choose a "
            f"group_size dividing {in_features}, or leave int4 out of variants"
        )


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Values 0..15 (out, in) with even `in` -> uint8 (out, in / 2), the even input in the low
    nibble."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: uint8 (out, in) of values 0..15."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def int4_quantize(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 (out, in / 2), scales float32 (out, in / g), mins float32 (out, in / g))."""
    out_f, in_f = weight.shape
    check_group_size(in_f, group_size)
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    low = w.amin(dim=-1)
    scale = _safe_scale((w.amax(dim=-1) - low) / INT4_LEVELS)
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, INT4_LEVELS)
    return pack_int4(q.reshape(out_f, in_f)), scale, low


def int4_dequantize(
    packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int
) -> torch.Tensor:
    """The float32 weight (out, in) that `int4_quantize` stands for."""
    q = unpack_int4(packed).float()
    out_f, in_f = q.shape
    w = q.reshape(out_f, in_f // group_size, group_size) * scales[..., None] + mins[..., None]
    return w.reshape(out_f, in_f)


def int4_kernel_fits(out_features: int) -> bool:
    """Whether torch's CPU int4 kernel exists here and takes a weight of `out_features` rows
    (its packing needs a multiple of 16)."""
    return (
        out_features % 16 == 0
        and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")
    )


def int4_kernel_weights(
    packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same weight in the layout of torch's CPU int4 kernel: its own packing of the values,
    and (in / g, out, 2) scales and zeros with zero = min + 8 · scale."""
    q = unpack_int4(packed).to(torch.int32)
    kernel_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    zeros = mins + _INT4_KERNEL_OFFSET * scales
    scale_zero = torch.stack([scales.t(), zeros.t()], dim=-1).contiguous()
    return kernel_packed, scale_zero


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    kernel: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """x @ dequant(packed, scales, mins).T + bias, in x's dtype; with `kernel` (what
    `int4_kernel_weights` returned) and a CPU float input, torch's fused int4 kernel."""
    if kernel is not None and _fits(x):
        kernel_packed, scale_zero = kernel
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]), kernel_packed, group_size, scale_zero.to(x.dtype)
        )
        y = y.reshape(*shape[:-1], packed.shape[0])
        return y + bias if bias is not None else y
    w = int4_dequantize(packed, scales, mins, group_size).to(x.dtype)
    return F.linear(x, w, bias)
