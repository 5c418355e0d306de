"""A ladder workdir in miniature for the report tests, written in the stage runner's format.

Every artifact has the manifest `albor.stage.run_stage` writes (outputs hashed with
`describe_outputs`, digest with `outputs_digest`, absolute input paths with their digests),
`pipeline.json` and `.albor-pipeline.json` as `albor pipeline apply` writes them, training
stages a `metrics.jsonl` in the trainer's line format, evaluate stages `metrics.json` in
evaluate's layout, and model stages a real safetensors file (the report counts parameters from
its header). No model is trained: the report only reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from albor.artifact import MANIFEST, atomic_write_json, describe_outputs, outputs_digest

HOSTILE = "<script>alert('pwned')</script>"
HOSTILE_STAGE = "eval-<img src=x onerror=alert(1)>"

# node name -> (kind, needs)
LADDER: dict[str, tuple[str, list[str]]] = {
    "ingest": ("ingest", []),
    "clean": ("clean", ["ingest"]),
    "split": ("split", ["clean"]),
    "tokenize": ("tokenize", ["split"]),
    "teacher": ("pretrain", ["tokenize"]),
    "distill": ("distill", ["tokenize", "teacher"]),
    "instruct": ("finetune", ["distill"]),
    "merged": ("merge", ["instruct", "distill"]),
    "pruned": ("prune", ["merged", "tokenize"]),
    "quantize": ("quantize", ["pruned", "tokenize"]),
    "eval-teacher": ("evaluate", ["teacher", "tokenize"]),
    "eval-distill": ("evaluate", ["distill", "tokenize"]),
    "eval-pruned": ("evaluate", ["pruned", "tokenize"]),
    "eval-int8": ("evaluate", ["quantize", "tokenize"]),
    "export": ("export", ["pruned"]),
    "report": ("report", ["eval-teacher", "eval-distill", "eval-pruned", "eval-int8"]),
    "publish": ("publish", ["pruned", "report"]),
}

# Data stages: counts in the runner's layout and the byte figures their metrics carry.
COUNTS: dict[str, dict[str, Any]] = {
    "ingest": {"in": 100, "kept": 95, "rejected": {"empty": 4, "invalid_utf8": 1}},
    "clean": {"in": 95, "kept": 80, "rejected": {"long_line": 5, "syntax_error": 10}},
    "split": {"in": 80, "kept": 80, "rejected": {}},
    "tokenize": {"in": 80, "kept": 80, "rejected": {}},
}
DATA_METRICS: dict[str, dict[str, Any]] = {
    "ingest": {"bytes_kept": 950_000},
    "clean": {
        "bytes_in": 950_000,
        "bytes_kept": 800_000,
        "rejected_bytes": {"long_line": 50_000, "syntax_error": 100_000},
    },
    "split": {
        "documents": {"train": 70, "val": 5, "test": 5},
        "bytes": {"train": 700_000, "val": 50_000, "test": 50_000},
    },
    "tokenize": {"bytes": {"train": 700_000, "val": 50_000, "test": 50_000}},
}

# Model sizes (hidden, vocab): the report counts their parameters from the safetensors headers.
MODEL_DIMS = {
    "teacher": (16, 64),
    "distill": (8, 64),
    "instruct": (8, 64),
    "merged": (8, 64),
    "pruned": (8, 64),
}

EVALS: dict[str, dict[str, Any]] = {
    "eval-teacher": {
        "perplexity": {"split": "val", "loss": 2.9, "bits_per_byte": 1.30, "tokens": 4096},
        "pairs": {"split": "val", "bits_per_byte": 1.80, "pairs": 40},
        "humaneval": {"problems": 10, "n": 1, "pass@1": 0.2},
        "humaneval-infill": {"single-line": {"psm": {"tasks": 10, "exact_match": 0.3}}},
        "speed": {"decode_ms_per_token": 9.0, "device": "cpu"},
    },
    "eval-distill": {
        "perplexity": {"split": "val", "loss": 3.1, "bits_per_byte": 1.45, "tokens": 4096},
        "pairs": {"split": "val", "bits_per_byte": 1.95, "pairs": 40},
        "humaneval": {"problems": 10, "n": 1, "pass@1": 0.1},
        "humaneval-infill": {"single-line": {"psm": {"tasks": 10, "exact_match": 0.2}}},
        "speed": {"decode_ms_per_token": 3.0, "device": "cpu"},
    },
    "eval-pruned": {
        "perplexity": {"split": "val", "loss": 3.2, "bits_per_byte": 1.50, "tokens": 4096},
        "pairs": {"split": "val", "bits_per_byte": 2.00, "pairs": 40},
        "humaneval": {"problems": 10, "n": 1, "pass@1": 0.1},
        "humaneval-infill": {"single-line": {"psm": {"tasks": 10, "exact_match": 0.1}}},
        "speed": {"decode_ms_per_token": 3.5, "device": "cpu"},  # slower and worse: dominated
    },
    "eval-int8": {
        "perplexity": {"split": "val", "loss": 3.25, "bits_per_byte": 1.52, "tokens": 4096},
        "speed": {"decode_ms_per_token": 2.0, "device": "cpu"},
    },
}
QUANT_VARIANTS = {
    "full": {
        "bytes_disk": 20_000,
        "val_bpb": 1.50,
        "kl_mean": 0.0,
        "top1_agreement": 1.0,
        "decode_ms_per_token": 3.5,
    },
    "int8": {
        "bytes_disk": 8_000,
        "val_bpb": 1.51,
        "kl_mean": 0.001,
        "top1_agreement": 0.99,
        "decode_ms_per_token": 2.0,
    },
    "gguf-q4_k_m": {
        "bytes_disk": 4_000,
        "val_bpb": 1.56,
        "kl_mean": 0.02,
        "top1_agreement": 0.92,
        "decode_ms_per_token": 0.3,
    },
}


def _weights(directory: Path, hidden: int, vocab: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "model.embed_tokens.weight": np.zeros((vocab, hidden), np.float32),
            "model.layers.0.mlp.up_proj.weight": np.ones((2 * hidden, hidden), np.float32),
            "model.norm.weight": np.ones((hidden,), np.float32),
        },
        str(directory / "model.safetensors"),
    )


def model_parameters(name: str) -> int:
    hidden, vocab = MODEL_DIMS[name]
    return vocab * hidden + 2 * hidden * hidden + hidden


def _curve(directory: Path, kind: str, steps: int) -> None:
    lines = []
    for step in range(10, steps + 1, 10):
        row: dict[str, Any] = {
            "step": step,
            "loss": 6.0 - step / 40,
            "lr": 3e-4,
            "grad_norm": 1.5,
            "tokens": step * 512,
            "tokens_per_s": 500.0,
            "elapsed_s": step * 0.5,
        }
        if kind == "distill":
            row.update(kl=0.5, ce=5.0)
        lines.append(json.dumps(row))
    lines.append(
        json.dumps(
            {"step": steps, "val_loss": 5.0, "val_bpb": 1.4, "val_ppl": 148.4, "val_tokens": 4096}
        )
    )
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _manifest(
    root: Path,
    name: str,
    kind: str,
    needs: list[str],
    *,
    config: dict[str, Any],
    counts: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    summary: str = "",
    started: int = 0,
) -> None:
    directory = root / name
    outputs = describe_outputs(directory)
    input_names = {
        "evaluate": ["model", "data"],
        "quantize": ["model", "data"],
        "prune": ["model", "data"],
        "export": ["model"],
        "distill": ["data", "teacher"],
        "finetune": ["base"],
        "merge": ["models", "models"],
    }
    names = input_names.get(kind, ["input"] * len(needs))
    inputs = []
    for field, up in zip(names, needs, strict=False):
        up_manifest = (
            json.loads((root / up / MANIFEST).read_text())
            if (root / up / MANIFEST).is_file()
            else {}
        )
        inputs.append({"name": field, "path": str(root / up), "digest": up_manifest.get("digest")})
    atomic_write_json(
        directory / MANIFEST,
        {
            "albor_manifest": 1,
            "stage": kind,
            "name": name,
            "fingerprint": f"{abs(hash((name, kind))):064x}"[:64],
            "digest": outputs_digest(outputs),
            "config": config,
            "inputs": inputs,
            "outputs": outputs,
            "counts": counts,
            "metrics": metrics or {},
            "summary": summary,
            "versions": {"albor": "0.test", "python": "3.11"},
            "started_at": f"2026-12-04T21:{started:02d}:00+00:00",
            "wall_time_s": 1.5 + started,
        },
    )


def build_workdir(
    root: Path,
    *,
    failed: str | None = None,
    missing: tuple[str, ...] = (),
    hostile: bool = False,
    unbalanced: bool = False,
    layout: bool = True,
) -> Path:
    """Write the ladder under `root` (the workdir) and return it. `failed`: a stage recorded as
    failed in .albor-pipeline.json and without artifact; `missing`: stages that never ran;
    `hostile`: markup in a description, a config, an error and an evaluate stage's name;
    `unbalanced`: clean's counts do not add up; `layout`: write pipeline.json."""
    root.mkdir(parents=True, exist_ok=True)
    ladder = dict(LADDER)
    evals = dict(EVALS)
    if hostile:
        ladder[HOSTILE_STAGE] = ("evaluate", ["distill", "tokenize"])
        evals[HOSTILE_STAGE] = EVALS["eval-distill"]
    skipped = {*missing, *([failed] if failed else []), "report", "publish"}
    state: dict[str, Any] = {}
    for i, (name, (kind, needs)) in enumerate(ladder.items()):
        if name in skipped:
            continue
        directory = root / name
        directory.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {"seed": i}
        counts = None
        metrics: dict[str, Any] = {}
        if kind in ("ingest", "clean", "split", "tokenize"):
            (directory / "corpus.parquet").write_bytes(f"{name} rows".encode())
            counts = json.loads(json.dumps(COUNTS[name]))
            if unbalanced and name == "clean":
                counts["kept"] += 3  # the bug the report must point out
            metrics = DATA_METRICS[name]
        elif name in MODEL_DIMS:
            _weights(directory, *MODEL_DIMS[name])
            if kind in ("pretrain", "distill", "finetune"):
                _curve(directory, kind, 40)
                metrics = {"parameters": model_parameters(name), "steps": 40, "val_bpb": 1.4}
            config = {"model": HOSTILE if hostile and name == "teacher" else "demo", "seed": i}
        elif kind == "quantize":
            _weights(directory / "int8", 8, 16)  # packed: its header is not the model's shape
            (directory / "model-q4_k_m.gguf").write_bytes(b"GGUF" + b"\0" * 60)
            metrics = {"variants": QUANT_VARIANTS}
        elif kind == "evaluate":
            (directory / "metrics.json").write_text(json.dumps(evals[name]), encoding="utf-8")
            metrics = evals[name]
            if name == "eval-int8":
                config["variant"] = "int8"
        elif kind == "export":
            (directory / "model-f16.gguf").write_bytes(b"GGUF" + b"\1" * 60)
        _manifest(
            root,
            name,
            kind,
            needs,
            config=config,
            counts=counts,
            metrics=metrics,
            summary=f"{name} done",
            started=i,
        )
        state[name] = {
            "status": "done",
            "started_at": "2026-12-04T21:00:00+00:00",
            "wall_time_s": 1.0,
        }
    if failed:
        error = f"{failed}: StageFailed: out of memory" + (f" {HOSTILE}" if hostile else "")
        state[failed] = {
            "status": "failed",
            "error": error,
            "started_at": "2026-12-04T21:00:00+00:00",
        }
    if layout:
        atomic_write_json(
            root / "pipeline.json",
            {
                "name": "ladder-test",
                "description": "A miniature ladder" + (f" {HOSTILE}" if hostile else ""),
                "source": "test",
                "stages": [{"name": n, "uses": k, "needs": nd} for n, (k, nd) in ladder.items()],
            },
        )
    atomic_write_json(root / ".albor-pipeline.json", state)
    return root
