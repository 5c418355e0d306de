"""prune: plan checks, and apply end to end on the tiny preset: exact zeros through save, albor's
load, transformers' and GGUF (FALSIFY-ALBOR-008), 2:4 groups in the written tensors, the manifest's
figures, and a depth-pruned model that generates the same with and without the KV cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from albor.data.bpe import EOS, TOKENIZER_FILES, load_tokenizer, token_byte_lengths
from albor.evals.perplexity import score_model
from albor.infer.engine import generate
from albor.model.gguf import gguf_name, write_gguf
from albor.model.gpt import GPT
from albor.model.hf import load_pretrained, save_pretrained
from albor.model.presets import preset
from albor.model.transforms.prune import zero_count
from albor.stage import PlanContext, run_stage
from albor.stages import prune

MODEL_FILES = {"config.json", "model.safetensors", *TOKENIZER_FILES}


def _model_dir(token_data: Path, dest: Path, *, layers: int = 2, tie: bool = True) -> Path:
    """A random tiny model in `token_data`'s tokenizer, as a checkpoint directory."""
    torch.manual_seed(0)
    cfg = preset("tiny", num_layers=layers, tie_embeddings=tie)
    model = GPT(cfg)
    eos = load_tokenizer(token_data).token_to_id(EOS)
    save_pretrained(model, cfg, dest, eos_token_id=eos)
    for name in TOKENIZER_FILES:
        shutil.copyfile(token_data / name, dest / name)
    return dest


def _config(**fields: Any) -> prune.Config:
    base: dict[str, Any] = {"eval_tokens": 1024, "calibration_tokens": 512, "seq_len": 64}
    return prune.Config.model_validate({**base, **fields})


def _zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


