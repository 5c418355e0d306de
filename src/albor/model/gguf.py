"""GGUF files for llama.cpp, written by albor itself from a checkpoint directory.

llama.cpp's own converter recognises a BPE tokenizer by the hash of its pre-tokenizer output and
refuses the ones it does not know, so albor writes the file with the `gguf` package: architecture
`llama` (or `qwen2` when the q/k/v projections carry a bias), the hyper-parameters llama.cpp reads,
the vocabulary with merges and token types, the pre-tokenizer named after the split regex the
tokenizer was trained with (ByteLevel's GPT-2 regex is `gpt-2`), the EOS / pad / FIM token ids,
and the tensors under llama.cpp's names.

F32, F16, Q8_0 and Q4_0 are written here (the quantized types with `gguf.quants`, which mirrors
ggml's reference quantizers); Q4_K_M is made from an F16 file by llama.cpp's own quantizer through
llama-cpp-python. A tensor whose rows do not split into the type's blocks (32 values for Q8_0 and
Q4_0) is stored as F16 instead, and the report lists it.

The checkpoint may be an albor pretrain output or any transformers Llama / Qwen2 directory with
`config.json`, safetensors weights (single or sharded) and a byte-level BPE `tokenizer.json`.
`tensor_plan`, `check_tokenizer` and `estimate_bytes` are pure, for `plan`; only the writers need
the `gguf` package.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from albor.data.bpe import EOS
from albor.errors import ArtifactError, ConfigError
from albor.model.config import ModelConfig

GGUF_INSTALL = "pip install gguf llama-cpp-python (both are albor dependencies)"

WRITTEN_TYPES = ("f32", "f16", "q8_0", "q4_0")
"""Types the `gguf` package writes directly."""
LLAMACPP_TYPES = ("q4_k_m",)
"""Types made by llama.cpp's quantizer from an F16 file."""
ALL_TYPES = WRITTEN_TYPES + LLAMACPP_TYPES

# ggml type name -> (values per block, bytes per block): ggml's own table, copied so that `plan`
# can size a file without importing the optional gguf package.
BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q5_0": (32, 22),
    "Q4_K": (256, 144),
    "Q6_K": (256, 210),
}
_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}  # llama.cpp's substitutes for rows not of 256
_ALIGNMENT = 32  # GGUF's default tensor data alignment

GPT2_PRE = "gpt-2"
FIM_TOKENS = {
    "fim_pre_token_id": "<|fim_prefix|>",
    "fim_suf_token_id": "<|fim_suffix|>",
    "fim_mid_token_id": "<|fim_middle|>",
    "fim_pad_token_id": "<|fim_pad|>",
}


# ---------------------------------------------------------------------------------------------
# Tensor names and types (pure)


_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of a transformers Llama / Qwen2 tensor; ArtifactError if unknown."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"blk.{int(parts[2])}.{_LAYER_NAMES[parts[3]]}"
    raise ArtifactError(f"tensor {hf_name!r} has no llama.cpp name: not a Llama / Qwen2 weight")


def architecture(cfg: ModelConfig) -> str:
    """`qwen2` when q/k/v carry a bias (Qwen2's layout), else `llama`."""
    return "qwen2" if cfg.qkv_bias else "llama"


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape (out, in) of every weight the file holds, in GGUF order."""
    h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        layer: dict[str, tuple[int, ...]] = {
            "input_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q),
            "post_attention_layernorm.weight": (h,),
            "mlp.gate_proj.weight": (inter, h),
            "mlp.up_proj.weight": (inter, h),
            "mlp.down_proj.weight": (h, inter),
        }
        if cfg.qkv_bias:
            layer.update(
                {
                    "self_attn.q_proj.bias": (q,),
                    "self_attn.k_proj.bias": (kv,),
                    "self_attn.v_proj.bias": (kv,),
                }
            )
        shapes.update({p + k: v for k, v in layer.items()})
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a GGUF file: names, numpy shape (out, in), ggml type and why, if not the
    file's main type."""

    hf_name: str
    name: str
    shape: tuple[int, ...]
    type: str
    note: str = ""

    @property
    def nbytes(self) -> int:
        per_block, block_bytes = BLOCKS[self.type]
        n = int(np.prod(self.shape))
        return n // per_block * block_bytes


