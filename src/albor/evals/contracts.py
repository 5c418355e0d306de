"""The specification's nine falsification contracts (FALSIFY-ALBOR-001..009), decided from a
ladder workdir's run evidence.

    contracts = evaluate_contracts(Path("albor-run"))   # one Contract per ID, in order

Each contract is judged from what the stages wrote (manifests, `metrics.jsonl`), never by running
anything: `holds` or `fails` with the figure that decided it, `not run` where the workdir lacks the
stage or its evidence (the reason says which, and a malformed manifest is one such reason, never
an exception), and `tested` where a run cannot show the property (checkpoint determinism needs a
second, straight run to compare with; its test makes one). Every contract names the test that
checks it on tiny real runs: `python -m pytest -m falsify` runs all nine.

The rules a contract applies to run evidence are written here once, and the tests and the merge
stage (which records SLERP's norm evidence) import them: `smoothed_final`, `grad_norm_spikes`
with `GRAD_SPIKE_FACTOR`, and `slerp_norm_bound`.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from albor.errors import AlborError

Status = Literal["holds", "fails", "not run", "tested"]

TEST_FILE = "tests/falsify/test_falsify_contracts.py"
TRAINING_KINDS = ("pretrain", "distill", "finetune")
NO_TRAINING = "no training stage (pretrain, distill, finetune) in this workdir"

# A step whose gradient norm exceeds this many times the median of every norm logged before it
# is a spike. Healthy runs measured: the ladder's stdlib pretrain, distill and LoRA runs stay
# within 1.6x of their running median; the tests' tiny runs, whose batches of 512 tokens can be
# one odd file (this.py is rot13), reach 4.5x on single steps. A diverging run shows norms
# an order of magnitude up: 10 keeps twice the worst healthy figure as margin and still
# catches that jump.
GRAD_SPIKE_FACTOR = 10.0
# The final loss is the mean of the last tenth of the logged step losses (at least one): a
# single step's loss on a small batch moves by more than a short run's progress.
SMOOTH_FRACTION = 0.1
# Quantized variants judged, with the bits/byte increase each may cost (the specification: int8
# within 1%, int4 within 10%; the GGUF types of the same widths are held to the same bound).
QUANT_BOUNDS = {
    "int8": 0.01,
    "gguf-q8_0": 0.01,
    "int4": 0.10,
    "gguf-q4_0": 0.10,
    "gguf-q4_k_m": 0.10,
}
# A logged KL below zero by less than this is fp32 rounding of a zero KL, not a negative one.
KL_ROUNDING = 1e-6


@dataclass(frozen=True)
class Contract:
    """One falsification contract as the run evidence decides it."""

    id: str
    title: str
    status: Status
    figure: str  # the figure that decided it, one line
    evidence: str  # where the figure came from, and what was missing
    test: str  # the pytest node id of the test that checks it on tiny real runs


TITLES = {
    "FALSIFY-ALBOR-001": ("Loss decreases", "loss_decreases"),
    "FALSIFY-ALBOR-002": ("Gradient norms bounded", "gradient_norms_bounded"),
    "FALSIFY-ALBOR-003": ("Checkpoint determinism", "checkpoint_determinism"),
    "FALSIFY-ALBOR-004": ("KL non-negative", "kl_non_negative"),
    "FALSIFY-ALBOR-005": (
        "Distillation beats no distillation",
        "distillation_beats_no_distillation",
    ),
    "FALSIFY-ALBOR-006": ("Teacher-logit integrity", "teacher_logit_integrity"),
    "FALSIFY-ALBOR-007": ("SLERP interpolation bound", "slerp_bound"),
    "FALSIFY-ALBOR-008": ("Exact sparsity", "exact_sparsity"),
    "FALSIFY-ALBOR-009": ("Quantization fidelity", "quantization_fidelity"),
}


def test_node(contract_id: str) -> str:
    """The pytest node id of a contract's test."""
    suffix = TITLES[contract_id][1]
    return f"{TEST_FILE}::test_{contract_id.replace('-', '_')}_{suffix}"


# --- the rules, shared with the tests -------------------------------------------------------


