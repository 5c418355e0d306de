"""Training throughput and MFU of albor's loop, against a plain PyTorch loop in the same run.

    python benchmarks/train.py [--preset demo] [--steps 20] [--micro-batch 16] [--seq-len 256]
                               [--precision fp32 bf16] [--threads N]
    python benchmarks/train.py --device cuda [--preset 350m] [--seq-len 2048] [--micro-batch 8]
                               [--compile]

Each precision is timed on its own: fp32, and bf16 autocast (fp32 master weights and optimizer).
MFU is measured against the device's own matmul peak in that precision, timed in the same run
(square matmuls at the model's width and at 1024/2048 on a CPU, 8192 on a GPU, best of them); on
a GPU whose datasheet peak is known (H100, H200: 989 TFLOP/s dense bf16) the MFU against that
peak, the figure papers report, is given too. The baseline is the nanoGPT way of writing the
loop: the same model, data, batch, optimizer (fused AdamW on CUDA), autocast and `torch.compile`
setting, with no checkpointing, validation, metrics, schedule, health checks or prefetch. Both
loops are timed in the steady state: `--warmup` steps first (compilation, allocator), then
`--steps` timed steps. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
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
from albor.train.checkpoint import FullCheckpointer
from albor.train.loop import train
from albor.train.optim import build_adamw
from albor.train.settings import Precision, TrainSettings

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Dense datasheet peaks (TFLOP/s) of GPUs this benchmark is run on, by a substring of their name.
DATASHEET_TFLOPS = {"H100": {"bf16": 989.4, "fp32": 66.9}, "H200": {"bf16": 989.4, "fp32": 66.9}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    sizes: list[int], dtype: torch.dtype, device: torch.device, seconds: float = 1.0
) -> dict[str, Any]:
    """Best matmul FLOP/s in `dtype` over square sizes, each timed for about `seconds`."""
    best, per = 0.0, {}
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        torch.mm(a, b)
        sync(device)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(10 if device.type == "cuda" else 1):
                torch.mm(a, b)
                reps += 1
            sync(device)
        rate = 2 * n**3 * reps / (time.perf_counter() - t0)
        per[str(n)] = round(rate / 1e9, 1)
        best = max(best, rate)
    return {"peak_gflops": round(best / 1e9, 1), "by_size_gflops": per}


def albor_loop(
    model: GPT,
    sampler: WindowSampler,
    warmup: int,
    steps: int,
    micro_batch: int,
    precision: Precision,
    device: torch.device,
    compile: bool,
) -> float:
    """Seconds of `steps` steps after `warmup` steps, from the loop's own metrics log."""
    opt = build_adamw(model, 1e-3, 0.1, (0.9, 0.95), 1e-8, device)
    settings = TrainSettings(
        max_steps=warmup + steps,
        warmup_steps=1,
        lr=1e-3,
        min_lr_ratio=0.1,
        micro_batch=micro_batch,
        grad_accum=1,
        grad_clip=1.0,
        eval_every=10**9,
        checkpoint_every=10**9,
        keep_checkpoints=1,
        # Log lines at the end of the warmup and of the run, as few as that allows.
        log_every=math.gcd(warmup, steps),
        precision=precision,
        compile=compile,
    )
    with tempfile.TemporaryDirectory() as d:
        train(
            model,
            opt,
            sampler,
            settings,
            device=device,
            run_dir=Path(d),
            checkpointer=FullCheckpointer(eos_token_id=0),
        )
        lines = [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed_s"] for r in lines if "elapsed_s" in r}
    return float(elapsed[warmup + steps] - elapsed[warmup])


def baseline_loop(
    model: GPT,
    sampler: WindowSampler,
    warmup: int,
    steps: int,
    micro_batch: int,
    precision: Precision,
    device: torch.device,
    compile: bool,
) -> float:
    """The nanoGPT way: forward, backward, clip, step; timed over `steps` after `warmup`."""
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda or None
    )
    forward = torch.compile(model) if compile else model
    model.train()
    t0 = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            t0 = time.perf_counter()
        batch = sampler.batch(step, 0, micro_batch).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = forward(batch[:, :-1], targets=batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--preset", default=None, help="model preset (default: demo; 350m on cuda)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps first")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: 16; 8 on cuda")
    ap.add_argument("--seq-len", type=int, default=None, help="default: 256; 2048 on cuda")
    ap.add_argument("--repeats", type=int, default=2, help="alternating timed runs of each loop")
    ap.add_argument("--compile", action="store_true", help="torch.compile in both loops")
    ap.add_argument(
        "--precision",
        nargs="+",
        choices=sorted(DTYPES),
        default=None,
        help="precisions to time (default: fp32 and bf16; bf16 on cuda)",
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to this PyTorch")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    preset_name = args.preset or ("350m" if cuda else "demo")
    micro_batch = args.micro_batch or (8 if cuda else 16)
    seq_len = args.seq_len or (2048 if cuda else 256)
    precisions = args.precision or (["bf16"] if cuda else ["fp32", "bf16"])

    if args.threads:
        # One thread keeps the figures steady on a machine whose cores other work also uses.
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cfg = preset(preset_name, max_seq_len=max(seq_len, preset(preset_name).max_seq_len))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=4_000_000, dtype=np.uint16)
    sampler = WindowSampler([tokens], seq_len, seed=0)
    tokens_per_step = micro_batch * seq_len
    fpt = flops_per_token(cfg, seq_len)
    sizes = [8192] if cuda else sorted({cfg.hidden_size, 1024, 2048})
    name = torch.cuda.get_device_name(device) if cuda else platform.processor()
    datasheet = next((v for k, v in DATASHEET_TFLOPS.items() if cuda and k in name), None)

    def fresh() -> GPT:
        torch.manual_seed(0)
        model = GPT(cfg)
        model.init_weights()
        return model.to(device)

    def figures(seconds: list[float], peak_gflops: float, precision: str) -> dict[str, Any]:
        best = min(seconds)
        tps = args.steps * tokens_per_step / best
        out: dict[str, Any] = {
            "seconds": round(best, 3),
            "tokens_per_s": round(tps, 1),
            "mfu": round(tps * fpt / (peak_gflops * 1e9), 4),
        }
        if datasheet is not None:
            out["mfu_datasheet"] = round(tps * fpt / (datasheet[precision] * 1e12), 4)
        return out

    loops = {"albor": albor_loop, "baseline": baseline_loop}
    results: dict[str, Any] = {}
    for precision in precisions:
        peak = matmul_peak(sizes, DTYPES[precision], device)
        times: dict[str, list[float]] = {"albor": [], "baseline": []}
        for _ in range(args.repeats):
            for key, loop in loops.items():
                model = fresh()
                times[key].append(
                    loop(
                        model,
                        sampler,
                        args.warmup,
                        args.steps,
                        micro_batch,
                        precision,
                        device,
                        args.compile,
                    )
                )
                del model
                if cuda:
                    torch.cuda.empty_cache()
        albor = figures(times["albor"], peak["peak_gflops"], precision)
        base = figures(times["baseline"], peak["peak_gflops"], precision)
        results[precision] = {
            "matmul_peak": peak,
            "albor": albor,
            "baseline_plain_loop": base,
            "ratio_albor_over_baseline": round(albor["tokens_per_s"] / base["tokens_per_s"], 3),
        }
        if cuda:
            results[precision]["peak_memory_gib"] = round(
                torch.cuda.max_memory_allocated() / 2**30, 2
            )
    speedup = None
    if {"fp32", "bf16"} <= set(results):
        fp32, bf16 = results["fp32"]["albor"], results["bf16"]["albor"]
        speedup = round(bf16["tokens_per_s"] / fp32["tokens_per_s"], 3)
    print(
        json.dumps(
            {
                "benchmark": f"training throughput ({args.device})",
                "device": name,
                "preset": preset_name,
                "parameters": param_count(cfg),
                "flops_per_token": fpt,
                "micro_batch": micro_batch,
                "seq_len": seq_len,
                "compile": args.compile,
                "steps_timed": args.steps,
                "warmup_steps": args.warmup,
                "threads": threads,
                "cpus": os.cpu_count(),
                "machine": platform.machine(),
                "torch": torch.__version__,
                "datasheet_tflops": datasheet,
                "results": results,
                "albor_bf16_over_fp32": speedup,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
