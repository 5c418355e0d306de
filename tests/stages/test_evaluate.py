from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from albor.data.bpe import load_tokenizer, token_byte_lengths
from albor.data.shards import open_split
from albor.model.hf import load_pretrained
from albor.stage import PlanContext, load_stage, run_stage
from albor.stages import evaluate, pretrain


def trained(token_data: Path, out: Path) -> Path:
    cfg = pretrain.Config(
        data=token_data,
        output=out,
        model="tiny",
        micro_batch=8,
        max_steps=150,
        warmup_steps=10,
        lr=1e-2,
        seq_len=64,
        eval_tokens=0,
    )
    return run_stage(load_stage("pretrain"), cfg).output


def test_plan(token_data: Path, tmp_path: Path) -> None:
    p = evaluate.plan(
        evaluate.Config(model=tmp_path / "m", data=token_data, output=tmp_path / "o"),
        PlanContext({"model": "pretrain"}),
    )
    assert p.ok and p.estimates["tokens_scored"] > 0
    missing = evaluate.plan(evaluate.Config(model=tmp_path / "m", data=token_data, output=tmp_path))
    assert [c.name for c in missing.failures] == ["model"]


def test_scores_match_a_direct_computation_and_beat_unigram(
    token_data: Path, tmp_path: Path
) -> None:
    model_dir = trained(token_data, tmp_path / "model")
    cfg = evaluate.Config(
        model=model_dir,
        data=token_data,
        output=tmp_path / "eval",
        split="val",
        seq_len=64,
        max_tokens=64,
    )
    res = run_stage(load_stage("evaluate"), cfg)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "manifest.json",
        "metrics.json",
    ]
    assert metrics["tokens"] == 64
    # One window of 65 tokens, scored by hand.
    window = torch.from_numpy(np.asarray(open_split(token_data, "val")[0][:65], dtype=np.int64))
    model, _ = load_pretrained(model_dir)
    with torch.no_grad():
        nll = F.cross_entropy(model(window[None, :-1])[0], window[1:], reduction="none")
    assert math.isclose(metrics["loss"], float(nll.mean()), rel_tol=1e-5)
    nbytes = token_byte_lengths(load_tokenizer(token_data))[window[1:].numpy()]
    bpb = float(nll[torch.from_numpy(nbytes > 0)].sum()) / math.log(2) / nbytes.sum()
    assert math.isclose(metrics["bits_per_byte"], bpb, rel_tol=1e-5)
    # On the whole val split even this tiny model is below the unigram baseline.
    full = run_stage(
        load_stage("evaluate"),
        evaluate.Config(model=model_dir, data=token_data, output=tmp_path / "eval2", seq_len=64),
    )
    m = full.manifest["metrics"]
    assert m["bits_per_byte"] < 0.95 * m["unigram"]["bits_per_byte"]
    assert "unigram baseline" in full.manifest["summary"] and res.status == "ran"
