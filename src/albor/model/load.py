"""Loading a model from disk: the one place serving, evaluation and export read weights.

What a path may hold:

- an albor checkpoint dir or a transformers model dir: `config.json`, `model.safetensors` (or
  shards with `model.safetensors.index.json`) and usually `tokenizer.json`; `load_model` builds
  the `GPT` (float32, bfloat16 or float16, on the CPU or a GPU), `load_model_tokenizer` reads the
  tokenizer beside the weights;
- a quantized checkpoint dir (the quantize stage's int8 / int4 output: config.json with a
  `quantization` entry): `load_model` builds the `GPT` with its quantized linears
  (`albor.model.quantized`);
- a `.gguf` file, opened in llama.cpp by `open_gguf`;
- a directory holding such models (an export artifact: an HF dir and GGUF files): `find_models`
  lists them, `resolve` picks the one a path names.

Weights are read through safetensors by `albor.model.hf` (HF names are albor's names). Nothing
here imports training code: a server or an evaluation never pulls in the training loop.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from albor.data.bpe import TOKENIZER_JSON
from albor.device import resolve as resolve_device
from albor.errors import ArtifactError, ConfigError
from albor.model.hf import CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from albor.model.config import ModelConfig
    from albor.model.gpt import GPT

GGUF_SUFFIX = ".gguf"
DTYPES = ("float32", "bfloat16", "float16")
Dtype = Literal["float32", "bfloat16", "float16"]
GGUF_INSTALL = "pip install gguf llama-cpp-python (both are albor dependencies)"


@dataclass(frozen=True)
class ModelRef:
    """A model found on disk: a torch checkpoint dir or a GGUF file."""

    path: Path
    kind: Literal["torch", "gguf"]

    @property
    def name(self) -> str:
        return self.path.name


def is_checkpoint_dir(path: Path) -> bool:
    """A `config.json` with safetensors weights beside it (single file or sharded)."""
    return (path / CONFIG_FILE).is_file() and (
        (path / WEIGHTS_FILE).is_file() or (path / INDEX_FILE).is_file()
    )


def require_checkpoint(directory: Path, role: str) -> ModelConfig:
    """The config of checkpoint dir `directory` that a stage reads as its `role` (teacher, base):
    a directory with config.json, safetensors weights and the tokenizer beside them; otherwise
    an ArtifactError naming what is missing and the fix."""
    from albor.model.hf import load_config

    if not directory.is_dir():
        raise ArtifactError(f"{role} {directory} does not exist (a checkpoint directory)")
    if not is_checkpoint_dir(directory):
        raise ArtifactError(
            f"{role} {directory} is not a checkpoint directory (config.json and "
            "model.safetensors): point it at a pretrain output or a transformers model directory"
        )
    if not (directory / TOKENIZER_JSON).is_file():
        raise ArtifactError(
            f"{role} {directory} has no {TOKENIZER_JSON}: copy the tokenizer the {role} was "
            "trained with beside its weights"
        )
    return load_config(directory)


def find_models(path: Path) -> list[ModelRef]:
    """Every model at `path`: the file itself, the checkpoint dir itself, and the checkpoint dirs
    and GGUF files directly in it or one directory down (an export artifact's layout)."""
    path = Path(path)
    if path.is_file():
        if path.suffix != GGUF_SUFFIX:
            raise ConfigError(
                f"{path}: not a model: give a .gguf file or a model directory (config.json, "
                f"{WEIGHTS_FILE} and {TOKENIZER_JSON})"
            )
        return [ModelRef(path, "gguf")]
    if not path.is_dir():
        raise ConfigError(f"{path}: no such file or directory")
    found: list[ModelRef] = []
    for d in [path, *sorted(p for p in path.iterdir() if p.is_dir() and p.name[0] not in "._")]:
        if is_checkpoint_dir(d):
            found.append(ModelRef(d, "torch"))
        found += [ModelRef(f, "gguf") for f in sorted(d.glob(f"*{GGUF_SUFFIX}")) if f.is_file()]
    return found


def resolve(path: Path) -> ModelRef:
    """The one model `path` names; ConfigError when it names none or several."""
    found = find_models(path)
    if not found:
        raise ConfigError(
            f"{path}: no model here: expected a checkpoint dir (config.json, {WEIGHTS_FILE} or "
            f"{INDEX_FILE}, {TOKENIZER_JSON}) or a .gguf file"
        )
    if len(found) > 1 and not (Path(path).is_dir() and is_checkpoint_dir(Path(path))):
        names = ", ".join(str(r.path) for r in found)
        raise ConfigError(f"{path} holds several models; pass one of them: {names}")
    return found[0]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named `name` (one of `DTYPES`)."""
    import torch

    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def load_model(
    directory: Path, *, device: str = "cpu", dtype: str = "float32", device_key: str = "device"
) -> tuple[GPT, ModelConfig]:
    """The `GPT` of a checkpoint dir (albor's or transformers'), in eval mode, and its config.

    `device` is "auto", "cpu" or "cuda" (see `albor.device`; `device_key` names the setting in
    its errors); every parameter must be in the files with the right shape (ArtifactError
    naming the tensors otherwise).
    """
    from albor.model.hf import load_pretrained
    from albor.model.quantized import load_quantized, read_spec

    where = resolve_device(device, key=device_key)
    if read_spec(Path(directory)) is not None:
        return load_quantized(Path(directory), device=where, dtype=torch_dtype(dtype))
    return load_pretrained(Path(directory), device=where, dtype=torch_dtype(dtype))


def load_model_tokenizer(directory: Path) -> Tokenizer:
    """The `tokenizer.json` beside a checkpoint's weights (any byte-level BPE, albor's or not)."""
    from tokenizers import Tokenizer

    path = Path(directory) / TOKENIZER_JSON
    if not path.is_file():
        raise ArtifactError(
            f"{directory}: no {TOKENIZER_JSON} beside the weights: copy the tokenizer the model "
            "was trained with into the model directory"
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
        raise ArtifactError(f"{path}: not a readable tokenizer: {e}") from e


def open_gguf(
    path: Path,
    *,
    n_ctx: int | None = None,
    n_threads: int | None = None,
    logits_all: bool = False,
) -> Any:
    """A GGUF file opened in llama.cpp (`albor.infer.llamacpp.LlamaCppModel`).

    `n_ctx` defaults to the model's context; `logits_all` keeps the logits of every position (a
    parity check reads them), not only the last.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such GGUF file")
    try:
        llamacpp = importlib.import_module("albor.infer.llamacpp")
    except ImportError as e:
        raise ConfigError(f"running a GGUF file needs llama-cpp-python: {GGUF_INSTALL}") from e
    return llamacpp.LlamaCppModel(path, n_ctx=n_ctx, n_threads=n_threads, logits_all=logits_all)
