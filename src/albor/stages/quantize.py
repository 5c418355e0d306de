"""quantize: every lower-precision form of a checkpoint, each measured against the full model.

Inputs: `model`, a checkpoint directory (pretrain, distill, finetune, merge or prune output, or a
transformers Llama / Qwen2 directory with its tokenizer.json), and `data`, a tokenize artifact in
the model's tokenizer whose val split gives the scored windows, the calibration windows of the
importance matrix and the GGUF parity texts.

Variants (`variants`, default all):

- `int8`, `int4`: weight-only quantized checkpoints for albor's own engine (`int8/`, `int4/`:
  config.json with a `quantization` entry, model.safetensors, the tokenizer files);
  `albor complete`, `serve` and `bench` load them. int8 is per output channel, int4 in groups of
  `group_size` inputs (`albor.model.transforms.quantize` has the mathematics, and the measured
  choice of kernels); the embedding and output head stay in full precision.
- `gguf-q8_0`, `gguf-q4_0` (written by albor with the gguf package), `gguf-q4_k_m` (llama.cpp's
  quantizer from an F16 file, with an importance matrix from the calibration windows when
  `imatrix` is set): `model-q8_0.gguf` and so on. Each is gated on parity as export gates its
  files (`albor.evals.parity`): llama.cpp's tokenization of every parity text equals HF
  tokenizers', and Q8_0's top-1 token agrees with albor's on at least 99% of the positions.

For the full model and every variant the manifest has one row (`metrics.variants`): bytes on
disk and of resident weights, val bits/byte on the first `eval_tokens` of the val split, the
mean per-token KL(full || variant) and top-1 agreement with the full model on the same
positions, and decode ms/token of albor's engine or llama.cpp (`albor.infer.bench`, in this
process, on this CPU).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from albor.config import Int
from albor.errors import ArtifactError, ConfigError, StageFailed
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, check_input

if TYPE_CHECKING:
    import torch
    from torch import nn

    from albor.data.shards import TokenIndex
    from albor.model.config import ModelConfig
    from albor.model.gpt import GPT

log = logging.getLogger(__name__)

NAME = "quantize"
INPUTS = ("model", "data")

Variant = Literal["int8", "int4", "gguf-q8_0", "gguf-q4_0", "gguf-q4_k_m"]
VARIANTS: tuple[Variant, ...] = ("int8", "int4", "gguf-q8_0", "gguf-q4_0", "gguf-q4_k_m")
_COPIED = ("generation_config.json",)


class Config(OutputConfig):
    model: Path | None = Field(
        None,
        description="The checkpoint directory to quantize (config.json, model.safetensors, "
        "tokenizer.json).",
    )
    data: Path | None = Field(
        None,
        description="Tokenize artifact in the model's tokenizer: its val split gives the scored "
        "windows, the importance-matrix calibration and the GGUF parity texts.",
    )
    variants: list[Variant] = Field(
        default_factory=lambda: list(VARIANTS),
        description="What to make: int8, int4 (albor's engine), gguf-q8_0, gguf-q4_0, "
        "gguf-q4_k_m (llama.cpp).",
    )
    group_size: Literal[32, 128] = Field(
        32, description="int4: inputs per group sharing a scale and a zero point (32 or 128)."
    )
    imatrix: bool = Field(
        False,
        description="gguf-q4_k_m: give llama.cpp's quantizer an importance matrix computed from "
        "calibration windows of the val split.",
    )
    eval_tokens: Int = Field(
        16384, gt=0, description="Tokens of the val split scored by every variant."
    )
    calibration_tokens: Int = Field(
        8192, gt=0, description="imatrix: val tokens after the scored ones that calibrate it."
    )
    seq_len: Int | None = Field(
        None, gt=0, description="Window length of scoring and calibration; default the context."
    )
    batch_size: Int = Field(8, gt=0, description="Windows per forward pass.")
    parity_texts: Int = Field(
        16, gt=0, description="GGUF: val documents whose tokenization llama.cpp must match."
    )
    parity_prompts: Int = Field(
        32, gt=0, description="GGUF: windows of the parity texts on which top-1 is compared."
    )
    prompt_tokens: Int = Field(64, gt=1, description="GGUF: tokens per parity window.")
    tie_margin: float = Field(
        0.05,
        ge=0,
        description="GGUF: albor logits this close to its best are ties rounding may flip: "
        "llama.cpp picking one is not a top-1 disagreement.",
    )
    bench_prompt_tokens: Int = Field(64, gt=0, description="Decode timing: prompt tokens.")
    bench_new_tokens: Int = Field(32, gt=1, description="Decode timing: tokens decoded.")
    bench_repeats: Int = Field(2, gt=0, description="Decode timing: timed runs per variant.")
    threads: int | None = Field(
        None, gt=0, description="CPU threads for torch and llama.cpp (default: all cores)."
    )

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[Variant]) -> list[Variant]:
        if not v:
            raise ValueError(f"variants is empty: list at least one of {', '.join(VARIANTS)}")
        return [x for x in VARIANTS if x in v]  # one order whatever the config's

    def ggufs(self) -> list[str]:
        """The GGUF types asked for (q8_0, q4_0, q4_k_m)."""
        return [v.removeprefix("gguf-") for v in self.variants if v.startswith("gguf-")]

    def engines(self) -> list[str]:
        """albor's own formats asked for (int8, int4)."""
        return [v for v in self.variants if not v.startswith("gguf-")]


