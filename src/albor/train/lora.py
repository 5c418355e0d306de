"""LoRA on albor's `GPT`, through peft: injection, the trainable count, merging and peft's format.

peft wraps each targeted `nn.Linear` of the blocks in a `lora.Linear` (the frozen weight W plus
`scaling * B @ A`, B initialised to zero so the adapted model starts as the base). Albor's
parameter names are transformers' Llama / Qwen2 names, so the adapter albor trains is the
adapter peft would train on `AutoModelForCausalLM`: `save_adapter` writes it in peft's layout
(`adapter_config.json`, `adapter_model.safetensors` under `base_model.model.` names), which
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER)` loads.

`merged` folds the adapters into a plain `GPT`: W + scaling * B @ A computed in fp32 and cast to
the base's dtype. Only block projections are targeted, so tied embeddings stay tied.

    inject(model, LoraSpec(targets=("q_proj", "v_proj"), rank=8, alpha=16))
    ...train...
    save_adapter(model, spec, out / "adapter", base_dir)
    save_pretrained(merged(model, torch.bfloat16), ...)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from albor.errors import ArtifactError
from albor.model.config import ModelConfig
from albor.model.gpt import GPT

if TYPE_CHECKING:
    from peft import LoraConfig

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # peft's name for a model's only adapter
# What PeftModel puts before the wrapped model's own parameter names.
PEFT_PREFIX = "base_model.model."
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSpec:
    """Which projections get adapters and how they are shaped and scaled."""

    targets: tuple[str, ...] = LINEAR_TARGETS
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank

    def peft_config(self, base: str | None = None) -> LoraConfig:
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            use_rslora=self.rslora,
            target_modules=list(self.targets),
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=base,
        )


def block_linears(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Name -> (in, out) features of every linear projection of a block (the same in each)."""
    with torch.device("meta"):
        model = GPT(cfg.model_copy(update={"num_layers": 1}))
    return {
        name.rsplit(".", 1)[-1]: (m.in_features, m.out_features)
        for name, m in model.model.layers[0].named_modules()
        if isinstance(m, nn.Linear)
    }


def trainable_count(cfg: ModelConfig, spec: LoraSpec) -> int:
    """Parameters LoRA trains: rank x (in + out) per targeted projection, in every block."""
    found: int = describe(cfg, spec)["trainable_parameters"]
    return found


def spec_problems(cfg: ModelConfig, spec: LoraSpec) -> list[str]:
    """Why `spec` cannot adapt a model of `cfg` (empty: it can), each with the fix."""
    shapes = block_linears(cfg)
    missing = [t for t in spec.targets if t not in shapes]
    if missing:
        return [
            f"targets {', '.join(missing)}: no such projection in the model's blocks; valid "
            f"targets: {', '.join(shapes)} (embeddings and the output head are not adapted)"
        ]
    too_big = [f"{t} ({min(shapes[t])})" for t in spec.targets if spec.rank > min(shapes[t])]
    if too_big:
        return [
            f"rank {spec.rank} exceeds min(in, out) of {', '.join(too_big)}: a LoRA update "
            "cannot have a higher rank than its matrix; lower rank"
        ]
    return []


