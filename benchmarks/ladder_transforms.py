"""Pruning and quantization side by side against the full model (the named baseline), in one run.

    python benchmarks/ladder_transforms.py [--model DIR] [--data DIR] [--workdir DIR]
                                           [--sparsity 0.5] [--eval-tokens 16384]
                                           [--threads N] [--teacher-steps 800]

On the demo model (`--model`, default the 800-step teacher that benchmarks/distill.py trains
under /tmp/albor-distill: the `demo` preset, vocab 4096, on the standard library; where it or
`--data` is missing it is trained here through albor's stages the same way), albor runs, as a user
runs them (`albor.stage.run_stage`), the `prune` stage three times (magnitude and Wanda at
`--sparsity`, and Wanda with 2:4 structure) and the `quantize` stage with every variant (int8,
int4 in groups of 32, GGUF Q8_0, Q4_0, Q4_K_M). Every figure but two is read from the stages'
manifests: bits/byte on the first `--eval-tokens` of the val split (both stages score the same
windows), size on disk and decode ms/token (albor's engine or llama.cpp, on this CPU). The two a
prune manifest does not hold, KL(full || pruned) per token and top-1 agreement with the full
model, and the pruned models' decode timing, come from the quantize stage's own scoring and
timing functions on the same windows. Every row carries its bits/byte increase over the full
model's. Prints one JSON object. The stages' artifacts stay under `--workdir`; `albor eval
compare` shows them as a table.

Measured here (2 cores shared with a CI run, the default arguments, 16,384 val tokens in windows
of 256): the full model 1.2594 bits/byte, 16.8 MB, 12.8 ms/token (albor's engine).
At 50% sparsity (files and timing as the full model's: the zeros are stored dense):
magnitude 1.3015 (+3.3%, KL 0.133, top-1 75.2%); Wanda 1.3035 (+3.5%, KL 0.144, top-1 74.7%):
on this 4M-parameter model Wanda does not beat magnitude; Wanda 2:4 1.3955 (+10.8%, KL 0.383,
top-1 60.1%). Quantized: int8 1.2594 (-0.003%, KL 0.00013, top-1 99.3%, 7.4 MB, 31.5 ms/token),
int4/32 1.2621 (+0.21%, KL 0.0145, top-1 91.5%, 6.6 MB, 28.0 ms/token), GGUF Q8_0 1.2595
(+0.006%, KL 0.00025, top-1 98.8%, 4.6 MB, 0.34 ms/token in llama.cpp), Q4_0 1.2640 (+0.37%,
KL 0.0186, top-1 90.3%, 3.0 MB, 0.27 ms), Q4_K_M 1.2614 (+0.16%, KL 0.0116, top-1 92.4%,
2.9 MB, 0.26 ms). FALSIFY-ALBOR-009 holds (int8 within 1%, int4 within 10%). albor's int8 /
int4 engine decodes slower than its fp32 one at this size (per-token Python and dequantizing
cost more than the smaller weights save). Quantize took 145 s, the prunings 19, 40 and 54 s.
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

DISTILL = Path(tempfile.gettempdir()) / "albor-distill"
PRUNINGS = {
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "wanda-2:4": {"method": "wanda", "structure": "2:4"},
}
ROW = ("val_bpb", "val_bpb_increase", "kl_mean", "top1_agreement", "bytes_disk")


def demo_model(model: Path, data: Path, workdir: Path, steps: int) -> tuple[Path, Path]:
    """`model` and `data` where both exist; otherwise the demo preset trained `steps` steps on
    the default manifest's data stages under `workdir`, as benchmarks/distill.py trains it."""
    if (model / "model.safetensors").is_file() and (data / "index.json").is_file():
        return model, data
    data = build_data(workdir / "data")
    recipe = training_recipe()
    model = workdir / f"teacher-{steps}"
    settings = {
        **recipe,
        "data": str(data),
        "precision": "auto",
        "eval_every": 10**6,
        "checkpoint_every": 10**6,
        "max_steps": steps,
        "output": str(model),
    }
    module = load_stage("pretrain")
    run_stage(module, validate(module.Config, settings, "pretrain"))
    return model, data


