"""quantize: plan checks, FALSIFY-ALBOR-009 on a trained model, the manifest's rows, the quantized
directories through the loader and the CLI, the GGUF variants with their parity gate and an
importance matrix, and export refusing what quantize now makes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from albor.data.bpe import TOKENIZER_FILES
from albor.errors import ArtifactError, StageFailed
from albor.infer.bench import BenchSettings, Variant, bench_variant
from albor.infer.engine import TorchBackend
from albor.infer.loader import load
from albor.model.load import find_models, load_model
from albor.model.quantized import Int4Linear, Int8Linear, memory_bytes
from albor.model.transforms import quantize as tq
from albor.stage import PlanContext, run_stage
from albor.stages import quantize
from helpers import pretrain_config, run

ROW_KEYS = {
    "bytes_disk",
    "bytes_memory",
    "val_bpb",
    "val_bpb_increase",
    "kl_mean",
    "top1_agreement",
    "decode_ms_per_token",
    "reduction_vs_fp32",
}


def _config(**fields: Any) -> quantize.Config:
    base: dict[str, Any] = {
        "eval_tokens": 2048,
        "seq_len": 64,
        "threads": 1,
        "bench_prompt_tokens": 16,
        "bench_new_tokens": 4,
        "bench_repeats": 1,
        "parity_prompts": 8,
        "parity_texts": 4,
    }
    return quantize.Config.model_validate({**base, **fields})


@pytest.fixture(scope="module")
def grouped_model(token_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset trained on `token_data`, its FFN 192 wide so that every projection's
    inputs split into int4 groups of 32 (tiny's own 176 does not)."""
    from albor.stage import load_stage

    out = tmp_path_factory.mktemp("grouped") / "pretrain"
    cfg = pretrain_config(
        token_data,
        out,
        architecture={"intermediate_size": 192},
        micro_batch=8,
        max_steps=150,
        warmup_steps=10,
        lr=1e-2,
        eval_tokens=0,
        checkpoint_every=150,
        threads=1,
    )
    return run_stage(load_stage("pretrain"), cfg).output


