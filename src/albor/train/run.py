"""A training run from start to artifact: what a training stage's `apply` calls.

`run` builds the model once (on the meta device, then materialised and initialised under the
seed), the optimizer, the data sampler and the validation, opens the run tracker, runs the loop
(`loop.py`), writes the final weights with the run's checkpointer and the loss plot, and returns
the figures the stage reports. The stage supplies what differs between stages: the data (its
sampler, validation and checkpointer: `RunData`), the objective, and, when training does not
start from a fresh init (finetune: a base with adapters), how the model is built.

    setup = preflight.setup(cfg, cfg)                  # what plan resolved, resolved the same way
    data = TokenData.open(cfg.data, setup.seq_len, cfg.seed)
    return run(cfg, setup, data, ctx, stage=NAME, objective=NextToken())
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch

from albor.data.windows import WindowSampler
from albor.model.estimate import flops_per_token, format_count
from albor.model.gpt import GPT
from albor.stage import ApplyContext, Outcome
from albor.train import preflight
from albor.train.checkpoint import Checkpointer, FullCheckpointer
from albor.train.objectives import Objective
from albor.train.preflight import Setup
from albor.train.settings import TrainSettings
from albor.train.state import LoopResult


class Sampler(Protocol):
    """What the loop draws batches from: a pure function of (seed, step, micro)."""

    seed: int
    seq_len: int

    @property
    def tokens(self) -> int: ...

    def batch(self, step: int, micro: int, batch_size: int) -> torch.Tensor: ...


class RunData(Protocol):
    """A run's data: its batches, its validation, and how its checkpoints are written."""

    @property
    def sampler(self) -> Sampler: ...

    def checkpointer(self) -> Checkpointer: ...

    def validation(
        self, model: GPT, settings: TrainSettings, seq_len: int, device: torch.device
    ) -> Callable[[], dict[str, Any]] | None: ...


ModelBuilder = Callable[[Setup, int, torch.device], GPT]
"""Builds the model a run trains from the setup, the seed and the device (`build_model`)."""


@dataclass
class TokenData:
    """A tokenize artifact as a run reads it: training windows, validation shards, the bytes of
    each token (for bits per byte), the eos id and the tokenizer's files."""

    directory: Path
    sampler: WindowSampler
    val_shards: list[np.ndarray]
    token_bytes: np.ndarray
    eos_id: int
    tokenizer_files: tuple[Path, ...]

    @classmethod
    def open(cls, directory: Path, seq_len: int, seed: int) -> TokenData:
        from albor.data.bpe import TOKENIZER_FILES, load_tokenizer, token_byte_lengths
        from albor.data.shards import TokenIndex, open_split

        index = TokenIndex.load(directory)
        return cls(
            directory=directory,
            sampler=WindowSampler(open_split(directory, "train"), seq_len, seed),
            val_shards=open_split(directory, "val") if "val" in index.splits else [],
            token_bytes=token_byte_lengths(load_tokenizer(directory)),
            eos_id=index.eos_id,
            tokenizer_files=tuple(directory / f for f in TOKENIZER_FILES),
        )

    def checkpointer(self) -> Checkpointer:
        """Full-model checkpoints that each load on their own with this tokenizer."""
        return FullCheckpointer(self.eos_id, self.tokenizer_files)

    def validation(
        self, model: GPT, settings: TrainSettings, seq_len: int, device: torch.device
    ) -> Callable[[], dict[str, Any]] | None:
        return validation(model, self, settings, seq_len, device)


def build_model(setup: Setup, seed: int, device: torch.device) -> GPT:
    """The model with its initial weights, drawn once: built on the meta device (no memory, no
    random numbers), then materialised where it trains and initialised under `seed`."""
    from albor.train import distributed

    with torch.device("meta"):
        model = GPT(setup.model)
    torch.manual_seed(seed)  # the same on every rank: replicas start equal
    if setup.mode == "fsdp" and distributed.active():
        # Initialised on the CPU, sharded block by block; fully_shard moves each shard to the
        # device.
        model.to_empty(device="cpu")
        model.init_weights()
        distributed.shard(model, list(model.model.layers))
    else:
        model.to_empty(device=device)
        model.init_weights()
    return model


def validation(
    model: GPT, data: TokenData, settings: TrainSettings, seq_len: int, device: torch.device
) -> Callable[[], dict[str, Any]] | None:
    """The validation the loop runs every `eval_every` steps (None: no val split large enough
    for one window, or `eval_tokens: 0`)."""
    from albor.data.windows import eval_windows
    from albor.evals.perplexity import score_model

    if settings.eval_tokens == 0 or not any(len(s) > seq_len for s in data.val_shards):
        return None

    def evaluate() -> dict[str, Any]:
        # In fp32 whatever the training precision: the figure compared across runs.
        windows = eval_windows(data.val_shards, seq_len, settings.eval_tokens, settings.micro_batch)
        s = score_model(model, windows, data.token_bytes, str(device))
        return {
            "val_loss": round(s.loss, 5),
            "val_bpb": round(s.bits_per_byte, 5),
            "val_ppl": round(s.perplexity, 3),
            "val_tokens": s.tokens,
        }

    return evaluate