@dataclass(frozen=True)
class Source:
    directory: Path
    config: ModelConfig
    raw: dict[str, Any]
    weight_bytes: int


def read_source(directory: Path) -> Source:
    from albor.model.hf import CONFIG_FILE, weight_files
    from albor.model.load import require_checkpoint
    from albor.model.quantized import read_spec

    config = require_checkpoint(directory, "model")
    if read_spec(directory) is not None:
        raise ArtifactError(
            f"model {directory} is already quantized (config.json has a quantization entry): "
            "quantize the full-precision checkpoint it came from"
        )
    raw = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    size = sum((directory / f).stat().st_size for f in weight_files(directory))
    return Source(directory, config, raw, size)


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    from albor.data.shards import TokenIndex
    from albor.model.estimate import param_count
    from albor.model.gguf_layout import estimate_bytes, tensor_plan
    from albor.model.quantized import Spec, check_shapes

    ctx = ctx or PlanContext()
    p = Plan(NAME)
    src = check_input(p, ctx, "model", cfg.model, read_source, "a checkpoint directory")
    index = check_input(p, ctx, "data", cfg.data, TokenIndex.load, "a tokenize output directory")
    mc = src.config if src else None
    if src is not None:
        p.add("model", "ok", f"{src.directory}: {param_count(src.config):,} parameters")
    if index is not None:
        _plan_data(p, cfg, index, mc)
    if "int4" in cfg.variants and mc is not None:
        odd = check_shapes(mc, Spec("int4", cfg.group_size))
        p.require(
            "group_size",
            not odd,
            f"every projection's inputs split into groups of {cfg.group_size}",
            f"int4 group_size {cfg.group_size} does not divide the inputs of "
            f"{', '.join(odd[:3])}{' and more' if len(odd) > 3 else ''}: set group_size to a "
            "divisor of every width (32 or 128), or leave int4 out of variants",
        )
    ggufs = cfg.ggufs()
    if ggufs:
        _plan_gguf(p, cfg, src)
    p.warn_if(
        "imatrix",
        cfg.imatrix and "q4_k_m" not in ggufs,
        "imatrix is set but only gguf-q4_k_m (llama.cpp's quantizer) uses it: add gguf-q4_k_m "
        "to variants or remove imatrix",
        "importance matrix for gguf-q4_k_m" if cfg.imatrix else "no importance matrix",
    )
    if mc is not None and src is not None:
        p.estimates["fp32_bytes"] = src.weight_bytes
        for v in cfg.engines():
            p.estimates[f"bytes_{v}"] = _engine_bytes(mc, v, cfg.group_size)
        for q in ggufs:
            p.estimates[f"bytes_gguf-{q}"] = estimate_bytes(tensor_plan(mc, q))
    for v in cfg.variants:
        p.actions.append(f"make {v}; score it, time its decoding")
    return p


