"""The merge stage: a plan that refuses models of another architecture (naming the field) or
another tokenizer (naming the files) and estimates memory and disk; an apply whose checkpoint
has exactly the files of a checkpoint, loads in transformers with albor's logits, keeps a tied
head tied, takes the first model's dtype, equals the in-memory merge of the same state dicts,
reproduces a model merged with itself, and runs `albor complete`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from albor.data.bpe import EOS_ID, save_hf_files, train_bpe
from albor.model.gpt import GPT
from albor.model.hf import export_state_dict, load_pretrained, save_pretrained
from albor.model.presets import preset
from albor.model.transforms.merge import MergeSpec, Schedule, merge_state_dicts
from albor.stage import PlanContext, run_stage
from albor.stages import merge
from helpers import STDLIB, STDLIB_SAMPLE, run

FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "manifest.json",
}


def _write(directory: Path, model: GPT, tok: Tokenizer, dtype: torch.dtype) -> Path:
    model = model.to(dtype)
    save_pretrained(model, model.cfg, directory, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    save_hf_files(tok, directory)
    return directory


def _model(vocab: int, seed: int, **overrides: Any) -> GPT:
    torch.manual_seed(seed)
    model = GPT(preset("tiny", vocab_size=vocab, **overrides))
    with torch.no_grad():  # norms away from 1, so a norm merged wrong shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model.eval()


def _finetune_of(base: GPT, seed: int) -> GPT:
    """`base` moved by a small random task vector, as a finetune moves it."""
    model = _model(base.cfg.vocab_size, 0, tie_embeddings=base.cfg.tie_embeddings)
    model.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoint dirs written as transformers writes them: a base, two finetunes of it (one of
    them also in bfloat16), an untied base with two finetunes, one model with another depth and
    one with another tokenizer."""
    root = tmp_path_factory.mktemp("merge_zoo")
    texts = [(STDLIB / name).read_text(encoding="utf-8") for name in STDLIB_SAMPLE]
    tok = train_bpe(texts, 300)
    other_tok = train_bpe(texts[::-1][:5], 300)
    vocab = tok.get_vocab_size()
    base = _model(vocab, 0)
    untied = _model(vocab, 5, tie_embeddings=False)
    return {
        "base": _write(root / "base", base, tok, torch.float32),
        "ft1": _write(root / "ft1", _finetune_of(base, 1), tok, torch.float32),
        "ft2": _write(root / "ft2", _finetune_of(base, 2), tok, torch.float32),
        "ft2_bf16": _write(root / "ft2_bf16", _finetune_of(base, 2), tok, torch.bfloat16),
        "untied_base": _write(root / "untied_base", untied, tok, torch.float32),
        "untied1": _write(root / "untied1", _finetune_of(untied, 3), tok, torch.float32),
        "untied2": _write(root / "untied2", _finetune_of(untied, 7), tok, torch.float32),
        "deeper": _write(root / "deeper", _model(vocab, 4, num_layers=3), tok, torch.float32),
        "other_tok": _write(
            root / "other_tok", _model(other_tok.get_vocab_size(), 6), other_tok, torch.float32
        ),
    }


def _logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    model, _ = load_pretrained(directory)
    with torch.no_grad():
        out: torch.Tensor = model(ids)
    return out


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def test_plan_checks_architecture_tokenizer_and_estimates(zoo: dict[str, Path]) -> None:
    cfg = merge.Config(
        models=[zoo["ft1"], zoo["ft2"]], base=zoo["base"], method="ties", output=Path("x")
    )
    p = merge.plan(cfg)
    assert p.ok, p.summary()
    checks = {c.name: c for c in p.checks}
    assert {"models[0]", "models[1]", "base", "architecture", "tokenizer"} <= set(checks)
    params = sum(t.numel() for t in export_state_dict(load_pretrained(zoo["base"])[0]).values())
    assert p.estimates["parameters"]["total"] == params
    # The merged model in float32, and far less than three whole models in float32 at once.
    assert p.estimates["disk_bytes"] > params * 4
    assert params * 4 < p.estimates["memory_bytes"]
    assert p.estimates["whole_models_fp32_bytes"] == 3 * params * 4
    assert any("ties" in a and "density=0.2" in a for a in p.actions)


