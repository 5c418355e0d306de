"""Training throughput and MFU of albor's loop, against a plain PyTorch loop in the same run.

    python benchmarks/train.py [--preset demo] [--steps 20] [--micro-batch 16] [--seq-len 256]

MFU is measured against this machine's own fp32 matmul peak, timed in the same run (square
matmuls at the model's width and at 1024/2048, best of them). The baseline is the nanoGPT way of
writing the loop: the same model, data, batch and optimizer, with no checkpointing, validation,
metrics or schedule. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from albor.data.windows import WindowSampler
from albor.model.estimate import flops_per_token, param_count
from albor.model.gpt import GPT
from albor.model.presets import preset
from albor.train.loop import LoopSettings, train
from albor.train.optim import build_adamw


def matmul_peak(sizes: list[int], seconds: float = 1.0) -> dict[str, float]:
    """Best fp32 matmul FLOP/s over square sizes, each timed for about `seconds`."""
    best, per = 0.0, {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.mm(a, b)
            reps += 1
        rate = 2 * n**3 * reps / (time.perf_counter() - t0)
        per[str(n)] = round(rate / 1e9, 1)
        best = max(best, rate)
    return {"peak_gflops": round(best / 1e9, 1), "by_size_gflops": per}  # type: ignore[dict-item]


def albor_loop(model: GPT, sampler: WindowSampler, steps: int, micro_batch: int) -> float:
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


def baseline_loop(model: GPT, sampler: WindowSampler, steps: int, micro_batch: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        batch = sampler.batch(step, 0, micro_batch)
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
    args = ap.parse_args()

    threads = torch.get_num_threads()
    cfg = preset(args.preset)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=2_000_000, dtype=np.uint16)
    sampler = WindowSampler([tokens], args.seq_len, seed=0)
    tokens_per_step = args.micro_batch * args.seq_len
    fpt = flops_per_token(cfg, args.seq_len)
    peak = matmul_peak(sorted({cfg.hidden_size, 1024, 2048}))

    def fresh() -> GPT:
        torch.manual_seed(0)
        model = GPT(cfg)
        model.init_weights()
        return model

    albor_loop(fresh(), sampler, args.warmup, args.micro_batch)
    results: dict[str, list[float]] = {"albor": [], "baseline": []}
    for _ in range(args.repeats):
        results["albor"].append(albor_loop(fresh(), sampler, args.steps, args.micro_batch))
        results["baseline"].append(baseline_loop(fresh(), sampler, args.steps, args.micro_batch))

    def figures(seconds: list[float]) -> dict[str, float]:
        best = min(seconds)
        tps = args.steps * tokens_per_step / best
        return {
            "seconds": round(best, 3),
            "tokens_per_s": round(tps, 1),
            "mfu": round(tps * fpt / (peak["peak_gflops"] * 1e9), 4),
        }

    albor, base = figures(results["albor"]), figures(results["baseline"])
    print(
        json.dumps(
            {
                "benchmark": "training throughput (CPU, fp32)",
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
                "matmul_fp32": peak,
                "albor": albor,
                "baseline_plain_loop": base,
                "ratio_albor_over_baseline": round(albor["tokens_per_s"] / base["tokens_per_s"], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
