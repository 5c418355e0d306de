"""distill as a user meets it through the CLI: a transformers (Qwen2, Llama) teacher, a student
that starts from a checkpoint, every bad input refused at plan time with the key or file and the
fix (exit 1 or 2, no traceback), and a run killed with SIGKILL that resumes bit for bit, online
and offline."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_teacher_logits import SEQ_LEN, TOP_K, logits_artifact, small_data

from albor.artifact import read_manifest
from albor.stage import load_stage, run_stage
from albor.stages import distill
from helpers import apply_command, launch_apply, pretrain_config, run, wait_for

__all__ = ["logits_artifact", "small_data"]  # fixtures shared with the teacher_logits tests


def online(data: Path, teacher: Path, out: Path, **kw: Any) -> dict[str, Any]:
    base = pretrain_config(data, out, threads=1, device="cpu").model_dump(
        mode="json", exclude_none=True
    )
    return {**base, "teacher": str(teacher), **kw}


def offline(data: Path, logits: Path, out: Path, **kw: Any) -> dict[str, Any]:
    base = pretrain_config(data, out, seq_len=SEQ_LEN, threads=1, device="cpu").model_dump(
        mode="json", exclude_none=True
    )
    return {**base, "teacher_logits": str(logits), **kw}


def write(cfg: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def transformers_model(directory: Path, tokenizer_from: Path, family: str, vocab: int) -> Path:
    """A tiny random transformers model saved with save_pretrained, with the tokenizer.json of
    `tokenizer_from` beside it: a teacher as a user downloads one."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_type, model_type = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
    }[family]
    torch.manual_seed(0)
    config = config_type(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model_type(config).save_pretrained(str(directory))
    shutil.copy(tokenizer_from / "tokenizer.json", directory / "tokenizer.json")
    return directory


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_a_transformers_teacher_distills_online_and_offline(
    small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], family: str
) -> None:
    teacher = transformers_model(tmp_path / "teacher", small_data, family, 512)
    cfg = write(
        online(small_data, teacher, tmp_path / "d", max_steps=3, warmup_steps=1),
        tmp_path / "d.yaml",
    )
    code, out, err = run(["distill", "apply", str(cfg)], capsys)
    assert code == 0, out + err
    assert read_manifest(tmp_path / "d")["metrics"]["teacher_rows"]["rows_checked"] > 0

    logits = tmp_path / "logits"
    tl = {
        "data": str(small_data),
        "teacher": str(teacher),
        "output": str(logits),
        "seq_len": SEQ_LEN,
        "top_k": 4,
        "device": "cpu",
        "threads": 1,
    }
    code, out, err = run(["teacher_logits", "apply", str(write(tl, tmp_path / "tl.yaml"))], capsys)
    assert code == 0, out + err
    index = json.loads((logits / "logits.json").read_text())
    assert index["top_k"] == 4 and index["ids_dtype"] == "uint16" and index["temperature"] == 1.0
    assert len(index["tokenizer_sha256"]) == 64
    off = write(
        offline(small_data, logits, tmp_path / "o", max_steps=3, warmup_steps=1),
        tmp_path / "o.yaml",
    )
    code, out, err = run(["distill", "apply", str(off)], capsys)
    assert code == 0, out + err


