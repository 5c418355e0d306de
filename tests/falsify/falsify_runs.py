"""Tiny real runs that the falsification tests and the run-evidence tests share.

Each builder runs real albor stages on `token_data` (the 512-token stdlib sample of
tests/conftest.py) once per session, under the session's temporary root, and returns the
artifact directory; the tests read them and never change them (copy first). Cached by path, so
both test modules get the same runs without a conftest.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from albor.stage import load_stage, run_stage
from helpers import pretrain_config

# The model the contracts are checked on: tiny, its FFN 192 wide so that int4 groups of 32
# divide every projection. Clipping at 0.5 sits inside the range its gradient norms cover
# (about 0.35 to 1.1), so a logged norm above it shows the log holds the norm before clipping.
GROUPED: dict[str, Any] = dict(
    architecture={"intermediate_size": 192},
    micro_batch=8,
    max_steps=150,
    warmup_steps=10,
    lr=1e-2,
    grad_clip=0.5,
    log_every=1,
    eval_every=150,
    eval_tokens=4096,
    checkpoint_every=150,
    threads=1,
)
# A short run that checkpoints halfway, for determinism and as the ladder's student size.
SHORT: dict[str, Any] = dict(
    max_steps=40,
    warmup_steps=4,
    checkpoint_every=20,
    eval_every=40,
    eval_tokens=1024,
    log_every=2,
    threads=1,
)


def pretrain(token_data: Path, out: Path, **overrides: Any) -> Path:
    """A finished pretrain artifact at `out` (reused when `out` already holds it)."""
    return run_stage(load_stage("pretrain"), pretrain_config(token_data, out, **overrides)).output


@functools.cache
def grouped_run(token_data: Path, root: Path) -> Path:
    return pretrain(token_data, root / "grouped", **GROUPED)


@functools.cache
def short_run(token_data: Path, root: Path, seed: int, copy: str = "a") -> Path:
    """A SHORT pretrain under `seed`; another `copy` is a second, independent run of it."""
    return pretrain(token_data, root / f"short-{seed}-{copy}", **SHORT, seed=seed)


@functools.cache
def distill_run(token_data: Path, root: Path) -> Path:
    """A student of SHORT's shape and steps distilled online from `grouped_run`."""
    from albor.stages import distill

    base = pretrain_config(token_data, root / "distill", **SHORT).model_dump(mode="json")
    cfg = distill.Config.model_validate(
        {**base, "teacher": str(grouped_run(token_data, root)), "top_k": 16}
    )
    return run_stage(load_stage("distill"), cfg).output


@functools.cache
def logits_run(token_data: Path, root: Path) -> Path:
    """`grouped_run`'s top-16 next-token rows of every train window of 64 tokens."""
    from albor.stages import teacher_logits

    cfg = teacher_logits.Config(
        data=token_data,
        teacher=grouped_run(token_data, root),
        output=root / "teacher_logits",
        seq_len=64,
        top_k=16,
        device="cpu",
        precision="fp32",
        threads=1,
    )
    return run_stage(load_stage("teacher_logits"), cfg).output


@functools.cache
def slerp_run(token_data: Path, root: Path, t: float = 0.5) -> Path:
    """SLERP at `t` of two SHORT runs of different seeds (one architecture, one tokenizer)."""
    from albor.stages import merge

    models = [short_run(token_data, root, 1337), short_run(token_data, root, 7)]
    cfg = merge.Config(models=models, method="slerp", t=t, output=root / f"slerp-{t:g}")
    return run_stage(load_stage("merge"), cfg).output


@functools.cache
def prune_run(token_data: Path, root: Path, method: str, sparsity: float) -> Path:
    from albor.stages import prune

    cfg = prune.Config(
        model=grouped_run(token_data, root),
        data=token_data,
        method=method,  # type: ignore[arg-type]
        sparsity=sparsity,
        eval_tokens=1024,
        calibration_tokens=512,
        seq_len=64,
        output=root / f"prune-{method}-{sparsity:g}",
    )
    return run_stage(load_stage("prune"), cfg).output


@functools.cache
def quantize_run(token_data: Path, root: Path) -> Path:
    from albor.stages import quantize

    cfg = quantize.Config.model_validate(
        {
            "model": grouped_run(token_data, root),
            "data": token_data,
            "variants": ["int8", "int4"],
            "output": root / "quantize",
            "eval_tokens": 4096,
            "seq_len": 64,
            "threads": 1,
            "bench_prompt_tokens": 16,
            "bench_new_tokens": 4,
            "bench_repeats": 1,
            "parity_prompts": 8,
            "parity_texts": 4,
        }
    )
    return run_stage(load_stage("quantize"), cfg).output


def step_lines(run: Path) -> list[dict[str, Any]]:
    """The step records of a training run's metrics.jsonl (validation lines left out)."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r]
