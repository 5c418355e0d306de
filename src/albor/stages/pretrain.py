"""pretrain: train the decoder on packed token shards; the output is an HF-compatible checkpoint.

`plan` is the pre-flight (`train/preflight.py`): exact parameter count, memory budget against
the device, tokens per optimizer step, total steps and tokens, how many times the data repeats,
warmup fraction, checkpoint count and size, and wall time; it rejects configs that cannot do
what they say. `max_steps` is authoritative: the data repeats as needed. `apply` trains with the
next-token objective through `train/run.py`.
"""

from __future__ import annotations

from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext
from albor.train import preflight
from albor.train.planning import TokenDataInput, plan_run
from albor.train.settings import ModelSettings, TrainSettings

NAME = "pretrain"
INPUTS = ("data",)


class Config(TrainSettings, ModelSettings, TokenDataInput, OutputConfig):
    pass


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    p = Plan(NAME)
    if plan_run(p, cfg, cfg, cfg.data, ctx or PlanContext()) is not None:
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
