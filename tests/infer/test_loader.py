"""Loading models for inference: albor checkpoints, transformers dirs (single and sharded), GGUF
files through llama.cpp, and the errors for everything else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer

from albor.errors import ArtifactError, ConfigError
from albor.infer.completion import completions, make_prompt
from albor.infer.engine import Sampling, TorchBackend, generate
from albor.infer.loader import GGUFBackend, load
from albor.model.gguf import write_gguf
from albor.model.hf import save_pretrained
from albor.model.load import find_models, load_model, resolve

PREFIXES = ["def add(a, b):\n    return", "import os\n", "class Queue:\n    def "]


def _texts(backend: TorchBackend | GGUFBackend, n: int = 24) -> list[str]:
    prompts = [make_prompt(backend, p) for p in PREFIXES]
    return [c.text for c in completions(backend, prompts, max_new_tokens=n)]


def test_load_an_albor_checkpoint(trained_model: Path) -> None:
    backend = load(trained_model)
    assert isinstance(backend, TorchBackend)
    assert backend.name == trained_model.name and backend.n_ctx == 128
    assert backend.eos_id == 0 and backend.dtype == torch.float32
    tok = Tokenizer.from_file(str(trained_model / "tokenizer.json"))
    assert backend.tokenize("def f(x):") == tok.encode("def f(x):").ids
    texts = _texts(backend)
    assert all(texts) and texts[1] != texts[0]
    bf16 = load(trained_model, dtype="bfloat16")
    assert isinstance(bf16, TorchBackend) and bf16.dtype == torch.bfloat16
    assert all(isinstance(t, str) for t in _texts(bf16, 4))


def test_sharded_checkpoint_generates_the_same(trained_model: Path, tmp_path: Path) -> None:
    model, cfg = load_model(trained_model)
    out = tmp_path / "sharded"
    written = save_pretrained(model, cfg, out, eos_token_id=0, max_shard_bytes=60_000)
    assert (out / "model.safetensors.index.json") in written
    assert not (out / "model.safetensors").exists()
    shutil.copy(trained_model / "tokenizer.json", out)
    assert _texts(load(out)) == _texts(load(trained_model))


def test_transformers_saved_dir_loads(trained_model: Path, tmp_path: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(trained_model)
    out = tmp_path / "hf"
    hf.save_pretrained(out, max_shard_size="100KB")  # transformers' own sharded layout
    shutil.copy(trained_model / "tokenizer.json", out)
    assert (out / "model.safetensors.index.json").exists()
    backend = load(out)
    assert backend.name == "hf"
    # Greedy tokens equal transformers' own generate on the same weights.
    ids = [0, *backend.tokenize(PREFIXES[0])]
    ours = list(generate(backend.model, ids, max_new_tokens=12))  # type: ignore[attr-defined]
    theirs = hf.generate(
        torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None
    )[0, len(ids) :].tolist()
    assert ours == theirs


def test_what_is_not_a_model(trained_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no model here"):
        load(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError, match=r"\.gguf file or a model directory"):
        load(tmp_path / "notes.txt")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(trained_model / name, bare)
    with pytest.raises(ArtifactError, match=r"no tokenizer\.json"):
        load(bare)
    with pytest.raises(ConfigError, match="dtype"):
        load(trained_model, dtype="int3")
    # An export-like dir with two models: load wants one, find_models lists both.
    both = tmp_path / "export"
    shutil.copytree(trained_model, both / "a", ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copytree(trained_model, both / "b", ignore=shutil.ignore_patterns("checkpoints"))
    with pytest.raises(ConfigError, match="several models"):
        load(both)
    assert [r.path.name for r in find_models(both)] == ["a", "b"]
    assert resolve(both / "a").kind == "torch"


@pytest.fixture(scope="module")
def gguf_f32(trained_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "model-f32.gguf"
    write_gguf(trained_model, out, "f32")
    return out


@pytest.mark.llamacpp
def test_gguf_file_completes_as_the_checkpoint(trained_model: Path, gguf_f32: Path) -> None:
    backend = load(gguf_f32, n_threads=1)
    torch_backend = load(trained_model)
    assert isinstance(backend, GGUFBackend)
    assert backend.name == "model-f32.gguf" and backend.n_ctx == 128 and backend.eos_id == 0
    text = "def f(x):\n    return x  # é ✓\n"
    assert backend.tokenize(text) == torch_backend.tokenize(text)
    assert backend.detokenize(backend.tokenize(text)) == text
    assert backend.token_texts() == torch_backend.token_texts()
    # Same prompts (healed), same greedy text: F32 in llama.cpp computes the same model.
    assert _texts(backend) == _texts(torch_backend)
    for mode in ("psm", "spm"):
        args = ("def area(r):\n    return ", " * r\n")
        assert backend.fim_prompt(*args, mode) == torch_backend.fim_prompt(*args, mode)
    # Seeded sampling is reproducible through llama.cpp too; the rows of a batch differ.
    prompts = [make_prompt(backend, PREFIXES[0])] * 3
    seeded = Sampling(temperature=1.0, seed=3)

    def sample() -> list[str]:
        return [c.text for c in completions(backend, prompts, max_new_tokens=16, sampling=seeded)]

    first = sample()
    assert first == sample() and len(set(first)) == 3


@pytest.mark.llamacpp
def test_export_dir_with_checkpoint_and_gguf(
    trained_model: Path, gguf_f32: Path, tmp_path: Path
) -> None:
    export = tmp_path / "export"
    shutil.copytree(trained_model, export / "hf", ignore=shutil.ignore_patterns("checkpoint*"))
    shutil.copy(gguf_f32, export)
    refs = find_models(export)
    assert [(r.kind, r.name) for r in refs] == [("gguf", "model-f32.gguf"), ("torch", "hf")]
    with pytest.raises(ConfigError, match="several models"):
        load(export)
    assert isinstance(load(export / "model-f32.gguf"), GGUFBackend)


def test_complete_cli(
    trained_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers import run

    backend = load(trained_model)
    prefix, suffix = "def area(r):\n    return ", " * r\n"
    want = completions(backend, [make_prompt(backend, prefix)], max_new_tokens=12)[0]
    code, out, err = run(["complete", str(trained_model), prefix, "--max-tokens", "12"], capsys)
    assert code == 0, err
    assert out == prefix + want.text + "\n"
    code, out, _ = run(
        ["complete", str(trained_model), prefix, "--max-tokens", "12", "--json"], capsys
    )
    result = json.loads(out)
    assert result["completion"] == want.text and result["finish_reason"] == want.finish_reason
    assert result["prompt_tokens"] == want.prompt_tokens
    # Streaming as JSON lines: the pieces add up to the completion; FIM with --suffix.
    fim_prompt = make_prompt(backend, prefix, suffix, fim_mode="spm")
    fim = completions(backend, [fim_prompt], max_new_tokens=12)
    argv = ["complete", str(trained_model), prefix, "--suffix", suffix, "--fim-mode", "spm"]
    code, out, _ = run([*argv, "--max-tokens", "12", "--stream", "--json"], capsys)
    lines = [json.loads(line) for line in out.splitlines()]
    assert "".join(d["text"] for d in lines[:-1]) == lines[-1]["completion"] == fim[0].text
    code, out, err = run(["complete", str(tmp_path), "x"], capsys)
    assert code == 2 and "no model here" in err and "Traceback" not in err
