"""What population strategies share (nsga2, optuna): the choices worth encoding per site, and
objective values as arrays in minimization form with stand-ins for missing ones."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .config import Choice, Config
from .cost import METRICS as PRICED
from .pareto import Objective
from .result import Result
from .strategy import SearchContext


def site_choices(ctx: SearchContext, name: str, dense: bool = True, cheaper: bool = True
                 ) -> tuple[Choice, ...]:
    """The choices of site ``name`` a search should consider: with ``cheaper``, only the
    factorizations that cost less than the dense layer in some cost metric the search cares
    about (its objectives and cost constraints; params and flops when it names none), since a
    factorized layer that is no cheaper than the dense one gains nothing; ``dense`` last if
    allowed. Never empty: without dense and nothing cheaper, the smallest choice remains."""
    choices = ctx.space.choices(name)
    named = [o.metric.removesuffix("_ratio") for o in ctx.objectives]
    named += [c.metric for c in ctx.cost_constraints()]
    metrics = [m for m in dict.fromkeys(named) if m in PRICED] or ["params", "flops"]
    keep = list(choices[:-1])
    if cheaper:
        dense_costs = ctx.costs.metrics(Config())
        keep = [c for c in keep if any(ctx.costs.metrics(Config({name: c}))[m] < dense_costs[m]
                                       for m in metrics)]
    if dense:
        keep.append(choices[-1])
    return tuple(keep) or choices[:1]


def objective_costs(results: Sequence[Result], objectives: Sequence[Objective]) -> np.ndarray:
    """An (n, m) array of the objectives in minimization form, NaN where a metric is missing
    (an infeasible config was not evaluated; a failed one has no accuracy)."""
    return np.array([[o.cost(r.metrics) for o in objectives] for r in results], dtype=float)


class MissingValues:
    """Stands in for missing objective values with the worst seen so far: a maximized metric
    (accuracy) as 0 (or the lowest value seen, if negative), a minimized one as the largest
    value seen (0 before any)."""

    def __init__(self, objectives: Sequence[Objective]) -> None:
        self.worst = np.array([0.0 if o.direction == "max" else -np.inf for o in objectives])

    def fill(self, costs: np.ndarray) -> np.ndarray:
        seen = np.where(np.isnan(costs), -np.inf, costs).max(axis=0, initial=-np.inf)
        self.worst = np.maximum(self.worst, seen)
        stand_in = np.where(np.isfinite(self.worst), self.worst, 0.0)
        return np.where(np.isnan(costs), stand_in, costs)


__all__ = ["MissingValues", "objective_costs", "site_choices"]
