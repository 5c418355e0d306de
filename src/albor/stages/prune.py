"""prune: zero the least important weights of a checkpoint (magnitude, Wanda, N:M) or remove
whole blocks (depth), and measure what it cost.

Inputs: `model`, a checkpoint directory (a pretrain, distill, finetune or merge output, or a
transformers Llama / Qwen2 directory with its tokenizer.json), and `data`, a tokenize artifact in
the model's tokenizer. The first `eval_tokens` of `data`'s val split give the validation bits
per byte before and after; the windows after them give the calibration activations that Wanda
and the choice of blocks to remove read (`calibration_tokens`; where the split is too short the
calibration reuses scored windows and the manifest says how many). `data` is optional for
magnitude pruning and for depth with named `blocks` (no bits/byte is then reported).

The mathematics, with its counting rule (exactly round(sparsity · numel) zeros per tensor), is
`albor.model.transforms.prune`. N:M structure fixes the sparsity at 1 - N/M: `sparsity` may be
left out, or must equal it.

The artifact is a checkpoint dir as pretrain writes one: config.json (num_hidden_layers lowered
after depth pruning, the remaining blocks renumbered from 0), model.safetensors in the input's
dtype, and the input's tokenizer files and generation_config.json. The zeros are stored as zeros:
the directory loads with the same zeros in albor and in transformers. The manifest's metrics
hold each pruned tensor's zeros / numel (counted in the written tensors), the overall sparsity,
and val bits/byte before and after.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from albor.config import Int
from albor.errors import ConfigError
from albor.model.estimate import format_bytes, format_count, param_count
from albor.model.transforms.prune import DEFAULT_TARGETS, Structure
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, check_input

if TYPE_CHECKING:
    import numpy as np
    import torch

    from albor.data.shards import TokenIndex
    from albor.model.config import ModelConfig
    from albor.model.gpt import GPT

log = logging.getLogger(__name__)

NAME = "prune"
INPUTS = ("model", "data")

# Beside the weights and config.json, what the pruned directory takes from the input.
_COPIED = ("generation_config.json",)
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class Config(OutputConfig):
    model: Path | None = Field(
        None,
        description="The checkpoint directory to prune (config.json, model.safetensors, "
        "tokenizer.json).",
    )
    data: Path | None = Field(
        None,
        description="Tokenize artifact in the model's tokenizer: its val split gives the "
        "calibration windows (wanda, depth by num_blocks) and the bits/byte before and after.",
    )
    method: Literal["magnitude", "wanda", "depth"] = Field(
        "magnitude",
        description="magnitude (smallest |W|), wanda (|W| times the input's activation norm, "
        "within each output row) or depth (remove consecutive blocks).",
    )
    sparsity: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="magnitude, wanda: fraction of each pruned tensor set to zero, in [0, 1) "
        "(with structure: 1 - N/M, the default then).",
    )
    scope: Literal["per_matrix", "global"] = Field(
        "per_matrix",
        description="magnitude: rank weights within each matrix, or over all pruned matrices "
        "together (per-tensor sparsity then varies).",
    )
    structure: str | None = Field(
        None,
        description="N:M structure, e.g. 2:4: in every M consecutive inputs of a row the N "
        "highest-scoring weights stay.",
    )
    targets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        min_length=1,
        description="Regular expressions (searched) choosing among the blocks' projection "
        "matrices which to prune; default: every q/k/v/o and gate/up/down projection.",
    )
    blocks: list[int] | None = Field(
        None,
        min_length=1,
        description="depth: the consecutive blocks to remove, e.g. [8, 9, 10, 11].",
    )
    num_blocks: Int | None = Field(
        None,
        gt=0,
        description="depth: remove this many consecutive blocks, those whose input and output "
        "hidden states are closest in angle on the calibration windows.",
    )
    calibration_tokens: Int = Field(
        32768, gt=0, description="Tokens of the val split that calibrate wanda and depth."
    )
    eval_tokens: Int = Field(
        65536,
        ge=0,
        description="Tokens of the val split scored before and after pruning (0: skip).",
    )
    seq_len: Int | None = Field(
        None, gt=0, description="Window length of calibration and scoring; default the context."
    )
    batch_size: Int = Field(8, gt=0, description="Windows per forward pass.")
    device: str = Field("auto", description="auto, cpu or cuda.")

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def problems(self) -> list[str]:
        found: list[str] = []
        structure = None
        if self.structure is not None:
            try:
                structure = Structure.parse(self.structure)
            except ConfigError as e:
                found.append(str(e))
        if self.method == "depth":
            for name in ("sparsity", "structure"):
                if getattr(self, name) is not None:
                    found.append(f"{name}: depth removes whole blocks; remove `{name}`")
            if (self.blocks is None) == (self.num_blocks is None):
                found.append(
                    "depth: give either `blocks` (which to remove) or `num_blocks` (how many, "
                    "chosen on the calibration windows), not both or neither"
                )
            if self.blocks is not None:
                b = self.blocks
                if b != list(range(b[0], b[0] + len(b))) or b[0] < 0:
                    found.append(
                        f"blocks: {b} are not consecutive ascending block numbers (e.g. [8, 9])"
                    )
            return found
        for name in ("blocks", "num_blocks"):
            if getattr(self, name) is not None:
                found.append(f"{name}: only depth removes blocks; remove `{name}`")
        if structure is not None:
            if self.sparsity is not None and Fraction(repr(self.sparsity)) != structure.sparsity:
                found.append(
                    f"sparsity: {self.sparsity} with structure {structure}: N:M fixes it at "
                    f"{float(structure.sparsity)}; set that or leave sparsity out"
                )
            if self.scope == "global":
                found.append("scope: global ranks all weights together; N:M needs per_matrix")
        elif self.sparsity is None:
            found.append(f"sparsity: {self.method} needs it: set a fraction in [0, 1), e.g. 0.5")
        if self.method == "wanda" and self.scope == "global":
            found.append("scope: wanda compares weights within each output row; use per_matrix")
        return found

    def spec(self) -> tuple[Fraction, Structure | None]:
        """The sparsity as the exact fraction pruned, and the N:M structure."""
        structure = Structure.parse(self.structure) if self.structure else None
        if self.sparsity is not None:
            return Fraction(repr(self.sparsity)), structure
        return (structure.sparsity if structure else Fraction(0)), structure

    def needs_calibration(self) -> bool:
        return self.method == "wanda" or (self.method == "depth" and self.num_blocks is not None)


@dataclass(frozen=True)
class Source:
    """The input model as its files describe it."""

    directory: Path
    config: ModelConfig
    raw: dict[str, Any]  # config.json as written: token ids beside the architecture
    dtype: str  # what the weights are stored in; the output keeps it


def read_source(directory: Path) -> Source:
    from albor.model.hf import CONFIG_FILE
    from albor.model.load import DTYPES, require_checkpoint

    config = require_checkpoint(directory, "model")
    raw = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return Source(directory, config, raw, dtype if dtype in DTYPES else "float32")


def target_shapes(cfg: Config, config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors pruning touches and their shapes (from a model on the meta device)."""
    import torch

    from albor.model.gpt import GPT
    from albor.model.transforms.prune import target_names

    with torch.device("meta"):
        state = GPT(config).state_dict()
    return {n: tuple(state[n].shape) for n in target_names(state, cfg.targets)}


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    ctx = ctx or PlanContext()
    p = Plan(NAME)
    src = check_input(p, ctx, "model", cfg.model, read_source, "a checkpoint directory")
    if src is not None:
        p.add(
            "model",
            "ok",
            f"{src.directory}: {format_count(param_count(src.config))} parameters, "
            f"{src.config.num_layers} blocks, {src.dtype}",
        )
    index = _plan_data(p, cfg, ctx, src.config if src else None)
    if src is None:
        return p
    mc = src.config
    seq = cfg.seq_len or mc.max_seq_len
    p.require(
        "seq_len",
        seq <= mc.max_seq_len,
        f"windows of {seq} tokens",
        f"seq_len {seq} exceeds the model's context {mc.max_seq_len}: lower it",
    )
    if cfg.method == "depth":
        _plan_depth(p, cfg, mc)
    else:
        _plan_sparse(p, cfg, mc)
    memory = memory_estimate(cfg, mc, seq)
    p.estimates["memory_bytes"] = memory
    p.estimates["memory"] = format_bytes(memory)
    p.actions.append(
        f"load {src.directory} in float32 on {cfg.device}; write the pruned model in {src.dtype} "
        f"(HF layout) to {cfg.output}"
    )
    if index is not None and cfg.eval_tokens:
        p.actions.append(f"score up to {cfg.eval_tokens:,} val tokens before and after")
    return p


