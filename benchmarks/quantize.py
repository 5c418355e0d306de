"""Decode speed of albor's weight-only int8 / int4 linears against the fp32 model (the named
baseline), for each way of running them: torch's fused CPU kernels, dequantizing the weight on
every call, and torchao's int8 weight-only when torchao imports here.

    python benchmarks/quantize.py [--preset demo] [--model DIR] [--threads 2]
                                  [--prompt-tokens 128] [--new-tokens 64] [--repeats 5]
                                  [--group-size 32]

The model is a random-init `--preset` (the cost of a token does not depend on the values), or a
checkpoint dir given with `--model`. Every variant decodes the same prompt greedily with albor's
KV-cache engine (`albor.infer.engine.generate`) after a warm-up, `--repeats` rounds with the
variants taking turns (a shared CPU's load then falls on all of them); the figure is the median
ms per decoded token and its ratio to fp32. Also: bytes of resident weights.
Prints one JSON object; the choice of kernels in `albor.model.transforms.quantize` rests on it.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from albor.infer.engine import generate
from albor.model.gpt import GPT
from albor.model.hf import load_pretrained, to_hf_config
from albor.model.presets import preset
from albor.model.quantized import (
    Int4Linear,
    Int8Linear,
    Spec,
    load_quantized,
    memory_bytes,
    save_quantized,
    target_modules,
)


def decode_run(model: GPT, prompt: list[int], new_tokens: int) -> float:
    """Mean ms per decoded token of one greedy run (prefill and first token excluded)."""
    stamps = [time.perf_counter() for _tok in generate(model, prompt, max_new_tokens=new_tokens)]
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000


def _set(model: GPT, kind: type[nn.Module], change: Callable[[Any], None]) -> GPT:
    for m in model.modules():
        if isinstance(m, kind):
            change(m)
    return model


def _int4_without_kernel(directory: Path) -> GPT:
    from safetensors.torch import load_file

    model, _ = load_quantized(directory)

    tensors = load_file(directory / "model.safetensors")
    for name in target_modules_of(model):
        parent, _, child = name.rpartition(".")
        old = model.get_submodule(name)
        assert isinstance(old, Int4Linear)
        new = Int4Linear(
            tensors[f"{name}.qweight"],
            tensors[f"{name}.scales"],
            tensors[f"{name}.mins"],
            old.group_size,
            old.bias,
            use_kernel=False,
        )
        setattr(model.get_submodule(parent), child, new)
    return model


def target_modules_of(model: GPT) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, Int4Linear)]


def _torchao_int8(base: GPT) -> GPT | str:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except Exception as e:  # not installed, or built for another torch
        return f"torchao unavailable: {type(e).__name__}: {e}"
    model = copy.deepcopy(base)
    targets = set(target_modules(model))
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, name: name in targets)
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--group-size", type=int, default=32)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model is not None:
        base, cfg = load_pretrained(args.model)
    else:
        cfg = preset(args.preset)
        base = GPT(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_tokens,)).tolist()
    results: dict[str, Any] = {}

    models: dict[str, GPT] = {}

    def record(name: str, model: GPT | str) -> None:
        if isinstance(model, str):
            results[name] = {"skipped": model}
            return
        list(generate(model, prompt[:8], max_new_tokens=4))  # warm-up
        models[name] = model
        results[name] = {"weights_bytes": memory_bytes(model)}

    record("fp32", base)
    with tempfile.TemporaryDirectory() as tmp:
        hf = to_hf_config(cfg, eos_token_id=0)
        int8_dir, int4_dir = Path(tmp) / "int8", Path(tmp) / "int4"
        save_quantized(base, Spec("int8"), int8_dir, hf)
        save_quantized(base, Spec("int4", args.group_size), int4_dir, hf)
        record("int8_fused_torch", load_quantized(int8_dir)[0])
        dequant8 = _set(
            load_quantized(int8_dir)[0], Int8Linear, lambda m: setattr(m, "fused", False)
        )
        record("int8_dequantize_per_call", dequant8)
        record("int4_fused_torch", load_quantized(int4_dir)[0])
        record("int4_dequantize_per_call", _int4_without_kernel(int4_dir))
    record("int8_torchao", _torchao_int8(base))
    results["int8_torchao"].pop("weights_bytes", None)  # its tensor subclass hides the bytes
    # Round-robin, so that load from other processes on a shared CPU falls on every variant.
    runs: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            runs[name].append(decode_run(model, prompt, args.new_tokens))
    for name, ms in runs.items():
        results[name]["decode_ms_per_token"] = round(statistics.median(ms), 3)
        results[name]["decode_ms_per_token_runs"] = [round(m, 3) for m in ms]
    fp32 = results["fp32"]["decode_ms_per_token"]
    for r in results.values():
        if "decode_ms_per_token" in r:
            r["ratio_vs_fp32"] = round(r["decode_ms_per_token"] / fp32, 3)
    print(
        json.dumps(
            {
                "benchmark": "quantize",
                "baseline": "fp32",
                "model": str(args.model) if args.model else f"random-init {args.preset}",
                "group_size": args.group_size,
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens,
                "repeats": args.repeats,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "cpu": platform.processor() or platform.machine(),
                "python": sys.version.split()[0],
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
