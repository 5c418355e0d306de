"""Named model sizes, from `tiny` (unit tests) to `350m` (the real target).

`preset("350m", max_seq_len=1024)` returns a `ModelConfig` with overrides applied. Sizes follow
Llama proportions (head_dim 64, FFN 4x width with SwiGLU, 4 query heads per KV head) except the
two small ones, which are sized for speed on a CPU.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from albor.errors import ConfigError
from albor.model.config import ModelConfig

PRESETS: dict[str, dict[str, Any]] = {
    # Tests: builds and steps in milliseconds.
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=176,
        max_seq_len=128,
    ),
    # CPU demo: trains in ~8 minutes on 2 cores and picks up plausible Python surface syntax.
    "demo": dict(
        vocab_size=4096,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=768,
        max_seq_len=256,
    ),
    "50m": dict(
        vocab_size=32768,
        hidden_size=512,
        num_layers=9,
        num_heads=8,
        num_kv_heads=2,
        intermediate_size=2048,
        max_seq_len=2048,
    ),
    "125m": dict(
        vocab_size=32768,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=3,
        intermediate_size=3072,
        max_seq_len=2048,
    ),
    "350m": dict(
        vocab_size=32768,
        hidden_size=1024,
        num_layers=24,
        num_heads=16,
        num_kv_heads=4,
        intermediate_size=4096,
        max_seq_len=2048,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of preset `name` with `overrides` applied (unknown keys are errors)."""
    if name not in PRESETS:
        raise ConfigError(
            f"unknown model preset {name!r}: choose one of {', '.join(sorted(PRESETS))}"
        )
    unknown = sorted(set(overrides) - set(ModelConfig.model_fields))
    if unknown:
        raise ConfigError(
            f"unknown model setting(s) {', '.join(unknown)}: valid ones are "
            f"{', '.join(ModelConfig.model_fields)}"
        )
    try:
        return ModelConfig(**{**PRESETS[name], **overrides})
    except ValidationError as e:
        details = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid override for model preset {name!r}: {details}") from e
