"""The report tests' shared fixtures: miniature ladder workdirs of `report_workdir`."""

from __future__ import annotations

from pathlib import Path

import pytest
from report_workdir import build_workdir


@pytest.fixture(scope="session")
def complete_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every stage up to the report done (read-only: tests write their reports elsewhere)."""
    return build_workdir(tmp_path_factory.mktemp("ladder") / "run")


@pytest.fixture(scope="session")
def broken_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`instruct` failed, `export` never ran, and markup in names, configs and errors."""
    return build_workdir(
        tmp_path_factory.mktemp("broken") / "run",
        failed="instruct",
        missing=("export",),
        hostile=True,
    )
