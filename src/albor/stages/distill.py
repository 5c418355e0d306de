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

The student is a fresh `model` preset, or (`student: DIR`) an albor or transformers checkpoint
whose architecture and weights it starts from; it speaks the data's tokenizer and has the
teacher's vocabulary size, which `plan` checks. Everything else is pretraining's: it is trained,
validated (bits per byte of the plain next-token loss, so that a distilled and an undistilled
student compare directly), checkpointed and resumed exactly as `pretrain` does.
Logit distillation needs one tokenizer for both: `plan` refuses a teacher whose tokenizer differs
from the data's and says how (vocabulary, merges, special-token ids) and what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from albor.config import Int
from albor.errors import ArtifactError
from albor.model.estimate import format_bytes, format_count
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, check_input
from albor.train import preflight
from albor.train.planning import TokenDataInput, plan_run
from albor.train.settings import Architecture, ModelSettings, TrainSettings

if TYPE_CHECKING:
    import torch

    from albor.model.config import ModelConfig
    from albor.model.gpt import GPT
    from albor.train.preflight import Setup
    from albor.train.run import ModelBuilder
    from albor.train.teacher import LogitsIndex, TeacherFacts

NAME = "distill"
INPUTS = ("data", "teacher", "teacher_logits", "student")


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
    student: Path | None = Field(
        None,
        description="Start the student from this checkpoint directory (a pretrain or distill "
        "output, or a transformers Llama / Qwen2 model directory) with the data's tokenizer: "
        "its architecture and weights replace `model` and `architecture`. Default: a fresh "
        "`model` preset.",
    )

    @model_validator(mode="after")
    def _one_teacher(self) -> Config:
        if self.teacher is not None and self.teacher_logits is not None:
            raise ValueError(
                "teacher and teacher_logits are both set: distill from one teacher, online "
                "(`teacher: DIR`, run in the loop) or offline (`teacher_logits: DIR`, "
                "precomputed by the teacher_logits stage); remove the other"
            )
        if self.student is not None and (
            "model" in self.model_fields_set or self.architecture.model_fields_set
        ):
            raise ValueError(
                "student is set together with model or architecture: a student checkpoint "
                "brings its own architecture; remove model and architecture, or remove student "
                "to start from a fresh preset"
            )
        return self


def _checkpoint(
    cfg: Config, p: Plan, ctx: PlanContext, role: str, path: Path | None, use: str, check: str
) -> TeacherFacts | None:
    """The checkpoint the run's `role` (teacher, student) starts from: read, named with its size
    and `use`, its tokenizer compared to the data's (plan check `check`); None when pending or
    unusable (the plan says why)."""
    from albor.train.teacher import check_tokenizer, read_teacher

    def read(directory: Path) -> TeacherFacts:
        return read_teacher(directory, role=role)

    facts = check_input(p, ctx, role, path, read, "a checkpoint directory")
    if facts is None:
        return None
    p.add(role, "ok", f"{path}: {format_count(facts.parameters)} parameters, {use}")
    if cfg.data is not None and not ctx.is_pending("data") and cfg.data.is_dir():
        check_tokenizer(p, facts.directory, cfg.data, role=role, check=check)
    return facts  # a data that is missing or pending: its own check reports it


def _student(cfg: Config, p: Plan, ctx: PlanContext) -> Config | None:
    """The run's model settings with the student checkpoint's architecture (the config itself
    when the student is a preset); None when the checkpoint is pending or unusable (the plan
    says why)."""
    if cfg.student is None:
        return cfg
    use = "trained from its weights"
    facts = _checkpoint(cfg, p, ctx, "student", cfg.student, use, "student tokenizer")
    return None if facts is None else with_architecture(cfg, facts.config)


def with_architecture(cfg: Config, model: ModelConfig) -> Config:
    """`cfg` whose architecture is `model`'s in every field, so the pre-flight and the run size
    and build exactly the student checkpoint's model."""
    return cfg.model_copy(update={"architecture": Architecture(**model.model_dump())})


def _teacher(cfg: Config, p: Plan, ctx: PlanContext) -> TeacherFacts | None:
    """The teacher's facts, with its tokenizer compared to the data's; None when pending or
    unusable (the plan says why)."""
    use = f"forward only (T={cfg.temperature:g}, alpha={cfg.alpha:g}, top_k={cfg.top_k})"
    facts = _checkpoint(cfg, p, ctx, "teacher", cfg.teacher, use, "tokenizer")
    if facts is not None and cfg.top_k is not None:
        p.require(
            "top_k",
            cfg.top_k <= facts.config.vocab_size,
            f"the teacher's top {cfg.top_k} of {facts.config.vocab_size} tokens per position",
            f"top_k {cfg.top_k} exceeds the vocabulary ({facts.config.vocab_size}): lower it, "
            "or set top_k: null for the whole vocabulary",
        )
    return facts


