"""The pre-flight every training plan prints: checks and estimates before anything trains.

Exact parameter count, memory against the device, tokens per optimizer step, steps and tokens,
how many times the data repeats, warmup fraction, checkpoint count and size, wall time; configs
that cannot do what they say are rejected with the key and the fix. A training stage's `plan`
calls, in order:

    setup = check_run(p, settings, model_settings)   # None: the architecture is invalid
    check_data(p, settings, setup, facts)            # when the stage's data could be read
    check_device(p, settings, setup)

The model is a preset with overrides (`ModelSettings`), or a `ModelConfig` as given (a
finetune's base, with `seq_len` for its window). This module holds the rejections; the figures
are `estimates.py`'s, the device's verdict `capacity.py`'s and `precision: auto`
`precision.py`'s. `Setup` holds what the checks resolved (device, parallelism, world size,
window, tokens per step, the precision `auto` chose); `apply` builds the same `Setup` with
`setup()` and trains with it, so plan and apply cannot disagree about them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from albor.device import resolve as resolve_device
from albor.errors import ConfigError
from albor.model.config import ModelConfig
from albor.model.estimate import format_bytes, format_count
from albor.model.estimate import param_count as count_params
from albor.plan import Plan
from albor.train import capacity, estimates, hardware
from albor.train.precision import choose_precision
from albor.train.settings import (
    ModelSettings,
    Parallelism,
    Precision,
    TrainSettings,
    model_config,
    window,
)

# A run whose optimizer step sees fewer tokens than params / this is far from any published
# recipe (GPT-3 125M: 0.5M tokens; the specification's 350M plateaued at 4K and moved at 131K).
TOKENS_PER_STEP_DIVISOR = 4000


@dataclass(frozen=True)
class Setup:
    """What a run resolves from its settings before training: plan shows it, apply uses it."""

    model: ModelConfig
    seq_len: int
    device: str  # "cpu" or "cuda": "auto" resolved
    mode: Parallelism
    world: int  # processes: as planned (nproc x nodes), else as launched
    parameters: int
    tokens_per_step: int  # over every rank
    target: tuple[str, hardware.Accelerator] | None = None  # the GPU planned for, if not here
    precision: Precision = "fp32"  # what the run computes in: `precision` with auto resolved
    precision_reason: str = "precision: fp32 set in the config"
    # precision: auto on a CPU: the measured matmul GFLOP/s in each dtype ({} otherwise)
    matmul_gflops: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Extra:
    """What a stage runs beside the model it trains (a distillation's teacher): its memory on
    the device and its FLOPs per trained token, added to the estimates."""

    what: str
    memory: int = 0
    flops_per_token: float = 0.0


@dataclass(frozen=True)
class DataFacts:
    """What the checks need to know of a run's data, read from its headers and index."""

    vocab_size: int
    train_tokens: int
    val_tokens: int | None  # None: no validation split


def resolve_model(
    model: ModelSettings | ModelConfig, seq_len: int | None = None
) -> tuple[ModelConfig, int]:
    """The architecture and the training window: a preset with its overrides (ConfigError for
    an unknown preset or a bad value) or a `ModelConfig` as given; the window is `seq_len`, else
    the settings', else the model's whole context."""
    if isinstance(model, ModelConfig):
        return model, seq_len or model.max_seq_len
    mc = model_config(model)
    return mc, seq_len or window(model, mc)


def setup(
    settings: TrainSettings,
    model: ModelSettings | ModelConfig,
    *,
    seq_len: int | None = None,
    here: bool = True,
) -> Setup:
    """Resolve the model, window, device and parallelism (ConfigError for a bad architecture or,
    when the run is to train `here`, a device that is not here)."""
    from albor.train import distributed  # torch: imported when a plan runs, not with the stage

    mc, seq = resolve_model(model, seq_len)
    problems = mc.problems()
    if problems:
        raise ConfigError("; ".join(problems))
    world = settings.planned_world() or distributed.world_size()
    try:
        device = resolve_device(settings.device)
    except ConfigError:
        if here:
            raise
        device = settings.device  # planned for a target elsewhere: `cuda` there
    target = capacity.target_of(settings)
    precision, reason, gflops = choose_precision(
        settings, mc, seq, device, target if not here else None
    )
    return Setup(
        model=mc,
        seq_len=seq,
        device=device,
        mode=settings.parallelism(),
        world=world,
        parameters=count_params(mc),
        tokens_per_step=settings.tokens_per_step(seq, world),
        target=target,
        precision=precision,
        precision_reason=reason,
        matmul_gflops=gflops,
    )


def require_launch(settings: TrainSettings) -> None:
    """Refuse to train in another world than the one planned (nproc x nodes): the batch, the
    schedule's tokens and the plan's estimates were all sized for it."""
    from albor.train import distributed

    planned, launched = settings.planned_world(), distributed.world_size()
    if planned is not None and planned != launched:
        raise ConfigError(
            f"nproc {settings.nproc or 1} x nodes {settings.nodes} plans {planned} processes "
            f"but this run has {launched}: launch with `torchrun --nnodes {settings.nodes} "
            f"--nproc-per-node {settings.nproc or 1} -m albor train apply CONFIG`, or remove "
            "nproc and nodes to train as launched"
        )


def check_run(
    p: Plan,
    settings: TrainSettings,
    model: ModelSettings | ModelConfig,
    *,
    seq_len: int | None = None,
    name: str | None = None,
) -> Setup | None:
    """Architecture, window, warmup, parallelism, tokens per step and schedule; the resolved
    setup, or None when the architecture is invalid (nothing else can be judged). `name` labels
    the model in the architecture check (default: the preset's name)."""
    try:
        mc, _ = resolve_model(model, seq_len)
    except ConfigError as e:
        p.add("architecture", "fail", str(e))
        return None
    if name is None:
        name = model.model if isinstance(model, ModelSettings) else "model"
    problems = mc.problems()
    p.require(
        "architecture",
        not problems,
        f"{name}: {mc.num_layers} layers, width "
        f"{mc.hidden_size}, {mc.num_heads} heads / {mc.num_kv_heads} KV heads, "
        f"FFN {mc.intermediate_size}, vocab {mc.vocab_size}, context {mc.max_seq_len}",
        "; ".join(problems),
    )
    if problems:
        return None
    try:
        s = setup(settings, model, seq_len=seq_len, here=settings.target is None)
    except ConfigError as e:  # a device that is not here: the message names the key and fix
        p.add("device", "fail", str(e))
        return None
    seq, n = s.seq_len, s.parameters
    p.require(
        "sequence length",
        seq <= mc.max_seq_len,
        f"{seq} <= context {mc.max_seq_len}",
        f"seq_len {seq} exceeds the context {mc.max_seq_len}: lower seq_len or raise "
        "architecture.max_seq_len",
    )
    p.require(
        "warmup",
        settings.warmup_steps < settings.max_steps,
        f"{settings.warmup_steps} steps = {settings.warmup_steps / settings.max_steps:.1%} of "
        "the run",
        f"warmup_steps {settings.warmup_steps} >= max_steps {settings.max_steps}: the learning "
        "rate would never reach its peak; use a warmup of about 1-10% of max_steps",
    )
    _check_distributed(p, settings, s)
    if settings.precision == "auto":
        p.add("precision", "ok", f"{s.precision} ({s.precision_reason})")
        p.estimates["precision"] = {"chosen": s.precision, "reason": s.precision_reason}
        if s.matmul_gflops:
            p.estimates["precision"]["matmul_gflops"] = s.matmul_gflops
    if settings.optimizer != "adamw":
        _check_optimizer(p, settings, s)
    total_tokens = s.tokens_per_step * settings.max_steps
    p.estimates["parameters"] = {"total": n, "human": format_count(n)}
    if s.world > 1:
        p.estimates["world_size"] = s.world
        p.estimates["distributed"] = s.mode
    p.estimates["tokens_per_step"] = s.tokens_per_step
    p.estimates["steps"] = settings.max_steps
    p.estimates["total_tokens"] = total_tokens
    p.estimates["tokens_per_parameter"] = round(total_tokens / n, 3)
    p.estimates["warmup_fraction"] = round(settings.warmup_steps / settings.max_steps, 4)
    wanted = n // TOKENS_PER_STEP_DIVISOR
    global_batch = (
        f" (global: {settings.micro_batch} x {settings.grad_accum} x {seq} x {s.world} ranks)"
        if s.world > 1
        else ""
    )
    p.warn_if(
        "tokens per step",
        s.tokens_per_step < wanted,
        f"{s.tokens_per_step:,} tokens per optimizer step is far below the ~{wanted:,}+ a "
        f"{format_count(n)}-parameter model needs (4K tokens/step for 350M plateaued in the "
        "specification's run): raise grad_accum or micro_batch",
        f"{s.tokens_per_step:,} tokens per optimizer step{global_batch}",
    )
    p.warn_if(
        "decay",
        settings.min_lr_ratio >= 1.0,
        "min_lr_ratio 1 keeps the learning rate constant after warmup (a run once plateaued "
        "so): use a floor of about 0.1",
        f"cosine decay to {settings.min_lr_ratio:g} x lr"
        if settings.lr_schedule == "cosine"
        else f"lr held, then a linear decay over the last {settings.warmdown_ratio:.0%} of the "
        f"run to {settings.min_lr_ratio:g} x lr (wsd)",
    )
    return s


def _check_optimizer(p: Plan, settings: TrainSettings, s: Setup) -> None:
    """optimizer: muon needs torch.optim.Muon, a model whose block matrices it can take, and
    whole matrices (not FSDP's shards)."""
    import torch

    from albor.model.gpt import GPT
    from albor.train.optim import muon_problems, muon_split

    with torch.device("meta"):  # shapes only: no memory, no random numbers
        model = GPT(s.model)
    problems = muon_problems(model, s.mode)
    matrices, other = muon_split(model)
    n_muon = sum(p.numel() for p in matrices)
    p.require(
        "optimizer",
        not problems,
        f"muon (lr {settings.muon_lr:g}) for {len(matrices)} block matrices "
        f"({format_count(n_muon)} parameters), AdamW (lr {settings.lr:g}) for the other "
        f"{len(other)} tensors",
        "; ".join(problems),
    )


def _check_distributed(p: Plan, settings: TrainSettings, s: Setup) -> None:
    """Check the parallelism against how the process was launched (or is planned to be)."""
    from albor.train import distributed

    mode, world, launched = s.mode, s.world, distributed.world_size()
    if world == 1:
        p.warn_if(
            "distributed",
            mode != "none",
            f"distributed: {mode} in a single process trains as a plain run: launch with "
            "`torchrun --nproc-per-node N -m albor train apply CONFIG`",
            "one process",
        )
        return
    if launched > 1 and launched != world:
        p.add(
            "distributed",
            "fail",
            f"nproc x nodes plans {world} processes but torchrun launched {launched}: launch "
            f"{world}, or set nproc and nodes to match the launch",
        )
        return
    gpu = s.device == "cuda" or s.target is not None
    backend = "nccl" if gpu else "gloo"
    where = f"rank {distributed.rank()}" if launched > 1 else "as planned"
    if mode == "fsdp" and not gpu:
        import importlib.util

        ok = importlib.util.find_spec("torch.distributed.fsdp") is not None
        p.require(
            "distributed",
            ok,
            f"fsdp (FSDP2) over {world} processes ({backend}, CPU)",
            "fsdp needs torch.distributed.fsdp.fully_shard (PyTorch >= 2.6): upgrade torch "
            "or use distributed: ddp",
        )
        return
    p.require(
        "distributed",
        mode != "none",
        f"{mode} over {world} processes ({backend}, {where})",
        f"distributed: none under torchrun with WORLD_SIZE {world} would train {world} "
        "unrelated copies: set distributed: ddp (or fsdp), or launch one process",
    )


def check_data(p: Plan, settings: TrainSettings, s: Setup, data: DataFacts) -> None:
    """The data against the model and the run: vocab, one window at least, repeats, validation."""
    mc, seq = s.model, s.seq_len
    # An embedding wider than the tokenizer is padding (an adopted tokenizer's model rounds its
    # vocabulary up, Qwen2.5's 151,665 ids to 151,936 rows): those rows never appear in the data.
    spare = mc.vocab_size - data.vocab_size
    p.require(
        "vocab",
        spare >= 0,
        f"model and tokenizer both have {mc.vocab_size} ids"
        if spare == 0
        else f"tokenizer {data.vocab_size} ids, model {mc.vocab_size} ({spare} rows of padding)",
        f"model vocab_size {mc.vocab_size} < tokenizer vocab {data.vocab_size}: the data holds "
        f"ids the model has no row for: set architecture.vocab_size: {data.vocab_size} (or "
        f"retrain the tokenizer with vocab_size {mc.vocab_size})",
    )
    p.require(
        "train data",
        data.train_tokens > seq + 1,
        f"{data.train_tokens:,} tokens",
        f"{data.train_tokens} train tokens cannot fill one window of {seq + 1}: add data or "
        "lower seq_len",
    )
    total_tokens = s.tokens_per_step * settings.max_steps
    p.estimates["data_repeats"] = round(total_tokens / data.train_tokens, 3)
    val = data.val_tokens or 0
    p.warn_if(
        "validation",
        settings.eval_tokens > 0 and val <= seq,
        "the val split is too small for one window: validation is skipped",
        f"{min(settings.eval_tokens, val):,} val tokens per evaluation",
    )


def check_device(
    p: Plan, settings: TrainSettings, s: Setup, extra: Extra | None = None, *, adapters: int = 0
) -> None:
    """Speed options the device must support, memory, checkpoints on disk, and wall time: on
    the machine at hand, or on the `target` GPU the run is planned for. `extra`: what runs
    beside the model (its memory and FLOPs count too). `adapters`: a LoRA run's trainable
    parameters beside the frozen model, which then has no gradients and no optimizer states."""
    held = estimates.trained(settings, s, adapters)
    budget = estimates.memory(settings, s, held, extra)
    p.estimates["memory"] = {k: format_bytes(v) for k, v in budget.items()}
    p.estimates["memory_assumes"] = held.describe()
    capacity.check_fit(p, settings, s.device, s.target, budget["total"])
    # An adapter's weights take part in the matmuls as a model's do: 6 FLOPs per token each.
    extra_flops = (extra.flops_per_token if extra is not None else 0.0) + 6.0 * adapters
    estimates.wall_time(p, settings, s, extra_flops)
    # Under a time budget, the steps that fit it are the run's.
    steps = min(settings.max_steps, p.estimates.get("steps_in_time_budget", settings.max_steps))
    estimates.checkpoints(p, settings, held, steps)
