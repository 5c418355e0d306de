"""The teacher's top-k log-probabilities (`albor.train.distill.topk_teacher`, run on every
distillation step of an online teacher and on every window by the `teacher_logits` stage) against
the plain PyTorch way to write them (the named baseline):

    torch.log_softmax(logits.float() / T, dim=-1).topk(k)

    python benchmarks/teacher_topk.py [--rows 4096] [--vocab 4096] [--top-k 32]
                                      [--temperature 1 2] [--repeats 7] [--threads 2]

The default shape is one micro-batch of the default ladder's distill stage (16 windows of 256
tokens, vocab 4096, top 32). Logits are random normal with a spread like a trained model's; the
cost does not depend on their values. For each input precision (fp32, and bf16 as a bf16 teacher
gives them) and temperature, both ways run `--repeats` rounds taking turns (a shared CPU's load
then falls on both) after a warm-up; the figure is the median milliseconds of a call and the
baseline's time over albor's. Both must pick the same ids; the largest difference of their
log-probabilities is printed beside the times. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

try:
    import albor
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import albor

from albor.train.distill import topk_teacher

Way = Callable[[torch.Tensor, int, float], tuple[torch.Tensor, torch.Tensor]]


def baseline(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log_softmax over the whole vocabulary in fp32, then its top k."""
    with torch.no_grad():
        values, ids = torch.log_softmax(logits.float() / temperature, dim=-1).topk(k, dim=-1)
    return ids, values


def timed(way: Way, logits: torch.Tensor, k: int, temperature: float) -> float:
    t0 = time.perf_counter()
    way(logits, k, temperature)
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=16 * 256, help="positions per call")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--temperature", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    logits32 = torch.randn(args.rows, args.vocab, generator=generator) * 3.0
    rows = []
    for name, logits in (("fp32", logits32), ("bf16", logits32.to(torch.bfloat16))):
        for temperature in args.temperature:
            ways: dict[str, Way] = {"baseline": baseline, "albor": topk_teacher}
            for way in ways.values():
                way(logits, args.top_k, temperature)  # warm-up
            times: dict[str, list[float]] = {key: [] for key in ways}
            for _ in range(args.repeats):
                for key, way in ways.items():
                    times[key].append(timed(way, logits, args.top_k, temperature))
            ids_b, lp_b = baseline(logits, args.top_k, temperature)
            ids_a, lp_a = topk_teacher(logits, args.top_k, temperature)
            ms = {key: statistics.median(t) for key, t in times.items()}
            rows.append(
                {
                    "input": name,
                    "temperature": temperature,
                    "baseline_ms": round(ms["baseline"], 2),
                    "albor_ms": round(ms["albor"], 2),
                    "speedup": round(ms["baseline"] / ms["albor"], 3),
                    # Ties of equal logits may be listed in either order: compare as sets.
                    "same_ids": bool(
                        (ids_a.sort(dim=-1).values == ids_b.sort(dim=-1).values).all()
                    ),
                    "max_abs_logprob_diff": float(
                        (lp_a.sort(-1).values - lp_b.sort(-1).values).abs().max()
                    ),
                }
            )
    out = {
        "benchmark": "teacher top-k log-probabilities vs log_softmax + topk",
        "albor": albor.__version__,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "rows": args.rows,
        "vocab": args.vocab,
        "top_k": args.top_k,
        "results": rows,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
