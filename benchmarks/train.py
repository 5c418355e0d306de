"""Training throughput and MFU of albor's loop, against a plain PyTorch loop in the same run.

    python benchmarks/train.py [--preset demo] [--steps 20] [--micro-batch 16] [--seq-len 256]
                               [--precision fp32 bf16] [--threads N]

Each precision is timed on its own: fp32, and bf16 autocast (fp32 master weights and optimizer).
MFU is measured against this machine's own matmul peak in that precision, timed in the same run
(square matmuls at the model's width and at 1024/2048, best of them). The baseline is the nanoGPT
way of writing the loop: the same model, data, batch, optimizer and autocast, with no
checkpointing, validation, metrics, schedule or prefetch. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from albor.data.windows import WindowSampler
from albor.model.estimate import flops_per_token, param_count
from albor.model.gpt import GPT
from albor.model.presets import preset
from albor.train.loop import LoopSettings, Precision, train
from albor.train.optim import build_adamw

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(sizes: list[int], dtype: torch.dtype, seconds: float = 1.0) -> dict[str, float]:
    """Best matmul FLOP/s in `dtype` over square sizes, each timed for about `seconds`."""
    best, per = 0.0, {}
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.mm(a, b)
            reps += 1
        rate = 2 * n**3 * reps / (time.perf_counter() - t0)
        per[str(n)] = round(rate / 1e9, 1)
        best = max(best, rate)
    return {"peak_gflops": round(best / 1e9, 1), "by_size_gflops": per}  # type: ignore[dict-item]


def albor_loop(
    model: GPT, sampler: WindowSampler, steps: int, micro_batch: int, precision: Precision
) -> float:
    opt = build_adamw(model, 1e-3, 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"))
    settings = LoopSettings(
        max_steps=steps,
        warmup_steps=1,
        lr=1e-3,
        min_lr_ratio=0.1,
        micro_batch=micro_batch,
        grad_accum=1,
        grad_clip=1.0,
        eval_every=10**9,
        checkpoint_every=10**9,
        keep_checkpoints=1,
        log_every=10,
        precision=precision,
    )
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        train(
            model,
            opt,
            sampler,
            settings,
            device=torch.device("cpu"),
            run_dir=Path(d),
            eos_token_id=0,
            extra_files=[],
        )
        return time.perf_counter() - t0


def baseline_loop(
    model: GPT, sampler: WindowSampler, steps: int, micro_batch: int, precision: Precision
) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        batch = sampler.batch(step, 0, micro_batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(batch[:, :-1], targets=batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="alternating timed runs of each loop")
    ap.add_argument(
        "--precision",
        nargs="+",
        choices=sorted(DTYPES),
        default=["fp32", "bf16"],
        help="precisions to time (default: both)",
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = ap.parse_args()

    if args.threads:
        # One thread keeps the figures steady on a machine whose cores other work also uses.
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cfg = preset(args.preset)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=2_000_000, dtype=np.uint16)
    sampler = WindowSampler([tokens], args.seq_len, seed=0)
    tokens_per_step = args.micro_batch * args.seq_len
    fpt = flops_per_token(cfg, args.seq_len)
    sizes = sorted({cfg.hidden_size, 1024, 2048})

    def fresh() -> GPT:
        torch.manual_seed(0)
        model = GPT(cfg)
        model.init_weights()
        return model

    def figures(seconds: list[float], peak_gflops: float) -> dict[str, float]:
        best = min(seconds)
        tps = args.steps * tokens_per_step / best
        return {
            "seconds": round(best, 3),
            "tokens_per_s": round(tps, 1),
            "mfu": round(tps * fpt / (peak_gflops * 1e9), 4),
        }

    results: dict[str, Any] = {}
    for precision in args.precision:
        peak = matmul_peak(sizes, DTYPES[precision])
        albor_loop(fresh(), sampler, args.warmup, args.micro_batch, precision)
        times: dict[str, list[float]] = {"albor": [], "baseline": []}
        for _ in range(args.repeats):
            for name, loop in (("albor", albor_loop), ("baseline", baseline_loop)):
                times[name].append(loop(fresh(), sampler, args.steps, args.micro_batch, precision))

        albor = figures(times["albor"], peak["peak_gflops"])
        base = figures(times["baseline"], peak["peak_gflops"])
        results[precision] = {
            "matmul_peak": peak,
            "albor": albor,
            "baseline_plain_loop": base,
            "ratio_albor_over_baseline": round(albor["tokens_per_s"] / base["tokens_per_s"], 3),
        }
    speedup = None
    if {"fp32", "bf16"} <= set(results):
        fp32, bf16 = results["fp32"]["albor"], results["bf16"]["albor"]
        speedup = round(bf16["tokens_per_s"] / fp32["tokens_per_s"], 3)
    print(
        json.dumps(
            {
                "benchmark": "training throughput (CPU, fp32 and bf16 autocast)",
                "preset": args.preset,
                "parameters": param_count(cfg),
                "flops_per_token": fpt,
                "micro_batch": args.micro_batch,
                "seq_len": args.seq_len,
                "steps_timed": args.steps,
                "threads": threads,
                "cpus": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "results": results,
                "albor_bf16_over_fp32": speedup,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
