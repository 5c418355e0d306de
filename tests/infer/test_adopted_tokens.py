"""A model on an adopted StarCoder-style tokenizer whose special tokens are not albor's: eos `</s>`,
sentinels `<fim_prefix>`, `<fim_middle>`, `<fim_suffix>`, all appended after the merges (ids
400..404, none at albor's 0..4, and no `<|endoftext|>` at all). Every consumer must take the ids
from the tokenizer's recorded roles: the torch engine and `albor complete --suffix`, the GGUF
writer and the llama.cpp backend reading them back, the export stage, HumanEval and infill.

The model is built, not trained: its blocks add nothing to the residual stream and every token's
embedding shares one positive channel on which eos's is largest, so whatever the prompt it
predicts eos, by a wide margin (the same in llama.cpp at F16). A completion that comes back empty
with finish reason "stop" therefore ended at eos because eos is a stop token; were it not, the
text would be `</s></s>...` up to the length limit.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from albor.artifact import atomic_write_json, describe_outputs, outputs_digest
from albor.data.bpe import (
    EOS,
    ROLES_KEY,
    TOKENIZER_CONFIG,
    TOKENIZER_FILES,
    SpecialTokens,
    plain_text,
)
from albor.data.fim import MODES, Mode
from albor.errors import ConfigError
from albor.evals import humaneval as he
from albor.infer import engine
from albor.infer.completion import completions, make_prompt
from albor.infer.engine import TorchBackend
from albor.infer.loader import GGUFBackend, load
from albor.model.gguf import read_metadata, write_gguf
from albor.model.gpt import GPT
from albor.model.hf import save_pretrained
from albor.model.presets import preset
from albor.model.special_tokens import GGUF_KEYS, model_special_tokens
from albor.stage import load_stage, run_stage
from albor.stages import export, split, tokenizer
from helpers import STDLIB, STDLIB_SAMPLE, run, write_corpus_artifact

SPECIALS = {
    "eos": "</s>",
    "fim_prefix": "<fim_prefix>",
    "fim_middle": "<fim_middle>",
    "fim_suffix": "<fim_suffix>",
    "fim_pad": "<fim_pad>",
}
PREFIX, SUFFIX = "def area(r):\n    return ", " * r\n"


@dataclass(frozen=True)
class Adopted:
    model: Path
    tokenizer: Tokenizer
    ids: dict[str, int]

    def fim_ids(self, prefix: str, suffix: str, mode: Mode) -> list[int]:
        """The FIM prompt written out by hand: eos, then the pieces after their sentinels."""
        plain = plain_text(self.tokenizer)
        pieces = {
            "prefix": plain.encode(prefix, add_special_tokens=False).ids,
            "suffix": plain.encode(suffix, add_special_tokens=False).ids,
        }
        order = ("prefix", "suffix") if mode == "psm" else ("suffix", "prefix")
        out = [self.ids["eos"]]
        for slot in order:
            out += [self.ids[f"fim_{slot}"], *pieces[slot]]
        return [*out, self.ids["fim_middle"]]


def _public_tokenizer(directory: Path, texts: list[str]) -> Path:
    """A byte-level BPE of 400 tokens with the specials appended, saved by transformers as a
    downloaded model's tokenizer would be."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIALS.values()]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=SPECIALS["eos"],
        additional_special_tokens=[SPECIALS[r] for r in SPECIALS if r != "eos"],
    )
    fast.save_pretrained(str(directory))
    return directory


def _eos_model(vocab_size: int, eos: int) -> GPT:
    """Predicts eos after any token (see the module docstring)."""
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=vocab_size)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight  # tied: also the output head
        embed[:, 0] = 1.0
        embed[eos, 0] = 3.0
    return model


