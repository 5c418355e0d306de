"""GGUF files in llama.cpp: every format loads, tokenizes real text exactly as HF tokenizers, and
the F16 file gives albor's logits; generation, errors and other architectures."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from albor.data.bpe import plain_text
from albor.errors import ArtifactError, ConfigError
from albor.infer.engine import generate
from albor.infer.llamacpp import (
    LlamaCppModel,
    _model_params,
    cpu_has_amx,
    load_settings,
    pick_token,
)
from albor.model.gguf import quantize_gguf, read_tensor_types, write_gguf
from albor.model.gguf_layout import tensor_plan
from albor.model.hf import load_config, load_pretrained
from helpers import STDLIB, STDLIB_SAMPLE

pytestmark = pytest.mark.llamacpp

FORMATS = ("f16", "q8_0", "q4_0", "q4_k_m")
EDGE_TEXTS = [
    "<|fim_prefix|>def f(x):\n    <|fim_suffix|>\n    return y<|fim_middle|>y = x<|endoftext|>",
    "a<|endoftext|>b<|fim_pad|><|fim_pad|>",
    "<|endoftext",  # an unfinished special token is plain text
    "s = 'héllo wörld ñ ß 日本語 한국어 Ελληνικά кириллица 🐍🚀 \u200b \u00a0'\n",
    "x = 1\r\n\r\ny = 2\r\n\tz = 3\t\t\n",
    "    " * 20 + "pass\n\n\n\n" + " " * 7 + "\n \n  \n",
    "it's they're we've I'm you'll he'd 's 't\n",
    "numbers 0123456789 3.14e-10 0x1F ①②③ ٣٤٥ \n",
    "",
    "\x00\x01\x7f control chars",
]


@pytest.fixture(scope="module")
def ggufs(trained_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    paths = {}
    for fmt in ("f16", "q8_0", "q4_0"):
        paths[fmt] = write_gguf(trained_model, root / f"m-{fmt}.gguf", fmt).path
    paths["q4_k_m"] = quantize_gguf(paths["f16"], root / "m-q4_k_m.gguf", threads=1).path
    return paths


@pytest.fixture(scope="module")
def tok(trained_model: Path) -> Tokenizer:
    return Tokenizer.from_file(str(trained_model / "tokenizer.json"))


@pytest.fixture(scope="module")
def f16(ggufs: dict[str, Path]) -> Iterator[LlamaCppModel]:
    m = LlamaCppModel(ggufs["f16"], n_threads=1, logits_all=True)
    yield m
    m.close()


def _stdlib_texts() -> list[str]:
    return [(STDLIB / name).read_text(encoding="utf-8") for name in STDLIB_SAMPLE[:10]]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_loads_and_tokenizes_like_hf(
    fmt: str, ggufs: dict[str, Path], tok: Tokenizer
) -> None:
    plain = plain_text(tok)
    with LlamaCppModel(ggufs[fmt], n_threads=1) as m:
        assert m.n_vocab == tok.get_vocab_size() and m.n_ctx == 128
        for text in _stdlib_texts() + EDGE_TEXTS:
            ids = tok.encode(text, add_special_tokens=False).ids
            assert m.tokenize(text) == ids, text[:60]
            assert m.tokenize(text, special=False) == plain.encode(text).ids, text[:60]
            assert m.detokenize(ids) == text == tok.decode(ids, skip_special_tokens=False)
        assert m.detokenize([0, 1]) == "<|endoftext|><|fim_prefix|>"
        assert m.detokenize([0, 1], special=False) == ""
        for special in ("<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"):
            assert m.token_id(special) == tok.token_to_id(special)
        assert m.token_id("def main():\n    pass") is None


def test_q4_k_m_types_are_the_ones_plan_expects(
    trained_model: Path, ggufs: dict[str, Path]
) -> None:
    expected = {e.name: e.type for e in tensor_plan(load_config(trained_model), "q4_k_m")}
    assert read_tensor_types(ggufs["q4_k_m"]) == expected


def _windows(tok: Tokenizer, n: int = 32, length: int = 64) -> list[list[int]]:
    stream = plain_text(tok).encode("".join(_stdlib_texts())).ids
    starts = np.linspace(0, len(stream) - length, n).astype(int)
    return [stream[s : s + length] for s in starts]


def test_f16_top1_and_logits_match_albor(
    trained_model: Path, f16: LlamaCppModel, tok: Tokenizer
) -> None:
    model, _ = load_pretrained(trained_model)
    windows = _windows(tok)
    with torch.no_grad():
        ours = model(torch.tensor(windows)).numpy()
    theirs = np.stack([f16.logits(w) for w in windows])
    # The next token after every prompt is albor's, and every logit is within fp16 noise.
    assert (theirs[:, -1].argmax(-1) == ours[:, -1].argmax(-1)).all()
    assert np.abs(theirs - ours).max() < 0.05
    # At every position: the same token, or one albor scores within 1e-3 of its best (a tie).
    picked = theirs.argmax(-1)
    gap = ours.max(-1) - np.take_along_axis(ours, picked[..., None], -1)[..., 0]
    assert (gap <= 1e-3).all()
    for w, row in zip(windows[:4], theirs[:4], strict=True):  # the KV-cache path agrees
        np.testing.assert_allclose(f16.next_logits(w[:40]), row[39], atol=1e-4)
        np.testing.assert_allclose(f16.next_logits(w), row[-1], atol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS[1:])
def test_each_quantized_format_runs_a_forward_pass(
    fmt: str, ggufs: dict[str, Path], f16: LlamaCppModel, tok: Tokenizer
) -> None:
    """Quantized weights go through llama.cpp's matmul kernels of this CPU (on AMX CPUs, the
    ones albor keeps them to): finite logits, mostly the F16 file's top-1."""
    windows = _windows(tok, n=4)
    with LlamaCppModel(ggufs[fmt], n_threads=1, logits_all=True) as m:
        theirs = np.stack([m.logits(w) for w in windows])
    assert np.isfinite(theirs).all()
    full = np.stack([f16.logits(w) for w in windows])
    agree = (theirs.argmax(-1) == full.argmax(-1)).mean()
    assert agree >= (0.9 if fmt == "q8_0" else 0.5), agree


