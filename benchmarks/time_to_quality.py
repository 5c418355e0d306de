"""Time to quality: albor's pretrain stage against the plain PyTorch loop of benchmarks/train.py,
each given the same wall-clock budget, then both scored alike on the validation split.

    python benchmarks/time_to_quality.py [--budget 300] [--precision auto|fp32|bf16]
                                         [--workdir DIR] [--data DIR] [--threads N]
                                         [--no-compile] [--warmup-steps N] [--val-tokens N]
                                         [--skip-steps N]
                                         [--variants optimizer=muon precision=fp32 ...]

Data: the Python standard library through albor's own stages (the packaged default manifest,
ingest -> ... -> tokenize, with a vocab-8192 BPE tokenizer), built once under `--workdir` and
reused (or any tokenize artifact given with `--data`).

Model: the `demo` preset (4 layers, width 256) with the tokenizer's vocabulary, about 5.3M
parameters; windows of 256 tokens, 8 per step; the default recipe's AdamW settings and
learning-rate schedule (linear warmup, cosine decay to a floor) stretched over the time budget.

- "albor": the pretrain stage through `run_stage`, as a user runs it, with `max_time` set to the
  budget (and `max_steps` out of reach), no validation during training, no intermediate
  checkpoints. `max_time` counts the loop's wall clock; the final save and the stage's own
  work around the loop come on top and show in `wall_s`.
- "plain": the nanoGPT way of writing the loop (benchmarks/train.py `baseline_loop`): the same
  GPT, initialised under the same seed, the same windows (`WindowSampler` on the same train
  split, the same seed), AdamW with the same parameter groups, the same learning rate at every
  step (albor's schedule function, fed the plain loop's own clock), the same autocast; forward,
  backward, clip, step, until the wall clock has spent the budget. No prefetch, metrics,
  checkpoints or health checks.

Both use `torch.compile` unless `--no-compile`, and the budget counts the compilation for both:
each contender runs in a fresh process with an empty inductor cache, so neither finds the other's
kernels compiled. Both compute in the same precision: `--precision auto` is resolved once by
albor's own rule (the pretrain preflight's `precision: auto`) and given to both. After training,
each model is scored in fp32 by albor's scorer (`evals.perplexity.score_model`) on the same
consecutive validation windows the pretrain stage validates on, with the same bytes per token:
validation bits per byte.

Tokens/s is given two ways: over the whole budget (what the budget bought, compilation included)
and in the steady state (from the first logged step at or after `--skip-steps` to the last logged
one, the same step marks for both). `--variants` times albor again with other settings, each a
comma-separated list of `key=value` overrides of the pretrain config (`precision=fp32`,
`compile=false,micro_batch=16`), reported under "variants" with the ratios to the plain loop, so
that settings which lose are recorded too. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

try:
    import albor
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import albor

from ladder_data import build_data, training_recipe

from albor.config import apply_overrides, validate
from albor.errors import AlborError, ConfigError

VOCAB_SIZE = 8192
SEQ_LEN = 256
MICRO_BATCH = 8
LOG_EVERY = 10  # albor's metrics lines, and the plain loop's loss readings (nanoGPT's interval)


def recipe_pretrain(data: Path) -> dict[str, Any]:
    """The default manifest's teacher settings (lr, warmup, schedule floor, weight decay...)."""
    return {**training_recipe(), "data": str(data)}


def resolve_precision(settings: dict[str, Any]) -> tuple[str, str]:
    """The precision both contenders compute in, and why: as set, or "auto" resolved by albor's
    own rule (the pretrain preflight's: bf16 where a matmul at the model's width runs faster
    in bf16 than in fp32 on this CPU, measured now)."""
    from albor.stages import pretrain
    from albor.train import preflight

    cfg = validate(pretrain.Config, settings, "--precision")
    found = preflight.setup(cfg, cfg)
    return found.precision, found.precision_reason


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def steady_rate(marks: list[tuple[int, int, float]], skip: int) -> float | None:
    """Tokens/s between the first mark at or after step `skip` and the last mark; marks are
    (step, tokens, elapsed seconds). None when fewer than two marks fall in that range."""
    after = [m for m in marks if m[0] >= skip]
    if len(after) < 2 or after[-1][2] <= after[0][2]:
        return None
    return (after[-1][1] - after[0][1]) / (after[-1][2] - after[0][2])


