"""The finetune stage: a plan that checks the base, the pairs and the LoRA targets and counts the
trainable parameters; an apply that lowers the val completion loss below the base's, writes a
peft adapter that transformers + peft load and a merged model with the tie intact; a crashed run
that resumes to the straight run's adapter bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from albor.data.pair_windows import eval_batches
from albor.evals.perplexity import score_masked
from albor.model.hf import load_pretrained
from albor.stage import load_stage, run_stage
from albor.stages import finetune
from albor.train.lora import LINEAR_TARGETS
from helpers import (
    STDLIB,
    STDLIB_SAMPLE,
    crash_at_20_and_resume,
    mine_pairs,
    stdlib_texts,
)

ROOT_FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "trainer_state.json",
    "training_state.json",  # the run tracker's
    "metrics.jsonl",
    "loss.png",
    "manifest.json",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    # The adapter travels with the tokenizer, as the merged model does.
    "adapter/tokenizer.json",
    "adapter/tokenizer_config.json",
    "adapter/special_tokens_map.json",
}


# The stdlib sample gives 61 training pairs that fit the tiny preset's 128-token context: a LoRA
# learns where a body ends from them and little else. These modules (none of which the base saw)
# make it ~750, enough for 40 steps to lower the val loss on code the base never saw.
MORE_MODULES = [
    "calendar.py", "difflib.py", "fractions.py", "statistics.py", "ipaddress.py", "pprint.py",
    "shutil.py", "tempfile.py", "random.py", "operator.py", "functools.py", "dataclasses.py",
    "enum.py", "argparse.py", "gettext.py", "locale.py", "os.py", "posixpath.py", "ntpath.py",
    "csv.py", "configparser.py", "datetime.py", "base64.py", "hashlib.py", "hmac.py", "io.py",
    "linecache.py", "mimetypes.py", "optparse.py", "pickle.py", "platform.py", "plistlib.py",
    "quopri.py", "smtplib.py", "socket.py", "subprocess.py", "tarfile.py", "threading.py",
    "tokenize.py", "traceback.py", "types.py", "typing.py", "uuid.py", "warnings.py",
    "weakref.py", "zipfile.py",
]  # fmt: skip


@pytest.fixture(scope="module")
def pairs_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pairs artifact mined by the real split and pairs stages from the stdlib sample and
    `MORE_MODULES`, split as `token_data` is (so no val pair comes from a file the base saw)."""
    root = tmp_path_factory.mktemp("pairs_data")
    names = STDLIB_SAMPLE + [m for m in MORE_MODULES if (STDLIB / m).is_file()]
    return mine_pairs(root, stdlib_texts(names))[1]


def config(base: Path, data: Path, out: Path, **kw: Any) -> finetune.Config:
    settings: dict[str, Any] = dict(
        base=base,
        data=data,
        output=out,
        seq_len=128,
        micro_batch=8,
        max_steps=40,
        warmup_steps=4,
        lr=1e-2,
        weight_decay=0.0,
        eval_every=20,
        eval_tokens=4000,
        checkpoint_every=10,
        log_every=5,
        threads=1,
        device="cpu",
    )
    return finetune.Config.model_validate({**settings, **kw})


def checks(p: Any) -> dict[str, str]:
    return {c.name: f"{c.status}: {c.detail}" for c in p.checks}