def _use_more_bits(i: int, n: int) -> bool:
    # llama.cpp's rule for the layers whose attn_v / ffn_down Q4_K_M keeps at Q6_K.
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fit(wanted: str, cols: int) -> tuple[str, str]:
    """The type a row of `cols` values can take (llama.cpp's substitutes), and the note."""
    got = wanted
    if cols % BLOCKS[got][0] != 0 and got in _FALLBACK:
        got = _FALLBACK[got]
    if cols % BLOCKS[got][0] != 0:
        got = "F16"
    if got == wanted:
        return got, ""
    return got, f"{cols} values per row, not a multiple of {BLOCKS[wanted][0]}: {got}"


def tensor_plan(cfg: ModelConfig, qtype: str) -> list[TensorEntry]:
    """The tensors of a `qtype` file and their ggml types. For `q4_k_m` the types are what
    llama.cpp's quantizer is expected to choose (the real ones come from the written file)."""
    if qtype not in ALL_TYPES:
        raise ConfigError(f"unknown GGUF type {qtype!r}: choose one of {', '.join(ALL_TYPES)}")
    head = "lm_head.weight" if not cfg.tie_embeddings else "model.embed_tokens.weight"
    entries = []
    for hf_name, shape in expected_shapes(cfg).items():
        name = gguf_name(hf_name)
        if len(shape) == 1 or qtype == "f32":
            entries.append(TensorEntry(hf_name, name, shape, "F32"))
            continue
        cols = shape[-1]
        note = ""
        if qtype == "f16":
            wanted = "F16"
        elif qtype == "q8_0":
            wanted = "Q8_0"
        elif qtype == "q4_0":
            # llama.cpp's quantizer keeps the output head above the file's type; so do we.
            wanted = "Q8_0" if hf_name == head else "Q4_0"
            note = "output head kept at Q8_0" if hf_name == head else ""
        else:
            layer = int(hf_name.split(".")[2]) if hf_name.startswith("model.layers.") else -1
            more = layer >= 0 and _use_more_bits(layer, cfg.num_layers)
            q6 = hf_name == head or (
                more and hf_name.endswith(("v_proj.weight", "down_proj.weight"))
            )
            wanted = "Q6_K" if q6 else "Q4_K"
        got, fit_note = _fit(wanted, cols)
        entries.append(TensorEntry(hf_name, name, shape, got, fit_note or note))
    return entries


def fallbacks(entries: Sequence[TensorEntry]) -> list[str]:
    """The tensors stored in another type than asked because their rows do not split into
    blocks, each as `name (reason)`."""
    return [f"{e.name} ({e.note})" for e in entries if "not a multiple" in e.note]


def estimate_bytes(entries: Sequence[TensorEntry], vocab: Mapping[str, Any] | None = None) -> int:
    """Size of the file: tensor data with alignment, plus tensor infos and the vocabulary."""
    size = 4096  # header and scalar metadata
    for e in entries:
        size += e.nbytes + _ALIGNMENT + len(e.name) + 40
    if vocab is not None:
        size += sum(len(t.encode()) + 12 for t in vocab["tokens"])
        size += sum(len(m.encode()) + 8 for m in vocab["merges"])
    return size


# ---------------------------------------------------------------------------------------------
# Tokenizer (pure)


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
    data: Mapping[str, Any], vocab: Mapping[str, Any], directory: Path | None
) -> dict[str, int]:
    """eos / pad / FIM ids; EOS from tokenizer_config.json when present, else <|endoftext|>."""
    ids: dict[str, int] = vocab["ids"]
    eos_name = EOS
    pad_name: str | None = None
    cfg_path = directory / "tokenizer_config.json" if directory is not None else None
    if cfg_path is not None and cfg_path.is_file():
        with contextlib.suppress(OSError, ValueError):
            tc = json.loads(cfg_path.read_text(encoding="utf-8"))
            eos = tc.get("eos_token")
            eos_name = eos.get("content", eos_name) if isinstance(eos, dict) else eos or eos_name
            pad = tc.get("pad_token")
            pad_name = pad.get("content") if isinstance(pad, dict) else pad
    out: dict[str, int] = {}
    if eos_name in ids:
        out["eos_token_id"] = ids[eos_name]
    if pad_name is not None and pad_name in ids:
        out["padding_token_id"] = ids[pad_name]
    elif "eos_token_id" in out:
        out["padding_token_id"] = out["eos_token_id"]
    for key, token in FIM_TOKENS.items():
        if token in ids:
            out[key] = ids[token]
    return out