def test_plan_checks_and_estimates(token_data: Path, tmp_path: Path) -> None:
    model = _model_dir(token_data, tmp_path / "model")
    p = prune.plan(_config(model=model, data=token_data, sparsity=0.3, output=tmp_path / "o"))
    assert p.ok, p.summary()
    numels = [64 * 64, 32 * 64, 32 * 64, 64 * 64, 176 * 64, 176 * 64, 64 * 176]
    assert p.estimates["zeros"] == 2 * sum(zero_count(0.3, n) for n in numels)
    assert p.estimates["pruned_parameters"] == 2 * sum(numels)
    assert p.estimates["memory_bytes"] > 4 * GPT(preset("tiny")).num_params()

    wanda = prune.plan(_config(model=model, method="wanda", sparsity=0.5, output=tmp_path / "o"))
    assert [c.name for c in wanda.failures] == ["data"]
    assert "calibration" in wanda.failures[0].detail
    nm = prune.plan(_config(model=model, data=token_data, structure="2:4", output=tmp_path / "o"))
    assert nm.ok and nm.estimates["zeros"] == sum(numels)  # 2:4 is exactly half
    odd = prune.plan(
        _config(model=model, structure="2:32", sparsity=15 / 16, output=tmp_path / "o")
    )
    assert [c.name for c in odd.failures] == ["structure"]
    assert "mlp.down_proj" in odd.failures[0].detail  # 176 inputs are not groups of 32
    none = prune.plan(_config(model=model, sparsity=0.5, targets=["lm_head"], output=tmp_path))
    assert [c.name for c in none.failures] == ["targets"]

    too_many = prune.plan(_config(model=model, method="depth", blocks=[0, 1], output=tmp_path))
    assert [c.name for c in too_many.failures] == ["blocks"]
    beyond = prune.plan(_config(model=model, method="depth", blocks=[2], output=tmp_path))
    assert [c.name for c in beyond.failures] == ["blocks"]
    all_of_them = prune.plan(
        _config(model=model, data=token_data, method="depth", num_blocks=2, output=tmp_path)
    )
    assert [c.name for c in all_of_them.failures] == ["num_blocks"]
    depth = prune.plan(_config(model=model, method="depth", blocks=[1], output=tmp_path))
    assert depth.ok and depth.estimates["parameters_after"] < GPT(preset("tiny")).num_params()

    missing = prune.plan(_config(model=tmp_path / "nope", sparsity=0.5, output=tmp_path))
    assert [c.name for c in missing.failures] == ["model"]
    pending = prune.plan(
        _config(model=tmp_path / "later", data=token_data, method="wanda", sparsity=0.5),
        PlanContext({"model": "pretrain"}),
    )
    assert pending.ok


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sparsity": 1.0}, "less than 1"),
        ({"sparsity": -0.1}, "greater than or equal to 0"),
        ({}, "sparsity: magnitude needs it"),
        ({"structure": "4:4"}, "1 <= N < M"),
        ({"structure": "2:4", "sparsity": 0.3}, "fixes it at 0.5"),
        ({"structure": "2:4", "scope": "global"}, "per_matrix"),
        ({"method": "wanda", "sparsity": 0.5, "scope": "global"}, "within each output row"),
        ({"method": "depth"}, "either `blocks`"),
        ({"method": "depth", "blocks": [1, 3]}, "not consecutive"),
        ({"method": "depth", "num_blocks": 1, "sparsity": 0.5}, "remove `sparsity`"),
        ({"sparsity": 0.5, "num_blocks": 1}, "only depth"),
    ],
)
def test_config_rules_name_the_field_and_fix(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        prune.Config.model_validate(fields)


def test_falsify_albor_008_magnitude_zeros_survive_save_load_transformers_and_gguf(
    token_data: Path, tmp_path: Path
) -> None:
    model = _model_dir(token_data, tmp_path / "model")
    cfg = _config(model=model, data=token_data, sparsity=0.3, output=tmp_path / "pruned")
    result = run_stage(prune, cfg)
    out = result.output
    assert {p.name for p in out.iterdir()} == MODEL_FILES | {"manifest.json"}
    metrics = result.manifest["metrics"]
    tensors = metrics["tensors"]
    assert len(tensors) == 14
    written = load_file(out / "model.safetensors")
    ours, _ = load_pretrained(out)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval().state_dict()
    for name, entry in tensors.items():
        want = zero_count(0.3, entry["numel"])
        assert entry["zeros"] == want and entry["sparsity"] == want / entry["numel"]
        assert _zeros(written[name]) == want
        assert _zeros(ours.state_dict()[name]) == want
        assert _zeros(theirs[name]) == want
    assert _zeros(written["model.embed_tokens.weight"]) == 0  # embeddings are not pruned
    # GGUF: the RoPE permutation moves entries, never changes them; f16 keeps every survivor
    # nonzero (the 30% smallest are gone, the rest are far above f16's smallest subnormal).
    for qtype in ("f32", "f16"):
        path = write_gguf(out, tmp_path / f"pruned-{qtype}.gguf", qtype).path
        in_gguf = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
        for name, entry in tensors.items():
            assert int((np.asarray(in_gguf[gguf_name(name)].data) == 0).sum()) == entry["zeros"]
    total = sum(e["numel"] for e in tensors.values())
    assert metrics["zeros"] == sum(zero_count(0.3, e["numel"]) for e in tensors.values())
    assert metrics["sparsity"] == metrics["zeros"] / total
    assert abs(metrics["sparsity"] - 0.3) < 1e-3  # the log's bug gave 0.5
    # The bits/byte after is the reloaded artifact's, scored on the same windows.
    windows = prune.read_windows(cfg, 64)
    bytes_ = token_byte_lengths(load_tokenizer(token_data))
    rescored = score_model(ours, windows.scored, bytes_).bits_per_byte
    assert metrics["val_bpb_after"] == round(rescored, 5)
    original, _ = load_pretrained(model)
    assert metrics["val_bpb_before"] == round(
        score_model(original, windows.scored, bytes_).bits_per_byte, 5
    )
    assert metrics["val_tokens"] == 1024
    again = run_stage(prune, cfg)
    assert again.status == "up to date"


def test_global_scope_total_is_exact(token_data: Path, tmp_path: Path) -> None:
    model = _model_dir(token_data, tmp_path / "model", tie=False)
    cfg = _config(model=model, sparsity=0.45, scope="global", output=tmp_path / "pruned")
    metrics = run_stage(prune, cfg).manifest["metrics"]
    total = sum(e["numel"] for e in metrics["tensors"].values())
    assert metrics["zeros"] == zero_count(0.45, total)
    assert len({e["zeros"] for e in metrics["tensors"].values()}) > 1  # ranked together
    assert metrics["val_bpb_before"] is None  # no data: nothing scored
    written = load_file(cfg.output / "model.safetensors")  # type: ignore[operator]
    assert _zeros(written["lm_head.weight"]) == 0


def test_wanda_2_4_groups_in_the_written_tensors(token_data: Path, tmp_path: Path) -> None:
    model = _model_dir(token_data, tmp_path / "model")
    cfg = _config(model=model, data=token_data, method="wanda", structure="2:4")
    result = run_stage(prune, cfg.model_copy(update={"output": tmp_path / "pruned"}))
    metrics = result.manifest["metrics"]
    assert metrics["structure"] == "2:4" and metrics["requested_sparsity"] == 0.5
    assert metrics["calibration"] == {"windows": 8, "tokens": 512, "shared_with_eval": 0}
    written = load_file(result.output / "model.safetensors")
    for name in metrics["tensors"]:
        groups = (written[name] == 0).reshape(written[name].shape[0], -1, 4).sum(-1)
        assert bool((groups == 2).all()), name
    assert metrics["sparsity"] == 0.5


def test_depth_removes_the_block_that_adds_nothing_and_the_cache_still_works(
    token_data: Path, tmp_path: Path
) -> None:
    src = _model_dir(token_data, tmp_path / "model", layers=3)
    model, mc = load_pretrained(src)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    save_pretrained(model, mc, src, eos_token_id=load_tokenizer(token_data).token_to_id(EOS))
    cfg = _config(model=src, data=token_data, method="depth", num_blocks=1)
    result = run_stage(prune, cfg.model_copy(update={"output": tmp_path / "pruned"}))
    metrics = result.manifest["metrics"]
    assert metrics["removed_blocks"] == [1]
    assert metrics["num_layers"] == {"before": 3, "after": 2}
    assert metrics["val_bpb_after"] == metrics["val_bpb_before"]  # the block added nothing
    raw = json.loads((result.output / "config.json").read_text())
    assert raw["num_hidden_layers"] == 2
    assert not any(
        k.startswith("model.layers.2.") for k in load_file(result.output / "model.safetensors")
    )
    pruned, _ = load_pretrained(result.output)
    idx = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(pruned(idx), model(idx))
        theirs = AutoModelForCausalLM.from_pretrained(result.output).eval()
        torch.testing.assert_close(theirs(idx).logits, pruned(idx), atol=1e-4, rtol=0)

    prompt = idx[0, :12].tolist()
    cached = list(generate(pruned, prompt, max_new_tokens=20))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(pruned(torch.tensor([ids]))[0, -1].argmax()))
    assert cached == ids[len(prompt) :]


def test_depth_named_blocks_without_data(token_data: Path, tmp_path: Path) -> None:
    src = _model_dir(token_data, tmp_path / "model", layers=3)
    cfg = _config(model=src, method="depth", blocks=[0], output=tmp_path / "pruned")
    result = run_stage(prune, cfg)
    assert result.manifest["metrics"]["removed_blocks"] == [0]
    before = load_file(src / "model.safetensors")
    after = load_file(result.output / "model.safetensors")
    assert torch.equal(
        after["model.layers.0.mlp.up_proj.weight"], before["model.layers.1.mlp.up_proj.weight"]
    )
    assert torch.equal(
        after["model.layers.1.mlp.up_proj.weight"], before["model.layers.2.mlp.up_proj.weight"]
    )
