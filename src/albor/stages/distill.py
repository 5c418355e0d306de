"""distill: train a student to match a teacher's next-token distributions, on token shards.

The loss at each position is `alpha * T^2 * KL(q || p_T) + (1 - alpha) * CE`: q the teacher's
distribution (its top-k renormalised, or the full vocabulary with `top_k: null`), p_T the
student's softmax at temperature T, CE the usual next-token cross-entropy (`train/distill.py`).
The teacher runs in the loop, forward only and without gradients ("online"), so it must fit
beside the student; the plan adds its memory and its forward FLOPs to the estimates.

Everything else is pretraining's: the student (a preset, with the data's vocabulary) is built,
trained, validated (bits per byte of the plain next-token loss, so that a distilled and an
undistilled student compare directly), checkpointed and resumed exactly as `pretrain` does.
Logit distillation needs one tokenizer for both: `plan` refuses a teacher whose tokenizer differs
from the data's and says how (vocabulary, merges, special-token ids) and what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from albor.config import Int
from albor.errors import ArtifactError
from albor.model.estimate import format_count
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, check_input
from albor.train import preflight
from albor.train.planning import TokenDataInput, plan_run
from albor.train.settings import ModelSettings, TrainSettings

if TYPE_CHECKING:
    from albor.train.teacher import TeacherFacts

NAME = "distill"
INPUTS = ("data", "teacher")


class Config(TrainSettings, ModelSettings, TokenDataInput, OutputConfig):
    teacher: Path | None = Field(
        None,
        description="The teacher: a checkpoint directory (a pretrain output, or a transformers "
        "Llama / Qwen2 model directory) with the data's tokenizer.",
    )
    temperature: float = Field(
        2.0, gt=0, description="Softmax temperature T of both distributions in the KL term."
    )
    alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Weight of the distillation term; 1 - alpha weighs the next-token "
        "cross-entropy on the data.",
    )
    top_k: Int | None = Field(
        32,
        gt=0,
        description="The teacher's k most likely tokens per position, renormalised (null: the "
        "whole vocabulary).",
    )


def _teacher(cfg: Config, p: Plan, ctx: PlanContext) -> TeacherFacts | None:
    """The teacher's facts, with its tokenizer compared to the data's; None when pending or
    unusable (the plan says why)."""
    from albor.train.teacher import read_teacher, tokenizer_differences

    facts = check_input(p, ctx, "teacher", cfg.teacher, read_teacher, "a checkpoint directory")
    if facts is None:
        return None
    p.add(
        "teacher",
        "ok",
        f"{cfg.teacher}: {format_count(facts.parameters)} parameters, forward only "
        f"(T={cfg.temperature:g}, alpha={cfg.alpha:g}, top_k={cfg.top_k})",
    )
    if cfg.top_k is not None:
        p.require(
            "top_k",
            cfg.top_k <= facts.config.vocab_size,
            f"the teacher's top {cfg.top_k} of {facts.config.vocab_size} tokens per position",
            f"top_k {cfg.top_k} exceeds the vocabulary ({facts.config.vocab_size}): lower it, "
            "or set top_k: null for the whole vocabulary",
        )
    if cfg.data is None or ctx.is_pending("data") or not cfg.data.is_dir():
        return facts  # the data's own check reports it
    try:
        differences = tokenizer_differences(facts.directory, cfg.data)
    except ArtifactError as e:
        p.add("tokenizer", "fail", str(e))
        return facts
    p.require(
        "tokenizer",
        not differences,
        "the teacher and the data share one tokenizer",
        f"the teacher's tokenizer differs from the data's: {'; '.join(differences)}. Logit "
        "distillation compares distributions id by id: tokenize the corpus with the teacher's "
        "tokenizer (tokenizer stage `adopt: TEACHER_DIR`), or use a teacher trained on this "
        "tokenizer",
    )
    return facts


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    ctx = ctx or PlanContext()
    p = Plan(NAME)
    teacher = _teacher(cfg, p, ctx)
    extra = None
    if teacher is not None:
        # Held in bf16 when the student computes in bf16; `auto` may yet choose fp32, so the
        # estimate takes fp32 for it (an upper bound).
        extra = preflight.Extra(
            "teacher",
            memory=teacher.memory_bytes("bf16" if cfg.precision == "bf16" else "fp32"),
            flops_per_token=teacher.forward_flops_per_token(cfg.seq_len or 0),
        )
    if plan_run(p, cfg, cfg, cfg.data, ctx, verb="distill into", extra=extra) is not None:
        p.actions.append(f"write the student's checkpoint (HF layout) to {cfg.output}")
    return p


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    from albor.train.distill import Distill
    from albor.train.run import TokenData, run
    from albor.train.teacher import load_teacher

    assert cfg.data is not None and cfg.teacher is not None
    setup = preflight.setup(cfg, cfg)
    data = TokenData.open(cfg.data, setup.seq_len, cfg.seed)
    teacher = load_teacher(cfg.teacher, setup.device, setup.precision)
    objective = Distill(teacher, temperature=cfg.temperature, alpha=cfg.alpha, top_k=cfg.top_k)
    config = cfg.model_dump(mode="json", exclude={"output"})
    return run(cfg, setup, data, ctx, stage=NAME, config=config, objective=objective)
