"""`albor.evals.contracts`: the nine contracts decided from a workdir's run evidence.

A ladder-shaped workdir is assembled from real tiny stage outputs (the runs the falsification
tests make, copied under the ladder's node names); each contract holds on it, fails on a copy
doctored to break exactly it, and is `not run`, with the reason, where its evidence is missing or
malformed. The rules themselves (smoothing, gradient spikes, SLERP's bound) are checked here
against figures computed another way.
"""

from __future__ import annotations

import ast
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from falsify_runs import (
    distill_run,
    grouped_run,
    logits_run,
    prune_run,
    quantize_run,
    short_run,
    slerp_run,
)

from albor.artifact import read_manifest
from albor.evals.contracts import (
    GRAD_SPIKE_FACTOR,
    TEST_FILE,
    Contract,
    evaluate_contracts,
    grad_norm_spikes,
    slerp_norm_bound,
    smoothed_final,
)
from albor.model.transforms import merge as M
from albor.model.transforms.prune import zero_count

IDS = [f"FALSIFY-ALBOR-00{i}" for i in range(1, 10)]
LADDER = ["teacher", "base", "distill", "teacher_logits", "merged", "pruned", "quantize"]


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ladder(token_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir in the ladder's shape: real tiny stage outputs under the ladder's node names,
    pipeline.json naming them (and the eval stages, not run), .albor-pipeline.json their status.
    Read-only: tests doctor a copy (`workdir`)."""
    root = tmp_path_factory.getbasetemp() / "falsify-runs"
    sources = {
        "teacher": grouped_run(token_data, root),
        "base": short_run(token_data, root, 1337),
        "distill": distill_run(token_data, root),
        "teacher_logits": logits_run(token_data, root),
        "merged": slerp_run(token_data, root),
        "pruned": prune_run(token_data, root, "wanda", 0.3),
        "quantize": quantize_run(token_data, root),
    }
    work = tmp_path_factory.mktemp("ladder") / "run"
    work.mkdir()
    for name, source in sources.items():
        shutil.copytree(source, work / name)
    stages = [
        {"name": n, "uses": read_manifest(work / n)["stage"], "needs": []} for n in LADDER
    ] + [{"name": "eval-distill", "uses": "evaluate", "needs": ["distill"]}]
    (work / "pipeline.json").write_text(
        json.dumps({"name": "test", "description": "", "stages": stages})
    )
    status = {n: {"status": "done", "started_at": "2026-01-01T00:00:00+00:00"} for n in LADDER}
    (work / ".albor-pipeline.json").write_text(json.dumps(status))
    return work


@pytest.fixture
def workdir(ladder: Path, tmp_path: Path) -> Path:
    """A copy of `ladder` to doctor."""
    return Path(shutil.copytree(ladder, tmp_path / "run"))


def by_id(contracts: list[Contract]) -> dict[str, Contract]:
    return {c.id: c for c in contracts}


def statuses(workdir: Path) -> dict[str, str]:
    return {c.id: c.status for c in evaluate_contracts(workdir)}


def edit_manifest(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def metrics_lines(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (directory / "metrics.jsonl").read_text().splitlines()]


def write_lines(directory: Path, lines: list[dict[str, Any]]) -> None:
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def write_eval(workdir: Path, variant: str, bpb: float) -> None:
    """An evaluate stage's manifest in the exact format, with only the perplexity task."""
    out = workdir / f"eval-{variant}"
    out.mkdir()
    manifest = {
        "stage": "evaluate",
        "name": f"eval-{variant}",
        "outputs": [],
        "config": {},
        "metrics": {"perplexity": {"bits_per_byte": bpb, "loss": bpb * 2}},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))


# --- the real ladder -----------------------------------------------------------------------