def inject(model: GPT, spec: LoraSpec) -> GPT:
    """Put LoRA adapters on `spec.targets` of every block of `model` (in place) and freeze every
    other parameter. A is drawn from torch's RNG (seed it first), B is zero."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(spec.peft_config(), model, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def _lora_layers(model: nn.Module) -> list[tuple[str, Any]]:
    from peft.tuners.lora import Linear as LoraLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


@torch.no_grad()
def merged(model: GPT, dtype: torch.dtype = torch.float32) -> GPT:
    """A plain `GPT` with every adapter folded into its weight (fp32 sums, then `dtype`)."""
    deltas: dict[str, torch.Tensor] = {}
    for name, layer in _lora_layers(model):
        a = layer.lora_A[ADAPTER_NAME].weight.float()
        b = layer.lora_B[ADAPTER_NAME].weight.float()
        weight = layer.base_layer.weight.float()
        deltas[f"{name}.weight"] = weight + layer.scaling[ADAPTER_NAME] * (b @ a)
    state: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        state[plain] = deltas.get(plain, t).detach().to(dtype).clone()
    with torch.device("meta"):
        out = GPT(model.cfg)
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # the embedding, shared again by tie_weights
    out.load_state_dict(state, strict=not model.cfg.tie_embeddings, assign=True)
    out.tie_weights()
    return out.eval()


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's saved names (`base_model.model.<name>.lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    found = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    return {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in found.items()}


def save_adapter(model: nn.Module, spec: LoraSpec, directory: Path, base: str) -> list[Path]:
    """Write the adapter in peft's layout into `directory`; `base` names the base model (its
    path, recorded as base_model_name_or_path). Returns the written files."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    spec.peft_config(base).save_pretrained(str(directory))
    weights = directory / ADAPTER_WEIGHTS
    save_file(adapter_state(model), str(weights), metadata={"format": "pt"})
    return [directory / ADAPTER_CONFIG, weights]


def load_adapter(model: GPT, directory: Path) -> GPT:
    """Inject the adapter saved in `directory` (peft's layout) into `model` and load its
    weights; ArtifactError naming what does not fit."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        config = LoraConfig.from_pretrained(str(directory))
        weights = load_file(str(directory / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{directory}: not a readable peft LoRA adapter: {e}") from e
    targets = config.target_modules
    names = tuple(sorted(targets)) if isinstance(targets, set | list) else (str(targets),)
    spec = LoraSpec(names, config.r, int(config.lora_alpha), config.lora_dropout, config.use_rslora)
    inject(model, spec)
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in weights.items()}
    result: Any = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise ArtifactError(
            f"{directory}: the adapter does not fit this model: missing {missing[:3] or 'none'}, "
            f"unexpected {list(result.unexpected_keys)[:3] or 'none'}"
        )
    return model


def describe(cfg: ModelConfig, spec: LoraSpec) -> dict[str, Any]:
    """What the plan and the manifest report of the adapter."""
    shapes = block_linears(cfg)
    per_target = {t: cfg.num_layers * spec.rank * sum(shapes[t]) for t in spec.targets}
    return {
        "targets": list(spec.targets),
        "rank": spec.rank,
        "alpha": spec.alpha,
        "scaling": spec.alpha / (spec.rank**0.5 if spec.rslora else spec.rank),
        "trainable_parameters": sum(per_target.values()),
        "per_target": per_target,
    }


@dataclass(frozen=True)
class AdapterCheckpointer:
    """A finetune's checkpoints: the adapters alone mid-run (with the optimizer, RNG and trainer
    state: `checkpoint.save(trainable_only=True)`); at the end, the artifact: `adapter/` in
    peft's format and the merged model in the base's dtype, each with the base's tokenizer
    files."""

    spec: LoraSpec
    base: Path
    eos_token_id: int
    dtype: str  # the base's: the merged model is written in it
    tokenizer_files: tuple[Path, ...] = ()

    def save(
        self, directory: Path, model: GPT, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> Path:
        from albor.train import checkpoint

        return checkpoint.save(
            directory, model, optimizer, state, eos_token_id=self.eos_token_id, trainable_only=True
        )

    def write(
        self, directory: Path, model: GPT, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        import shutil

        from albor.artifact import atomic_write_json
        from albor.model.hf import save_pretrained
        from albor.model.load import torch_dtype
        from albor.train.checkpoint import STATE_FILE

        del optimizer  # the artifact is the model; resuming reads checkpoints/
        adapter = directory / ADAPTER_DIR
        save_adapter(model, self.spec, adapter, str(self.base))
        plain = merged(model, torch_dtype(self.dtype))
        save_pretrained(plain, plain.cfg, directory, eos_token_id=self.eos_token_id)
        # Both with the tokenizer: the adapter directory is what gets shared on its own (peft
        # users load the tokenizer from it, as `PeftModel.save_pretrained` beside one leaves it).
        for f in self.tokenizer_files:
            shutil.copy2(f, directory / f.name)
            shutil.copy2(f, adapter / f.name)
        atomic_write_json(directory / STATE_FILE, state)