def run(
    settings: TrainSettings,
    setup: Setup,
    data: RunData,
    ctx: ApplyContext,
    *,
    stage: str,
    config: dict[str, Any],
    objective: Objective,
    build: ModelBuilder = build_model,
) -> Outcome:
    """Train to the end (or resume and finish) and write the final weights to `ctx.out`.
    `config` is what the run tracker records of the stage's config; `build` makes the model
    (default: a fresh init under the seed)."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.deterministic:
        # cuBLAS reads this when its first handle is made; an error otherwise names it.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        return _run(settings, setup, data, ctx, stage, config, objective, build)
    finally:
        # The caller's process keeps its own settings.
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def nondeterminism(settings: TrainSettings, setup: Setup) -> str | None:
    """Why a resumed (or repeated) run would not reproduce the straight one bit for bit; None
    when it does (tested on the CPU, and on CUDA with and without compile)."""
    if settings.max_time is not None:
        return "max_time: the last step and the learning rate depend on measured time"
    if setup.device == "cuda" and settings.compile and not settings.deterministic:
        return (
            "compiled on CUDA: the embedding's backward adds atomically; set deterministic: "
            "true for bit-exact runs"
        )
    return None


def _run(
    settings: TrainSettings,
    setup: Setup,
    data: RunData,
    ctx: ApplyContext,
    stage: str,
    config: dict[str, Any],
    objective: Objective,
    build: ModelBuilder,
) -> Outcome:
    from albor.track import metrics
    from albor.track.metrics import METRICS_FILE
    from albor.track.plot import write_loss_plot
    from albor.track.runs import RunTracker, db_path_for
    from albor.train import checkpoint, distributed, optim
    from albor.train.loop import train

    preflight.require_launch(settings)
    if distributed.launched():
        device = distributed.init(setup.device)
        # Each rank measured for precision: auto on its own; all must train alike: rank 0's.
        precision, reason = distributed.broadcast((setup.precision, setup.precision_reason))
        setup = replace(setup, precision=precision, precision_reason=reason)
    else:
        device = torch.device(setup.device)
    model = build(setup, settings.seed, device)
    optimizer = optim.build(model, settings, device, setup.mode)
    checkpointer = data.checkpointer()
    fsdp = setup.mode == "fsdp"

    def train_to_end(tracker: RunTracker | None = None) -> LoopResult:
        return train(
            model,
            optimizer,
            # The loop reads only what `Sampler` declares.
            cast(WindowSampler, data.sampler),
            settings,
            device=device,
            run_dir=ctx.out,
            checkpointer=checkpointer,
            evaluate=data.validation(model, settings, setup.seq_len, device),
            objective=objective,
            tracker=tracker,
            label=stage,
            precision=setup.precision,
        )

    if not distributed.is_rank0():
        # Trains in step with rank 0 and writes nothing: no tracker, no final weights.
        train_to_end()
        checkpoint.gather(model, optimizer, fsdp=fsdp)
        return Outcome(summary=f"rank {distributed.rank()} done", metrics={})
    parameters = model.num_params()
    tracker = RunTracker.open(
        db_path_for(ctx.out),
        ctx.name,
        stage,
        ctx.out,
        config,
        info={
            "parameters": parameters,
            "flops_per_token": flops_per_token(setup.model, setup.seq_len),
            "device": str(device),
        },
    )
    with tracker:  # an exception marks the run failed; a clean stop marks it stopped
        result = train_to_end(tracker)
        full = checkpoint.gather(model, optimizer, fsdp=fsdp)
        assert full is not None  # rank 0
        checkpointer.write(ctx.out, full[0], full[1], result.state)
        first = metrics.first(ctx.out / METRICS_FILE, "loss")
        figures = _figures(result, settings, setup, parameters, data, first)
        summary = _summary(result, figures)
        write_loss_plot(ctx.out)  # the artifact's plot covers the whole run
        tracker.finish("done", figures)
    return Outcome(summary=summary, metrics=figures)


def _figures(
    result: LoopResult,
    settings: TrainSettings,
    setup: Setup,
    parameters: int,
    data: RunData,
    first_loss: float | None,
) -> dict[str, Any]:
    """What the artifact's manifest reports of the run."""
    budget: dict[str, Any] = {}
    if settings.max_time is not None:
        budget = {
            "max_time_s": settings.max_time,
            "train_time_s": round(result.train_s, 3),
            "ended_by": result.ended_by,
        }
    why = nondeterminism(settings, setup)
    exact = {"bit_exact_resume": why is None, **({"nondeterminism": why} if why else {})}
    return {
        "parameters": parameters,
        "steps": result.steps,
        "tokens": result.tokens,
        "final_loss": round(result.final_loss, 5),
        "first_loss": round(first_loss, 5) if first_loss is not None else None,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "precision": setup.precision,
        "precision_reason": setup.precision_reason,
        "optimizer": settings.optimizer,
        **budget,
        **exact,
        "skipped_steps": result.skipped_steps,
        "resumed_from": result.resumed_from,
        "resume_warnings": result.resume_warnings,
        "best": result.best,
        "data_repeats": round(result.tokens / data.sampler.tokens, 3),
        "warnings": result.warnings,
        **(result.evals[-1] if result.evals else {}),
    }


def _summary(result: LoopResult, figures: dict[str, Any]) -> str:
    """One line: size, steps, the loss from first to last, validation, speed, and warnings."""
    first = figures["first_loss"]
    shown = "?" if first is None else f"{first:.3f}"
    summary = (
        f"{format_count(figures['parameters'])} params, {result.steps} steps, loss "
        f"{shown} -> {result.final_loss:.3f}"
    )
    if result.ended_by == "max_time":
        summary += f" (max_time spent at step {result.steps})"
    if "val_bpb" in figures:
        summary += f", val bits/byte {figures['val_bpb']:.3f}"
    summary += f", {result.tokens_per_s:,.0f} tok/s"
    if result.warnings:
        summary += "; WARNING: " + "; ".join(result.warnings.values())
    if result.resume_warnings:
        n = len(result.resume_warnings)
        summary += f"; {n} resume warning(s), see metrics.resume_warnings"
    return summary
