"""The tasks of the evaluate stage, one module each: the task's keys (a `{task: TYPE, ...}` entry
of evaluate's `tasks:`), what its plan checks and estimates, and how it runs.

- `perplexity`: perplexity and bits per byte of token shards or of text, beside a unigram baseline;
- `code`: pass@k on HumanEval or a JSONL benchmark, and HumanEval infilling (the model generates,
  the sandbox runs the tests);
- `contamination`: documents of a corpus sharing n-grams with benchmark problems;
- `pairs`: bits per byte of a function's body given its signature and docstring, on held-out
  pairs of a pairs artifact (what the instruct step is judged by).

Each module exports `plan(task, planning, name) -> estimates` and `run(task, models, name, out)
-> (metrics, summary)`, writing its files (NAME.*) in `out`; `albor.stages.evaluate` parses the
task list and calls them in turn. This module holds what they share: the run's inputs and the
model, loaded once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from albor.device import resolve as resolve_device
from albor.errors import ConfigError

if TYPE_CHECKING:
    from albor.evals.humaneval import Generator
    from albor.model.config import ModelConfig
    from albor.model.gpt import GPT
    from albor.plan import Plan
    from albor.stage import PlanContext

Split = Literal["train", "val", "test"]


@dataclass(frozen=True)
class Inputs:
    """What the tasks read beside their own keys: evaluate's top-level settings."""

    model: Path | None
    data: Path | None
    pairs: Path | None
    device: str
    workers: int | None
    flat: bool  # the flat form: one perplexity task whose checks and estimates keep flat names

    def require_model(self) -> Path:
        if self.model is None:
            raise ConfigError("model: required by this task; set `model:` to a checkpoint dir")
        return self.model


@dataclass
class Planning:
    """What a task's plan sees: the plan it adds checks to, the pending inputs, the inputs, the
    checkpoint's config (None when it is pending or unreadable) and the device it will run on."""

    p: Plan
    ctx: PlanContext
    inputs: Inputs
    model: ModelConfig | None
    device: str


@dataclass
class Models:
    """The checkpoint, loaded once for all the tasks that score with it or generate from it."""

    inputs: Inputs
    _model: tuple[GPT, ModelConfig] | None = field(default=None, repr=False)
    _generator: Generator | None = field(default=None, repr=False)

    @property
    def device(self) -> str:
        return resolve_device(self.inputs.device)

    def model(self) -> tuple[GPT, ModelConfig]:
        from albor.model.load import load_model

        if self._model is None:
            self._model = load_model(self.inputs.require_model(), device=self.device)
        return self._model

    def generator(self) -> Generator:
        from albor.evals.humaneval import Generator

        if self._generator is None:
            self._generator = Generator(self.inputs.require_model(), self.device)
        return self._generator
