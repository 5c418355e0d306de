"""export: plan checks, the end-to-end apply with its parity figures, and every parity failure:
each failing condition is built from real components where one can be (a checkpoint, a tokenizer
file) and through one named seam where it cannot; each test names which."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

import albor.model.hf
from albor.data.bpe import EOS, hf_config
from albor.errors import StageFailed
from albor.infer.engine import generate
from albor.infer.llamacpp import LlamaCppModel
from albor.model.hf import load_pretrained
from albor.stage import PlanContext, load_stage, run_stage
from albor.stages import export, split
from helpers import STDLIB, STDLIB_SAMPLE, run, write_corpus_artifact

pytestmark = pytest.mark.llamacpp

GGUF_FILES = ["model-bf16.gguf", "model-f16.gguf"]
HF_FILES = [
    "hf/config.json",
    "hf/generation_config.json",
    "hf/model.safetensors",
    "hf/special_tokens_map.json",
    "hf/tokenizer.json",
    "hf/tokenizer_config.json",
]


def _copy(trained_model: Path, dest: Path) -> Path:
    shutil.copytree(trained_model, dest)
    return dest


def test_plan_checks_and_estimates(trained_model: Path, tmp_path: Path) -> None:
    p = export.plan(export.Config(model=trained_model, output=tmp_path / "out"))
    assert p.ok, p.summary()
    status = {c.name: c.status for c in p.checks}
    assert status["tokenizer"] == "ok" and status["blocks f16"] == "ok"
    assert "bytes_bf16" not in p.estimates  # the default writes hf/ and F16
    e = export.plan(
        export.Config(model=trained_model, output=tmp_path / "out", formats=list(export.FORMATS))
    ).estimates
    assert e["fp32_safetensors_bytes"] == (trained_model / "model.safetensors").stat().st_size
    assert e["bytes_bf16"] == e["bytes_f16"] < e["fp32_safetensors_bytes"]
    assert len(p.actions) == 3
    pending = export.plan(
        export.Config(model=tmp_path / "later", output=tmp_path / "o"),
        PlanContext({"model": "pretrain"}),
    )
    assert pending.ok and "bytes_f16" not in pending.estimates


def test_plan_failures_name_the_fix(
    trained_model: Path, token_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = export.plan(export.Config(model=tmp_path / "nope", output=tmp_path / "o"))
    assert [c.name for c in missing.failures] == ["model"]
    not_a_model = export.plan(export.Config(model=token_data, output=tmp_path / "o"))
    assert [c.name for c in not_a_model.failures] == ["model"]
    assert "config.json" in not_a_model.failures[0].detail

    other = _copy(trained_model, tmp_path / "whitespace")
    data = json.loads((other / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Whitespace"}
    (other / "tokenizer.json").write_text(json.dumps(data))
    p = export.plan(export.Config(model=other, output=tmp_path / "o"))
    assert [c.name for c in p.failures] == ["tokenizer"]
    assert "Whitespace" in p.failures[0].detail and "gpt-2" in p.failures[0].detail

    too_long = export.plan(
        export.Config(model=trained_model, output=tmp_path / "o", prompt_tokens=129)
    )
    assert [c.name for c in too_long.failures] == ["prompt_tokens"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
        no_llama = export.plan(export.Config(model=trained_model, output=tmp_path / "o"))
        assert [c.name for c in no_llama.failures] == ["llama_cpp"]
        assert "llama-cpp-python is not installed" in no_llama.failures[0].detail
        assert "pip install albor" in no_llama.failures[0].detail  # a broken install, no extra
        hf_only = export.Config(model=trained_model, output=tmp_path / "o", formats=["hf"])
        assert export.plan(hf_only).ok
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "transformers", None)
        no_hf = export.plan(export.Config(model=trained_model, output=tmp_path / "o"))
        assert [c.name for c in no_hf.failures] == ["transformers"]
        detail = no_hf.failures[0].detail
        assert "transformers is not installed" in detail and "pip install albor" in detail
        assert "albor[hf]" not in detail

    cfg = tmp_path / "export.yaml"
    cfg.write_text(f"model: {other}\noutput: {tmp_path / 'o'}\n")
    code, out, _ = run(["export", "plan", str(cfg), "--json"], capsys)
    assert code == 1 and json.loads(out)["ok"] is False
    code, _, err = run(["export", "plan", str(cfg), "--set", "formats=[]"], capsys)
    assert code == 2 and "formats" in err


def test_lossy_formats_are_the_quantize_stages(
    trained_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(
        ValueError,
        match=r"quantize makes it: add a quantize stage with variants "
        r"\[gguf-q8_0, gguf-q4_k_m\]",
    ):
        export.Config(model=trained_model, formats=["f16", "q8_0", "q4_k_m"])
    cfg = tmp_path / "export.yaml"
    cfg.write_text(f"model: {trained_model}\noutput: {tmp_path / 'o'}\nformats: [q4_0]\n")
    code, _, err = run(["export", "plan", str(cfg)], capsys)
    assert code == 2 and "variants [gguf-q4_0]" in err and "Traceback" not in err


def test_apply_writes_every_format_with_parity(trained_model: Path, tmp_path: Path) -> None:
    cfg = export.Config(
        model=trained_model, output=tmp_path / "export", threads=1, formats=list(export.FORMATS)
    )
    res = run_stage(load_stage("export"), cfg)
    out = res.output
    assert [o["path"] for o in res.manifest["outputs"]] == GGUF_FILES + HF_FILES
    m = res.manifest["metrics"]
    fp32 = (trained_model / "model.safetensors").stat().st_size
    assert m["fp32_safetensors_bytes"] == fp32
    assert m["parity"]["texts"] == len(export.STDLIB_SAMPLE)
    assert m["parity"]["prompts"] == 32 and m["parity"]["prompt_tokens"] == 64
    for fmt in ("f16", "bf16"):
        f = m["gguf"][fmt]
        assert f["bytes"] == (out / f"model-{fmt}.gguf").stat().st_size
        assert f["reduction_vs_fp32"] == round(fp32 / f["bytes"], 3)
        assert f["tokenization"]["mismatched_texts"] == 0
        assert f["tokenization_plain_text"]["mismatched_texts"] == 0
        assert f["tokenization"]["tokens"] > 10_000
        assert f["top1_positions"] == 32 * 64
    assert m["gguf"]["f16"]["detokenize"]["mismatched_texts"] == 0
    assert m["gguf"]["f16"]["detokenize"]["texts"] == len(export.STDLIB_SAMPLE)
    assert "detokenize" not in m["gguf"]["bf16"]  # one vocabulary: checked on the first file
    assert m["gguf"]["f16"]["top1_agreement_tie_aware"] == 1.0
    assert m["gguf"]["f16"]["max_abs_logit_diff"] < 0.05
    assert m["gguf"]["bf16"]["top1_agreement_tie_aware"] == 1.0
    assert m["gguf"]["bf16"]["tensor_types"]["BF16"] > 0
    assert not m["gguf"]["f16"]["fallbacks"] and not m["gguf"]["bf16"]["fallbacks"]
    assert m["hf"]["generate"]["matching_prompts"] == m["hf"]["generate"]["prompts"] == 4
    assert m["hf"]["tokenizer"]["mismatched_texts"] == 0
    assert "f16" in res.manifest["summary"] and "x smaller" in res.manifest["summary"]
    assert run_stage(load_stage("export"), cfg).status == "up to date"

    # Independently of the stage's own check: transformers loads hf/ and generates albor's tokens.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    theirs = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    auto_tok = AutoTokenizer.from_pretrained(out / "hf")
    tok = Tokenizer.from_file(str(out / "hf" / "tokenizer.json"))
    ours, _ = load_pretrained(trained_model)
    text = (STDLIB / STDLIB_SAMPLE[0]).read_text(encoding="utf-8")
    assert auto_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text).ids
    prompt = [0, *tok.encode("def insort(a, x):\n    ").ids]
    with torch.no_grad():
        got = theirs.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20)
    want = list(generate(ours, prompt, max_new_tokens=20, stop_token_ids=(0,)))
    assert got[0, len(prompt) :].tolist()[: len(want)] == want
    gen = json.loads((out / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 0 and gen["pad_token_id"] == 0


def _split_artifact(tmp_path: Path, tail: str = "") -> Path:
    """A split artifact of the stdlib sample, `tail` appended to every text."""
    texts = [(n, (STDLIB / n).read_text(encoding="utf-8") + tail) for n in STDLIB_SAMPLE]
    corpus = write_corpus_artifact(tmp_path / "corpus", texts)
    cfg = split.Config(input=corpus, output=tmp_path / "split", val=0.3, test=0.1)
    return run_stage(load_stage("split"), cfg).output


def _failure(cfg: export.Config) -> str:
    with pytest.raises(StageFailed) as e:
        run_stage(load_stage("export"), cfg)
    assert cfg.output is not None and not cfg.output.exists()  # no artifact from a failed apply
    return str(e.value)


def test_apply_fails_when_autotokenizer_ids_differ(
    trained_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Real components: a checkpoint whose tokenizer_config.json asks transformers for a prefix
    space that tokenizer.json does not add; the export copies it into hf/ and AutoTokenizer
    then gives other ids than HF tokenizers. Run through the CLI: exit 1, the figure named."""
    model = _copy(trained_model, tmp_path / "prefix_space")
    config = {**hf_config(), "tokenizer_class": "GPT2TokenizerFast", "add_prefix_space": True}
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    cfg = tmp_path / "export.yaml"
    cfg.write_text(f"model: {model}\noutput: {tmp_path / 'o'}\nformats: [hf]\nthreads: 1\n")
    code, _, err = run(["export", "apply", str(cfg)], capsys)
    n = len(export.STDLIB_SAMPLE)
    assert code == 1, err
    assert f"hf: AutoTokenizer ids differ from HF tokenizers' on {n} of {n} texts" in err
    assert "text 0 differs at token 0" in err
    assert "greedy tokens" not in err  # the weights are fine: generation matched
    assert not (tmp_path / "o").exists()


