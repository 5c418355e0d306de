"""Parity of an exported model with albor's own, and the bounds an export must meet.

An exported file is only as good as its agreement with the checkpoint it came from. The figures:

- token ids: HF tokenizers (albor's tokenizer.json) is the reference; transformers' AutoTokenizer
  and llama.cpp must give the same ids on every parity text (llama.cpp both with special tokens
  parsed and as plain text), and llama.cpp must turn those ids back into the text;
- generation: transformers' greedy tokens equal albor's engine's, prompt for prompt;
- top-1: llama.cpp's next token agrees with albor's at every position of the parity windows,
  at least `REQUIRED_TOP1[fmt]` of them. A position where llama.cpp picks a token whose albor
  logit is within `tie_margin` of albor's best is a near tie that rounding may flip: it is counted
  (`top1_near_ties`), not failed; the raw agreement is reported beside it.

`hf_parity` / `gguf_parity` compute the figures (a dict that goes into the manifest);
`hf_failures` / `gguf_failures` read them and say, format first, which bound was missed. The
export stage (HF, GGUF F16 / BF16) and the quantize stage (GGUF Q8_0 / Q4_0 / Q4_K_M) both gate
on them: one set of bounds for every file albor writes.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from albor.errors import ArtifactError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from albor.model.gpt import GPT

REQUIRED_TOP1 = {"f16": 1.0, "bf16": 1.0, "q8_0": 0.99}
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


def parity_texts(data: Path | None, limit: int | None = None) -> tuple[list[str], str]:
    """The parity texts (at most `limit`): the val split of the split artifact `data`, or the
    stdlib sample; and where they came from."""
    if data is not None:
        from albor.data.corpus import iter_texts

        texts: list[str] = []
        for text in iter_texts(data / "val.parquet"):
            texts.append(text)
            if limit is not None and len(texts) >= limit:
                break
        if not texts:
            raise ArtifactError(f"{data}: the val split is empty: no parity texts")
        return texts, f"val split of {data}"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [
        (stdlib / name).read_text(encoding="utf-8")
        for name in STDLIB_SAMPLE
        if (stdlib / name).is_file()
    ]
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise ArtifactError(
            f"none of the stdlib sample modules exists under {stdlib}: set `data:` to a split "
            "artifact for the parity texts"
        )
    return texts, "stdlib sample"


def token_data_texts(
    data: Path, tokenizer: Tokenizer, limit: int | None = None
) -> tuple[list[str], str]:
    """Parity texts from a tokenize artifact: its val split's documents (the token stream cut
    at each EOS) decoded back into text, at most `limit` of them; and where they came from.
    Byte-level BPE decodes losslessly, so these are the val documents as tokenized (FIM
    documents keep their FIM tokens, which both tokenizers parse as special tokens)."""
    from albor.data.shards import TokenIndex, open_split

    eos = TokenIndex.load(data).eos_id
    texts: list[str] = []
    for shard in open_split(data, "val"):
        ids = np.asarray(shard)
        cuts = np.flatnonzero(ids == eos)
        for start, end in zip(np.r_[0, cuts + 1], np.r_[cuts, len(ids)], strict=True):
            if end > start:
                texts.append(tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=False))
            if limit is not None and len(texts) >= limit:
                return texts, f"val split of {data}"
    if not texts:
        raise ArtifactError(f"{data}: the val split holds no document: no parity texts")
    return texts, f"val split of {data}"


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
    """Texts whose ids differ from the reference's (or, with unit "character", whose text)."""

    unit: str = "token"
    texts: int = 0
    units: int = 0
    mismatched: int = 0
    first: str = ""

    def add(self, index: int, want: Sequence[Any], got: Sequence[Any]) -> None:
        self.texts += 1
        self.units += len(want)
        if list(want) != list(got):
            self.mismatched += 1
            if not self.first:
                at = next(
                    (i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b),
                    min(len(want), len(got)),
                )
                self.first = f"text {index} differs at {self.unit} {at}"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "texts": self.texts,
            f"{self.unit}s": self.units,
            "mismatched_texts": self.mismatched,
        }
        if self.first:
            d["first_mismatch"] = self.first
        return d


# ---------------------------------------------------------------------------------------------
# transformers


