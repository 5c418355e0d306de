"""finetune: LoRA adapters (peft) on a base model, trained on docstring -> body pairs.

The base is a checkpoint directory (a pretrain output, or a transformers Llama / Qwen2 model
directory with its tokenizer.json); the model is built from its config.json, loaded with its
weights, and given LoRA adapters on `targets` (`train/lora.py`); only the adapters train, with
AdamW. Each pair of the pairs artifact is prompt + completion + eos in the base's tokenizer,
with the prompt's targets masked, so the loss is the completion's (`data/pair_windows.py`);
validation reports that loss on the val split (`val_loss`) and its bits per completion byte
(`val_bpb`). Training is pretraining's loop (`train/run.py`): checkpoints hold the adapters,
optimizer, RNG and data position, and a restarted run resumes exactly.

The artifact: `adapter/` in peft's format with the base's tokenizer files (loads with
`PeftModel.from_pretrained` on `AutoModelForCausalLM.from_pretrained(BASE)`, BASE the base
directory or its `albor export` HF directory), and the merged model at the root (config.json,
model.safetensors in the base's dtype, the tokenizer files), as pretrain writes a checkpoint.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from albor.config import Int
from albor.errors import ArtifactError, ConfigError
from albor.model.config import ModelConfig
from albor.model.estimate import format_count, param_count
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, check_input
from albor.train import preflight
from albor.train.lora import LINEAR_TARGETS, LoraSpec
from albor.train.settings import TrainSettings

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np
    import torch

    from albor.data.pair_windows import EncodedPairs, PairSampler
    from albor.model.gpt import GPT
    from albor.train.checkpoint import Checkpointer
    from albor.train.preflight import Setup

log = logging.getLogger(__name__)

NAME = "finetune"
INPUTS = ("base", "data")


class Config(TrainSettings, OutputConfig):
    base: Path | None = Field(
        None,
        description="The base model: a checkpoint directory (a pretrain output, or a "
        "transformers Llama / Qwen2 model directory) with its tokenizer.json.",
    )
    data: Path | None = Field(
        None, description="Pairs artifact directory (train / val / test from the pairs stage)."
    )
    targets: list[str] = Field(
        default_factory=lambda: list(LINEAR_TARGETS),
        min_length=1,
        description="Block projections that get LoRA adapters (default: every one).",
    )
    rank: Int = Field(8, gt=0, description="LoRA rank r.")
    alpha: Int = Field(16, gt=0, description="LoRA alpha: the update is scaled alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    rslora: bool = Field(
        False, description="Rank-stabilised LoRA: scale the update alpha / sqrt(r)."
    )
    seq_len: Int | None = Field(
        None,
        gt=0,
        description="Window in tokens (default: the base's context): a pair longer than this "
        "loses the end of its completion (counted as truncated).",
    )

    def spec(self) -> LoraSpec:
        return LoraSpec(tuple(self.targets), self.rank, self.alpha, self.dropout, self.rslora)


@dataclass(frozen=True)
class Base:
    """The base model as the plan sees it, read from its files without loading the weights."""

    directory: Path
    config: ModelConfig
    eos_id: int
    dtype: str  # what its weights are stored in: the merged model is written back in it


def read_base(directory: Path) -> Base:
    """The base's config, eos id and dtype; ArtifactError naming what is missing."""
    from albor.model.hf import CONFIG_FILE
    from albor.model.load import DTYPES, load_model_tokenizer, require_checkpoint
    from albor.model.special_tokens import model_special_tokens

    config = require_checkpoint(directory, "base")
    raw = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    eos = raw.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if not isinstance(eos, int):
        eos = model_special_tokens(load_model_tokenizer(directory), directory).ids.get("eos")
    if not isinstance(eos, int):
        raise ArtifactError(
            f"base {directory}: neither config.json (eos_token_id) nor the tokenizer names an "
            "end-of-text token; set eos_token_id in its config.json"
        )
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return Base(directory, config, eos, dtype if dtype in DTYPES else "float32")


def read_pairs(directory: Path) -> dict[str, int]:
    """Pairs per split of a pairs artifact (from the Parquet footers)."""
    from albor.data.pairs import split_sizes

    return split_sizes(directory, "data")