def test_amx_cpus_load_without_extra_buffer_types(tmp_path: Path) -> None:
    amx, plain = tmp_path / "amx", tmp_path / "plain"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_int8 amx_tile\n")
    plain.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\nbugs\t\t: amx_int8\n")
    assert cpu_has_amx(amx) and not cpu_has_amx(plain)
    assert not cpu_has_amx(tmp_path / "missing")
    assert load_settings() == ({"use_extra_bufts": False} if cpu_has_amx() else {})

    import llama_cpp

    module = llama_cpp.llama_cpp
    default = module.llama_model_default_params
    known = {name for name, *_ in module.llama_model_params._fields_}
    if "use_extra_bufts" not in known:
        pytest.skip("this llama-cpp-python has no use_extra_bufts")
    assert default().use_extra_bufts
    with _model_params(llama_cpp, use_extra_bufts=False, not_a_field=1):
        assert not module.llama_model_default_params().use_extra_bufts
    assert module.llama_model_default_params is default  # restored
    with pytest.raises(RuntimeError), _model_params(llama_cpp, use_extra_bufts=False):
        raise RuntimeError("a failed load")
    assert module.llama_model_default_params is default


def test_generation_matches_albor_engine(
    trained_model: Path, f16: LlamaCppModel, tok: Tokenizer
) -> None:
    model, _ = load_pretrained(trained_model)
    eos = tok.token_to_id("<|endoftext|>")
    for prompt in (w[:24] for w in _windows(tok, n=4)):
        ours = list(generate(model, prompt, max_new_tokens=30, stop_token_ids=(eos,)))
        assert list(f16.generate(prompt, max_new_tokens=30, stop_token_ids=(eos,))) == ours
    # Two interleaved streams each see only their own sequence.
    a, b = _windows(tok, n=2)
    alone = list(f16.generate(a[:10], max_new_tokens=8))
    ga, gb = f16.generate(a[:10], max_new_tokens=8), f16.generate(b[:10], max_new_tokens=8)
    mixed = [x for pair in zip(ga, gb, strict=True) for x in pair]
    assert mixed[0::2] == alone