def test_every_contract_holds_on_the_real_ladder_or_says_why_not(ladder: Path) -> None:
    contracts = evaluate_contracts(ladder)
    assert [c.id for c in contracts] == IDS
    found = by_id(contracts)
    assert {k: v.status for k, v in found.items() if k != "FALSIFY-ALBOR-005"} == {
        "FALSIFY-ALBOR-001": "holds",
        "FALSIFY-ALBOR-002": "holds",
        "FALSIFY-ALBOR-003": "tested",
        "FALSIFY-ALBOR-004": "holds",  # distill logs its KL term beside the blended loss
        "FALSIFY-ALBOR-006": "holds",
        "FALSIFY-ALBOR-007": "holds",
        "FALSIFY-ALBOR-008": "holds",
        "FALSIFY-ALBOR-009": "holds",
    }
    # 005 compares the students' own validation: 40 steps is too short to promise a winner,
    # so the verdict must follow the figures, whichever way they fall.
    distilled = read_manifest(ladder / "distill")["metrics"]["val_bpb"]
    plain = read_manifest(ladder / "base")["metrics"]["val_bpb"]
    five = found["FALSIFY-ALBOR-005"]
    assert five.status == ("holds" if distilled < plain else "fails")
    assert f"{distilled:.4f}" in five.figure and f"{plain:.4f}" in five.figure
    assert "base manifest val_bpb" in five.evidence

    one = found["FALSIFY-ALBOR-001"]
    for stage in ("teacher", "base", "distill"):
        losses = [r["loss"] for r in metrics_lines(ladder / stage) if "loss" in r]
        assert f"{stage} {losses[0]:.3f}->{smoothed_final(losses):.3f}" in one.figure
    assert one.figure.endswith(f"; ln(V) {math.log(512):.2f}")
    assert f"k={GRAD_SPIKE_FACTOR:g}" in found["FALSIFY-ALBOR-002"].figure
    assert "3 of 3 training stages bit-exact" in found["FALSIFY-ALBOR-003"].figure
    assert "max deviation 0 element(s) over 14 tensors" in found["FALSIFY-ALBOR-008"].figure
    quant = read_manifest(ladder / "quantize")["metrics"]["variants"]
    assert f"int4 {quant['int4']['val_bpb_increase']:+.2%}" in found["FALSIFY-ALBOR-009"].figure
    for c in contracts:
        assert c.figure and c.evidence and c.test.startswith(f"{TEST_FILE}::test_")


def test_every_contract_names_a_test_that_exists_and_is_marked_falsify() -> None:
    source = Path(__file__).with_name(Path(TEST_FILE).name).read_text()
    tree = ast.parse(source)
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    tests = sorted(f for f in functions if f.startswith("test_"))
    contracts = evaluate_contracts(Path("/nonexistent"))
    assert sorted(c.test.split("::")[1] for c in contracts) == tests  # nine tests, one each
    assert "pytestmark = pytest.mark.falsify" in source


# --- doctored evidence: each contract fails, or holds, on exactly what decides it -----------


def _rising_loss(w: Path) -> None:
    lines = metrics_lines(w / "base")
    last = max(r["step"] for r in lines)
    lines += [{"step": last + i, "loss": 9.0, "grad_norm": 0.5} for i in range(1, 40)]
    write_lines(w / "base", lines)


def _grad_spike(w: Path) -> None:
    lines = metrics_lines(w / "distill")
    norms = [r["grad_norm"] for r in lines if "grad_norm" in r]
    lines.append({"step": 10_000, "loss": 3.0, "grad_norm": 100 * max(norms)})
    write_lines(w / "distill", lines)


def _grad_nan(w: Path) -> None:
    lines = metrics_lines(w / "teacher")
    lines[40]["grad_norm"] = None  # how metrics.jsonl spells NaN
    write_lines(w / "teacher", lines)


def _kl(value: float) -> Callable[[Path], None]:
    def doctor(w: Path) -> None:
        lines = metrics_lines(w / "distill")
        for r in lines:
            if "loss" in r:
                r["kl"] = value
        write_lines(w / "distill", lines)

    return doctor


def _no_kl(w: Path) -> None:
    lines = metrics_lines(w / "distill")
    for r in lines:
        r.pop("kl", None)
    write_lines(w / "distill", lines)


def _evals(distill: float, base: float) -> Callable[[Path], None]:
    def doctor(w: Path) -> None:
        write_eval(w, "distill", distill)
        write_eval(w, "base", base)

    return doctor


def _set(stage: str, path: str, value: Any) -> Callable[[Path], None]:
    """Set the manifest key at `path` (dots between keys) of `stage`."""

    def doctor(w: Path) -> None:
        def change(manifest: dict[str, Any]) -> None:
            *parents, last = path.split(".")
            node = manifest
            for key in parents:
                node = node[key]
            if value is _DELETE:
                del node[last]
            else:
                node[last] = value

        edit_manifest(w / stage, change)

    return doctor


