"""Pareto fronts of results: objectives, non-domination, hypervolume, knee and best pick.

Objectives are metric names with a direction: the metrics known by name have theirs
(`ranksearch.metrics.METRICS`: ``accuracy`` and ``top5`` maximized, ``loss``,
``perplexity``, ``mse`` and ``mae`` minimized), and the cost metrics (``params``, ``macs``,
``flops``, ``energy``, ``latency`` and their ``_ratio`` forms) are minimized; a ``max:`` or
``min:`` prefix overrides that (``"max:map"`` names a metric of your own). A `Metric` stands for
the objective of its name and direction. Internally every objective becomes a cost to minimize: max
objectives are negated.

A result takes part in a front only when its status is ``ok``, it satisfies every constraint
and every objective's metric is present and not NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .constraints import COST_METRICS, Constraint, metric_value, parse_constraints
from .errors import ConstraintError
from .metrics import METRICS, Metric
from .result import Result

Direction = Literal["max", "min"]

MAXIMIZED = tuple(m.name for m in METRICS.values() if m.direction == "max")
MINIMIZED = (*(m.name for m in METRICS.values() if m.direction == "min"), *COST_METRICS,
             *(f"{m}_ratio" for m in COST_METRICS))
KNOWN_METRICS = (*MAXIMIZED, *MINIMIZED)
#: Maximized metrics that are fractions, whose ideal value is 1.
_FRACTIONS = tuple(m.name for m in METRICS.values() if m.fraction)

_OBJECTIVE_HELP = (
    f"an objective is a metric name ({', '.join(KNOWN_METRICS)}), maximized for "
    f"{', '.join(MAXIMIZED)} and minimized otherwise, optionally with a 'max:' or 'min:' prefix "
    "to set the direction (needed for other metric names), or a Metric. Examples: 'accuracy', "
    "'flops', 'min:loss', 'max:map'"
)


@dataclass(frozen=True)
class Objective:
    """A metric to optimize and its direction, ``"max"`` or ``"min"`` (by default ``max`` for
    accuracy and ``min`` for the other known metrics; other names need a direction)."""

    metric: str
    direction: Direction | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric.strip():
            raise ConstraintError(f"bad objective metric {self.metric!r}; {_OBJECTIVE_HELP}")
        direction = self.direction
        if direction is None:
            if self.metric in MAXIMIZED:
                direction = "max"
            elif self.metric in MINIMIZED:
                direction = "min"
            else:
                raise ConstraintError(
                    f"unknown objective {self.metric!r}: give its direction as "
                    f"'max:{self.metric}' or 'min:{self.metric}'; {_OBJECTIVE_HELP}"
                )
        if direction not in ("max", "min"):
            raise ConstraintError(
                f"objective direction must be 'max' or 'min', got {self.direction!r}"
            )
        object.__setattr__(self, "direction", direction)

    @classmethod
    def parse(cls, text: str | Objective | Metric) -> Objective:
        """``"accuracy"``, ``"flops"``, ``"min:loss"``, ``"max:map"``, a `Metric`, ..."""
        if isinstance(text, Objective):
            return text
        if isinstance(text, Metric):
            return cls(text.name, text.direction)
        if not isinstance(text, str):
            raise ConstraintError(f"an objective must be a string, got {text!r}; {_OBJECTIVE_HELP}")
        body = text.strip()
        direction: str | None = None
        if ":" in body:
            direction, _, body = (s.strip() for s in body.partition(":"))
            if direction not in ("max", "min"):
                raise ConstraintError(
                    f"bad direction {direction!r} in objective {text!r}; {_OBJECTIVE_HELP}"
                )
        if not body.replace("_", "").isalnum():
            raise ConstraintError(f"cannot read objective {text!r}; {_OBJECTIVE_HELP}")
        return cls(body, direction)  # type: ignore[arg-type]

    @property
    def sign(self) -> float:
        """+1 for a min objective, -1 for a max one: ``cost = sign * value``."""
        return 1.0 if self.direction == "min" else -1.0

    def value(self, metrics: Mapping[str, Any]) -> float:
        """The metric's value, NaN when missing or not a number."""
        return metric_value(metrics, self.metric)

    def cost(self, metrics: Mapping[str, Any]) -> float:
        """The value in minimization form (negated for max objectives)."""
        return self.sign * self.value(metrics)

    def __str__(self) -> str:
        default = "max" if self.metric in MAXIMIZED else "min" if self.metric in MINIMIZED else None
        return self.metric if self.direction == default else f"{self.direction}:{self.metric}"


