"""The specification's nine falsification contracts, FALSIFY-ALBOR-001..009, one test each, named
by its ID, on tiny real runs of albor's own stages and loss functions:

    python -m pytest -m falsify            # all nine

Other tests check some of these properties too (tests/model/test_transforms_*.py,
tests/stages/test_quantize.py, tests/stages/test_teacher_logits.py); these call the same code
with the contract's own assertions, so that the nine stand in one place. The rules that the report
applies to a ladder's run evidence (`albor.evals.contracts`) are the ones asserted here.
"""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from falsify_runs import (
    GROUPED,
    SHORT,
    grouped_run,
    logits_run,
    pretrain,
    prune_run,
    quantize_run,
    short_run,
    slerp_run,
    step_lines,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from albor.artifact import read_manifest
from albor.errors import ArtifactError, DataError, StageFailed
from albor.evals.contracts import (
    GRAD_SPIKE_FACTOR,
    grad_norm_spikes,
    rounding_tolerance,
    slerp_norm_bound,
    smoothed_final,
)
from albor.model.transforms import merge as M
from albor.model.transforms.prune import zero_count
from albor.stage import load_stage, run_stage
from albor.train.distill import dense_kd_loss_sum, kd_loss_sum, topk_teacher
from albor.train.teacher import LogitsIndex, check_logit_rows, open_logits, verify_logits
from helpers import crash_at_20_and_resume, pretrain_config

pytestmark = pytest.mark.falsify


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Tiny models gain nothing from more threads; on a shared machine they lose."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "falsify-runs"


@pytest.fixture(scope="module")
def grouped(token_data: Path, root: Path) -> Path:
    return grouped_run(token_data, root)


def test_FALSIFY_ALBOR_001_loss_decreases(grouped: Path) -> None:
    losses = [r["loss"] for r in step_lines(grouped)]
    assert len(losses) == GROUPED["max_steps"] and all(math.isfinite(x) for x in losses)
    vocab = 512
    final = smoothed_final(losses)
    # Half a nat below where the run started and below a uniform guess over the vocabulary.
    assert final < losses[0] - 0.5, (losses[0], final)
    assert final < math.log(vocab) - 0.5, (math.log(vocab), final)
    m = read_manifest(grouped)["metrics"]
    assert m["first_loss"] == pytest.approx(losses[0], abs=1e-5)
    # Learned, not memorised: the validation loss fell below the uniform guess too.
    assert m["val_loss"] < math.log(vocab) - 0.5


def test_FALSIFY_ALBOR_002_gradient_norms_bounded(grouped: Path) -> None:
    lines = step_lines(grouped)
    steps = [r["step"] for r in lines]
    norms = [r["grad_norm"] for r in lines]
    assert steps == list(range(1, GROUPED["max_steps"] + 1))  # every step logged
    assert all(isinstance(n, float) and math.isfinite(n) and n > 0 for n in norms)
    worst, spikes = grad_norm_spikes(steps, norms, GROUPED["warmup_steps"], GRAD_SPIKE_FACTOR)
    assert spikes == [] and 0 < worst <= GRAD_SPIKE_FACTOR, worst
    # Clipping is configured and the log holds the norm before it: clipped steps log more than
    # the threshold (a norm after clipping could not exceed it).
    clip = read_manifest(grouped)["config"]["grad_clip"]
    assert clip == GROUPED["grad_clip"]
    assert sum(n > clip for n in norms) >= 10 and max(norms) > 1.5 * clip


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


def _assert_bitwise_equal(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    # The same losses, norms and learning rates, float for float (timings differ).
    keys = ("step", "loss", "grad_norm", "lr", "tokens")
    assert [[r[k] for k in keys] for r in step_lines(a)] == [
        [r[k] for k in keys] for r in step_lines(b)
    ]


def test_FALSIFY_ALBOR_003_checkpoint_determinism(
    token_data: Path, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = short_run(token_data, root, 1337)
    again = short_run(token_data, root, 1337, copy="b")
    _assert_bitwise_equal(straight, again)  # same seed, same bits

    # Stopped by an error right after its halfway checkpoint (no SIGKILL), then run again.
    cfg = pretrain_config(token_data, tmp_path / "resumed", **SHORT)
    resumed = crash_at_20_and_resume("pretrain", cfg, monkeypatch)
    assert resumed["resumed_from"] == SHORT["max_steps"] // 2
    assert resumed["bit_exact_resume"] is True and resumed["resume_warnings"] == []
    _assert_bitwise_equal(straight, tmp_path / "resumed")

    # Not bitwise equal by accident: another seed trains other weights.
    other = _weights(short_run(token_data, root, 7))
    assert any(not torch.equal(other[k], v) for k, v in _weights(straight).items())


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 16),
    vocab=st.integers(2, 300),
    k_fraction=st.floats(0.0, 1.0),
    temperature=st.floats(0.05, 20.0),
    student_scale=st.floats(0.0, 50.0),
    teacher_scale=st.floats(0.0, 50.0),
    same=st.booleans(),
)
def test_FALSIFY_ALBOR_004_kl_non_negative(
    seed: int,
    rows: int,
    vocab: int,
    k_fraction: float,
    temperature: float,
    student_scale: float,
    teacher_scale: float,
    same: bool,
) -> None:
    """The production loss at alpha = 1 is T^2 * KL: never below zero, whether the teacher is
    its top-k (offline shards, online top_k) or its whole distribution, for any temperature,
    including a student equal to its teacher (KL 0, where rounding could go negative)."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(rows, vocab, generator=gen) * teacher_scale
    student = teacher.clone() if same else torch.randn(rows, vocab, generator=gen) * student_scale
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    k = max(1, round(k_fraction * vocab))
    # fp32, as training computes it; a KL of 0 may round to a few ulps of the terms' size.
    floor = -1e-5 * rows * max(1.0, math.log(vocab))
    ids, logprobs = topk_teacher(teacher, k, temperature)
    for fp16 in (False, True):  # offline shards store the log-probabilities in fp16
        lp = logprobs.half().float() if fp16 else logprobs
        loss, n = kd_loss_sum(student, ids, lp, targets, temperature=temperature, alpha=1.0)
        assert n == rows and torch.isfinite(loss) and float(loss) >= floor * temperature**2
    dense, _ = dense_kd_loss_sum(student, teacher, targets, temperature=temperature, alpha=1.0)
    assert torch.isfinite(dense) and float(dense) >= floor * temperature**2
    # And exactly 0 in fp64 for a student equal to the teacher's whole distribution.
    if same:
        exact, _ = dense_kd_loss_sum(
            student.double(), teacher.double(), targets, temperature=temperature, alpha=1.0
        )
        assert abs(float(exact)) <= 1e-9 * rows * temperature**2


# Measured on this data: teachers of 3 layers trained 200 steps or of 4 trained 250 lost to no
# distillation (by 0.02 to 0.06 bits/byte); of 4 layers trained 400 steps the distilled student
# wins by 0.19 (seed 1337) and 0.21 (seed 5). A weak teacher is worse than none.
STUDENT_STEPS = 150
TEACHER = dict(
    architecture={
        "hidden_size": 128,
        "num_layers": 4,
        "num_heads": 4,
        "num_kv_heads": 2,
        "intermediate_size": 352,
    },
    micro_batch=8,
    max_steps=400,
    warmup_steps=20,
    lr=3e-3,
)


def test_FALSIFY_ALBOR_005_distillation_beats_no_distillation(
    token_data: Path, tmp_path: Path
) -> None:
    """A teacher twice as deep and twice as wide, trained longer, distilled online into a tiny
    student: the distilled student's val bits/byte is below a plain student's of the
    same size, init, batches and steps."""
    from albor.stages import distill

    common: dict[str, Any] = dict(
        eval_every=10**6, eval_tokens=8192, checkpoint_every=10**6, log_every=10, threads=1
    )
    teacher = pretrain(token_data, tmp_path / "teacher", **common, **TEACHER)
    student = dict(common, micro_batch=8, max_steps=STUDENT_STEPS, warmup_steps=10, lr=3e-3)
    plain = read_manifest(pretrain(token_data, tmp_path / "plain", **student))["metrics"]
    settings_ = pretrain_config(token_data, tmp_path / "distilled", **student)
    cfg = distill.Config.model_validate(
        {
            **settings_.model_dump(mode="json"),
            "teacher": str(teacher),
            "temperature": 1.0,
            "alpha": 0.5,
            "top_k": 32,
        }
    )
    distilled = run_stage(load_stage("distill"), cfg).manifest["metrics"]
    t = read_manifest(teacher)["metrics"]
    assert t["parameters"] > 2 * plain["parameters"] and t["steps"] > 2 * plain["steps"]
    for key in ("parameters", "steps", "tokens", "val_tokens"):
        assert distilled[key] == plain[key], key
    assert t["val_bpb"] < plain["val_bpb"]  # a teacher worth distilling
    # Measured 3.57 vs 3.77: the margin asked is a quarter of that.
    assert distilled["val_bpb"] < plain["val_bpb"] - 0.05, (distilled, plain)


def test_FALSIFY_ALBOR_006_teacher_logit_integrity(
    token_data: Path, root: Path, tmp_path: Path
) -> None:
    logits = logits_run(token_data, root)
    index = LogitsIndex.load(logits)
    tolerance = index.row_mass_tolerance
    rows = 0
    for pair in open_logits(logits, index):
        assert pair is not None
        ids, lps = pair
        values = np.asarray(lps, dtype=np.float64)
        assert np.isfinite(values).all()
        mass = np.exp(values).sum(axis=-1)
        assert (mass <= 1 + tolerance).all() and (mass > 0).all()
        assert (np.asarray(ids) < index.vocab_size).all()
        rows += mass.size
    assert rows == index.windows * index.seq_len > 0
    assert read_manifest(logits)["metrics"]["max_row_mass_computed"] <= 1 + tolerance

    # A corrupted shard is refused: by its hash before a student trains on it, and by the row
    # check that guards every row the stage writes.
    damaged = tmp_path / "damaged"
    shutil.copytree(logits, damaged)
    shard = next(p for p in sorted(damaged.rglob("logprobs.npy")))
    array = np.load(shard)
    array[0, 3, 0] = np.nan
    np.save(shard, array)
    with pytest.raises(ArtifactError, match="sha256 differs"):
        verify_logits(damaged)
    with pytest.raises(DataError, match=r"window 0, position 3: .*non-finite"):
        check_logit_rows(array, tolerance, where="shard")
    array[0, 3] = np.log(1.5 / index.top_k)
    with pytest.raises(DataError, match=r"summing to 1\.(49|50)"):
        check_logit_rows(array, tolerance, where="shard")
    from albor.stages import distill

    cfg = distill.Config.model_validate(
        {
            **pretrain_config(token_data, tmp_path / "student", **SHORT).model_dump(mode="json"),
            "teacher_logits": str(damaged),
            "seq_len": 64,
        }
    )
    with pytest.raises((StageFailed, ArtifactError), match="sha256"):
        run_stage(load_stage("distill"), cfg)


vectors = st.integers(2, 64).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, 2**31 - 1)))


def _pair(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen), torch.randn(n, generator=gen)


@settings(max_examples=80, deadline=None)
@given(
    shape=vectors,
    t=st.floats(0.0, 1.0),
    norm_a=st.floats(1e-3, 1e3),
    norm_b=st.floats(1e-3, 1e3),
    equal=st.booleans(),
)
def slerp_keeps_its_bound(
    shape: tuple[int, int], t: float, norm_a: float, norm_b: float, equal: bool
) -> None:
    a, b = _pair(*shape)
    assume(float(a.norm()) > 1e-3 and float(b.norm()) > 1e-3)
    # Orthogonal, equal norms: the norm is kept for every t.
    b_orth = b - (b @ a) / (a @ a) * a
    assume(float(b_orth.norm()) > 1e-3 * float(b.norm()))
    unit_a, unit_b = a / a.norm(), b_orth / b_orth.norm()
    kept = M.slerp(unit_a * norm_a, unit_b * norm_a, t)
    assert math.isclose(float(kept.norm()), norm_a, rel_tol=1e-5)

    # Any angle, equal or unequal norms.
    x = a / a.norm() * norm_a
    y = b / b.norm() * (norm_a if equal else norm_b)
    merged = M.slerp(x, y, t)
    largest = max(float(x.norm()), float(y.norm()))
    cos = float((x.double() @ y.double()) / (x.double().norm() * y.double().norm()))
    ratio = float(merged.double().norm()) / largest
    slack = 1 + rounding_tolerance("float32")
    assert ratio <= slerp_norm_bound(cos) * slack, (cos, ratio)
    if cos >= 0:
        assert ratio <= slack  # the bound without the factor holds for acute endpoints
    if equal:
        assert math.isclose(ratio, 1.0, rel_tol=1e-5)  # equal norms: kept at any angle


def test_FALSIFY_ALBOR_007_slerp_bound(token_data: Path, root: Path) -> None:
    """Orthogonal endpoints of equal norm keep it; for any t and any norms the result is within
    `slerp_norm_bound`: max(||a||, ||b||) while the angle is at most 90 degrees, divided by
    sin(theta) past it. The bound without that factor is false for obtuse endpoints of unequal
    norms (the example below), so it is not the one albor claims. A real SLERP merge records
    per-tensor figures that match its weights and keep the bound."""
    slerp_keeps_its_bound()

    theta = 0.9 * math.pi
    a = torch.tensor([1.0, 0.0])
    b = 0.01 * torch.tensor([math.cos(theta), math.sin(theta)])
    obtuse = float(M.slerp(a, b, 0.5).norm())
    # sin(0.45 pi) / sin(0.9 pi) = 3.2 times a, nearly: far longer than either endpoint.
    assert 3.0 * max(float(a.norm()), float(b.norm())) < obtuse
    assert obtuse <= slerp_norm_bound(math.cos(theta)) * float(a.norm())

    merged = slerp_run(token_data, root)
    m = read_manifest(merged)["metrics"]
    figures = m["slerp_norms"]
    ends = [_weights(Path(p)) for p in m["models"]]
    out = _weights(merged)
    assert figures["tensors"] == len(out) == len(figures["per_tensor"])
    for name, tensor in out.items():
        x, y = (e[name].double().reshape(-1) for e in ends)
        ratio = float(tensor.double().norm()) / max(float(x.norm()), float(y.norm()))
        assert figures["per_tensor"][name]["ratio"] == pytest.approx(ratio, rel=1e-12)
        cos = float(x @ y / (x.norm() * y.norm()))
        assert ratio <= slerp_norm_bound(cos) * (1 + rounding_tolerance("float32")), name
    assert figures["max_ratio_to_bound"] <= 1 + rounding_tolerance("float32")
    assert figures["max_ratio"] == max(t["ratio"] for t in figures["per_tensor"].values())


# Two sparsities for each method, drawn from a fixed seed: each is a real prune stage run.
SPARSITIES = sorted(round(random.Random(8).uniform(0.05, 0.95), 3) for _ in range(2))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 24),
    cols=st.integers(1, 40),
    sparsity=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**31 - 1),
)
def masks_are_exact(rows: int, cols: int, sparsity: float, seed: int) -> None:
    from albor.model.transforms import prune as tp

    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    name = "model.layers.0.mlp.up_proj.weight"
    pruned = tp.magnitude_prune({name: weight}, sparsity)[name]
    assert abs(int((pruned == 0).sum()) - sparsity * weight.numel()) <= 1
    norms = torch.rand(cols, generator=gen) + 0.1
    mask = tp.wanda_mask(weight, norms, sparsity)
    assert abs(int(mask.sum()) - sparsity * weight.numel()) <= 1


def test_FALSIFY_ALBOR_008_exact_sparsity(token_data: Path, root: Path) -> None:
    """Zeros == sparsity x numel within one element, per tensor: for any shape and sparsity
    (magnitude and Wanda masks), and through the prune stage's save and albor's load for random
    sparsities of both methods on a trained model."""
    from albor.model.load import load_model

    masks_are_exact()
    for method in ("magnitude", "wanda"):
        for sparsity in SPARSITIES:
            pruned = prune_run(token_data, root, method, sparsity)
            recorded = read_manifest(pruned)["metrics"]["tensors"]
            written = _weights(pruned)
            model, _ = load_model(pruned, device="cpu")
            loaded = model.state_dict()
            assert len(recorded) == 14  # q, k, v, o, gate, up, down of both blocks
            for name, figures in recorded.items():
                want = sparsity * written[name].numel()
                zeros = int((written[name] == 0).sum())
                assert abs(zeros - want) <= 1, (method, sparsity, name, zeros, want)
                assert zeros == figures["zeros"] == zero_count(sparsity, written[name].numel())
                assert int((loaded[name] == 0).sum()) == zeros


def test_FALSIFY_ALBOR_009_quantization_fidelity(token_data: Path, root: Path) -> None:
    rows = read_manifest(quantize_run(token_data, root))["metrics"]["variants"]
    full = rows["full"]["val_bpb"]
    assert math.isfinite(full) and full > 0
    for variant, bound in (("int8", 0.01), ("int4", 0.10)):
        change = rows[variant]["val_bpb"] / full - 1
        assert abs(change) <= bound, (variant, change)
        assert rows[variant]["val_bpb_increase"] == pytest.approx(change, abs=1e-6)
    assert rows["int8"]["kl_mean"] <= rows["int4"]["kl_mean"]
