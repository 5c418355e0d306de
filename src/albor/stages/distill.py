"""distill: train a student to match a teacher's next-token distributions, on token shards.

The loss at each position is `alpha * T^2 * KL(q || p_T) + (1 - alpha) * CE`: q the teacher's
distribution (its top-k renormalised, or the full vocabulary with `top_k: null`), p_T the
student's softmax at temperature T, CE the usual next-token cross-entropy (`train/distill.py`).

Two ways to have a teacher, exactly one of them set:
- `teacher: DIR` (online): the teacher runs in the loop, forward only and without gradients, so
  it must fit beside the student; the plan adds its memory and its forward FLOPs to the
  estimates.
- `teacher_logits: DIR` (offline): a teacher_logits artifact holds the teacher's top-k rows for
  every aligned window of this data's train split; the student draws those windows and reads
  the rows, so no teacher runs. Temperature and top_k are the artifact's; `apply` checks every
  logits file's sha256 before training.

Everything else is pretraining's: the student (a preset, with the data's vocabulary) is built,
trained, validated (bits per byte of the plain next-token loss, so that a distilled and an
undistilled student compare directly), checkpointed and resumed exactly as `pretrain` does.
Logit distillation needs one tokenizer for both: `plan` refuses a teacher whose tokenizer differs
from the data's and says how (vocabulary, merges, special-token ids) and what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from albor.config import Int
from albor.errors import ArtifactError
from albor.model.estimate import format_count
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, check_input
from albor.train import preflight
from albor.train.planning import TokenDataInput, plan_run
from albor.train.settings import ModelSettings, TrainSettings

if TYPE_CHECKING:
    from albor.train.preflight import Setup
    from albor.train.teacher import LogitsIndex, TeacherFacts

NAME = "distill"
INPUTS = ("data", "teacher", "teacher_logits")


class Config(TrainSettings, ModelSettings, TokenDataInput, OutputConfig):
    teacher: Path | None = Field(
        None,
        description="The teacher (online): a checkpoint directory (a pretrain output, or a "
        "transformers Llama / Qwen2 model directory) with the data's tokenizer. Set this or "
        "teacher_logits.",
    )
    teacher_logits: Path | None = Field(
        None,
        description="The teacher (offline): a teacher_logits artifact computed on this data "
        "with this seq_len; its temperature and top_k are used. Set this or teacher.",
    )
    temperature: float = Field(
        1.0,
        gt=0,
        description="Softmax temperature T of both distributions in the KL term (offline: the "
        "artifact's). 1 won benchmarks/distill.py on the stdlib corpus; 2 lost to no "
        "distillation there.",
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
        "whole vocabulary; offline: the artifact's).",
    )

    @model_validator(mode="after")
    def _one_teacher(self) -> Config:
        if self.teacher is not None and self.teacher_logits is not None:
            raise ValueError(
                "teacher and teacher_logits are both set: distill from one teacher, online "
                "(`teacher: DIR`, run in the loop) or offline (`teacher_logits: DIR`, "
                "precomputed by the teacher_logits stage); remove the other"
            )
        return self


def _teacher(cfg: Config, p: Plan, ctx: PlanContext) -> TeacherFacts | None:
    """The teacher's facts, with its tokenizer compared to the data's; None when pending or
    unusable (the plan says why)."""
    from albor.train.teacher import check_tokenizer, read_teacher

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
    check_tokenizer(p, facts.directory, cfg.data)
    return facts


def _teacher_logits(cfg: Config, p: Plan, ctx: PlanContext) -> LogitsIndex | None:
    """The offline teacher's index, checked against the data and the config; None when pending
    or unusable (the plan says why)."""
    from albor.train.teacher import LogitsIndex

    index = check_input(
        p, ctx, "teacher_logits", cfg.teacher_logits, LogitsIndex.load, "a teacher_logits artifact"
    )
    if index is None:
        return None
    p.add(
        "teacher",
        "ok",
        f"offline, {cfg.teacher_logits}: the top {index.top_k} of {index.vocab_size} tokens of "
        f"{index.windows:,} windows of {index.seq_len} at T={index.temperature:g} (temperature "
        f"and top_k are the artifact's; alpha={cfg.alpha:g}); teacher {index.teacher_path}",
    )
    for key, ours, theirs in (
        ("temperature", cfg.temperature, index.temperature),
        ("top_k", cfg.top_k, index.top_k),
    ):
        if key in cfg.model_fields_set and ours != theirs:
            p.add(
                key,
                "fail",
                f"{key} {ours} is set but the teacher logits were computed with {theirs}: "
                f"remove {key} (offline distillation takes it from the artifact), or recompute "
                f"the logits with {key}: {ours}",
            )
    if cfg.data is None or ctx.is_pending("data") or not cfg.data.is_dir():
        return index  # the data's own check reports it
    from albor.artifact import artifact_digest
    from albor.data.shards import TokenIndex

    try:
        data_tokenizer = TokenIndex.load(cfg.data).tokenizer_sha256
        data_digest = artifact_digest(cfg.data)
    except ArtifactError:
        return index  # the data's own check reports it
    recompute = f"recompute them with the teacher_logits stage on `data: {cfg.data}`"
    p.require(
        "tokenizer",
        index.tokenizer_sha256 == data_tokenizer,
        "the teacher logits and the data share one tokenizer (sha256)",
        f"the teacher logits were computed with tokenizer sha256 {index.tokenizer_sha256[:12]}, "
        f"the data is tokenized with {data_tokenizer[:12]}: their ids mean other tokens; "
        f"{recompute}",
    )
    p.require(
        "teacher_logits data",
        index.data_digest == data_digest,
        "the teacher logits describe this data's windows",
        f"the teacher logits were computed on another token artifact (digest "
        f"{index.data_digest[:12]}, this data's is {data_digest[:12]}): their rows describe "
        f"other tokens; {recompute}",
    )
    return index


def _check_offline_run(p: Plan, cfg: Config, index: LogitsIndex, setup: Setup) -> None:
    """The student's window and vocabulary against the artifact's."""
    p.require(
        "seq_len",
        setup.seq_len == index.seq_len,
        f"the student's windows are the teacher logits' ({index.seq_len} tokens)",
        f"the student trains on windows of {setup.seq_len} tokens but the teacher logits are "
        f"for windows of {index.seq_len}: set seq_len: {index.seq_len}, or recompute the "
        f"logits with seq_len: {setup.seq_len}",
    )
    p.require(
        "teacher vocab",
        index.vocab_size == setup.model.vocab_size,
        f"teacher and student both have {index.vocab_size} ids",
        f"the teacher logits' vocabulary has {index.vocab_size:,} ids and the student's "
        f"{setup.model.vocab_size:,}: distillation compares them id by id; build the student "
        f"with vocab_size {index.vocab_size}",
    )


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    ctx = ctx or PlanContext()
    p = Plan(NAME)
    extra = None
    index = None
    if cfg.teacher_logits is not None:
        index = _teacher_logits(cfg, p, ctx)
    elif cfg.teacher is None:
        p.add(
            "teacher",
            "fail",
            "no teacher: set `teacher:` to a checkpoint directory (online), or "
            "`teacher_logits:` to a teacher_logits artifact (offline)",
        )
    else:
        teacher = _teacher(cfg, p, ctx)
        if teacher is not None:
            # Held in bf16 when the student computes in bf16; `auto` may yet choose fp32, so
            # the estimate takes fp32 for it (an upper bound).
            extra = preflight.Extra(
                "teacher",
                memory=teacher.memory_bytes("bf16" if cfg.precision == "bf16" else "fp32"),
                flops_per_token=teacher.forward_flops_per_token(cfg.seq_len or 0),
            )
    setup = plan_run(p, cfg, cfg, cfg.data, ctx, verb="distill into", extra=extra)
    if setup is not None:
        if index is not None:
            _check_offline_run(p, cfg, index, setup)
            p.actions.insert(0, f"check the sha256 of every file of {cfg.teacher_logits}")
        p.actions.append(f"write the student's checkpoint (HF layout) to {cfg.output}")
    return p


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    from albor.train.distill import Distill, OfflineDistill, open_offline
    from albor.train.run import TokenData, run
    from albor.train.teacher import LogitsIndex, load_teacher

    assert cfg.data is not None
    setup = preflight.setup(cfg, cfg)
    config = cfg.model_dump(mode="json", exclude={"output"})
    if cfg.teacher_logits is not None:
        index = LogitsIndex.load(cfg.teacher_logits)
        offline = open_offline(cfg.data, cfg.teacher_logits, setup.seq_len, cfg.seed)
        objective = OfflineDistill(temperature=index.temperature, alpha=cfg.alpha)
        return run(cfg, setup, offline, ctx, stage=NAME, config=config, objective=objective)
    assert cfg.teacher is not None
    data = TokenData.open(cfg.data, setup.seq_len, cfg.seed)
    teacher = load_teacher(cfg.teacher, setup.device, setup.precision)
    online = Distill(teacher, temperature=cfg.temperature, alpha=cfg.alpha, top_k=cfg.top_k)
    outcome = run(cfg, setup, data, ctx, stage=NAME, config=config, objective=online)
    # The rows of this process's steps (a resumed run's figures cover the steps since resuming).
    outcome.metrics["teacher_rows"] = online.integrity()
    return outcome