def parse_objectives(items: Iterable[str | Objective | Metric] | str | Objective | Metric,
                     metric: Metric | None = None) -> tuple[Objective, ...]:
    """Objectives from names, `Objective` or `Metric` objects; a single name, or names
    separated by commas (``"accuracy,flops"``), are accepted too. A metric may appear only
    once. ``metric`` (a task's) gives the direction of a bare name that is its name."""
    if isinstance(items, str | Objective | Metric):
        items = (items,)
    if metric is not None:
        items = [metric if isinstance(i, str) and i.strip() == metric.name else i for i in items]
    out: list[Objective] = []
    for item in items:
        if isinstance(item, str):
            out.extend(Objective.parse(p) for p in item.split(",") if p.strip())
        else:
            out.append(Objective.parse(item))
    if not out:
        raise ConstraintError(f"at least one objective is needed; {_OBJECTIVE_HELP}")
    metrics = [o.metric for o in out]
    repeated = sorted({m for m in metrics if metrics.count(m) > 1})
    if repeated:
        raise ConstraintError(f"objective metric(s) {repeated} listed more than once")
    return tuple(out)


def cost_matrix(results: Sequence[Result], objectives: Iterable[str | Objective]) -> np.ndarray:
    """An (n, m) float array of each result's objectives in minimization form (max objectives
    negated); NaN where a metric is missing."""
    objs = parse_objectives(objectives)
    out = np.empty((len(results), len(objs)), dtype=float)
    for i, r in enumerate(results):
        for j, o in enumerate(objs):
            out[i, j] = o.cost(r.metrics)
    return out


def eligible(
    results: Iterable[Result],
    objectives: Iterable[str | Objective] = (),
    constraints: Iterable[str | Constraint] = (),
) -> list[Result]:
    """The results that can take part in a front: status ``ok``, every constraint satisfied,
    every objective's metric present and not NaN (in the order given)."""
    if not isinstance(objectives, str | Objective):
        objectives = tuple(objectives)
    objs = parse_objectives(objectives) if objectives else ()
    cons = parse_constraints(constraints)
    return [
        r
        for r in results
        if r.ok
        and all(c.satisfied(r.metrics) for c in cons)
        and not any(math.isnan(o.value(r.metrics)) for o in objs)
    ]


def non_dominated(points: np.ndarray) -> np.ndarray:
    """A boolean mask of the rows of ``points`` (n × m, every column minimized) that no other
    row dominates. Row a dominates row b when a ≤ b in every column and a < b in one, so
    duplicate rows do not dominate each other and are all kept. NaN is refused; ±inf is fine.

    Uses pymoo's ``find_non_dominated`` (moocore's ``is_nondominated`` with weak
    non-domination kept), O(n log n) for 2 and 3 columns.
    """
    from pymoo.util.nds.non_dominated_sorting import find_non_dominated

    arr = np.asarray(points, dtype=float)
    if arr.ndim != 2:
        raise ConstraintError(f"points must be a 2-D array (n × m), got shape {arr.shape}")
    mask = np.zeros(len(arr), dtype=bool)
    if arr.shape[0] == 0:
        return mask
    if arr.shape[1] == 0:
        raise ConstraintError("points need at least one column (objective)")
    if np.isnan(arr).any():
        raise ConstraintError("points contain NaN; drop those rows first")
    mask[find_non_dominated(arr)] = True
    return mask


def _order(costs: np.ndarray, objectives: Sequence[Objective]) -> np.ndarray:
    """Row order: by the first min objective (or the first objective when none is min), then
    the other objectives in turn, then input order."""
    first = next((j for j, o in enumerate(objectives) if o.direction == "min"), 0)
    columns = [first, *(j for j in range(costs.shape[1]) if j != first)]
    # np.lexsort sorts by the last key first; it is stable, so input order breaks full ties.
    return np.lexsort([costs[:, j] for j in reversed(columns)])


def front(
    results: Sequence[Result],
    objectives: Iterable[str | Objective],
    constraints: Iterable[str | Constraint] = (),
) -> list[Result]:
    """The Pareto front: the eligible results (``ok``, satisfying every constraint, with every
    objective's metric) that no other eligible result dominates, sorted by the first ``min``
    objective ascending (then by the other objectives). Ties are kept."""
    objs = parse_objectives(objectives)
    pool = eligible(results, objs, constraints)
    if not pool:
        return []
    costs = cost_matrix(pool, objs)
    keep = np.flatnonzero(non_dominated(costs))
    order = keep[_order(costs[keep], objs)]
    return [pool[i] for i in order]


def _points(
    results_or_points: Sequence[Result] | np.ndarray,
    objs: Sequence[Objective],
    constraints: Iterable[str | Constraint],
) -> np.ndarray:
    """Costs (minimization form) from results or from raw metric values in objective order."""
    items = results_or_points
    if (
        not isinstance(items, np.ndarray)
        and len(items)
        and all(isinstance(r, Result) for r in items)
    ):
        return cost_matrix(eligible(items, objs, constraints), objs)
    raw = np.asarray(items, dtype=float)
    if raw.size == 0:
        return np.empty((0, len(objs)))
    if raw.ndim == 1:
        raw = raw[None, :]
    if raw.ndim != 2 or raw.shape[1] != len(objs):
        raise ConstraintError(
            f"points must be an n × {len(objs)} array (one column per objective), got shape "
            f"{raw.shape}"
        )
    if np.isnan(raw).any():
        raise ConstraintError("points contain NaN; drop those rows first")
    return raw * np.array([o.sign for o in objs])