def hf_parity(
    out: Path,
    model: GPT,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    windows: Sequence[Sequence[int]],
    eos: int,
) -> dict[str, Any]:
    """transformers loads the HF directory `out` and matches albor: tokenizer ids on every text
    (`tokenizer`) and greedy generations on the first windows' halves (`generate`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

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
        generation = _hf_generation(theirs, model, windows, eos)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return {"tokenizer": tok.to_json(), "generate": generation}


def _hf_generation(
    theirs: Any, model: GPT, windows: Sequence[Sequence[int]], eos: int
) -> dict[str, Any]:
    import torch

    from albor.infer.engine import generate
    from albor.progress import track

    new = min(HF_NEW_TOKENS, max(1, model.cfg.max_seq_len // 2))
    half = [list(w[: max(1, min(len(w), model.cfg.max_seq_len - new) // 2)]) for w in windows]
    prompts = half[:HF_PROMPTS]
    matching, tokens = 0, 0
    result: dict[str, Any] = {}
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
        if got != ours and "first_mismatch" not in result:
            result["first_mismatch"] = {"prompt": len(prompt), "albor": ours, "transformers": got}
    return {"prompts": len(prompts), "tokens": tokens, "matching_prompts": matching, **result}


def hf_failures(figures: dict[str, Any]) -> Iterator[str]:
    """What `hf_parity`'s figures miss: every generation and every text must match."""
    gen = figures["generate"]
    if gen["matching_prompts"] != gen["prompts"]:
        yield (
            f"hf: transformers' greedy tokens differ from albor's on "
            f"{gen['prompts'] - gen['matching_prompts']} of {gen['prompts']} prompts"
        )
    tok = figures["tokenizer"]
    if tok["mismatched_texts"]:
        yield (
            f"hf: AutoTokenizer ids differ from HF tokenizers' on {tok['mismatched_texts']} of "
            f"{tok['texts']} texts ({tok['first_mismatch']})"
        )


# ---------------------------------------------------------------------------------------------
# GGUF in llama.cpp


def gguf_parity(
    path: Path,
    fmt: str,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    windows: Sequence[Sequence[int]],
    ours: np.ndarray,
    *,
    threads: int | None = None,
    check_text: bool = True,
    tie_margin: float = 0.05,
) -> dict[str, Any]:
    """llama.cpp on the GGUF file `path` against HF tokenizers (`tokenization`, with special
    tokens parsed; `tokenization_plain_text`; `detokenize` when `check_text`) and against albor's
    logits `ours` on `windows` (the `top1_*` figures)."""
    from albor.data.bpe import plain_text
    from albor.model.load import open_gguf
    from albor.progress import track

    plain = plain_text(tokenizer)
    length = max(len(w) for w in windows)
    result: dict[str, Any] = {}
    with open_gguf(path, n_ctx=length, n_threads=threads, logits_all=True) as lm:
        special, as_text, text_back = TokenParity(), TokenParity(), TokenParity("character")
        for i, text in enumerate(track(texts, f"{fmt} tokenizer parity")):
            want = tokenizer.encode(text, add_special_tokens=False).ids
            special.add(i, want, lm.tokenize(text, special=True))
            as_text.add(
                i,
                plain.encode(text, add_special_tokens=False).ids,
                lm.tokenize(text, special=False),
            )
            if check_text:
                text_back.add(i, text, lm.detokenize(want))
        result["tokenization"] = special.to_json()
        result["tokenization_plain_text"] = as_text.to_json()
        if check_text:
            result["detokenize"] = text_back.to_json()
        result.update(_top1(lm, fmt, windows, ours, tie_margin))
    return result


def _top1(
    lm: Any, fmt: str, windows: Sequence[Sequence[int]], ours: np.ndarray, tie_margin: float
) -> dict[str, Any]:
    from albor.progress import track

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
    return {
        "top1_agreement": round(agree / positions, 6),
        "top1_agreement_tie_aware": round((agree + tied) / positions, 6),
        "top1_near_ties": tied,
        "top1_positions": positions,
        "top1_last_token_agreement": f"{last_agree}/{len(windows)}",
        "max_abs_logit_diff": round(max_diff, 6),
    }


def gguf_failures(fmt: str, figures: dict[str, Any]) -> Iterator[str]:
    """What `gguf_parity`'s figures for `fmt` miss: identical ids and text on every parity text,
    top-1 agreement (near ties excused) at least `REQUIRED_TOP1[fmt]`."""
    for key, mode in (("tokenization", ""), ("tokenization_plain_text", " as plain text")):
        tok = figures[key]
        if tok["mismatched_texts"]:
            yield (
                f"{fmt}: llama.cpp tokenizes {tok['mismatched_texts']} of {tok['texts']} texts"
                f"{mode} differently from HF tokenizers ({tok['first_mismatch']})"
            )
    back = figures.get("detokenize")
    if back and back["mismatched_texts"]:
        yield (
            f"{fmt}: llama.cpp detokenizes HF tokenizers' ids of {back['mismatched_texts']} of "
            f"{back['texts']} texts into other text ({back['first_mismatch']})"
        )
    need = REQUIRED_TOP1.get(fmt)
    got = figures["top1_agreement_tie_aware"]
    if need is not None and got < need:
        yield (
            f"{fmt}: top-1 agreement with albor {got:.2%} over {figures['top1_positions']} "
            f"positions, near ties excused (needs {need:.0%}; max logit difference "
            f"{figures['max_abs_logit_diff']})"
        )
