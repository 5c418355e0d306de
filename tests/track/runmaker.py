"""Synthetic training run dirs written the way the loop and the stage runner write them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from albor.artifact import atomic_write_json
from albor.track import metrics

TOKENS_PER_STEP = 2048


def pretrain_config(**overrides: Any) -> dict[str, Any]:
    """A pretrain stage config as a manifest records it (resolved, without `output`)."""
    config: dict[str, Any] = {
        "data": "/tmp/tokenize",
        "model": "tiny",
        "architecture": {"num_layers": 2, "hidden_size": 64},
        "micro_batch": 8,
        "grad_accum": 1,
        "max_steps": 100,
        "warmup_steps": 10,
        "lr": 3e-4,
        "log_every": 10,
        "eval_every": 50,
    }
    for key, value in overrides.items():
        config[key] = value
    return config


def loss_at(step: int, scale: float = 1.0) -> float:
    return round(2.0 + 4.0 * math.exp(-step / (30 * scale)), 5)


def metric_lines(
    steps: range, *, scale: float = 1.0, eval_every: int = 50, start_elapsed: float = 0.0
) -> list[dict[str, Any]]:
    """The metrics.jsonl records of `steps` (each a logged step), evaluations included."""
    lines: list[dict[str, Any]] = []
    for step in steps:
        lines.append(
            {
                "step": step,
                "loss": loss_at(step, scale),
                "lr": 3e-4 * min(step / 10, 1.0),
                "grad_norm": round(1.0 / (1 + step / 50), 4),
                "tokens": step * TOKENS_PER_STEP,
                "tokens_per_s": 1000.0,
                "elapsed_s": round(start_elapsed + step * TOKENS_PER_STEP / 1000.0, 2),
            }
        )
        if step % eval_every == 0:
            val = loss_at(step, scale) + 0.1
            lines.append(
                {
                    "step": step,
                    "val_loss": val,
                    "val_bpb": round(val / math.log(2) / 3.5, 5),
                    "val_ppl": round(math.exp(val), 3),
                    "val_tokens": 4096,
                }
            )
    return lines


def write_metrics(run_dir: Path, lines: list[dict[str, Any]], mode: str = "w") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / metrics.METRICS_FILE, mode, encoding="utf-8") as f:
        for rec in lines:
            metrics.append(f, rec)


def make_run_dir(
    run_dir: Path,
    *,
    max_steps: int = 100,
    scale: float = 1.0,
    started_at: str = "2025-01-02T03:04:05+00:00",
    manifest: bool = True,
    **config: Any,
) -> Path:
    """A finished pretrain run dir: metrics.jsonl for every 10th step and a manifest."""
    cfg = pretrain_config(max_steps=max_steps, **config)
    lines = metric_lines(range(10, max_steps + 1, 10), scale=scale)
    write_metrics(run_dir, lines)
    if manifest:
        evals = [r for r in lines if "val_loss" in r]
        atomic_write_json(
            run_dir / "manifest.json",
            {
                "albor_manifest": 1,
                "stage": "pretrain",
                "name": run_dir.name,
                "fingerprint": f"fp-{run_dir.name}-{scale}",
                "config": cfg,
                "inputs": [],
                "outputs": [],
                "metrics": {
                    "steps": max_steps,
                    "tokens": max_steps * TOKENS_PER_STEP,
                    "final_loss": loss_at(max_steps, scale),
                    "first_loss": loss_at(10, scale),
                    "tokens_per_s": 1000.0,
                    **{k: v for k, v in evals[-1].items() if k != "step"},
                },
                "summary": "synthetic",
                "started_at": started_at,
                "wall_time_s": max_steps * TOKENS_PER_STEP / 1000.0,
            },
        )
    return run_dir