def smoothed_final(losses: Sequence[float]) -> float:
    """The mean of the last `SMOOTH_FRACTION` of `losses` (at least one of them)."""
    n = max(1, int(len(losses) * SMOOTH_FRACTION))
    return statistics.fmean(losses[-n:])


def grad_norm_spikes(
    steps: Sequence[int], norms: Sequence[float], warmup_steps: int, factor: float
) -> tuple[float, list[int]]:
    """The largest ratio of a norm logged after warmup to the median of every norm logged before
    it, and the steps where that ratio exceeds `factor`. Warmup norms count in the median (they
    are the only reference the first steps after it have) but are not judged: the first steps
    of a run from a random init move fast by design."""
    worst = 0.0
    spikes: list[int] = []
    for i, (step, norm) in enumerate(zip(steps, norms, strict=True)):
        if step <= warmup_steps or i == 0:
            continue
        median = statistics.median(norms[:i])
        if median <= 0:
            continue
        ratio = norm / median
        worst = max(worst, ratio)
        if ratio > factor:
            spikes.append(step)
    return worst, spikes


def slerp_norm_bound(cos: float) -> float:
    """The factor B with ||slerp(a, b, t)|| <= B * max(||a||, ||b||) for every t in [0, 1], for
    endpoints at cosine `cos`: 1 for cos >= 0, 1 / sin(theta) for an obtuse angle.

    SLERP returns c_a a + c_b b with c_a = sin((1-t)θ)/sin θ, c_b = sin(tθ)/sin θ, both >= 0, and
    for unit endpoints that vector has norm 1 (c_a² + c_b² + 2 c_a c_b cos θ = 1). Its squared
    norm is a positive semi-definite quadratic form in (||a||, ||b||), so over the box [0, M]²
    it peaks at a corner: M² at (M, M), c_a² M² or c_b² M² where one norm is 0. Hence the tight
    bound max(1, c_a, c_b) M. For θ <= 90° both coefficients are at most 1 and the norm never
    exceeds the larger endpoint's; past 90° a coefficient exceeds 1 (c_a = 1/sin θ where (1-t)θ
    = 90°), and with unequal norms the result can be longer than either endpoint, up to M / sin θ.
    Equal norms keep the norm at any angle. albor's linear fallback for (anti)parallel endpoints
    is within both bounds (its coefficients are 1-t and t).
    """
    if cos >= 0:
        return 1.0
    return 1.0 / math.sqrt(max(1.0 - cos * cos, 1e-300))


def rounding_tolerance(dtype: str) -> float:
    """How far a norm ratio of tensors stored in `dtype` may pass a bound by rounding alone: the
    stored result is rounded element by element (at most half an ulp each, so its norm by half an
    ulp relative) after a float32 computation; 4 ulps covers both."""
    eps = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}.get(dtype, 2.0**-7)
    return 4 * eps


# --- the workdir's evidence ----------------------------------------------------------------


@dataclass(frozen=True)
class _Stage:
    name: str
    directory: Path
    kind: str | None  # the stage kind, from the manifest or pipeline.json
    manifest: dict[str, Any] | None
    problem: str | None  # why there is no usable manifest


