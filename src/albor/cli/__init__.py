"""The `albor` command: the verb table; the only place that prints or exits.

    albor STAGE plan CONFIG [--set key=value ...] [--json]
    albor STAGE apply CONFIG [--set key=value ...] [--force] [--json]
    albor pipeline plan|apply|status [MANIFEST] [--only S] [--from S] [--force] [--json]
    albor complete MODEL "prefix" [--suffix "..."] [--stream]
    albor serve MODEL [--host 127.0.0.1] [--port N] [--api-key KEY]
    albor bench MODEL
    albor eval execute FILE | albor eval compare DIR...
    albor runs ls|show|diff|import, albor monitor [RUN_DIR]
    albor data verify DIR, albor recipes

One module per group of verbs (stages, pipeline, infer, evals, track, data); this one holds the
verb table and `main`, which maps errors to exit codes.

Exit codes: 0 valid / done, 1 invalid plan or failed apply, 2 usage or config error.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

import click

from albor import __version__
from albor.cli.common import ALIASES, Exit, err
from albor.cli.data import data_group, recipes_cmd
from albor.cli.evals import eval_group
from albor.cli.infer import bench_cmd, complete_cmd, serve_cmd
from albor.cli.pipeline import pipeline_group
from albor.cli.report import report_group
from albor.cli.stages import stage_group
from albor.cli.track import monitor_cmd, runs_group
from albor.errors import AlborError, PlanFailed
from albor.stage import REGISTRY

__all__ = ["ALIASES", "cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="albor")
@click.option("--verbose", "-v", is_flag=True, help="Log details (INFO) to stderr.")
def cli(verbose: bool) -> None:
    """albor: build a small, fast, local Python code-completion model end to end.

    Every stage has `plan` (validate and estimate; writes nothing) and `apply` (do it; skipped when
    up to date). `albor pipeline apply` runs the packaged default ladder on the Python standard
    library: data -> tokenizer -> teacher and base pretraining -> distill -> LoRA instruct ->
    merge -> prune -> quantize -> every variant evaluated -> export -> report -> publish
    (`albor pipeline plan` shows it; `albor report WORKDIR` writes the report of any workdir).
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


for _kind in [*REGISTRY, *ALIASES]:
    # `report` also takes a workdir: `albor report WORKDIR` beside its stage commands.
    cli.add_command(report_group() if _kind == "report" else stage_group(_kind))
cli.add_command(pipeline_group)
cli.add_command(recipes_cmd)
cli.add_command(data_group)
cli.add_command(complete_cmd)
cli.add_command(serve_cmd)
cli.add_command(bench_cmd)
cli.add_command(runs_group)
cli.add_command(monitor_cmd)
cli.add_command(eval_group)


def _fail(message: str, code: int) -> NoReturn:
    err.print("error: " + message, style="red", markup=False)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and map errors to exit codes; no traceback for user mistakes.

    A process that torchrun started and that joined a process group leaves it and exits
    without interpreter finalization (see `distributed.leave`).
    """
    try:
        _main(argv)
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    if "torch.distributed" in sys.modules:
        from albor.train import distributed

        distributed.leave(code)
    sys.exit(code)


def _main(argv: list[str] | None) -> None:
    debug = os.environ.get("ALBOR_DEBUG") == "1"
    try:
        cli.main(args=argv, prog_name="albor", standalone_mode=False)
    except Exit as e:
        sys.exit(e.code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except PlanFailed as e:
        _fail(str(e), 1)
    except AlborError as e:
        if e.exit_code == 0:  # a clean stop (e.g. training stopped by a signal, checkpoint saved)
            err.print(str(e), markup=False)
            sys.exit(0)
        if debug:
            raise
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as e:
        if debug:
            raise
        _fail(
            f"internal error: {type(e).__name__}: {e} (set ALBOR_DEBUG=1 for the traceback, "
            "and please report it)",
            1,
        )
