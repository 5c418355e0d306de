"""Estimates: exact parameter counts for every shape option, and sane FLOPs / memory figures."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from albor.errors import ConfigError
from albor.model.estimate import (
    flops_per_token,
    format_bytes,
    format_count,
    memory_budget,
    param_count,
)
from albor.model.gpt import GPT
from albor.model.presets import PRESETS, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("tied,bias", [(True, False), (False, True)])
def test_param_count_equals_meta_model(name: str, tied: bool, bias: bool) -> None:
    cfg = preset(name, tie_embeddings=tied, qkv_bias=bias)
    with torch.device("meta"):
        model = GPT(cfg)
    assert param_count(cfg) == model.num_params()


def test_flops_follow_the_palm_formula() -> None:
    cfg = preset("350m")
    n_matmul = param_count(cfg) - 24 * 2 * 1024 - 1024  # tied: embedding = lm_head; minus norms
    assert flops_per_token(cfg, 2048) == 6 * n_matmul + 12 * 24 * 16 * 64 * 2048
    assert flops_per_token(cfg, 4096) > flops_per_token(cfg, 2048)


def test_memory_budget_parts() -> None:
    cfg = preset("350m")
    n = param_count(cfg)
    fp32 = memory_budget(cfg, micro_batch=4, seq_len=2048)
    assert fp32["weights"] == fp32["gradients"] == 4 * n
    assert fp32["optimizer"] == 8 * n
    assert fp32["total"] == sum(v for k, v in fp32.items() if k != "total")
    ckpt = memory_budget(cfg, 4, 2048, activation_checkpointing=True)
    assert ckpt["activations"] < fp32["activations"]
    mixed = memory_budget(cfg, 4, 2048, precision="bf16-mixed")
    assert mixed["weights"] == fp32["weights"] and mixed["activations"] < fp32["activations"]
    assert memory_budget(cfg, 8, 2048)["activations"] == 2 * fp32["activations"]
    assert memory_budget(cfg, 4, 2048, optimizer="sgd")["optimizer"] == 4 * n
    with pytest.raises(ConfigError, match="precision"):
        memory_budget(cfg, 1, 16, precision="fp8")
    with pytest.raises(ConfigError, match="optimizer"):
        memory_budget(cfg, 1, 16, optimizer="lion")


def test_formatting() -> None:
    assert format_count(398_509_056) == "398.5M"
    assert format_count(125_248) == "125.2K"
    assert format_count(7) == "7"
    assert format_count(1_500_000_000) == "1.5B"
    assert format_bytes(398_509_056 * 4) == "1.48 GiB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"


@given(st.integers(min_value=0, max_value=2**60))
def test_format_bytes_is_never_more_than_4_digits_before_the_point(n: int) -> None:
    number, unit = format_bytes(n).split(" ")
    assert unit in {"B", "KiB", "MiB", "GiB", "TiB"}
    assert len(number.split(".")[0]) <= 4 or unit == "TiB"
