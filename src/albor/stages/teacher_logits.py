"""teacher_logits: precompute a teacher's top-k next-token distributions for offline distillation.

For every aligned window of the train split (window w of shard s is tokens `[w * T, w * T + T +
1)`, stride T, the windows `data/windows.eval_windows` reads), the teacher reads the window's
first T tokens and its softmax at `temperature` is reduced to the k most likely (ids,
log-probabilities) of each position (`train/distill.topk_teacher`): row t describes token t + 1.
The `distill` stage with `teacher_logits: DIR` draws the same windows and reads these rows, so
no teacher runs beside the student. Layout and manifest: `train/teacher.py`.

Every row is checked before it is written (teacher-logit integrity, FALSIFY-006): finite, and
its probabilities summing to at most 1 + a tolerance that covers fp16 rounding
(`train/teacher.row_mass_tolerance`); a bad row fails the stage naming shard, window and
position. Each shard is written in a hidden directory and renamed into place when complete,
so a killed run resumes with the next unfinished shard and redoes nothing finished.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from albor.config import Int
from albor.device import Device
from albor.errors import ArtifactError, ConfigError
from albor.model.estimate import format_bytes, format_count
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, check_input
from albor.train.settings import PrecisionSetting

if TYPE_CHECKING:
    import numpy as np

    from albor.data.shards import TokenIndex
    from albor.progress import Bar
    from albor.train.teacher import TeacherFacts

NAME = "teacher_logits"
INPUTS = ("data", "teacher")

# fp32 copies of a micro-batch's (B x T x V) logits alive at once while the top-k is taken: the
# logits (or their bf16 cast up) and the shifted softmax.
_LOGIT_COPIES = 3


class Config(OutputConfig):
    data: Path | None = Field(
        None, description="Token shard artifact directory (from tokenize): its train split."
    )
    teacher: Path | None = Field(
        None,
        description="The teacher: a checkpoint directory (a pretrain output, or a transformers "
        "Llama / Qwen2 model directory) with the data's tokenizer.",
    )
    top_k: Int = Field(32, gt=0, description="Token ids kept per position, most likely first.")
    temperature: float = Field(
        1.0,
        gt=0,
        description="Softmax temperature of the stored log-probabilities (the distill run uses "
        "this one).",
    )
    seq_len: Int = Field(
        gt=0,
        description="Window length T: the student's seq_len (distill refuses another).",
    )
    micro_batch: Int = Field(8, gt=0, description="Windows per teacher forward pass.")
    device: Device = Field("auto", description="Where the teacher runs: auto, cpu or cuda.")
    threads: Int | None = Field(
        None, gt=0, description="CPU threads torch uses (default: torch's own choice)."
    )
    precision: PrecisionSetting = Field(
        "auto",
        description="The teacher's weights: fp32, or bf16 (auto: bf16 on a GPU that supports "
        "it, else fp32). The softmax and top-k are fp32 either way.",
    )


def _precision(cfg: Config, device: str) -> str:
    from albor.train import hardware

    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if device == "cuda" and hardware.bf16_support("cuda") == "native" else "fp32"


def _windows(index: TokenIndex, seq_len: int) -> list[int]:
    from albor.data.windows import aligned_window_count

    return [aligned_window_count(s.tokens, seq_len) for s in index.splits["train"].shards]


def _load_data(path: Path) -> TokenIndex:
    from albor.data.shards import TokenIndex

    index = TokenIndex.load(path)
    if "train" not in index.splits:
        raise ArtifactError(f"{path}: no train split: add train to the tokenize stage's splits")
    return index


def _check_teacher(p: Plan, cfg: Config, ctx: PlanContext, facts: TeacherFacts) -> None:
    from albor.train.teacher import check_tokenizer

    vocab = facts.config.vocab_size
    p.add("teacher", "ok", f"{cfg.teacher}: {format_count(facts.parameters)} parameters")
    p.require(
        "top_k",
        cfg.top_k <= vocab,
        f"the top {cfg.top_k} of {vocab:,} tokens per position at T={cfg.temperature:g}",
        f"top_k {cfg.top_k} exceeds the teacher's vocabulary ({vocab:,}): lower it",
    )
    p.require(
        "seq_len",
        cfg.seq_len <= facts.config.max_seq_len,
        f"windows of {cfg.seq_len} tokens <= the teacher's context {facts.config.max_seq_len}",
        f"seq_len {cfg.seq_len} exceeds the teacher's context {facts.config.max_seq_len}: lower "
        "seq_len (the student's must match it)",
    )
    if cfg.data is not None and not ctx.is_pending("data") and cfg.data.is_dir():
        check_tokenizer(p, facts.directory, cfg.data)


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    from albor.data.shards import token_dtype
    from albor.device import resolve

    ctx = ctx or PlanContext()
    p = Plan(NAME)
    index = check_input(p, ctx, "data", cfg.data, _load_data, "a tokenize output directory")
    if index is not None:
        windows = sum(_windows(index, cfg.seq_len))
        p.require(
            "data",
            windows > 0,
            f"{cfg.data}: {windows:,} windows of {cfg.seq_len} in "
            f"{len(index.splits['train'].shards)} train shard(s)",
            f"{cfg.data}: no train shard holds a window of {cfg.seq_len + 1} tokens: lower "
            "seq_len or add data",
        )
    from albor.train.teacher import read_teacher

    facts = check_input(p, ctx, "teacher", cfg.teacher, read_teacher, "a checkpoint directory")
    if facts is not None:
        _check_teacher(p, cfg, ctx, facts)
    try:
        device = resolve(cfg.device)
    except ConfigError as e:
        p.add("device", "fail", str(e))
        return p
    if index is None or facts is None:
        return p
    vocab = facts.config.vocab_size
    p.require(
        "teacher vocab",
        vocab >= index.vocab_size,
        f"the teacher's {vocab:,} ids cover the data's {index.vocab_size:,}",
        f"the teacher {cfg.teacher} has {vocab:,} ids (config.json vocab_size) but the data's "
        f"tokenizer {index.vocab_size:,}: the data holds ids the teacher has no row for; use "
        "the teacher the tokenizer belongs to, or tokenize the corpus with the teacher's "
        "tokenizer",
    )
    positions = sum(_windows(index, cfg.seq_len)) * cfg.seq_len
    per_position = cfg.top_k * (token_dtype(vocab).itemsize + 2)
    _check_disk(p, cfg, positions * per_position, per_position)
    precision = _precision(cfg, device)
    _check_memory(p, cfg, facts, device, precision)
    _estimate_time(p, cfg, facts, device, precision, positions)
    p.actions.append(
        f"run the {format_count(facts.parameters)}-parameter teacher forward over "
        f"{format_count(positions)} train positions on {device} in {precision}, keep the top "
        f"{cfg.top_k} of each, check every row, write them to {cfg.output}"
    )
    return p


def _check_disk(p: Plan, cfg: Config, need: int, per_position: int) -> None:
    from albor.pipeline import free_disk

    p.estimates["disk_bytes"] = need
    if cfg.output is None:
        return
    free = free_disk(cfg.output)
    p.require(
        "disk",
        need <= free,
        f"{format_bytes(need)} of {format_bytes(free)} free ({per_position} bytes per position)",
        f"the logits need {format_bytes(need)} ({per_position} bytes per position) but the "
        f"filesystem of {cfg.output} has {format_bytes(free)} free: free space, write "
        "elsewhere (output), or lower top_k",
    )


def _check_memory(p: Plan, cfg: Config, facts: TeacherFacts, device: str, precision: str) -> None:
    from albor.train import hardware

    weights = facts.memory_bytes(precision)
    logits = cfg.micro_batch * cfg.seq_len * facts.config.vocab_size * 4 * _LOGIT_COPIES
    total = weights + logits
    p.estimates["memory"] = {
        "teacher": format_bytes(weights),
        "logits": format_bytes(logits),
        "total": format_bytes(total),
    }
    available, what = hardware.device_memory(device)
    if available is None:
        p.add("memory", "fail", f"device {device}: {what} (set device: cpu)")
        return
    p.require(
        "memory",
        total <= available,
        f"{format_bytes(total)} of {format_bytes(available)} ({what}, {device})",
        f"needs {format_bytes(total)} (teacher {format_bytes(weights)}, logits "
        f"{format_bytes(logits)}) but {device} has {format_bytes(available)} ({what}): lower "
        "micro_batch, or set precision: bf16",
    )


def _estimate_time(
    p: Plan, cfg: Config, facts: TeacherFacts, device: str, precision: str, positions: int
) -> None:
    from albor.train import hardware
    from albor.train.estimates import ASSUMED_MFU, estimated_seconds, format_duration

    flops = facts.forward_flops_per_token(cfg.seq_len) * positions
    p.estimates["teacher_flops"] = float(flops)
    if device != "cpu":
        p.add("wall time", "ok", f"{flops:.3g} FLOPs (no wall-time estimate for {device})")
        return
    peak = hardware.cpu_peak_flops(cfg.threads or os.cpu_count() or 1, precision)
    wall = flops / (peak * ASSUMED_MFU)
    p.estimates["wall_time_s"] = estimated_seconds(wall)
    p.estimates["wall_time"] = format_duration(wall)
    p.add(
        "wall time",
        "ok",
        f"about {format_duration(wall)} at {ASSUMED_MFU:.0%} of this CPU's "
        f"measured peak ({flops:.3g} FLOPs)",
    )


def _compute_shard(
    teacher: Any,
    shard: np.ndarray,
    windows: int,
    work: Path,
    cfg: Config,
    ids_dtype: str,
    tolerance: float,
    where: str,
    bar: Bar,
) -> float:
    """Write one shard's ids and log-probabilities into directory `work`, checking each row;
    returns the largest row mass."""
    import numpy as np
    import torch

    from albor.data.windows import aligned_window
    from albor.train.distill import topk_teacher
    from albor.train.teacher import IDS_FILE, LOGPROBS_FILE, check_logit_rows

    device = next(teacher.parameters()).device
    shape = (windows, cfg.seq_len, cfg.top_k)
    fmt = np.lib.format
    ids = fmt.open_memmap(work / IDS_FILE, mode="w+", dtype=np.dtype(ids_dtype), shape=shape)
    lps = fmt.open_memmap(work / LOGPROBS_FILE, mode="w+", dtype=np.float16, shape=shape)
    worst = 0.0
    for start in range(0, windows, cfg.micro_batch):
        stop = min(start + cfg.micro_batch, windows)
        x = np.stack([aligned_window(shard, w, cfg.seq_len) for w in range(start, stop)])
        with torch.inference_mode():
            logits = teacher(torch.from_numpy(x[:, :-1]).to(device))
            top_ids, top_lp = topk_teacher(logits, cfg.top_k, cfg.temperature)
        values = top_lp.to(torch.float16).cpu().numpy()
        worst = max(worst, check_logit_rows(values, tolerance, where=where, first_window=start))
        ids[start:stop] = top_ids.cpu().numpy().astype(ids_dtype)
        lps[start:stop] = values
        bar.advance(stop - start)
    ids.flush()
    lps.flush()
    del ids, lps
    return worst


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    import torch

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _apply(cfg, ctx)
    finally:
        torch.set_num_threads(threads)  # the caller's process keeps its own setting


def _apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    from albor import progress
    from albor.artifact import artifact_digest
    from albor.data.shards import open_split, token_dtype
    from albor.device import resolve
    from albor.train.teacher import (
        LogitShard,
        LogitsIndex,
        load_teacher,
        logits_shard_dir,
        read_teacher,
        row_mass_tolerance,
    )

    assert cfg.data is not None and cfg.teacher is not None
    index = _load_data(cfg.data)
    shards = open_split(cfg.data, "train")
    counts = _windows(index, cfg.seq_len)
    facts = read_teacher(cfg.teacher)
    device = resolve(cfg.device)
    precision = _precision(cfg, device)
    ids_dtype = token_dtype(facts.config.vocab_size).name
    tolerance = row_mass_tolerance(cfg.top_k)
    records = [
        LogitShard(info.path, n, logits_shard_dir(i) if n else None)
        for i, (info, n) in enumerate(zip(index.splits["train"].shards, counts, strict=True))
    ]
    done = [r for r in records if r.directory is not None and (ctx.out / r.directory).is_dir()]
    todo = [(i, r) for i, r in enumerate(records) if r.directory is not None and r not in done]
    teacher = load_teacher(cfg.teacher, device, precision) if todo else None
    worst = 0.0
    total = sum(counts)
    with progress.bar(NAME, total, "windows", sum(r.windows for r in done)) as bar:
        for i, record in todo:
            assert record.directory is not None
            final = ctx.out / record.directory
            # Written aside and renamed whole: a kill leaves either no shard or a complete one.
            work = final.with_name(f".{final.name}.tmp")
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            where = f"train shard {i} ({cfg.data / record.data_shard})"
            worst = max(
                worst,
                _compute_shard(
                    teacher, shards[i], record.windows, work, cfg, ids_dtype, tolerance, where, bar
                ),
            )
            os.replace(work, final)
    LogitsIndex(
        data_digest=artifact_digest(cfg.data),
        tokenizer_sha256=index.tokenizer_sha256,
        teacher_path=str(cfg.teacher),
        teacher_digest=artifact_digest(cfg.teacher),
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        seq_len=cfg.seq_len,
        vocab_size=facts.config.vocab_size,
        ids_dtype=ids_dtype,
        row_mass_tolerance=tolerance,
        shards=records,
    ).write(ctx.out)
    positions = total * cfg.seq_len
    return Outcome(
        summary=f"top {cfg.top_k} of the teacher at T={cfg.temperature:g} for "
        f"{format_count(positions)} positions ({total:,} windows of {cfg.seq_len}); every row "
        f"finite, mass <= 1 + {tolerance:.2g}"
        + (f"; {len(done)} shard(s) kept from an interrupted run" if done else ""),
        metrics={
            "windows": total,
            "positions": positions,
            "shards_computed": len(todo),
            "shards_resumed": len(done),
            "max_row_mass_computed": round(worst, 6),
            "precision": precision,
        },
    )
