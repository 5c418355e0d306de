"""What every training stage's plan shares: the token-data input and the pre-flight in order.

A training stage (pretrain, distill, finetune) is a config, a plan and an apply. Its plan is
the same pre-flight whatever it trains for, with the stage's own additions (a teacher's memory
and forward FLOPs, say) folded into the memory and wall-time estimates:

    p = Plan(NAME)
    setup = plan_run(p, cfg, cfg, cfg.data, ctx, extra=Extra("teacher", memory, flops))

Stages never import each other; they share this module instead.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from albor.errors import ArtifactError
from albor.model.estimate import format_count
from albor.plan import Plan
from albor.stage import PlanContext, StageConfig, check_input
from albor.train import preflight
from albor.train.estimates import format_duration
from albor.train.preflight import Extra, Setup
from albor.train.settings import ModelSettings, TrainSettings


class TokenDataInput(StageConfig):
    """The input of a stage that trains on token shards."""

    data: Path | None = Field(None, description="Token shard artifact directory (from tokenize).")


def data_facts(data: Path | None, p: Plan, ctx: PlanContext) -> preflight.DataFacts | None:
    """Read the tokenize output's index (not the shards); None when it is pending or unusable."""
    from albor.data.shards import TokenIndex

    def load(path: Path) -> TokenIndex:
        try:
            return TokenIndex.load(path)
        except ArtifactError as e:
            raise ArtifactError(f"{e} (run the tokenize stage first)") from e

    index = check_input(p, ctx, "data", data, load, "a tokenize output directory")
    if index is None:
        return None
    train = index.splits.get("train")
    if train is None or train.tokens == 0:
        p.add("data", "fail", f"{data}: the train split holds no tokens (add data)")
        return None
    p.add("data", "ok", f"{data}: {format_count(train.tokens)} train tokens")
    val = index.splits.get("val")
    return preflight.DataFacts(
        vocab_size=index.vocab_size,
        train_tokens=train.tokens,
        val_tokens=val.tokens if val is not None else None,
    )


def plan_run(
    p: Plan,
    cfg: TrainSettings,
    model: ModelSettings,
    data: Path | None,
    ctx: PlanContext,
    *,
    verb: str = "train",
    extra: Extra | None = None,
    name: str | None = None,
) -> Setup | None:
    """The pre-flight of a run on token shards `data`, with its checks and estimates in `p` and
    what apply will do in `p.actions`; the resolved setup (None: the architecture or the device
    is unusable, and `p` says why). `name` labels the model (default: the preset's name)."""
    setup = preflight.check_run(p, cfg, model, name=name)
    if setup is None:
        return None
    facts = data_facts(data, p, ctx)
    if facts is not None:
        preflight.check_data(p, cfg, setup, facts)
    preflight.check_device(p, cfg, setup, extra)
    total = setup.tokens_per_step * cfg.max_steps
    where = f"{setup.world} x {setup.target[0]}" if setup.target else setup.device
    until = f" or until max_time {format_duration(cfg.max_time)}" if cfg.max_time else ""
    p.actions.append(
        f"{verb} {format_count(setup.parameters)} parameters for {cfg.max_steps} steps{until} "
        f"({format_count(total)} tokens) on {where} in {setup.precision} with {cfg.optimizer}"
    )
    return setup