@pytest.fixture(scope="module")
def adopted(tmp_path_factory: pytest.TempPathFactory) -> Adopted:
    root = tmp_path_factory.mktemp("adopted")
    texts = [(name, (STDLIB / name).read_text(encoding="utf-8")) for name in STDLIB_SAMPLE]
    corpus = write_corpus_artifact(root / "corpus", texts)
    splits = run_stage(
        load_stage("split"), split.Config(input=corpus, output=root / "split", val=0.2, test=0.1)
    ).output
    source = _public_tokenizer(root / "public", [t for _, t in texts])
    tok_dir = run_stage(
        load_stage("tokenizer"),
        tokenizer.Config(input=splits, adopt=source, output=root / "tokenizer"),
    ).output
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    ids = {role: tok.token_to_id(t) for role, t in SPECIALS.items()}
    assert sorted(ids.values()) == list(range(400, 405)) and tok.token_to_id(EOS) is None

    # A checkpoint directory as pretrain leaves it: weights, config, the tokenizer files.
    model_dir = root / "model"
    model = _eos_model(tok.get_vocab_size(), ids["eos"])
    save_pretrained(model, model.cfg, model_dir, eos_token_id=ids["eos"])
    for name in TOKENIZER_FILES:
        shutil.copyfile(tok_dir / name, model_dir / name)
    outputs = describe_outputs(model_dir)
    atomic_write_json(
        model_dir / "manifest.json",
        {
            "stage": "pretrain",
            "name": "pretrain",
            "fingerprint": "test",
            "digest": outputs_digest(outputs),
            "config": {},
            "inputs": [],
            "outputs": outputs,
            "metrics": {},
        },
    )
    return Adopted(model_dir, tok, ids)


def test_roles_are_the_adopted_tokenizers(adopted: Adopted) -> None:
    specials = model_special_tokens(adopted.tokenizer, adopted.model)
    assert specials.tokens == SPECIALS and specials.ids == adopted.ids
    # Without its directory, the eos that only tokenizer_config.json names is not recognised.
    assert "eos" not in model_special_tokens(adopted.tokenizer).ids


def test_a_directory_made_elsewhere_is_recognised(adopted: Adopted, tmp_path: Path) -> None:
    """A transformers download records no roles: eos is its tokenizer_config's eos_token, the
    FIM tokens are recognised by spelling; a model without them says it cannot fill in."""
    download = tmp_path / "download"
    shutil.copytree(adopted.model, download)
    config = json.loads((download / TOKENIZER_CONFIG).read_text())
    del config[ROLES_KEY]
    (download / TOKENIZER_CONFIG).write_text(json.dumps(config))
    backend = load(download)
    assert isinstance(backend, TorchBackend) and backend.specials.ids == adopted.ids
    no_fim = TorchBackend(
        backend.model,
        adopted.tokenizer,
        "no-fim",
        SpecialTokens({"eos": SPECIALS["eos"]}, {"eos": adopted.ids["eos"]}),
    )
    assert make_prompt(no_fim, PREFIX, heal=False).ids[0] == adopted.ids["eos"]
    with pytest.raises(ConfigError, match="no-fim has no fim_prefix, fim_middle, fim_suffix"):
        make_prompt(no_fim, PREFIX, SUFFIX)


@pytest.mark.parametrize("mode", ["psm", "spm"])
def test_fim_prompt_uses_the_adopted_sentinels_and_stops_at_its_eos(
    adopted: Adopted, mode: Mode
) -> None:
    backend = load(adopted.model)
    assert backend.eos_id == adopted.ids["eos"]
    assert list(backend.stop_ids) == sorted(adopted.ids.values())
    prompt = make_prompt(backend, PREFIX, SUFFIX, fim_mode=mode)
    assert prompt.ids == adopted.fim_ids(PREFIX, SUFFIX, mode)
    model = backend.model  # type: ignore[attr-defined]
    assert list(engine.generate(model, prompt.ids, max_new_tokens=3)) == [adopted.ids["eos"]] * 3
    (c,) = completions(backend, [prompt], max_new_tokens=8)
    assert (c.text, c.finish_reason, c.completion_tokens) == ("", "stop", 0)
    # A plain completion starts a document after the adopted eos.
    assert make_prompt(backend, PREFIX, heal=False).ids[0] == adopted.ids["eos"]


