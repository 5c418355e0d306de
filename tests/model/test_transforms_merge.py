"""The merge mathematics: SLERP's endpoints, symmetry and norm (FALSIFY-ALBOR-007); a model
merged with itself is itself under every method; TIES keeps exactly int(density x numel)
entries; DARE at p = 0 is the identity and is unbiased over seeds; TIES and DARE equal peft's
`merge_utils` where the conventions agree; two copies of a model merge into its logits."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils

from albor.errors import ArtifactError, ConfigError
from albor.model.gpt import GPT
from albor.model.hf import export_state_dict
from albor.model.presets import preset
from albor.model.transforms import merge as M

# Subnormals left out: halving one loses its last bit, and no trained weight is one.
FLOATS = st.floats(
    -100, 100, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32
)


@st.composite
def same_shape(draw: st.DrawFn, count: int = 2, max_size: int = 24) -> list[torch.Tensor]:
    """`count` float32 tensors of one shape (1-D or 2-D), entries drawn by hypothesis."""
    rows = draw(st.integers(1, 4))
    cols = draw(st.integers(1, max_size // rows))
    size = rows * cols
    out = []
    for _ in range(count):
        values = draw(st.lists(FLOATS, min_size=size, max_size=size))
        out.append(torch.tensor(values, dtype=torch.float32).view(rows, cols))
    return out


def gaussians(count: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# SLERP


@given(same_shape(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_slerp_endpoints_are_the_models(pair: list[torch.Tensor], dtype: torch.dtype) -> None:
    a, b = (x.to(dtype) for x in pair)
    assert torch.equal(M.slerp(a, b, 0.0), a)
    assert torch.equal(M.slerp(a, b, 1.0), b)
    assert M.slerp(a, b, 0.3).dtype == dtype


@given(same_shape(), st.floats(0, 1))
def test_slerp_is_symmetric(pair: list[torch.Tensor], t: float) -> None:
    a, b = pair
    scale = 1e-5 * (1 + float(a.abs().max()) + float(b.abs().max()))
    torch.testing.assert_close(M.slerp(a, b, t), M.slerp(b, a, 1 - t), rtol=1e-5, atol=scale)


@given(st.integers(2, 64), st.integers(0, 2**32 - 1), st.floats(0.01, 100), st.floats(0, 1))
def test_falsify_albor_007_slerp_keeps_the_norm_of_orthogonal_inputs_of_equal_norm(
    n: int, seed: int, norm: float, t: float
) -> None:
    a, b = gaussians(2, (n,), seed)
    b = b - (b @ a) / (a @ a) * a  # Gram-Schmidt: b orthogonal to a
    assume(float(b.norm()) > 1e-3 * float(a.norm()))
    a, b = a * (norm / a.norm()), b * (norm / b.norm())
    out = M.slerp(a.view(1, n), b.view(1, n), t)
    assert math.isclose(float(out.norm()), norm, rel_tol=1e-4)


@given(st.integers(2, 64), st.integers(0, 2**32 - 1), st.floats(0, 1))
def test_slerp_keeps_equal_norms_at_any_angle(n: int, seed: int, t: float) -> None:
    """At every angle where it is spherical: nearly antiparallel endpoints (|cos| > COLINEAR,
    found by hypothesis at n = 2) have no one great circle and take the documented linear
    fallback, tested below."""
    a, b = (x / x.norm() for x in gaussians(2, (n,), seed))
    assume(abs(float(a @ b)) <= M.COLINEAR)
    assert math.isclose(float(M.slerp(a, b, t).norm()), 1.0, rel_tol=1e-4)


def test_slerp_falls_back_to_lerp_for_nearly_parallel_and_zero_tensors() -> None:
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([1.0, 1e-3])  # cos = 0.9999995 > COLINEAR
    torch.testing.assert_close(M.slerp(a, b, 0.5), (a + b) / 2)
    opposite = torch.tensor([-1.0, 1e-3])  # cos = -0.9999995 < -COLINEAR: no one great circle
    torch.testing.assert_close(M.slerp(a, opposite, 0.5), (a + opposite) / 2)
    zero = torch.zeros(2)
    torch.testing.assert_close(M.slerp(zero, b, 0.25), 0.25 * b)
    # Orthogonal unit vectors at t = 0.5: the 45-degree point on the circle, not the chord's middle.
    torch.testing.assert_close(
        M.slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5),
        torch.tensor([1.0, 1.0]) / math.sqrt(2),
    )


def test_slerp_refuses_t_outside_the_unit_interval() -> None:
    a, b = gaussians(2, (4,), 0)
    with pytest.raises(ConfigError, match=r"t is 1.5.*\[0, 1\]"):
        M.slerp(a, b, 1.5)


def test_schedule_spreads_anchors_over_the_blocks() -> None:
    s = M.Schedule((0.0, 1.0), rules=(("mlp", 0.9), ("self_attn", (1.0, 0.0))))
    assert s.at("model.layers.0.input_layernorm.weight", 5) == 0.0
    assert s.at("model.layers.2.input_layernorm.weight", 5) == 0.5
    assert s.at("model.layers.4.input_layernorm.weight", 5) == 1.0
    assert s.at("model.layers.1.input_layernorm.weight", 5) == 0.25
    # Outside the blocks: the first anchor.
    assert s.at("model.embed_tokens.weight", 5) == 0.0
    assert s.at("model.norm.weight", 5) == 0.0
    assert s.at("lm_head.weight", 5) == 0.0
    assert s.at("model.layers.3.mlp.up_proj.weight", 5) == 0.9
    assert s.at("model.layers.0.self_attn.q_proj.weight", 5) == 1.0
    assert s.at("model.layers.4.self_attn.q_proj.weight", 5) == 0.0
    three = M.Schedule((0.0, 0.8, 0.2))
    assert three.at("model.layers.2.mlp.up_proj.weight", 5) == pytest.approx(0.8)
    assert three.at("model.layers.3.mlp.up_proj.weight", 5) == pytest.approx(0.5)
    assert M.Schedule((0.0, 1.0), ()).problems() == []
    # One block: the first anchor (a gradient needs two blocks to spread over).
    assert M.Schedule((0.2, 0.8)).at("model.layers.0.mlp.up_proj.weight", 1) == 0.2
    assert (
        "t_rules.mlp: 1.2 outside [0, 1]" in M.Schedule(0.5, (("mlp", (0.0, 1.2)),)).problems()[0]
    )


# ---------------------------------------------------------------------------------------------
# self-merge, linear, task arithmetic

SELF_SPECS = [
    M.MergeSpec("linear", weights=(0.3, 2.0)),
    M.MergeSpec("slerp", t=M.Schedule(0.37)),
    M.MergeSpec("task_arithmetic", weights=(0.5, 0.5)),
    M.MergeSpec("ties", density=1.0),
    M.MergeSpec("dare_linear", weights=(0.5, 0.5), drop_p=0.0),
    M.MergeSpec("dare_ties", drop_p=0.0),
]


@pytest.mark.parametrize("spec", SELF_SPECS, ids=lambda s: s.method)
@settings(max_examples=40)
@given(tensors=same_shape(count=2))
def test_merging_a_model_with_itself_returns_it(
    spec: M.MergeSpec, tensors: list[torch.Tensor]
) -> None:
    x, base = tensors
    b = base if spec.method in M.BASE_METHODS else None
    out = M.merge_tensor("model.layers.0.mlp.up_proj.weight", [x, x], spec, base=b, layers=2)
    scale = 1e-5 * (1 + float(x.abs().max()) + float(base.abs().max()))
    torch.testing.assert_close(out, x, rtol=1e-5, atol=scale)


@pytest.mark.parametrize("method", M.METHODS)
@settings(max_examples=20)
@given(tensors=same_shape(count=1))
def test_every_method_returns_the_model_when_the_base_is_the_model(
    method: M.Method, tensors: list[torch.Tensor]
) -> None:
    (x,) = tensors
    spec = M.MergeSpec(method, density=0.5, drop_p=0.5, seed=3)
    b = x if method in M.BASE_METHODS else None
    out = M.merge_tensor("model.layers.0.mlp.up_proj.weight", [x, x], spec, base=b, layers=1)
    assert torch.equal(out, x)


@given(same_shape(count=3), st.lists(st.floats(0.01, 10), min_size=3, max_size=3))
def test_linear_is_the_normalised_weighted_mean(
    tensors: list[torch.Tensor], weights: list[float]
) -> None:
    expected = sum(w * t.double() for w, t in zip(weights, tensors, strict=True)) / sum(weights)
    out = M.linear(tensors, weights)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(M.linear(tensors, [w * 7 for w in weights]), out)


def test_linear_refuses_weights_that_do_not_sum_to_a_positive_number() -> None:
    a, b = gaussians(2, (3,), 0)
    with pytest.raises(ConfigError, match="sum to 0"):
        M.linear([a, b], [1.0, -1.0])
    with pytest.raises(ConfigError, match="2 weight"):
        M.linear([a], [1.0, 1.0])


@given(same_shape(count=3), st.lists(st.floats(-2, 2), min_size=2, max_size=2))
def test_task_arithmetic_adds_the_weighted_task_vectors(
    tensors: list[torch.Tensor], weights: list[float]
) -> None:
    base, m1, m2 = (t.double() for t in tensors)
    expected = base + weights[0] * (m1 - base) + weights[1] * (m2 - base)
    out = M.task_arithmetic(tensors[0], tensors[1:], weights)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-3)


def test_a_base_or_model_of_another_shape_is_refused_even_where_it_would_broadcast() -> None:
    base, row = torch.zeros(4), torch.ones(1, 4)  # (4,) and (1, 4) broadcast silently in torch
    calls = {
        "linear": lambda: M.linear([row, base], [1.0, 1.0]),
        "slerp": lambda: M.slerp(row, base, 0.5),
        "task_arithmetic": lambda: M.task_arithmetic(base, [row], [1.0]),
        "ties": lambda: M.ties(base, [row], [1.0], 1.0),
        "dare": lambda: M.dare(base, [row], [1.0], 0.5, torch.Generator()),
    }
    for call in calls.values():
        with pytest.raises(ArtifactError, match=r"differ in shape: \[\(1, 4\), \(4,\)\]"):
            call()


def test_schedule_problems_name_the_field_and_the_range() -> None:
    (problem,) = M.Schedule((1.5, 0.5, -0.5)).problems()
    assert problem == (
        "t: 1.5, -0.5 outside [0, 1]: SLERP's t runs from 0 (first model) to 1 (second)"
    )
    assert M.Schedule(()).problems() == ["t: no anchors: give a number in [0, 1] or a list of them"]


@pytest.mark.parametrize("spec", SELF_SPECS, ids=lambda s: s.method)
def test_every_method_returns_the_first_models_dtype(spec: M.MergeSpec) -> None:
    a, b, base = gaussians(3, (2, 8), 5)
    first, base_ = a.to(torch.bfloat16), base if spec.method in M.BASE_METHODS else None
    out = M.merge_tensor("model.layers.0.mlp.up_proj.weight", [first, b], spec, base=base_)
    assert out.dtype == torch.bfloat16


def test_merges_compute_in_float32_and_return_the_first_dtype() -> None:
    a = torch.full((4,), 1.0, dtype=torch.bfloat16)
    b = torch.full((4,), 1.0 + 2**-7, dtype=torch.bfloat16)  # the next bfloat16 after 1
    c = torch.full((4,), 1.0 + 2 * 2**-7, dtype=torch.bfloat16)
    # bfloat16 arithmetic would round the sum a + b + c = 3.0234375 down to 3.0; fp32 keeps it.
    out = M.linear([a, b, c], [1.0, 1.0, 1.0])
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, b)


# ---------------------------------------------------------------------------------------------
# TIES

DENSITIES = st.integers(1, 1000).map(lambda k: Fraction(k, 1000))


@given(st.integers(1, 400), DENSITIES, st.integers(0, 2**32 - 1))
def test_ties_trim_keeps_exactly_int_density_times_numel(
    numel: int, density: Fraction, seed: int
) -> None:
    (delta,) = gaussians(1, (numel,), seed)
    delta[::3] = 0.0  # zeros may be kept too: the count is exact whatever the values
    mask = M.magnitude_mask(delta, float(density))
    k = math.floor(density * numel)
    assert int(mask.sum()) == k == M.kept_count(float(density), numel)
    if 0 < k < numel:
        assert float(delta[mask].abs().min()) >= float(delta[~mask].abs().max())
    assert torch.equal(M.trim(delta, float(density)), delta * mask)


def test_kept_count_reads_the_density_as_written() -> None:
    assert 0.29 * 100 < 29  # floating point: a plain int() would keep 28
    assert M.kept_count(0.29, 100) == 29
    assert M.kept_count(1 / 3, 3) == 1
    assert M.kept_count(0.5, 7) == 3
    assert M.kept_count(1.0, 5) == 5
    assert 0.57 * 700_000 < 399_000  # the rounding grows with the product: the bar does too
    assert M.kept_count(0.57, 700_000) == 399_000
    assert M.kept_count(0.5, 1) == 0  # a true fraction is floored, not rounded
    with pytest.raises(ConfigError, match=r"density is 1\.5"):
        M.ties(torch.zeros(3), [torch.ones(3)], [1.0], 1.5)
    with pytest.raises(ConfigError, match="density is 0"):
        M.magnitude_mask(torch.ones(3), 0.0)


@given(
    st.integers(1, 4),
    st.integers(1, 60),
    DENSITIES,
    st.lists(st.floats(0.1, 3), min_size=4, max_size=4),
    st.integers(0, 2**32 - 1),
)
def test_ties_equals_peft_ties(
    n: int, numel: int, density: Fraction, weights: list[float], seed: int
) -> None:
    d = float(density)
    assume(int(d * numel) == M.kept_count(d, numel))  # peft's int() and ours agree here
    base, *models = gaussians(n + 1, (numel,), seed)
    ours = M.ties(base, models, weights[:n], d)
    theirs = base + merge_utils.ties(
        [m - base for m in models], torch.tensor(weights[:n]), d, majority_sign_method="total"
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_ties_elects_the_sign_by_total_mass_and_averages_the_agreeing() -> None:
    base = torch.zeros(5)
    models = [torch.tensor([3.0, -1.0, 2.0, 2.0, 0.0]), torch.tensor([-1.0, -1.0, -2.0, -2.0, 0.0])]
    models.append(torch.tensor([-1.0, 4.0, 1.0, 0.0, 0.0]))
    out = M.ties(base, models, [1.0, 1.0, 1.0], density=1.0)
    # Column 0: mass +1 (one + of 3, two - of 1: by count it would be -): mean of {3} = 3.
    # Column 1: mass +2: mean of {4}. Column 2: mass +1: mean of {2, 1} = 1.5.
    # Column 3: mass 0 elects +: mean of {2}. Column 4: nobody agrees: the base's 0.
    assert torch.equal(out, torch.tensor([3.0, 4.0, 1.5, 2.0, 0.0]))
    # Weights scale each agreeing delta after the election; the divisor stays the count.
    weighted = M.ties(base, models, [2.0, 1.0, 0.5], density=1.0)
    assert torch.equal(weighted, torch.tensor([6.0, 2.0, 2.25, 4.0, 0.0]))


# ---------------------------------------------------------------------------------------------
# DARE


@given(same_shape(count=1), st.integers(0, 2**32 - 1))
def test_dare_at_p_zero_is_the_identity(tensors: list[torch.Tensor], seed: int) -> None:
    (delta,) = tensors
    g = torch.Generator().manual_seed(seed)
    assert torch.equal(M.dare_drop(delta, 0.0, g), delta)
    base = torch.zeros_like(delta)
    assert torch.equal(M.dare(base, [delta], [1.0], 0.0, g), delta)


@pytest.mark.parametrize("p", [0.3, 0.7])
def test_dare_mean_over_seeds_approaches_the_delta(p: float) -> None:
    (delta,) = gaussians(1, (64,), 11)
    runs = 3000
    total = torch.zeros(64, dtype=torch.float64)
    for seed in range(runs):
        total += M.dare_drop(delta, p, torch.Generator().manual_seed(seed)).double()
    mean = total / runs
    # Each entry is δ·Bernoulli(1-p)/(1-p): variance δ²·p/(1-p); five standard errors.
    bound = 5 * delta.double().abs() * math.sqrt(p / (1 - p) / runs) + 1e-6
    assert bool(((mean - delta.double()).abs() <= bound).all())


@pytest.mark.parametrize("consensus", ["linear", "ties"])
@given(st.integers(1, 3), st.integers(1, 60), st.floats(0.05, 0.95), st.integers(0, 2**31))
def test_dare_equals_peft_with_the_same_draws(
    consensus: str, n: int, numel: int, p: float, seed: int
) -> None:
    base, *models = gaussians(n + 1, (numel,), seed)
    weights = [0.5 + i for i in range(n)]
    ours = M.dare(base, models, weights, p, torch.Generator().manual_seed(seed), consensus)  # type: ignore[arg-type]
    torch.manual_seed(seed)  # peft draws from the global generator, in the same order
    fn: Any = merge_utils.dare_ties if consensus == "ties" else merge_utils.dare_linear
    theirs = base + fn([m - base for m in models], torch.tensor(weights), 1 - p)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_dare_draws_depend_on_the_seed_and_tensor_name_not_the_order() -> None:
    base = {f"model.layers.{i}.mlp.up_proj.weight": t for i, t in enumerate(gaussians(2, (50,), 1))}
    model = {k: v + 1.0 for k, v in base.items()}
    spec = M.MergeSpec("dare_linear", drop_p=0.5, seed=7)
    one = M.merge_state_dicts([model], spec, base)
    reversed_order = dict(reversed(list(model.items())))
    again = M.merge_state_dicts([reversed_order], spec, base)
    assert all(torch.equal(one[k], again[k]) for k in one)
    other = M.merge_state_dicts([model], M.MergeSpec("dare_linear", drop_p=0.5, seed=8), base)
    assert not all(torch.equal(one[k], other[k]) for k in one)
    # Two tensors of one merge draw apart: the entries each keeps (moved off the base) differ.
    kept = [one[k] != base[k] for k in base]
    assert not torch.equal(kept[0], kept[1])


def test_dare_refuses_a_drop_probability_of_one() -> None:
    with pytest.raises(ConfigError, match=r"drop_p is 1.0.*\[0, 1\)"):
        M.dare_drop(torch.ones(2), 1.0, torch.Generator())


# ---------------------------------------------------------------------------------------------
# specs and whole models


def test_state_dicts_must_hold_the_same_tensors() -> None:
    a = {"model.norm.weight": torch.ones(2)}
    b = {"model.norm.weight": torch.ones(2), "lm_head.weight": torch.ones(2, 2)}
    with pytest.raises(ArtifactError, match=r"models\[1\] holds other tensors.*lm_head"):
        M.merge_state_dicts([a, b], M.MergeSpec("linear"))
    with pytest.raises(ArtifactError, match="base lacks tensors"):
        M.merge_state_dicts([b], M.MergeSpec("task_arithmetic"), base=a)
    assert M.MergeSpec("linear").weights_for(4) == (0.25,) * 4
    assert M.MergeSpec("ties").weights_for(2) == (1.0, 1.0)


def test_spec_problems_name_the_field_and_the_fix() -> None:
    assert "SLERP merges exactly two models; 3 given" in M.MergeSpec("slerp").problems(3, False)[0]
    assert "set `base:`" in M.MergeSpec("ties").problems(2, False)[0]
    assert "does not use a base" in M.MergeSpec("linear").problems(2, True)[0]
    assert "1 weight(s) for 2" in M.MergeSpec("linear", weights=(1.0,)).problems(2, False)[0]
    assert "sum to 0" in M.MergeSpec("linear", weights=(1.0, -1.0)).problems(2, False)[0]
    assert "density: 1.5" in M.MergeSpec("ties", density=1.5).problems(2, True)[0]
    assert M.MergeSpec("dare_ties").problems(2, True) == []
    assert M.MergeSpec("bogus").problems(2, False) == [  # type: ignore[arg-type]
        "method: 'bogus' is not one of " + ", ".join(M.METHODS)
    ]
    assert M.MergeSpec("linear").problems(1, False) == [
        "models: a linear merge needs at least two models; 1 given"
    ]
    assert M.MergeSpec("task_arithmetic").problems(0, True) == ["models: list at least one model"]
    assert M.MergeSpec("ties").problems(1, True) == []
    assert M.MergeSpec("slerp").problems(2, True)[0].endswith("ties, dare_linear or dare_ties")
    assert M.MergeSpec("linear", weights=(0.25, 0.25)).problems(2, False) == []
    # t is SLERP's alone; density and drop_p are checked for every method.
    assert M.MergeSpec("linear", t=M.Schedule(1.5)).problems(2, False) == []
    assert "t: 1.5 outside" in M.MergeSpec("slerp", t=M.Schedule(1.5)).problems(2, False)[0]
    assert M.MergeSpec("ties", density=0.0).problems(2, True) == ["density: 0.0 is outside (0, 1]"]
    assert M.MergeSpec("dare_linear", drop_p=1.0).problems(2, True) == [
        "drop_p: 1.0 is outside [0, 1)"
    ]
    with pytest.raises(ConfigError, match="set `base:`"):
        M.merge_state_dicts([{}, {}], M.MergeSpec("ties"))


def _tiny(seed: int, **overrides: Any) -> GPT:
    torch.manual_seed(seed)
    model = GPT(preset("tiny", **overrides))
    with torch.no_grad():  # norms away from 1 so that a norm merged wrong shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("spec", SELF_SPECS, ids=lambda s: s.method)
@pytest.mark.parametrize("tied", [True, False])
def test_merging_two_copies_reproduces_the_logits(spec: M.MergeSpec, tied: bool) -> None:
    model, other = _tiny(0, tie_embeddings=tied), _tiny(1, tie_embeddings=tied)
    sd = export_state_dict(model)
    base = export_state_dict(other) if spec.method in M.BASE_METHODS else None
    merged = M.merge_state_dicts([sd, dict(sd)], spec, base)
    assert set(merged) == set(sd)
    with torch.device("meta"):
        out = GPT(model.cfg)
    out.load_state_dict(merged, strict=False, assign=True)
    out.tie_weights()
    ids = torch.randint(
        0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(out.eval()(ids), model(ids), rtol=1e-4, atol=1e-4)


def test_slerp_between_two_models_is_a_model_between_them() -> None:
    a, b = export_state_dict(_tiny(0)), export_state_dict(_tiny(1))
    spec = M.MergeSpec("slerp", t=M.Schedule((0.0, 1.0)))
    merged = M.merge_state_dicts([a, b], spec)
    # Two blocks, anchors 0 and 1: block 0 is the first model's, block 1 the second's.
    for name in merged:
        layer = M.layer_index(name)
        expected = b[name] if layer == 1 else a[name]
        assert torch.equal(merged[name], expected), name
