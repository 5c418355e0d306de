"""The evaluate task `speed`: how fast the model completes code on this machine, as an editor
user feels it: time to first token and decode ms/token, greedy, on a prompt of real Python
(`albor.infer.bench`, the code behind `albor bench`, run in this process on the evaluate
stage's device).

It is the latency axis of the ladder's report (quality against CPU latency per variant): every
variant is timed by the same code with the same prompt and token counts, so their figures
compare. Metrics: `decode_ms_per_token` (the median over the timed tokens; p95 and mean
beside it), `ttft_ms`, `prefill_tokens_per_s`, the settings and the device. The dtype is the
checkpoint's own (float32; a quantize stage's int8 / int4 dir computes its activations in it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from albor.config import Int, StageConfig
from albor.evals.tasks import Models, Planning


class SpeedTask(StageConfig):
    """Decode ms/token and time to first token on this machine."""

    task: Literal["speed"]
    name: str | None = Field(None, description="Key in metrics.json; default: the task type.")
    prompt_tokens: Int = Field(64, gt=0, description="Prompt length in tokens.")
    new_tokens: Int = Field(32, gt=1, description="Tokens decoded per timed run.")
    repeats: Int = Field(3, gt=0, description="Timed runs (after one warm-up run).")
    threads: Int | None = Field(None, gt=0, description="CPU threads (default: torch's choice).")


def plan(t: SpeedTask, pl: Planning, name: str) -> dict[str, Any]:
    mc = pl.model
    if mc is None:
        return {}
    need = t.prompt_tokens + t.new_tokens
    pl.p.require(
        name,
        need <= mc.max_seq_len,
        f"{t.repeats} runs of {t.prompt_tokens} prompt + {t.new_tokens} new tokens on {pl.device}",
        f"prompt_tokens + new_tokens = {need} exceed the model's context {mc.max_seq_len}: "
        "lower one of them",
    )
    return {"decoded_tokens": (t.repeats + 1) * t.new_tokens}


def run(t: SpeedTask, models: Models, name: str, out: Path) -> tuple[dict[str, Any], str]:
    """The timings, in metrics.json only."""
    from albor.infer.bench import time_here

    result = time_here(
        models.inputs.require_model(),
        "torch",
        prompt_tokens=t.prompt_tokens,
        new_tokens=t.new_tokens,
        repeats=t.repeats,
        threads=t.threads,
        device=models.device,
    )
    decode = result["decode_ms_per_token"]
    metrics: dict[str, Any] = {
        "decode_ms_per_token": decode["p50"],
        "decode_ms_per_token_p95": decode["p95"],
        "decode_ms_per_token_mean": decode["mean"],
        "ttft_ms": result.get("ttft_ms"),
        "prefill_tokens_per_s": result.get("prefill_tokens_per_s"),
        "weights_bytes": result["weights_bytes"],
        "device": models.device,
        "threads": t.threads,
        "prompt_tokens": t.prompt_tokens,
        "new_tokens": t.new_tokens,
        "repeats": t.repeats,
    }
    summary = f"decode {decode['p50']:.2f} ms/token (p50) on {models.device}"
    return metrics, summary