def test_the_online_plan_estimates_the_logits_disk_and_the_teacher_memory(
    small_data: Path, trained_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write(online(small_data, trained_model, tmp_path / "d", top_k=8), tmp_path / "d.yaml")
    code, out, _ = run(["distill", "plan", str(cfg), "--json"], capsys)
    assert code == 0, out
    estimates = json.loads(out)["estimates"]
    train = json.loads((small_data / "index.json").read_text())
    tokens = sum(s["tokens"] for s in train["splits"]["train"]["shards"])
    # 8 ids of 2 bytes (uint16 for 512 ids) and 8 fp16 log-probabilities per token.
    assert estimates["teacher_logits_disk_bytes"] == tokens * 8 * (2 + 2)
    assert "teacher" in estimates["memory"]


def test_a_student_checkpoint_starts_from_its_weights(
    token_data: Path, trained_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Distilled into itself with the whole vocabulary, a student that really starts from the
    teacher's weights has KL 0 at its first step; a fresh preset would not."""
    cfg = online(
        token_data,
        trained_model,
        tmp_path / "d",
        max_steps=2,
        warmup_steps=1,
        log_every=1,
        top_k=None,
    )
    del cfg["model"]
    cfg["student"] = str(trained_model)
    code, out, err = run(
        ["distill", "plan", str(write(cfg, tmp_path / "d.yaml")), "--json"], capsys
    )
    assert code == 0, out + err
    [arch] = [c for c in json.loads(out)["checks"] if c["name"] == "architecture"]
    assert arch["detail"].startswith(f"student {trained_model}: ")  # not the preset's name
    code, out, err = run(["distill", "apply", str(tmp_path / "d.yaml")], capsys)
    assert code == 0, out + err
    first = json.loads((tmp_path / "d" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["kl"] < 1e-6, first
    manifest = read_manifest(tmp_path / "d")
    assert "student" in {e["name"] for e in manifest["inputs"]}


def test_a_student_with_model_or_architecture_is_a_config_error(
    token_data: Path, trained_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = online(token_data, trained_model, tmp_path / "d", student=str(trained_model))
    code, _, err = run(["distill", "plan", str(write(cfg, tmp_path / "d.yaml"))], capsys)
    assert code == 2 and "remove model and architecture" in err and "Traceback" not in err


def no_weights(trained_model: Path, tmp_path: Path) -> str:
    d = tmp_path / "no_weights"
    d.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(trained_model / name, d / name)
    return str(d)


def a_file(trained_model: Path, tmp_path: Path) -> str:
    return str(trained_model / "config.json")


def vocab_600(trained_model: Path, tmp_path: Path) -> str:
    return str(transformers_model(tmp_path / "v600", trained_model, "qwen2", 600))


def other_tokenizer(trained_model: Path, tmp_path: Path) -> str:
    d = tmp_path / "other_tokenizer"
    shutil.copytree(trained_model, d)
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["model"]["merges"] = tok["model"]["merges"][:-1]
    (d / "tokenizer.json").write_text(json.dumps(tok))
    return str(d)


@pytest.mark.parametrize(
    ("make", "sets", "code", "said"),
    [
        (no_weights, {}, 1, "is not a checkpoint directory (config.json and model.safetensors)"),
        (a_file, {}, 1, "is a file: point teacher at the checkpoint directory"),
        (vocab_600, {}, 1, "set architecture.vocab_size: 600"),
        (other_tokenizer, {}, 1, "adopt: TEACHER_DIR"),
        (None, {"architecture.vocab_size": 600}, 1, "set architecture.vocab_size: 512"),
        (None, {"architecture.vocab_size": 500}, 1, "set architecture.vocab_size: 512"),
        (None, {"top_k": 513}, 1, "top_k 513 exceeds the vocabulary (512)"),
        (None, {"top_k": 0}, 2, "top_k: Input should be greater than 0"),
        (None, {"temperature": 0}, 2, "temperature: Input should be greater than 0"),
        (None, {"temperature": -1}, 2, "temperature: Input should be greater than 0"),
        (None, {"alpha": 1.5}, 2, "alpha: Input should be less than or equal to 1"),
        (None, {"alpha": -0.1}, 2, "alpha: Input should be greater than or equal to 0"),
    ],
)
def test_a_bad_online_input_is_refused_at_plan_naming_it_and_the_fix(
    token_data: Path,
    trained_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make: Any,
    sets: dict[str, Any],
    code: int,
    said: str,
) -> None:
    teacher = make(trained_model, tmp_path) if make else str(trained_model)
    cfg = write(online(token_data, Path(teacher), tmp_path / "d"), tmp_path / "d.yaml")
    argv = ["distill", "plan", str(cfg)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    got, out, err = run(argv, capsys)
    # The plan's table wraps lines and shortens long paths.
    text = " ".join((out + err).split())
    assert got == code and said in text, text
    assert "Traceback" not in out + err
    assert not (tmp_path / "d").exists()


def truncated(logits: Path, tmp_path: Path) -> Path:
    d = tmp_path / "truncated"
    shutil.copytree(logits, d)
    f = d / "train" / "shard-00001" / "ids.npy"
    f.write_bytes(f.read_bytes()[:1000])
    return d


def other_tokenizer_logits(logits: Path, tmp_path: Path) -> Path:
    d = tmp_path / "other_tokenizer"
    shutil.copytree(logits, d)
    index = json.loads((d / "logits.json").read_text())
    index["tokenizer_sha256"] = "0" * 64
    (d / "logits.json").write_text(json.dumps(index))
    return d


def a_logits_file(logits: Path, tmp_path: Path) -> Path:
    return logits / "logits.json"


@pytest.mark.parametrize(
    ("make", "sets", "said"),
    [
        (truncated, {}, "1,000 bytes where the manifest records 639,104 (truncated"),
        (other_tokenizer_logits, {}, "their ids mean other tokens"),
        (
            a_logits_file,
            {},
            "is a file: point it at the output directory of a teacher_logits stage",
        ),
        (None, {"temperature": 2.0}, "the teacher logits were computed with 1.0"),
        (None, {"top_k": TOP_K // 2}, f"the teacher logits were computed with {TOP_K}"),
        (None, {"seq_len": SEQ_LEN // 2}, f"set seq_len: {SEQ_LEN}"),
        (None, {"architecture.vocab_size": 600}, "build the student with vocab_size 512"),
    ],
)
def test_a_bad_offline_input_is_refused_at_plan_naming_it_and_the_fix(
    small_data: Path,
    logits_artifact: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make: Any,
    sets: dict[str, Any],
    said: str,
) -> None:
    logits = make(logits_artifact, tmp_path) if make else logits_artifact
    cfg = write(offline(small_data, logits, tmp_path / "d"), tmp_path / "d.yaml")
    argv = ["distill", "plan", str(cfg)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    got, out, err = run(argv, capsys)
    text = " ".join((out + err).split())
    assert got == 1 and said in text, text
    assert "Traceback" not in out + err


def test_a_damaged_logits_byte_stops_apply_before_training(
    small_data: Path, logits_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logits = tmp_path / "logits"
    shutil.copytree(logits_artifact, logits)
    f = logits / "train" / "shard-00000" / "logprobs.npy"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01
    f.write_bytes(bytes(data))
    cfg = write(
        offline(small_data, logits, tmp_path / "d", max_steps=3, warmup_steps=1),
        tmp_path / "d.yaml",
    )
    code, out, err = run(["distill", "apply", str(cfg)], capsys)
    assert code == 1 and "shard-00000/logprobs.npy: sha256 differs" in err, out + err
    assert "re-run the teacher_logits stage" in err and "Traceback" not in out + err
    assert (
        not (tmp_path / "d").exists() and not (tmp_path / ".d.partial" / "metrics.jsonl").exists()
    )


RESUMABLE: dict[str, Any] = dict(
    max_steps=100, checkpoint_every=10, eval_every=50, eval_tokens=512, log_every=1
)


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_killed_with_sigkill_the_run_resumes_bit_for_bit(
    small_data: Path, trained_model: Path, logits_artifact: Path, tmp_path: Path, mode: str
) -> None:
    def config(out: Path) -> dict[str, Any]:
        if mode == "online":
            return online(small_data, trained_model, out, seq_len=SEQ_LEN, top_k=8, **RESUMABLE)
        return offline(small_data, logits_artifact, out, **RESUMABLE)

    straight = tmp_path / "straight"
    run_stage(load_stage("distill"), distill.Config.model_validate(config(straight)))

    cfg = write(config(tmp_path / "out"), tmp_path / "d.yaml")
    proc = launch_apply("distill", cfg)
    saved = tmp_path / ".out.partial" / "checkpoints" / "step-0000020" / "checkpoint.json"
    wait_for(proc, saved.exists, "the step-20 checkpoint")
    proc.kill()
    assert proc.wait() == -signal.SIGKILL

    command = apply_command("distill", cfg)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert read_manifest(tmp_path / "out")["metrics"]["resumed_from"] >= 20

    def steps(out: Path) -> list[tuple[Any, ...]]:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["kl"]) for r in rows if "loss" in r]

    assert [s for s, *_ in steps(straight)] == list(range(1, 101))
    assert steps(tmp_path / "out") == steps(straight)  # exact floats, no step lost or repeated
    wa, wb = (
        load_file(straight / "model.safetensors"),
        load_file(tmp_path / "out" / "model.safetensors"),
    )
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
