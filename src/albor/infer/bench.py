"""Latency of a model as an editor user feels it (`albor bench MODEL`).

For every variant of MODEL (a torch checkpoint in float32 and bfloat16, and every `.gguf` file;
an export artifact dir holding several models is measured whole), on a prompt of real Python
(the standard library's `textwrap.py`, tokenized by the model's own tokenizer):

- time to first token: prefill of the prompt plus the first token, and prefill tokens/s;
- decode ms/token (p50, p95, mean) over the following greedy tokens, and tokens/s;
- peak RSS of the process that ran it (weights, KV cache, runtime).

Each variant runs in a fresh process (multiprocessing "spawn"), so its peak RSS is its own and
not the high-water mark of the variants before it; `isolate=False` runs in this process (tests).
Each repeat uses a different slice of the text, so llama.cpp's prefix cache cannot skip the
prefill. Generation ignores the end-of-text token, so every repeat decodes exactly `new_tokens`.
"""

from __future__ import annotations

import itertools
import multiprocessing
import resource
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from albor import progress
from albor.errors import ConfigError
from albor.infer.engine import GREEDY, Backend
from albor.infer.loader import load_ref
from albor.model.load import DTYPES, ModelRef, find_models

PROMPT_SOURCE = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"


@dataclass(frozen=True)
class BenchSettings:
    """What is measured and how often."""

    prompt_tokens: int = 128
    new_tokens: int = 64
    repeats: int = 3
    threads: int | None = None
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    device: str = "cpu"
    isolate: bool = True

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"bench {name} must be at least 1")
        if self.new_tokens < 2:
            raise ConfigError(
                "bench new_tokens must be at least 2 (decode is timed after the first)"
            )
        if self.threads is not None and self.threads < 1:
            raise ConfigError("bench threads must be at least 1 (or unset)")
        unknown = [d for d in self.dtypes if d not in DTYPES]
        if unknown or not self.dtypes:
            raise ConfigError(f"bench dtypes {unknown or '[]'}: choose from {', '.join(DTYPES)}")


@dataclass(frozen=True)
class Variant:
    """One thing to time: a model file or dir, and for torch models the dtype."""

    path: str
    kind: str
    dtype: str | None

    @property
    def label(self) -> str:
        name = Path(self.path).name
        return f"{name} ({self.dtype})" if self.dtype else name


def variants(path: Path, dtypes: tuple[str, ...]) -> list[Variant]:
    """Every (model, dtype) under `path` that `bench` measures."""
    refs = find_models(path)
    if not refs:
        raise ConfigError(
            f"{path}: no model to bench: give a checkpoint dir, a .gguf file or an export "
            "artifact dir holding them"
        )
    out: list[Variant] = []
    for ref in refs:
        if ref.kind == "torch":
            out += [Variant(str(ref.path), ref.kind, d) for d in dtypes]
        else:
            out.append(Variant(str(ref.path), ref.kind, None))
    return out


def prompt_ids(backend: Backend, n: int, repeat: int) -> list[int]:
    """`n` tokens of real Python, a different slice for each repeat."""
    text = PROMPT_SOURCE.read_text(encoding="utf-8")
    ids = backend.tokenize(text)
    need = n + 13 * repeat
    while len(ids) < need:
        ids = ids + ids
    start = 13 * repeat
    return ids[start : start + n]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the two nearest ranks."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _time_one(backend: Backend, ids: list[int], new_tokens: int) -> tuple[float, list[float]]:
    """Seconds to the first token, then the seconds between consecutive tokens."""
    stamps: list[float] = []
    t0 = time.perf_counter()
    for _, token in backend.stream([ids], max_new_tokens=new_tokens, sampling=GREEDY):
        if token is not None:
            stamps.append(time.perf_counter())
    if len(stamps) < new_tokens:
        raise ConfigError(f"generation stopped after {len(stamps)} of {new_tokens} tokens")
    return stamps[0] - t0, [b - a for a, b in itertools.pairwise(stamps)]


def peak_rss_bytes() -> int:
    """The highest resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def bench_variant(variant: Variant, settings: BenchSettings) -> dict[str, Any]:
    """Load one variant and time it (`settings.repeats` runs after a warm-up run)."""
    path = Path(variant.path)
    backend = load_ref(
        ModelRef(path, "gguf" if variant.kind == "gguf" else "torch"),
        device=settings.device,
        dtype=variant.dtype or "float32",
        n_threads=settings.threads,
    )
    if settings.prompt_tokens + settings.new_tokens > backend.n_ctx:
        raise ConfigError(
            f"{variant.label}: prompt_tokens {settings.prompt_tokens} + new_tokens "
            f"{settings.new_tokens} exceed its context of {backend.n_ctx}: lower one of them"
        )
    _time_one(backend, prompt_ids(backend, min(16, settings.prompt_tokens), 0), 2)  # warm-up
    ttft: list[float] = []
    decode: list[float] = []
    for r in range(settings.repeats):
        first, gaps = _time_one(
            backend, prompt_ids(backend, settings.prompt_tokens, r + 1), settings.new_tokens
        )
        ttft.append(first)
        decode += gaps
    files = [path] if path.is_file() else list(path.glob("*.safetensors"))
    ttft_s = statistics.median(ttft)
    mean = statistics.fmean(decode)
    return {
        "name": variant.label,
        "path": variant.path,
        "backend": "llama.cpp" if variant.kind == "gguf" else "torch",
        "dtype": variant.dtype,
        "device": settings.device if variant.kind == "torch" else "cpu",
        "weights_bytes": sum(f.stat().st_size for f in files),
        "context": backend.n_ctx,
        "ttft_ms": round(ttft_s * 1000, 3),
        "prefill_tokens_per_s": round(settings.prompt_tokens / ttft_s, 1),
        "decode_ms_per_token": {
            "p50": round(percentile(decode, 50) * 1000, 3),
            "p95": round(percentile(decode, 95) * 1000, 3),
            "mean": round(mean * 1000, 3),
        },
        "decode_tokens_per_s": round(1 / mean, 1),
        "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
    }


def time_here(
    path: Path,
    kind: str,
    *,
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    threads: int | None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Time one model in this process, torch models in float32 (their own dtype; a quantized
    dir computes its activations in it): what a stage measures beside its other figures."""
    settings = BenchSettings(
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        repeats=repeats,
        threads=threads,
        dtypes=("float32",),
        device=device,
        isolate=False,
    )
    return bench_variant(Variant(str(path), kind, "float32" if kind == "torch" else None), settings)


def _child(variant: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    s = BenchSettings(**{**settings, "dtypes": tuple(settings["dtypes"])})
    return bench_variant(Variant(**variant), s)


def bench(
    path: Path,
    settings: BenchSettings | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Time every variant under `path`; one JSON-ready dict with the settings and the results."""
    settings = settings or BenchSettings()
    todo = variants(Path(path), settings.dtypes)
    results = []
    with progress.bar("bench", len(todo)) as bar:
        for v in todo:
            bar.update(description=f"bench {v.label}")
            if settings.isolate:
                ctx = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                    result = pool.submit(_child, asdict(v), asdict(settings)).result()
            else:
                result = bench_variant(v, settings)
            results.append(result)
            if on_result is not None:
                on_result(result)
            bar.advance()
    return {
        "model": str(path),
        "prompt_tokens": settings.prompt_tokens,
        "new_tokens": settings.new_tokens,
        "repeats": settings.repeats,
        "threads": settings.threads,
        "isolated": settings.isolate,
        "results": results,
    }
