"""The contracts of weight-only quantization: round-trip error within half a step, exact int4
packing, and quantized linears equal to a linear on the dequantized weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from albor.errors import ConfigError
from albor.model.transforms import quantize as tq

# float32 rounding of w / scale and q * scale: a few ulps of the largest weight.
ULPS = 4 * torch.finfo(torch.float32).eps


def _weight(seed: int, rows: int, cols: int, spread: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * spread
    # Skewed rows and groups (all positive, a large outlier) are where schemes go wrong.
    w[0] = w[0].abs() + spread
    w[-1, -1] = 50 * spread
    return w


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rows=st.integers(1, 12),
    cols=st.integers(1, 70),
    spread=st.floats(1e-4, 1e3),
)
def test_int8_round_trip_within_half_a_step(seed: int, rows: int, cols: int, spread: float) -> None:
    w = _weight(seed, rows, cols, spread)
    q, scales = tq.int8_quantize(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scales.shape == (rows,)
    assert int(q.abs().max()) <= 127
    err = (tq.int8_dequantize(q, scales) - w).abs()
    bound = scales[:, None] / 2 + ULPS * w.abs().amax(1, keepdim=True)
    assert bool((err <= bound).all())
    # The largest weight of a row is a level exactly: the scale is max|row| / 127.
    assert torch.allclose(scales, w.abs().amax(1) / 127)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rows=st.integers(1, 8),
    groups=st.integers(1, 4),
    group_size=st.sampled_from([32, 128]),
    spread=st.floats(1e-4, 1e3),
)
def test_int4_group_round_trip_within_half_a_step(
    seed: int, rows: int, groups: int, group_size: int, spread: float
) -> None:
    w = _weight(seed, rows, groups * group_size, spread)
    packed, scales, mins = tq.int4_quantize(w, group_size)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, groups * group_size // 2)
    assert scales.shape == mins.shape == (rows, groups)
    back = tq.int4_dequantize(packed, scales, mins, group_size)
    err = (back - w).abs().reshape(rows, groups, group_size)
    magnitude = w.abs().reshape(rows, groups, group_size).amax(-1, keepdim=True)
    assert bool((err <= scales[..., None] / 2 + ULPS * 16 * magnitude).all())
    # Asymmetric: each group's min and max are levels, so the 16 levels span the group.
    grouped = w.reshape(rows, groups, group_size)
    assert torch.allclose(mins, grouped.amin(-1))
    assert torch.allclose(scales, (grouped.amax(-1) - grouped.amin(-1)) / 15)


def test_constant_rows_and_groups_are_exact() -> None:
    w = torch.zeros(3, 64)
    w[1] = 0.25
    q, scales = tq.int8_quantize(torch.zeros(2, 8))
    assert bool((q == 0).all()) and bool((scales == 1).all())
    packed, scales, mins = tq.int4_quantize(w, 32)
    assert torch.equal(tq.int4_dequantize(packed, scales, mins, 32), w)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 9), half=st.integers(1, 40))
def test_int4_pack_unpack_is_exact(seed: int, rows: int, half: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, 2 * half), generator=g, dtype=torch.uint8)
    packed = tq.pack_int4(q)
    assert packed.shape == (rows, half) and packed.dtype == torch.uint8
    assert torch.equal(tq.unpack_int4(packed), q)
    assert torch.equal(packed[:, 0] & 0x0F, q[:, 0])  # the even input in the low nibble


# 1 x 3 rows take the fused kernels (decoding), 5 x 7 the dequantized matmul (prefill).
SHAPES = [(1, 3), (5, 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", SHAPES)
def test_int8_linear_equals_linear_on_dequantized_weight(
    dtype: torch.dtype, fused: bool, bias: bool, lead: tuple[int, int]
) -> None:
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(48, 64, generator=g), torch.randn(*lead, 64, generator=g)
    b = torch.randn(48, generator=g) if bias else None
    q, scales = tq.int8_quantize(w)
    want = F.linear(x, tq.int8_dequantize(q, scales), b)
    bias_ = b.to(dtype) if b is not None else None
    got = tq.int8_linear(x.to(dtype), q, scales, bias_, fused=fused)
    assert got.dtype == dtype and got.shape == (*lead, 48)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("lead", SHAPES)
def test_int4_linear_equals_linear_on_dequantized_weight(
    group_size: int, kernel: bool, lead: tuple[int, int]
) -> None:
    assert tq.int4_kernel_fits(48) and not tq.int4_kernel_fits(40)  # torch 2.13 on the CPU
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(48, 256, generator=g), torch.randn(*lead, 256, generator=g)
    b = torch.randn(48, generator=g)
    packed, scales, mins = tq.int4_quantize(w, group_size)
    want = F.linear(x, tq.int4_dequantize(packed, scales, mins, group_size), b)
    weights = tq.int4_kernel_weights(packed, scales, mins) if kernel else None
    got = tq.int4_linear(x, packed, scales, mins, group_size, b, kernel=weights)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("lead", SHAPES)
def test_int4_linear_keeps_a_16_bit_input_dtype_and_takes_no_bias(
    kernel: bool, lead: tuple[int, int]
) -> None:
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(32, 64, generator=g), torch.randn(*lead, 64, generator=g)
    packed, scales, mins = tq.int4_quantize(w, 32)
    want = F.linear(x, tq.int4_dequantize(packed, scales, mins, 32))
    weights = tq.int4_kernel_weights(packed, scales, mins) if kernel else None
    torch.testing.assert_close(
        tq.int4_linear(x, packed, scales, mins, 32, kernel=weights), want, atol=1e-4, rtol=1e-4
    )
    got = tq.int4_linear(x.bfloat16(), packed, scales, mins, 32, kernel=weights)
    assert got.dtype == torch.bfloat16 and got.shape == (*lead, 32)
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)


def test_int8_linear_runs_the_fused_kernel_to_decode_and_dequantizes_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fused kernel for at most FUSED_MAX_ROWS rows of a CPU float32 / bfloat16 / float16
    input (decoding), the dequantized weight for more rows (prefill) or another dtype; the result
    is the same linear either way."""
    rows_seen: list[int] = []
    fused_kernel = torch._weight_int8pack_mm

    def spy(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        rows_seen.append(x.shape[0])
        return fused_kernel(x, q, scales)

    monkeypatch.setattr(torch, "_weight_int8pack_mm", spy)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 64, generator=g)
    q, scales = tq.int8_quantize(w)
    cases = [
        ((tq.FUSED_MAX_ROWS, 64), torch.float32, {}, [tq.FUSED_MAX_ROWS]),
        ((1, 3, 64), torch.bfloat16, {}, [3]),
        ((1, 64), torch.float16, {"fused": True}, [1]),
        ((tq.FUSED_MAX_ROWS + 1, 64), torch.float32, {}, []),
        ((2, 8, 64), torch.float32, {}, []),
        ((1, 64), torch.float64, {}, []),
        ((1, 64), torch.float32, {"fused": False}, []),
    ]
    for shape, dtype, kw, want in cases:
        rows_seen.clear()
        x = torch.randn(*shape, generator=g).to(dtype)
        got = tq.int8_linear(x, q, scales, **kw)
        assert rows_seen == want, (shape, dtype, kw)
        assert got.dtype == dtype and got.shape == (*shape[:-1], 16)
        expected = F.linear(x.double(), tq.int8_dequantize(q, scales).double())
        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 0.1
        torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)


def test_group_size_that_does_not_divide_names_the_tensor_and_fix() -> None:
    with pytest.raises(ConfigError, match=r"mlp.down_proj.weight: 176 inputs .* groups of 32"):
        tq.check_group_size(176, 32, "mlp.down_proj.weight")
    with pytest.raises(ConfigError, match=r"^weight: 176 inputs.*group_size dividing 176"):
        tq.int4_quantize(torch.zeros(2, 176), 32)
    tq.check_group_size(64, 2)  # the smallest group: two values, one byte
    for bad in (0, -2, 3, 33):
        with pytest.raises(ConfigError, match=f"group_size {bad} must be a positive even number"):
            tq.check_group_size(64, bad)
