"""The one training loop (pretrain; distill and finetune pass their loss and parameters).

Per optimizer step: `grad_accum` micro-batches drawn by step index, loss scaled by 1/grad_accum,
gradient clipping that is always on (the ALB-071 lesson: safety never hangs on an optional
setting), AdamW with the warmup + cosine schedule. A non-finite loss or gradient skips the step
and is counted; too many in a row stop the run with the step and the last finite loss. Metrics go
to `metrics.jsonl`; validation every `eval_every` steps; checkpoints every `checkpoint_every`
steps, and a run restarted with the same directory resumes from the newest one.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from albor import progress
from albor.data.windows import WindowSampler
from albor.errors import AlborError, StageFailed
from albor.model.gpt import GPT
from albor.train import checkpoint
from albor.train.health import Health
from albor.train.optim import lr_at

log = logging.getLogger(__name__)

LossFn = Callable[[GPT, torch.Tensor], torch.Tensor]


def lm_loss(model: GPT, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on a `(B, T + 1)` window batch."""
    loss: torch.Tensor = model(batch[:, :-1], targets=batch[:, 1:])
    return loss


@dataclass
class LoopSettings:
    max_steps: int
    warmup_steps: int
    lr: float
    min_lr_ratio: float
    micro_batch: int
    grad_accum: int
    grad_clip: float
    eval_every: int
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int = 10
    max_bad_steps: int = 10


@dataclass
class LoopResult:
    steps: int
    tokens: int
    final_loss: float
    wall_time_s: float
    tokens_per_s: float
    skipped_steps: int
    resumed_from: int | None
    evals: list[dict[str, Any]] = field(default_factory=list)
    warnings: dict[str, str] = field(default_factory=dict)


class TrainingStopped(AlborError):
    """SIGINT or SIGTERM: a checkpoint was saved and the run can resume. Not a failure."""

    exit_code = 0


class _StopSignals:
    """Turn SIGINT / SIGTERM into a flag checked between steps (main thread only)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second signal: stop now, without the checkpoint
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(
    model: GPT,
    optimizer: torch.optim.Optimizer,
    sampler: WindowSampler,
    s: LoopSettings,
    *,
    device: torch.device,
    run_dir: Path,
    eos_token_id: int,
    extra_files: list[Path],
    evaluate: Callable[[], dict[str, Any]] | None = None,
    loss_fn: LossFn = lm_loss,
) -> LoopResult:
    ckpt_root = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.jsonl"
    step, tokens, resumed = 0, 0, None
    evals: list[dict[str, Any]] = []
    last = checkpoint.latest(ckpt_root)
    if last is not None:
        state = checkpoint.restore(last, model, optimizer, device)
        step, tokens, resumed = int(state["step"]), int(state["tokens"]), int(state["step"])
        evals = list(state.get("evals", []))
        log.info("resuming from %s (step %d)", last, step)
        _truncate_metrics(metrics_path, step)
    tokens_per_step = s.micro_batch * s.grad_accum * sampler.seq_len
    model.train()
    bad_in_row, skipped = 0, 0
    last_finite = float("nan")
    t0 = time.perf_counter()
    start_step = step
    health = Health()
    metrics = open(metrics_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in finally
    try:
        with _StopSignals() as stop, progress.bar("pretrain", s.max_steps) as bar:
            bar.update(completed=step)
            while step < s.max_steps:
                lr = lr_at(
                    step,
                    lr=s.lr,
                    warmup_steps=s.warmup_steps,
                    max_steps=s.max_steps,
                    min_lr_ratio=s.min_lr_ratio,
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for micro in range(s.grad_accum):
                    batch = sampler.batch(step, micro, s.micro_batch).to(device, non_blocking=True)
                    loss = loss_fn(model, batch)
                    (loss / s.grad_accum).backward()
                    loss_sum += float(loss.detach())
                loss_value = loss_sum / s.grad_accum
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip))
                if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                    skipped += 1
                    bad_in_row += 1
                    log.warning("step %d: non-finite loss or gradient; step skipped", step)
                    if bad_in_row >= s.max_bad_steps:
                        raise StageFailed(
                            f"{bad_in_row} non-finite steps in a row at step {step} (last finite "
                            f"loss {last_finite:.4f}): lower lr, raise warmup_steps, or check data"
                        )
                    optimizer.zero_grad(set_to_none=True)
                else:
                    optimizer.step()
                    bad_in_row = 0
                    last_finite = loss_value
                    health.step(step, loss_value, grad_norm)
                step += 1
                tokens += tokens_per_step
                elapsed = time.perf_counter() - t0
                if step % s.log_every == 0 or step == s.max_steps:
                    rate = (step - start_step) * tokens_per_step / max(elapsed, 1e-9)
                    _write(
                        metrics,
                        {
                            "step": step,
                            "loss": round(loss_value, 5),
                            "lr": lr,
                            "grad_norm": round(grad_norm, 4),
                            "tokens": tokens,
                            "tokens_per_s": round(rate, 1),
                            "elapsed_s": round(elapsed, 2),
                        },
                    )
                if evaluate is not None and (step % s.eval_every == 0 or step == s.max_steps):
                    result = {"step": step, **evaluate()}
                    evals.append(result)
                    _write(metrics, result)
                bar.update(completed=step, description=f"pretrain loss {loss_value:.3f}")
                stopping = stop.signal is not None and step < s.max_steps
                if (step % s.checkpoint_every == 0 and step < s.max_steps) or stopping:
                    state = {"step": step, "tokens": tokens, "loss": loss_value, "evals": evals}
                    path = checkpoint.save(
                        checkpoint.step_dir(ckpt_root, step),
                        model,
                        optimizer,
                        state,
                        eos_token_id=eos_token_id,
                        extra_files=extra_files,
                    )
                    checkpoint.prune(ckpt_root, s.keep_checkpoints)
                    health.checkpoint(step, model)
                    if stopping:
                        name = signal.Signals(stop.signal or signal.SIGTERM).name
                        raise TrainingStopped(
                            f"stopped by {name} at step {step} of {s.max_steps}: checkpoint "
                            f"saved to {path}; run the same command again to resume from it"
                        )
    finally:
        metrics.close()
    wall = time.perf_counter() - t0
    done = step - start_step
    return LoopResult(
        steps=step,
        tokens=tokens,
        final_loss=last_finite,
        wall_time_s=wall,
        tokens_per_s=done * tokens_per_step / max(wall, 1e-9),
        skipped_steps=skipped,
        resumed_from=resumed,
        evals=evals,
        warnings=health.warnings,
    )


def _write(f: Any, record: dict[str, Any]) -> None:
    f.write(json.dumps(record) + "\n")
    f.flush()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from, so the log has no repeats."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
