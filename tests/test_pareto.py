import itertools
import math

import numpy as np
import pytest

from ranksearch.config import Config
from ranksearch.constraints import Constraint
from ranksearch.errors import ConstraintError
from ranksearch.pareto import (
    Objective,
    best,
    cost_matrix,
    front,
    hypervolume,
    knee,
    non_dominated,
    parse_objectives,
    reference_point,
)
from ranksearch.result import Result


def res(tag, status="ok", **metrics):
    return Result(Config(), metrics, status=status, proxy=str(tag))


def tags(results):
    return [r.proxy for r in results]


# -- brute-force references ---------------------------------------------------------------------
def brute_non_dominated(points):
    n = len(points)
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        for j in range(n):
            if all(points[j] <= points[i]) and any(points[j] < points[i]):
                keep[i] = False
                break
    return keep


def sweep_hv_2d(points, ref):
    """Exact 2-D hypervolume (minimization) by a sweep over x."""
    pts = sorted(tuple(p) for p in points if p[0] < ref[0] and p[1] < ref[1])
    area, low_y = 0.0, ref[1]
    for x, y in pts:
        if y < low_y:
            area += (ref[0] - x) * (low_y - y)
            low_y = y
    return area


def grid_hv(points, ref):
    """Exact hypervolume in any dimension: split the box into the cells of the grid spanned by
    every coordinate and add up the cells some point dominates."""
    pts = np.array([p for p in points if (p < ref).all()])
    if len(pts) == 0:
        return 0.0
    axes = [np.unique(np.append(pts[:, k], ref[k])) for k in range(pts.shape[1])]
    total = 0.0
    for cell in itertools.product(*(range(len(a) - 1) for a in axes)):
        lower = np.array([axes[k][i] for k, i in enumerate(cell)])
        if (pts <= lower).all(axis=1).any():
            total += math.prod(axes[k][i + 1] - axes[k][i] for k, i in enumerate(cell))
    return total


# -- objectives ---------------------------------------------------------------------------------
def test_parse_objectives_defaults_and_prefixes():
    objs = parse_objectives(("accuracy", "flops", "min:loss", "max:top5", "energy_ratio"))
    assert [(o.metric, o.direction) for o in objs] == [
        ("accuracy", "max"),
        ("flops", "min"),
        ("loss", "min"),
        ("top5", "max"),
        ("energy_ratio", "min"),
    ]
    assert [o.sign for o in objs] == [-1.0, 1.0, 1.0, -1.0, 1.0]
    assert parse_objectives("accuracy, params") == (Objective("accuracy"), Objective("params"))
    assert parse_objectives(Objective("latency")) == (Objective("latency", "min"),)
    assert Objective.parse("min:accuracy").direction == "min"
    assert [str(o) for o in objs] == ["accuracy", "flops", "loss", "top5", "energy_ratio"]
    assert str(Objective("accuracy", "min")) == "min:accuracy"
    for o in (*objs, Objective("accuracy", "min")):
        assert Objective.parse(str(o)) == o


@pytest.mark.parametrize(
    ("items", "fragment"),
    [
        (("map",), "give its direction"),
        (("up:accuracy",), "bad direction"),
        (("flops<=0.5",), "cannot read objective"),
        ((), "at least one objective"),
        (("accuracy", "flops", "accuracy"), "more than once"),
        ((3,), "must be a string"),
    ],
)
def test_bad_objectives(items, fragment):
    with pytest.raises(ConstraintError) as info:
        parse_objectives(items)
    assert fragment in str(info.value)


def test_objective_bad_direction():
    with pytest.raises(ConstraintError, match="'max' or 'min'"):
        Objective("flops", "down")


def test_cost_matrix_negates_max_objectives():
    rs = [res(0, accuracy=0.9, flops=5.0), res(1, accuracy=0.7)]
    m = cost_matrix(rs, ("accuracy", "flops"))
    assert m[0].tolist() == [-0.9, 5.0]
    assert m[1, 0] == -0.7 and math.isnan(m[1, 1])


