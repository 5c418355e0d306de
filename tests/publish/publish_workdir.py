"""A ladder workdir in miniature for the publish tests: real tiny checkpoints (distill, instruct,
merged, pruned), an export of `pruned` (hf/ and a GGUF F16 written by albor's writers), a
quantize output (GGUF Q8_0 and albor's int8 directory), evaluate outputs in evaluate's
metrics.json layout, and a report with PNG plots its model card shows. Each artifact carries the
manifest the stage runner writes, so publish reads them as it reads a pipeline's."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch

from albor.artifact import (
    MANIFEST,
    artifact_digest,
    atomic_write_json,
    describe_outputs,
    outputs_digest,
)
from albor.data.bpe import EOS_ID, save_hf_files, train_bpe
from albor.model.gpt import GPT
from albor.model.hf import save_pretrained
from albor.model.presets import preset
from helpers import STDLIB, STDLIB_SAMPLE

CHECKPOINTS = {
    # node name -> (stage, upstream node names)
    "distill": ("distill", []),
    "instruct": ("finetune", ["distill"]),
    "merged": ("merge", ["instruct", "distill"]),
    "pruned": ("prune", ["merged"]),
}

# Evaluate figures in evaluate's metrics.json layout (task name -> metrics), per variant.
EVAL_METRICS: dict[str, dict[str, Any]] = {
    "distill": {
        "perplexity": {"split": "val", "loss": 3.1, "bits_per_byte": 1.4321, "tokens": 4096},
        "pairs": {"split": "val", "bits_per_byte": 1.9876, "pairs": 40},
        "humaneval": {"problems": 10, "n": 1, "pass@1": 0.1},
        "humaneval-infill": {
            "single-line": {"psm": {"tasks": 10, "exact_match": 0.2, "pass_rate": 0.3}}
        },
        "speed": {"decode_ms_per_token": 3.25, "device": "cpu"},
    },
    "pruned": {
        "perplexity": {"split": "val", "loss": 3.3, "bits_per_byte": 1.5555, "tokens": 4096},
        "humaneval": {"problems": 10, "n": 1, "pass@1": 0.0},
    },
}
TASKS = [
    {"task": "perplexity", "name": None},
    {"task": "pairs", "name": None},
    {"task": "humaneval", "name": None},
    {"task": "humaneval-infill", "name": None},
    {"task": "speed", "name": None},
]


def write_manifest(
    directory: Path,
    stage: str,
    *,
    config: dict[str, Any] | None = None,
    inputs: dict[str, Path] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """The manifest `albor.stage.run_stage` writes, for files already in `directory`."""
    outputs = describe_outputs(directory)
    atomic_write_json(
        directory / MANIFEST,
        {
            "albor_manifest": 1,
            "stage": stage,
            "name": directory.name,
            "fingerprint": "0" * 64,
            "digest": outputs_digest(outputs),
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in (config or {}).items()},
            "inputs": [
                {"name": k, "path": str(p), "digest": artifact_digest(p)}
                for k, p in (inputs or {}).items()
            ],
            "outputs": outputs,
            "counts": None,
            "metrics": metrics or {},
            "summary": "",
            "versions": {},
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "wall_time_s": 0.1,
        },
    )
    return directory


def _png(path: Path, values: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5), dpi=50)
    ax.plot(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from albor.model.gguf import write_gguf
    from albor.model.quantized import Spec, save_quantized

    root = tmp_path_factory.mktemp("publish_workdir")
    texts = [(STDLIB / name).read_text(encoding="utf-8") for name in STDLIB_SAMPLE]
    tok = train_bpe(texts, 300)
    vocab = tok.get_vocab_size()
    models: dict[str, GPT] = {}
    for seed, (name, (stage, upstream)) in enumerate(CHECKPOINTS.items()):
        torch.manual_seed(seed)
        model = GPT(preset("tiny", vocab_size=vocab)).eval()
        models[name] = model
        d = root / name
        save_pretrained(model, model.cfg, d, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
        save_hf_files(tok, d)
        (d / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')  # not a model file
        inputs = {f"model{i}": root / up for i, up in enumerate(upstream)}
        params = sum(p.numel() for p in model.parameters())
        write_manifest(
            d, stage, config={"seed": seed}, inputs=inputs, metrics={"parameters": params}
        )

    pruned = root / "pruned"
    export = root / "export"
    save_pretrained(models["pruned"], models["pruned"].cfg, export / "hf", eos_token_id=EOS_ID)
    save_hf_files(tok, export / "hf")
    (export / "hf" / "generation_config.json").write_text(
        json.dumps({"eos_token_id": EOS_ID, "pad_token_id": EOS_ID, "do_sample": False})
    )
    write_gguf(pruned, export / "model-f16.gguf", "f16", name="pruned")
    write_manifest(
        export,
        "export",
        config={"model": pruned, "formats": ["hf", "f16"]},
        inputs={"model": pruned},
    )

    quantize = root / "quantize"
    write_gguf(pruned, quantize / "model-q8_0.gguf", "q8_0", name="pruned")
    raw = json.loads((pruned / "config.json").read_text())
    save_quantized(models["pruned"], Spec("int8"), quantize / "int8", raw)
    save_hf_files(tok, quantize / "int8")
    variants = {
        "full": {"path": str(pruned), "bytes_disk": 1000, "val_bpb": 1.55, "kl_mean": 0.0},
        "int8": {"path": "int8", "bytes_disk": 400, "val_bpb": 1.56, "kl_mean": 0.0001},
        "gguf-q8_0": {"path": "model-q8_0.gguf", "bytes_disk": 300, "val_bpb": 1.557},
    }
    write_manifest(
        quantize,
        "quantize",
        config={"model": pruned, "variants": ["int8", "gguf-q8_0"]},
        inputs={"model": pruned},
        metrics={"variants": variants},
    )

    for name, metrics in EVAL_METRICS.items():
        d = root / f"eval-{name}"
        d.mkdir()
        atomic_write_json(d / "metrics.json", metrics)
        tasks = [t for t in TASKS if t["task"] in metrics]
        write_manifest(
            d,
            "evaluate",
            config={"model": root / name, "variant": None, "tasks": tasks},
            inputs={"model": root / name},
            metrics=metrics,
        )
    d = root / "eval-int8"
    d.mkdir()
    int8_metrics = {"perplexity": {"split": "val", "bits_per_byte": 1.5601}}
    atomic_write_json(d / "metrics.json", int8_metrics)
    write_manifest(
        d,
        "evaluate",
        config={"model": quantize, "variant": "int8", "tasks": [TASKS[0]]},
        inputs={"model": quantize},
        metrics=int8_metrics,
    )

    report = root / "report"
    _png(report / "plots" / "loss.png", [5.0, 4.0, 3.5])
    _png(report / "plots" / "ladder.png", [1.4, 1.5, 1.6])
    _png(report / "plots" / "unused.png", [1.0])
    (report / "model-card.md").write_text(
        "# The ladder\n\n![loss curves](plots/loss.png)\n\n"
        '<img src="plots/ladder.png" alt="ladder">\n'
    )
    (report / "index.html").write_text("<html><body>report</body></html>\n")
    write_manifest(report, "report", inputs={"stages": root / "eval-distill"})
    return root
