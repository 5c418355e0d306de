"""The albor decoder: a Llama/Qwen2-style transformer in one file.

RMSNorm, rotary position embeddings (HF's rotate_half convention), grouped-query attention through
`F.scaled_dot_product_attention`, SwiGLU MLP, optional q/k/v bias, tied or untied embeddings.
Parameter names are exactly those of transformers' `LlamaForCausalLM` / `Qwen2ForCausalLM`, so a
state dict is an HF checkpoint as it stands (see `model/hf.py`).

Usage:
    model = GPT(cfg)                      # random init
    logits = model(idx)                   # (B, T, vocab)
    loss = model(idx, targets)            # mean cross-entropy, targets == -100 ignored
    cache = model.new_cache(batch_size=1)
    logits = model(prompt, cache=cache)   # prefill, then one token at a time with the same cache
    # batched decoding: left-padded rows, their own positions, padding slots masked out
    logits = model(ids, cache=cache, positions=pos, key_mask=real, last_only=True)

To count parameters without memory: `with torch.device("meta"): GPT(cfg)`. To materialise such a
model: `model.to_empty(device=d)` then `model.init_weights()`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from albor.errors import ConfigError
from albor.model.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, as HF's LlamaRMSNorm, so logits match in bf16 too."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_at(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (*positions.shape, head_dim) for integer `positions`, computed in fp32.

    Computed per call rather than stored as buffers: it costs O(T * head_dim), keeps the state
    dict equal to HF's, and needs no special care on the meta device.
    """
    hd = cfg.head_dim
    arange = torch.arange(0, hd, 2, dtype=torch.int64, device=positions.device)
    inv_freq = 1.0 / (cfg.rope_theta ** (arange.float() / hd))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)  # non-interleaved halves, as HF
    return emb.cos(), emb.sin()


def rope_cos_sin(
    cfg: ModelConfig, start: int, length: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (length, head_dim) for positions start..start+length-1."""
    return rope_at(cfg, torch.arange(start, start + length, device=device))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, head_dim) by position: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache:
    """Preallocated keys/values of every layer for `batch_size` sequences of up to `max_len`.

    Layers write their new keys/values at `pos` through `update`; the model calls `advance` once
    all layers have run, so `pos` is the number of tokens already cached. The cache also holds
    the RoPE table of every position of the context: a decoding step looks its rows up instead
    of computing sines and cosines again.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_len = cfg.max_seq_len if max_len is None else max_len
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.cos, self.sin = rope_cos_sin(cfg, 0, cfg.max_seq_len, device)
        self.pos = 0

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, kv_heads, T, head_dim) at the current position; return all keys/values."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens exceed its max_len {self.max_len}")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the sequences at indices `rows` (batched decoding drops finished rows)."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]

    def reset(self) -> None:
        self.pos = 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, kv, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, kv, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        causal = mask is None and T > 1  # without a mask: a fresh sequence, or one new token
        if cache is not None:
            causal = causal and cache.pos == 0
            k, v = cache.update(self.layer_idx, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True
        )
        out: torch.Tensor = self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))
        return out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        out: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return out


class Backbone(nn.Module):
    """The `model.` prefix of HF's names: embeddings, blocks and the final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class GPT(nn.Module):
    """Decoder-only language model; `forward` returns logits, or the loss when given targets."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        problems = cfg.problems()
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))
        self.cfg = cfg
        # Training sets this to keep only each block's input and recompute the block during
        # backward: activation memory of one block instead of all, for about a third more compute.
        self.activation_checkpointing = False
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """Share lm_head with the embedding when tied (again after `to_empty`, which unties)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights; residual projections scaled by 1/sqrt(2 * layers).

        The scaling (GPT-2, nanoGPT) keeps the residual stream's variance from growing with depth,
        since every block adds two projections into it.
        """
        self.tie_weights()
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def num_params(self) -> int:
        """Number of parameters, tied weights counted once."""
        return sum(p.numel() for p in self.parameters())  # parameters() yields shared ones once

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache on this model's device and dtype."""
        w = self.model.embed_tokens.weight
        return KVCache(self.cfg, batch_size, max_len, device=w.device, dtype=w.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        last_only: bool = False,
        reduction: Literal["mean", "sum"] = "mean",
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for `input_ids` (B, T); with `targets` (B, T), the scalar loss.

        The loss is the cross-entropy over positions whose target is not -100, computed in fp32:
        their mean, or with `reduction="sum"` their sum (for callers that normalise by a token
        count of their own, as gradient accumulation over uneven micro-batches does).

        With a `cache`, `input_ids` continue the cached tokens (in cache slots from `cache.pos`)
        and the cache advances by T. Batched decoding of left-padded rows adds `positions`
        (B, T), each row's own RoPE positions, and `key_mask` (B, cache.pos + T), True where a
        slot holds a real token: a query sees the real slots up to its own (a padding query
        sees itself only, so its softmax stays finite; its output is never read). `last_only`
        applies the output head to the last position only: logits (B, 1, vocab).
        """
        T = input_ids.shape[1]
        start = cache.pos if cache is not None else 0
        if positions is None and start + T > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds the context length {self.cfg.max_seq_len}"
            )
        if targets is not None and last_only:
            raise ValueError("last_only gives the last position's logits; a loss needs them all")
        device = input_ids.device
        if cache is not None:  # the cache holds the RoPE table of every position
            where = slice(start, start + T) if positions is None else positions
            cos, sin = cache.cos[where], cache.sin[where]
        else:
            cos, sin = rope_at(
                self.cfg, torch.arange(T, device=device) if positions is None else positions
            )
        if positions is not None:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): one rotation per row
        mask = None
        if key_mask is not None or (start > 0 and T > 1):
            # Slot i of the new tokens is start+i; it sees the slots up to itself.
            q = torch.arange(start, start + T, device=device)[:, None]
            k = torch.arange(start + T, device=device)[None, :]
            mask = k <= q
            if key_mask is not None:
                mask = (mask & (key_mask[:, None, :] | (k == q)))[:, None]
        x = self.model.embed_tokens(input_ids)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.model.layers:
            if recompute:
                x = checkpoint(block, x, cos, sin, cache, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, mask)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        logits: torch.Tensor = self.lm_head(self.model.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(
            logits.float().view(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=-100,
            reduction=reduction,
        )
