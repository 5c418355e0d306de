"""GGUF files for llama.cpp, written by albor itself from a checkpoint directory, and read back.

albor writes the file with the `gguf` package: architecture `llama` (or `qwen2` when the q/k/v
projections carry a bias), the hyper-parameters llama.cpp reads, the tokenizer
(`albor.model.gguf_vocab`: vocabulary, merges, token types, pre-tokenizer, the eos / pad / FIM ids
of the model's tokenizer) and the tensors under llama.cpp's names and types
(`albor.model.gguf_layout`).

F32, F16, BF16, Q8_0 and Q4_0 are written here (the quantized types with `gguf.quants`, which
mirrors ggml's reference quantizers); Q4_K_M is made from an F16 file by llama.cpp's own quantizer
through llama-cpp-python, optionally with an importance matrix (`quantize_gguf(imatrix=...)`:
per GGUF tensor name, the mean square of each input column's activations on calibration text,
the figure llama.cpp's `llama-imatrix` collects; the quantizer then spends its precision on the
columns that carry the most signal). A tensor whose rows do not split into the type's blocks
(32 values for Q8_0 and Q4_0) is stored as F16 instead, and the report lists it.

The checkpoint may be an albor pretrain output or any transformers Llama / Qwen2 directory with
`config.json`, safetensors weights (single or sharded) and a byte-level BPE `tokenizer.json`.
The pure parts, for `plan`, live in `gguf_layout` and `gguf_vocab`; their names are importable
from here too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from albor.errors import ArtifactError, ConfigError
from albor.model.config import ModelConfig
from albor.model.gguf_layout import (
    ALL_TYPES,
    BLOCKS,
    LLAMACPP_TYPES,
    WRITTEN_TYPES,
    TensorEntry,
    architecture,
    estimate_bytes,
    expected_shapes,
    fallbacks,
    gguf_name,
    tensor_plan,
)
from albor.model.gguf_vocab import (
    GPT2_PRE,
    add_tokenizer,
    check_tokenizer,
    gguf_vocab,
    read_tokenizer_json,
    special_ids,
)

__all__ = [
    "ALL_TYPES",
    "BLOCKS",
    "GGUF_INSTALL",
    "GPT2_PRE",
    "LLAMACPP_TYPES",
    "WRITTEN_TYPES",
    "GGUFFile",
    "TensorEntry",
    "architecture",
    "check_tokenizer",
    "estimate_bytes",
    "expected_shapes",
    "fallbacks",
    "gguf_name",
    "gguf_vocab",
    "permute_for_llama",
    "quantize_gguf",
    "quiet_native_stderr",
    "read_metadata",
    "read_tensor_types",
    "read_tokenizer_json",
    "require_llama_cpp",
    "special_ids",
    "tensor_plan",
    "write_gguf",
]

GGUF_INSTALL = "pip install gguf llama-cpp-python (both are albor dependencies)"

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

    from albor.model.hf import weight_files

    wanted = expected_shapes(cfg)
    found: dict[str, np.ndarray] = {}
    for fname, names in weight_files(directory).items():
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


_FILE_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q4_0": "MOSTLY_Q4_0",
}


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
    from albor.data.bpe import TOKENIZER_JSON, hf_special_tokens
    from albor.model.hf import load_config
    from albor.model.load import load_model_tokenizer
    from albor.model.special_tokens import model_special_tokens
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
        raise ArtifactError(f"{model_dir / TOKENIZER_JSON}: {'; '.join(problems)}")
    vocab = gguf_vocab(tok, cfg.vocab_size)
    specials = model_special_tokens(load_model_tokenizer(model_dir), model_dir)
    ids = special_ids(specials, vocab, hf_special_tokens(model_dir)["pad_token"])
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
        add_tokenizer(w, vocab, ids)
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


def _imatrix_array(imatrix: Mapping[str, np.ndarray]) -> tuple[Any, list[Any]]:
    """llama.cpp's `llama_model_imatrix_data` array, ended by an entry whose name is NULL, and
    the buffers it points into (kept alive by the caller until the quantizer returns)."""
    llama_cpp = require_llama_cpp()
    entry = llama_cpp.llama_model_imatrix_data
    array = (entry * (len(imatrix) + 1))()
    keep: list[Any] = []
    for i, (name, values) in enumerate(imatrix.items()):
        data = np.ascontiguousarray(values, dtype=np.float32)
        if not np.isfinite(data).all():
            raise ArtifactError(f"importance matrix of {name} holds non-finite values")
        keep += [data, name.encode()]
        array[i].name = keep[-1]
        array[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        array[i].size = data.size
    array[len(imatrix)].name = None
    return array, keep


def quantize_gguf(
    src: Path,
    out: Path,
    qtype: str = "q4_k_m",
    *,
    threads: int | None = None,
    imatrix: Mapping[str, np.ndarray] | None = None,
) -> GGUFFile:
    """Quantize an F16 (or F32) GGUF file with llama.cpp's quantizer into `out` (atomically).

    `imatrix` (GGUF tensor name -> mean squared activation of each input column) is handed to
    the quantizer as llama.cpp's `llama-quantize --imatrix` would.

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
    keep: list[Any] = []
    if imatrix:
        array, keep = _imatrix_array(imatrix)
        params.imatrix = ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(array)
    with atomic_path(Path(out)) as tmp:
        with quiet_native_stderr():
            rc = llama_cpp.llama_model_quantize(
                str(src).encode(), str(tmp).encode(), ctypes.byref(params)
            )
        if rc != 0:
            raise ArtifactError(f"llama.cpp's quantizer failed on {src} (return code {rc})")
    del keep  # the quantizer has copied the importance matrix
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