class _Workdir:
    """The stages of a workdir: those pipeline.json expects (when it exists) and every
    subdirectory with a manifest, each with its manifest or the reason it has none."""

    def __init__(self, root: Path) -> None:
        from albor.artifact import read_manifest

        self.root = root
        self.notes: list[str] = []
        status = _read_json(root / ".albor-pipeline.json")
        self.status: dict[str, Any] = status if isinstance(status, dict) else {}
        expected: dict[str, str | None] = {}
        plan = _read_json(root / "pipeline.json")
        if isinstance(plan, dict) and isinstance(plan.get("stages"), list):
            for entry in plan["stages"]:
                if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                    uses = entry.get("uses")
                    expected[entry["name"]] = uses if isinstance(uses, str) else None
        elif plan is not None:
            self.notes.append(f"{root / 'pipeline.json'} is malformed: ignored")
        names = list(expected)
        if root.is_dir():
            names += sorted(
                p.name
                for p in root.iterdir()
                if p.is_dir() and (p / "manifest.json").exists() and p.name not in expected
            )
        self.stages: dict[str, _Stage] = {}
        for name in names:
            directory = root / name
            manifest: dict[str, Any] | None = None
            problem = None
            if (directory / "manifest.json").exists():
                try:
                    manifest = read_manifest(directory)
                except AlborError as e:
                    problem = f"malformed manifest: {e}"
            else:
                problem = self._missing(name)
            kind = manifest.get("stage") if manifest else expected.get(name)
            self.stages[name] = _Stage(
                name, directory, kind if isinstance(kind, str) else None, manifest, problem
            )

    def _missing(self, name: str) -> str:
        entry = self.status.get(name)
        if isinstance(entry, dict) and entry.get("status"):
            error = f": {entry['error']}" if entry.get("error") else ""
            return f"stage {name} has no manifest (status {entry['status']}{error})"
        return f"stage {name} has not run (no manifest)"

    def caveats(self) -> list[str]:
        """What may hide evidence from every contract: a malformed pipeline.json, and stages of
        unknown kind (their manifest is unreadable and pipeline.json does not name them)."""
        unknown = [f"{s.name} ({s.problem})" for s in self.stages.values() if s.kind is None]
        if unknown:
            return [*self.notes, f"unreadable stages of unknown kind: {'; '.join(unknown)}"]
        return self.notes

    def of_kind(self, *kinds: str) -> list[_Stage]:
        return [s for s in self.stages.values() if s.kind in kinds]

    def failed_error(self, name: str) -> str | None:
        entry = self.status.get(name)
        if isinstance(entry, dict) and entry.get("status") == "failed":
            return str(entry.get("error") or "")
        return None


def _read_json(path: Path) -> Any:
    """The JSON at `path`; None when missing, {"__malformed__": ...} when unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return {"__malformed__": str(e)}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _metrics(stage: _Stage) -> dict[str, Any]:
    assert stage.manifest is not None
    metrics = stage.manifest.get("metrics")
    if not isinstance(metrics, dict):
        raise ValueError(f"{stage.directory / 'manifest.json'}: metrics is not an object")
    return metrics


def _config(stage: _Stage) -> dict[str, Any]:
    assert stage.manifest is not None
    config = stage.manifest.get("config")
    return config if isinstance(config, dict) else {}


def _step_lines(stage: _Stage) -> list[dict[str, Any]]:
    from albor.track.metrics import METRICS_FILE, read

    return [r for r in read(stage.directory / METRICS_FILE) if "loss" in r or "grad_norm" in r]


def _usable(stages: list[_Stage]) -> tuple[list[_Stage], list[str]]:
    """The stages with a manifest, and the reasons of those without."""
    ok = [s for s in stages if s.manifest is not None]
    return ok, [s.problem or f"{s.name}: no manifest" for s in stages if s.manifest is None]


class _Judge:
    """Builds one contract's result; one not run also names what may have hidden its evidence."""

    def __init__(self, contract_id: str, caveats: list[str], missing: str | None) -> None:
        self.id = contract_id
        self.caveats = caveats
        self.missing = missing

    def __call__(self, status: Status, figure: str, evidence: str) -> Contract:
        if status == "not run" and self.missing:
            evidence = f"{self.missing}; {evidence}"
        if status == "not run" and self.caveats:
            evidence += f"; {'; '.join(self.caveats)}"
        return Contract(self.id, TITLES[self.id][0], status, figure, evidence, test_node(self.id))


def _combine(verdicts: list[bool]) -> Status:
    return "holds" if all(verdicts) else "fails"


def _missing_note(problems: list[str]) -> str:
    return f"; not judged: {'; '.join(problems)}" if problems else ""


def _decided(
    judge: _Judge,
    verdicts: list[bool],
    figure: str,
    evidence: str,
    problems: list[str],
    missing: str,
    default: str = "",
) -> Contract:
    """The verdict over the stages that gave evidence (those that could not are named in the
    evidence), or "not run" with `missing` as the figure when none could."""
    if not verdicts:
        return judge("not run", missing, "; ".join(problems) or default)
    return judge(_combine(verdicts), figure, evidence + _missing_note(problems))


# --- the nine contracts ----------------------------------------------------------------------