def _plan_data(p: Plan, cfg: Config, index: TokenIndex, mc: ModelConfig | None) -> None:
    val = index.splits.get("val")
    tokens = val.tokens if val else 0
    seq = cfg.seq_len or (mc.max_seq_len if mc else 1)
    p.require(
        "data",
        tokens > seq,
        f"{cfg.data}: {tokens:,} val tokens",
        f"{cfg.data}: the val split holds {tokens} tokens, under one window of {seq + 1}: "
        "tokenize more validation text or lower seq_len",
    )
    if mc is not None:
        p.require(
            "vocab",
            mc.vocab_size == index.vocab_size,
            f"{mc.vocab_size} ids",
            f"model vocab {mc.vocab_size} != data vocab {index.vocab_size}: give data tokenized "
            "with the model's tokenizer",
        )
        p.require(
            "seq_len",
            seq <= mc.max_seq_len,
            f"windows of {seq} tokens",
            f"seq_len {seq} exceeds the model's context {mc.max_seq_len}: lower it",
        )
        p.require(
            "prompt_tokens",
            cfg.prompt_tokens <= mc.max_seq_len
            and cfg.bench_prompt_tokens + cfg.bench_new_tokens <= mc.max_seq_len,
            "parity and timing prompts fit the context",
            f"prompt_tokens {cfg.prompt_tokens} or bench_prompt_tokens + bench_new_tokens "
            f"{cfg.bench_prompt_tokens + cfg.bench_new_tokens} exceed the model's context "
            f"{mc.max_seq_len}: lower them",
        )


def _plan_gguf(p: Plan, cfg: Config, src: Source | None) -> None:
    import importlib.util

    from albor.model.gguf_vocab import check_tokenizer, read_tokenizer_json

    if src is not None:
        problems = check_tokenizer(read_tokenizer_json(src.directory))
        p.require(
            "tokenizer",
            not problems,
            "byte-level BPE with the GPT-2 regex (llama.cpp pre-tokenizer `gpt-2`)",
            f"{src.directory}/tokenizer.json: {'; '.join(problems)}: GGUF variants need it; "
            "leave them out of variants",
        )
    for module, package in (("gguf", "gguf"), ("llama_cpp", "llama-cpp-python")):
        p.require(
            module,
            importlib.util.find_spec(module) is not None,
            f"{package} available",
            f"GGUF variants need {package}, an albor dependency: the install is broken; "
            f"pip install {package}",
        )


def _engine_bytes(mc: ModelConfig, variant: str, group_size: int) -> int:
    """Bytes of albor's int8 / int4 safetensors: the projections quantized, the rest fp32."""
    from albor.model.estimate import param_count

    h, inter = mc.hidden_size, mc.intermediate_size
    q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (inter, h), (inter, h), (h, inter)]
    quantized = sum(o * i for o, i in shapes) * mc.num_layers
    rest = param_count(mc) - quantized
    if variant == "int8":
        packed = quantized + 4 * sum(o for o, _ in shapes) * mc.num_layers
    else:
        packed = quantized // 2 + 8 * quantized // group_size
    return 4 * rest + packed


# ---------------------------------------------------------------------------------------------
# apply


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    import torch

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _quantize(cfg, ctx)
    finally:
        torch.set_num_threads(threads)  # the caller's process keeps its own setting


