"""Typed errors raised by library code; the CLI maps them to exit codes and one-line messages."""

from __future__ import annotations


class AlborError(Exception):
    """Base class: a problem the user can act on. The message says what, where and how to fix."""

    exit_code = 1


class ConfigError(AlborError):
    """A config or manifest that cannot be loaded or validated (usage error, exit 2)."""

    exit_code = 2


class DataError(AlborError):
    """Input data that is missing or unusable."""


class ArtifactError(AlborError):
    """An artifact directory that is missing, incomplete or inconsistent."""


class PlanFailed(AlborError):
    """`apply` refused to start because its plan has failing checks."""

    def __init__(self, message: str, plan: object | None = None) -> None:
        super().__init__(message)
        self.plan = plan


class PreflightFailed(PlanFailed):
    """A pipeline refused to start: a stage that would run has a failing check; nothing ran."""


class StageFailed(AlborError):
    """A stage's apply failed; the message names the stage and the cause."""