def test_complete_cli_fills_in_the_middle(
    adopted: Adopted, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["complete", str(adopted.model), PREFIX, "--suffix", SUFFIX, "--fim-mode", "spm"]
    code, out, err = run([*argv, "--max-tokens", "8", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["completion"] == "" and result["finish_reason"] == "stop"
    assert result["prompt_tokens"] == len(adopted.fim_ids(PREFIX, SUFFIX, "spm"))


def test_gguf_keys_are_ggufs() -> None:
    keys = gguf.Keys.Tokenizer
    assert GGUF_KEYS == {
        "eos": keys.EOS_ID,
        "fim_prefix": keys.FIM_PRE_ID,
        "fim_middle": keys.FIM_MID_ID,
        "fim_suffix": keys.FIM_SUF_ID,
        "fim_pad": keys.FIM_PAD_ID,
    }


def _assert_gguf_roles(path: Path, ids: dict[str, int]) -> None:
    meta = read_metadata(path)
    assert {role: meta[key] for role, key in GGUF_KEYS.items()} == ids
    keys = gguf.Keys.Tokenizer
    assert meta[keys.BOS_ID] == meta[keys.PAD_ID] == ids["eos"]


@pytest.mark.llamacpp
def test_gguf_carries_the_adopted_ids_and_llamacpp_uses_them(
    adopted: Adopted, tmp_path: Path
) -> None:
    path = write_gguf(adopted.model, tmp_path / "model-f16.gguf", "f16").path
    _assert_gguf_roles(path, adopted.ids)
    backend = load(path)
    assert isinstance(backend, GGUFBackend)
    assert backend.specials.tokens == SPECIALS
    assert backend.eos_id == adopted.ids["eos"]
    assert list(backend.stop_ids) == sorted(adopted.ids.values())
    for mode in MODES:
        prompt = make_prompt(backend, PREFIX, SUFFIX, fim_mode=mode)
        assert prompt.ids == adopted.fim_ids(PREFIX, SUFFIX, mode)
        (c,) = completions(backend, [prompt], max_new_tokens=8)
        assert (c.text, c.finish_reason) == ("", "stop")


@pytest.mark.llamacpp
def test_export_names_the_adopted_eos(adopted: Adopted, tmp_path: Path) -> None:
    cfg = export.Config(
        model=adopted.model,
        formats=["hf", "f16"],
        output=tmp_path / "export",
        parity_prompts=4,
        prompt_tokens=32,
        threads=1,
    )
    eos = adopted.ids["eos"]
    plan = export.plan(cfg)
    detail = next(c.detail for c in plan.checks if c.name == "special tokens")
    assert (
        f"eos </s> ({eos})" in detail
        and f"fim_prefix <fim_prefix> ({adopted.ids['fim_prefix']})" in detail
    )
    out = run_stage(load_stage("export"), cfg).output
    generation = json.loads((out / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["pad_token_id"] == eos
    assert json.loads((out / "hf" / "config.json").read_text())["eos_token_id"] == eos
    _assert_gguf_roles(out / "model-f16.gguf", adopted.ids)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[list[int], list[int]]]]:
    """(prompt, stop ids) of every row the torch engine generates for."""
    calls: list[tuple[list[int], list[int]]] = []
    real = engine.stream_batch

    def spy(model: GPT, prompts: Sequence[Sequence[int]], **kw: Any) -> Any:
        calls.extend((list(p), sorted(kw.get("stop_token_ids", ()))) for p in prompts)
        return real(model, prompts, **kw)

    monkeypatch.setattr(engine, "stream_batch", spy)
    yield calls


def test_humaneval_and_infill_prompts_use_the_adopted_ids(
    adopted: Adopted, recorded: list[tuple[list[int], list[int]]]
) -> None:
    gen = he.Generator(adopted.model)
    stops = sorted(adopted.ids.values())
    s = he.SamplingConfig(max_new_tokens=6, batch_size=2)
    # Healing makes the first new token text (the prompt's cut last token), so only the prompt
    # and the stops are checked here.
    assert len(gen.complete("t/0", "def f(x):\n", s)) == 1
    ((prompt, stop),) = recorded
    assert prompt[0] == adopted.ids["eos"] and stop == stops
    recorded.clear()
    assert gen.infill("t/0", PREFIX, SUFFIX, "spm", s) == [""]
    assert recorded == [(adopted.fim_ids(PREFIX, SUFFIX, "spm"), stops)]
    recorded.clear()
    items = [("t/0", PREFIX, SUFFIX, "psm"), ("t/1", "x = ", "\n", "spm")]
    assert list(gen.infill_many(items, s)) == [[""], [""]]  # type: ignore[arg-type]
    assert recorded == [
        (adopted.fim_ids(PREFIX, SUFFIX, "psm"), stops),
        (adopted.fim_ids("x = ", "\n", "spm"), stops),
    ]
