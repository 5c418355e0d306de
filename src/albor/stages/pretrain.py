"""pretrain: train the decoder on packed token shards; the output is an HF-compatible checkpoint.

`plan` is the pre-flight (`train/preflight.py`): exact parameter count, memory budget against
the device, tokens per optimizer step, total steps and tokens, how many times the data repeats,
warmup fraction, checkpoint count and size, and wall time; it rejects configs that cannot do
what they say. `max_steps` is authoritative: the data repeats as needed. `apply` trains with the
next-token objective through `train/run.py`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from albor.errors import ArtifactError
from albor.model.estimate import format_count
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, check_input
from albor.train import preflight
from albor.train.settings import ModelSettings, TrainSettings

NAME = "pretrain"
INPUTS = ("data",)


class Config(TrainSettings, ModelSettings, OutputConfig):
    data: Path | None = Field(None, description="Token shard artifact directory (from tokenize).")


def _data_facts(cfg: Config, p: Plan, ctx: PlanContext) -> preflight.DataFacts | None:
    """Read the tokenize output's index (not the shards); None when it is pending or unusable."""
    from albor.data.shards import TokenIndex

    def load(path: Path) -> TokenIndex:
        try:
            return TokenIndex.load(path)
        except ArtifactError as e:
            raise ArtifactError(f"{e} (run the tokenize stage first)") from e

    index = check_input(p, ctx, "data", cfg.data, load, "a tokenize output directory")
    if index is None:
        return None
    train = index.splits.get("train")
    if train is None or train.tokens == 0:
        p.add("data", "fail", f"{cfg.data}: the train split holds no tokens (add data)")
        return None
    p.add("data", "ok", f"{cfg.data}: {format_count(train.tokens)} train tokens")
    val = index.splits.get("val")
    return preflight.DataFacts(
        vocab_size=index.vocab_size,
        train_tokens=train.tokens,
        val_tokens=val.tokens if val is not None else None,
    )


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    p = Plan(NAME)
    setup = preflight.check_run(p, cfg, cfg)
    if setup is None:
        return p
    facts = _data_facts(cfg, p, ctx or PlanContext())
    if facts is not None:
        preflight.check_data(p, cfg, setup, facts)
    preflight.check_device(p, cfg, setup)
    total = setup.tokens_per_step * cfg.max_steps
    where = f"{setup.world} x {setup.target[0]}" if setup.target else setup.device
    until = f" or until max_time {preflight.format_duration(cfg.max_time)}" if cfg.max_time else ""
    p.actions.append(
        f"train {format_count(setup.parameters)} parameters for {cfg.max_steps} steps{until} "
        f"({format_count(total)} tokens) on {where} in {setup.precision} with {cfg.optimizer}"
    )
    p.actions.append(f"write the checkpoint (HF layout) to {cfg.output}")
    return p


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    from albor.train.objectives import NextToken
    from albor.train.run import TokenData, run

    assert cfg.data is not None
    setup = preflight.setup(cfg, cfg)
    data = TokenData.open(cfg.data, setup.seq_len, cfg.seed)
    config = cfg.model_dump(mode="json", exclude={"output"})
    return run(cfg, setup, data, ctx, stage=NAME, config=config, objective=NextToken())
