"""The pre-flight every training plan prints: checks and estimates before anything trains.

Exact parameter count, memory against the device, tokens per optimizer step, steps and tokens,
how many times the data repeats, warmup fraction, checkpoint count and size, wall time; configs
that cannot do what they say are rejected with the key and the fix. A training stage's `plan`
calls, in order:

    setup = check_run(p, settings, model_settings)   # None: the architecture is invalid
    check_data(p, settings, setup, facts)            # when the stage's data could be read
    check_device(p, settings, setup)

`Setup` holds what the checks resolved (device, parallelism, world size, window, tokens per
step, the precision `auto` chose); `apply` builds the same `Setup` with `setup()` and trains with
it, so plan and apply cannot disagree about them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from albor.device import resolve as resolve_device
from albor.errors import ConfigError
from albor.model.config import ModelConfig
from albor.model.estimate import flops_per_token, format_bytes, format_count, memory_budget
from albor.model.estimate import param_count as count_params
from albor.plan import Plan
from albor.train import hardware
from albor.train.settings import (
    ModelSettings,
    Parallelism,
    Precision,
    TargetDevice,
    TrainSettings,
    model_config,
    window,
)

# Activation checkpointing runs each block's forward twice: 8 FLOPs per weight per token where
# training otherwise does 6.
RECOMPUTE_FACTOR = 8 / 6

# Fraction of the matmul peak a training step reaches on CPU, for the wall-time estimate only
# (benchmarks/train.py measured 65% for the demo preset on 2 cores; larger models do better).
ASSUMED_MFU = 0.6

# A run whose optimizer step sees fewer tokens than params / this is far from any published
# recipe (GPT-3 125M: 0.5M tokens; the specification's 350M plateaued at 4K and moved at 131K).
TOKENS_PER_STEP_DIVISOR = 4000

# Config precision -> the memory model's name for it: bf16 autocast keeps fp32 master weights,
# gradients and optimizer states, with bf16 activations.
MEMORY_PRECISION = {"fp32": "fp32", "bf16": "bf16-mixed"}

# precision: auto on CPU times one matmul of the model's width in each dtype: the tokens of a
# micro-batch (at most this many rows) x hidden x intermediate, as the MLP computes it.
AUTO_MATMUL_ROWS = 1024
# ... and fewer rows for a model so wide that one matmul would take longer than about this many
# FLOPs (a 7B-wide matmul of 1024 rows is ~90 GFLOP: seconds on a laptop, per dtype).
AUTO_MATMUL_MAX_FLOPS = 4e9
AUTO_SECONDS = 0.12  # timed per dtype: the plan stays about a second
# bf16 must beat fp32 by this factor: autocast adds casts the matmul alone does not show, and
# two measurements within noise of each other would choose differently from run to run.
AUTO_BF16_MARGIN = 1.1


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


def setup(settings: TrainSettings, model: ModelSettings, *, here: bool = True) -> Setup:
    """Resolve the model, window, device and parallelism (ConfigError for a bad architecture or,
    when the run is to train `here`, a device that is not here)."""
    from albor.train import distributed  # torch: imported when a plan runs, not with the stage

    mc = model_config(model)
    problems = mc.problems()
    if problems:
        raise ConfigError("; ".join(problems))
    seq, world = window(model, mc), settings.planned_world() or distributed.world_size()
    try:
        device = resolve_device(settings.device)
    except ConfigError:
        if here:
            raise
        device = settings.device  # planned for a target elsewhere: `cuda` there
    target = _target(settings)
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


def choose_precision(
    settings: TrainSettings,
    mc: ModelConfig,
    seq_len: int,
    device: str,
    target: tuple[str, hardware.Accelerator] | None = None,
) -> tuple[Precision, str, dict[str, float]]:
    """The precision a run computes in, why, and the GFLOP/s measured for it (CPU, auto only).

    `auto`: on a `target` planned for elsewhere, bf16 where its datasheet peak is higher; on
    CUDA, bf16 where the GPU supports it; on a CPU, bf16 where a matmul at the model's width
    runs at least AUTO_BF16_MARGIN times faster in bf16 than in fp32, measured now.
    """
    if settings.precision != "auto":
        return settings.precision, f"precision: {settings.precision} set in the config", {}
    if target is not None:
        name, acc = target
        if isinstance(settings.target, TargetDevice):
            return "bf16", f"auto: the {name} is planned in bf16 (peak_tflops taken as bf16's)", {}
        if acc.bf16_tflops > acc.fp32_tflops:
            peaks = f"{acc.bf16_tflops:g} TFLOP/s vs fp32 {acc.fp32_tflops:g}"
            return "bf16", f"auto: {name} runs bf16 at {peaks} (datasheet)", {}
        return "fp32", f"auto: {name} is no faster in bf16 (datasheet)", {}
    if device == "cuda":
        if hardware.bf16_support("cuda") == "native":
            return "bf16", "auto: this GPU supports bf16 (torch.cuda.is_bf16_supported)", {}
        return "fp32", "auto: this GPU has no bf16 support", {}
    threads = settings.threads or os.cpu_count() or 1
    rows = min(settings.micro_batch * seq_len, AUTO_MATMUL_ROWS)
    per_row = 2 * mc.hidden_size * mc.intermediate_size
    rows = max(min(rows, int(AUTO_MATMUL_MAX_FLOPS // per_row)), 1)
    shape = (rows, mc.hidden_size, mc.intermediate_size)
    gflops = {
        p: round(hardware.matmul_flops(shape, p, threads, AUTO_SECONDS) / 1e9, 1)
        for p in ("fp32", "bf16")
    }
    fp32, bf16 = gflops["fp32"], gflops["bf16"]
    measured = (
        f"bf16 matmul {bf16:g} GFLOP/s vs fp32 {fp32:g} on this CPU "
        f"({rows}x{mc.hidden_size}x{mc.intermediate_size}, {threads} threads)"
    )
    if bf16 >= AUTO_BF16_MARGIN * fp32:
        return "bf16", f"auto: {measured}", gflops
    return "fp32", f"auto: {measured}; bf16 is not {AUTO_BF16_MARGIN:g}x faster", gflops


def _target(settings: TrainSettings) -> tuple[str, hardware.Accelerator] | None:
    t = settings.target
    if t is None:
        return None
    if isinstance(t, str):
        return t, hardware.ACCELERATORS[t]
    device = hardware.Accelerator(t.peak_tflops, t.peak_tflops, t.memory_gib, t.mfu)
    return f"device of {t.peak_tflops:g} TFLOP/s", device


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


def format_duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} seconds" if seconds >= 10 else f"{seconds:.2g} seconds"


def check_run(p: Plan, settings: TrainSettings, model: ModelSettings) -> Setup | None:
    """Architecture, window, warmup, parallelism, tokens per step and schedule; the resolved
    setup, or None when the architecture is invalid (nothing else can be judged)."""
    try:
        mc = model_config(model)
    except ConfigError as e:
        p.add("architecture", "fail", str(e))
        return None
    problems = mc.problems()
    p.require(
        "architecture",
        not problems,
        f"{model.model}: {mc.num_layers} layers, width "
        f"{mc.hidden_size}, {mc.num_heads} heads / {mc.num_kv_heads} KV heads, "
        f"FFN {mc.intermediate_size}, vocab {mc.vocab_size}, context {mc.max_seq_len}",
        "; ".join(problems),
    )
    if problems:
        return None
    try:
        s = setup(settings, model, here=settings.target is None)
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
    p.require(
        "vocab",
        data.vocab_size == mc.vocab_size,
        f"model and tokenizer both have {mc.vocab_size} ids",
        f"model vocab_size {mc.vocab_size} != tokenizer vocab {data.vocab_size}: set "
        f"architecture.vocab_size: {data.vocab_size} (or retrain the tokenizer with "
        f"vocab_size {mc.vocab_size})",
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


def check_device(p: Plan, settings: TrainSettings, s: Setup, extra: Extra | None = None) -> None:
    """Speed options the device must support, memory, checkpoints on disk, and wall time: on
    the machine at hand, or on the `target` GPU the run is planned for. `extra`: what runs
    beside the model (its memory and FLOPs count too)."""
    budget = memory_budget(
        s.model,
        settings.micro_batch,
        s.seq_len,
        precision=MEMORY_PRECISION[s.precision],
        activation_checkpointing=settings.activation_checkpointing,
    )
    if extra is not None and extra.memory:
        total = budget.pop("total") + extra.memory
        budget = {**budget, extra.what: extra.memory, "total": total}
    p.estimates["memory"] = {k: format_bytes(v) for k, v in budget.items()}
    if s.target is not None:
        _check_target(p, budget["total"], s.target)
    else:
        _check_speed_options(p, settings, s.device)  # precision as set: auto chose what runs
        available, what = hardware.device_memory(s.device)
        if available is None:
            p.add("device", "fail", f"device {s.device}: {what} (set device: cpu)")
        else:
            p.require(
                "memory",
                budget["total"] <= available,
                f"{format_bytes(budget['total'])} of {format_bytes(available)} ({what}, "
                f"{s.device})",
                f"needs {format_bytes(budget['total'])} but {s.device} has "
                f"{format_bytes(available)} ({what}): {_SMALLER}",
            )
    _estimate_time(p, settings, s, extra.flops_per_token if extra is not None else 0.0)
    # Under a time budget, the steps that fit it are the run's.
    steps = min(settings.max_steps, p.estimates.get("steps_in_time_budget", settings.max_steps))
    _estimate_checkpoints(p, settings, s.parameters, steps)


_SMALLER = (
    "lower micro_batch (raise grad_accum to keep the tokens per step) or seq_len, or pick a "
    "smaller model"
)


def _check_target(p: Plan, needed: int, target: tuple[str, hardware.Accelerator]) -> None:
    name, device = target
    memory = int(device.memory_gib * 2**30)
    p.require(
        "memory",
        needed <= memory,
        f"{format_bytes(needed)} of {format_bytes(memory)} (one {name}, datasheet)",
        f"needs {format_bytes(needed)} but a {name} has {format_bytes(memory)}: {_SMALLER}, "
        "or plan for a larger target",
    )


def _check_speed_options(p: Plan, settings: TrainSettings, device: str) -> None:
    """bf16 and torch.compile need support the device may lack; say so before training starts."""
    if settings.precision == "bf16":
        support = hardware.bf16_support(device)
        if device == "cuda":
            p.require(
                "precision",
                support == "native",
                "bf16 autocast, fp32 master weights and optimizer",
                "this GPU has no bf16 support: set precision: fp32",
            )
        else:
            p.warn_if(
                "precision",
                support != "native",
                "this CPU has no native bf16 (avx512_bf16 / amx_bf16): bf16 will be emulated "
                "and slower than fp32; set precision: fp32",
                "bf16 autocast on CPU (native bf16 instructions), fp32 master weights",
            )
    if settings.compile:
        need = hardware.compile_support(device)
        p.require(
            "compile",
            need is None,
            f"torch.compile on {device} (the first steps are slow while it compiles)",
            f"compile: true needs {need} on {device}: install it or set compile: false",
        )


def _estimate_checkpoints(p: Plan, settings: TrainSettings, parameters: int, steps: int) -> None:
    # Weights + two AdamW states, fp32 whatever the precision (Muon keeps one state for the
    # matrices it takes: an upper bound then).
    ckpt_bytes = parameters * 4 * 3
    # Intermediate checkpoints every checkpoint_every steps before the last, one more at each
    # validation that improves between them (at most every eval step), and the final weights.
    every = settings.checkpoint_every
    intermediate = (steps - 1) // every
    on_improvement = 0
    if settings.eval_tokens > 0:
        evals = range(settings.eval_every, steps, settings.eval_every)
        on_improvement = sum(1 for e in evals if e % every)
    best = 1 if settings.eval_tokens > 0 else 0
    kept = min(intermediate + on_improvement, settings.keep_checkpoints + best) + 1
    p.estimates["checkpoints"] = {
        "written": intermediate + 1,
        "written_when_validation_improves": on_improvement,
        "kept": kept,
        "size_each": format_bytes(ckpt_bytes),
    }
    p.estimates["disk_bytes"] = kept * ckpt_bytes


def _estimate_time(p: Plan, settings: TrainSettings, s: Setup, extra_flops: float = 0.0) -> None:
    per_token = flops_per_token(s.model, s.seq_len) + extra_flops
    flops = per_token * s.tokens_per_step * settings.max_steps
    p.estimates["train_flops"] = float(flops)
    # Activation checkpointing runs each block's forward twice.
    work = flops * (RECOMPUTE_FACTOR if settings.activation_checkpointing else 1.0)
    at_peak: float | None = None  # the work at 100% of the peak: no step can be faster
    if s.target is not None:
        at_peak = _estimate_target_time(p, s.precision, s.world, s.target, work)
    elif s.device == "cpu":
        at_peak = _estimate_cpu_time(p, settings, s.precision, work)
    if settings.max_time is not None:
        _check_time_budget(p, settings, p.estimates.get("wall_time_s"), at_peak)


def _check_time_budget(
    p: Plan, settings: TrainSettings, wall: float | None, at_peak: float | None
) -> None:
    """Steps the time budget allows by the wall-time estimate. A budget that cannot fit one
    step, or the warmup (the run would end before the learning rate peaks), is refused; judged
    at the device's full peak, since the MFU is an assumption and a refusal must be certain."""
    budget = settings.max_time
    assert budget is not None
    p.estimates["max_time_s"] = budget
    shown = format_duration(budget)
    if wall is None or at_peak is None:
        p.add("time budget", "ok", f"max_time {shown} (no wall-time estimate for this device)")
        return
    step_s, fastest_s = wall / settings.max_steps, at_peak / settings.max_steps
    fit = math.floor(budget / step_s) if step_s > 0 else settings.max_steps
    p.estimates["steps_in_time_budget"] = min(fit, settings.max_steps)
    if budget < fastest_s:
        p.add(
            "time budget",
            "fail",
            f"max_time {budget:g} s is shorter than one step (at least {fastest_s:.3g} s at "
            "the device's peak): raise max_time, or lower micro_batch / grad_accum",
        )
    elif budget <= fastest_s * settings.warmup_steps:
        p.add(
            "time budget",
            "fail",
            f"max_time {shown} ends within the warmup ({settings.warmup_steps} steps take at "
            f"least {format_duration(fastest_s * settings.warmup_steps)} at the device's peak): "
            "raise max_time or lower warmup_steps",
        )
    elif fit < settings.max_steps:
        warmup = settings.warmup_steps / max(fit, 1)
        p.estimates["warmup_fraction"] = round(min(warmup, 1.0), 4)
        p.add(
            "time budget",
            "ok",
            f"max_time {shown}: about {fit:,} of max_steps {settings.max_steps:,} steps (warmup "
            f"{warmup:.0%} of them); the learning rate decays to its floor when the time is "
            "spent",
        )
        # The budget, not max_steps, is what the run will take.
        p.estimates["wall_time_s"] = round(budget, 1)
        p.estimates["wall_time"] = format_duration(budget)
        p.checks = [c for c in p.checks if c.name != "wall time"]
        p.add("wall time", "ok", f"about {shown}: the time budget ends the run")
    else:
        p.add(
            "time budget",
            "ok",
            f"max_time {shown} outlasts max_steps {settings.max_steps:,} (about "
            f"{format_duration(wall)}): the run ends at max_steps",
        )


