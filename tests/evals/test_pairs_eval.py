"""The evaluate task `pairs`: its bits per byte equals a hand computation from the model's logits
(prompt + body + eos, only the body's tokens scored, over the body's UTF-8 bytes); only the
completion's targets count, and the masked scorer agrees with finetune's val_bpb scorer."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from albor.data.bpe import load_tokenizer, plain_text, special_tokens, token_byte_lengths
from albor.data.pair_windows import (
    IGNORE,
    EncodedPairs,
    encode_pairs,
    read_split,
)
from albor.evals.perplexity import score_masked
from albor.model.hf import load_pretrained
from albor.stage import PlanContext, load_stage, run_stage
from albor.stages import evaluate
from helpers import mine_pairs

# Short functions (every pair fits the tiny preset's 128-token window), one with a body that is
# not ASCII, so that bytes and characters differ.
SOURCES = {
    "rect.py": 'def area(w, h):\n    """Area of a w by h rectangle."""\n    return w * h\n\n\n'
    'def perimeter(w, h):\n    """Perimeter of a w by h rectangle."""\n    total = 2 * (w + h)\n'
    "    return total\n",
    "greet.py": 'def greet(name):\n    """A greeting for name."""\n'
    '    return "¡hola, " + name + "!"\n',
    "seq.py": 'def first(items):\n    """The first item, or None."""\n    for x in items:\n'
    "        return x\n    return None\n",
    "num.py": 'def clamp(x, lo, hi):\n    """x, kept between lo and hi."""\n    if x < lo:\n'
    "        return lo\n    return min(x, hi)\n",
}


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pairs artifact of `SOURCES`, all in the train split, made by the real stages."""
    root = tmp_path_factory.mktemp("pair_data")
    return mine_pairs(root, list(SOURCES.items()), val=0, test=0)[1]


def test_plan_checks_the_pairs_and_the_tokenizer(
    trained_model: Path, pair_data: Path, token_data: Path, tmp_path: Path
) -> None:
    def checks(
        pairs: Path | None, ctx: PlanContext | None = None, **task: object
    ) -> dict[str, str]:
        cfg = evaluate.Config.model_validate(
            {
                "model": trained_model,
                "pairs": pairs,
                "output": tmp_path / "never",
                "tasks": [{"task": "pairs", "name": "p", **task}],
            }
        )
        p = evaluate.plan(cfg, ctx)
        assert not (tmp_path / "never").exists()
        return {c.name: f"{c.status}: {c.detail}" for c in p.checks}

    found = checks(pair_data, split="train", limit=2)
    assert all(v.startswith("ok") for v in found.values()), found
    assert (
        "train pairs 5, the first 2" in found["p"]
        and "eos <|endoftext|> (0)" in found["p.tokenizer"]
    )
    # The default split, val, is empty here: the check names the splits that hold pairs.
    assert found_fail(checks(pair_data), "p", "val split holds no pairs", "(train)")
    assert found_fail(checks(None), "pairs", "set `pairs:`")
    assert found_fail(checks(token_data), "pairs", "(point `pairs:` at the output of the pairs")
    assert checks(tmp_path / "later", PlanContext({"pairs": "pairs"}))["pairs"].startswith("ok")
    assert found_fail(checks(pair_data, split="train", seq_len=4096), "p.seq_len", "context 128")
    # A tokenizer with more ids than the model's embedding is not the model's.
    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": 256}))
    cfg = evaluate.Config.model_validate(
        {"model": model, "pairs": pair_data, "tasks": [{"task": "pairs", "split": "train"}]}
    )
    tokenizer = {c.name: c for c in evaluate.plan(cfg).checks}["pairs.tokenizer"]
    assert (
        tokenizer.status == "fail"
        and "512 ids but the model's embedding only 256" in tokenizer.detail
    )


def found_fail(checks: dict[str, str], name: str, *said: str) -> bool:
    return checks[name].startswith("fail") and all(s in checks[name] for s in said)


def test_bits_per_byte_equals_a_hand_computation(
    trained_model: Path, pair_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    cfg = evaluate.Config.model_validate(
        {
            "model": trained_model,
            "pairs": pair_data,
            "output": out,
            "tasks": [{"task": "pairs", "split": "train", "batch_size": 2}],
        }
    )
    res = run_stage(load_stage("evaluate"), cfg)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "metrics.json"]
    m = json.loads((out / "metrics.json").read_text())["pairs"]
    assert m == res.manifest["metrics"]["pairs"]

    table = pq.read_table(pair_data / "train.parquet").to_pylist()
    assert len(table) == 5 and m["pairs"] == 5 and m["truncated"] == m["dropped"] == 0
    model, _ = load_pretrained(trained_model)
    text = plain_text(load_tokenizer(trained_model))
    eos = special_tokens(trained_model).eos_id
    nll_all, nll_body, tokens, nbytes = 0.0, 0.0, 0, 0
    for row in table:
        prompt = text.encode(row["prompt"], add_special_tokens=False).ids
        body = text.encode(row["completion"], add_special_tokens=False).ids
        ids = torch.tensor([*prompt, *body, eos])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[None, :-1])[0].double(), dim=-1)
        # Position j predicts ids[j + 1]: the body and eos are predicted from len(prompt) - 1 on.
        targets = ids[len(prompt) :]
        nll = -logp[len(prompt) - 1 :].gather(1, targets[:, None])[:, 0]
        nll_all += float(nll.sum())
        nll_body += float(nll[:-1].sum())  # eos stands for no bytes
        tokens += len(targets)
        nbytes += len(row["completion"].encode("utf-8"))
    assert m["tokens"] == tokens and m["bytes"] == nbytes
    assert math.isclose(m["loss"], nll_all / tokens, rel_tol=1e-5)
    assert math.isclose(m["bits_per_byte"], nll_body / math.log(2) / nbytes, rel_tol=1e-5)
    assert "bits/byte" in res.manifest["summary"]


def _encoded(model_dir: Path, data: Path) -> tuple[EncodedPairs, np.ndarray]:
    tokenizer = load_tokenizer(model_dir)
    eos = special_tokens(model_dir).eos_id
    encoded = encode_pairs(plain_text(tokenizer), *read_split(data, "train"), eos, 128)
    return encoded, token_byte_lengths(tokenizer)


class _ScrambledAt(nn.Module):
    """The model, with its logits replaced by noise wherever `where` (B, T) holds."""

    def __init__(self, model: nn.Module, where: torch.Tensor) -> None:
        super().__init__()
        self.model, self.where = model, where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(x)
        noise = 10 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
        return torch.where(self.where[..., None], noise, logits)


def test_only_the_completion_is_scored(trained_model: Path, pair_data: Path) -> None:
    encoded, token_bytes = _encoded(trained_model, pair_data)
    rows = encoded.rows(list(range(len(encoded))))
    model, _ = load_pretrained(trained_model)
    scored = score_masked(model, [rows], token_bytes)
    # Whatever the model predicts for the prompt's tokens (and the padding) changes nothing...
    masked = rows[:, 1] == IGNORE
    assert score_masked(_ScrambledAt(model, masked), [rows], token_bytes) == scored
    # ...while what it predicts for the body does.
    assert score_masked(_ScrambledAt(model, ~masked), [rows], token_bytes) != scored
    # Labelling the prompt's tokens would score them too: more tokens, another loss.
    unmasked = rows.clone()
    for r, ids in enumerate(encoded.ids):
        unmasked[r, 1, : len(ids) - 1] = torch.from_numpy(ids[1:])
    both = score_masked(model, [unmasked], token_bytes)
    assert both.tokens > scored.tokens and both.loss != scored.loss