def test_plan_names_the_architecture_field_that_differs(zoo: dict[str, Path]) -> None:
    cfg = merge.Config(models=[zoo["ft1"], zoo["deeper"]], method="linear", output=Path("x"))
    p = merge.plan(cfg)
    assert not p.ok
    (fail,) = p.failures
    assert fail.name == "architecture"
    assert "models[1]" in fail.detail and str(zoo["deeper"]) in fail.detail
    assert "num_layers 3 (vs 2)" in fail.detail
    assert "hidden_size" not in fail.detail  # only what differs is named


def test_plan_refuses_another_tokenizer_naming_the_files(zoo: dict[str, Path]) -> None:
    cfg = merge.Config(models=[zoo["ft1"], zoo["other_tok"]], method="linear", output=Path("x"))
    p = merge.plan(cfg)
    failed = {c.name: c.detail for c in p.failures}
    assert "tokenizer" in failed
    assert str(zoo["other_tok"] / "tokenizer.json") in failed["tokenizer"]
    assert str(zoo["ft1"] / "tokenizer.json") in failed["tokenizer"]
    assert list(failed) == ["tokenizer"]  # same shapes: only the tokenizer stops the merge


def test_plan_names_missing_and_damaged_inputs(zoo: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(zoo["ft1"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    cfg = merge.Config(
        models=[zoo["ft1"], broken, tmp_path / "nope"], method="linear", output=Path("x")
    )
    failed = {c.name: c.detail for c in merge.plan(cfg).failures}
    assert failed["models[1]"].startswith(f"{broken / 'model.safetensors'}: not a readable")
    assert "does not exist" in failed["models[2]"]
    pending = merge.plan(cfg, PlanContext(pending={"models": "finetune"}))
    assert pending.ok


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(method="slerp", models=["a", "b", "c"]), "SLERP merges exactly two models; 3"),
        (dict(method="slerp", models=["a", "b"], t=1.5), "t: 1.5 outside"),
        (dict(method="slerp", models=["a", "b"], t=[0.0, -0.1]), "t: -0.1 outside"),
        (dict(method="ties", models=["a", "b"]), "set `base:`"),
        (dict(method="linear", models=["a", "b"], base="c"), "does not use a base"),
        (dict(method="linear", models=["a", "b"], density=0.5), "density: method linear"),
        (dict(method="slerp", models=["a", "b"], weights=[1, 2]), "weights: method slerp"),
        (dict(method="linear", models=["a", "b"], weights=[1.0]), "1 weight(s) for 2"),
        (dict(method="linear", models=["a", "b"], weights=[1.0, -1.0]), "sum to 0"),
        (dict(method="ties", models=["a"], base="b", density=0.0), "density: 0.0"),
        (dict(method="dare_ties", models=["a"], base="b", drop_p=1.0), "drop_p: 1.0"),
        (dict(method="nope", models=["a", "b"]), "method"),
    ],
)
def test_config_refuses_what_cannot_merge(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        merge.Config(**settings)


def test_apply_linear_of_a_model_with_itself_is_that_model(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    cfg = merge.Config(models=[zoo["ft1"], zoo["ft1"]], method="linear", output=tmp_path / "m")
    result = run_stage(merge, cfg)
    out = result.output
    assert {p.name for p in out.iterdir()} == FILES
    assert (out / "tokenizer.json").read_bytes() == (zoo["ft1"] / "tokenizer.json").read_bytes()
    torch.testing.assert_close(_logits(out, IDS), _logits(zoo["ft1"], IDS), rtol=0, atol=1e-5)
    metrics = result.manifest["metrics"]
    assert metrics["method"] == "linear"
    assert metrics["parameters"] == {"weights": [0.5, 0.5]}
    assert run_stage(merge, cfg).status == "up to date"


def test_apply_slerp_loads_in_transformers_with_albors_logits(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    # models[0] in bfloat16: the merged model is written in bfloat16 too.
    cfg = merge.Config(
        models=[zoo["ft2_bf16"], zoo["ft1"]],
        method="slerp",
        t=[0.2, 0.8],
        t_rules={"mlp": 0.5},
        output=tmp_path / "m",
    )
    out = run_stage(merge, cfg).output
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert "lm_head.weight" not in names  # tied: the head is the merged embedding
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours, _ = load_pretrained(out)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, ours(IDS), rtol=0, atol=1e-4)
    # The stage's streamed merge is the in-memory merge of the same state dicts.
    a = export_state_dict(load_pretrained(zoo["ft2_bf16"], dtype=torch.bfloat16)[0])
    b = export_state_dict(load_pretrained(zoo["ft1"])[0])
    spec = MergeSpec("slerp", t=Schedule((0.2, 0.8), (("mlp", 0.5),)))
    expected = merge_state_dicts([a, b], spec)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert all(torch.equal(f.get_tensor(k), expected[k]) for k in expected)


@pytest.mark.parametrize(
    "method,extra",
    [
        ("task_arithmetic", {"weights": [0.7, 0.3]}),
        ("ties", {"density": 0.5}),
        ("dare_linear", {"drop_p": 0.3, "seed": 4, "weights": [0.5, 0.5]}),
        ("dare_ties", {"drop_p": 0.3, "seed": 4}),
    ],
)
def test_apply_over_a_base_equals_the_in_memory_merge(
    zoo: dict[str, Path], tmp_path: Path, method: str, extra: dict[str, Any]
) -> None:
    cfg = merge.Config(
        models=[zoo["untied1"], zoo["untied2"]],
        base=zoo["untied_base"],
        method=method,
        output=tmp_path / "m",
        **extra,
    )
    result = run_stage(merge, cfg)
    out = result.output
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    assert "lm_head.weight" in got  # untied: the head is merged as a tensor of its own
    names = ("untied1", "untied2", "untied_base")
    *models, base = [export_state_dict(load_pretrained(zoo[n])[0]) for n in names]
    spec = cfg.spec()
    expected = merge_state_dicts(models, spec, base)
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert result.manifest["metrics"]["parameters"]["weights"] == list(spec.weights_for(2))
    assert result.manifest["metrics"]["base"] == str(zoo["untied_base"])


def test_ties_of_two_finetunes_keeps_the_base_outside_the_trimmed_entries(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    cfg = merge.Config(
        models=[zoo["ft1"], zoo["ft2"]],
        base=zoo["base"],
        method="ties",
        density=0.1,
        output=tmp_path / "m",
    )
    out = run_stage(merge, cfg).output
    merged = export_state_dict(load_pretrained(out)[0])
    base = export_state_dict(load_pretrained(zoo["base"])[0])
    moved = [(merged[k] != base[k]).float().mean().item() for k in base]
    # Each task vector keeps 10% of its entries: their union is at most 20% of each tensor.
    assert all(0 < m <= 0.2 + 1e-9 for m in moved)


def test_a_merged_model_merges_again_and_completes(
    zoo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = run_stage(
        merge,
        merge.Config(models=[zoo["ft1"], zoo["ft2"]], method="linear", output=tmp_path / "a"),
    ).output
    second = run_stage(
        merge,
        merge.Config(
            models=[first, zoo["ft1"]], method="linear", weights=[2, 1], output=tmp_path / "b"
        ),
    )
    assert second.manifest["inputs"][0]["path"] == str(first)  # an albor artifact as input
    code, out, err = run(
        ["complete", str(second.output), "def ", "--max-tokens", "4", "--json"], capsys
    )
    assert code == 0, err
    assert isinstance(json.loads(out)["completion"], str)
