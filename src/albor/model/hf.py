"""The Hugging Face adapter: `config.json` <-> `ModelConfig`, and safetensors checkpoints.

Our parameter names already are transformers' `LlamaForCausalLM` / `Qwen2ForCausalLM` names, so
saving is a copy of the state dict (the tied `lm_head.weight` left out, as transformers does) plus
a `config.json`; the result loads with `AutoModelForCausalLM.from_pretrained(dir)`. Loading
accepts such directories, single-file or sharded (`model.safetensors.index.json`), from albor or
from transformers. Weights are read only through safetensors.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from albor.errors import ArtifactError
from albor.model.config import ModelConfig
from albor.model.gpt import GPT

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Tensors some HF checkpoints carry that are recomputed, not learned.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def to_hf_config(
    cfg: ModelConfig,
    *,
    eos_token_id: int,
    bos_token_id: int | None = None,
    pad_token_id: int | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """The `config.json` dict transformers needs: Llama without qkv bias, Qwen2 with it."""
    model_type = "qwen2" if cfg.qkv_bias else "llama"
    d: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.rms_norm_eps,
        # transformers 5 reads rope_parameters; older readers (and llama.cpp) read rope_theta.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": dtype,
        "torch_dtype": dtype,  # the name transformers 4 reads
    }
    if model_type == "llama":
        d.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    return d


def from_hf_config(d: Mapping[str, Any]) -> ModelConfig:
    """A `ModelConfig` from a Llama or Qwen2 `config.json` dict; ArtifactError if unsupported."""
    model_type = d.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise ArtifactError(
            f"config.json has model_type {model_type!r}: albor loads only "
            f"{' and '.join(sorted(_ARCHITECTURES))} models"
        )
    required = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
    )
    missing = [k for k in required if k not in d]
    if missing:
        raise ArtifactError(f"config.json lacks required keys: {', '.join(missing)}")
    unsupported = []
    if d.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {d['hidden_act']!r} (only silu)")
    if model_type == "llama" and (d.get("attention_bias") or d.get("mlp_bias")):
        unsupported.append("attention_bias/mlp_bias (bias on o_proj or the MLP)")
    if d.get("use_sliding_window"):
        unsupported.append("use_sliding_window")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        unsupported.append(f"rope_type {rope_type!r} (only default RoPE)")
    heads, hidden = d["num_attention_heads"], d["hidden_size"]
    head_dim = d.get("head_dim")
    if head_dim is not None and heads and head_dim * heads != hidden:
        unsupported.append(f"head_dim {head_dim} != hidden_size / num_attention_heads")
    if unsupported:
        raise ArtifactError(f"config.json uses unsupported features: {'; '.join(unsupported)}")
    try:
        return ModelConfig(
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            intermediate_size=d["intermediate_size"],
            max_seq_len=d["max_position_embeddings"],
            rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),  # transformers' default for both types
            tie_embeddings=d.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2",  # Qwen2 always has q/k/v bias
            init_std=d.get("initializer_range", 0.02),
        )
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise ArtifactError(f"config.json has invalid values: {e}") from e


def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call `write(tmp_path)` then rename onto `path`, so readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors under HF names; the tied lm_head left out (it aliases embed)."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        out[name] = t.detach().to("cpu").contiguous()
    return out


def save_pretrained(
    model: GPT,
    cfg: ModelConfig,
    out_dir: str | os.PathLike[str],
    *,
    eos_token_id: int,
    bos_token_id: int | None = None,
    pad_token_id: int | None = None,
    max_shard_bytes: int | None = None,
) -> list[Path]:
    """Write `config.json` and `model.safetensors` (or shards + index) into `out_dir`.

    Returns the written paths. `max_shard_bytes` splits the weights into
    `model-0000i-of-0000n.safetensors` files with a `model.safetensors.index.json`, as
    transformers does for large models.
    """
    if cfg != model.cfg:
        raise ArtifactError("save_pretrained: cfg differs from the model's own config")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = export_state_dict(model)
    dtype = _DTYPE_NAMES.get(next(iter(tensors.values())).dtype, "float32")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    written: list[Path] = []
    meta = {"format": "pt"}
    if len(shards) == 1:
        names = [WEIGHTS_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(names, shards, strict=True):
        path = out / fname
        _atomic_write(path, functools.partial(save_file, shard, metadata=meta))
        written.append(path)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: f for f, s in zip(names, shards, strict=True) for k in s},
        }
        written.append(_write_json(out / INDEX_FILE, index))
    hf = to_hf_config(
        cfg,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
        pad_token_id=pad_token_id,
        dtype=dtype,
    )
    written.append(_write_json(out / CONFIG_FILE, hf))
    return written


def _write_json(path: Path, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def load_config(directory: str | os.PathLike[str]) -> ModelConfig:
    """The `ModelConfig` of a checkpoint directory, from its `config.json`."""
    path = Path(directory) / CONFIG_FILE
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ArtifactError(f"{path} not found: is {directory} a model directory?") from e
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from e
    return from_hf_config(d)


def weight_files(directory: Path) -> dict[str, list[str]]:
    """Safetensors file -> tensor names, from the index when sharded."""
    single, index = directory / WEIGHTS_FILE, directory / INDEX_FILE
    if single.exists():
        with safe_open(str(single), framework="pt") as f:
            return {WEIGHTS_FILE: list(f.keys())}
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ArtifactError(f"{index} is not a valid safetensors index: {e}") from e
        files: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            files.setdefault(fname, []).append(name)
        return files
    raise ArtifactError(
        f"no weights in {directory}: expected {WEIGHTS_FILE} or {INDEX_FILE} "
        "(only safetensors checkpoints are loaded)"
    )


def load_pretrained(
    directory: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[GPT, ModelConfig]:
    """Build the model of a `config.json` + safetensors directory, in eval mode.

    Every parameter must be present with the right shape and nothing else may be (ArtifactError
    naming the tensors); a tied checkpoint may carry an `lm_head.weight` equal to the embedding.
    """
    directory = Path(directory)
    cfg = load_config(directory)
    with torch.device("meta"):
        model = GPT(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        del expected["lm_head.weight"]
    state: dict[str, torch.Tensor] = {}
    extra_head: torch.Tensor | None = None
    for fname, names in weight_files(directory).items():
        path = directory / fname
        if not path.exists():
            raise ArtifactError(f"{path} is named in {INDEX_FILE} but missing")
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in names:
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name == "lm_head.weight" and cfg.tie_embeddings:
                    extra_head = f.get_tensor(name)
                    continue
                state[name] = f.get_tensor(name).to(dtype)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"weights in {directory} do not match config.json: "
            f"missing {missing or 'none'}, unexpected {unexpected or 'none'}"
        )
    wrong = [
        f"{k} {tuple(t.shape)} (expected {expected[k]})"
        for k, t in state.items()
        if tuple(t.shape) != expected[k]
    ]
    if wrong:
        raise ArtifactError(f"tensors in {directory} have wrong shapes: {', '.join(wrong)}")
    embed = state["model.embed_tokens.weight"]
    if extra_head is not None and not torch.equal(extra_head.to(dtype), embed):
        raise ArtifactError(
            f"{directory}: config.json says tie_word_embeddings but lm_head.weight differs from "
            "model.embed_tokens.weight; set tie_word_embeddings to false"
        )
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # assign=True replaced the embedding Parameter; re-share it
    return model.eval(), cfg
