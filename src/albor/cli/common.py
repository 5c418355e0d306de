"""What every command shares: the consoles, JSON output, the exit-code carrier."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ALIASES = {"train": "pretrain"}
SET_HELP = (
    "Override a config value, KEY=VALUE with a dotted key (repeatable), e.g. --set max_steps=100."
)


class Exit(Exception):
    """Leave with this code after the message has been shown."""

    def __init__(self, code: int) -> None:
        self.code = code


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))
