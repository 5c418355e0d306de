"""The tensors of a GGUF file: llama.cpp's names, the shapes a config implies, the ggml type each
tensor gets for a file type, and the file's size. Pure (no gguf import), so `plan` can size an
export from config.json alone; `albor.model.gguf` writes what this lays out.

F32, F16, BF16, Q8_0 and Q4_0 are written by albor; for Q4_K_M the types are the ones llama.cpp's
quantizer is expected to choose. A tensor whose rows do not split into its type's blocks (32
values for Q8_0 and Q4_0, 256 for the K-quants) takes llama.cpp's substitute, else F16.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from albor.errors import ArtifactError, ConfigError
from albor.model.config import ModelConfig

WRITTEN_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
"""Types the `gguf` package writes directly."""
LLAMACPP_TYPES = ("q4_k_m",)
"""Types made by llama.cpp's quantizer from an F16 file."""
ALL_TYPES = WRITTEN_TYPES + LLAMACPP_TYPES

# ggml type name -> (values per block, bytes per block): ggml's own table, copied so that `plan`
# can size a file without importing the optional gguf package.
BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q5_0": (32, 22),
    "Q4_K": (256, 144),
    "Q6_K": (256, 210),
}
_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}  # llama.cpp's substitutes for rows not of 256
_ALIGNMENT = 32  # GGUF's default tensor data alignment


_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of a transformers Llama / Qwen2 tensor; ArtifactError if unknown."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"blk.{int(parts[2])}.{_LAYER_NAMES[parts[3]]}"
    raise ArtifactError(f"tensor {hf_name!r} has no llama.cpp name: not a Llama / Qwen2 weight")


def architecture(cfg: ModelConfig) -> str:
    """`qwen2` when q/k/v carry a bias (Qwen2's layout), else `llama`."""
    return "qwen2" if cfg.qkv_bias else "llama"


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape (out, in) of every weight the file holds, in GGUF order."""
    h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        layer: dict[str, tuple[int, ...]] = {
            "input_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q),
            "post_attention_layernorm.weight": (h,),
            "mlp.gate_proj.weight": (inter, h),
            "mlp.up_proj.weight": (inter, h),
            "mlp.down_proj.weight": (h, inter),
        }
        if cfg.qkv_bias:
            layer.update(
                {
                    "self_attn.q_proj.bias": (q,),
                    "self_attn.k_proj.bias": (kv,),
                    "self_attn.v_proj.bias": (kv,),
                }
            )
        shapes.update({p + k: v for k, v in layer.items()})
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a GGUF file: names, numpy shape (out, in), ggml type and why, if not the
    file's main type."""

    hf_name: str
    name: str
    shape: tuple[int, ...]
    type: str
    note: str = ""

    @property
    def nbytes(self) -> int:
        per_block, block_bytes = BLOCKS[self.type]
        n = int(np.prod(self.shape))
        return n // per_block * block_bytes


def _use_more_bits(i: int, n: int) -> bool:
    # llama.cpp's rule for the layers whose attn_v / ffn_down Q4_K_M keeps at Q6_K.
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fit(wanted: str, cols: int) -> tuple[str, str]:
    """The type a row of `cols` values can take (llama.cpp's substitutes), and the note."""
    got = wanted
    if cols % BLOCKS[got][0] != 0 and got in _FALLBACK:
        got = _FALLBACK[got]
    if cols % BLOCKS[got][0] != 0:
        got = "F16"
    if got == wanted:
        return got, ""
    return got, f"{cols} values per row, not a multiple of {BLOCKS[wanted][0]}: {got}"


def tensor_plan(cfg: ModelConfig, qtype: str) -> list[TensorEntry]:
    """The tensors of a `qtype` file and their ggml types. For `q4_k_m` the types are what
    llama.cpp's quantizer is expected to choose (the real ones come from the written file)."""
    if qtype not in ALL_TYPES:
        raise ConfigError(f"unknown GGUF type {qtype!r}: choose one of {', '.join(ALL_TYPES)}")
    head = "lm_head.weight" if not cfg.tie_embeddings else "model.embed_tokens.weight"
    entries = []
    for hf_name, shape in expected_shapes(cfg).items():
        name = gguf_name(hf_name)
        if len(shape) == 1 or qtype == "f32":
            entries.append(TensorEntry(hf_name, name, shape, "F32"))
            continue
        cols = shape[-1]
        note = ""
        if qtype == "f16":
            wanted = "F16"
        elif qtype == "bf16":
            wanted = "BF16"
        elif qtype == "q8_0":
            wanted = "Q8_0"
        elif qtype == "q4_0":
            # llama.cpp's quantizer keeps the output head above the file's type; so do we.
            wanted = "Q8_0" if hf_name == head else "Q4_0"
            note = "output head kept at Q8_0" if hf_name == head else ""
        else:
            layer = int(hf_name.split(".")[2]) if hf_name.startswith("model.layers.") else -1
            more = layer >= 0 and _use_more_bits(layer, cfg.num_layers)
            q6 = hf_name == head or (
                more and hf_name.endswith(("v_proj.weight", "down_proj.weight"))
            )
            wanted = "Q6_K" if q6 else "Q4_K"
        got, fit_note = _fit(wanted, cols)
        entries.append(TensorEntry(hf_name, name, shape, got, fit_note or note))
    return entries


def fallbacks(entries: Sequence[TensorEntry]) -> list[str]:
    """The tensors stored in another type than asked because their rows do not split into
    blocks, each as `name (reason)`."""
    return [f"{e.name} ({e.note})" for e in entries if "not a multiple" in e.note]


def estimate_bytes(entries: Sequence[TensorEntry], vocab: Mapping[str, Any] | None = None) -> int:
    """Size of the file: tensor data with alignment, plus tensor infos and the vocabulary."""
    size = 4096  # header and scalar metadata
    for e in entries:
        size += e.nbytes + _ALIGNMENT + len(e.name) + 40
    if vocab is not None:
        size += sum(len(t.encode()) + 12 for t in vocab["tokens"])
        size += sum(len(m.encode()) + 8 for m in vocab["merges"])
    return size