def _loss_decreases(w: _Workdir, judge: _Judge) -> Contract:
    stages, problems = _usable(w.of_kind(*TRAINING_KINDS))
    verdicts, shown, ceilings = [], [], set()
    for s in stages:
        m = _metrics(s)
        base_val, val = _number(m.get("base_val_loss")), _number(m.get("val_loss"))
        if s.kind == "finetune" and base_val is not None and val is not None:
            # LoRA starts at its base, so its step losses barely move and swing from batch to
            # batch of pairs; what it must lower is the base's loss on the held-out pairs.
            first, final, label = base_val, val, f"{s.name} (val pairs)"
        else:
            losses = [v for r in _step_lines(s) if (v := _number(r.get("loss"))) is not None]
            if not losses:
                problems.append(f"{s.name}: metrics.jsonl logs no step loss")
                continue
            first, final, label = losses[0], smoothed_final(losses), s.name
        config = _read_json(s.directory / "config.json")
        vocab = _number(config.get("vocab_size")) if isinstance(config, dict) else None
        # A uniform guess over the vocabulary scores ln(V): a model must end below it.
        ceiling = math.log(vocab) if vocab and vocab > 1 else math.inf
        verdicts.append(final < first and final < ceiling)
        ceilings.add(round(ceiling, 2))
        note = " (rose)" if final >= first else " (above ln V)" if final >= ceiling else ""
        shown.append(f"{label} {first:.3f}->{final:.3f}{note}")
    return _decided(
        judge,
        verdicts,
        "loss first->smoothed final: "
        + ", ".join(shown)
        + "".join(f"; ln(V) {c:.2f}" for c in sorted(ceilings) if math.isfinite(c)),
        "metrics.jsonl step losses of each training stage; final = mean of the last "
        f"{SMOOTH_FRACTION:.0%} of the logged steps; a finetune: its base's validation loss on "
        "the held-out pairs, then its own",
        problems,
        "no training stage logged a loss",
        NO_TRAINING,
    )


def _grad_norms(w: _Workdir, judge: _Judge) -> Contract:
    stages, problems = _usable(w.of_kind(*TRAINING_KINDS))
    verdicts, shown, clipped_notes = [], [], []
    for s in stages:
        lines = [r for r in _step_lines(s) if "grad_norm" in r]
        if not lines:
            problems.append(f"{s.name}: metrics.jsonl logs no grad_norm")
            continue
        logged = [(int(r.get("step") or 0), _number(r.get("grad_norm"))) for r in lines]
        kept = [(step, n) for step, n in logged if n is not None and math.isfinite(n)]
        finite = [n for _, n in kept]
        bad = len(logged) - len(kept)
        config = _config(s)
        warmup = int(_number(config.get("warmup_steps")) or 0)
        steps = [step for step, _ in kept]
        worst, spikes = grad_norm_spikes(steps, finite, warmup, GRAD_SPIKE_FACTOR)
        verdicts.append(bad == 0 and not spikes)
        what = f"{s.name} max {max(finite, default=math.nan):.3g}"
        what += f" median {statistics.median(finite) if finite else math.nan:.3g}"
        what += f" worst/running median {worst:.2f}"
        if bad:
            what += f", {bad} not finite"
        if spikes:
            what += f", spikes at steps {spikes[:5]}"
        shown.append(what)
        clip = _number(config.get("grad_clip"))
        if clip is not None:
            above = sum(n > clip for n in finite)
            clipped_notes.append(f"{s.name} {above}/{len(finite)} logged steps above {clip:g}")
    return _decided(
        judge,
        verdicts,
        f"k={GRAD_SPIKE_FACTOR:g}: " + "; ".join(shown),
        "metrics.jsonl grad_norm (the norm before clipping, as clip_grad_norm_ returns it); "
        "after warmup no step above k x the median of the norms before it; clipped: "
        + (", ".join(clipped_notes) or "grad_clip not recorded"),
        problems,
        "no training stage logged a gradient norm",
        NO_TRAINING,
    )