_DELETE = object()


def _one_more_zero(w: Path) -> None:
    def change(manifest: dict[str, Any]) -> None:
        first = next(iter(manifest["metrics"]["tensors"].values()))
        first["zeros"] += 2

    edit_manifest(w / "pruned", change)


def _failed_logits(w: Path) -> None:
    shutil.rmtree(w / "teacher_logits")
    status = json.loads((w / ".albor-pipeline.json").read_text())
    status["teacher_logits"] = {
        "status": "failed",
        "error": "train shard 0: window 3, position 7: the teacher's top-k row has a "
        "non-finite log-probability (nan)",
    }
    (w / ".albor-pipeline.json").write_text(json.dumps(status))


def _online_only(w: Path) -> None:
    """No teacher_logits stage: 006 rests on the rows the online distill's teacher computed."""
    shutil.rmtree(w / "teacher_logits")


def _online_row_mass(mass: float) -> Callable[[Path], None]:
    def doctor(w: Path) -> None:
        _online_only(w)
        _set("distill", "metrics.teacher_rows.max_row_mass", mass)(w)

    return doctor


DOCTORED = [
    ("FALSIFY-ALBOR-001", _rising_loss, "fails", "base", "(rose)"),
    ("FALSIFY-ALBOR-002", _grad_spike, "fails", "distill", "spikes at steps [10000]"),
    ("FALSIFY-ALBOR-002", _grad_nan, "fails", "teacher", "1 not finite"),
    ("FALSIFY-ALBOR-004", _kl(0.25), "holds", "min logged KL 0.25", ""),
    ("FALSIFY-ALBOR-004", _kl(-0.01), "fails", "min logged KL -0.01", ""),
    ("FALSIFY-ALBOR-004", _no_kl, "tested", "distill logs no KL term", ""),
    ("FALSIFY-ALBOR-005", _evals(1.5, 1.6), "holds", "distill 1.5000 vs base 1.6000", ""),
    ("FALSIFY-ALBOR-005", _evals(1.7, 1.6), "fails", "distill 1.7000 vs base 1.6000", ""),
    ("FALSIFY-ALBOR-005", _set("base", "metrics.parameters", 1), "not run", "", "parameters"),
    ("FALSIFY-ALBOR-005", _set("base", "metrics.steps", 3), "not run", "", "steps 40 vs 3"),
    (
        "FALSIFY-ALBOR-006",
        _set("teacher_logits", "metrics.max_row_mass_computed", 1.2),
        "fails",
        "max row mass 1.200000",
        "",
    ),
    ("FALSIFY-ALBOR-006", _failed_logits, "fails", "", "window 3, position 7"),
    ("FALSIFY-ALBOR-006", _online_only, "holds", "distill (online teacher): max row mass", ""),
    ("FALSIFY-ALBOR-006", _online_row_mass(1.2), "fails", "max row mass 1.200000", ""),
    (
        "FALSIFY-ALBOR-007",
        _set("merged", "metrics.slerp_norms.max_ratio_to_bound", 1.5),
        "fails",
        "1.5000 of the bound",
        "",
    ),
    (
        "FALSIFY-ALBOR-007",
        _set("merged", "metrics.slerp_norms", _DELETE),
        "not run",
        "",
        "no slerp_norms",
    ),
    ("FALSIFY-ALBOR-007", _set("merged", "metrics.method", "linear"), "not run", "", "linear"),
    ("FALSIFY-ALBOR-008", _one_more_zero, "fails", "max deviation 2 element(s)", ""),
    ("FALSIFY-ALBOR-008", _set("pruned", "metrics.method", "depth"), "not run", "", "depth"),
    (
        "FALSIFY-ALBOR-009",
        _set("quantize", "metrics.variants.int4.val_bpb_increase", 0.2),
        "fails",
        "int4 +20.00% (bound 10%)",
        "",
    ),
    (
        "FALSIFY-ALBOR-009",
        _set("quantize", "metrics.variants.int8.val_bpb_increase", -0.02),
        "fails",
        "int8 -2.00% (bound 1%)",
        "",
    ),
]


