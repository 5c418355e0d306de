"""Presets and ModelConfig.problems(): sizes are what they claim, bad shapes explain the fix."""

from __future__ import annotations

import pytest
import torch

from albor.errors import ConfigError
from albor.model.config import ModelConfig
from albor.model.estimate import format_count, param_count
from albor.model.gpt import GPT
from albor.model.presets import PRESETS, preset


def test_350m_is_398_5m_by_arithmetic_and_by_meta_model() -> None:
    cfg = preset("350m")
    assert param_count(cfg) == 398_509_056
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == 398_509_056
    assert format_count(model.num_params()) == "398.5M"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid(name: str) -> None:
    assert preset(name).problems() == []


def test_unknown_preset_lists_the_names() -> None:
    with pytest.raises(ConfigError, match="tiny"):
        preset("huge")


def test_overrides_apply_and_unknown_keys_are_errors() -> None:
    assert preset("tiny", max_seq_len=64).max_seq_len == 64
    with pytest.raises(ConfigError, match=r"unknown model setting.*hiden_size.*hidden_size"):
        preset("tiny", hiden_size=3)
    with pytest.raises(ConfigError, match="hidden_size: Input should be a valid integer"):
        preset("tiny", hidden_size="wide")


def _cfg(**kw: object) -> ModelConfig:
    return ModelConfig(**{**PRESETS["tiny"], **kw})


def test_heads_not_dividing_width() -> None:
    (msg,) = _cfg(hidden_size=100, num_heads=3, num_kv_heads=1).problems()
    assert msg == (
        "hidden_size 100 is not divisible by num_heads 3: choose num_heads dividing 100 (e.g. 4)"
    )


def test_kv_heads_not_dividing_heads() -> None:
    (msg,) = _cfg(num_kv_heads=3).problems()
    assert "num_heads 4 is not divisible by num_kv_heads 3" in msg
    assert "e.g. 4" in msg or "e.g. 2" in msg


def test_odd_head_dim_is_rejected_for_rope() -> None:
    (msg,) = _cfg(hidden_size=60, num_heads=4, num_kv_heads=2).problems()
    assert "head_dim 15" in msg and "RoPE" in msg and "even" in msg


def test_non_positive_sizes() -> None:
    problems = _cfg(num_layers=0, vocab_size=-1).problems()
    assert any(p.startswith("num_layers is 0") for p in problems)
    assert any(p.startswith("vocab_size is -1") for p in problems)


def test_config_is_frozen_and_strict() -> None:
    cfg = preset("tiny")
    with pytest.raises(ValueError):
        cfg.hidden_size = 3  # type: ignore[misc, unused-ignore]
    with pytest.raises(ValueError):
        ModelConfig(**PRESETS["tiny"], dropout=0.1)


def test_gpt_refuses_invalid_config() -> None:
    with pytest.raises(ConfigError, match="num_kv_heads"):
        GPT(_cfg(num_kv_heads=3))