def _estimate_cpu_time(p: Plan, settings: TrainSettings, precision: str, work: float) -> float:
    """Wall time from this CPU's matmul peak, measured now; returns the time at the peak."""
    threads = settings.threads or os.cpu_count() or 1
    peak = hardware.cpu_peak_flops(threads, precision)
    p.estimates["device_peak_gflops"] = round(peak / 1e9, 1)
    wall = work / (peak * ASSUMED_MFU)
    p.estimates["wall_time_s"] = round(wall, 1)
    p.estimates["wall_time"] = format_duration(wall)
    p.warn_if(
        "wall time",
        wall > 7 * 86400,
        f"about {format_duration(wall)} on this CPU: run it on a GPU (device: cuda), or plan "
        "for one with target: h100 (or l4, rtx4090, ...)",
        f"about {format_duration(wall)} at {ASSUMED_MFU:.0%} of the measured peak",
    )
    return work / peak


def _estimate_target_time(
    p: Plan, precision: str, world: int, target: tuple[str, hardware.Accelerator], work: float
) -> float:
    """Wall time on `world` of the target GPU, from its datasheet peak and an MFU: albor's
    measured one for that device where there is one, else a stated assumption. Returns the
    time at the peak."""
    name, device = target
    peak = device.peak_flops(precision)
    mfu = device.mfu or hardware.ASSUMED_GPU_MFU
    basis = "measured" if device.mfu else "assumed"
    wall = work / (peak * world * mfu)
    p.estimates["target"] = f"{world} x {name}"
    p.estimates["device_peak_tflops"] = round(peak / 1e12, 1)
    p.estimates["mfu"] = {"value": mfu, "basis": basis}
    p.estimates["wall_time_s"] = round(wall, 1)
    p.estimates["wall_time"] = format_duration(wall)
    p.add(
        "wall time",
        "ok",
        f"about {format_duration(wall)} on {world} x {name} at {mfu:.0%} MFU ({basis}) of "
        f"{peak / 1e12:g} TFLOP/s {precision} each",
    )
    return work / (peak * world)