# ---------------------------------------------------------------------------------------------
# Writing


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise ArtifactError(f"writing GGUF needs the gguf package: {GGUF_INSTALL}") from e
    return gguf


def permute_for_llama(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of a q or k projection (or bias) from HF's rotate-half RoPE layout (the
    two halves of each head rotate together) to llama.cpp's `llama` layout (adjacent pairs
    rotate together): exactly the permutation of llama.cpp's converter (`LlamaModel.permute`)."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _iter_weights(directory: Path, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) of every weight, read one at a time from the safetensors."""
    import torch
    from safetensors import safe_open

    from albor.model.hf import _weight_files

    wanted = expected_shapes(cfg)
    found: dict[str, np.ndarray] = {}
    for fname, names in _weight_files(directory).items():
        path = directory / fname
        if not path.exists():
            raise ArtifactError(f"{path} is named in the safetensors index but missing")
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                if name in wanted:
                    found[name] = f.get_tensor(name).to(torch.float32).numpy()
    missing = [n for n in wanted if n not in found]
    if missing:
        raise ArtifactError(f"weights in {directory} lack {', '.join(missing[:5])}")
    for name, shape in wanted.items():
        if tuple(found[name].shape) != shape:
            raise ArtifactError(
                f"{name} in {directory} has shape {tuple(found[name].shape)}, config.json "
                f"implies {shape}"
            )
        yield name, found.pop(name)


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


@dataclass
class GGUFFile:
    """What a writer produced: the file, its size and the type of every tensor."""

    path: Path
    qtype: str
    bytes: int
    types: dict[str, str]
    fallbacks: list[str] = field(default_factory=list)

    def type_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.types.values()).items()))

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "bytes": self.bytes,
            "tensor_types": self.type_counts(),
            "fallbacks": list(self.fallbacks),
        }


def write_gguf(
    model_dir: Path, out: Path, qtype: str = "f16", *, name: str | None = None
) -> GGUFFile:
    """Write the checkpoint in `model_dir` as a `qtype` GGUF file at `out` (atomically)."""
    from albor.artifact import atomic_path
    from albor.model.hf import load_config
    from albor.progress import track

    if qtype not in WRITTEN_TYPES:
        raise ConfigError(
            f"write_gguf writes {', '.join(WRITTEN_TYPES)}; {qtype!r} comes from quantize_gguf"
        )
    gguf = _require_gguf()
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    tok = read_tokenizer_json(model_dir)
    problems = check_tokenizer(tok)
    if problems:
        raise ArtifactError(f"{model_dir / 'tokenizer.json'}: {'; '.join(problems)}")
    vocab = gguf_vocab(tok, cfg.vocab_size)
    entries = {e.hf_name: e for e in tensor_plan(cfg, qtype)}
    arch = architecture(cfg)
    with atomic_path(Path(out)) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(name or model_dir.name)
        w.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[qtype])))
        if qtype in ("q8_0", "q4_0"):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_heads)
        w.add_head_count_kv(cfg.num_kv_heads)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        _add_tokenizer(w, gguf, tok, vocab, model_dir)
        types: dict[str, str] = {}
        weights = _iter_weights(model_dir, cfg)
        for hf_name, array in track(weights, f"writing {Path(out).name}", total=len(entries)):
            e = entries[hf_name]
            if arch == "llama" and ".self_attn.q_proj." in hf_name:
                array = permute_for_llama(array, cfg.num_heads)
            elif arch == "llama" and ".self_attn.k_proj." in hf_name:
                array = permute_for_llama(array, cfg.num_kv_heads)
            ggml_type = getattr(gguf.GGMLQuantizationType, e.type)
            data = gguf.quants.quantize(np.ascontiguousarray(array), ggml_type)
            w.add_tensor(e.name, data, raw_dtype=ggml_type)
            types[e.name] = e.type
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    out = Path(out)
    return GGUFFile(out, qtype, out.stat().st_size, types, fallbacks(list(entries.values())))