@pytest.mark.parametrize(
    ("contract", "doctor", "status", "figure", "evidence"),
    DOCTORED,
    ids=[f"{c[0][-3:]}-{c[2]}-{i}" for i, c in enumerate(DOCTORED)],
)
def test_doctored_evidence_decides_exactly_its_contract(
    workdir: Path,
    ladder: Path,
    contract: str,
    doctor: Callable[[Path], None],
    status: str,
    figure: str,
    evidence: str,
) -> None:
    before = statuses(ladder)
    doctor(workdir)
    found = by_id(evaluate_contracts(workdir))
    assert found[contract].status == status, found[contract]
    assert figure in found[contract].figure, found[contract]
    assert evidence in found[contract].evidence or evidence in found[contract].figure
    # The other contracts see nothing new (the doctored stage is only their evidence).
    others = {k: c.status for k, c in found.items() if k != contract}
    assert others == {k: v for k, v in before.items() if k != contract}


def test_a_spike_in_warmup_is_not_judged_and_a_prune_over_all_tensors_is_judged_whole(
    workdir: Path,
) -> None:
    lines = metrics_lines(workdir / "teacher")
    lines[1]["grad_norm"] *= 100  # step 2, inside the 10 warmup steps
    write_lines(workdir / "teacher", lines)

    def global_scope(manifest: dict[str, Any]) -> None:
        tensors = list(manifest["metrics"]["tensors"].values())
        manifest["metrics"]["scope"] = "global"
        total = sum(t["numel"] for t in tensors)
        # Ranked over all tensors: the total is round(0.3 x total), while each tensor's count
        # is whatever the ranking gave it (the sum of per-matrix rounds is not that total).
        tensors[0]["zeros"] += zero_count(0.3, total) - sum(t["zeros"] for t in tensors) + 5
        tensors[1]["zeros"] -= 5

    edit_manifest(workdir / "pruned", global_scope)
    found = by_id(evaluate_contracts(workdir))
    assert found["FALSIFY-ALBOR-002"].status == "holds"
    assert found["FALSIFY-ALBOR-008"].status == "holds"
    assert "max deviation 0" in found["FALSIFY-ALBOR-008"].figure


# --- missing and malformed evidence: not run, with the reason, never an exception ----------


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_a_workdir_without_stages_runs_no_contract(tmp_path: Path, where: str) -> None:
    root = tmp_path / "run"
    if where == "empty":
        root.mkdir()
    contracts = evaluate_contracts(root)
    assert [c.id for c in contracts] == IDS
    assert {c.id: c.status for c in contracts if c.status != "not run"} == {
        "FALSIFY-ALBOR-003": "tested"
    }
    assert all(c.evidence for c in contracts)
    if where == "missing":
        assert all("is not a directory" in c.evidence for c in contracts if c.status == "not run")


def test_stages_the_pipeline_expected_but_did_not_finish_are_named_with_their_status(
    workdir: Path,
) -> None:
    shutil.rmtree(workdir / "teacher")
    shutil.rmtree(workdir / "quantize")
    status = json.loads((workdir / ".albor-pipeline.json").read_text())
    status["teacher"] = {"status": "failed", "error": "StageFailed: out of memory"}
    status["quantize"] = {"status": "running"}
    (workdir / ".albor-pipeline.json").write_text(json.dumps(status))
    found = by_id(evaluate_contracts(workdir))
    one = found["FALSIFY-ALBOR-001"]
    assert one.status == "holds"  # base and distill still decide it
    assert "teacher has no manifest (status failed: StageFailed: out of memory)" in one.evidence
    nine = found["FALSIFY-ALBOR-009"]
    assert nine.status == "not run" and "quantize has no manifest (status running)" in (
        nine.evidence
    )


