"""LoRA on albor's GPT: the adapted model starts as the base, merged and unmerged agree, the
trainable count is r x (in + out) per target, tied embeddings stay tied, and the adapter albor
saves loads with peft onto the transformers model of the same base and gives the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from albor.errors import ArtifactError
from albor.model.gpt import GPT
from albor.model.hf import load_pretrained
from albor.model.presets import preset
from albor.train import lora
from albor.train.lora import LINEAR_TARGETS, LoraSpec


def base_model(directory: Path) -> GPT:
    model, _ = load_pretrained(directory)
    return model


def with_random_adapters(model: GPT, spec: LoraSpec, seed: int = 0) -> GPT:
    """`model` with adapters whose B is not zero (a trained adapter, as far as maths goes)."""
    torch.manual_seed(seed)
    lora.inject(model, spec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval()


def ids(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def test_the_adapted_model_starts_as_the_base(trained_model: Path) -> None:
    model = base_model(trained_model)
    x = ids(model.cfg.vocab_size)
    before = model(x)
    lora.inject(model, LoraSpec())
    assert torch.equal(model.eval()(x), before)  # B = 0: the update is exactly zero


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_and_unmerged_logits_agree_and_the_tie_stays(
    trained_model: Path, rslora: bool
) -> None:
    base = base_model(trained_model)
    embed = base.model.embed_tokens.weight.detach().clone()
    model = with_random_adapters(base, LoraSpec(rank=4, alpha=8, rslora=rslora))
    x = ids(model.cfg.vocab_size)
    merged = lora.merged(model)
    assert (merged(x) - model(x)).abs().max() < 1e-4
    assert (merged(x) - base_model(trained_model)(x)).abs().max() > 1e-3  # the adapter acts
    assert merged.cfg.tie_embeddings
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert torch.equal(merged.model.embed_tokens.weight, embed)
    assert lora.merged(model, torch.bfloat16).model.layers[0].mlp.up_proj.weight.dtype == (
        torch.bfloat16
    )


@settings(max_examples=20, deadline=None)
@given(
    st.sets(st.sampled_from(LINEAR_TARGETS), min_size=1),
    st.integers(1, 16),
    st.booleans(),
)
def test_trainable_parameters_are_r_times_in_plus_out(
    targets: set[str], rank: int, qkv_bias: bool
) -> None:
    cfg = preset("tiny", vocab_size=128, qkv_bias=qkv_bias)
    spec = LoraSpec(tuple(sorted(targets)), rank)
    model = GPT(cfg)
    expected = sum(
        rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )
    lora.inject(model, spec)
    trained = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trained.values()) == expected == lora.trainable_count(cfg, spec)
    assert all(".lora_" in n for n in trained)


def test_spec_problems_name_the_fix() -> None:
    cfg = preset("tiny", vocab_size=128)
    [missing] = lora.spec_problems(cfg, LoraSpec(("q_proj", "lm_head")))
    assert "lm_head" in missing and "valid targets: q_proj, k_proj" in missing
    [rank] = lora.spec_problems(cfg, LoraSpec(("k_proj",), rank=200))
    assert "rank 200 exceeds min(in, out) of k_proj (32)" in rank
    assert lora.spec_problems(cfg, LoraSpec()) == []


def test_the_peft_adapter_loads_on_the_transformers_base(
    trained_model: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = LoraSpec(("q_proj", "v_proj", "down_proj"), rank=4, alpha=8)
    model = with_random_adapters(base_model(trained_model), spec)
    files = lora.save_adapter(model, spec, tmp_path / "adapter", str(trained_model))
    assert [f.name for f in files] == ["adapter_config.json", "adapter_model.safetensors"]

    hf = AutoModelForCausalLM.from_pretrained(trained_model, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert peft_model.peft_config["default"].base_model_name_or_path == str(trained_model)
    assert set(peft_model.peft_config["default"].target_modules) == set(spec.targets)
    x = ids(model.cfg.vocab_size)
    with torch.no_grad():
        theirs = peft_model(input_ids=x).logits
    assert (theirs - model(x)).abs().max() < 1e-4

    again = lora.load_adapter(base_model(trained_model), tmp_path / "adapter").eval()
    assert torch.equal(again(x), model(x))


def test_an_adapter_for_another_model_is_refused(trained_model: Path, tmp_path: Path) -> None:
    spec = LoraSpec(("q_proj",), rank=2)
    other = lora.inject(GPT(preset("tiny", vocab_size=512, hidden_size=96, num_heads=4)), spec)
    lora.save_adapter(other, spec, tmp_path / "adapter", "elsewhere")
    with pytest.raises((ArtifactError, RuntimeError), match=r"size|fit"):
        lora.load_adapter(base_model(trained_model), tmp_path / "adapter")
