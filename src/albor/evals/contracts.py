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
with `GRAD_SPIKE_FACTOR`, and `slerp_norm_bound`. The workdir is read by
`albor.evals.run_evidence`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from albor.errors import AlborError
from albor.evals.run_evidence import (
    Workdir,
    config_of,
    metrics_of,
    number,
    read_json,
    step_lines,
    usable,
)

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


def _loss_decreases(w: Workdir, judge: _Judge) -> Contract:
    stages, problems = usable(w.of_kind(*TRAINING_KINDS))
    verdicts, shown, ceilings = [], [], set()
    for s in stages:
        m = metrics_of(s)
        base_val, val = number(m.get("base_val_loss")), number(m.get("val_loss"))
        if s.kind == "finetune" and base_val is not None and val is not None:
            # LoRA starts at its base, so its step losses barely move and swing from batch to
            # batch of pairs; what it must lower is the base's loss on the held-out pairs.
            first, final, label = base_val, val, f"{s.name} (val pairs)"
        else:
            losses = [v for r in step_lines(s) if (v := number(r.get("loss"))) is not None]
            if not losses:
                problems.append(f"{s.name}: metrics.jsonl logs no step loss")
                continue
            first, final, label = losses[0], smoothed_final(losses), s.name
        config = read_json(s.directory / "config.json")
        vocab = number(config.get("vocab_size")) if isinstance(config, dict) else None
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


def _grad_norms(w: Workdir, judge: _Judge) -> Contract:
    stages, problems = usable(w.of_kind(*TRAINING_KINDS))
    verdicts, shown, clipped_notes = [], [], []
    for s in stages:
        lines = [r for r in step_lines(s) if "grad_norm" in r]
        if not lines:
            problems.append(f"{s.name}: metrics.jsonl logs no grad_norm")
            continue
        logged = [(int(r.get("step") or 0), number(r.get("grad_norm"))) for r in lines]
        kept = [(step, n) for step, n in logged if n is not None and math.isfinite(n)]
        finite = [n for _, n in kept]
        bad = len(logged) - len(kept)
        config = config_of(s)
        warmup = int(number(config.get("warmup_steps")) or 0)
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
        clip = number(config.get("grad_clip"))
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


def _determinism(w: Workdir, judge: _Judge) -> Contract:
    stages, problems = usable(w.of_kind(*TRAINING_KINDS))
    exact, inexact, resumed = [], [], []
    for s in stages:
        m = metrics_of(s)
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


def _kl(w: Workdir, judge: _Judge) -> Contract:
    stages, problems = usable(w.of_kind("distill"))
    if not stages:
        return judge("not run", "no distill stage", "; ".join(problems) or "no distill stage")
    kls = {
        s.name: [v for r in step_lines(s) if (v := number(r.get("kl"))) is not None] for s in stages
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


def _eval_bpb(w: Workdir, variant: str) -> tuple[float | None, str]:
    """Validation bits/byte of `variant`: its evaluate stage's, else its training manifest's."""
    evaluated = w.stages.get(f"eval-{variant}")
    if evaluated is not None and evaluated.manifest is not None:
        perplexity = metrics_of(evaluated).get("perplexity")
        if isinstance(perplexity, dict) and number(perplexity.get("bits_per_byte")) is not None:
            return float(perplexity["bits_per_byte"]), f"eval-{variant} perplexity"
    trained = w.stages.get(variant)
    if trained is not None and trained.manifest is not None:
        value = number(metrics_of(trained).get("val_bpb"))
        if value is not None:
            return value, f"{variant} manifest val_bpb"
    return None, ""


def _distillation(w: Workdir, judge: _Judge) -> Contract:
    distill, base = w.stages.get("distill"), w.stages.get("base")
    missing = [
        s.problem or f"{name}: no manifest" if s else f"no {name} stage"
        for name, s in (("distill", distill), ("base", base))
        if s is None or s.manifest is None
    ]
    if missing or distill is None or base is None:
        return judge("not run", "distill or base missing", "; ".join(missing) or "no distill")
    md, mb = metrics_of(distill), metrics_of(base)
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


def _teacher_logits(w: Workdir, judge: _Judge) -> Contract:
    from albor.train.teacher import row_mass_tolerance

    all_stages = w.of_kind("teacher_logits")
    failed = [
        f"{s.name}: {err}"
        for s in all_stages
        if (err := w.failed_error(s.name)) is not None and "top-k row" in err
    ]
    if failed:
        return judge("fails", "a row failed the integrity check", "; ".join(failed))
    stages, problems = usable(all_stages)
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
        m, config = metrics_of(s), config_of(s)
        top_k = int(number(config.get("top_k")) or 0)
        mass = number(m.get("max_row_mass_computed"))
        if top_k < 1 or mass is None:
            problems.append(f"{s.name}: no top_k or max_row_mass_computed in its manifest")
            continue
        tolerance = row_mass_tolerance(top_k)
        computed = int(number(m.get("shards_computed")) or 0)
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


def _online_teacher_rows(w: Workdir) -> tuple[Status, str, str] | None:
    """006 from distill stages whose teacher ran online: each records the top-k rows its
    teacher computed (`teacher_rows`: rows checked, largest probability mass, non-finite
    rows); None when no distill stage has such figures."""
    from albor.train.teacher import row_mass_tolerance

    stages, _ = usable(w.of_kind("distill"))
    verdicts, shown = [], []
    for s in stages:
        rows = metrics_of(s).get("teacher_rows")
        if not isinstance(rows, dict):
            continue
        checked = int(number(rows.get("rows_checked")) or 0)
        mass, top_k = number(rows.get("max_row_mass")), int(number(rows.get("top_k")) or 0)
        bad = int(number(rows.get("nonfinite_rows")) or 0)
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


def _slerp(w: Workdir, judge: _Judge) -> Contract:
    stages, problems = usable(w.of_kind("merge"))
    verdicts, shown = [], []
    for s in stages:
        m = metrics_of(s)
        if m.get("method") != "slerp":
            problems.append(f"{s.name}: method {m.get('method')}, not slerp")
            continue
        norms = m.get("slerp_norms")
        if not isinstance(norms, dict) or number(norms.get("max_ratio_to_bound")) is None:
            problems.append(f"{s.name}: its manifest has no slerp_norms (merged by an older albor)")
            continue
        tol = rounding_tolerance(str(m.get("dtype")))
        to_bound = float(norms["max_ratio_to_bound"])
        verdicts.append(to_bound <= 1 + tol)
        obtuse = int(number(norms.get("obtuse_tensors")) or 0)
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


def _sparsity(w: Workdir, judge: _Judge) -> Contract:
    from albor.model.transforms.prune import zero_count

    stages, problems = usable(w.of_kind("prune"))
    verdicts, shown = [], []
    for s in stages:
        m = metrics_of(s)
        requested = number(m.get("requested_sparsity"))
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


def _quantization(w: Workdir, judge: _Judge) -> Contract:
    stages, problems = usable(w.of_kind("quantize"))
    verdicts, shown = [], []
    for s in stages:
        variants = metrics_of(s).get("variants")
        if not isinstance(variants, dict):
            problems.append(f"{s.name}: no variants in its manifest")
            continue
        for name, bound in QUANT_BOUNDS.items():
            row = variants.get(name)
            if not isinstance(row, dict):
                continue
            increase = number(row.get("val_bpb_increase"))
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


_CONTRACTS: dict[str, Callable[[Workdir, _Judge], Contract]] = {
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
    w = Workdir(workdir)
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
