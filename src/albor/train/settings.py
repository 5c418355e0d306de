"""The typed settings of a training run, written once and composed by every training stage.

`TrainSettings` is how a run trains (batch, schedule, optimizer, validation, checkpoints, device
and speed options); `ModelSettings` is what it trains (a named preset, overrides of its
architecture, the training window). A training stage's config inherits both, so a YAML key means
the same in pretrain, distill and finetune, and the loop takes the settings object itself rather
than a hand-made copy of its fields:

    class Config(TrainSettings, ModelSettings, OutputConfig):
        data: Path | None = ...
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator

from albor.config import Int, StageConfig
from albor.model.config import ModelConfig
from albor.model.presets import PRESETS, preset

Precision = Literal["fp32", "bf16"]  # what a run computes in, "auto" resolved
PrecisionSetting = Literal["auto", "fp32", "bf16"]
Optimizer = Literal["adamw", "muon"]
Schedule = Literal["cosine", "wsd"]
Parallelism = Literal["none", "ddp", "fsdp"]

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION_PART = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([hms])")


def parse_duration(value: Any) -> Any:
    """Seconds from a duration: a number of seconds (600, "600") or numbers with units, h, m
    and s ("90s", "10m", "1.5h", "1h30m"). ValueError naming the accepted forms otherwise."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(_DURATION_PART.sub("", text).split()):
                raise ValueError(
                    f"{value!r} is not a duration: give seconds (600) or a number with a unit, "
                    "such as 90s, 10m, 2h or 1h30m"
                ) from None
            seconds = sum(float(n) * _UNITS[unit] for n, unit in parts)
    else:
        return value  # pydantic reports the type with the key path
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{value!r} is not a positive duration: use e.g. 10m or 600")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds, written as a number or with units (`90s`, `10m`, `2h`, `1h30m`)."""


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


class ModelSettings(StageConfig):
    """The model a run trains: a preset, overrides of its architecture, the training window."""

    model: str = Field("demo", description=f"Model preset: {', '.join(PRESETS)}.")
    architecture: Architecture = Field(
        default_factory=Architecture, description="Overrides of the preset's architecture."
    )
    seq_len: Int | None = Field(None, gt=0, description="Training window; default: the context.")


def model_config(settings: ModelSettings) -> ModelConfig:
    """The preset with the overrides applied (ConfigError for an unknown preset or bad value)."""
    overrides = {k: v for k, v in settings.architecture.model_dump().items() if v is not None}
    return preset(settings.model, **overrides)


def window(settings: ModelSettings, mc: ModelConfig) -> int:
    """Tokens per training window: as set, else the model's whole context."""
    return settings.seq_len or mc.max_seq_len


class TargetDevice(StageConfig):
    """A device the table of named targets lacks: what its datasheet says."""

    peak_tflops: float = Field(
        gt=0, description="Dense peak TFLOP/s of one device in the run's precision (datasheet)."
    )
    memory_gib: float = Field(gt=0, description="Memory of one device, GiB.")
    mfu: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Fraction of the peak a training step reaches on it; default: a stated "
        "assumption (train/hardware.py ASSUMED_GPU_MFU).",
    )