def test_plan_checks(trained_model: Path, token_data: Path, tmp_path: Path) -> None:
    ok = quantize.plan(
        _config(model=trained_model, data=token_data, variants=["int8", "gguf-q8_0"])
    )
    assert ok.ok, ok.summary()
    e = ok.estimates
    assert e["bytes_int8"] < e["fp32_bytes"] and e["bytes_gguf-q8_0"] < e["fp32_bytes"]

    odd = quantize.plan(_config(model=trained_model, data=token_data, variants=["int4"]))
    assert [c.name for c in odd.failures] == ["group_size"]
    detail = odd.failures[0].detail
    assert "model.layers.0.mlp.down_proj.weight (176 inputs)" in detail
    assert "set group_size to a divisor" in detail

    warned = quantize.plan(
        _config(model=trained_model, data=token_data, variants=["int8"], imatrix=True)
    )
    assert next(c for c in warned.checks if c.name == "imatrix").status == "warn"

    no_data = quantize.plan(_config(model=trained_model, variants=["int8"]))
    assert [c.name for c in no_data.failures] == ["data"]
    missing = quantize.plan(_config(model=tmp_path / "nope", data=token_data))
    assert [c.name for c in missing.failures] == ["model"]
    pending = quantize.plan(
        _config(model=tmp_path / "later", data=tmp_path / "later_data"),
        PlanContext({"model": "pretrain", "data": "tokenize"}),
    )
    assert pending.ok


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"variants": ["int3"]}, "'int8', 'int4', 'gguf-q8_0', 'gguf-q4_0' or 'gguf-q4_k_m'"),
        ({"variants": []}, "variants is empty"),
        ({"group_size": 64}, "32 or 128"),
    ],
)
def test_config_rules_name_the_choices(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        quantize.Config.model_validate(fields)


def test_falsify_albor_009_int8_and_int4_keep_bits_per_byte(
    grouped_model: Path,
    token_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = _config(
        model=grouped_model,
        data=token_data,
        variants=["int8", "int4"],
        output=tmp_path / "q",
    )
    result = run_stage(quantize, cfg)
    out = result.output
    want = {"config.json", "model.safetensors", *TOKENIZER_FILES}
    assert {p.name for p in (out / "int8").iterdir()} >= want
    assert {p.name for p in out.iterdir()} == {"int8", "int4", "manifest.json"}
    rows = result.manifest["metrics"]["variants"]
    assert list(rows) == ["full", "int8", "int4"]
    for row in rows.values():
        assert set(row) >= ROW_KEYS
        assert row["kl_mean"] >= 0 and 0 <= row["top1_agreement"] <= 1
        assert row["decode_ms_per_token"] > 0
    full = rows["full"]
    assert full["kl_mean"] == 0 and full["top1_agreement"] == 1
    # FALSIFY-ALBOR-009: int8 within 1% of the full model's bits/byte, int4 within 10%.
    assert abs(rows["int8"]["val_bpb"] / full["val_bpb"] - 1) <= 0.01, rows
    assert abs(rows["int4"]["val_bpb"] / full["val_bpb"] - 1) <= 0.10, rows
    assert rows["int8"]["kl_mean"] < rows["int4"]["kl_mean"]
    assert rows["int8"]["top1_agreement"] > 0.95
    sizes = [full["bytes_disk"], rows["int8"]["bytes_disk"], rows["int4"]["bytes_disk"]]
    assert sizes == sorted(sizes, reverse=True)
    assert rows["int8"]["bytes_disk"] == (out / "int8" / "model.safetensors").stat().st_size
    assert rows["int4"]["bytes_memory"] < full["bytes_memory"]
    assert result.manifest["metrics"]["val_tokens"] == 2048

    # The config entry and the packed tensors.
    config = json.loads((out / "int4" / "config.json").read_text())
    assert config["quantization"]["method"] == "int4"
    assert (
        config["quantization"]["group_size"] == 32 and len(config["quantization"]["modules"]) == 14
    )
    tensors = load_file(out / "int4" / "model.safetensors")
    down = "model.layers.0.mlp.down_proj"
    assert tensors[f"{down}.qweight"].dtype == torch.uint8
    assert tuple(tensors[f"{down}.qweight"].shape) == (64, 96)
    assert f"{down}.weight" not in tensors and "model.embed_tokens.weight" in tensors

    # The loader builds quantized linears that compute the dequantized weights' product.
    model, _ = load_model(out / "int4")
    linear = model.get_submodule(down)
    assert isinstance(linear, Int4Linear)
    x = torch.randn(3, 192)
    weight = tq.int4_dequantize(
        tensors[f"{down}.qweight"], tensors[f"{down}.scales"], tensors[f"{down}.mins"], 32
    )
    torch.testing.assert_close(linear(x), x @ weight.T, atol=1e-4, rtol=1e-4)
    assert memory_bytes(model) == rows["int4"]["bytes_memory"]
    int8 = load(out / "int8")
    assert isinstance(int8, TorchBackend)
    assert isinstance(int8.model.get_submodule(down), Int8Linear)

    # `albor complete`, `bench` (and `serve`, through the same loader) take the directories.
    code, text, err = run(
        ["complete", str(out / "int4"), "def ", "--max-tokens", "8", "--json"], capsys
    )
    assert code == 0, err
    assert isinstance(json.loads(text)["completion"], str)
    assert [r.kind for r in find_models(out)] == ["torch", "torch"]
    timed = bench_variant(
        Variant(str(out / "int8"), "torch", "bfloat16"),
        BenchSettings(prompt_tokens=8, new_tokens=3, repeats=1, isolate=False),
    )
    assert timed["decode_ms_per_token"]["p50"] > 0
    assert run_stage(quantize, cfg).status == "up to date"

    # A corrupt or mismatched file is named, with the fix.
    broken = tmp_path / "broken"
    shutil.copytree(out / "int8", broken)
    del tensors  # the int4 file's; the int8 one is rewritten without a scale
    int8_tensors = load_file(broken / "model.safetensors")
    del int8_tensors[f"{down}.scales"]
    save_file(int8_tensors, str(broken / "model.safetensors"))
    with pytest.raises(ArtifactError, match=rf"lacks {down}.scales.*quantize stage"):
        load_model(broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        load_model(broken)

    # A quantized directory is not an input: quantize the full model.
    again = quantize.plan(_config(model=out / "int8", data=token_data, variants=["int8"]))
    assert [c.name for c in again.failures] == ["model"]
    assert "already quantized" in again.failures[0].detail


@pytest.mark.llamacpp
def test_gguf_variants_with_parity_and_an_importance_matrix(
    trained_model: Path, token_data: Path, tmp_path: Path
) -> None:
    cfg = _config(
        model=trained_model,
        data=token_data,
        variants=["gguf-q8_0", "gguf-q4_k_m"],
        imatrix=True,
        calibration_tokens=1024,
        output=tmp_path / "q",
    )
    result = run_stage(quantize, cfg)
    out = result.output
    assert {p.name for p in out.iterdir()} == {
        "model-q8_0.gguf",
        "model-q4_k_m.gguf",
        "manifest.json",
    }
    metrics = result.manifest["metrics"]
    rows = metrics["variants"]
    assert list(rows) == ["full", "gguf-q8_0", "gguf-q4_k_m"]
    q8, q4 = rows["gguf-q8_0"], rows["gguf-q4_k_m"]
    for row in (q8, q4):
        assert set(row) >= ROW_KEYS
        assert row["parity"]["tokenization"]["mismatched_texts"] == 0
        assert row["parity"]["top1_positions"] > 0
    assert q8["parity"]["top1_agreement_tie_aware"] >= 0.99
    assert q8["bytes_disk"] == (out / "model-q8_0.gguf").stat().st_size
    assert abs(q8["val_bpb"] / rows["full"]["val_bpb"] - 1) <= 0.01
    assert q4["imatrix"] is True and q8["imatrix"] is False
    # Every linear of the blocks (7 per block, 2 blocks); the tied head is the embedding.
    assert metrics["imatrix"] == {"tensors": 14, "calibration_tokens": 1024}
    assert metrics["parity"]["source"] == f"val split of {token_data}"
    assert not list(out.glob(".model-f16*"))  # the quantizer's input is not an output


FED_BY_NORMS = tuple(f"{p}_proj.weight" for p in ("q", "k", "v", "gate", "up"))


@pytest.mark.llamacpp
def test_q8_0_that_misses_top1_fails_naming_the_figures(
    trained_model: Path, token_data: Path, tmp_path: Path
) -> None:
    """Outliers the model never uses leave Q8_0 too coarse a step for the weights it does use:
    channels 0 and 32 of the norms feeding q/k/v and gate/up are zeroed, so huge weights in
    those input columns change nothing in fp32, but each is the absmax of its block of 32, and
    Q8_0 rounds the 31 other weights of the block to a few levels."""
    model = tmp_path / "outliers"
    shutil.copytree(trained_model, model)
    state = load_file(str(model / "model.safetensors"))
    for name, w in state.items():
        if name.endswith("layernorm.weight"):
            w[[0, 32]] = 0.0
        elif name.endswith(FED_BY_NORMS):
            w[:, [0, 32]] = w.abs().amax() * 100
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})
    cfg = _config(model=model, data=token_data, variants=["gguf-q8_0"], output=tmp_path / "q")
    with pytest.raises(StageFailed) as e:
        run_stage(quantize, cfg)
    message = str(e.value)
    got = re.search(r"q8_0: top-1 agreement with albor (\d+\.\d+)% over (\d+) positions", message)
    assert got and float(got[1]) < 99 and int(got[2]) > 0, message
    assert "needs 99%" in message and "llama.cpp tokenizes" not in message
    assert not (tmp_path / "q").exists()  # a failed apply leaves no artifact