def hypervolume(
    results_or_points: Sequence[Result] | np.ndarray,
    objectives: Iterable[str | Objective],
    reference: Sequence[float] | Mapping[str, float],
    constraints: Iterable[str | Constraint] = (),
) -> float:
    """The hypervolume dominated by the points and bounded by ``reference``.

    ``results_or_points``: results (the eligible ones count, see `front`), or an n × m array of
    raw metric values, one column per objective in order (accuracy as it is, not negated).
    ``reference``: raw values in objective order, or a mapping metric → value (see
    `reference_point`). Computed by `minimized_volume` on the minimization form (max objectives
    and the reference negated); points not strictly better than the reference in every
    objective add nothing, so a set entirely outside the reference box has volume 0.
    """
    objs = parse_objectives(objectives)
    if isinstance(reference, Mapping):
        missing = [o.metric for o in objs if o.metric not in reference]
        if missing:
            raise ConstraintError(f"the reference point has no value for {missing}")
        ref_raw = [reference[o.metric] for o in objs]
    else:
        ref_raw = list(reference)
    ref = np.asarray(ref_raw, dtype=float)
    if ref.shape != (len(objs),) or not np.isfinite(ref).all():
        raise ConstraintError(
            f"the reference point must be {len(objs)} finite numbers (one per objective), got "
            f"{reference!r}"
        )
    ref = ref * np.array([o.sign for o in objs])
    return minimized_volume(_points(results_or_points, objs, constraints), ref)


def minimized_volume(points: np.ndarray, ref: np.ndarray) -> float:
    """The hypervolume that the minimization ``points`` (n × m) dominate below ``ref``; only
    points strictly below it in every coordinate count. Exact: a sweep in two dimensions
    (the common case, called per candidate by refinement), pymoo's ``HV`` otherwise."""
    inside = points[(points < ref).all(axis=1)]
    if not len(inside):
        return 0.0
    if inside.shape[1] == 2:
        inside = inside[np.lexsort((inside[:, 1], inside[:, 0]))]
        volume, level = 0.0, ref[1]
        for x, y in inside:
            if y < level:
                volume += (ref[0] - x) * (level - y)
                level = y
        return float(volume)
    from pymoo.indicators.hv import HV

    return float(HV(ref_point=ref).do(inside))


def reference_point(
    objectives: Iterable[str | Objective],
    dense_metrics: Mapping[str, float],
    *,
    scale: float = 1.0,
    overrides: Mapping[str, float] | None = None,
) -> tuple[float, ...]:
    """A hypervolume reference point in raw metric values, one per objective:

    - max objectives (accuracy): 0, so every model counts whatever its accuracy;
    - min objectives: the dense model's value × ``scale`` (default 1.0: only models cheaper
      than the dense one add volume); ``_ratio`` metrics default to ``scale`` (the dense ratio
      is 1) when ``dense_metrics`` lacks them.

    ``overrides`` (metric → value) replace any of these, e.g. ``{"loss": 3.0}``: loss has a
    reference of dense loss × scale too, which excludes every model worse than the dense one.
    """
    objs = parse_objectives(objectives)
    overrides = dict(overrides or {})
    ref: list[float] = []
    for o in objs:
        if o.metric in overrides:
            value = float(overrides[o.metric])
        elif o.direction == "max":
            value = 0.0
        else:
            dense = metric_value(dense_metrics, o.metric)
            if math.isnan(dense) and o.metric.endswith("_ratio"):
                dense = 1.0
            if math.isnan(dense):
                raise ConstraintError(
                    f"dense_metrics has no {o.metric!r} for the reference point; pass it or "
                    f"overrides={{{o.metric!r}: ...}}"
                )
            value = dense * scale
        ref.append(value)
    return tuple(ref)