def _plan_data(p: Plan, cfg: Config, ctx: PlanContext, mc: ModelConfig | None) -> TokenIndex | None:
    from albor.data.shards import TokenIndex

    if cfg.data is None and not cfg.needs_calibration():
        p.add("data", "ok", "no data: the bits/byte before and after are not measured")
        return None
    if cfg.data is None:
        p.add(
            "data",
            "fail",
            f"no data: {cfg.method} reads calibration windows from a val split: set `data:` to "
            "a tokenize artifact in the model's tokenizer",
        )
        return None
    index = check_input(p, ctx, "data", cfg.data, TokenIndex.load, "a tokenize output directory")
    if index is None:
        return None
    val = index.splits.get("val")
    tokens = val.tokens if val else 0
    seq = cfg.seq_len or (mc.max_seq_len if mc else 1)
    if not p.require(
        "data",
        tokens > seq,
        f"{cfg.data}: {tokens:,} val tokens",
        f"{cfg.data}: the val split holds {tokens} tokens, under one window of {seq + 1}: "
        "tokenize more validation text or lower seq_len",
    ):
        return index
    if mc is not None:
        p.require(
            "vocab",
            mc.vocab_size == index.vocab_size,
            f"{mc.vocab_size} ids",
            f"model vocab {mc.vocab_size} != data vocab {index.vocab_size}: give data tokenized "
            "with the model's tokenizer",
        )
    windows = (tokens - 1) // seq
    scored = -(-cfg.eval_tokens // seq)
    wanted = -(-cfg.calibration_tokens // seq) if cfg.needs_calibration() else 0
    p.warn_if(
        "calibration",
        wanted > 0 and scored + wanted > windows,
        f"the val split holds {windows} windows of {seq}: calibration reuses "
        f"{min(scored + wanted - windows, wanted)} of the scored ones (add val data or lower "
        "eval_tokens to keep them apart)",
        f"{min(wanted, max(windows - scored, 0))} calibration windows after the scored ones",
    )
    return index


def _plan_sparse(p: Plan, cfg: Config, mc: ModelConfig) -> None:
    from albor.model.transforms.prune import zero_count

    shapes = target_shapes(cfg, mc)
    if not p.require(
        "targets",
        bool(shapes),
        f"{len(shapes)} matrices",
        f"targets {cfg.targets} match none of the blocks' projection matrices (e.g. "
        "model.layers.0.mlp.down_proj.weight): fix the patterns",
    ):
        return
    sparsity, structure = cfg.spec()
    if structure is not None:
        odd = [f"{n} ({s[1]} inputs)" for n, s in shapes.items() if s[1] % structure.m]
        if not p.require(
            "structure",
            not odd,
            f"{structure}: every pruned matrix's inputs divide into groups of {structure.m}",
            f"structure {structure}: inputs not a multiple of {structure.m}: "
            f"{', '.join(odd[:3])}: leave them out of `targets` or pick another M",
        ):
            return
    numels = [math.prod(s) for s in shapes.values()]
    if cfg.scope == "global":
        zeros = zero_count(sparsity, sum(numels))
    else:
        zeros = sum(zero_count(sparsity, n) for n in numels)
    p.estimates["pruned_parameters"] = sum(numels)
    p.estimates["zeros"] = zeros
    how = f"{structure} " if structure else ""
    p.actions.append(
        f"{cfg.method} {how}pruning of {len(shapes)} matrices to {float(sparsity):.2%}: "
        f"{zeros:,} zeros of {sum(numels):,} weights"
    )


def _plan_depth(p: Plan, cfg: Config, mc: ModelConfig) -> None:
    layers = mc.num_layers
    n = len(cfg.blocks) if cfg.blocks is not None else (cfg.num_blocks or 0)
    if cfg.blocks is not None:
        ok = cfg.blocks[-1] < layers and n < layers
        p.require(
            "blocks",
            ok,
            f"remove blocks {cfg.blocks[0]}..{cfg.blocks[-1]} of 0..{layers - 1}",
            f"blocks {cfg.blocks}: the model has blocks 0..{layers - 1}; name fewer than all, "
            "within that range",
        )
    else:
        ok = n < layers
        p.require(
            "num_blocks",
            ok,
            f"remove the {n} consecutive blocks (of {layers}) closest in angle",
            f"num_blocks {n}: the model has {layers} blocks; remove fewer than all",
        )
    if ok:
        after = mc.model_copy(update={"num_layers": layers - n})
        p.estimates["parameters_after"] = param_count(after)
        p.actions.append(f"remove {n} blocks; config.json gets num_hidden_layers {layers - n}")


def memory_estimate(cfg: Config, mc: ModelConfig, seq: int) -> int:
    """Bytes at the peak, roughly: the float32 model, a scoring batch, the calibration
    activations Wanda keeps between blocks (or the hidden states depth compares), and the sort
    of the largest ranking."""
    params = param_count(mc)
    weights = 4 * params
    rows = cfg.batch_size * seq
    forward = 4 * rows * (2 * mc.vocab_size + 4 * mc.hidden_size + 3 * mc.intermediate_size)
    calibration = 0
    if cfg.method == "wanda":
        tokens = -(-cfg.calibration_tokens // seq) * seq
        calibration = 2 * 4 * tokens * mc.hidden_size
    elif cfg.method == "depth":
        calibration = 4 * rows * mc.hidden_size * (mc.num_layers + 1)
    largest = mc.hidden_size * max(mc.intermediate_size, mc.hidden_size)
    if cfg.scope == "global" and cfg.method == "magnitude":
        largest = params
    ranking = largest * (4 + 3 * 8 + 1)  # scores, three int64 orders, the mask
    return weights + forward + calibration + ranking


# ---------------------------------------------------------------------------------------------
# apply


@dataclass
class Windows:
    """Aligned val windows (B, seq_len + 1) in batches: the scored ones, and the calibration
    inputs (B, seq_len)."""

    scored: list[torch.Tensor]
    calibration: list[torch.Tensor]
    shared: int  # calibration windows that are also scored


def read_windows(cfg: Config, seq: int) -> Windows:
    import torch

    from albor.data.shards import open_split
    from albor.data.windows import eval_windows

    assert cfg.data is not None
    shards = open_split(cfg.data, "val")
    scored = -(-cfg.eval_tokens // seq)
    wanted = -(-cfg.calibration_tokens // seq) if cfg.needs_calibration() else 0
    rows = [w[0] for w in eval_windows(shards, seq, (scored + wanted) * seq, 1)]
    evaluated, rest = rows[:scored], rows[scored:]
    shared = min(wanted - len(rest), len(evaluated)) if wanted > len(rest) else 0
    calibration = rest + evaluated[:shared]

    def batches(ws: list[torch.Tensor]) -> list[torch.Tensor]:
        b = cfg.batch_size
        return [torch.stack(ws[i : i + b]) for i in range(0, len(ws), b)]

    return Windows(batches(evaluated), [w[:, :-1] for w in batches(calibration)], shared)


def _bits_per_byte(model: GPT, windows: Windows, token_bytes: np.ndarray) -> float | None:
    from albor.evals.perplexity import score_model

    if not windows.scored:
        return None
    device = model.model.embed_tokens.weight.device
    return round(score_model(model, windows.scored, token_bytes, device).bits_per_byte, 5)


def _token_id(raw: dict[str, Any], key: str) -> int | None:
    value = raw.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:

    from albor.data.bpe import TOKENIZER_FILES, load_tokenizer, special_tokens, token_byte_lengths
    from albor.model.hf import save_pretrained
    from albor.model.load import load_model, torch_dtype
    from albor.model.transforms import prune as tp

    assert cfg.model is not None
    problems = cfg.problems()
    if problems:
        raise ConfigError("; ".join(problems))
    src = read_source(cfg.model)
    model, mc = load_model(src.directory, device=cfg.device)
    seq = cfg.seq_len or mc.max_seq_len
    if seq > mc.max_seq_len:
        raise ConfigError(f"seq_len {seq} exceeds the model's context {mc.max_seq_len}")
    windows = read_windows(cfg, seq) if cfg.data is not None else Windows([], [], 0)
    token_bytes = token_byte_lengths(load_tokenizer(cfg.data)) if cfg.data is not None else None
    before = _bits_per_byte(model, windows, token_bytes) if token_bytes is not None else None
    params_before = model.num_params()
    sparsity, structure = cfg.spec()
    metrics: dict[str, Any] = {"method": cfg.method}
    names: list[str] = []
    if cfg.method == "depth":
        if cfg.blocks is not None:
            start, n = cfg.blocks[0], len(cfg.blocks)
        else:
            assert cfg.num_blocks is not None
            n = cfg.num_blocks
            distances = tp.span_distances(model, windows.calibration, n)
            start = tp.closest_span(distances)
            metrics["span_distances"] = [round(d, 6) for d in distances]
        state, pruned_config = tp.remove_blocks(model.state_dict(), mc, start, n)
        model = tp.model_from_state(pruned_config, state)
        metrics["removed_blocks"] = list(range(start, start + n))
        metrics["num_layers"] = {"before": mc.num_layers, "after": pruned_config.num_layers}
        mc = pruned_config
    elif cfg.method == "wanda":
        names = tp.wanda_prune(
            model, windows.calibration, sparsity, structure=structure, targets=cfg.targets
        )
    else:
        state = tp.magnitude_prune(
            model.state_dict(),
            sparsity,
            scope=cfg.scope,
            structure=structure,
            targets=cfg.targets,
        )
        model = tp.model_from_state(mc, state)
        names = tp.target_names(state, cfg.targets)
    if cfg.method != "depth" and not names:
        raise ConfigError(f"targets {cfg.targets} match none of the model's projection matrices")
    after = _bits_per_byte(model, windows, token_bytes) if token_bytes is not None else None

    model = model.to(device="cpu", dtype=torch_dtype(src.dtype))
    eos = _token_id(src.raw, "eos_token_id")
    if eos is None:
        eos = special_tokens(src.directory).ids["eos"]
    save_pretrained(
        model,
        mc,
        ctx.out,
        eos_token_id=eos,
        bos_token_id=_token_id(src.raw, "bos_token_id"),
        pad_token_id=_token_id(src.raw, "pad_token_id"),
    )
    for name in (*TOKENIZER_FILES, *_COPIED):
        if (src.directory / name).is_file():
            shutil.copyfile(src.directory / name, ctx.out / name)

    written = model.state_dict()  # what was saved: a cast to bf16 could only add zeros
    counted = tp.sparsity_of(written, names)
    zeros = sum(c.zeros for c in counted.values())
    numel = sum(c.numel for c in counted.values())
    all_zeros = sum(int((t == 0).sum()) for t in model.parameters())
    metrics.update(
        sparsity=zeros / numel if numel else 0.0,
        zeros=zeros,
        pruned_parameters=numel,
        tensors={
            n: {"zeros": c.zeros, "numel": c.numel, "sparsity": c.sparsity}
            for n, c in counted.items()
        },
        model_sparsity=all_zeros / model.num_params(),
        parameters={"before": params_before, "after": model.num_params()},
        val_bpb_before=before,
        val_bpb_after=after,
        val_tokens=sum(w.shape[0] for w in windows.scored) * seq,
    )
    if cfg.method != "depth":
        metrics.update(requested_sparsity=float(sparsity), scope=cfg.scope)
        metrics["structure"] = str(structure) if structure else None
    if cfg.needs_calibration():
        metrics["calibration"] = {
            "windows": sum(w.shape[0] for w in windows.calibration),
            "tokens": sum(w.numel() for w in windows.calibration),
            "shared_with_eval": windows.shared,
        }
    if cfg.method == "depth":
        what = f"removed blocks {metrics['removed_blocks']}"
    else:
        what = f"{zeros:,} of {numel:,} weights zero ({zeros / numel:.2%})"
    bpb = f"; val bits/byte {before:.4f} -> {after:.4f}" if before is not None else ""
    log.info("prune: %s%s", what, bpb)
    return Outcome(summary=f"{cfg.method}: {what}{bpb}", metrics=metrics)