def _add_tokenizer(
    w: Any, gguf: Any, tok: Mapping[str, Any], vocab: Mapping[str, Any], model_dir: Path
) -> None:
    keys = gguf.Keys.Tokenizer
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(GPT2_PRE)
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    ids = special_ids(tok, vocab, model_dir)
    if "eos_token_id" in ids:
        w.add_eos_token_id(ids["eos_token_id"])
        # No BOS is ever added; naming EOS keeps llama.cpp from picking its gpt2 default (11).
        w.add_bos_token_id(ids["eos_token_id"])
    if "padding_token_id" in ids:
        w.add_pad_token_id(ids["padding_token_id"])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    for key, const in (
        ("fim_pre_token_id", keys.FIM_PRE_ID),
        ("fim_suf_token_id", keys.FIM_SUF_ID),
        ("fim_mid_token_id", keys.FIM_MID_ID),
        ("fim_pad_token_id", keys.FIM_PAD_ID),
    ):
        if key in ids:
            w.add_uint32(const, ids[key])


def require_llama_cpp() -> Any:
    """The llama_cpp module; ArtifactError naming the install command when it is missing."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ArtifactError(
            f"this needs llama-cpp-python: pip install llama-cpp-python ({GGUF_INSTALL})"
        ) from e
    except OSError as e:  # the shared library failed to load
        raise ArtifactError(
            f"llama-cpp-python is installed but its library does not load: {e}; reinstall it "
            "with pip install --force-reinstall llama-cpp-python"
        ) from e
    return llama_cpp


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence llama.cpp's per-tensor log lines, which it writes straight to file descriptor 2."""
    import sys

    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield  # stderr is not a real file (captured): nothing reaches a terminal anyway
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def quantize_gguf(
    src: Path, out: Path, qtype: str = "q4_k_m", *, threads: int | None = None
) -> GGUFFile:
    """Quantize an F16 (or F32) GGUF file with llama.cpp's quantizer into `out` (atomically).

    llama.cpp picks per tensor: K-quants need rows of 256 values, so for narrower rows it falls
    back (Q4_K to Q5_0, Q6_K to Q8_0, or F16); the types actually written are read back from the
    file and every 2-D tensor not stored as a K-quant is listed in `fallbacks`.
    """
    from albor.artifact import atomic_path

    if qtype not in LLAMACPP_TYPES:
        raise ConfigError(f"quantize_gguf makes {', '.join(LLAMACPP_TYPES)}, not {qtype!r}")
    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = int(threads or 0)
    with atomic_path(Path(out)) as tmp:
        with quiet_native_stderr():
            rc = llama_cpp.llama_model_quantize(
                str(src).encode(), str(tmp).encode(), ctypes.byref(params)
            )
        if rc != 0:
            raise ArtifactError(f"llama.cpp's quantizer failed on {src} (return code {rc})")
    out = Path(out)
    types = read_tensor_types(out)
    fallback = [
        f"{name} ({t})"
        for name, t in types.items()
        if not name.endswith("norm.weight")
        and not name.endswith(".bias")
        and t not in ("Q4_K", "Q6_K")
    ]
    return GGUFFile(out, qtype, out.stat().st_size, types, fallback)


# ---------------------------------------------------------------------------------------------
# Reading


def read_tensor_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> ggml type name, from the file's tensor infos."""
    gguf = _require_gguf()
    reader = gguf.GGUFReader(str(path))
    return {t.name: t.tensor_type.name for t in reader.tensors}


def read_metadata(path: Path) -> dict[str, Any]:
    """Every scalar and string metadata value of a GGUF file (arrays as their length), for
    inspection and tests."""
    gguf = _require_gguf()
    reader = gguf.GGUFReader(str(path))
    out: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            out[key] = len(f.data)
        else:
            out[key] = f.contents()
    return out
