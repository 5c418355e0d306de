"""`albor complete`, `albor serve`, `albor bench`: a model at work."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from albor import progress
from albor.cli.common import emit_json, err, out
from albor.device import DEVICES
from albor.device import resolve as resolve_device

# ----- inference: complete, serve, bench -------------------------------------------------------

MODEL_HELP = (
    "MODEL is a checkpoint dir (albor or transformers: config.json, safetensors, "
    "tokenizer.json) or a .gguf file (run by llama.cpp)."
)
DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def model_options(f: Any) -> Any:
    """--device, --dtype, --threads: how a model is loaded."""
    f = click.option(
        "--threads", type=click.IntRange(1), help="CPU threads (default: torch's / llama.cpp's)."
    )(f)
    f = click.option(
        "--dtype",
        type=click.Choice(DTYPE_CHOICES),
        default="float32",
        show_default=True,
        help="Weights dtype of a torch model.",
    )(f)
    return click.option(
        "--device",
        type=click.Choice(DEVICES),
        default="cpu",
        show_default=True,
        help="Where a torch model runs (auto: cuda when a GPU is visible).",
    )(f)


def sampling_options(f: Any) -> Any:
    f = click.option("--seed", type=int, help="Seed for sampling, for reproducible output.")(f)
    f = click.option(
        "--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), help="Nucleus sampling."
    )(f)
    f = click.option(
        "--top-k", type=click.IntRange(1), help="Sample only from the k most likely tokens."
    )(f)
    return click.option(
        "--temperature",
        default=0.0,
        show_default=True,
        type=click.FloatRange(0.0, 10.0),
        help="0 is greedy; higher samples more freely.",
    )(f)


def write_code(text: str, bold: bool = False) -> None:
    """Code exactly as it is (rich would expand tabs); bold on a terminal only."""
    click.echo(click.style(text, bold=True) if bold else text, nl=False)
    sys.stdout.flush()


@click.command(name="complete", epilog=MODEL_HELP)
@click.argument("model", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("prefix")
@click.option("--suffix", help="Text after the gap: fill in the middle between PREFIX and it.")
@click.option(
    "--fim-mode",
    type=click.Choice(["psm", "spm"]),
    default="psm",
    show_default=True,
    help="FIM prompt order with --suffix: prefix-suffix-middle or suffix-prefix-middle.",
)
@click.option("--stream", is_flag=True, help="Print the text as it is generated.")
@click.option(
    "--max-tokens",
    default=64,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Most tokens to generate.",
)
@sampling_options
@click.option(
    "--stop", multiple=True, metavar="TEXT", help="End the completion before TEXT (repeatable)."
)
@click.option(
    "--heal/--no-heal",
    default=True,
    show_default=True,
    help="Re-generate the prompt's last token (token healing).",
)
@model_options
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object (with --stream: JSON lines)."
)
def complete_cmd(
    model: Path,
    prefix: str,
    suffix: str | None,
    fim_mode: str,
    stream: bool,
    max_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    stop: tuple[str, ...],
    heal: bool,
    device: str,
    dtype: str,
    threads: int | None,
    as_json: bool,
) -> None:
    """Complete PREFIX with MODEL, or with --suffix fill in the middle (ends at the end-of-text
    token of the model's tokenizer)."""
    from albor.infer.completion import make_prompt, prompt_tokens, stream_completions
    from albor.infer.engine import Sampling
    from albor.infer.loader import load

    backend = load(
        model, device=resolve_device(device, key="--device"), dtype=dtype, n_threads=threads
    )
    prompt = make_prompt(
        backend, prefix, suffix, fim_mode="spm" if fim_mode == "spm" else "psm", heal=heal
    )
    sampling = Sampling(temperature, top_k, top_p, seed)
    t0 = time.perf_counter()
    if stream and not as_json:
        write_code(prefix)
    text, last = "", None
    for d in stream_completions(
        backend, [prompt], max_new_tokens=max_tokens, sampling=sampling, stop=stop
    ):
        text += d.text
        last = d
        if stream and d.text:
            if as_json:
                click.echo(json.dumps({"text": d.text}))
            else:
                write_code(d.text, bold=True)
    wall = time.perf_counter() - t0
    assert last is not None
    if as_json:
        result = {
            "model": backend.name,
            "prefix": prefix,
            "suffix": suffix,
            "completion": text,
            "finish_reason": last.finish_reason,
            "prompt_tokens": prompt_tokens(prompt),
            "completion_tokens": last.completion_tokens,
            "seconds": round(wall, 3),
        }
        click.echo(json.dumps(result) if stream else json.dumps(result, indent=2))
        return
    if not stream:
        write_code(prefix)
        write_code(text, bold=True)
    write_code((suffix or "") + "\n")


@click.command(name="serve", epilog=MODEL_HELP)
@click.argument("model", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on (0: any free port; the address is printed).",
)
@click.option(
    "--api-key",
    envvar="ALBOR_API_KEY",
    help="Require `Authorization: Bearer KEY` (default: $ALBOR_API_KEY; /health stays open).",
)
@click.option(
    "--max-tokens-limit",
    type=click.IntRange(1),
    help="Largest max_tokens a request may ask for (default: the context).",
)
@click.option(
    "--max-n", default=8, show_default=True, type=click.IntRange(1), help="Largest n per request."
)
@click.option(
    "--max-queue",
    default=16,
    show_default=True,
    type=click.IntRange(1),
    help="Requests that may wait for the model; more get 503.",
)
@click.option(
    "--max-body-bytes",
    default=1 << 20,
    show_default=True,
    type=click.IntRange(1),
    help="Largest request body; larger get 413.",
)
@click.option(
    "--fim-mode",
    type=click.Choice(["psm", "spm"]),
    default="psm",
    show_default=True,
    help="FIM prompt order for requests with a suffix.",
)
@click.option("--heal/--no-heal", default=True, show_default=True, help="Token healing of prompts.")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the address as one JSON object.")
def serve_cmd(
    model: Path,
    host: str,
    port: int,
    api_key: str | None,
    max_tokens_limit: int | None,
    max_n: int,
    max_queue: int,
    max_body_bytes: int,
    fim_mode: str,
    heal: bool,
    device: str,
    dtype: str,
    threads: int | None,
    as_json: bool,
) -> None:
    """Serve MODEL over an OpenAI-compatible API: POST /v1/completions (suffix to fill in the
    middle, stream for server-sent events), GET /v1/models, GET /health.

    Listens on 127.0.0.1 unless --host says otherwise. One request generates at a time; others
    wait in a bounded queue. Ctrl-C / SIGTERM finish the running request and stop."""
    from albor.infer.api import Limits
    from albor.infer.loader import load
    from albor.infer.server import create_server, is_loopback, run

    if not is_loopback(host) and not api_key:
        err.print(
            f"warning: listening on {host} without --api-key: anyone who can reach this "
            "machine can use the model",
            style="yellow",
            markup=False,
        )
    backend = load(
        model, device=resolve_device(device, key="--device"), dtype=dtype, n_threads=threads
    )
    limits = Limits(
        max_body_bytes=max_body_bytes,
        max_tokens=max_tokens_limit,
        max_n=max_n,
        max_queue=max_queue,
    )
    server = create_server(
        backend,
        host=host,
        port=port,
        api_key=api_key,
        limits=limits,
        fim_mode="spm" if fim_mode == "spm" else "psm",
        heal=heal,
    )
    if as_json:
        click.echo(json.dumps({"url": server.url, "model": backend.name, "context": backend.n_ctx}))
        sys.stdout.flush()
    err.print(
        f"albor serve: {backend.name} on {server.url} (POST /v1/completions; Ctrl-C stops)",
        markup=False,
    )
    sys.stderr.flush()

    def stopping(signame: str) -> None:
        err.print(f"albor serve: {signame}: finishing the running request, then stopping")

    run(server, on_stop=stopping)
    err.print("albor serve: stopped", markup=False)


@click.command(name="bench", epilog=MODEL_HELP + " An export dir holding several is benched whole.")
@click.argument("model", metavar="MODEL", type=click.Path(path_type=Path))
@click.option(
    "--prompt-tokens", default=128, show_default=True, type=click.IntRange(1), help="Prompt length."
)
@click.option(
    "--new-tokens",
    default=64,
    show_default=True,
    type=click.IntRange(2),
    help="Tokens generated per run.",
)
@click.option(
    "--repeats", default=3, show_default=True, type=click.IntRange(1), help="Timed runs per model."
)
@click.option(
    "--dtype",
    "dtypes",
    multiple=True,
    type=click.Choice(DTYPE_CHOICES),
    help="Dtypes of torch models (repeatable; default: float32 and bfloat16).",
)
@click.option("--threads", type=click.IntRange(1), help="CPU threads for every backend.")
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="cpu",
    show_default=True,
    help="Where torch models run.",
)
@click.option(
    "--in-process",
    is_flag=True,
    help="Run every model in this process (faster; peak RSS is then the highest so far).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_cmd(
    model: Path,
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    dtypes: tuple[str, ...],
    threads: int | None,
    device: str,
    in_process: bool,
    as_json: bool,
) -> None:
    """Time MODEL: time to first token, prefill tokens/s, decode ms/token (p50, p95) and peak
    RSS, for a torch model in float32 and bfloat16 and for every .gguf file."""
    from albor.infer.bench import BenchSettings, bench

    settings = BenchSettings(
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        repeats=repeats,
        threads=threads,
        dtypes=dtypes or ("float32", "bfloat16"),
        device=resolve_device(device, key="--device"),
        isolate=not in_process,
    )
    if as_json:
        progress.quiet()
    report = bench(model, settings)
    if as_json:
        emit_json(report)
        return
    from rich.table import Table

    table = Table(
        title=f"{model}: {prompt_tokens}-token prompt, {new_tokens} new tokens, {repeats} runs",
        title_justify="left",
    )
    table.add_column("model", no_wrap=True)
    table.add_column("backend", no_wrap=True)
    for col in ("MB", "TTFT ms", "prefill tok/s", "ms/tok p50", "p95", "tok/s", "peak RSS MB"):
        table.add_column(col, justify="right")
    for r in report["results"]:
        d = r["decode_ms_per_token"]
        table.add_row(
            r["name"],
            r["backend"],
            f"{r['weights_bytes'] / 2**20:.1f}",
            f"{r['ttft_ms']:.1f}",
            f"{r['prefill_tokens_per_s']:,.0f}",
            f"{d['p50']:.2f}",
            f"{d['p95']:.2f}",
            f"{r['decode_tokens_per_s']:,.1f}",
            f"{r['peak_rss_mb']:.0f}",
        )
    # Wide enough for every number even when stdout is a pipe (rich assumes 80 columns there).
    Console(highlight=False, width=max(out.width, 120)).print(table)
