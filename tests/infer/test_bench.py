"""`albor bench`: latency figures for every variant of a model, in and out of process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from albor.errors import ConfigError
from albor.infer.bench import BenchSettings, bench, percentile, variants
from albor.model.gguf import write_gguf
from helpers import run


def _check(result: dict, prompt_tokens: int) -> None:
    d = result["decode_ms_per_token"]
    assert 0 < d["p50"] <= d["p95"] and d["mean"] > 0
    assert result["ttft_ms"] > 0 and result["peak_rss_mb"] > 10
    # Prefill rate is the prompt over the time to first token.
    assert result["prefill_tokens_per_s"] == pytest.approx(
        prompt_tokens / (result["ttft_ms"] / 1000), rel=0.01
    )
    assert result["decode_tokens_per_s"] == pytest.approx(1000 / d["mean"], rel=0.01)


def test_bench_torch_dtypes_in_process(trained_model: Path) -> None:
    settings = BenchSettings(prompt_tokens=32, new_tokens=8, repeats=2, threads=1, isolate=False)
    report = bench(trained_model, settings)
    assert report["prompt_tokens"] == 32 and report["new_tokens"] == 8
    rows = report["results"]
    assert [(r["backend"], r["dtype"]) for r in rows] == [
        ("torch", "float32"),
        ("torch", "bfloat16"),
    ]
    assert rows[0]["weights_bytes"] == (trained_model / "model.safetensors").stat().st_size
    for r in rows:
        _check(r, 32)


def test_bench_rejects_what_it_cannot_time(trained_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="context of 128"):
        bench(trained_model, BenchSettings(prompt_tokens=120, new_tokens=20, isolate=False))
    with pytest.raises(ConfigError, match="no model to bench"):
        bench(tmp_path, BenchSettings(isolate=False))
    with pytest.raises(ConfigError, match="dtypes"):
        BenchSettings(dtypes=("int4",))
    with pytest.raises(ConfigError, match="new_tokens"):
        BenchSettings(new_tokens=1)


def test_percentile() -> None:
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(xs, 50) == 3.0 and percentile(xs, 0) == 1.0 and percentile(xs, 100) == 5.0
    assert percentile(xs, 95) == pytest.approx(4.8)


@pytest.mark.llamacpp
def test_bench_cli_on_an_export_dir(
    trained_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = tmp_path / "export"
    shutil.copytree(trained_model, export / "hf", ignore=shutil.ignore_patterns("checkpoint*"))
    write_gguf(export / "hf", export / "model-q8_0.gguf", "q8_0")
    assert [v.label for v in variants(export, ("float32",))] == [
        "model-q8_0.gguf",
        "hf (float32)",
    ]
    argv = ["bench", str(export), "--prompt-tokens", "24", "--new-tokens", "6"]
    argv += ["--repeats", "1", "--threads", "1", "--dtype", "float32", "--json"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["isolated"] is True  # each variant ran in its own process
    gguf, torch_row = report["results"]
    assert gguf["backend"] == "llama.cpp" and torch_row["backend"] == "torch"
    assert gguf["weights_bytes"] == (export / "model-q8_0.gguf").stat().st_size
    for r in report["results"]:
        _check(r, 24)
