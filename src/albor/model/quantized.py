"""Quantized checkpoints for albor's engine: int8 / int4 weight-only linears, saved and loaded.

The directory is a checkpoint dir as pretrain writes one, with two differences:

- `config.json` carries a `quantization` entry: `{"method": "int8" | "int4", "bits": 8 | 4,
  "group_size": null | 32 | 128, "modules": [...]}`, `modules` naming the quantized linears
  (every q/k/v/o and gate/up/down projection of the blocks);
- `model.safetensors` holds, for each of them, `NAME.qweight` (int8 (out, in), or int4 packed
  two per byte as uint8 (out, in / 2)), `NAME.scales` and for int4 `NAME.mins` (float32), and
  every other tensor (embedding, norms, untied output head) as the full model had it.

The embedding and the output head stay in full precision: on the demo model they are tied, and
the head's logits are what every figure reads; a quantized head would also quantize the lookup
table for nothing (a lookup reads one row per token). The mathematics is
`albor.model.transforms.quantize`; `albor.model.load.load_model` calls `load_quantized` when
config.json has the entry, so `albor complete`, `serve` and `bench` take the directory as is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from albor.errors import ArtifactError
from albor.model.config import ModelConfig
from albor.model.gpt import GPT
from albor.model.hf import CONFIG_FILE, WEIGHTS_FILE, from_hf_config
from albor.model.transforms import quantize as tq

QUANTIZATION_KEY = "quantization"
Method = Literal["int8", "int4"]
TARGET_SUFFIXES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass(frozen=True)
class Spec:
    """What a quantized checkpoint holds: the method and, for int4, the group size."""

    method: Method
    group_size: int | None = None

    @property
    def bits(self) -> int:
        return 8 if self.method == "int8" else 4

    def to_json(self, modules: list[str]) -> dict[str, Any]:
        return {
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "modules": modules,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: Path) -> Spec:
        method = d.get("method")
        if method not in ("int8", "int4"):
            raise ArtifactError(
                f"{where}: quantization method {method!r} is not int8 or int4 (albor's "
                "weight-only formats): re-make the directory with the quantize stage"
            )
        group = d.get("group_size")
        if method == "int4" and not isinstance(group, int):
            raise ArtifactError(f"{where}: int4 quantization without an integer group_size")
        return cls(method, group if method == "int4" else None)


def target_modules(model: GPT) -> list[str]:
    """The blocks' projection linears that quantization replaces, by module name."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and name.startswith("model.layers.")
        and name.endswith(TARGET_SUFFIXES)
    ]


def check_shapes(cfg: ModelConfig, spec: Spec) -> list[str]:
    """For int4: each projection whose inputs do not split into groups, named with its width."""
    if spec.method != "int4":
        return []
    assert spec.group_size is not None
    with torch.device("meta"):
        model = GPT(cfg)
    odd = []
    for name in target_modules(model):
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        if linear.in_features % spec.group_size:
            odd.append(f"{name}.weight ({linear.in_features} inputs)")
    return odd


class Int8Linear(nn.Module):
    """A linear whose weight is int8 per output row (see `albor.model.transforms.quantize`)."""

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.fused = fused
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.float())
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tq.int8_linear(x, self.qweight, self.scales, self.bias, fused=self.fused)