def test_apply_fails_when_transformers_generates_other_tokens(
    trained_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seam: the HF writer (`albor.model.hf.save_pretrained`) is wrapped to negate the final
    norm in hf/, as a writer bug would; transformers really loads and generates from those
    weights, and its greedy tokens are albor's least likely ones."""
    real = albor.model.hf.save_pretrained

    def negated_norm(*args: Any, **kwargs: Any) -> list[Path]:
        written = real(*args, **kwargs)
        (weights,) = (p for p in written if p.name == "model.safetensors")
        state = load_file(str(weights))
        state["model.norm.weight"] = -state["model.norm.weight"]
        save_file(state, str(weights), metadata={"format": "pt"})
        return written

    monkeypatch.setattr(albor.model.hf, "save_pretrained", negated_norm)
    cfg = export.Config(model=trained_model, formats=["hf"], output=tmp_path / "o", threads=1)
    message = _failure(cfg)
    assert "hf: transformers' greedy tokens differ from albor's on 4 of 4 prompts" in message
    assert "AutoTokenizer" not in message  # the tokenizer files are fine


def test_apply_fails_when_llamacpp_tokenizes_differently(
    trained_model: Path, tmp_path: Path
) -> None:
    """Real components: a tokenizer.json whose EOS token strips the spaces before it (`lstrip`),
    which HF tokenizers honours and a GGUF vocabulary cannot carry, and parity texts that hold
    " <|endoftext|>": llama.cpp keeps the space as a token when special tokens are parsed. As
    plain text the spelling is no token for either, so that comparison still matches."""
    model = _copy(trained_model, tmp_path / "lstrip")
    data = json.loads((model / "tokenizer.json").read_text())
    (eos,) = (t for t in data["added_tokens"] if t["content"] == EOS)
    eos["lstrip"] = True
    (model / "tokenizer.json").write_text(json.dumps(data))
    split_dir = _split_artifact(tmp_path, tail=f"\nx = 1 {EOS}\n")
    cfg = export.Config(
        model=model, data=split_dir, formats=["f16"], output=tmp_path / "o", threads=1
    )
    message = _failure(cfg)
    got = re.search(r"f16: llama\.cpp tokenizes (\d+) of (\d+) texts differently", message)
    assert got and got[1] == got[2] and int(got[2]) > 0, message
    assert "texts as plain text differently" not in message
    assert "top-1" not in message  # the weights are fine: F16 agrees everywhere


def test_apply_fails_when_llamacpp_detokenizes_differently(
    trained_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seam: llama.cpp detokenizes a real vocabulary right, so the one method that returns its
    text (`LlamaCppModel.detokenize`) is wrapped to lose the last character of a sequence, as a
    broken byte-to-text step would; tokenization and top-1 run on llama.cpp unchanged."""
    real = LlamaCppModel.detokenize

    def lossy(self: LlamaCppModel, ids: list[int], *, special: bool = True) -> str:
        text = real(self, ids, special=special)
        return text[:-1] if len(ids) > 1 else text

    monkeypatch.setattr(LlamaCppModel, "detokenize", lossy)
    cfg = export.Config(
        model=trained_model, formats=["f16"], output=tmp_path / "o", threads=1, parity_prompts=4
    )
    message = _failure(cfg)
    n = len(export.STDLIB_SAMPLE)
    assert f"f16: llama.cpp detokenizes HF tokenizers' ids of {n} of {n} texts into other " in (
        message
    )
    assert "(text 0 differs at character " in message
    assert "llama.cpp tokenizes" not in message and "top-1" not in message