def test_sampling_is_seeded_and_stops(f16: LlamaCppModel, tok: Tokenizer) -> None:
    prompt = _windows(tok, n=1)[0][:16]

    def sample(seed: int) -> list[int]:
        return list(
            f16.generate(prompt, max_new_tokens=12, temperature=1.0, top_k=40, top_p=0.9, seed=seed)
        )

    assert sample(1) == sample(1) != sample(2)
    greedy = list(f16.generate(prompt, max_new_tokens=10))
    stopped = list(f16.generate(prompt, max_new_tokens=10, stop_token_ids=(greedy[4],)))
    assert stopped == greedy[: greedy.index(greedy[4])]
    # The context (128) ends generation; a longer prompt keeps its last n_ctx tokens.
    assert len(list(f16.generate(prompt, max_new_tokens=500))) == 128 - len(prompt)
    long = _windows(tok, n=1, length=200)[0]
    assert list(f16.generate(long, max_new_tokens=1)) == [
        int(f16.next_logits(long[-128:]).argmax())
    ]


def test_pick_token_cuts() -> None:
    logits = np.array([0.0, 5.0, 4.9, -3.0], dtype=np.float32)
    assert pick_token(logits) == 1
    rng = np.random.default_rng(0)
    top1 = {pick_token(logits, temperature=5.0, top_k=1, rng=rng) for _ in range(50)}
    assert top1 == {1}
    nucleus = {pick_token(logits, temperature=1.0, top_p=0.5, rng=rng) for _ in range(200)}
    assert nucleus == {1}  # token 1 alone holds 52% of the mass
    wider = {pick_token(logits, temperature=1.0, top_p=0.9, rng=rng) for _ in range(200)}
    assert wider == {1, 2}  # tokens 0 and 3 lie beyond the nucleus


def test_errors_name_the_file_and_the_fix(
    tmp_path: Path, ggufs: dict[str, Path], f16: LlamaCppModel
) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        LlamaCppModel(tmp_path / "missing.gguf")
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ArtifactError, match="not a GGUF file"):
        LlamaCppModel(tmp_path / "model.safetensors")
    with pytest.raises(ArtifactError, match="is a directory"):
        LlamaCppModel(tmp_path)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(ggufs["f16"].read_bytes()[:5000])
    with pytest.raises(ArtifactError, match="could not load"):
        LlamaCppModel(broken)
    with pytest.raises(ConfigError, match="exceed the context"):
        f16.next_logits(list(range(129)))
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        f16.next_logits([5, 512])
    with pytest.raises(ConfigError, match="temperature"):
        f16.generate([1], max_new_tokens=1, temperature=-1)
    with LlamaCppModel(ggufs["q8_0"], n_ctx=32) as small:
        assert small.n_ctx == 32
        with pytest.raises(ConfigError, match="logits_all"):
            small.logits([1, 2])


@pytest.mark.parametrize("overrides", [{"qkv_bias": True}, {"tie_embeddings": False}])
def test_other_layouts_give_albors_logits(
    trained_model: Path, tmp_path: Path, overrides: dict[str, bool]
) -> None:
    """Qwen2 (q/k/v bias, NEOX RoPE in llama.cpp) and an untied output head."""
    from albor.model.gpt import GPT
    from albor.model.hf import save_pretrained
    from albor.model.presets import preset

    cfg = preset("tiny", **overrides)
    torch.manual_seed(1)
    model = GPT(cfg).eval()
    with torch.no_grad():  # make biases and norms matter
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    save_pretrained(model, cfg, tmp_path, eos_token_id=0)
    shutil.copyfile(trained_model / "tokenizer.json", tmp_path / "tokenizer.json")
    path = write_gguf(tmp_path, tmp_path / "m.gguf", "f32").path
    ids = list(range(5, 69))
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    with LlamaCppModel(path, n_threads=1, logits_all=True) as m:
        np.testing.assert_allclose(m.logits(ids), ours, atol=1e-3)


def test_missing_llama_cpp_names_the_install(
    ggufs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what `import` sees when not installed
    with pytest.raises(ArtifactError, match="pip install llama-cpp-python"):
        LlamaCppModel(ggufs["f16"])