def _run_problems(cfg: Config) -> list[str]:
    found = []
    if cfg.optimizer != "adamw":
        found.append(
            f"optimizer: {cfg.optimizer}: LoRA adapters train with AdamW here; set optimizer: adamw"
        )
    if cfg.parallelism() == "fsdp":
        found.append(
            "distributed: fsdp shards whole models; a LoRA run trains only small adapters: use "
            "distributed: ddp"
        )
    return found


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    p = Plan(NAME)
    _plan(p, cfg, ctx or PlanContext())
    # Last, replacing the shared checks' verdict on the same key: they judge a Muon or FSDP run
    # as a pretraining one.
    for problem in _run_problems(cfg):
        name = "optimizer" if problem.startswith("optimizer") else "distributed"
        p.checks = [c for c in p.checks if c.name != name]
        p.add(name, "fail", problem)
    return p


def _plan(p: Plan, cfg: Config, ctx: PlanContext) -> None:
    from albor.train import lora

    base = check_input(p, ctx, "base", cfg.base, read_base, "a checkpoint directory")
    if base is not None:
        p.add(
            "base",
            "ok",
            f"{base.directory}: {format_count(param_count(base.config))} parameters, "
            f"{base.dtype}, eos id {base.eos_id}",
        )
    pairs = check_input(p, ctx, "data", cfg.data, read_pairs, "a pairs artifact directory")
    if pairs is not None:
        shown = ", ".join(f"{s} {n}" for s, n in pairs.items())
        p.require(
            "data",
            pairs.get("train", 0) > 0,
            f"{cfg.data}: pairs {shown}",
            f"{cfg.data}: the train split holds no pairs (run the pairs stage on more source)",
        )
        p.warn_if(
            "validation",
            cfg.eval_tokens > 0 and not pairs.get("val"),
            "the val split holds no pairs: validation is skipped",
            f"{pairs.get('val', 0)} val pairs, up to {cfg.eval_tokens:,} completion tokens",
        )
    if base is None:
        return
    spec = cfg.spec()
    problems = lora.spec_problems(base.config, spec)
    trainable = 0 if problems else lora.trainable_count(base.config, spec)
    total = param_count(base.config)
    p.require(
        "targets",
        not problems,
        f"LoRA r={spec.rank}, alpha={spec.alpha:g} on {', '.join(spec.targets)}: "
        f"{format_count(trainable)} trainable parameters ({trainable / total:.2%} of the base)",
        "; ".join(problems),
    )
    if problems:
        return
    setup = preflight.check_run(p, cfg, base.config, seq_len=cfg.seq_len, name="base")
    if setup is None:
        return
    # Only the adapters have gradients and AdamW states; the base holds its weights alone.
    preflight.check_device(p, cfg, setup, adapters=trainable)
    p.estimates["trainable_parameters"] = trainable
    p.estimates["lora"] = lora.describe(base.config, spec)
    if pairs is not None and pairs.get("train"):
        rows = cfg.micro_batch * cfg.grad_accum * setup.world * cfg.max_steps
        p.estimates["data_repeats"] = round(rows / pairs["train"], 3)
    p.actions.append(
        f"finetune {format_count(trainable)} LoRA parameters on {base.directory} for "
        f"{cfg.max_steps} steps ({setup.tokens_per_step:,} window tokens per step) on "
        f"{setup.device} in {setup.precision}"
    )
    p.actions.append(
        f"write adapter/ (peft) and the merged model in {base.dtype} (HF layout) to {cfg.output}"
    )


