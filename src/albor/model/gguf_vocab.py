"""The tokenizer in a GGUF file: whether llama.cpp can match it, its vocabulary, and its special
token ids.

llama.cpp's own converter recognises a BPE tokenizer by the hash of its pre-tokenizer output and
refuses the ones it does not know, so albor names the pre-tokenizer after the split regex the
tokenizer was trained with (ByteLevel's GPT-2 regex is `gpt-2`) and `check_tokenizer` says why a
tokenizer would split text otherwise. The eos, pad and FIM ids written are the roles of the
model's tokenizer (`albor.model.special_tokens`), so an adopted tokenizer's spellings
(`<fim_prefix>`, `</s>`) reach llama.cpp under the same keys as albor's own. `check_tokenizer`,
`gguf_vocab` and `special_ids` are pure, for `plan`; `add_tokenizer` writes them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from albor.data.bpe import SpecialTokens
from albor.errors import ArtifactError
from albor.model.special_tokens import GGUF_KEYS

GPT2_PRE = "gpt-2"
PAD_KEY = "tokenizer.ggml.padding_token_id"
BOS_KEY = "tokenizer.ggml.bos_token_id"


def read_tokenizer_json(directory: Path) -> dict[str, Any]:
    """The parsed `tokenizer.json` of a model directory; ArtifactError if missing or invalid."""
    path = Path(directory) / "tokenizer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(
            f"{path} not found: GGUF export needs the model's tokenizer beside its weights"
        ) from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: not a readable tokenizer.json: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ArtifactError(f"{path}: not a tokenizers JSON file (no 'model' section)")
    return data


def _describe(component: Any) -> str:
    if component is None:
        return "none"
    if isinstance(component, dict):
        inner = component.get("pretokenizers") or component.get("normalizers")
        if inner:
            return f"{component.get('type')}[{', '.join(_describe(c) for c in inner)}]"
        return str(component.get("type"))
    return repr(component)


def check_tokenizer(data: Mapping[str, Any]) -> list[str]:
    """Why llama.cpp's `gpt-2` byte-level BPE would tokenize differently from this tokenizer;
    empty when it matches. Each reason names the setting and the fix."""
    fix = "(train the tokenizer with albor's tokenizer stage: ByteLevel BPE, GPT-2 regex)"
    problems = []
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        problems.append(f"tokenizer model {model.get('type')!r} is not BPE {fix}")
    else:
        for key, ok in (
            ("dropout", None),
            ("continuing_subword_prefix", None),
            ("end_of_word_suffix", None),
            ("byte_fallback", False),
            ("ignore_merges", False),
        ):
            if model.get(key, ok) not in (ok, None, False, ""):
                problems.append(f"BPE option {key}={model[key]!r} has no llama.cpp equivalent")
    pre = data.get("pre_tokenizer")
    if not (
        isinstance(pre, dict)
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
    ):
        problems.append(
            f"pre-tokenizer {_describe(pre)}: llama.cpp's `{GPT2_PRE}` pre-tokenizer matches "
            f"only ByteLevel with the GPT-2 regex (use_regex true, add_prefix_space false) {fix}"
        )
    if data.get("normalizer") is not None:
        problems.append(
            f"normalizer {_describe(data['normalizer'])}: llama.cpp applies none to BPE text {fix}"
        )
    decoder = data.get("decoder")
    if not (isinstance(decoder, dict) and decoder.get("type") == "ByteLevel"):
        problems.append(f"decoder {_describe(decoder)} is not ByteLevel {fix}")
    return problems


def gguf_vocab(data: Mapping[str, Any], vocab_size: int) -> dict[str, Any]:
    """tokens, token types and merges as llama.cpp's `gpt2` vocabulary reads them.

    Special added tokens become CONTROL (matched in text only when special tokens are parsed,
    like HF's `encode_special_tokens=False`), other added tokens USER_DEFINED; ids the tokenizer
    leaves unused up to the model's `vocab_size` are padded as UNUSED, as llama.cpp's converter
    does. ArtifactError when the tokenizer has more ids than the model.
    """
    model = data["model"]
    by_id: dict[int, str] = {int(i): t for t, i in model.get("vocab", {}).items()}
    types: dict[int, int] = dict.fromkeys(by_id, 1)  # NORMAL
    for added in data.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = 3 if added.get("special") else 4  # CONTROL / USER_DEFINED
    n = max(by_id, default=-1) + 1
    if n > vocab_size:
        raise ArtifactError(
            f"the tokenizer has {n} ids but the model only {vocab_size}: the tokenizer does not "
            "belong to this model"
        )
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    token_types = [types.get(i, 5) for i in range(vocab_size)]  # UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {t: i for i, t in enumerate(tokens) if token_types[i] != 5}
    return {"tokens": tokens, "types": token_types, "merges": merges, "ids": ids}


def special_ids(
    specials: SpecialTokens, vocab: Mapping[str, Any], pad: str | None = None
) -> dict[str, int]:
    """GGUF metadata key -> token id: each role of `specials` the vocabulary holds, and the pad
    token (`pad` when the vocabulary has it, else eos, as albor's tokenizers double it)."""
    n = len(vocab["tokens"])
    out = {GGUF_KEYS[r]: i for r, i in specials.ids.items() if 0 <= i < n}
    ids: Mapping[str, int] = vocab["ids"]
    if pad is not None and pad in ids:
        out[PAD_KEY] = ids[pad]
    elif GGUF_KEYS["eos"] in out:
        out[PAD_KEY] = out[GGUF_KEYS["eos"]]
    return out


def add_tokenizer(w: Any, vocab: Mapping[str, Any], ids: Mapping[str, int]) -> None:
    """Write the vocabulary and the special ids (`special_ids`) with gguf writer `w`."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(GPT2_PRE)
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    for key, i in ids.items():
        w.add_uint32(key, i)
    eos = ids.get(GGUF_KEYS["eos"])
    if eos is not None:
        # No BOS is ever added; naming EOS keeps llama.cpp from picking its gpt2 default (11).
        w.add_uint32(BOS_KEY, eos)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
