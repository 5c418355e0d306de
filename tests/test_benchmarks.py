"""The benchmark scripts stay runnable: each imports (its albor names exist), and what they take
from the packaged default manifest (its data stages, the teacher's recipe) is still there. A
benchmark is run by hand and prints its figures; these checks keep a rename in the package or the
manifest from breaking one unseen, as the ladder's rename of the `pretrain` node once did."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import ladder_data  # noqa: E402

from albor.config import validate  # noqa: E402
from albor.pipeline import load_pipeline  # noqa: E402
from albor.stages import pretrain  # noqa: E402


def test_every_benchmark_script_imports() -> None:
    scripts = sorted(p for p in BENCHMARKS.glob("*.py"))
    assert len(scripts) >= 10
    code = (
        "import importlib.util, sys\n"
        f"sys.path.insert(0, {str(BENCHMARKS)!r})\n"
        "for path in sys.argv[1:]:\n"
        "    name = 'bench_' + path.rsplit('/', 1)[-1][:-3]\n"
        "    spec = importlib.util.spec_from_file_location(name, path)\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, scripts)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_default_manifest_has_what_the_benchmarks_take(tmp_path: Path) -> None:
    nodes = load_pipeline(None).nodes
    assert set(ladder_data.DATA_STAGES) <= set(nodes)
    assert nodes[ladder_data.RECIPE_NODE].kind == "pretrain"
    recipe = ladder_data.training_recipe()
    assert "max_time" not in recipe and "output" not in recipe
    cfg = validate(
        pretrain.Config,
        {**recipe, "data": str(tmp_path), "output": str(tmp_path / "out"), "max_steps": 10},
        "recipe",
    )
    assert cfg.model == "demo" and cfg.max_time is None
