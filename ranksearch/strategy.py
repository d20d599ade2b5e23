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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from itertools import cycle
from typing import Any, ClassVar

import numpy as np

from .cache import FactorCache
from .config import Choice, Config
from .constraints import Constraint
from .cost import METRICS as PRICED
from .cost import CostModel
from .errors import RankSearchError, UnknownStrategyError
from .options import boolean
from .pareto import Objective
from .result import Result
from .space import RankSpace

GROUP = "ranksearch.strategies"
#: The quality objective of a search whose task does not say (a classifier's).
ACCURACY = Objective("accuracy")
log = logging.getLogger(__name__)


class StopSearch(Exception):
    """Raised by `Strategy.ask` when the strategy has nothing more to propose."""


@dataclass(frozen=True)
class Proposal:
    """A config a strategy asks to have scored, with how.

    ``probe``: a measurement the strategy needs for itself (e.g. one layer decomposed alone);
    it is evaluated even when it breaks a cost constraint (fronts still leave it out).
    ``partial``: a cheap partial score instead of the proxy's: zero-shot accuracy on the first
    ``partial`` validation batches (nothing trained). Either way the score goes through the
    executor, is stored, and counts against the evaluation budget. `Strategy.ask` may return
    plain `Config` objects for ordinary proposals.
    """

    config: Config
    probe: bool = False
    partial: int | None = None

    def __post_init__(self) -> None:
        if self.partial is not None and (not isinstance(self.partial, int) or self.partial < 1):
            raise RankSearchError(f"partial must be a number of batches ≥ 1, got {self.partial}")


@dataclass(frozen=True)
class Training:
    """What a strategy that trains (bayes_tt) may use, without the model or the task: a
    compressed copy built from the factor cache, batches of the training split, the task's
    loss, and the device the proxy runs on."""

    build: Callable[[Config], Any]
    loader: Callable[[int, int], Any]
    loss: Callable[[Any, Any], Any]
    size: int
    device: str = "cpu"

    def batches(self, batch_size: int, seed: int) -> Iterator[tuple[Any, Any]]:
        """Training batches, shuffled with ``seed``, cycled without end."""
        return cycle(self.loader(batch_size, seed))

    @classmethod
    def of(cls, model: Any, task: Any, cache: FactorCache, device: str = "cpu") -> Training:
        """The view of ``model`` and ``task`` (a `ranksearch.Task`) a training strategy gets:
        candidates are built from ``cache``; the model and the task stay out of reach."""
        from .surgery import compress

        return cls(
            build=lambda config: compress(model, config, cache=cache),
            loader=lambda batch_size, seed: task.loader("train", batch_size, shuffle=True,
                                                        seed=seed),
            loss=task.loss, size=task.size("train") or 1, device=device,
        )


@dataclass(frozen=True)
class SearchContext:
    """What a strategy sees: read-only, and never the model, the task or the executor.

    ``space`` (the sites and rank grids), ``costs`` (exact params, MACs, FLOPs and energy of any
    config, nothing built), ``cache`` (data-free signals: `FactorCache.singular_values`,
    `FactorCache.weight`), the ``constraints`` and ``objectives``, a seeded ``rng``, the
    evaluation budget ``evaluations``, the task's ``metric`` (as an `Objective`; `quality` is
    the quality objective strategies score by), and the ``history`` of results told so far.
    Verbs:
    `feasible`, `violation`, `repair` (toward the budget), `cost_metric` (the one cost a
    strategy that tracks one should use) and `cost`. ``training`` is set for searches run by
    `ranksearch.search` (see `Training`). Scores a strategy needs go through its proposals
    (`Proposal`), never around the loop.
    """

    space: RankSpace
    costs: CostModel
    cache: FactorCache
    constraints: tuple[Constraint, ...]
    objectives: tuple[Objective, ...]
    rng: np.random.Generator
    evaluations: int
    training: Training | None = None
    metric: Objective = ACCURACY
    _history: list[Result] = field(default_factory=list, repr=False)

    @property
    def quality(self) -> Objective:
        """The objective a strategy scores quality by: the first objective that is not a cost
        metric, else the task's ``metric``. ``quality.value(metrics)`` reads it,
        ``-quality.cost(metrics)`` is it with higher always better."""
        return next((o for o in self.objectives
                     if o.metric.removesuffix("_ratio") not in PRICED), self.metric)

    @property
    def history(self) -> tuple[Result, ...]:
        """Every result told to the strategy so far, in the order told."""
        return tuple(self._history)

    def cost_constraints(self) -> tuple[Constraint, ...]:
        """The constraints that can be checked before evaluation: those on a cost metric
        (latency too: a search that names it prices it from a latency table)."""
        return tuple(c for c in self.constraints if c.metric in PRICED)

    @property
    def cost_metric(self) -> str:
        """The search's cost metric: that of the first cost constraint, else of the first
        cost objective, else flops."""
        names = [c.metric for c in self.cost_constraints()]
        names += [o.metric.removesuffix("_ratio") for o in self.objectives]
        return next((m for m in names if m in PRICED), "flops")

    def cost(self, config: Config, metric: str | None = None) -> float:
        """The ratio of ``config``'s ``metric`` (default: `cost_metric`) to the dense model's."""
        return self.costs.ratio(metric or self.cost_metric, config)

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

    def repair(self, config: Config) -> Config:
        """``config`` brought within the cost constraints: every site's rank scaled by the
        largest common factor in (0, 1] that meets them (each snapped down to its grid), so
        the allocation across sites is kept. Where even its smallest grid ranks break them
        (under latency a factorized layer can be slower than the dense one), sites are then
        moved one at a time to the choice, dense included, that lowers the violation most,
        until it meets them or no move helps. The config itself when it is feasible."""
        if self.feasible(config):
            return config
        fixed = scaled(self.space, config, largest_true(
            lambda k: self.feasible(scaled(self.space, config, k)), 0.0, 1.0))
        return fixed if self.feasible(fixed) else self._descend(fixed)

    def _descend(self, config: Config) -> Config:
        """``config`` with sites moved one at a time to their cheapest (or, under a lower
        bound, dearest) choice in a constrained metric, the move that lowers the violation
        most first, while one does."""
        moves = {(name, (min if c.op == "<=" else max)(
                    self.space.choices(name),
                    key=lambda ch, n=name, m=c.metric: self.costs.site_cost(n, ch, m)))
                 for name in self.space.names for c in self.cost_constraints()}
        violation = self.violation(config)
        while violation > 0:
            tried = [(self.violation(config.with_choices({n: ch})), n, ch)
                     for n, ch in sorted(moves, key=str) if config.get(n) != ch]
            lowest, name, choice = min(tried, key=lambda t: t[0], default=(violation, "", None))
            if lowest >= violation:
                break
            violation, config = lowest, config.with_choices({name: choice})
        return config

    def record(self, results: Sequence[Result]) -> None:
        """Append told results to the history (called by the search loop only)."""
        self._history.extend(results)