def score(model: Any, data_dir: Path, seq_len: int, val_tokens: int) -> dict[str, Any]:
    """Validation loss and bits per byte as the pretrain stage measures them (fp32, the same
    windows and token byte lengths)."""
    from albor.data.windows import eval_windows
    from albor.evals.perplexity import score_model
    from albor.train.run import TokenData

    data = TokenData.open(data_dir, seq_len, 0)
    t0 = time.perf_counter()
    windows = eval_windows(data.val_shards, seq_len, val_tokens, MICRO_BATCH)
    s = score_model(model, windows, data.token_bytes, "cpu")
    return {
        "val_loss": round(s.loss, 5),
        "val_bits_per_byte": round(s.bits_per_byte, 5),
        "val_tokens": s.tokens,
        "score_s": round(time.perf_counter() - t0, 2),
    }


def _child_setup(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def run_albor(settings: dict[str, Any], label: str, val_tokens: int, skip: int) -> dict[str, Any]:
    """Train with the pretrain stage (in this fresh process), then score the final weights."""
    from albor.model.load import load_model
    from albor.stage import load_stage, run_stage
    from albor.stages import pretrain

    _child_setup(settings.get("threads"))
    cfg = validate(pretrain.Config, settings, label)
    t0 = time.perf_counter()
    result = run_stage(load_stage("pretrain"), cfg, name=label, force=True)
    wall = time.perf_counter() - t0
    m = result.manifest.get("metrics", {})
    lines = [json.loads(x) for x in (result.output / "metrics.jsonl").read_text().splitlines()]
    marks = [(r["step"], r["tokens"], r["elapsed_s"]) for r in lines if "elapsed_s" in r]
    loop_s = marks[-1][2] if marks else float("nan")
    steady = steady_rate(marks, skip)
    model, _ = load_model(result.output)
    return {
        "precision": m.get("precision"),
        "optimizer": m.get("optimizer"),
        "compile": cfg.compile,
        "parameters": m.get("parameters"),
        "steps": m.get("steps"),
        "tokens": m.get("tokens"),
        "train_loss": m.get("final_loss"),
        "tokens_per_s": m.get("tokens_per_s"),
        "steady_tokens_per_s": round(steady, 1) if steady is not None else None,
        "loop_s": loop_s,
        # max_time counts the time in training steps: the loop's bookkeeping between steps
        # (metrics, progress) comes on top, and shows here.
        "train_time_s": m.get("train_time_s"),
        "ended_by": m.get("ended_by"),
        "wall_s": round(wall, 2),
        **score(model, cfg.data or Path(), cfg.seq_len or SEQ_LEN, val_tokens),
    }


def run_plain(settings: dict[str, Any], val_tokens: int, skip: int) -> dict[str, Any]:
    """The nanoGPT way, in this fresh process: the same model, data, optimizer and schedule as
    the albor run, written as one plain loop that stops when the budget is spent."""
    import torch

    from albor.model.gpt import GPT
    from albor.stages import pretrain
    from albor.train.optim import lr_at, time_progress
    from albor.train.run import TokenData
    from albor.train.settings import model_config

    _child_setup(settings.get("threads"))
    t_start = time.perf_counter()
    cfg = validate(pretrain.Config, settings, "plain")
    assert cfg.max_time is not None
    budget = cfg.max_time
    seq_len = cfg.seq_len or SEQ_LEN
    data = TokenData.open(cfg.data or Path(), seq_len, cfg.seed)
    sampler = data.sampler
    model = GPT(model_config(cfg))
    # The seed is drawn right before the init, as albor's run does, so both start equal.
    torch.manual_seed(cfg.seed)
    model.init_weights()
    # nanoGPT's configure_optimizers: weight decay on matrices and embeddings only.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    forward = torch.compile(model) if cfg.compile else model
    bf16 = cfg.precision == "bf16"
    tokens_per_step = cfg.micro_batch * seq_len
    model.train()
    marks: list[tuple[int, int, float]] = []
    loss_value = float("nan")
    step = 0
    warmup_end: float | None = None
    t0 = time.perf_counter()
    elapsed = 0.0
    while elapsed < budget:
        # albor's own schedule function, so that the two runs cannot differ in it: warmup in
        # steps, then the cosine decay over the time left when warmup ended.
        if warmup_end is None and step >= cfg.warmup_steps:
            warmup_end = elapsed
        lr = lr_at(
            step,
            lr=cfg.lr,
            warmup_steps=cfg.warmup_steps,
            max_steps=cfg.max_steps,
            min_lr_ratio=cfg.min_lr_ratio,
            time_progress=time_progress(elapsed, warmup_end, budget),
        )
        for group in opt.param_groups:
            group["lr"] = lr
        batch = sampler.batch(step, 0, cfg.micro_batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = forward(batch[:, :-1], targets=batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - t0
        if step % LOG_EVERY == 0 or elapsed >= budget:
            loss_value = loss.item()
            marks.append((step, step * tokens_per_step, elapsed))
    loop_s = elapsed
    steady = steady_rate(marks, skip)
    return {
        "precision": cfg.precision,
        "optimizer": "adamw",
        "compile": cfg.compile,
        "parameters": model.num_params(),
        "steps": step,
        "tokens": step * tokens_per_step,
        "train_loss": round(loss_value, 5) if math.isfinite(loss_value) else None,
        "tokens_per_s": round(step * tokens_per_step / loop_s, 1),
        "steady_tokens_per_s": round(steady, 1) if steady is not None else None,
        "loop_s": round(loop_s, 2),
        "wall_s": round(time.perf_counter() - t_start, 2),
        **score(model, cfg.data or Path(), seq_len, val_tokens),
    }


def in_fresh_process(fn: Any, *args: Any) -> dict[str, Any]:
    """Run `fn(*args)` in a new interpreter with an empty inductor cache: compilation is paid in
    full by every contender, whichever ran first."""
    with tempfile.TemporaryDirectory(prefix="albor-ttq-inductor-") as cache:
        saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        os.environ["TRITON_CACHE_DIR"] = str(Path(cache) / "triton")
        try:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                result: dict[str, Any] = pool.submit(fn, *args).result()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return result


def ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    def r(key: str) -> float | None:
        x, y = a.get(key), b.get(key)
        return round(x / y, 3) if x is not None and y else None

    return {
        "steady_tokens_per_s": r("steady_tokens_per_s"),
        "tokens_per_s": r("tokens_per_s"),
        "val_bits_per_byte": r("val_bits_per_byte"),
    }


def parse_variant(text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    for item in items:
        if "=" not in item:
            raise ConfigError(
                f"--variants {text!r}: {item!r} is not KEY=VALUE; give each variant as "
                "comma-separated overrides of the pretrain config, e.g. precision=fp32"
            )
    return items


def main() -> None:
    try:
        measure()
    except AlborError as e:
        # A config albor refuses (a budget shorter than the warmup, a bad --variants key) is a
        # user mistake: its message says what to change; a traceback would bury it.
        raise SystemExit(f"time_to_quality: {e}") from None


def measure() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--budget", type=float, default=300.0, help="seconds per contender")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "albor-time-to-quality",
        help="where the data and the runs go (the data is reused across runs)",
    )
    ap.add_argument("--data", type=Path, default=None, help="a tokenize artifact to use instead")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    ap.add_argument("--no-compile", action="store_true", help="train both without torch.compile")
    ap.add_argument(
        "--val-tokens", type=int, default=10**12, help="validation tokens scored (default: all)"
    )
    ap.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="warmup of both runs, in steps (default: the recipe's); a short --budget needs fewer",
    )
    ap.add_argument(
        "--skip-steps",
        type=int,
        default=LOG_EVERY,
        help="steps left out of the steady-state rate (compilation, allocator warmup)",
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="albor again with these overrides of its pretrain config, one run per argument",
    )
    args = ap.parse_args()
    if args.budget <= 0:
        raise SystemExit(f"--budget {args.budget}: give a positive number of seconds")
    variants = {v: parse_variant(v) for v in args.variants}

    import torch

    workdir = args.workdir.resolve()
    if args.data is not None:
        data = args.data.resolve()
    else:  # the stdlib data stages with a vocab-8192 tokenizer, built once under the workdir
        data = build_data(workdir / "data", [f"tokenizer.vocab_size={VOCAB_SIZE}"])
    from albor.data.shards import TokenIndex

    vocab = TokenIndex.load(data).vocab_size
    settings = recipe_pretrain(data)
    settings.update(
        model="demo",
        architecture={"vocab_size": vocab},
        seq_len=SEQ_LEN,
        micro_batch=MICRO_BATCH,
        grad_accum=1,
        compile=not args.no_compile,
        precision=args.precision,
        device="cpu",
        threads=args.threads,
        max_time=args.budget,
        max_steps=10**9,
        eval_tokens=0,
        checkpoint_every=10**9,
        log_every=LOG_EVERY,
    )
    if args.warmup_steps is not None:
        settings["warmup_steps"] = args.warmup_steps
    precision, precision_reason = resolve_precision(settings)
    settings["precision"] = precision

    def albor_settings(name: str, overrides: list[str]) -> dict[str, Any]:
        out = apply_overrides(settings, overrides)
        out["output"] = str(workdir / "runs" / name)
        return out

    base = albor_settings("albor", [])
    from albor.stages import pretrain

    for name, overrides in variants.items():
        # A misspelt key must fail now, not after the first runs have spent their budgets.
        validate(pretrain.Config, albor_settings("check", overrides), f"--variants {name}")
    results: dict[str, Any] = {}
    results["albor"] = in_fresh_process(run_albor, base, "albor", args.val_tokens, args.skip_steps)
    results["plain"] = in_fresh_process(run_plain, base, args.val_tokens, args.skip_steps)
    variant_results: dict[str, Any] = {}
    for i, (name, overrides) in enumerate(variants.items()):
        s = albor_settings(f"variant-{i}", overrides)
        found = in_fresh_process(run_albor, s, f"variant {name}", args.val_tokens, args.skip_steps)
        variant_results[name] = {**found, "albor_over_plain": ratios(found, results["plain"])}

    from albor.model.estimate import param_count
    from albor.train.settings import ModelSettings, model_config

    mc = model_config(ModelSettings(model="demo", architecture={"vocab_size": vocab}))
    print(
        json.dumps(
            {
                "benchmark": "time to quality (cpu): albor vs the plain PyTorch loop",
                "budget_s": args.budget,
                "precision": precision,
                "precision_reason": precision_reason,
                "compile": not args.no_compile,
                "data": str(data),
                "model": {
                    "preset": "demo",
                    "parameters": param_count(mc),
                    "vocab_size": mc.vocab_size,
                    "layers": mc.num_layers,
                    "width": mc.hidden_size,
                    "seq_len": SEQ_LEN,
                    "micro_batch": MICRO_BATCH,
                },
                "schedule": {
                    k: settings[k] for k in ("lr", "warmup_steps", "min_lr_ratio", "weight_decay")
                },
                "skip_steps": args.skip_steps,
                "machine": {
                    "cpu": cpu_name(),
                    "threads": args.threads or torch.get_num_threads(),
                    "cpus": os.cpu_count(),
                    "torch": torch.__version__,
                    "albor": albor.__version__,
                    "python": platform.python_version(),
                },
                "albor": results["albor"],
                "plain": results["plain"],
                "albor_over_plain": ratios(results["albor"], results["plain"]),
                "variants": variant_results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
