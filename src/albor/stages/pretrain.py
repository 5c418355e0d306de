"""pretrain: train the decoder on packed token shards; the output is an HF-compatible checkpoint.

`plan` is the pre-flight the specification's 350M run lacked (ALB-060): exact parameter count,
memory budget against the device, tokens per optimizer step, total steps and tokens, how many
times the data repeats, warmup fraction, checkpoint count and size, and wall time; it rejects
configs that cannot do what they say. `max_steps` is authoritative: the data repeats as needed.
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from albor.config import Int, StageConfig
from albor.errors import ArtifactError, ConfigError
from albor.model.config import ModelConfig
from albor.model.estimate import (
    flops_per_token,
    format_bytes,
    format_count,
    memory_budget,
    param_count,
)
from albor.model.presets import PRESETS, preset
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, check_input

NAME = "pretrain"
INPUTS = ("data",)


class Architecture(StageConfig):
    """Overrides on top of the preset; unset keys keep the preset's value."""

    vocab_size: Int | None = Field(None, description="Token ids; must equal the tokenizer's vocab.")
    hidden_size: Int | None = Field(None, description="Width of the residual stream.")
    num_layers: Int | None = Field(None, description="Transformer blocks.")
    num_heads: Int | None = Field(None, description="Query heads; must divide hidden_size.")
    num_kv_heads: Int | None = Field(None, description="Key/value heads; must divide num_heads.")
    intermediate_size: Int | None = Field(None, description="SwiGLU hidden width.")
    max_seq_len: Int | None = Field(None, description="Context length.")
    rope_theta: float | None = Field(None, description="RoPE base.")
    rms_norm_eps: float | None = Field(None, description="RMSNorm epsilon.")
    tie_embeddings: bool | None = Field(None, description="Share embedding and output head.")
    qkv_bias: bool | None = Field(None, description="Bias on q/k/v (Qwen2 style).")
    init_std: float | None = Field(None, description="Init std.")


class Config(OutputConfig):
    data: Path | None = Field(None, description="Token shard artifact directory (from tokenize).")
    model: str = Field("demo", description=f"Model preset: {', '.join(PRESETS)}.")
    architecture: Architecture = Field(
        default_factory=Architecture, description="Overrides of the preset's architecture."
    )
    seq_len: Int | None = Field(None, gt=0, description="Training window; default: the context.")
    micro_batch: Int = Field(8, gt=0, description="Sequences per forward/backward pass.")
    grad_accum: Int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_steps: Int = Field(1000, gt=0, description="Optimizer steps (authoritative; data repeats).")
    warmup_steps: Int = Field(100, ge=0, description="Linear warmup steps; must be < max_steps.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay (matrices).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(
        1.0, gt=0, description="Max gradient norm; clipping is always on (ALB-071)."
    )
    eval_every: Int = Field(100, gt=0, description="Validate every N steps (and at the end).")
    eval_tokens: Int = Field(65536, ge=0, description="Validation tokens per evaluation (0: none).")
    checkpoint_every: Int = Field(500, gt=0, description="Save a checkpoint every N steps.")
    keep_checkpoints: Int = Field(
        2,
        gt=0,
        description="Newest intermediate checkpoints kept; the best by validation loss is kept "
        "besides them (named in checkpoints/best.json).",
    )
    log_every: Int = Field(10, gt=0, description="Write a metrics line every N steps.")
    max_bad_steps: Int = Field(
        10,
        gt=0,
        description="A step whose loss or gradient is not finite (NaN, inf) is skipped, leaving "
        "the weights and optimizer as they were, and counted (metrics.skipped_steps); this many "
        "in a row stop the run with an error.",
    )
    seed: int = Field(1337, description="Seed of the init and of the data order.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda if available.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="fp32, or bf16: autocast to bfloat16 (CUDA or CPU) with fp32 master weights, "
        "gradients and optimizer state.",
    )
    compile: bool = Field(
        False, description="torch.compile the model (slow to compile on CPU; needs a C++ compiler)."
    )
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each block in backward instead of keeping its activations "
        "(less memory, about a third more compute).",
    )
    prefetch: bool = Field(
        True, description="Build the next step's batches in a background thread."
    )
    threads: int | None = Field(
        None, gt=0, description="CPU threads (per rank under torchrun; default: all cores)."
    )
    distributed: Literal["none", "ddp", "fsdp"] | None = Field(
        None,
        description="Under torchrun: ddp (a full replica per rank, gradients all-reduced) or "
        "fsdp (FSDP2: parameters, gradients and optimizer state sharded over ranks, for models "
        "that do not fit one device). Default: ddp when launched with WORLD_SIZE > 1, else "
        "none. micro_batch is per rank: tokens per step = micro_batch x grad_accum x seq_len x "
        "world size.",
    )


