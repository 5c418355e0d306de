"""Architecture config of the albor decoder (`ModelConfig`), kept apart from any run config.

Shape rules that a person can get wrong (heads not dividing the width, ...) are reported by
`ModelConfig.problems()` rather than rejected at construction, so that `plan` can list every
problem with its fix at once instead of stopping at the first.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _nearest_divisor(n: int, target: int, *, even_quotient: bool = False) -> int:
    """The divisor of `n` closest to `target` (optionally one leaving an even quotient)."""
    candidates = [d for d in _divisors(n) if not even_quotient or (n // d) % 2 == 0]
    if not candidates:
        return 1
    return min(candidates, key=lambda d: (abs(d - target), -d))


class ModelConfig(BaseModel):
    """Shape and numerics of a Llama/Qwen2-style decoder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(description="Number of token ids (must match the tokenizer).")
    hidden_size: int = Field(description="Width of the residual stream (d_model).")
    num_layers: int = Field(description="Number of transformer blocks.")
    num_heads: int = Field(description="Number of query heads; must divide hidden_size.")
    num_kv_heads: int = Field(
        description="Number of key/value heads (grouped-query attention); must divide num_heads."
    )
    intermediate_size: int = Field(description="Hidden width of the SwiGLU MLP.")
    max_seq_len: int = Field(description="Context length in tokens (max_position_embeddings).")
    rope_theta: float = Field(default=10000.0, description="RoPE base frequency.")
    rms_norm_eps: float = Field(default=1e-5, description="Epsilon inside RMSNorm.")
    tie_embeddings: bool = Field(
        default=True, description="Share the input embedding matrix with the output head."
    )
    qkv_bias: bool = Field(
        default=False, description="Bias on the q/k/v projections (Qwen2 style) when true."
    )
    init_std: float = Field(default=0.02, description="Std of the normal weight initialisation.")

    @property
    def head_dim(self) -> int:
        """Width of one attention head (hidden_size // num_heads)."""
        return self.hidden_size // self.num_heads if self.num_heads > 0 else 0

    def problems(self) -> list[str]:
        """Human-readable reasons this config cannot be built, each with a fix; empty if valid."""
        out: list[str] = []
        sizes = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "max_seq_len": self.max_seq_len,
        }
        for name, value in sizes.items():
            if value <= 0:
                out.append(f"{name} is {value}: it must be a positive integer")
        for name, fvalue in (("rope_theta", self.rope_theta), ("rms_norm_eps", self.rms_norm_eps)):
            if not fvalue > 0:
                out.append(f"{name} is {fvalue}: it must be positive")
        if self.init_std < 0:
            out.append(f"init_std is {self.init_std}: it must be zero or positive")
        if self.hidden_size <= 0 or self.num_heads <= 0:
            return out  # the divisibility rules below are meaningless without positive sizes
        if self.hidden_size % self.num_heads != 0:
            fix = _nearest_divisor(self.hidden_size, self.num_heads)
            out.append(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}: "
                f"choose num_heads dividing {self.hidden_size} (e.g. {fix})"
            )
        elif self.head_dim % 2 != 0:
            fix = _nearest_divisor(self.hidden_size, self.num_heads, even_quotient=True)
            out.append(
                f"head_dim {self.head_dim} (hidden_size {self.hidden_size} / num_heads "
                f"{self.num_heads}) is odd but RoPE rotates pairs of channels: choose num_heads "
                f"so that hidden_size / num_heads is even (e.g. num_heads {fix})"
            )
        if self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads != 0:
            fix = _nearest_divisor(self.num_heads, self.num_kv_heads)
            out.append(
                f"num_heads {self.num_heads} is not divisible by num_kv_heads "
                f"{self.num_kv_heads}: choose num_kv_heads dividing {self.num_heads} (e.g. {fix})"
            )
        return out
