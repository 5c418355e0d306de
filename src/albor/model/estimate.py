"""Size, compute and memory estimates of a `ModelConfig`, by arithmetic alone (no tensors).

`plan` uses these to say what an apply will cost before anything is allocated. `param_count` is
exact (a test holds it equal to the meta-device model); FLOPs and memory are documented estimates.
"""

from __future__ import annotations

from albor.errors import ConfigError
from albor.model.config import ModelConfig

# precision -> (bytes per weight/gradient, bytes per activation). "*-mixed" is autocast: fp32
# master weights and gradients, half-precision activations (what training does on CUDA).
_PRECISIONS: dict[str, tuple[int, int]] = {
    "fp32": (4, 4),
    "bf16-mixed": (4, 2),
    "fp16-mixed": (4, 2),
    "bf16": (2, 2),
    "fp16": (2, 2),
}
_OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1, "none": 0}  # states per parameter


def _layer_matmul_params(cfg: ModelConfig) -> int:
    """Weights of one block's linear layers (no biases, no norms)."""
    q_out = cfg.num_heads * cfg.head_dim
    kv_out = cfg.num_kv_heads * cfg.head_dim
    attn = cfg.hidden_size * q_out + 2 * cfg.hidden_size * kv_out + q_out * cfg.hidden_size
    return attn + 3 * cfg.hidden_size * cfg.intermediate_size


def param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters of `GPT(cfg)`, tied embeddings counted once."""
    bias = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim if cfg.qkv_bias else 0
    per_layer = _layer_matmul_params(cfg) + bias + 2 * cfg.hidden_size  # + two RMSNorm weights
    embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
    return embeddings + cfg.num_layers * per_layer + cfg.hidden_size  # + final norm


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token at context `seq_len`.

    PaLM (Chowdhery et al. 2022, appendix B) / nanoGPT's `estimate_mfu`:
    `6 * N + 12 * L * H * Q * T`, where N counts the weights that take part in a matmul (the
    blocks' linear layers and the output head, not the embedding lookup), 6 = 2 FLOPs per
    multiply-add forward + 4 backward, and the second term is attention's QK^T and AV products
    (L layers, H query heads of width Q, T = seq_len, the causal half not discounted). Norms,
    activations and softmax are ignored.
    """
    n_matmul = cfg.num_layers * _layer_matmul_params(cfg) + cfg.vocab_size * cfg.hidden_size
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return 6 * n_matmul + attention


def _activation_elements_per_token(cfg: ModelConfig) -> int:
    """Elements one block saves for backward per token, assuming fused (flash-style) attention.

    Norm inputs (2 * hidden), their normed outputs feeding the projections (2 * hidden), q, k, v
    after RoPE and the attention output (2 * hidden + 2 * kv width), the MLP's gate, up, silu(gate)
    and product (4 * intermediate). The T x T attention matrix is not stored by fused SDPA.
    """
    kv = cfg.num_kv_heads * cfg.head_dim
    return 6 * cfg.hidden_size + 2 * kv + 4 * cfg.intermediate_size


def memory_budget(
    cfg: ModelConfig,
    micro_batch: int,
    seq_len: int,
    precision: str = "fp32",
    optimizer: str = "adamw",
    activation_checkpointing: bool = False,
) -> dict[str, int]:
    """Bytes of device memory for one training step: weights, gradients, optimizer, activations.

    `precision`: fp32, bf16-mixed / fp16-mixed (autocast: fp32 weights, gradients and optimizer
    states, half activations), bf16 / fp16 (everything in half). `optimizer`: adamw / adam (2
    states per parameter), sgd (momentum, 1), none. Activations: per block
    `_activation_elements_per_token` per token (only the block input with activation
    checkpointing, plus one block recomputed at a time), plus the final norm input and the
    logits twice (model dtype, and the fp32 copy the loss works on).
    """
    if precision not in _PRECISIONS:
        raise ConfigError(
            f"unknown precision {precision!r}: choose one of {', '.join(_PRECISIONS)}"
        )
    if optimizer not in _OPTIMIZER_STATES:
        raise ConfigError(
            f"unknown optimizer {optimizer!r}: choose one of {', '.join(_OPTIMIZER_STATES)}"
        )
    weight_bytes, act_bytes = _PRECISIONS[precision]
    n = param_count(cfg)
    tokens = micro_batch * seq_len
    per_block = _activation_elements_per_token(cfg)
    if activation_checkpointing:
        blocks = cfg.num_layers * cfg.hidden_size + per_block
    else:
        blocks = cfg.num_layers * per_block
    head = cfg.hidden_size + cfg.vocab_size
    activations = tokens * ((blocks + head) * act_bytes + cfg.vocab_size * 4)
    out = {
        "weights": n * weight_bytes,
        "gradients": n * weight_bytes,
        "optimizer": n * weight_bytes * _OPTIMIZER_STATES[optimizer],
        "activations": activations,
    }
    out["total"] = sum(out.values())
    return out


def format_count(n: int) -> str:
    """Short decimal count: 398509056 -> '398.5M', 1500 -> '1.5K', 12 -> '12'."""
    for scale, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def format_bytes(n: int) -> str:
    """Binary byte size: 1594036224 -> '1.48 GiB', 512 -> '512 B'."""
    if abs(n) < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"
