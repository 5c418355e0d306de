"""Distillation against no distillation (the specification's FALSIFY-ALBOR-005), in one run.

    python benchmarks/distill.py [--workdir DIR] [--teacher-steps 800] [--student-steps 300]
                                 [--temperature 1.0 2.0 ...] [--alpha 0.5] [--top-k 32]

On the Python standard library (the default manifest's data stages, vocab 4096, built once under
`--workdir` and reused), albor's pipeline trains a teacher (the `demo` preset: 4 layers, width
256, `--teacher-steps` steps), then two students of the same small shape (2 layers, width 128)
from the same initialisation, on the same batches for the same steps: one with the `pretrain`
stage (next-token cross-entropy alone), one with the `distill` stage (the teacher's top-k
distribution at temperature T, weighed by alpha, plus the cross-entropy). Both are scored as the
stages score them: bits per byte of the next-token loss on the same validation windows.

The contract holds when the distilled student's validation bits/byte is below the undistilled
one's, judged at the first `--temperature` (the stage's default, 1); every further temperature
trains one more student, reported under "other_temperatures" so that the settings that lose are
recorded too. Prints one JSON object with the models' figures and the difference.

Measured here (2 cores, the default arguments): teacher 1.199 bits/byte; student without
distillation 1.743; distilled at T=1 1.677 (holds); at T=2 1.867 (worse than none).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    import albor
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import albor

from ladder_data import build_data, training_recipe

from albor.config import validate
from albor.stage import load_stage, run_stage

STUDENT = {
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 352,
}


def train(kind: str, settings: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Run training stage `kind` on `settings`: its manifest metrics and wall seconds."""
    module = load_stage(kind)
    cfg = validate(module.Config, settings, kind)
    t0 = time.perf_counter()
    result = run_stage(module, cfg)
    return result.manifest["metrics"], time.perf_counter() - t0


def figures(m: dict[str, Any], seconds: float) -> dict[str, Any]:
    keys = ("parameters", "steps", "tokens", "final_loss", "val_loss", "val_bpb", "tokens_per_s")
    return {**{k: m.get(k) for k in keys}, "wall_s": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "albor-distill")
    ap.add_argument("--teacher-steps", type=int, default=800)
    ap.add_argument("--student-steps", type=int, default=300)
    ap.add_argument("--temperature", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    args = ap.parse_args()

    data = build_data(args.workdir / "data")
    recipe = training_recipe()  # the ladder teacher's model and recipe, trained here by steps
    common = {
        **recipe,
        "data": str(data),
        "precision": "auto",
        "eval_every": 10**6,  # validated once, at the end
        "eval_tokens": args.eval_tokens,
        "checkpoint_every": 10**6,
    }
    teacher_dir = args.workdir / f"teacher-{args.teacher_steps}"
    teacher, teacher_s = train(
        "pretrain",
        {
            **common,
            "max_steps": args.teacher_steps,
            "warmup_steps": min(recipe["warmup_steps"], args.teacher_steps // 10),
            "output": str(teacher_dir),
        },
    )
    vocab = {"vocab_size": recipe.get("architecture", {}).get("vocab_size") or None}
    student = {
        **common,
        "architecture": {**STUDENT, **{k: v for k, v in vocab.items() if v}},
        "max_steps": args.student_steps,
        "warmup_steps": min(recipe["warmup_steps"], args.student_steps // 10),
    }
    plain, plain_s = train("pretrain", {**student, "output": str(args.workdir / "student-plain")})
    students = []
    for t in args.temperature:
        m, seconds = train(
            "distill",
            {
                **student,
                "output": str(args.workdir / f"student-distilled-t{t:g}"),
                "teacher": str(teacher_dir),
                "temperature": t,
                "alpha": args.alpha,
                "top_k": args.top_k,
            },
        )
        row = {**figures(m, seconds), "temperature": t, "alpha": args.alpha, "top_k": args.top_k}
        students.append((row, m["val_bpb"]))
    (distilled, distilled_bpb), others = students[0], students[1:]
    out = {
        "benchmark": "distillation vs none (FALSIFY-ALBOR-005), stdlib corpus",
        "albor": albor.__version__,
        "threads": os.cpu_count(),
        "teacher": figures(teacher, teacher_s),
        "student_pretrained": figures(plain, plain_s),
        "student_distilled": distilled,
        "val_bpb_distilled_minus_plain": round(distilled_bpb - plain["val_bpb"], 5),
        "holds": distilled_bpb < plain["val_bpb"],
        "other_temperatures": [
            {**row, "val_bpb_minus_plain": round(bpb - plain["val_bpb"], 5)} for row, bpb in others
        ],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