# -- non-domination -----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("m", [2, 3])
def test_non_dominated_matches_brute_force(seed, m):
    rng = np.random.default_rng(seed)
    # small integer grid: many ties in single coordinates and exact duplicates
    grid = rng.integers(0, 6, size=(60, m)).astype(float)
    dup = grid[rng.integers(0, 60, size=10)]
    continuous = rng.random((40, m))
    for points in (np.vstack([grid, dup]), continuous, np.vstack([continuous, continuous[:5]])):
        got = non_dominated(points)
        assert got.dtype == bool and got.shape == (len(points),)
        np.testing.assert_array_equal(got, brute_non_dominated(points))


def test_non_dominated_keeps_duplicates_and_handles_edges():
    pts = np.array([[1.0, 1.0], [1.0, 1.0], [0.0, 2.0], [1.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
    assert non_dominated(pts).tolist() == [True, True, True, False, True, True]
    assert non_dominated(np.empty((0, 2))).tolist() == []
    assert non_dominated(np.array([[3.0], [1.0], [1.0], [2.0]])).tolist() == [
        False,
        True,
        True,
        False,
    ]
    inf = np.array([[1.0, math.inf], [0.0, math.inf], [math.inf, 0.0]])
    assert non_dominated(inf).tolist() == [False, True, True]
    with pytest.raises(ConstraintError, match="NaN"):
        non_dominated(np.array([[1.0, math.nan]]))
    with pytest.raises(ConstraintError, match="2-D"):
        non_dominated(np.array([1.0, 2.0]))


# -- front --------------------------------------------------------------------------------------
def random_results(rng, n, with_params):
    out = []
    for i in range(n):
        # accuracy grows with flops, with noise on a 0.01 grid: a front of several points,
        # with ties in each metric
        k = int(rng.integers(1, 12))
        metrics = {
            "accuracy": round(0.40 + 0.04 * k + int(rng.integers(-3, 4)) / 100, 2),
            "flops": k * 1e6,
            "flops_ratio": float(rng.integers(1, 12)) / 11,
        }
        if with_params:
            metrics["params"] = float(rng.integers(1, 8)) * 1e5
        if rng.random() < 0.1:
            del metrics["flops"]
        if rng.random() < 0.05:
            metrics["accuracy"] = math.nan
        status = rng.choice(["ok", "ok", "ok", "ok", "failed", "pruned"])
        out.append(res(i, status=str(status), **metrics))
    out += [res(f"{r.proxy}-dup", r.status, **r.metrics) for r in out[:8]]
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("with_params", [False, True])
@pytest.mark.parametrize("constraints", [(), ("flops<=0.5",), ("flops<=0.5", "accuracy>=0.55")])
def test_front_matches_brute_force(seed, with_params, constraints):
    rng = np.random.default_rng(seed)
    results = random_results(rng, 80, with_params)
    objectives = ("accuracy", "flops", "params") if with_params else ("accuracy", "flops")
    got = front(results, objectives, constraints)

    def ok(r):
        m = r.metrics
        return (
            r.status == "ok"
            and all(not math.isnan(m.get(k, math.nan)) for k in objectives)
            and ("flops<=0.5" not in constraints or m["flops_ratio"] <= 0.5)
            and ("accuracy>=0.55" not in constraints or m["accuracy"] >= 0.55)
        )

    pool = [r for r in results if ok(r)]
    costs = np.array(
        [[-r.metrics["accuracy"], *(r.metrics[k] for k in objectives[1:])] for r in pool]
    )
    keep = brute_non_dominated(costs) if len(pool) else np.array([], dtype=bool)
    expected = [r for r, k in zip(pool, keep, strict=True) if k]
    # sorted by flops (the first min objective), then -accuracy, then params, then input order
    expected.sort(
        key=lambda r: (
            (r.metrics["flops"], -r.metrics["accuracy"])
            + ((r.metrics["params"],) if with_params else ())
        )
    )
    assert tags(got) == tags(expected)
    assert len(got) > 1
    assert all(r.ok for r in got)


def test_failed_and_pruned_results_are_never_on_the_front():
    superb = {"accuracy": 0.99, "flops": 1.0, "flops_ratio": 0.01, "params": 10.0}
    results = [
        res("failed", status="failed", **superb),
        res("pruned", status="pruned", **superb),
        res("a", accuracy=0.8, flops=5.0, flops_ratio=0.5, params=100.0),
        res("b", accuracy=0.7, flops=3.0, flops_ratio=0.3, params=200.0),
    ]
    assert tags(front(results, ("accuracy", "flops"))) == ["b", "a"]
    assert best(results).proxy == "a"
    ref = {"accuracy": 0.0, "flops": 10.0}
    assert hypervolume(results, ("accuracy", "flops"), ref) == pytest.approx(0.8 * 5 + 0.7 * 2)
    assert knee(results, ("accuracy", "flops")).proxy == "b"  # two extremes: the cheaper


def test_front_sorted_by_first_min_objective_and_excludes_missing():
    results = [
        res("big", accuracy=0.9, flops=9.0),
        res("small", accuracy=0.6, flops=2.0),
        res("mid", accuracy=0.8, flops=5.0),
        res("dominated", accuracy=0.7, flops=6.0),
        res("no-flops", accuracy=0.95),
    ]
    assert tags(front(results, ("accuracy", "flops"))) == ["small", "mid", "big"]
    # all max: sorted by the first objective's cost, i.e. accuracy descending
    results.append(res("huge", accuracy=0.5, flops=20.0))
    assert tags(front(results, ("accuracy", "max:flops"))) == ["big", "huge"]
    assert tags(front(results, ("max:flops", "accuracy"))) == ["huge", "big"]
    assert front([], ("accuracy", "flops")) == []


# -- hypervolume --------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(10))
def test_hypervolume_2d_matches_exact_sweep(seed):
    rng = np.random.default_rng(seed)
    pts = rng.random((25, 2))
    pts = np.vstack([pts, pts[:3], rng.integers(0, 4, size=(10, 2)) / 4])  # duplicates and ties
    ref = np.array([0.9, 0.95])
    expected = sweep_hv_2d(pts, ref)
    assert expected > 0
    got = hypervolume(pts, ("min:f1", "min:f2"), ref)
    assert got == pytest.approx(expected, rel=1e-12)
    assert grid_hv(pts, ref) == pytest.approx(expected, rel=1e-12)  # the two references agree


@pytest.mark.parametrize("seed", range(4))
def test_hypervolume_3d_matches_monte_carlo_and_exact_grid(seed):
    rng = np.random.default_rng(seed)
    pts = rng.random((12, 3))
    ref = np.ones(3)
    got = hypervolume(pts, ("min:a", "min:b", "min:c"), ref)
    assert got == pytest.approx(grid_hv(pts, ref), rel=1e-12)
    # Monte Carlo over the box [min of points, ref]: the hit fraction p of N uniform samples has
    # standard error sqrt(p (1 - p) / N); 5 standard errors make a false failure a ~1e-6 event,
    # while N = 200 000 keeps the tolerance near 0.5 % of the box volume.
    n = 200_000
    lo = pts.min(axis=0)
    box = float(np.prod(ref - lo))
    samples = lo + rng.random((n, 3)) * (ref - lo)
    hit = np.zeros(n, dtype=bool)
    for p in pts:
        hit |= (samples >= p).all(axis=1)
    frac = hit.mean()
    se = box * math.sqrt(frac * (1 - frac) / n)
    assert 0.05 < frac < 0.95
    assert abs(got - box * frac) <= 5 * se


def test_hypervolume_is_zero_outside_the_reference_box():
    objs = ("min:x", "min:y")
    ref = (1.0, 1.0)
    assert hypervolume(np.array([[1.5, 0.5], [0.5, 1.5], [2.0, 2.0]]), objs, ref) == 0.0
    assert hypervolume(np.array([[1.0, 0.5], [0.5, 1.0]]), objs, ref) == 0.0  # on the boundary
    assert hypervolume(np.empty((0, 2)), objs, ref) == 0.0
    # outside points add nothing to inside ones
    inside = np.array([[0.5, 0.5]])
    mixed = np.vstack([inside, [[1.5, 0.1], [0.1, 3.0]]])
    assert hypervolume(mixed, objs, ref) == pytest.approx(0.25)


def test_hypervolume_of_results_with_a_max_objective():
    results = [
        res("a", accuracy=0.8, flops=4.0),
        res("b", accuracy=0.5, flops=2.0),
        res("c", accuracy=0.4, flops=3.0),  # dominated by b
        res("f", status="failed", accuracy=1.0, flops=0.0),
        res("over", accuracy=0.99, flops=12.0),  # beyond the reference flops
    ]
    objs = ("accuracy", "flops")
    # area under the staircase: 0.8 * (10 - 4) + 0.5 * (4 - 2)
    assert hypervolume(results, objs, (0.0, 10.0)) == pytest.approx(5.8)
    assert hypervolume(results, objs, {"accuracy": 0.0, "flops": 10.0}) == pytest.approx(5.8)
    raw = np.array([[0.8, 4.0], [0.5, 2.0], [0.4, 3.0]])
    assert hypervolume(raw, objs, (0.0, 10.0)) == pytest.approx(5.8)
    # a reference accuracy above 0: only the part above it counts, c (0.4) adds nothing
    assert hypervolume(results, objs, (0.45, 10.0)) == pytest.approx(0.05 * 8 + 0.3 * 6)
    assert hypervolume(raw, objs, (0.45, 10.0)) == pytest.approx(0.05 * 8 + 0.3 * 6)
    assert hypervolume(results, objs, (0.85, 10.0)) == 0.0
    # with a constraint only b counts
    assert hypervolume(results, objs, (0.0, 10.0), ["flops<=3"]) == pytest.approx(0.5 * 8)
    assert hypervolume([], objs, (0.0, 10.0)) == 0.0


def test_hypervolume_bad_reference():
    with pytest.raises(ConstraintError, match="no value for"):
        hypervolume(np.array([[0.5, 1.0]]), ("accuracy", "flops"), {"accuracy": 0.0})
    with pytest.raises(ConstraintError, match="2 finite numbers"):
        hypervolume(np.array([[0.5, 1.0]]), ("accuracy", "flops"), (0.0,))
    with pytest.raises(ConstraintError, match="n × 2"):
        hypervolume(np.array([[0.5, 1.0, 2.0]]), ("accuracy", "flops"), (0.0, 1.0))


def test_reference_point():
    dense = {"accuracy": 0.93, "flops": 4e8, "params": 2e7, "loss": 0.3}
    objs = ("accuracy", "flops", "params_ratio")
    assert reference_point(objs, dense) == (0.0, 4e8, 1.0)
    assert reference_point(objs, dense, scale=1.1) == pytest.approx((0.0, 4.4e8, 1.1))
    assert reference_point(("accuracy", "loss"), dense, overrides={"loss": 3.0}) == (0.0, 3.0)
    with pytest.raises(ConstraintError, match="no 'energy'"):
        reference_point(("accuracy", "energy"), dense)
    # a dense model exactly at the reference adds nothing; a cheaper one does
    ref = reference_point(("accuracy", "flops"), dense)
    assert hypervolume([res("dense", **dense)], ("accuracy", "flops"), ref) == 0.0
    half = res("half", accuracy=0.9, flops=2e8)
    assert hypervolume([half], ("accuracy", "flops"), ref) == pytest.approx(0.9 * 2e8)


# -- knee ---------------------------------------------------------------------------------------
CONVEX = [(1.0, 0.50), (2.0, 0.85), (3.0, 0.88), (6.0, 0.90), (10.0, 0.91)]  # (flops, acc)


def test_knee_picks_the_bend_of_a_convex_front():
    results = [res(f"f{f:g}", accuracy=a, flops=f) for f, a in CONVEX]
    results += [res("dominated", accuracy=0.6, flops=5.0), res("x", "failed", accuracy=1, flops=0)]
    assert knee(results, ("accuracy", "flops")).proxy == "f2"
    assert knee(results, ("flops", "accuracy")).proxy == "f2"  # order of objectives is irrelevant
    # move the bend: a front that saturates late has its knee late
    late = [(1.0, 0.10), (2.0, 0.15), (3.0, 0.20), (6.0, 0.85), (10.0, 0.88)]
    assert (
        knee([res(f"f{f:g}", accuracy=a, flops=f) for f, a in late], ("accuracy", "flops")).proxy
        == "f6"
    )


def test_knee_of_concave_or_tiny_fronts_is_an_extreme():
    concave = [(1.0, 0.10), (5.0, 0.40), (8.0, 0.70), (10.0, 0.91)]
    results = [res(f"f{f:g}", accuracy=a, flops=f) for f, a in concave]
    assert knee(results, ("accuracy", "flops")).proxy == "f1"
    assert knee(results[1:3], ("accuracy", "flops")).proxy == "f5"
    one = [res("only", accuracy=0.5, flops=1.0), res("twin", accuracy=0.5, flops=1.0)]
    assert knee(one, ("accuracy", "flops")).proxy == "only"
    assert knee(results, ("accuracy",)).proxy == "f10"
    with pytest.raises(ConstraintError, match="no knee"):
        knee([res("f", "failed", accuracy=0.5, flops=1.0)], ("accuracy", "flops"))


def test_knee_in_three_objectives_is_closest_to_ideal():
    results = [
        res("acc", accuracy=0.95, flops=10.0, params=10.0),
        res("flops", accuracy=0.50, flops=1.0, params=9.0),
        res("params", accuracy=0.60, flops=9.0, params=1.0),
        res("balanced", accuracy=0.85, flops=3.0, params=3.0),
        res("meh", accuracy=0.70, flops=5.0, params=6.0),
    ]
    assert knee(results, ("accuracy", "flops", "params")).proxy == "balanced"


# -- best ---------------------------------------------------------------------------------------
def test_best_respects_constraints_and_breaks_ties():
    results = [
        res("top", accuracy=0.95, flops=9e8, flops_ratio=0.9, params=2e7),
        res("tie-more-flops", accuracy=0.90, flops=4e8, flops_ratio=0.4, params=1e6),
        res("tie-more-params", accuracy=0.90, flops=3e8, flops_ratio=0.3, params=3e6),
        res("tie-winner", accuracy=0.90, flops=3e8, flops_ratio=0.3, params=2e6),
        res("small", accuracy=0.70, flops=1e8, flops_ratio=0.1, params=5e5),
        res("failed", "failed", accuracy=0.99, flops=1e7, flops_ratio=0.01, params=1e5),
        res("no-acc", flops=1e7, flops_ratio=0.01, params=1e5),
    ]
    assert best(results).proxy == "top"
    assert best(results, ["flops<=0.5"]).proxy == "tie-winner"
    assert best(results, [Constraint.parse("flops<=0.5"), "params<=1.5M"]).proxy == "tie-more-flops"
    assert best(results, "flops<=0.2").proxy == "small"
    assert best(results, ["flops<=0.05"]) is None
    assert best(results, ["flops<=0.5", "accuracy>=0.96"]) is None
    assert best([]) is None
    # only the metric ranked must be present: "no-acc" has the fewest flops
    assert best(results, (), metric="flops").proxy == "no-acc"
    assert best(results, (), metric="max:flops").proxy == "top"
