"""export: a checkpoint as an HF directory and GGUF files, each checked against albor's own model.

Outputs: `hf/` (weights, config.json, tokenizer files, generation_config.json: loads with
transformers' AutoModelForCausalLM and AutoTokenizer) and `model-{f16,bf16}.gguf` (llama.cpp).
Export keeps precision; what lowers it (GGUF Q8_0, Q4_0, Q4_K_M, albor's int8 / int4) is the
quantize stage's, which gates its files with the same parity code. An export is only as good as
its parity, so apply checks every format it wrote and fails (exit 1, naming the figures) when one
misses:

- hf: transformers' greedy generation equals albor's engine token for token on a few prompts,
  and AutoTokenizer gives the ids of HF tokenizers on every parity text;
- GGUF: llama.cpp tokenizes every parity text exactly as HF tokenizers does (special tokens
  parsed, and as plain text) and detokenizes the ids back into the text, and its top-1 next
  token agrees with albor's at every position of the parity prompts (near ties excused).

The figures and their bounds are `albor.evals.parity`'s. Parity texts are the val split of a
`split` artifact (`data:`), or by default a built-in sample of the running Python's standard
library. The figures, the size of each file on disk and its reduction against the fp32
safetensors go in the manifest's metrics.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from albor.config import Int
from albor.errors import ArtifactError, StageFailed
from albor.evals.parity import REQUIRED_TOP1, STDLIB_SAMPLE
from albor.model.gguf_layout import estimate_bytes, fallbacks, tensor_plan
from albor.model.gguf_vocab import check_tokenizer, gguf_vocab, read_tokenizer_json
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, check_input

if TYPE_CHECKING:
    from albor.data.bpe import SpecialTokens
    from albor.model.config import ModelConfig
    from albor.model.gpt import GPT

NAME = "export"
INPUTS = ("model", "data")

Format = Literal["hf", "f16", "bf16"]
FORMATS: tuple[Format, ...] = ("hf", "f16", "bf16")
DEFAULT_FORMATS: tuple[Format, ...] = ("hf", "f16")
LOSSY = {"q8_0": "gguf-q8_0", "q4_0": "gguf-q4_0", "q4_k_m": "gguf-q4_k_m"}
"""Formats export once wrote that lower precision, and the quantize variant that makes each."""


class Config(OutputConfig):
    model: Path | None = Field(
        None, description="Checkpoint artifact directory (pretrain output) to export."
    )
    formats: list[Format] = Field(
        default_factory=lambda: list(DEFAULT_FORMATS),
        description="What to write: hf (transformers directory), f16, bf16 (GGUF written by "
        "albor). Quantized files come from the quantize stage.",
    )
    data: Path | None = Field(
        None,
        description="Split artifact directory whose val texts are the parity texts (default: "
        "a built-in sample of stdlib modules).",
    )
    parity_texts: Int | None = Field(
        None, gt=0, description="Most val documents checked for tokenization (default: all)."
    )
    parity_prompts: Int = Field(
        32, gt=0, description="Windows of the parity texts on which top-1 tokens are compared."
    )
    prompt_tokens: Int = Field(
        64, gt=1, description="Tokens per parity window (at most the model's context)."
    )
    tie_margin: float = Field(
        0.05,
        ge=0,
        description="Logits of albor closer than this to its best are ties that rounding may "
        "flip: llama.cpp picking such a token is not counted as a top-1 disagreement.",
    )
    threads: int | None = Field(
        None, gt=0, description="CPU threads for torch and llama.cpp (default: all cores)."
    )

    @field_validator("formats", mode="before")
    @classmethod
    def _lossy(cls, v: Any) -> Any:
        lossy = [f for f in v if f in LOSSY] if isinstance(v, list) else []
        if lossy:
            variants = ", ".join(LOSSY[f] for f in lossy)
            raise ValueError(
                f"formats {lossy} lower precision: quantize makes it: add a quantize stage "
                f"with variants [{variants}] (needs {{model: ..., data: tokenize}}) and keep "
                f"export's formats to {', '.join(FORMATS)}"
            )
        return v

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[Format]) -> list[Format]:
        if not v:
            raise ValueError(f"formats is empty: list at least one of {', '.join(FORMATS)}")
        return [f for f in FORMATS if f in v]  # one order whatever the config's


def gguf_formats(cfg: Config) -> list[str]:
    return [f for f in cfg.formats if f != "hf"]


@dataclass
class ModelInfo:
    """What plan reads of a checkpoint: its config, tokenizer JSON, the roles of its special
    tokens and weight file sizes."""

    config: ModelConfig
    tokenizer: dict[str, Any]
    specials: SpecialTokens
    weight_bytes: int
    tokenizer_bytes: int


def read_model(directory: Path) -> ModelInfo:
    """Headers only: config.json, the safetensors index or header, the tokenizer files."""
    from albor.artifact import read_manifest
    from albor.data.bpe import special_tokens
    from albor.model.hf import load_config, weight_files

    read_manifest(directory)  # the stage fingerprints its input: it must be an artifact
    mc = load_config(directory)
    files = weight_files(directory)
    tok = read_tokenizer_json(directory)
    specials = special_tokens(directory)
    tok_bytes = sum(
        (directory / f).stat().st_size
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
        if (directory / f).is_file()
    )
    weight_bytes = sum((directory / f).stat().st_size for f in files if (directory / f).is_file())
    return ModelInfo(mc, tok, specials, weight_bytes, tok_bytes)


def _read_splits(directory: Path) -> dict[str, Any]:
    from albor.data.corpus import require_splits

    return require_splits(directory)


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ValueError:  # imported already, or blocked, without a spec
        return sys.modules.get(module) is None


def _reinstall(package: str) -> str:
    # A required package that is missing is a broken install, not a choice: no extra to name.
    return (
        f"{package} is not installed, though albor depends on it: the install is broken; "
        f"reinstall albor (pip install albor) or pip install {package}"
    )


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    ctx = ctx or PlanContext()
    p = Plan(NAME)
    ggufs = gguf_formats(cfg)
    info = check_input(p, ctx, "model", cfg.model, read_model, "a checkpoint directory")
    if info is not None:
        mc = info.config
        p.add("model", "ok", f"{cfg.model} ({mc.num_layers} layers, vocab {mc.vocab_size})")
        # What hf/ and the GGUF files will name as eos and FIM tokens (an adopted tokenizer's own).
        roles = info.specials.to_json()
        p.add(
            "special tokens",
            "ok",
            ", ".join(f"{r} {v['token']} ({v['id']})" for r, v in roles.items()),
        )
        problems = check_tokenizer(info.tokenizer)
        if not problems:
            try:
                gguf_vocab(info.tokenizer, mc.vocab_size)
            except ArtifactError as e:
                problems.append(str(e))
        p.require(
            "tokenizer",
            not problems,
            "byte-level BPE with the GPT-2 regex (llama.cpp pre-tokenizer `gpt-2`)",
            f"{cfg.model}/tokenizer.json: {'; '.join(problems)}",
        )
        p.require(
            "prompt_tokens",
            cfg.prompt_tokens <= mc.max_seq_len,
            f"{cfg.parity_prompts} windows of {cfg.prompt_tokens} tokens",
            f"prompt_tokens {cfg.prompt_tokens} exceeds the model's context {mc.max_seq_len}: "
            "lower it",
        )
        p.estimates["fp32_safetensors_bytes"] = info.weight_bytes
        if "hf" in cfg.formats:
            p.estimates["bytes_hf"] = info.weight_bytes + info.tokenizer_bytes
        vocab = gguf_vocab(info.tokenizer, mc.vocab_size) if not problems else None
        for fmt in ggufs:
            entries = tensor_plan(mc, fmt)
            p.estimates[f"bytes_{fmt}"] = estimate_bytes(entries, vocab)
            moved = fallbacks(entries)
            shown = ", ".join(moved[:3]) + (f" and {len(moved) - 3} more" if len(moved) > 3 else "")
            p.warn_if(
                f"blocks {fmt}",
                bool(moved),
                f"{len(moved)} tensor(s) stored as a wider type because their rows do not split "
                f"into {fmt} blocks: {shown}",
                "every matrix splits into blocks",
            )
    if cfg.data is None:
        p.add("data", "ok", f"parity texts: {len(STDLIB_SAMPLE)} stdlib modules (built in)")
    else:
        manifest = check_input(p, ctx, "data", cfg.data, _read_splits, "a split output directory")
        if manifest is not None:
            p.add("data", "ok", f"parity texts: val split of {cfg.data}")
    if ggufs:
        p.require(
            "gguf",
            not _missing("gguf"),
            "gguf package available",
            f"writing GGUF needs the gguf package. {_reinstall('gguf')}",
        )
        p.require(
            "llama_cpp",
            not _missing("llama_cpp"),
            "llama-cpp-python available (GGUF parity)",
            "the GGUF parity check needs llama.cpp. " + _reinstall("llama-cpp-python"),
        )
    if "hf" in cfg.formats:
        p.require(
            "transformers",
            not _missing("transformers"),
            "transformers available (HF parity)",
            f"the HF parity check needs transformers. {_reinstall('transformers')}",
        )
    sizes = [v for k, v in p.estimates.items() if k.startswith("bytes_")]
    if sizes:
        p.estimates["disk_bytes"] = sum(sizes)
    p.estimates["parity_prompts"] = cfg.parity_prompts
    p.estimates["prompt_tokens"] = cfg.prompt_tokens
    if "hf" in cfg.formats:
        p.actions.append("write hf/: safetensors, config.json, tokenizer, generation_config.json")
    for fmt in ggufs:
        p.actions.append(f"write model-{fmt}.gguf (gguf)")
    bounds = ", ".join(f"{fmt}: >= {REQUIRED_TOP1[fmt]:.0%}" for fmt in ggufs)
    p.actions.append(
        "check parity: tokenization of every parity text, top-1 tokens on the parity prompts "
        f"({bounds}), transformers generation == albor's"
    )
    return p


# ---------------------------------------------------------------------------------------------
# apply


def _write_hf(model: GPT, mc: ModelConfig, src: Path, out: Path, eos: int) -> int:
    """hf/: the weights as they are, config.json, the tokenizer files, generation_config.json
    naming `eos` (the tokenizer's eos role: transformers stops generating there); returns it."""
    from albor.artifact import atomic_write_json
    from albor.data.bpe import TOKENIZER_FILES, hf_config
    from albor.model.hf import save_pretrained

    out.mkdir(parents=True, exist_ok=True)
    save_pretrained(model, mc, out, eos_token_id=eos, pad_token_id=eos)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    if not (out / "tokenizer_config.json").is_file():
        atomic_write_json(out / "tokenizer_config.json", hf_config())
    atomic_write_json(
        out / "generation_config.json",
        {
            "_from_model_config": False,
            "eos_token_id": eos,
            "pad_token_id": eos,
            "do_sample": False,
            "max_length": mc.max_seq_len,
        },
    )
    return int(eos)


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    import torch

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _export(cfg, ctx)
    finally:
        torch.set_num_threads(threads)  # the caller's process keeps its own setting


def _export(cfg: Config, ctx: ApplyContext) -> Outcome:
    from albor.evals import parity
    from albor.model.gguf import write_gguf
    from albor.model.load import load_model, load_model_tokenizer

    assert cfg.model is not None
    src = cfg.model
    info = read_model(src)
    model, mc = load_model(src)
    tokenizer = load_model_tokenizer(src)
    # The checkpoint's tokenizer artifact says which token ends a document (albor's
    # <|endoftext|>, or an adopted tokenizer's own eos): parity windows start after it, and
    # hf/ and the GGUF files name it.
    eos = info.specials.eos_id
    texts, source = parity.parity_texts(cfg.data, cfg.parity_texts)
    windows = parity.parity_windows(tokenizer, texts, cfg.parity_prompts, cfg.prompt_tokens, eos)
    if not windows:
        raise ArtifactError(f"the parity texts ({source}) are empty: no prompts to compare")
    # The baseline of the size reductions: albor's checkpoints are fp32 safetensors; hf/ (fp32,
    # as load_pretrained reads it) is measured instead when written, whatever the input's dtype.
    fp32 = info.weight_bytes
    metrics: dict[str, Any] = {
        "parity": {
            "texts": len(texts),
            "source": source,
            "prompts": len(windows),
            "prompt_tokens": len(windows[0]),
        },
    }

    if "hf" in cfg.formats:
        hf_eos = _write_hf(model, mc, src, ctx.out / "hf", eos)
        size = sum(p.stat().st_size for p in (ctx.out / "hf").iterdir() if p.is_file())
        metrics["hf"] = {"bytes": size}
        fp32 = (ctx.out / "hf" / "model.safetensors").stat().st_size
    metrics["fp32_safetensors_bytes"] = fp32

    written = {}
    for fmt in gguf_formats(cfg):
        written[fmt] = write_gguf(src, ctx.out / f"model-{fmt}.gguf", fmt, name=src.name)

    failures: list[str] = []
    if "hf" in cfg.formats:
        hf = parity.hf_parity(ctx.out / "hf", model, tokenizer, texts, windows, hf_eos)
        metrics["hf"].update(hf)
        failures.extend(parity.hf_failures(hf))
    if written:
        ours = parity.albor_logits(model, windows)
        metrics["gguf"] = {}
        for n, (fmt, file) in enumerate(written.items()):
            figures = file.to_json()
            figures["reduction_vs_fp32"] = round(fp32 / file.bytes, 3)
            figures.update(
                parity.gguf_parity(
                    file.path,
                    fmt,
                    tokenizer,
                    texts,
                    windows,
                    ours,
                    threads=cfg.threads,
                    check_text=n == 0,  # every file has the same vocabulary: one round trip tells
                    tie_margin=cfg.tie_margin,
                )
            )
            metrics["gguf"][fmt] = figures
            failures.extend(parity.gguf_failures(fmt, figures))

    if failures:
        raise StageFailed(f"{ctx.name}: parity failed: {'; '.join(failures)}")
    return Outcome(summary=_summary(cfg, metrics), metrics=metrics)


def _summary(cfg: Config, metrics: dict[str, Any]) -> str:
    parts = []
    if "hf" in metrics:
        gen = metrics["hf"]["generate"]
        parts.append(f"hf: generation {gen['matching_prompts']}/{gen['prompts']} prompts equal")
    for fmt, f in metrics.get("gguf", {}).items():
        parts.append(
            f"{fmt}: {f['bytes'] / 1e6:.2f} MB ({f['reduction_vs_fp32']:.1f}x smaller), "
            f"top-1 {f['top1_agreement']:.1%}"
            + (f" ({f['top1_near_ties']} near ties)" if f["top1_near_ties"] else "")
        )
    p = metrics["parity"]
    parts.append(f"tokenization identical on {p['texts']} texts ({p['source']})")
    return "; ".join(parts)