def _teacher_logits(cfg: Config, p: Plan, ctx: PlanContext) -> LogitsIndex | None:
    """The offline teacher's index, checked against the data and the config; None when pending
    or unusable (the plan says why)."""
    from albor.train.teacher import LogitsIndex, verify_logits

    assert cfg.teacher_logits is not None  # plan asks for the offline teacher only when set
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
    try:
        # Sizes only, so the plan stays cheap: a truncated or missing file fails here, and
        # apply hashes every byte before training.
        size = verify_logits(cfg.teacher_logits, hashes=False)
        p.add("teacher_logits files", "ok", f"{format_bytes(size)}, every file of its size")
    except ArtifactError as e:
        p.add("teacher_logits files", "fail", str(e))
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
    teacher_vocab = None
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
            teacher_vocab = teacher.config.vocab_size
            # Held in bf16 when the student computes in bf16; `auto` may yet choose fp32, so
            # the estimate takes fp32 for it (an upper bound).
            extra = preflight.Extra(
                "teacher",
                memory=teacher.memory_bytes("bf16" if cfg.precision == "bf16" else "fp32"),
                flops_per_token=teacher.forward_flops_per_token(cfg.seq_len or 0),
            )
    model = _student(cfg, p, ctx)
    if model is None:
        return p
    # A student checkpoint is named by its directory, not by the preset it replaces.
    name = f"student {cfg.student}" if cfg.student is not None else None
    setup = plan_run(p, cfg, model, cfg.data, ctx, verb="distill into", extra=extra, name=name)
    if setup is not None:
        if index is not None:
            _check_offline_run(p, cfg, index, setup)
            p.actions.insert(0, f"check the sha256 of every file of {cfg.teacher_logits}")
        elif teacher_vocab is not None:
            _check_online_run(p, cfg, teacher_vocab, setup)
        p.actions.append(f"write the student's checkpoint (HF layout) to {cfg.output}")
    return p


def _check_online_run(p: Plan, cfg: Config, teacher_vocab: int, setup: Setup) -> None:
    """The student's vocabulary against the teacher's, and what the same teacher offline would
    take on disk."""
    from albor.data.shards import TokenIndex, token_dtype

    try:
        data = TokenIndex.load(cfg.data) if cfg.data is not None else None
    except ArtifactError:
        data = None  # pending or unusable: the data's own check reports it
    student = setup.model.vocab_size
    if data is not None and teacher_vocab < data.vocab_size:
        fix = (
            f"the data's tokenizer has {data.vocab_size:,}, so the teacher has no row for some "
            "of its ids: use the teacher this tokenizer belongs to"
        )
    elif cfg.student is not None:
        fix = "start from a student checkpoint of the teacher's vocabulary"
    else:
        fix = f"set architecture.vocab_size: {teacher_vocab}"
    p.require(
        "teacher vocab",
        teacher_vocab == student,
        f"teacher and student both have {teacher_vocab} ids",
        f"the teacher's vocabulary has {teacher_vocab:,} ids and the student's {student:,}: "
        f"distillation compares their distributions id by id; {fix}",
    )
    if data is None or "train" not in data.splits:
        return
    train = data.splits["train"].tokens
    k = cfg.top_k or teacher_vocab
    per_token = k * (token_dtype(teacher_vocab).itemsize + 2)
    p.estimates["teacher_logits_disk_bytes"] = train * per_token
    p.add(
        "teacher logits",
        "ok",
        f"online: none stored; offline (the teacher_logits stage) they would take about "
        f"{format_bytes(train * per_token)} ({per_token} bytes per token x "
        f"{format_count(train)} train tokens)",
    )


def _student_builder(directory: Path) -> ModelBuilder:
    """The run's model builder for a student that starts from checkpoint `directory`: its
    weights in fp32 (the seed draws nothing), sharded as `train/run.build_model` shards under
    FSDP."""

    def build(setup: Setup, seed: int, device: torch.device) -> GPT:
        import torch

        from albor.model.hf import load_pretrained
        from albor.train import distributed

        fsdp = setup.mode == "fsdp" and distributed.active()
        model, _ = load_pretrained(directory, device="cpu" if fsdp else device, dtype=torch.float32)
        if fsdp:
            distributed.shard(model, list(model.model.layers))
        return model

    return build


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    from albor.model.load import require_checkpoint
    from albor.train.distill import Distill, OfflineDistill, open_offline
    from albor.train.run import TokenData, build_model, run
    from albor.train.teacher import LogitsIndex, load_teacher

    assert cfg.data is not None
    model = cfg
    build: ModelBuilder = build_model
    if cfg.student is not None:
        model = with_architecture(cfg, require_checkpoint(cfg.student, "student"))
        build = _student_builder(cfg.student)
    setup = preflight.setup(cfg, model)
    config = cfg.model_dump(mode="json", exclude={"output"})
    if cfg.teacher_logits is not None:
        index = LogitsIndex.load(cfg.teacher_logits)
        offline = open_offline(cfg.data, cfg.teacher_logits, setup.seq_len, cfg.seed)
        objective = OfflineDistill(temperature=index.temperature, alpha=cfg.alpha)
        return run(
            cfg, setup, offline, ctx, stage=NAME, config=config, objective=objective, build=build
        )
    assert cfg.teacher is not None
    data = TokenData.open(cfg.data, setup.seq_len, cfg.seed)
    teacher = load_teacher(cfg.teacher, setup.device, setup.precision)
    online = Distill(teacher, temperature=cfg.temperature, alpha=cfg.alpha, top_k=cfg.top_k)
    outcome = run(cfg, setup, data, ctx, stage=NAME, config=config, objective=online, build=build)
    # The rows of this process's steps (a resumed run's figures cover the steps since resuming).
    outcome.metrics["teacher_rows"] = online.integrity()
    return outcome
