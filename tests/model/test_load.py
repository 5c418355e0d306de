"""The one model loader: checkpoint dirs into a GPT, the tokenizer beside them, finding models in
an export-like directory, and serving / evaluation loading without the training code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from albor.errors import ArtifactError, ConfigError
from albor.model.gpt import GPT
from albor.model.hf import save_pretrained
from albor.model.load import (
    find_models,
    load_model,
    load_model_tokenizer,
    open_gguf,
    resolve,
)
from albor.model.presets import preset


def _checkpoint(directory: Path, *, tokenizer: bool = True) -> GPT:
    torch.manual_seed(0)
    model = GPT(preset("tiny")).eval()
    save_pretrained(model, model.cfg, directory, eos_token_id=0)
    if tokenizer:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.save(str(directory / "tokenizer.json"))
    return model


def test_load_model_gives_the_saved_model(tmp_path: Path) -> None:
    saved = _checkpoint(tmp_path)
    idx = torch.randint(0, 512, (2, 12))
    model, cfg = load_model(tmp_path, device="auto")
    assert cfg == saved.cfg and not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(idx.to(model.lm_head.weight.device)).cpu(), saved(idx))
    half, _ = load_model(tmp_path, dtype="bfloat16")
    assert half.lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype 'int3'"):
        load_model(tmp_path, dtype="int3")
    with pytest.raises(ConfigError, match="--device: 'tpu' is not a device"):
        load_model(tmp_path, device="tpu", device_key="--device")
    with pytest.raises(ArtifactError, match=r"config\.json not found"):
        load_model(tmp_path / "nowhere")


def test_the_tokenizer_beside_the_weights(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "a")
    assert isinstance(load_model_tokenizer(tmp_path / "a"), Tokenizer)
    _checkpoint(tmp_path / "b", tokenizer=False)
    with pytest.raises(ArtifactError, match=r"no tokenizer\.json beside the weights"):
        load_model_tokenizer(tmp_path / "b")
    (tmp_path / "b" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not a readable tokenizer"):
        load_model_tokenizer(tmp_path / "b")


def test_finding_the_models_of_an_export_dir(tmp_path: Path) -> None:
    export = tmp_path / "export"
    _checkpoint(export / "hf")
    (export / "model-q8_0.gguf").write_bytes(b"GGUF")
    (export / "notes.txt").write_text("not a model")
    refs = find_models(export)
    assert [(r.kind, r.name) for r in refs] == [("gguf", "model-q8_0.gguf"), ("torch", "hf")]
    with pytest.raises(ConfigError, match="several models"):
        resolve(export)
    assert resolve(export / "hf").kind == "torch"
    assert resolve(export / "model-q8_0.gguf").kind == "gguf"
    with pytest.raises(ConfigError, match=r"\.gguf file or a model directory"):
        resolve(export / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no model here"):
        resolve(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no such GGUF file"):
        open_gguf(export / "missing.gguf")


def test_serving_and_evaluation_do_not_import_training_code() -> None:
    # A server or an evaluation loads weights; pulling in the training loop (and its optimiser,
    # data pipeline and distributed setup) with them is what one loader avoids.
    code = (
        "import sys\n"
        "import albor.model.load, albor.infer.loader, albor.infer.server, albor.cli.infer\n"
        "import albor.stages.evaluate, albor.stages.export, albor.evals.humaneval\n"
        "print(sorted(m for m in sys.modules if m.startswith('albor.train')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