def _determinism(w: _Workdir, judge: _Judge) -> Contract:
    stages, problems = _usable(w.of_kind(*TRAINING_KINDS))
    exact, inexact, resumed = [], [], []
    for s in stages:
        m = _metrics(s)
        if m.get("bit_exact_resume") is True:
            exact.append(s.name)
        elif m.get("bit_exact_resume") is False:
            inexact.append(f"{s.name} ({m.get('nondeterminism') or 'no reason recorded'})")
        if m.get("resumed_from") is not None:
            resumed.append(f"{s.name} from step {m['resumed_from']}")
    figure = f"{len(exact)} of {len(stages)} training stages bit-exact on resume"
    if not stages:
        figure = "no training stage; the test decides it"
    if inexact:
        figure += f"; not bit-exact: {', '.join(inexact)}"
    return judge(
        "tested",
        figure,
        "a run alone cannot show determinism: it needs a straight run to compare with, which "
        "the test makes (straight = crashed and resumed = a second straight run, bit for bit); "
        f"resumed here: {', '.join(resumed) or 'none'}" + _missing_note(problems),
    )


def _kl(w: _Workdir, judge: _Judge) -> Contract:
    stages, problems = _usable(w.of_kind("distill"))
    if not stages:
        return judge("not run", "no distill stage", "; ".join(problems) or "no distill stage")
    kls = {
        s.name: [v for r in _step_lines(s) if (v := _number(r.get("kl"))) is not None]
        for s in stages
    }
    logged = {k: v for k, v in kls.items() if v}
    if not logged:
        return judge(
            "tested",
            "distill logs no KL term",
            f"{', '.join(kls)}: metrics.jsonl has the blended loss but no kl, so the production "
            "KL is not observed; the test checks the production loss function"
            + _missing_note(problems),
        )
    low = min(min(v) for v in logged.values())
    return judge(
        "holds" if low >= -KL_ROUNDING else "fails",
        f"min logged KL {low:.3g} over {sum(map(len, logged.values()))} steps",
        "metrics.jsonl kl of " + ", ".join(logged) + _missing_note(problems),
    )


def _eval_bpb(w: _Workdir, variant: str) -> tuple[float | None, str]:
    """Validation bits/byte of `variant`: its evaluate stage's, else its training manifest's."""
    evaluated = w.stages.get(f"eval-{variant}")
    if evaluated is not None and evaluated.manifest is not None:
        perplexity = _metrics(evaluated).get("perplexity")
        if isinstance(perplexity, dict) and _number(perplexity.get("bits_per_byte")) is not None:
            return float(perplexity["bits_per_byte"]), f"eval-{variant} perplexity"
    trained = w.stages.get(variant)
    if trained is not None and trained.manifest is not None:
        value = _number(_metrics(trained).get("val_bpb"))
        if value is not None:
            return value, f"{variant} manifest val_bpb"
    return None, ""


def _distillation(w: _Workdir, judge: _Judge) -> Contract:
    distill, base = w.stages.get("distill"), w.stages.get("base")
    missing = [
        s.problem or f"{name}: no manifest" if s else f"no {name} stage"
        for name, s in (("distill", distill), ("base", base))
        if s is None or s.manifest is None
    ]
    if missing or distill is None or base is None:
        return judge("not run", "distill or base missing", "; ".join(missing) or "no distill")
    md, mb = _metrics(distill), _metrics(base)
    differ = [
        f"{k} {md.get(k)} vs {mb.get(k)}" for k in ("parameters", "steps") if md.get(k) != mb.get(k)
    ]
    if differ:
        return judge(
            "not run",
            "distill and base are not comparable",
            f"distill vs base differ in {', '.join(differ)}: the contract compares students of "
            "one size trained for the same steps",
        )
    d, where_d = _eval_bpb(w, "distill")
    b, where_b = _eval_bpb(w, "base")
    if d is None or b is None:
        return judge("not run", "no bits/byte", "distill or base has no validation bits/byte")
    return judge(
        "holds" if d < b else "fails",
        f"val bits/byte distill {d:.4f} vs base {b:.4f} ({d - b:+.4f})",
        f"{where_d} vs {where_b}; {md.get('parameters')} parameters, {md.get('steps')} steps each",
    )


