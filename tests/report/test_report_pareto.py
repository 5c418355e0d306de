"""The Pareto frontier of the quality-against-latency plot."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from albor.report.plots import dominates, pareto_frontier

coords = st.floats(min_value=0, max_value=100, allow_nan=False, allow_infinity=False)
# Few distinct values, so that ties on one axis and equal points are common.
coarse = st.sampled_from([0.0, 1.0, 2.0, 3.0])


@given(
    st.lists(st.tuples(coords, coords), max_size=30)
    | st.lists(st.tuples(coarse, coarse), max_size=30)
)
def test_frontier_is_exactly_the_non_dominated_points(points: list[tuple[float, float]]) -> None:
    front = pareto_frontier(points)
    assert len(set(front)) == len(front)
    on = set(front)
    for i in front:  # no frontier point is dominated by any point
        assert not any(dominates(p, points[i]) for p in points)
    for i in set(range(len(points))) - on:  # every other point is dominated by one on it
        assert any(dominates(points[j], points[i]) for j in front)
    assert [points[i][0] for i in front] == sorted(points[i][0] for i in front)


def test_frontier_example() -> None:
    # (ms/token, bits/byte): fast-and-bad, slow-and-good, and one both slower and worse.
    points = [(1.0, 2.0), (5.0, 1.0), (6.0, 1.5), (1.0, 2.0), (0.5, 3.0)]
    assert pareto_frontier(points) == [4, 0, 3, 1]
    assert pareto_frontier([]) == []
