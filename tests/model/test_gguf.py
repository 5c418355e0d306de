"""GGUF writing: metadata and tensors read back with gguf's own reader, types, block fallbacks,
the RoPE permutation, and the tokenizer rules that decide whether llama.cpp can match."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from albor.errors import ArtifactError
from albor.model.config import ModelConfig
from albor.model.gguf import permute_for_llama, read_metadata, read_tensor_types, write_gguf
from albor.model.gguf_layout import (
    estimate_bytes,
    expected_shapes,
    fallbacks,
    gguf_name,
    tensor_plan,
)
from albor.model.gguf_vocab import check_tokenizer
from albor.model.gpt import apply_rope, rope_cos_sin
from albor.model.hf import load_config
from albor.model.presets import preset


def _tensors(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: t for t in reader.tensors}


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of permute_for_llama."""
    return (
        w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _hf_weights(model_dir: Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our weights under llama.cpp names, q/k in llama.cpp's layout."""
    state = load_file(str(model_dir / "model.safetensors"))
    out = {}
    for name in expected_shapes(cfg):
        w = state[name].float().numpy()
        if ".q_proj." in name:
            w = permute_for_llama(w, cfg.num_heads)
        elif ".k_proj." in name:
            w = permute_for_llama(w, cfg.num_kv_heads)
        out[gguf_name(name)] = w
    return out


def test_metadata_and_tensors_round_trip(trained_model: Path, tmp_path: Path) -> None:
    cfg = load_config(trained_model)
    f32 = write_gguf(trained_model, tmp_path / "m-f32.gguf", "f32")
    f16 = write_gguf(trained_model, tmp_path / "m-f16.gguf", "f16")
    meta = read_metadata(f16.path)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.context_length"] == cfg.max_seq_len
    assert meta["llama.embedding_length"] == cfg.hidden_size
    assert meta["llama.block_count"] == cfg.num_layers
    assert meta["llama.feed_forward_length"] == cfg.intermediate_size
    assert meta["llama.attention.head_count"] == cfg.num_heads
    assert meta["llama.attention.head_count_kv"] == cfg.num_kv_heads
    assert meta["llama.rope.freq_base"] == cfg.rope_theta
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert meta["llama.vocab_size"] == cfg.vocab_size
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.add_bos_token"] is False
    tok = Tokenizer.from_file(str(trained_model / "tokenizer.json"))
    ids = {
        "eos_token_id": "<|endoftext|>",
        "padding_token_id": "<|endoftext|>",
        "fim_pre_token_id": "<|fim_prefix|>",
        "fim_suf_token_id": "<|fim_suffix|>",
        "fim_mid_token_id": "<|fim_middle|>",
        "fim_pad_token_id": "<|fim_pad|>",
    }
    for key, token in ids.items():
        assert meta[f"tokenizer.ggml.{key}"] == tok.token_to_id(token), key

    reader = gguf.GGUFReader(str(f16.path))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert tokens == [tok.id_to_token(i) for i in range(cfg.vocab_size)]
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    assert [t == 3 for t in types] == [tokens[i] in special for i in range(len(tokens))]
    merges = json.loads((trained_model / "tokenizer.json").read_text())["model"]["merges"]
    assert reader.fields["tokenizer.ggml.merges"].contents() == [" ".join(m) for m in merges]

    weights = _hf_weights(trained_model, cfg)
    # Tied embeddings: llama.cpp reads the output head from token_embd, so there is no `output`.
    assert set(_tensors(f16.path)) == set(weights) and "output.weight" not in weights
    for name, t in _tensors(f32.path).items():
        assert t.tensor_type.name == "F32"
        np.testing.assert_array_equal(np.asarray(t.data), weights[name])
    for name, t in _tensors(f16.path).items():
        expected = weights[name]
        if expected.ndim == 1:
            assert t.tensor_type.name == "F32"
            np.testing.assert_array_equal(np.asarray(t.data), expected)
        else:
            assert t.tensor_type.name == "F16"
            np.testing.assert_array_equal(np.asarray(t.data), expected.astype(np.float16))
    q = _tensors(f32.path)["blk.0.attn_q.weight"].data
    state = load_file(str(trained_model / "model.safetensors"))
    np.testing.assert_array_equal(
        _unpermute(np.asarray(q), cfg.num_heads),
        state["model.layers.0.self_attn.q_proj.weight"].numpy(),
    )


def test_permutation_turns_rotate_half_into_adjacent_pairs() -> None:
    """HF's RoPE rotates channel i with i + d/2; llama.cpp's `llama` RoPE rotates 2i with 2i+1.
    Permuting the rows of W must make llama.cpp's rotation of (W' x) the same vectors as HF's
    rotation of (W x), reordered by the same permutation, at every position."""
    cfg = preset("tiny")
    heads, hd = cfg.num_heads, cfg.head_dim
    g = torch.Generator().manual_seed(0)
    w = torch.randn(heads * hd, cfg.hidden_size, generator=g)
    x = torch.randn(5, cfg.hidden_size, generator=g)
    cos, sin = rope_cos_sin(cfg, 3, 5, torch.device("cpu"))
    hf = apply_rope((x @ w.T).view(5, heads, hd).transpose(0, 1), cos, sin)  # (heads, T, hd)

    wp = torch.from_numpy(permute_for_llama(w.numpy(), heads))
    y = (x @ wp.T).view(5, heads, hd).transpose(0, 1)
    pairs = y.reshape(heads, 5, hd // 2, 2)
    c, s = cos[:, : hd // 2], sin[:, : hd // 2]  # frequency j of the pair (2j, 2j+1)
    a, b = pairs[..., 0], pairs[..., 1]
    llama = torch.stack((a * c - b * s, a * s + b * c), dim=-1).reshape(heads, 5, hd)
    order = torch.from_numpy(permute_for_llama(np.arange(hd), 1))
    torch.testing.assert_close(llama, hf[..., order], atol=1e-5, rtol=1e-5)


def test_quantized_types_block_fallbacks_and_error_bounds(
    trained_model: Path, tmp_path: Path
) -> None:
    cfg = load_config(trained_model)  # tiny: FFN width 176 is not a multiple of 32
    weights = _hf_weights(trained_model, cfg)
    for qtype, main in (("q8_0", "Q8_0"), ("q4_0", "Q4_0")):
        out = write_gguf(trained_model, tmp_path / f"m-{qtype}.gguf", qtype)
        plan = tensor_plan(cfg, qtype)
        assert read_tensor_types(out.path) == {e.name: e.type for e in plan} == out.types
        assert out.fallbacks == fallbacks(plan)
        assert [f.split(" ")[0] for f in out.fallbacks] == [
            f"blk.{i}.ffn_down.weight" for i in range(cfg.num_layers)
        ]
        assert all("176 values per row" in f for f in out.fallbacks)
        if qtype == "q4_0":  # the tied output head stays at Q8_0, as llama.cpp's quantizer does
            assert out.types["token_embd.weight"] == "Q8_0"
        assert out.types["blk.0.attn_q.weight"] == main
        # Q8_0 rounds to a step of absmax/127 (error <= half a step, plus the fp16 scale's
        # rounding); Q4_0's step is absmax/8 and its clamp at +7 costs up to a whole step.
        for name, t in _tensors(out.path).items():
            if t.tensor_type.name not in ("Q8_0", "Q4_0"):
                continue
            w = weights[name]
            deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
            blocks = w.reshape(-1, 32)
            amax = np.abs(blocks).max(-1, keepdims=True)
            bound = amax / 127 * 0.57 if t.tensor_type.name == "Q8_0" else amax / 8 * 1.01
            assert (np.abs(deq.reshape(-1, 32) - blocks) <= bound + 1e-8).all(), name
        assert abs(estimate_bytes(plan) - out.bytes) / out.bytes < 0.2


def test_qkv_bias_is_qwen2_without_permutation(trained_model: Path, tmp_path: Path) -> None:
    from albor.model.gpt import GPT
    from albor.model.hf import save_pretrained

    cfg = preset("tiny", qkv_bias=True, tie_embeddings=False)
    torch.manual_seed(0)
    model = GPT(cfg)
    save_pretrained(model, cfg, tmp_path, eos_token_id=0)
    shutil.copyfile(trained_model / "tokenizer.json", tmp_path / "tokenizer.json")
    out = write_gguf(tmp_path, tmp_path / "q.gguf", "f32")
    assert read_metadata(out.path)["general.architecture"] == "qwen2"
    t = _tensors(out.path)
    assert {"output.weight", "blk.0.attn_q.bias", "blk.1.attn_k.bias"} <= set(t)
    np.testing.assert_array_equal(  # qwen2 is NEOX RoPE in llama.cpp: HF's layout as it is
        np.asarray(t["blk.0.attn_q.weight"].data),
        model.model.layers[0].self_attn.q_proj.weight.detach().numpy(),
    )


def _tokenizer_json(trained_model: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((trained_model / "tokenizer.json").read_text())
    return data


def test_check_tokenizer_accepts_albor_and_refuses_other_pre_tokenizers(
    trained_model: Path,
) -> None:
    good = _tokenizer_json(trained_model)
    assert check_tokenizer(good) == []
    for pre in (
        {"type": "Whitespace"},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}]},
        None,
    ):
        bad = {**good, "pre_tokenizer": pre}
        problems = check_tokenizer(bad)
        assert len(problems) == 1 and "gpt-2" in problems[0], pre
    assert "normalizer" in check_tokenizer({**good, "normalizer": {"type": "NFC"}})[0]
    wordpiece = {**good, "model": {"type": "WordPiece", "vocab": {}}}
    assert "not BPE" in check_tokenizer(wordpiece)[0]


def test_write_refuses_a_tokenizer_llama_cpp_would_split_differently(
    trained_model: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "m"
    shutil.copytree(trained_model, model_dir)
    data = _tokenizer_json(model_dir)
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}
    (model_dir / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"Metaspace.*gpt-2"):
        write_gguf(model_dir, tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(ArtifactError, match=r"config\.json not found"):
        write_gguf(tmp_path, tmp_path / "y.gguf", "f16")