def scaled(space: RankSpace, config: Config, factor: float) -> Config:
    """``config`` with every rank component times ``factor``, snapped down to the site's grid
    (at least its smallest rank)."""
    choices = {}
    for name, choice in config.items():
        grid = space.ranks(name, choice.method)
        target = np.atleast_1d(np.asarray(choice.rank, dtype=float)) * factor
        fits = [r for r in grid if np.all(np.atleast_1d(r) <= target + 1e-9)]
        choices[name] = Choice(choice.method, fits[-1] if fits else grid[0])
    return Config(choices)


class Strategy:
    """Base class of rank-search strategies: the contract a third-party strategy implements.

    Subclasses set ``name`` and ``description`` and take their options as keyword arguments
    of ``__init__`` (validated there: raise `ranksearch.errors.RankSearchError` naming the
    option). The search calls, in this order:

    `setup` once, before anything is asked, with the read-only `SearchContext`.

    `ask` whenever the search can take more work. It returns a list of `Config` (or `Proposal`
    for probes and partial scores): one config for a sequential strategy, a whole generation
    for a batch one; an empty list means "waiting for results"; raising `StopSearch` means
    done. Under the Ray executor `ask` may be called again before the results of the previous
    ask are told (while trials run): return an empty list when you need them first.

    `tell` with the results of one earlier ask, in the order asked, once all of them are
    known. It may get fewer results than were asked: configs past the evaluation budget are
    never evaluated. A config already stored comes back with its stored result; one that
    breaks a cost constraint comes back ``failed`` with reason ``"infeasible: ..."`` and its
    costs (it is not stored); one whose evaluation failed comes back ``failed`` with the
    reason; one stopped early by ASHA comes back ``pruned`` with the accuracy it reached. A
    partial score comes back with ``result.partial`` set.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def setup(self, ctx: SearchContext) -> None:
        """Called once before the first `ask`; keep ``ctx``."""
        self.ctx = ctx

    def ask(self) -> list[Config | Proposal]:
        """The next proposals (see the class docstring)."""
        raise NotImplementedError

    def tell(self, results: Sequence[Result]) -> None:
        """Receive the results of one earlier ask (default: ignore them)."""


class SweepStrategy(Strategy):
    """A one-knob family of configs, ``make(knob)``, whose cost grows with the knob.

    Proposes ``count`` configs (default: the evaluation budget) from the largest knob in
    [``low``, ``high``] that meets the cost constraints down to ``low`` — so it both meets a
    budget and traces a front below it — or exactly the knobs in ``points``. Most expensive
    first; duplicates (knobs that round to the same ranks) are proposed once, and of the
    knobs below the largest only those that meet the constraints (latency need not fall with
    the knob). Once they are used up, ``refine`` (default) hands the rest of the budget to
    `ranksearch.refine.Refiner` (new feasible configs near the front found); ``refine=False``
    stops there.
    """

    #: the knob's range; a subclass may set either per instance in ``setup``
    low: float = 0.02
    high: float = 1.0

    def __init__(self, points: Sequence[float] | None = None, count: int | None = None,
                 refine: bool = True) -> None:
        from .refine import Handover  # refine builds on this module

        self.points = None if points is None else [float(p) for p in points]
        self.count = count
        self.handover = Handover(self.name or type(self).__name__,
                                 boolean(refine, "refine", self.name))

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
            config = self.make(float(knob))
            if self.points is not None or ctx.feasible(config):
                queue.setdefault(config)
        self._queue = list(queue)
        self.handover.setup(ctx)

    def ask(self) -> list[Config]:
        if not self._queue:
            return self.handover.ask()
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
