"""export: a checkpoint as an HF directory and GGUF files, each checked against albor's own model.

Outputs: `hf/` (weights, config.json, tokenizer files, generation_config.json: loads with
transformers' AutoModelForCausalLM and AutoTokenizer) and `model-{f16,q8_0,q4_0,q4_k_m}.gguf`
(llama.cpp). An export is only as good as its parity, so apply checks every format it wrote and
fails (exit 1, naming the figures) when one misses:

- hf: transformers' greedy generation equals albor's engine token for token on a few prompts,
  and AutoTokenizer gives the ids of HF tokenizers on every parity text;
- GGUF: llama.cpp tokenizes every parity text exactly as HF tokenizers does (special tokens
  parsed, and as plain text), and its top-1 next token agrees with albor's at every position of
  the parity prompts: F16 on all of them, Q8_0 on at least 99%; Q4_0 and Q4_K_M are reported.
  A position where llama.cpp picks a token whose albor logit is within `tie_margin` of albor's
  best is a near tie that rounding may flip: it is counted (`top1_near_ties`), not failed; the
  raw agreement is reported beside it.

Parity texts are the val split of a `split` artifact (`data:`), or by default a built-in sample
of the running Python's standard library. The figures, the size of each file on disk and its
reduction against the fp32 safetensors go in the manifest's metrics.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from albor.config import Int
from albor.errors import ArtifactError, StageFailed
from albor.model.gguf import (
    GGUF_INSTALL,
    LLAMACPP_TYPES,
    check_tokenizer,
    estimate_bytes,
    fallbacks,
    gguf_vocab,
    read_tokenizer_json,
    tensor_plan,
)
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, check_input

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from albor.model.config import ModelConfig
    from albor.model.gpt import GPT

NAME = "export"
DESCRIPTION = "Export a checkpoint as an HF dir and GGUF files; check token and top-1 parity."
INPUTS = ("model", "data")

Format = Literal["hf", "f16", "q8_0", "q4_0", "q4_k_m"]
FORMATS: tuple[Format, ...] = ("hf", "f16", "q8_0", "q4_0", "q4_k_m")
REQUIRED_TOP1 = {"f16": 1.0, "q8_0": 0.99}
"""Least top-1 agreement with albor's model per GGUF type; the others are reported only."""
HF_PROMPTS = 4
HF_NEW_TOKENS = 24
STDLIB_SAMPLE = (
    "textwrap.py",
    "heapq.py",
    "bisect.py",
    "fnmatch.py",
    "shlex.py",
    "string.py",
    "colorsys.py",
    "graphlib.py",
    "numbers.py",
    "reprlib.py",
)
"""Parity texts when no split artifact is given: small, varied modules of the stdlib."""