def _quantize(cfg: Config, ctx: ApplyContext) -> Outcome:
    from albor.data.bpe import load_tokenizer, token_byte_lengths
    from albor.evals.fidelity import fidelity
    from albor.model.load import load_model, load_model_tokenizer
    from albor.model.quantized import memory_bytes

    assert cfg.model is not None and cfg.data is not None
    src = read_source(cfg.model)
    model, mc = load_model(src.directory)
    seq = cfg.seq_len or mc.max_seq_len
    if seq > mc.max_seq_len:
        raise ConfigError(f"seq_len {seq} exceeds the model's context {mc.max_seq_len}")
    scored, calibration = scored_windows(cfg, seq)
    token_bytes = token_byte_lengths(load_tokenizer(cfg.data))
    tokenizer = load_model_tokenizer(src.directory)

    rows: dict[str, dict[str, Any]] = {}
    full = fidelity(model, model, scored, token_bytes)
    rows["full"] = {
        "path": str(src.directory),
        "bytes_disk": src.weight_bytes,
        "bytes_memory": memory_bytes(model),
        **full,
        "decode_ms_per_token": decode_ms(cfg, src.directory, "torch"),
    }
    for variant in cfg.engines():
        rows[variant] = _engine_variant(cfg, ctx, src, model, variant, scored, token_bytes)

    failures: list[str] = []
    parity: dict[str, Any] = {}
    if cfg.ggufs():
        parity, failures = _gguf_variants(
            cfg, ctx, src, model, tokenizer, scored, calibration, token_bytes, rows
        )
    base = rows["full"]["val_bpb"]
    for row in rows.values():
        row["val_bpb_increase"] = round(row["val_bpb"] / base - 1, 6)
        row["reduction_vs_fp32"] = round(src.weight_bytes / row["bytes_disk"], 3)
    metrics: dict[str, Any] = {
        "variants": rows,
        "val_tokens": sum(w.shape[0] for w in scored) * seq,
        "seq_len": seq,
        "group_size": cfg.group_size if "int4" in cfg.variants else None,
        **parity,
    }
    if failures:
        raise StageFailed(f"{ctx.name}: parity failed: {'; '.join(failures)}")
    summary = "; ".join(
        f"{name}: {r['bytes_disk'] / 1e6:.2f} MB, bits/byte {r['val_bpb']:.4f} "
        f"({r['val_bpb_increase']:+.2%}), top-1 {r['top1_agreement']:.1%}"
        for name, r in rows.items()
    )
    log.info("quantize: %s", summary)
    return Outcome(summary=summary, metrics=metrics)


