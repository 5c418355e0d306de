"""Our checkpoints are transformers checkpoints: same logits in LlamaForCausalLM / Qwen2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from albor.errors import ArtifactError
from albor.model.gpt import GPT
from albor.model.hf import from_hf_config, load_pretrained, save_pretrained, to_hf_config
from albor.model.presets import preset


def _random_model(**overrides: object) -> GPT:
    torch.manual_seed(0)
    model = GPT(preset("tiny", **overrides))
    with torch.no_grad():  # make norms and biases matter, so a naming mix-up cannot pass
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p) if "norm" in name else torch.randn_like(p))
    return model.eval()


CASES = [
    ({}, "LlamaForCausalLM"),
    ({"qkv_bias": True}, "Qwen2ForCausalLM"),
    ({"tie_embeddings": False}, "LlamaForCausalLM"),
]


@pytest.mark.parametrize("overrides,arch", CASES)
def test_transformers_gives_our_logits(
    tmp_path: Path, overrides: dict[str, object], arch: str
) -> None:
    model = _random_model(**overrides)
    save_pretrained(model, model.cfg, tmp_path, eos_token_id=0)
    theirs_model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs_model).__name__ == arch
    assert next(theirs_model.parameters()).dtype == torch.float32
    idx = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx)
        theirs = theirs_model(idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("overrides,arch", CASES)
def test_load_pretrained_round_trip(
    tmp_path: Path, overrides: dict[str, object], arch: str
) -> None:
    model = _random_model(**overrides)
    save_pretrained(model, model.cfg, tmp_path, eos_token_id=0)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        has_head = "lm_head.weight" in f.keys()  # noqa: SIM118 (safe_open has no __contains__)
        assert has_head != model.cfg.tie_embeddings
        assert f.metadata() == {"format": "pt"}
    loaded, cfg = load_pretrained(tmp_path)
    assert cfg == model.cfg
    if cfg.tie_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    idx = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    half, _ = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert (half.lm_head.weight is half.model.embed_tokens.weight) == cfg.tie_embeddings
    with torch.no_grad():
        torch.testing.assert_close(half(idx).float(), model(idx), atol=0.1, rtol=0)


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    model = _random_model()
    written = save_pretrained(model, model.cfg, tmp_path, eos_token_id=0, max_shard_bytes=100_000)
    shards = [p for p in written if p.name.startswith("model-")]
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    loaded, _ = load_pretrained(tmp_path)
    idx = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, model(idx), atol=1e-4, rtol=0)


def test_config_round_trip_and_errors() -> None:
    for cfg in (preset("350m"), preset("tiny", qkv_bias=True, tie_embeddings=False)):
        assert from_hf_config(to_hf_config(cfg, eos_token_id=0)) == cfg
    d = to_hf_config(preset("tiny"), eos_token_id=0)
    with pytest.raises(ArtifactError, match="model_type 'gpt2'"):
        from_hf_config({**d, "model_type": "gpt2"})
    with pytest.raises(ArtifactError, match="hidden_size"):
        from_hf_config({k: v for k, v in d.items() if k != "hidden_size"})
    with pytest.raises(ArtifactError, match="rope_type 'yarn'"):
        from_hf_config({**d, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}})


def test_load_is_strict_about_tensors(tmp_path: Path) -> None:
    model = _random_model()
    save_pretrained(model, model.cfg, tmp_path, eos_token_id=0)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(ArtifactError, match=r"missing \['lm_head.weight'\]"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(ArtifactError, match=r"unexpected \['model.layers.1"):
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="no weights"):
        load_pretrained(tmp_path)
    with pytest.raises(ArtifactError, match=r"config\.json not found"):
        load_pretrained(tmp_path / "nowhere")