@pytest.mark.parametrize(
    "damage",
    [
        "not json",
        "[1, 2]",
        '{"stage": "prune", "outputs": [], "metrics": [1]}',
        '{"stage": "prune", "outputs": [], "metrics": {"method": "wanda", '
        '"requested_sparsity": 0.3, "tensors": {"w": {"zeros": "many"}}}}',
        '{"stage": "quantize", "outputs": [], "metrics": {"variants": {"int8": 3}}}',
    ],
)
def test_malformed_manifests_make_their_contract_not_run(workdir: Path, damage: str) -> None:
    for name in ("pruned", "quantize", "merged", "teacher_logits"):
        (workdir / name / "manifest.json").write_text(damage)
    (workdir / "pipeline.json").write_text("{oops")
    (workdir / "base" / "metrics.jsonl").write_text('{"step": 1, "loss": "x"}\nnot json\n')
    found = by_id(evaluate_contracts(workdir))
    for contract in ("FALSIFY-ALBOR-007", "FALSIFY-ALBOR-008"):
        assert found[contract].status == "not run", found[contract]
        assert found[contract].evidence
    # The stored rows are unreadable; the rows the online distill's teacher computed decide.
    assert found["FALSIFY-ALBOR-006"].status == "holds", found["FALSIFY-ALBOR-006"]
    assert "(online teacher)" in found["FALSIFY-ALBOR-006"].figure
    eight = found["FALSIFY-ALBOR-008"].evidence
    assert "pipeline.json is malformed: ignored" in eight
    if damage in ("not json", "[1, 2]"):  # no kind known: every contract not run names them
        assert "unreadable stages of unknown kind: merged (malformed manifest" in eight
    assert found["FALSIFY-ALBOR-009"].status == "not run"
    # base logs nothing usable; teacher and distill still decide 001.
    assert found["FALSIFY-ALBOR-001"].status == "holds"
    assert "base: metrics.jsonl logs no step loss" in found["FALSIFY-ALBOR-001"].evidence


# --- the rules ------------------------------------------------------------------------------


def test_smoothed_final_is_the_mean_of_the_last_tenth() -> None:
    assert smoothed_final([5.0]) == 5.0
    assert smoothed_final([9.0] * 10 + [1.0] * 10) == 1.0  # last 2 of 20
    assert smoothed_final(list(range(100))) == sum(range(90, 100)) / 10


def test_grad_norm_spikes_compare_with_the_median_of_the_norms_before() -> None:
    steps = list(range(1, 21))
    norms = [1.0] * 20
    assert grad_norm_spikes(steps, norms, 5, 5.0) == (1.0, [])
    norms[2] = 50.0  # in warmup: counted in the median, not judged
    norms[12] = 5.5
    norms[15] = 4.9
    worst, spikes = grad_norm_spikes(steps, norms, 5, 5.0)
    assert spikes == [13] and worst == 5.5


@pytest.mark.parametrize("cos", [0.9, 0.3, 0.0, -0.2, -0.7, -0.99])
def test_slerp_norm_bound_is_the_largest_slerp_coefficient(cos: float) -> None:
    """Over t, the largest of SLERP's two coefficients (and 1) is the bound: albor's slerp of a
    unit vector and a vanishing one reaches it, and no norms pass it."""
    theta = math.acos(cos)
    ts = [i / 400 for i in range(401)]
    coefficient = max(
        max(math.sin((1 - t) * theta), math.sin(t * theta)) / math.sin(theta) for t in ts
    )
    assert slerp_norm_bound(cos) == pytest.approx(max(1.0, coefficient), rel=1e-4)
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = 1e-6 * torch.tensor([cos, math.sin(theta)], dtype=torch.float64)
    reached = max(float(M.slerp(a, b, t).norm()) for t in ts)
    assert reached == pytest.approx(slerp_norm_bound(cos), rel=1e-3)


@pytest.mark.parametrize(("val_loss", "status"), [(4.1, "holds"), (4.3, "fails")])
def test_a_finetune_is_judged_by_its_bases_validation_loss(
    workdir: Path, val_loss: float, status: str
) -> None:
    """LoRA starts at its base: its step losses on pairs swing from batch to batch, so 001 asks
    a finetune to lower its base's validation loss on the held-out pairs, whatever its steps do."""
    tuned = Path(shutil.copytree(workdir / "distill", workdir / "instruct"))

    def as_finetune(manifest: dict[str, Any]) -> None:
        manifest.update(stage="finetune", name="instruct")
        manifest["metrics"].update(base_val_loss=4.2, val_loss=val_loss)

    edit_manifest(tuned, as_finetune)
    rising = [{"step": s, "loss": 3.0 + s / 100, "grad_norm": 1.0} for s in (10, 20, 30)]
    (tuned / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rising))
    one = by_id(evaluate_contracts(workdir))["FALSIFY-ALBOR-001"]
    assert one.status == status, one
    rose = " (rose)" if status == "fails" else ""
    assert f"instruct (val pairs) 4.200->{val_loss:.3f}{rose}" in one.figure
