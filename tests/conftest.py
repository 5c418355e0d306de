"""Shared fixtures: small real corpora built in the test, so every test is hermetic."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import STDLIB, STDLIB_SAMPLE, pretrain_config, write_corpus_artifact


@pytest.fixture
def stdlib_texts() -> list[tuple[str, str]]:
    return [(name, (STDLIB / name).read_text(encoding="utf-8")) for name in STDLIB_SAMPLE]


@pytest.fixture
def corpus_artifact(tmp_path: Path, stdlib_texts: list[tuple[str, str]]) -> Callable[..., Path]:
    def make(texts: list[tuple[str, str]] | None = None, name: str = "corpus") -> Path:
        return write_corpus_artifact(tmp_path / name, texts if texts is not None else stdlib_texts)

    return make


@pytest.fixture(scope="session")
def token_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenize artifact (512-token BPE) built by the real stages from the stdlib sample."""
    from albor.stage import load_stage, run_stage
    from albor.stages import split, tokenize, tokenizer

    root = tmp_path_factory.mktemp("token_data")
    texts = [(name, (STDLIB / name).read_text(encoding="utf-8")) for name in STDLIB_SAMPLE]
    corpus = write_corpus_artifact(root / "corpus", texts)
    splits = run_stage(
        load_stage("split"), split.Config(input=corpus, output=root / "split", val=0.2, test=0.1)
    ).output
    tok = run_stage(
        load_stage("tokenizer"),
        tokenizer.Config(input=splits, output=root / "tokenizer", vocab_size=512),
    ).output
    return run_stage(
        load_stage("tokenize"),
        tokenize.Config(corpus=splits, tokenizer=tok, output=root / "tokenize"),
    ).output


@pytest.fixture(scope="session")
def trained_model(token_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretrain artifact (tiny preset, the 512-token BPE of `token_data` with the FIM tokens)
    trained long enough that its completions are not noise: model.safetensors, config.json and
    tokenizer.json in one directory, as the engine, the exporters and the server load it.
    Read-only for tests: copy it before changing it."""
    from albor.stage import load_stage, run_stage

    out = tmp_path_factory.mktemp("trained_model") / "pretrain"
    cfg = pretrain_config(
        token_data,
        out,
        micro_batch=8,
        max_steps=150,
        warmup_steps=10,
        lr=1e-2,
        eval_tokens=0,
        checkpoint_every=75,
        threads=1,
    )
    return run_stage(load_stage("pretrain"), cfg).output