def knee(results: Sequence[Result], objectives: Iterable[str | Objective]) -> Result:
    """The knee of the front of ``results`` (the front is recomputed, so a whole result list
    may be passed).

    Each objective is normalized to [0, 1] over the front (min → 0, max → 1 in cost form; a
    constant objective maps to 0). With 2 objectives the knee is the point farthest from the
    line between the two extremes on the side of the ideal point (a convex bend); on a
    linear or concave front no point lies on that side and the earlier extreme wins. With 3 or
    more it is the point with the smallest Euclidean distance to the ideal point (all 0); with
    1 it is the best point. Ties go to the earlier point in front order.
    """
    objs = parse_objectives(objectives)
    points = front(results, objs)
    if not points:
        raise ConstraintError(
            "no knee: no result is ok with every objective's metric "
            f"({', '.join(o.metric for o in objs)})"
        )
    costs = cost_matrix(points, objs)
    lo, hi = costs.min(axis=0), costs.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    norm = np.where(hi > lo, (costs - lo) / span, 0.0)
    if len(objs) == 1:
        index = 0
    elif len(objs) == 2 and not (hi > lo).all():
        index = 0  # every point on a 2-D front with a constant objective is the same
    elif len(objs) == 2:
        # The extremes are (0, 1) and (1, 0); the signed distance to the line x + y = 1,
        # positive toward the ideal point (0, 0), is (1 - x - y) / sqrt(2).
        index = int(np.argmax(1.0 - norm[:, 0] - norm[:, 1]))
    else:
        index = int(np.argmin(np.linalg.norm(norm, axis=1)))
    return points[index]


def best(
    results: Iterable[Result],
    constraints: Iterable[str | Constraint] = (),
    metric: str | Objective | Metric = "accuracy",
) -> Result | None:
    """The best ``ok`` result under ``constraints`` by ``metric`` (a name in its known
    direction, ``"max:..."``/``"min:..."``, an `Objective` or a task's `Metric`), ties broken by
    lower flops, then lower params (missing counts as worst), then input order. None when no
    result qualifies."""
    objective = Objective.parse(metric)
    pool = eligible(results, (objective,), constraints)
    if not pool:
        return None

    def key(r: Result) -> tuple[float, float, float]:
        flops, params = metric_value(r.metrics, "flops"), metric_value(r.metrics, "params")
        return (
            objective.cost(r.metrics),
            math.inf if math.isnan(flops) else flops,
            math.inf if math.isnan(params) else params,
        )

    return min(pool, key=key)


def _metric_words(metric: str) -> str:
    """``"flops_ratio"`` → ``"flops ratio"``; other names as they are."""
    return metric.replace("_ratio", " ratio") if metric.endswith("_ratio") else metric


def describe_reference(
    objectives: Iterable[str | Objective],
    dense_metrics: Mapping[str, float] | None = None,
    *,
    scale: float = 1.0,
    overrides: Mapping[str, float] | None = None,
) -> str:
    """The `reference_point` of the same arguments in words, e.g. ``"accuracy 0 and the dense
    model's flops (2e+08)"``; the dense value is shown when ``dense_metrics`` holds it."""
    objs = parse_objectives(objectives)
    overrides = dict(overrides or {})
    parts: list[str] = []
    for o in objs:
        name = _metric_words(o.metric)
        if o.metric in overrides:
            parts.append(f"{name} {float(overrides[o.metric]):.4g}")
        elif o.direction == "max":
            parts.append(f"{name} 0")
        else:
            factor = "" if scale == 1 else f"{scale:g} × "
            known = metric_value(dense_metrics or {}, o.metric)
            if math.isnan(known) and o.metric.endswith("_ratio"):
                known = 1.0
            value = "" if math.isnan(known) else f" ({known * scale:.4g})"
            parts.append(f"{factor}the dense model's {name}{value}")
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def _box(objectives: Sequence[Objective], reference: Sequence[float]) -> float | None:
    """The volume between ``reference`` and the ideal point (accuracy or top5 1, every
    minimized metric 0); None when an objective has no known ideal (a maximized metric that is
    not a fraction)."""
    volume = 1.0
    for o, ref in zip(objectives, reference, strict=True):
        if o.direction == "max" and o.metric not in _FRACTIONS:
            return None
        volume *= (1.0 - ref) if o.direction == "max" else ref
    return volume


def describe_hypervolume(
    value: float,
    objectives: Iterable[str | Objective],
    dense_metrics: Mapping[str, float] | None = None,
    **reference: Any,
) -> str:
    """``"hypervolume 0.41 (of accuracy × flops ratio, against accuracy 0 and the dense
    model's flops ratio (1))"``: the value, what it measures and its reference point
    (``reference`` takes `reference_point`'s ``scale`` and ``overrides``). When the volume is
    in absolute units, its share of the box between the reference and the ideal point
    (accuracy 1 at no cost) follows: ``"...; 0.617 of the most possible"``."""
    objs = parse_objectives(objectives)
    product = " × ".join(_metric_words(o.metric) for o in objs)
    text = f"hypervolume {value:.4g} (of {product}, against "
    text += describe_reference(objs, dense_metrics, **reference)
    try:
        box = _box(objs, reference_point(objs, dense_metrics or {}, **reference))
    except ConstraintError:
        box = None
    if box is not None and box > 0 and not math.isclose(box, 1.0):
        text += f"; {value / box:.3g} of the most possible"
    return text + ")"