@dataclass
class PairData:
    """A pairs artifact as a run reads it (`train.run.RunData`): training rows, the val pairs,
    the bytes of each token, and the adapter checkpointer."""

    sampler: PairSampler
    val: EncodedPairs
    token_bytes: np.ndarray
    writer: Checkpointer

    @classmethod
    def open(cls, directory: Path, base: Base, spec: LoraSpec, seq_len: int, seed: int) -> PairData:
        import numpy as np

        from albor.data.bpe import TOKENIZER_FILES, plain_text, token_byte_lengths
        from albor.data.pair_windows import PairSampler, encode_pairs, read_split
        from albor.model.load import load_model_tokenizer
        from albor.train.lora import AdapterCheckpointer

        tokenizer = load_model_tokenizer(base.directory)
        text = plain_text(tokenizer)
        train = encode_pairs(text, *read_split(directory, "train"), base.eos_id, seq_len)
        val_path = directory / "val.parquet"
        val = (
            encode_pairs(text, *read_split(directory, "val"), base.eos_id, seq_len)
            if val_path.is_file()
            else encode_pairs(text, [], [], base.eos_id, seq_len)
        )
        files = tuple(base.directory / f for f in TOKENIZER_FILES if (base.directory / f).is_file())
        writer = AdapterCheckpointer(spec, base.directory, base.eos_id, base.dtype, files)
        try:
            token_bytes = token_byte_lengths(tokenizer)
        except ArtifactError as e:
            # A tokenizer that is not byte-level (sentencepiece) has no bytes per token: the
            # loss is still measured, bits per byte is left out.
            log.warning("%s: val_bpb is not reported (%s)", base.directory, e)
            token_bytes = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
        return cls(PairSampler(train, seed), val, token_bytes, writer)

    def checkpointer(self) -> Checkpointer:
        return self.writer

    def validation(
        self, model: GPT, settings: TrainSettings, seq_len: int, device: torch.device
    ) -> Callable[[], dict[str, Any]] | None:
        from albor.data.pair_windows import eval_batches
        from albor.evals.perplexity import score_masked

        if settings.eval_tokens == 0 or not len(self.val):
            return None

        def evaluate() -> dict[str, Any]:
            batches = eval_batches(self.val, settings.micro_batch, settings.eval_tokens)
            s = score_masked(model, batches, self.token_bytes, device)
            found: dict[str, Any] = {"val_loss": round(s.loss, 5), "val_tokens": s.tokens}
            if math.isfinite(s.bits_per_byte):
                found["val_bpb"] = round(s.bits_per_byte, 5)
            return found

        return evaluate


def build_adapted(base: Path, spec: LoraSpec, setup: Setup, seed: int, device: torch.device) -> GPT:
    """The base's weights in fp32 with fresh adapters drawn under `seed` (B = 0: the adapted
    model starts as the base)."""
    import torch

    from albor.model.hf import load_pretrained
    from albor.train.lora import inject

    model, cfg = load_pretrained(base, device=device, dtype=torch.float32)
    if cfg != setup.model:
        raise ArtifactError(f"base {base}: config.json changed since the run was planned")
    torch.manual_seed(seed)
    return inject(model, spec).train()


def _against_base(
    cfg: Config, base: Base, data: PairData, setup: Setup, metrics: dict[str, Any]
) -> dict[str, Any]:
    """The base's validation figures, scored exactly as the finetuned model's (same pairs, same
    scorer, fp32), and the change: what the instruct step bought. Empty without validation."""
    import torch

    from albor.model.hf import load_pretrained

    model, _ = load_pretrained(base.directory, device=setup.device, dtype=torch.float32)
    evaluate = data.validation(model, cfg, setup.seq_len, torch.device(setup.device))
    if evaluate is None or "val_loss" not in metrics:
        return {}
    found = evaluate()
    del model
    out: dict[str, Any] = {f"base_{k}": v for k, v in found.items() if k != "val_tokens"}
    for key in ("val_loss", "val_bpb"):
        if key in found and metrics.get(key) is not None:
            out[f"{key}_change"] = round(metrics[key] - found[key], 5)
    return out


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    from albor.data.pair_windows import IGNORE
    from albor.train import lora
    from albor.train.objectives import NextToken
    from albor.train.run import run

    assert cfg.base is not None and cfg.data is not None
    base = read_base(cfg.base)
    spec = cfg.spec()
    problems = lora.spec_problems(base.config, spec) + _run_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    setup = preflight.setup(cfg, base.config, seq_len=cfg.seq_len)
    data = PairData.open(cfg.data, base, spec, setup.seq_len, cfg.seed)
    build = functools.partial(build_adapted, base.directory, spec)
    config = cfg.model_dump(mode="json", exclude={"output"})
    outcome = run(
        cfg,
        setup,
        data,
        ctx,
        stage=NAME,
        config=config,
        objective=NextToken(ignore_index=IGNORE),
        build=build,
    )
    train = data.sampler.pairs
    outcome.metrics.update(_against_base(cfg, base, data, setup, outcome.metrics))
    outcome.metrics.update(
        lora=lora.describe(base.config, spec),
        trainable_parameters=lora.trainable_count(base.config, spec),
        pairs={
            "train": len(train),
            "val": len(data.val),
            "truncated": train.truncated + data.val.truncated,
            "dropped": train.dropped + data.val.dropped,
        },
    )
    outcome.summary = f"LoRA {format_count(lora.trainable_count(base.config, spec))}: " + (
        outcome.summary
    )
    return outcome