def model_config(cfg: Config) -> ModelConfig:
    overrides = {k: v for k, v in cfg.architecture.model_dump().items() if v is not None}
    return preset(cfg.model, **overrides)


def resolve_distributed(cfg: Config) -> Literal["none", "ddp", "fsdp"]:
    """The parallelism the run uses: as set, else ddp under a multi-process torchrun."""
    from albor.train import distributed

    if cfg.distributed is not None:
        return cfg.distributed
    return "ddp" if distributed.launched() else "none"


def _check_distributed(cfg: Config, p: Plan, device: str) -> int:
    """Check the parallelism against how the process was launched; the world size it trains on."""
    from albor.train import distributed

    mode, world = resolve_distributed(cfg), distributed.world_size()
    if world == 1:
        p.warn_if(
            "distributed",
            mode != "none",
            f"distributed: {mode} in a single process trains as a plain run: launch with "
            "`torchrun --nproc-per-node N -m albor train apply CONFIG`",
            "one process",
        )
        return 1
    backend = "nccl" if device == "cuda" else "gloo"
    if mode == "fsdp" and device != "cuda":
        import importlib.util

        ok = importlib.util.find_spec("torch.distributed.fsdp") is not None
        p.require(
            "distributed",
            ok,
            f"fsdp (FSDP2) over {world} processes ({backend}, CPU)",
            "fsdp needs torch.distributed.fsdp.fully_shard (PyTorch >= 2.6): upgrade torch "
            "or use distributed: ddp",
        )
        return world
    p.require(
        "distributed",
        mode != "none",
        f"{mode} over {world} processes ({backend}, rank {distributed.rank()})",
        f"distributed: none under torchrun with WORLD_SIZE {world} would train {world} "
        "unrelated copies: set distributed: ddp (or fsdp), or launch one process",
    )
    return world


def resolve_device(cfg: Config) -> str:
    if cfg.device != "auto":
        return cfg.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_memory(device: str) -> tuple[int | None, str]:
    """Memory the run may use on `device` and where that figure comes from, without allocating."""
    if device == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                info = dict(line.split(":", 1) for line in f)
            return int(info["MemAvailable"].split()[0]) * 1024, "available RAM"
        except (OSError, KeyError, ValueError):
            pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            return int(pages), "physical RAM"
    import torch

    if not torch.cuda.is_available():
        return None, "no CUDA device"
    props = torch.cuda.get_device_properties(0)
    return int(props.total_memory), props.name


def cpu_peak_flops(threads: int, precision: str = "fp32") -> float:
    """Matmul FLOP/s of this CPU in `precision` (fp32 or bf16) measured in ~0.1 s: the ceiling
    for the time estimate."""
    import torch

    n = 512
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.mm(a, b)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.1:
            torch.mm(a, b)
            reps += 1
        return 2 * n**3 * reps / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)


RECOMPUTE_FACTOR = 8 / 6

# Fraction of the matmul peak a training step reaches on CPU, for the wall-time estimate only
# (benchmarks/train.py measured 65% for the demo preset on 2 cores; larger models do better).
ASSUMED_MFU = 0.6