def scored_windows(cfg: Config, seq: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The scored val windows (B, seq + 1) in batches, and the calibration inputs (B, seq) after
    them (the scored ones again where the split is too short for both)."""
    import torch

    from albor.data.shards import open_split
    from albor.data.windows import eval_windows

    assert cfg.data is not None
    shards = open_split(cfg.data, "val")
    n_scored = -(-cfg.eval_tokens // seq)
    n_calib = -(-cfg.calibration_tokens // seq) if cfg.imatrix else 0
    rows = [w[0] for w in eval_windows(shards, seq, (n_scored + n_calib) * seq, 1)]
    evaluated, rest = rows[:n_scored], rows[n_scored:] or rows[:n_scored]
    b = cfg.batch_size

    def batches(ws: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.stack(ws[i : i + b]) for i in range(0, len(ws), b)]

    return batches(evaluated), [w[:, :-1] for w in batches(rest[:n_calib])]


def decode_ms(cfg: Config, path: Path, kind: str) -> float:
    """Median decode ms/token of the model at `path` on this CPU (albor.infer.bench)."""
    from albor.infer.bench import time_here

    result = time_here(
        path,
        kind,
        prompt_tokens=cfg.bench_prompt_tokens,
        new_tokens=cfg.bench_new_tokens,
        repeats=cfg.bench_repeats,
        threads=cfg.threads,
    )
    return float(result["decode_ms_per_token"]["p50"])


def _copy_tokenizer(src: Path, out: Path) -> None:
    from albor.data.bpe import TOKENIZER_FILES

    for name in (*TOKENIZER_FILES, *_COPIED):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)


def _engine_variant(
    cfg: Config,
    ctx: ApplyContext,
    src: Source,
    model: GPT,
    variant: str,
    scored: list[torch.Tensor],
    token_bytes: np.ndarray,
) -> dict[str, Any]:
    from albor.evals.fidelity import fidelity
    from albor.model.load import load_model
    from albor.model.quantized import Spec, memory_bytes, save_quantized

    spec = Spec("int8") if variant == "int8" else Spec("int4", cfg.group_size)
    out = ctx.out / variant
    save_quantized(model, spec, out, src.raw)
    _copy_tokenizer(src.directory, out)
    loaded, _ = load_model(out)  # the figures are the written directory's, read back
    row = {
        "path": variant,
        "method": spec.method,
        "bits": spec.bits,
        "group_size": spec.group_size,
        "bytes_disk": (out / "model.safetensors").stat().st_size,
        "bytes_memory": memory_bytes(loaded),
        **fidelity(model, loaded, scored, token_bytes),
        "decode_ms_per_token": decode_ms(cfg, out, "torch"),
    }
    return row


def _gguf_variants(
    cfg: Config,
    ctx: ApplyContext,
    src: Source,
    model: GPT,
    tokenizer: Any,
    scored: list[torch.Tensor],
    calibration: list[torch.Tensor],
    token_bytes: np.ndarray,
    rows: dict[str, dict[str, Any]],
) -> tuple[dict[str, Any], list[str]]:
    from albor.data.shards import TokenIndex
    from albor.evals import parity
    from albor.evals.fidelity import fidelity
    from albor.model.gguf import quantize_gguf, write_gguf
    from albor.model.gguf_layout import LLAMACPP_TYPES
    from albor.model.load import open_gguf

    assert cfg.data is not None
    eos = TokenIndex.load(cfg.data).eos_id
    texts, source = parity.token_data_texts(cfg.data, tokenizer, cfg.parity_texts)
    windows = parity.parity_windows(tokenizer, texts, cfg.parity_prompts, cfg.prompt_tokens, eos)
    ours = parity.albor_logits(model, windows)
    imatrix = _imatrix(model, calibration) if cfg.imatrix else None
    failures: list[str] = []
    seq = scored[0].shape[1] - 1
    for n, qtype in enumerate(cfg.ggufs()):
        path = ctx.out / f"model-{qtype}.gguf"
        if qtype in LLAMACPP_TYPES:
            f16 = ctx.out / ".model-f16.gguf"  # hidden: an input of the quantizer, not an output
            write_gguf(src.directory, f16, "f16", name=src.directory.name)
            file = quantize_gguf(f16, path, qtype, threads=cfg.threads, imatrix=imatrix)
            f16.unlink()
        else:
            file = write_gguf(src.directory, path, qtype, name=src.directory.name)
        figures = parity.gguf_parity(
            path,
            qtype,
            tokenizer,
            texts,
            windows,
            ours,
            threads=cfg.threads,
            check_text=n == 0,  # one vocabulary in every file: one round trip tells
            tie_margin=cfg.tie_margin,
        )
        failures.extend(parity.gguf_failures(qtype, figures))
        with open_gguf(path, n_ctx=seq, n_threads=cfg.threads, logits_all=True) as lm:
            scores = fidelity(model, _llama_module(lm), scored, token_bytes)
        rows[f"gguf-{qtype}"] = {
            "path": path.name,
            **file.to_json(),
            "bytes_disk": file.bytes,
            # llama.cpp maps the file: its tensors are what stays resident.
            "bytes_memory": file.bytes,
            "imatrix": bool(imatrix) and qtype in LLAMACPP_TYPES,
            **scores,
            "decode_ms_per_token": decode_ms(cfg, path, "gguf"),
            "parity": figures,
        }
        rows[f"gguf-{qtype}"].pop("bytes")
    meta: dict[str, Any] = {
        "parity": {
            "texts": len(texts),
            "source": source,
            "prompts": len(windows),
            "prompt_tokens": len(windows[0]) if windows else 0,
        }
    }
    if imatrix is not None:
        meta["imatrix"] = {
            "tensors": len(imatrix),
            "calibration_tokens": sum(w.numel() for w in calibration),
        }
    return meta, failures


def _llama_module(lm: Any) -> nn.Module:
    """llama.cpp's logits of a batch of windows, row by row, as a torch module."""
    import torch
    from torch import nn

    class LlamaLogits(nn.Module):
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.from_numpy(lm.logits(row.tolist())) for row in inputs])

    return LlamaLogits()


def _imatrix(model: GPT, calibration: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Per GGUF weight name, the mean square of each input column of the linear over every
    calibration token: what llama.cpp's `llama-imatrix` collects (a column order llama.cpp's
    q / k permutation leaves alone, since it moves rows)."""
    import torch
    from torch import nn

    from albor.model.gguf_layout import gguf_name

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name: str) -> Any:
        def collect(_m: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            squares = (x * x).sum(0)
            sums[name] = sums[name] + squares if name in sums else squares
            counts[name] = counts.get(name, 0) + x.shape[0]

        return collect

    for name, m in model.named_modules():
        tied_head = name == "lm_head" and model.cfg.tie_embeddings
        if isinstance(m, nn.Linear) and not tied_head:
            hooks.append(m.register_forward_hook(hook(gguf_name(f"{name}.weight"))))
    try:
        with torch.inference_mode():
            for batch in calibration:
                model(batch)
    finally:
        for h in hooks:
            h.remove()
    return {n: (s / counts[n]).numpy().astype(np.float32) for n, s in sums.items()}
