"""What the training benchmarks take from the default manifest: its data stages, run under a
benchmark's workdir (the stdlib corpus, cleaned, deduplicated, decontaminated, split, tokenized;
up-to-date stages are skipped, so a second run reuses them), and its teacher node's training
recipe (model, optimizer, schedule, precision), which a benchmark then sizes in steps or time.

Imported by benchmarks/distill.py, ladder_transforms.py and time_to_quality.py (run from the
repository as scripts, this directory is on their path); tests/test_benchmarks.py checks that
the node names here exist in the packaged default manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from albor.pipeline import apply_pipeline, load_pipeline

DATA_STAGES = ("ingest", "clean", "dedup", "decontaminate", "split", "tokenizer", "tokenize")
RECIPE_NODE = "teacher"  # the ladder's pretraining of the demo model


def build_data(workdir: Path, overrides: list[str] | None = None) -> Path:
    """The default manifest's data stages applied under `workdir` (with `overrides`, e.g.
    "tokenizer.vocab_size=8192"): the tokenize artifact's directory."""
    pipe = load_pipeline(None, overrides or [], workdir=workdir)
    apply_pipeline(pipe, only=DATA_STAGES)
    return workdir / "tokenize"


def training_recipe() -> dict[str, Any]:
    """The default manifest's teacher settings, JSON-ready, without its time budget and output:
    a benchmark sets both."""
    node = load_pipeline(None).nodes[RECIPE_NODE]
    recipe = node.config.model_dump(mode="json", exclude_none=True)
    for key in ("max_time", "output"):
        recipe.pop(key, None)
    return recipe