# A run whose optimizer step sees fewer tokens than params / this is far from any published
# recipe (GPT-3 125M: 0.5M tokens; the specification's 350M plateaued at 4K and moved at 131K).
TOKENS_PER_STEP_DIVISOR = 4000


def format_duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} seconds"


def _read_index(cfg: Config, p: Plan, ctx: PlanContext) -> Any:
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
    return index


# Config precision -> the memory model's name for it: bf16 autocast keeps fp32 master weights,
# gradients and optimizer states, with bf16 activations.
MEMORY_PRECISION = {"fp32": "fp32", "bf16": "bf16-mixed"}


def cpu_flags() -> set[str]:
    """The instruction-set flags of this CPU (empty where /proc/cpuinfo is not available)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _check_speed_options(cfg: Config, p: Plan, device: str) -> None:
    """bf16 and torch.compile need support the device may lack; say so before training starts."""
    import importlib.util
    import shutil

    if cfg.precision == "bf16":
        if device == "cuda":
            import torch

            supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            p.require(
                "precision",
                supported,
                "bf16 autocast, fp32 master weights and optimizer",
                "this GPU has no bf16 support: set precision: fp32",
            )
        else:
            native = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
            p.warn_if(
                "precision",
                not native,
                "this CPU has no native bf16 (avx512_bf16 / amx_bf16): bf16 will be emulated "
                "and slower than fp32; set precision: fp32",
                "bf16 autocast on CPU (native bf16 instructions), fp32 master weights",
            )
    if cfg.compile:
        if device == "cuda":
            ok, need = importlib.util.find_spec("triton") is not None, "the triton package"
        else:
            compilers = [os.environ.get("CXX") or "", "g++", "clang++", "c++"]
            ok, need = any(c and shutil.which(c) for c in compilers), "a C++ compiler (g++)"
        p.require(
            "compile",
            ok,
            f"torch.compile on {device} (the first steps are slow while it compiles)",
            f"compile: true needs {need} on {device}: install it or set compile: false",
        )


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    ctx = ctx or PlanContext()
    p = Plan(NAME)
    try:
        mc = model_config(cfg)
    except ConfigError as e:
        p.add("architecture", "fail", str(e))
        return p
    problems = mc.problems()
    p.require(
        "architecture",
        not problems,
        f"{cfg.model}: {mc.num_layers} layers, width "
        f"{mc.hidden_size}, {mc.num_heads} heads / {mc.num_kv_heads} KV heads, "
        f"FFN {mc.intermediate_size}, vocab {mc.vocab_size}, context {mc.max_seq_len}",
        "; ".join(problems),
    )
    if problems:
        return p
    n = param_count(mc)
    seq = cfg.seq_len or mc.max_seq_len
    p.require(
        "sequence length",
        seq <= mc.max_seq_len,
        f"{seq} <= context {mc.max_seq_len}",
        f"seq_len {seq} exceeds the context {mc.max_seq_len}: lower seq_len or raise "
        "architecture.max_seq_len",
    )
    p.require(
        "warmup",
        cfg.warmup_steps < cfg.max_steps,
        f"{cfg.warmup_steps} steps = {cfg.warmup_steps / cfg.max_steps:.1%} of the run",
        f"warmup_steps {cfg.warmup_steps} >= max_steps {cfg.max_steps}: the learning rate "
        "would never reach its peak; use a warmup of about 1-10% of max_steps",
    )
    world = _check_distributed(cfg, p, resolve_device(cfg))
    tokens_per_step = cfg.micro_batch * cfg.grad_accum * seq * world
    total_tokens = tokens_per_step * cfg.max_steps
    p.estimates["parameters"] = {"total": n, "human": format_count(n)}
    if world > 1:
        p.estimates["world_size"] = world
        p.estimates["distributed"] = resolve_distributed(cfg)
    p.estimates["tokens_per_step"] = tokens_per_step
    p.estimates["steps"] = cfg.max_steps
    p.estimates["total_tokens"] = total_tokens
    p.estimates["tokens_per_parameter"] = round(total_tokens / n, 3)
    p.estimates["warmup_fraction"] = round(cfg.warmup_steps / cfg.max_steps, 4)
    wanted = n // TOKENS_PER_STEP_DIVISOR
    p.warn_if(
        "tokens per step",
        tokens_per_step < wanted,
        f"{tokens_per_step:,} tokens per optimizer step is far below the ~{wanted:,}+ a "
        f"{format_count(n)}-parameter model needs (ALB-080: 4K tokens/step for 350M plateaued): "
        "raise grad_accum or micro_batch",
        f"{tokens_per_step:,} tokens per optimizer step"
        + (
            f" (global: {cfg.micro_batch} x {cfg.grad_accum} x {seq} x {world} ranks)"
            if world > 1
            else ""
        ),
    )
    p.warn_if(
        "decay",
        cfg.min_lr_ratio >= 1.0,
        "min_lr_ratio 1 keeps the learning rate constant after warmup (ALB-079: the run "
        "plateaued): use a floor of about 0.1",
        f"cosine decay to {cfg.min_lr_ratio:g} x lr",
    )

    index = _read_index(cfg, p, ctx)
    if index is not None:
        p.require(
            "vocab",
            index.vocab_size == mc.vocab_size,
            f"model and tokenizer both have {mc.vocab_size} ids",
            f"model vocab_size {mc.vocab_size} != tokenizer vocab {index.vocab_size}: set "
            f"architecture.vocab_size: {index.vocab_size} (or retrain the tokenizer with "
            f"vocab_size {mc.vocab_size})",
        )
        train_tokens = index.splits["train"].tokens
        p.require(
            "train data",
            train_tokens > seq + 1,
            f"{train_tokens:,} tokens",
            f"{train_tokens} train tokens cannot fill one window of {seq + 1}: add data or "
            "lower seq_len",
        )
        p.estimates["data_repeats"] = round(total_tokens / train_tokens, 3)
        val = index.splits.get("val")
        p.warn_if(
            "validation",
            cfg.eval_tokens > 0 and (val is None or val.tokens <= seq),
            "the val split is too small for one window: validation is skipped",
            f"{min(cfg.eval_tokens, val.tokens if val else 0):,} val tokens per evaluation",
        )
    device = resolve_device(cfg)
    _check_speed_options(cfg, p, device)
    budget = memory_budget(
        mc,
        cfg.micro_batch,
        seq,
        precision=MEMORY_PRECISION[cfg.precision],
        activation_checkpointing=cfg.activation_checkpointing,
    )
    p.estimates["memory"] = {k: format_bytes(v) for k, v in budget.items()}
    available, what = device_memory(device)
    if available is None:
        p.add("device", "fail", f"device {device}: {what} (set device: cpu)")
    else:
        p.require(
            "memory",
            budget["total"] <= available,
            f"{format_bytes(budget['total'])} of {format_bytes(available)} ({what}, {device})",
            f"needs {format_bytes(budget['total'])} but {device} has "
            f"{format_bytes(available)} ({what}): lower micro_batch (raise grad_accum to "
            "keep the tokens per step) or seq_len, or pick a smaller model",
        )
    ckpt_bytes = n * 4 * 3  # weights + two AdamW states, fp32 whatever the precision
    # Intermediate checkpoints every checkpoint_every steps before the last, one more at each
    # validation that improves between them (at most every eval step), and the final weights.
    intermediate = (cfg.max_steps - 1) // cfg.checkpoint_every
    on_improvement = 0
    if cfg.eval_tokens > 0:
        evals = range(cfg.eval_every, cfg.max_steps, cfg.eval_every)
        on_improvement = sum(1 for e in evals if e % cfg.checkpoint_every)
    best = 1 if cfg.eval_tokens > 0 else 0
    n_ckpt = min(intermediate + on_improvement, cfg.keep_checkpoints + best) + 1
    p.estimates["checkpoints"] = {
        "written": intermediate + 1,
        "written_when_validation_improves": on_improvement,
        "kept": n_ckpt,
        "size_each": format_bytes(ckpt_bytes),
    }
    p.estimates["disk_bytes"] = n_ckpt * ckpt_bytes
    flops = flops_per_token(mc, seq) * total_tokens
    p.estimates["train_flops"] = float(flops)
    if device == "cpu":
        threads = cfg.threads or os.cpu_count() or 1
        peak = cpu_peak_flops(threads, cfg.precision)
        p.estimates["device_peak_gflops"] = round(peak / 1e9, 1)
        # Activation checkpointing runs each block's forward twice: 8 FLOPs per weight per token
        # where training otherwise does 6.
        work = flops * (RECOMPUTE_FACTOR if cfg.activation_checkpointing else 1.0)
        wall = work / (peak * ASSUMED_MFU)
        p.estimates["wall_time_s"] = round(wall, 1)
        p.estimates["wall_time"] = format_duration(wall)
        p.warn_if(
            "wall time",
            wall > 7 * 86400,
            f"about {format_duration(wall)} on this CPU: run it on a GPU (device: cuda)",
            f"about {format_duration(wall)} at {ASSUMED_MFU:.0%} of the measured peak",
        )
    p.actions.append(
        f"train {format_count(n)} parameters for {cfg.max_steps} steps "
        f"({format_count(total_tokens)} tokens) on {device} in {cfg.precision}"
    )
    p.actions.append(f"write the checkpoint (HF layout) to {cfg.output}")
    return p


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    import torch

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, ctx)
    finally:
        torch.set_num_threads(threads)  # the caller's process keeps its own setting


def _train(cfg: Config, ctx: ApplyContext) -> Outcome:
    import torch

    from albor.data.bpe import TOKENIZER_FILES, load_tokenizer, token_byte_lengths
    from albor.data.shards import TokenIndex, open_split
    from albor.data.windows import WindowSampler, eval_windows
    from albor.evals.perplexity import score_model
    from albor.model.gpt import GPT
    from albor.track.plot import write_loss_plot
    from albor.track.runs import RunTracker, db_path_for
    from albor.train import checkpoint, distributed
    from albor.train.loop import LoopSettings, gather_for_save, train
    from albor.train.optim import build_adamw

    assert cfg.data is not None
    mode = resolve_distributed(cfg)
    if distributed.launched():
        device = distributed.init(resolve_device(cfg))
    else:
        device = torch.device(resolve_device(cfg))
    rank0 = distributed.is_rank0()
    mc = model_config(cfg)
    seq = cfg.seq_len or mc.max_seq_len
    index = TokenIndex.load(cfg.data)
    tokenizer = load_tokenizer(cfg.data)
    token_bytes = token_byte_lengths(tokenizer)
    sampler = WindowSampler(open_split(cfg.data, "train"), seq, cfg.seed)
    val_shards = open_split(cfg.data, "val") if "val" in index.splits else []

    torch.manual_seed(cfg.seed)  # the same on every rank: replicas start equal
    if mode == "fsdp" and distributed.active():
        # Built on the CPU, sharded block by block; fully_shard moves each shard to the device.
        model = GPT(mc)
        model.init_weights()
        distributed.shard(model, list(model.model.layers))
    else:
        model = GPT(mc).to(device)
        model.init_weights()
    optimizer = build_adamw(
        model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps, device
    )

    def evaluate() -> dict[str, Any]:
        # In fp32 whatever the training precision: the figure compared across runs.
        windows = eval_windows(val_shards, seq, cfg.eval_tokens, cfg.micro_batch)
        s = score_model(model, windows, token_bytes, str(device))
        return {
            "val_loss": round(s.loss, 5),
            "val_bpb": round(s.bits_per_byte, 5),
            "val_ppl": round(s.perplexity, 3),
            "val_tokens": s.tokens,
        }

    has_val = cfg.eval_tokens > 0 and any(len(s) > seq for s in val_shards)
    tok_files = [cfg.data / f for f in TOKENIZER_FILES]
    settings = LoopSettings(
        max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_steps,
        lr=cfg.lr,
        min_lr_ratio=cfg.min_lr_ratio,
        micro_batch=cfg.micro_batch,
        grad_accum=cfg.grad_accum,
        grad_clip=cfg.grad_clip,
        eval_every=cfg.eval_every,
        checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=cfg.keep_checkpoints,
        log_every=cfg.log_every,
        max_bad_steps=cfg.max_bad_steps,
        precision=cfg.precision,
        compile=cfg.compile,
        activation_checkpointing=cfg.activation_checkpointing,
        prefetch=cfg.prefetch,
        distributed=mode,
    )
    run_training = partial(
        train,
        model,
        optimizer,
        sampler,
        settings,
        device=device,
        run_dir=ctx.out,
        eos_token_id=index.eos_id,
        extra_files=tok_files,
        evaluate=evaluate if has_val else None,
    )
    if not rank0:
        # Trains in step with rank 0 and writes nothing: no tracker, no final weights.
        run_training()
        gather_for_save(model, optimizer, fsdp=mode == "fsdp")
        return Outcome(summary=f"rank {distributed.rank()} done", metrics={})
    tracker = RunTracker.open(
        db_path_for(ctx.out),
        ctx.name,
        NAME,
        ctx.out,
        cfg.model_dump(mode="json", exclude={"output"}),
        info={
            "parameters": model.num_params(),
            "flops_per_token": flops_per_token(mc, seq),
            "device": str(device),
        },
    )
    with tracker:  # an exception marks the run failed; a clean stop marks it stopped
        result = run_training(tracker=tracker)
        final_eval = result.evals[-1] if result.evals else {}
        full = gather_for_save(model, optimizer, fsdp=mode == "fsdp")
        assert full is not None  # rank 0
        checkpoint.write(
            ctx.out,
            full[0],
            full[1],
            result.state,
            eos_token_id=index.eos_id,
            extra_files=tok_files,
        )
        first_loss = _first_loss(ctx.out / "metrics.jsonl")
        metrics = {
            "parameters": model.num_params(),
            "steps": result.steps,
            "tokens": result.tokens,
            "final_loss": round(result.final_loss, 5),
            "first_loss": first_loss,
            "tokens_per_s": round(result.tokens_per_s, 1),
            "precision": cfg.precision,
            "skipped_steps": result.skipped_steps,
            "resumed_from": result.resumed_from,
            "resume_warnings": result.resume_warnings,
            "best": result.best,
            "data_repeats": round(result.tokens / sampler.tokens, 3),
            "warnings": result.warnings,
            **final_eval,
        }
        first = "?" if first_loss is None else f"{first_loss:.3f}"
        summary = (
            f"{format_count(model.num_params())} params, {result.steps} steps, loss "
            f"{first} -> {result.final_loss:.3f}"
        )
        if final_eval:
            summary += f", val bits/byte {final_eval['val_bpb']:.3f}"
        summary += f", {result.tokens_per_s:,.0f} tok/s"
        if result.warnings:
            summary += "; WARNING: " + "; ".join(result.warnings.values())
        if result.resume_warnings:
            summary += (
                f"; {len(result.resume_warnings)} resume warning(s), see metrics.resume_warnings"
            )
        write_loss_plot(ctx.out)  # the artifact's plot covers the whole run
        tracker.finish("done", metrics)
    return Outcome(summary=summary, metrics=metrics)


def _first_loss(path: Path) -> float | None:
    import json

    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            return round(float(rec["loss"]), 5)
    return None