def stage(kind: str, settings: dict[str, Any]) -> tuple[Path, dict[str, Any], float]:
    """Run stage `kind` as `albor KIND apply` does: its output, manifest metrics, wall seconds."""
    module = load_stage(kind)
    cfg = validate(module.Config, settings, kind)
    t0 = time.perf_counter()
    result = run_stage(module, cfg)
    return result.output, result.manifest["metrics"], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=DISTILL / "teacher-800")
    ap.add_argument("--data", type=Path, default=DISTILL / "data" / "tokenize")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "albor-ladder")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--teacher-steps", type=int, default=800, help="Only where --model is missing.")
    args = ap.parse_args()

    from albor.data.bpe import load_tokenizer, token_byte_lengths

    # The figures a prune manifest lacks come from the quantize stage's own measuring
    # functions, so that pruned and quantized rows are measured alike.
    from albor.evals.fidelity import fidelity
    from albor.model.load import load_model
    from albor.stages.quantize import decode_ms, scored_windows

    model_dir, data = demo_model(args.model, args.data, args.workdir, args.teacher_steps)
    threads = {"threads": args.threads} if args.threads else {}
    settings = {"model": str(model_dir), "data": str(data), "eval_tokens": args.eval_tokens}
    qsettings = {**settings, **threads, "output": str(args.workdir / "quantize")}
    quantized, qm, quantize_s = stage("quantize", qsettings)
    full_row = qm["variants"]["full"]
    qcfg = validate(load_stage("quantize").Config, qsettings, "quantize")
    full, mc = load_model(model_dir)
    scored, _ = scored_windows(qcfg, qcfg.seq_len or mc.max_seq_len)
    token_bytes = token_byte_lengths(load_tokenizer(data))

    pruned: dict[str, dict[str, Any]] = {}
    artifacts = {}
    for name, how in PRUNINGS.items():
        sparsity = {} if "structure" in how else {"sparsity": args.sparsity}
        out, pm, seconds = stage(
            "prune",
            {
                **settings,
                "output": str(args.workdir / f"prune-{name.replace(':', '')}"),
                **how,
                **sparsity,
            },
        )
        artifacts[name] = str(out)
        model, _ = load_model(out)
        scores = fidelity(full, model, scored, token_bytes)
        if abs(scores["val_bpb"] - pm["val_bpb_after"]) > 1e-4:
            # Both stages score the first eval_tokens of the val split in windows of the context.
            print(
                f"{name}: prune scored {pm['val_bpb_after']}, quantize's scoring {scores}",
                file=sys.stderr,
            )
        pruned[name] = {
            "sparsity": round(pm["sparsity"], 6),
            "val_bpb": pm["val_bpb_after"],
            "val_bpb_increase": round(pm["val_bpb_after"] / full_row["val_bpb"] - 1, 6),
            "kl_mean": scores["kl_mean"],
            "top1_agreement": scores["top1_agreement"],
            # Zeros are stored as zeros: a dense file and dense kernels, the full model's cost.
            "bytes_disk": (out / "model.safetensors").stat().st_size,
            "decode_ms_per_token": decode_ms(qcfg, out, "torch"),
            "prune_s": round(seconds, 1),
        }
    quant = {
        name: {k: r[k] for k in (*ROW, "decode_ms_per_token")}
        for name, r in qm["variants"].items()
        if name != "full"
    }
    result = {
        "benchmark": "prune (magnitude vs Wanda vs 2:4) and quantize vs the full model, demo model",
        "albor": albor.__version__,
        "threads": args.threads or os.cpu_count(),
        "model": str(model_dir),
        "val_tokens": qm["val_tokens"],
        "seq_len": qm["seq_len"],
        "baseline": {"full": {k: full_row[k] for k in (*ROW, "decode_ms_per_token")}},
        "prune": pruned,
        "quantize": quant,
        "quantize_s": round(quantize_s, 1),
        "artifacts": {"quantize": str(quantized), **artifacts},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