def _teacher_logits(w: _Workdir, judge: _Judge) -> Contract:
    from albor.train.teacher import row_mass_tolerance

    all_stages = w.of_kind("teacher_logits")
    failed = [
        f"{s.name}: {err}"
        for s in all_stages
        if (err := w.failed_error(s.name)) is not None and "top-k row" in err
    ]
    if failed:
        return judge("fails", "a row failed the integrity check", "; ".join(failed))
    stages, problems = _usable(all_stages)
    if not stages:
        online = _online_teacher_rows(w)
        if online is not None:
            return judge(*online)
        return judge(
            "not run",
            "no teacher_logits stage",
            "; ".join(problems)
            or "no teacher_logits stage in this workdir and no distill stage that checked "
            "its online teacher's rows",
        )
    verdicts, shown = [], []
    for s in stages:
        m, config = _metrics(s), _config(s)
        top_k = int(_number(config.get("top_k")) or 0)
        mass = _number(m.get("max_row_mass_computed"))
        if top_k < 1 or mass is None:
            problems.append(f"{s.name}: no top_k or max_row_mass_computed in its manifest")
            continue
        tolerance = row_mass_tolerance(top_k)
        computed = int(_number(m.get("shards_computed")) or 0)
        ok = math.isfinite(mass) and mass <= 1 + tolerance
        verdicts.append(ok)
        shown.append(
            f"{s.name} max row mass {mass:.6f} <= 1 + {tolerance:.2g} over {m.get('positions')} "
            f"positions" + ("" if computed else " (all shards kept from an earlier run)")
        )
    return _decided(
        judge,
        verdicts,
        "; ".join(shown),
        "teacher_logits manifest: every row checked finite before it was written",
        problems,
        "no integrity figures",
    )


def _online_teacher_rows(w: _Workdir) -> tuple[Status, str, str] | None:
    """006 from distill stages whose teacher ran online: each records the top-k rows its
    teacher computed (`teacher_rows`: rows checked, largest probability mass, non-finite
    rows); None when no distill stage has such figures."""
    from albor.train.teacher import row_mass_tolerance

    stages, _ = _usable(w.of_kind("distill"))
    verdicts, shown = [], []
    for s in stages:
        rows = _metrics(s).get("teacher_rows")
        if not isinstance(rows, dict):
            continue
        checked = int(_number(rows.get("rows_checked")) or 0)
        mass, top_k = _number(rows.get("max_row_mass")), int(_number(rows.get("top_k")) or 0)
        bad = int(_number(rows.get("nonfinite_rows")) or 0)
        if checked < 1 or top_k < 1 or (mass is None and bad == 0):
            continue
        # Online rows are fp32 (no fp16 storage): the stored rows' tolerance bounds them too.
        tolerance = row_mass_tolerance(top_k)
        verdicts.append(bad == 0 and mass is not None and mass <= 1 + tolerance)
        largest = "not finite" if mass is None else f"{mass:.6f}"
        shown.append(
            f"{s.name} (online teacher): max row mass {largest} <= 1 + {tolerance:.2g} over "
            f"{checked:,} rows, {bad} non-finite"
        )
    if not verdicts:
        return None
    return (
        _combine(verdicts),
        "; ".join(shown),
        "distill manifest: the top-k rows its teacher computed, checked as it trained",
    )


def _slerp(w: _Workdir, judge: _Judge) -> Contract:
    stages, problems = _usable(w.of_kind("merge"))
    verdicts, shown = [], []
    for s in stages:
        m = _metrics(s)
        if m.get("method") != "slerp":
            problems.append(f"{s.name}: method {m.get('method')}, not slerp")
            continue
        norms = m.get("slerp_norms")
        if not isinstance(norms, dict) or _number(norms.get("max_ratio_to_bound")) is None:
            problems.append(f"{s.name}: its manifest has no slerp_norms (merged by an older albor)")
            continue
        tol = rounding_tolerance(str(m.get("dtype")))
        to_bound = float(norms["max_ratio_to_bound"])
        verdicts.append(to_bound <= 1 + tol)
        obtuse = int(_number(norms.get("obtuse_tensors")) or 0)
        shown.append(
            f"{s.name} max ||merged||/max(||a||,||b||) {float(norms['max_ratio']):.4f}, "
            f"{to_bound:.4f} of the bound, {obtuse} of {norms.get('tensors')} tensors obtuse"
        )
    return _decided(
        judge,
        verdicts,
        "; ".join(shown),
        "merge manifest slerp_norms, per tensor: ||merged|| <= max(||a||,||b||) for cos >= 0, "
        "/ sin(theta) when obtuse",
        problems,
        "no SLERP merge evidence",
        "no merge stage",
    )