class Int4Linear(nn.Module):
    """A linear whose weight is int4 in groups along the input; on the CPU with `use_kernel`
    also in the layout of torch's int4 kernel, for decoding."""

    packed: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor

    def __init__(
        self,
        packed: torch.Tensor,
        scales: torch.Tensor,
        mins: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None,
        *,
        use_kernel: bool = True,
    ) -> None:
        super().__init__()
        self.out_features = packed.shape[0]
        self.in_features = packed.shape[1] * 2
        self.group_size = group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales.float())
        self.register_buffer("mins", mins.float())
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.kernel: tuple[torch.Tensor, torch.Tensor] | None = None
        if use_kernel and packed.device.type == "cpu" and tq.int4_kernel_fits(packed.shape[0]):
            # The kernel's copy (the same values in its own order) serves decoding; the stored
            # form stays for prefill and scoring, where dequantizing is faster.
            self.kernel = tq.int4_kernel_weights(packed, self.scales, self.mins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tq.int4_linear(
            x,
            self.packed,
            self.scales,
            self.mins,
            self.group_size,
            self.bias,
            kernel=self.kernel,
        )


def quantize_state(model: GPT, spec: Spec) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of the quantized checkpoint (CPU, contiguous) and the quantized modules."""
    from albor.model.hf import export_state_dict

    modules = target_modules(model)
    state = export_state_dict(model)
    for name in modules:
        weight = state.pop(f"{name}.weight")
        if spec.method == "int8":
            q, scales = tq.int8_quantize(weight)
            state[f"{name}.qweight"], state[f"{name}.scales"] = q, scales
        else:
            assert spec.group_size is not None
            tq.check_group_size(weight.shape[1], spec.group_size, f"{name}.weight")
            packed, scales, mins = tq.int4_quantize(weight, spec.group_size)
            state[f"{name}.qweight"], state[f"{name}.scales"] = packed, scales
            state[f"{name}.mins"] = mins
    return {k: v.contiguous() for k, v in state.items()}, modules


def save_quantized(
    model: GPT, spec: Spec, out: Path, hf_config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Write config.json (`hf_config` plus the quantization entry) and model.safetensors into
    `out`; returns the saved tensors."""
    state, modules = quantize_state(model, spec)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {**hf_config, QUANTIZATION_KEY: spec.to_json(modules)}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return state


def read_spec(directory: Path) -> Spec | None:
    """The quantization of the checkpoint dir, or None for a full-precision one."""
    path = Path(directory) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # not ours to report: the full-precision loader names the problem
    entry = raw.get(QUANTIZATION_KEY) if isinstance(raw, dict) else None
    return Spec.from_json(entry, path) if isinstance(entry, dict) else None


def load_quantized(
    directory: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[GPT, ModelConfig]:
    """The model of a quantized checkpoint dir, its quantized linears in place, in eval mode.
    `dtype` applies to the full-precision tensors and the activations."""
    directory = Path(directory)
    raw = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    spec = Spec.from_json(raw[QUANTIZATION_KEY], directory / CONFIG_FILE)
    cfg = from_hf_config(raw)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {WEIGHTS_FILE} beside the quantized config.json")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            # A copy, not the file's buffer: a tensor there sits at whatever offset the header
            # gives it, and torch's fused bf16 int8 kernel crashes on a misaligned weight.
            state = {name: f.get_tensor(name).clone() for name in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error type on a corrupt header
        raise ArtifactError(f"{path}: not a readable safetensors file: {e}") from e
    with torch.device("meta"):
        model = GPT(cfg)
    for name in target_modules(model):
        parent, _, child = name.rpartition(".")
        try:
            q, scales = state.pop(f"{name}.qweight"), state.pop(f"{name}.scales")
            mins = state.pop(f"{name}.mins") if spec.method == "int4" else None
        except KeyError as e:
            raise ArtifactError(
                f"{path} lacks {e.args[0]}: the file does not match the quantization entry of "
                "config.json; re-make the directory with the quantize stage"
            ) from None
        bias = state.pop(f"{name}.bias", None)
        bias = bias.to(dtype) if bias is not None else None
        module: nn.Module
        if spec.method == "int8":
            module = Int8Linear(q, scales, bias)
        else:
            assert spec.group_size is not None and mins is not None
            module = Int4Linear(q, scales, mins, spec.group_size, bias)
        setattr(model.get_submodule(parent), child, module)
    rest = {k: v.to(dtype) for k, v in state.items()}
    if cfg.tie_embeddings:
        rest.pop("lm_head.weight", None)
    expected = {
        k
        for k in model.state_dict()
        if not k.endswith((".qweight", ".scales", ".mins", ".packed"))
        and not (k == "lm_head.weight" and cfg.tie_embeddings)
    }
    expected -= {k for k in expected if k.endswith(".bias") and _is_target(k)}
    if set(rest) != expected:
        raise ArtifactError(
            f"weights in {path} do not match config.json: missing "
            f"{sorted(expected - set(rest)) or 'none'}, unexpected "
            f"{sorted(set(rest) - expected) or 'none'}"
        )
    model.load_state_dict(rest, strict=False, assign=True)
    model.tie_weights()
    return model.eval(), cfg


def _is_target(key: str) -> bool:
    return key.rpartition(".")[0].endswith(TARGET_SUFFIXES)


def memory_bytes(model: nn.Module) -> int:
    """Bytes of the weights the model keeps resident: parameters and buffers (shared ones
    once), the int4 kernel's copies included."""
    seen: set[int] = set()
    total = 0
    tensors = [*model.parameters(), *model.buffers()]
    for m in model.modules():
        kernel = getattr(m, "kernel", None)
        if isinstance(kernel, tuple):
            tensors.extend(kernel)
    for t in tensors:
        if t.device.type == "meta" or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total
