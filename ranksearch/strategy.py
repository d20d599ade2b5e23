"""The strategy plugin interface, the context strategies see, and the registry.

A strategy proposes rank configurations through an ask/tell loop (as Optuna samplers and
pymoo algorithms do). Strategies are found through the entry-point group
``ranksearch.strategies``; the built-in ones register there exactly as a third-party package
would::

    [project.entry-points."ranksearch.strategies"]
    mine = "my_package.module:MyStrategy"
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar

import numpy as np

from .cache import FactorCache
from .constraints import Constraint
from .cost import METRICS as PRICED
from .cost import CostModel
from .errors import RankSearchError
from .evaluate import Evaluator
from .pareto import Objective
from .result import Result
from .space import Config, RankSpace

GROUP = "ranksearch.strategies"
log = logging.getLogger(__name__)


class StopSearch(Exception):
    """Raised by `Strategy.ask` when the strategy has nothing more to propose."""


class UnknownStrategyError(RankSearchError, KeyError):
    """No strategy of that name is registered."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class SearchContext:
    """What a strategy may use: the space, exact costs, data-free signals (``cache``: singular
    values, factors), the constraints and objectives, a seeded generator, the history so far,
    ``evaluate`` for evaluations of its own (e.g. sensitivity probes), which go through the
    executor and the store like any other, and ``evaluator`` for cheap unstored scores
    (`Evaluator.quick_accuracy`) and the task's data (``evaluator.task``, ``evaluator.model``).
    ``probes``: configs the strategy evaluates as measurements (e.g. one layer decomposed
    alone); the search evaluates them even when they break a cost constraint (fronts still
    filter them out).
    """

    space: RankSpace
    costs: CostModel
    cache: FactorCache
    constraints: tuple[Constraint, ...]
    objectives: tuple[Objective, ...]
    rng: np.random.Generator
    evaluations: int
    history: list[Result] = field(default_factory=list)
    evaluate: Callable[[Sequence[Config]], list[Result]] | None = None
    evaluator: Evaluator | None = None
    probes: set[Config] = field(default_factory=set)

    def cost_constraints(self) -> tuple[Constraint, ...]:
        """The constraints that can be checked before evaluation (everything but accuracy,
        loss and latency)."""
        return tuple(c for c in self.constraints if c.metric in PRICED)

    def feasible(self, config: Config) -> bool:
        """Whether ``config`` meets every cost constraint (checked without building it)."""
        cons = self.cost_constraints()
        if not cons:
            return True
        metrics = self.costs.metrics(config)
        return all(c.satisfied(metrics) for c in cons)

    def violation(self, config: Config) -> float:
        """The total amount by which ``config`` violates the cost constraints (0 if none)."""
        metrics = self.costs.metrics(config)
        return sum(max(0.0, c.violation(metrics)) for c in self.cost_constraints())


class Strategy:
    """Base class of rank-search strategies.

    Subclasses set ``name`` and ``description``, take their options as keyword arguments of
    ``__init__``, and implement `ask` (a list of configs; an empty list means "waiting for
    results"; raise `StopSearch` when done) and `tell`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def setup(self, ctx: SearchContext) -> None:
        self.ctx = ctx

    def ask(self) -> list[Config]:
        raise NotImplementedError

    def tell(self, results: Sequence[Result]) -> None:
        """Receive the results of earlier asks (default: ignore them)."""


class SweepStrategy(Strategy):
    """A one-knob family of configs, ``make(knob)``, whose cost grows with the knob.

    Proposes ``count`` configs (default: the evaluation budget) from the largest knob in
    [``low``, ``high``] that meets the cost constraints down to ``low`` — so it both meets a
    budget and traces a front below it — or exactly the knobs in ``points``. Most expensive
    first; duplicates (knobs that round to the same ranks) are proposed once.
    """

    #: the knob's range; a subclass may set either per instance in ``setup``
    low: float = 0.02
    high: float = 1.0

    def __init__(self, points: Sequence[float] | None = None, count: int | None = None) -> None:
        self.points = None if points is None else [float(p) for p in points]
        self.count = count

    def make(self, knob: float) -> Config:
        raise NotImplementedError

    def setup(self, ctx: SearchContext) -> None:
        super().setup(ctx)
        if self.points is None:
            top = fit_to_budget(ctx, self.make, self.low, self.high)
            knobs = np.linspace(top, self.low, self.count or ctx.evaluations)
        else:
            knobs = sorted(self.points, reverse=True)
        queue: dict[Config, None] = {}
        for knob in knobs:
            queue.setdefault(self.make(float(knob)))
        self._queue = list(queue)

    def ask(self) -> list[Config]:
        if not self._queue:
            raise StopSearch
        return [self._queue.pop(0)]


def available_strategies() -> dict[str, type[Strategy]]:
    """Every registered strategy that loads, by name (a plugin that fails to import is
    skipped with a warning)."""
    found = {}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep)
    loaded = {}
    for name, ep in sorted(found.items()):
        try:
            loaded[name] = _load(name, ep)
        except (ImportError, RankSearchError) as e:
            log.warning("strategy plugin %r (%s) does not load: %s", name, ep.value, e)
    return loaded


def load_strategy(name: str | Strategy, options: Mapping[str, Any] | None = None) -> Strategy:
    """The strategy registered as ``name``, constructed with ``options``."""
    if isinstance(name, Strategy):
        if options:
            raise RankSearchError("options apply to a strategy given by name, not an instance")
        return name
    eps = {ep.name: ep for ep in entry_points(group=GROUP)}
    if name not in eps:
        raise UnknownStrategyError(
            f"unknown strategy {name!r}; available: {sorted(eps)}. Third-party strategies "
            f"register under the entry-point group {GROUP!r}."
        )
    cls = _load(name, eps[name])
    try:
        return cls(**dict(options or {}))
    except TypeError as e:
        params = [p for p in inspect.signature(cls).parameters if p != "self"]
        raise RankSearchError(
            f"bad options for strategy {name!r}: {e}. It takes {params or 'no options'}."
        ) from e


def _load(name: str, ep: Any) -> type[Strategy]:
    cls = ep.load()
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise RankSearchError(
            f"entry point {name!r} ({ep.value}) is not a ranksearch.strategy.Strategy subclass"
        )
    return cls


def largest_true(ok: Callable[[float], bool], lo: float, hi: float, iters: int = 40) -> float:
    """The largest x in [lo, hi] with ``ok(x)``, by bisection; ``ok`` must be monotone (true
    up to some point, false after). Returns ``hi`` when ``ok(hi)``, and ``lo`` when no probed
    point is (``ok(lo)`` itself is never called: the caller decides what an infeasible
    ``lo`` means)."""
    if ok(hi):
        return hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def fit_to_budget(
    ctx: SearchContext, make: Callable[[float], Config], lo: float, hi: float, iters: int = 40
) -> float:
    """The largest knob in [lo, hi] whose config ``make(knob)`` meets the cost constraints.

    Assumes cost grows with the knob. Returns ``hi`` when it is feasible, and ``lo`` when
    nothing is (the caller decides what to do with an infeasible ``make(lo)``).
    """
    return largest_true(lambda knob: ctx.feasible(make(knob)), lo, hi, iters)