def _sparsity(w: _Workdir, judge: _Judge) -> Contract:
    from albor.model.transforms.prune import zero_count

    stages, problems = _usable(w.of_kind("prune"))
    verdicts, shown = [], []
    for s in stages:
        m = _metrics(s)
        requested = _number(m.get("requested_sparsity"))
        tensors = m.get("tensors")
        if m.get("method") == "depth" or requested is None or not isinstance(tensors, dict):
            problems.append(f"{s.name}: method {m.get('method')} requests no sparsity")
            continue
        counts = [(int(t["zeros"]), int(t["numel"])) for t in tensors.values()]
        if m.get("scope") == "global":  # ranked over all tensors: the total is what is exact
            zeros, numel = sum(z for z, _ in counts), sum(n for _, n in counts)
            deviation = abs(zeros - zero_count(requested, numel))
        else:
            deviation = max((abs(z - zero_count(requested, n)) for z, n in counts), default=0)
        verdicts.append(deviation <= 1)
        shown.append(
            f"{s.name} {m.get('method')} {requested:g}: max deviation {deviation} element(s) over "
            f"{len(counts)} tensors"
        )
    return _decided(
        judge,
        verdicts,
        "; ".join(shown),
        "prune manifest tensors: zeros counted in the written tensors vs round(sparsity x numel)",
        problems,
        "no sparsity pruning",
        "no prune stage",
    )


def _quantization(w: _Workdir, judge: _Judge) -> Contract:
    stages, problems = _usable(w.of_kind("quantize"))
    verdicts, shown = [], []
    for s in stages:
        variants = _metrics(s).get("variants")
        if not isinstance(variants, dict):
            problems.append(f"{s.name}: no variants in its manifest")
            continue
        for name, bound in QUANT_BOUNDS.items():
            row = variants.get(name)
            if not isinstance(row, dict):
                continue
            increase = _number(row.get("val_bpb_increase"))
            if increase is None:
                problems.append(f"{s.name} {name}: no val_bpb_increase")
                continue
            verdicts.append(abs(increase) <= bound)
            shown.append(f"{name} {increase:+.2%} (bound {bound:.0%})")
    return _decided(
        judge,
        verdicts,
        ", ".join(shown),
        "quantize manifest val_bpb_increase (bits/byte relative to the full model)",
        problems,
        "no quantized variant",
        "no quantize stage",
    )


_CONTRACTS: dict[str, Callable[[_Workdir, _Judge], Contract]] = {
    "FALSIFY-ALBOR-001": _loss_decreases,
    "FALSIFY-ALBOR-002": _grad_norms,
    "FALSIFY-ALBOR-003": _determinism,
    "FALSIFY-ALBOR-004": _kl,
    "FALSIFY-ALBOR-005": _distillation,
    "FALSIFY-ALBOR-006": _teacher_logits,
    "FALSIFY-ALBOR-007": _slerp,
    "FALSIFY-ALBOR-008": _sparsity,
    "FALSIFY-ALBOR-009": _quantization,
}


def evaluate_contracts(workdir: Path) -> list[Contract]:
    """The nine contracts, in ID order, decided from `workdir`'s run evidence. Never raises for
    what the workdir holds: a missing or malformed manifest makes its contract `not run` with
    the reason."""
    workdir = Path(workdir)
    w = _Workdir(workdir)
    found = []
    for contract_id, decide in _CONTRACTS.items():
        missing = None if workdir.is_dir() else f"{workdir} is not a directory"
        judge = _Judge(contract_id, w.caveats(), missing)
        try:
            found.append(decide(w, judge))
        except (AlborError, KeyError, TypeError, ValueError, AttributeError, OSError) as e:
            found.append(
                judge("not run", "malformed evidence", f"{workdir}: {type(e).__name__}: {e}")
            )
    return found