class Config(OutputConfig):
    model: Path | None = Field(
        None, description="Checkpoint artifact directory (pretrain output) to export."
    )
    formats: list[Format] = Field(
        default_factory=lambda: list(FORMATS),
        description="What to write: hf (transformers directory), f16, q8_0, q4_0 (GGUF written "
        "by albor), q4_k_m (GGUF from llama.cpp's quantizer).",
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
    """What plan reads of a checkpoint: its config, tokenizer JSON and weight file sizes."""

    config: ModelConfig
    tokenizer: dict[str, Any]
    weight_bytes: int
    tokenizer_bytes: int


def read_model(directory: Path) -> ModelInfo:
    """Headers only: config.json, the safetensors index or header, tokenizer.json."""
    from albor.artifact import read_manifest
    from albor.model.hf import _weight_files, load_config

    read_manifest(directory)  # the stage fingerprints its input: it must be an artifact
    mc = load_config(directory)
    files = _weight_files(directory)
    tok = read_tokenizer_json(directory)
    tok_bytes = sum(
        (directory / f).stat().st_size
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
        if (directory / f).is_file()
    )
    weight_bytes = sum((directory / f).stat().st_size for f in files if (directory / f).is_file())
    return ModelInfo(mc, tok, weight_bytes, tok_bytes)


def _read_splits(directory: Path) -> dict[str, Any]:
    from albor.data.corpus import require_splits

    return require_splits(directory)


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ValueError:  # imported already, or blocked, without a spec
        return sys.modules.get(module) is None


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    ctx = ctx or PlanContext()
    p = Plan(NAME)
    ggufs = gguf_formats(cfg)
    info = check_input(p, ctx, "model", cfg.model, read_model, "a checkpoint directory")
    if info is not None:
        mc = info.config
        p.add("model", "ok", f"{cfg.model} ({mc.num_layers} layers, vocab {mc.vocab_size})")
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
            what = "llama.cpp is expected to store" if fmt in LLAMACPP_TYPES else "stored as"
            p.warn_if(
                f"blocks {fmt}",
                bool(moved),
                f"{len(moved)} tensor(s) {what} a wider type because their rows do not split "
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
            f"writing GGUF needs the gguf package: {GGUF_INSTALL}",
        )
        p.require(
            "llama_cpp",
            not _missing("llama_cpp"),
            "llama-cpp-python available (Q4_K_M quantizer, GGUF parity)",
            "the GGUF parity check (and Q4_K_M) needs llama.cpp: pip install llama-cpp-python",
        )
    if "hf" in cfg.formats:
        p.require(
            "transformers",
            not _missing("transformers"),
            "transformers available (HF parity)",
            "the HF parity check needs transformers: pip install 'albor[hf]'",
        )
    sizes = [v for k, v in p.estimates.items() if k.startswith("bytes_")]
    if sizes:
        p.estimates["disk_bytes"] = sum(sizes)
    p.estimates["parity_prompts"] = cfg.parity_prompts
    p.estimates["prompt_tokens"] = cfg.prompt_tokens
    if "hf" in cfg.formats:
        p.actions.append("write hf/: safetensors, config.json, tokenizer, generation_config.json")
    for fmt in ggufs:
        how = "from model-f16 with llama.cpp's quantizer" if fmt in LLAMACPP_TYPES else "(gguf)"
        p.actions.append(f"write model-{fmt}.gguf {how}")
    p.actions.append(
        "check parity: tokenization of every parity text, top-1 tokens on the parity prompts "
        "(f16: all, q8_0: >= 99%), transformers generation == albor's"
    )
    return p


# ---------------------------------------------------------------------------------------------
# apply


def parity_texts(cfg: Config) -> tuple[list[str], str]:
    """The texts tokenization parity runs on, and where they came from."""
    if cfg.data is not None:
        from albor.data.corpus import iter_texts

        texts: list[str] = []
        for text in iter_texts(cfg.data / "val.parquet"):
            texts.append(text)
            if cfg.parity_texts is not None and len(texts) >= cfg.parity_texts:
                break
        if not texts:
            raise ArtifactError(f"{cfg.data}: the val split is empty: no parity texts")
        return texts, f"val split of {cfg.data}"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [
        (stdlib / name).read_text(encoding="utf-8")
        for name in STDLIB_SAMPLE
        if (stdlib / name).is_file()
    ]
    if cfg.parity_texts is not None:
        texts = texts[: cfg.parity_texts]
    if not texts:
        raise ArtifactError(
            f"none of the stdlib sample modules exists under {stdlib}: set `data:` to a split "
            "artifact for the parity texts"
        )
    return texts, "stdlib sample"


def parity_windows(
    tokenizer: Tokenizer, texts: Sequence[str], count: int, length: int, eos: int | None
) -> list[list[int]]:
    """`count` windows of `length` tokens spread evenly over the token stream of `texts`, each
    document after an EOS as in training (fewer when the stream is short)."""
    from albor.data.bpe import plain_text

    encoder = plain_text(tokenizer)
    stream: list[int] = []
    for text in texts:
        if eos is not None:
            stream.append(eos)
        stream.extend(encoder.encode(text, add_special_tokens=False).ids)
    if len(stream) <= length:
        return [stream] if stream else []
    starts = sorted({int(s) for s in np.linspace(0, len(stream) - length, count)})
    return [stream[s : s + length] for s in starts]


def albor_logits(model: GPT, windows: Sequence[Sequence[int]], batch: int = 8) -> np.ndarray:
    """albor's logits (windows, length, vocab) in fp32."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(windows), batch):
            idx = torch.tensor(list(windows[i : i + batch]), dtype=torch.long)
            out.append(model(idx).float().numpy())
    return np.concatenate(out)


@dataclass
class TokenParity:
    texts: int = 0
    tokens: int = 0
    mismatched: int = 0
    first: str = ""

    def add(self, index: int, want: Sequence[int], got: Sequence[int]) -> None:
        self.texts += 1
        self.tokens += len(want)
        if list(want) != list(got):
            self.mismatched += 1
            if not self.first:
                at = next(
                    (i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b),
                    min(len(want), len(got)),
                )
                self.first = f"text {index} differs at token {at}"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "texts": self.texts,
            "tokens": self.tokens,
            "mismatched_texts": self.mismatched,
        }
        if self.first:
            d["first_mismatch"] = self.first
        return d


def _write_hf(model: GPT, mc: ModelConfig, src: Path, out: Path, tokenizer: Tokenizer) -> int:
    """hf/: the weights as they are, config.json, the tokenizer files, generation_config.json;
    returns the EOS id (transformers stops generating there)."""
    from albor.artifact import atomic_write_json
    from albor.data.bpe import EOS, TOKENIZER_FILES, hf_config
    from albor.model.hf import save_pretrained

    eos = tokenizer.token_to_id(EOS)
    if eos is None:
        raise ArtifactError(f"{src}/tokenizer.json has no {EOS} token: transformers needs an EOS")
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


def _hf_parity(
    out: Path,
    model: GPT,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    windows: Sequence[Sequence[int]],
    eos: int,
) -> dict[str, Any]:
    """transformers loads hf/ and matches albor: tokenizer ids and greedy generations."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from albor.infer.engine import generate
    from albor.progress import track

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # no advice about generation flags in our output
    hf_logging.disable_progress_bar()  # nor its loading bar: stdout may be --json
    try:
        theirs = AutoModelForCausalLM.from_pretrained(out).eval()
        auto_tok = AutoTokenizer.from_pretrained(out)
        tok = TokenParity()
        for i, text in enumerate(track(texts, "hf tokenizer parity")):
            want = tokenizer.encode(text, add_special_tokens=False).ids
            tok.add(i, want, auto_tok(text, add_special_tokens=False)["input_ids"])
        new = min(HF_NEW_TOKENS, max(1, model.cfg.max_seq_len // 2))
        prompts = [
            list(w[: max(1, min(len(w), model.cfg.max_seq_len - new) // 2)]) for w in windows
        ]
        prompts = prompts[:HF_PROMPTS]
        matching, tokens = 0, 0
        examples: list[dict[str, Any]] = []
        for prompt in track(prompts, "hf generation parity"):
            ours = list(generate(model, prompt, max_new_tokens=new, stop_token_ids=(eos,)))
            with torch.inference_mode():
                ids = theirs.generate(
                    torch.tensor([prompt]),
                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    do_sample=False,
                    max_new_tokens=new,
                    eos_token_id=eos,
                    pad_token_id=eos,
                )
            got = ids[0, len(prompt) :].tolist()
            if got and got[-1] == eos:
                got = got[:-1]  # transformers keeps the EOS it stopped at; albor does not
            tokens += len(ours)
            matching += got == ours
            if got != ours and not examples:
                examples.append({"prompt": len(prompt), "albor": ours, "transformers": got})
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    result: dict[str, Any] = {
        "tokenizer": tok.to_json(),
        "generate": {"prompts": len(prompts), "tokens": tokens, "matching_prompts": matching},
    }
    if examples:
        result["generate"]["first_mismatch"] = examples[0]
    return result


def _gguf_parity(
    path: Path,
    fmt: str,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    windows: Sequence[Sequence[int]],
    ours: np.ndarray,
    threads: int | None,
    check_text: bool,
    tie_margin: float,
) -> dict[str, Any]:
    """llama.cpp on one GGUF file against HF tokenizers and albor's logits."""
    from albor.data.bpe import plain_text
    from albor.infer.llamacpp import LlamaCppModel
    from albor.progress import track

    plain = plain_text(tokenizer)
    length = max(len(w) for w in windows)
    result: dict[str, Any] = {}
    with LlamaCppModel(path, n_ctx=length, n_threads=threads, logits_all=True) as lm:
        special, as_text = TokenParity(), TokenParity()
        roundtrip = 0
        for i, text in enumerate(track(texts, f"{fmt} tokenizer parity")):
            want = tokenizer.encode(text, add_special_tokens=False).ids
            special.add(i, want, lm.tokenize(text, special=True))
            as_text.add(
                i,
                plain.encode(text, add_special_tokens=False).ids,
                lm.tokenize(text, special=False),
            )
            if check_text:
                roundtrip += lm.detokenize(want) != text
        result["tokenization"] = special.to_json()
        result["tokenization_plain_text"] = as_text.to_json()
        if check_text:
            result["tokenization"]["detokenize_mismatched_texts"] = roundtrip
        agree, tied, positions, last_agree = 0, 0, 0, 0
        max_diff = 0.0
        for i, window in enumerate(track(windows, f"{fmt} top-1 parity")):
            theirs = lm.logits(window)
            mine = ours[i, : len(window)]
            picked = theirs.argmax(-1)
            same = picked == mine.argmax(-1)
            # llama.cpp's pick is within tie_margin of albor's best: a tie rounding can flip.
            near = mine[np.arange(len(window)), picked] >= mine.max(-1) - tie_margin
            agree += int(same.sum())
            tied += int((near & ~same).sum())
            last_agree += int(same[-1])
            positions += len(window)
            max_diff = max(max_diff, float(np.abs(theirs - mine).max()))
    result.update(
        {
            "top1_agreement": round(agree / positions, 6),
            "top1_agreement_tie_aware": round((agree + tied) / positions, 6),
            "top1_near_ties": tied,
            "top1_positions": positions,
            "top1_last_token_agreement": f"{last_agree}/{len(windows)}",
            "max_abs_logit_diff": round(max_diff, 6),
        }
    )
    return result


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
    from tokenizers import Tokenizer

    from albor.data.bpe import EOS
    from albor.model.gguf import quantize_gguf, write_gguf
    from albor.model.hf import load_pretrained

    assert cfg.model is not None
    src = cfg.model
    info = read_model(src)
    model, mc = load_pretrained(src)
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    eos = tokenizer.token_to_id(EOS)
    texts, source = parity_texts(cfg)
    windows = parity_windows(tokenizer, texts, cfg.parity_prompts, cfg.prompt_tokens, eos)
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
        hf_eos = _write_hf(model, mc, src, ctx.out / "hf", tokenizer)
        size = sum(p.stat().st_size for p in (ctx.out / "hf").iterdir() if p.is_file())
        metrics["hf"] = {"bytes": size}
        fp32 = (ctx.out / "hf" / "model.safetensors").stat().st_size
    metrics["fp32_safetensors_bytes"] = fp32

    written = {}
    for fmt in gguf_formats(cfg):
        path = ctx.out / f"model-{fmt}.gguf"
        if fmt in LLAMACPP_TYPES:
            f16 = ctx.out / "model-f16.gguf"
            temp = not f16.is_file()
            if temp:  # not asked for: a hidden one, removed once quantized
                f16 = ctx.out / ".model-f16.gguf"
                write_gguf(src, f16, "f16", name=src.name)
            written[fmt] = quantize_gguf(f16, path, fmt, threads=cfg.threads)
            if temp:
                f16.unlink()
        else:
            written[fmt] = write_gguf(src, path, fmt, name=src.name)

    failures: list[str] = []
    if "hf" in cfg.formats:
        hf = _hf_parity(ctx.out / "hf", model, tokenizer, texts, windows, hf_eos)
        metrics["hf"].update(hf)
        gen = hf["generate"]
        if gen["matching_prompts"] != gen["prompts"]:
            failures.append(
                f"hf: transformers' greedy tokens differ from albor's on "
                f"{gen['prompts'] - gen['matching_prompts']} of {gen['prompts']} prompts"
            )
        if hf["tokenizer"]["mismatched_texts"]:
            failures.append(
                f"hf: AutoTokenizer ids differ from HF tokenizers' on "
                f"{hf['tokenizer']['mismatched_texts']} of {hf['tokenizer']['texts']} texts"
            )

    if written:
        ours = albor_logits(model, windows)
        metrics["gguf"] = {}
        for n, (fmt, file) in enumerate(written.items()):
            figures = file.to_json()
            figures["reduction_vs_fp32"] = round(fp32 / file.bytes, 3)
            figures.update(
                _gguf_parity(
                    file.path,
                    fmt,
                    tokenizer,
                    texts,
                    windows,
                    ours,
                    cfg.threads,
                    check_text=n == 0,
                    tie_margin=cfg.tie_margin,
                )
            )
            metrics["gguf"][fmt] = figures
            failures.extend(_gguf_failures(fmt, figures))

    if failures:
        raise StageFailed(f"{ctx.name}: parity failed: {'; '.join(failures)}")
    return Outcome(summary=_summary(cfg, metrics), metrics=metrics)


def _gguf_failures(fmt: str, figures: dict[str, Any]) -> Iterator[str]:
    for key, mode in (("tokenization", ""), ("tokenization_plain_text", " as plain text")):
        tok = figures[key]
        if tok["mismatched_texts"]:
            yield (
                f"{fmt}: llama.cpp tokenizes {tok['mismatched_texts']} of {tok['texts']} texts"
                f"{mode} differently from HF tokenizers ({tok.get('first_mismatch', '')})"
            )
    if tok.get("detokenize_mismatched_texts"):
        yield f"{fmt}: llama.cpp detokenizes {tok['detokenize_mismatched_texts']} texts wrongly"
    need = REQUIRED_TOP1.get(fmt)
    got = figures["top1_agreement_tie_aware"]
    if need is not None and got < need:
        yield (
            f"{fmt}: top-1 agreement with albor {got:.2%} over {figures['top1_positions']} "
            f"positions, near ties excused (needs {need:.0%}; max logit difference "
            f"{figures['max_abs_logit_diff']})"
        )


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