class TrainSettings(StageConfig):
    """How a run trains: batch, schedule, optimizer, validation, checkpoints, device, speed."""

    micro_batch: Int = Field(8, gt=0, description="Sequences per forward/backward pass.")
    grad_accum: Int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_steps: Int = Field(1000, gt=0, description="Optimizer steps (authoritative; data repeats).")
    max_time: Duration | None = Field(
        None,
        description="Time budget of the training loop, wall clock (steps, periodic validation "
        "and checkpoints; a resumed run counts the time already spent): 90s, 10m, 2h, 1h30m, or "
        "seconds. The run validates, saves its final weights and ends when it is spent or at "
        "max_steps, whichever comes first, and the learning rate decays to its floor at that "
        "point (warmup stays in steps). Time is not deterministic: a run with max_time does not "
        "resume bit for bit. Default: no budget, the run is sized in steps.",
    )
    warmup_steps: Int = Field(100, ge=0, description="Linear warmup steps; must be < max_steps.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="The decay's floor as a fraction of lr."
    )
    lr_schedule: Schedule = Field(
        "cosine",
        description="After the warmup: cosine (decay from lr to the floor over the rest of the "
        "run) or wsd (warmup-stable-decay: hold lr, then decay linearly to the floor over the "
        "last warmdown_ratio of the run). Both count the run in steps, or in time under "
        "max_time.",
    )
    warmdown_ratio: float = Field(
        0.3,
        gt=0,
        le=1,
        description="lr_schedule: wsd: the fraction of the run after warmup spent decaying.",
    )
    optimizer: Optimizer = Field(
        "adamw",
        description="adamw: AdamW for every parameter. muon: torch.optim.Muon (PyTorch >= 2.9) "
        "for the 2-D matrices of the transformer blocks, AdamW for the embeddings, the output "
        "head, norms and biases; both follow the same schedule, Muon's scaled to muon_lr.",
    )
    muon_lr: float = Field(
        0.02,
        gt=0,
        description="Muon's peak learning rate (optimizer: muon); its warmup and decay follow "
        "lr's schedule. 0.02 is the value of Muon's reference implementation (Keller Jordan).",
    )
    muon_weight_decay: float = Field(
        0.01,
        ge=0,
        description="Muon's decoupled weight decay on the block matrices (optimizer: muon), "
        "applied as lr x decay per step; 0.01 as in Muon's reference implementation.",
    )
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay (matrices).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(
        1.0,
        gt=0,
        description="Max gradient norm; clipping is always on, so that safety never hangs on an "
        "optional setting.",
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
    precision: PrecisionSetting = Field(
        "fp32",
        description="fp32; bf16: autocast to bfloat16 (CUDA or CPU) with fp32 master weights, "
        "gradients and optimizer state; auto: bf16 where the device runs it faster (a CUDA GPU "
        "with bf16, a CPU whose bf16 matmul at the model's width is measured faster than fp32), "
        "else fp32. The plan shows the choice; the manifest records it and why.",
    )
    compile: bool = Field(
        False, description="torch.compile the model (slow to compile on CPU; needs a C++ compiler)."
    )
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each block in backward instead of keeping its activations "
        "(less memory, about a third more compute).",
    )
    prefetch: bool | Literal["auto"] = Field(
        "auto",
        description="Build the next step's batches in a background thread while the device "
        "computes. auto: on for a GPU; off on a CPU, where that thread takes cycles from the "
        "compute threads (benchmarks/time_to_quality.py, 2 cores, AdamW on both sides: 0.99x the "
        "plain loop's steady tokens/s with it, 1.045x without).",
    )
    deterministic: bool = Field(
        False,
        description="Bit-for-bit reproducible on a GPU: torch.use_deterministic_algorithms and a "
        "fixed cuBLAS workspace, at some cost in speed. Without it a compiled run on CUDA adds "
        "gradients atomically (the embedding's backward) and a repeated or resumed run differs "
        "in the last bits (measured on an H200: 1e-5 after 30 steps); the manifest's "
        "bit_exact_resume says which holds. CPU runs are reproducible either way.",
    )
    threads: int | None = Field(
        None, gt=0, description="CPU threads (per rank under torchrun; default: all cores)."
    )
    distributed: Parallelism | None = Field(
        None,
        description="Under torchrun: ddp (a full replica per rank, gradients all-reduced) or "
        "fsdp (FSDP2: parameters, gradients and optimizer state sharded over ranks, for models "
        "that do not fit one device). Default: ddp when launched with WORLD_SIZE > 1 (or "
        "planned for nproc x nodes > 1), else none. micro_batch is per rank: tokens per step "
        "= micro_batch x grad_accum x seq_len x world size.",
    )

    target: str | TargetDevice | None = Field(
        None,
        description="Plan for this GPU instead of the machine at hand: a name (h100, h100-pcie, "
        "h200, a100-80gb, a100-40gb, l40s, l4, rtx4090, rtx3090) or {peak_tflops, memory_gib, "
        "mfu}. The plan judges memory against it and estimates wall time from its datasheet "
        "peak; training still runs on `device`.",
    )
    nproc: Int | None = Field(
        None,
        gt=0,
        description="Processes per node the run will be launched with (torchrun "
        "--nproc-per-node): the plan sizes the global batch and the wall time for nproc x nodes "
        "of them, and apply refuses another world size. Default: as launched.",
    )
    nodes: Int = Field(1, gt=0, description="Nodes the run will be launched on (with nproc).")

    @field_validator("target")
    @classmethod
    def _known_target(cls, value: str | TargetDevice | None) -> str | TargetDevice | None:
        from albor.train.hardware import ACCELERATORS

        if isinstance(value, str) and value not in ACCELERATORS:
            raise ValueError(
                f"unknown target {value!r}: use one of {', '.join(ACCELERATORS)}, or give "
                "{peak_tflops, memory_gib} for another device"
            )
        return value

    def planned_world(self) -> int | None:
        """Processes the run is planned for (nproc x nodes), or None: as launched."""
        if self.nproc is None and self.nodes == 1:
            return None
        return (self.nproc or 1) * self.nodes

    @property
    def betas(self) -> tuple[float, float]:
        return (self.beta1, self.beta2)

    def parallelism(self) -> Parallelism:
        """The parallelism the run uses: as set, else ddp under a multi-process torchrun."""
        from albor.train import distributed

        if self.distributed is not None:
            return self.distributed
        return "ddp" if distributed.launched() or (self.planned_world() or 1) > 1 else "none"

    def tokens_per_step(self, seq_len: int, world: int = 1) -> int:
        """Tokens of one optimizer step over all `world` ranks (micro_batch is per rank)."""
        return self.micro_batch * self.grad_accum * seq_len * world

    def schedule(self) -> dict[str, Any]:
        """The LR schedule's settings; with the step (and the time spent, under max_time), they
        fix the learning rate. Keys of options left at their default are absent, so a run that
        does not use them records what it always did."""
        found: dict[str, Any] = {
            "lr": self.lr,
            "warmup_steps": self.warmup_steps,
            "max_steps": self.max_steps,
            "min_lr_ratio": self.min_lr_ratio,
        }
        if self.max_time is not None:
            found["max_time"] = self.max_time
        if self.lr_schedule != "cosine":
            found["lr_schedule"] = self.lr_schedule
            found["warmdown_ratio"] = self.warmdown_ratio
        if self.optimizer == "muon":
            found["muon_lr"] = self.muon_lr
            found["muon_weight_decay"] = self.muon_weight_decay
        return found