def test_plan_counts_the_adapters(trained_model: Path, pairs_data: Path, tmp_path: Path) -> None:
    p = finetune.plan(config(trained_model, pairs_data, tmp_path / "out"))
    assert p.ok, checks(p)
    found = checks(p)
    assert found["base"].startswith("ok") and found["data"].startswith("ok: ")
    assert found["architecture"].startswith("ok: base: 2 layers")
    cfg = json.loads((trained_model / "config.json").read_text())
    h, i, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"]
    kv_width = kv * h // cfg["num_attention_heads"]
    shapes = {
        "q_proj": (h, h),
        "k_proj": (h, kv_width),
        "v_proj": (h, kv_width),
        "o_proj": (h, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    expected = cfg["num_hidden_layers"] * sum(8 * sum(shapes[t]) for t in LINEAR_TARGETS)
    assert p.estimates["trainable_parameters"] == expected
    assert "adapters" in p.estimates["memory"] and p.estimates["tokens_per_step"] == 8 * 128
    assert any(a.startswith("finetune ") for a in p.actions)


@pytest.mark.parametrize(
    ("kw", "check", "said"),
    [
        (dict(targets=["q_proj", "lm_head"]), "targets", "valid targets: q_proj, k_proj"),
        (dict(targets=["k_proj"], rank=64), "targets", "rank 64 exceeds min(in, out)"),
        (dict(base="/nonexistent/base"), "base", "does not exist"),
        (dict(seq_len=4096), "sequence length", "exceeds the context"),
        (dict(optimizer="muon"), "optimizer", "set optimizer: adamw"),
    ],
)
def test_plan_rejects_what_cannot_train(
    trained_model: Path, pairs_data: Path, tmp_path: Path, kw: dict[str, Any], check: str, said: str
) -> None:
    base = kw.pop("base", trained_model)
    found = checks(finetune.plan(config(base, pairs_data, tmp_path / "out", **kw)))
    assert found[check].startswith("fail") and said in found[check], found


def test_plan_refuses_token_shards_as_pairs(
    trained_model: Path, token_data: Path, tmp_path: Path
) -> None:
    found = checks(finetune.plan(config(trained_model, token_data, tmp_path / "out")))
    assert found["data"].startswith("fail") and "holds no train.parquet" in found["data"]


def test_plan_refuses_a_split_artifact_as_pairs(
    trained_model: Path, pairs_data: Path, tmp_path: Path
) -> None:
    # A split artifact has a train.parquet too, of whole documents: the plan once passed it and
    # the run failed after loading the base.
    splits = pairs_data.parent / "split"
    found = checks(finetune.plan(config(trained_model, splits, tmp_path / "out")))
    assert found["data"].startswith("fail"), found
    assert "no prompt and completion columns" in found["data"]
    assert "point `data:` at the output of the pairs stage" in found["data"]


def val_loss_of_the_base(base: Path, data: Path, cfg: finetune.Config) -> float:
    """The base's completion loss on the val pairs the run validates on (its first eval_tokens)."""
    spec = cfg.spec()
    facts = finetune.read_base(base)
    pd = finetune.PairData.open(data, facts, spec, cfg.seq_len, cfg.seed)
    model, _ = load_pretrained(base)
    batches = eval_batches(pd.val, cfg.micro_batch, cfg.eval_tokens)
    return score_masked(model, batches, pd.token_bytes).loss


def test_apply_improves_on_the_base_and_writes_adapter_and_merged_model(
    trained_model: Path, pairs_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    straight = tmp_path / "straight"
    cfg = config(trained_model, pairs_data, straight)
    m = run_stage(load_stage("finetune"), cfg)
    metrics = m.manifest["metrics"]
    files = {o["path"] for o in m.manifest["outputs"]}
    assert {f for f in files if not f.startswith("checkpoints/")} | {"manifest.json"} == ROOT_FILES
    base_loss = round(val_loss_of_the_base(trained_model, pairs_data, cfg), 5)
    assert metrics["val_loss"] < base_loss - 0.05, (metrics["val_loss"], base_loss)
    # The manifest says what the step bought, the base scored as the finetuned model is.
    assert metrics["base_val_loss"] == base_loss
    assert metrics["val_loss_change"] == round(metrics["val_loss"] - base_loss, 5) < 0
    assert metrics["val_bpb_change"] < 0 < metrics["base_val_bpb"]
    assert metrics["trainable_parameters"] == metrics["lora"]["trainable_parameters"]
    assert metrics["pairs"]["train"] > 500 and metrics["pairs"]["val"] > 50
    assert "val_bpb" in metrics and metrics["bit_exact_resume"]

    # The merged model keeps the base's tie and embedding; peft's adapter on transformers' base
    # gives the merged model's logits.
    merged, mcfg = load_pretrained(straight)
    base, _ = load_pretrained(trained_model)
    assert mcfg.tie_embeddings and merged.lm_head.weight is merged.model.embed_tokens.weight
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    x = torch.randint(0, mcfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(trained_model, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(hf, straight / "adapter").eval()
    with torch.no_grad():
        assert (adapted(input_ids=x).logits - merged(x)).abs().max() < 1e-4
        assert (merged(x) - base(x)).abs().max() > 1e-3


def test_a_crashed_finetune_resumes_bit_for_bit(
    trained_model: Path, pairs_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw: dict[str, Any] = dict(max_steps=30, micro_batch=4, eval_every=15, eval_tokens=500)
    straight = tmp_path / "straight"
    run_stage(load_stage("finetune"), config(trained_model, pairs_data, straight, **kw))
    again = config(trained_model, pairs_data, tmp_path / "b", **kw)
    resumed = crash_at_20_and_resume("finetune", again, monkeypatch)
    assert resumed["resumed_from"] == 20
    step = tmp_path / "b" / "checkpoints" / "step-0000020"
    assert not step.exists() or not (step / "model.safetensors").exists()  # adapters only
    wa = load_file(straight / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
