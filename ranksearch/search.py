"""The search loop: ask a strategy, skip what is known, evaluate, store, tell."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from .checks import check_task
from .constraints import Constraint, parse_constraints
from .cost import METRICS as PRICED
from .cost import CostModel
from .errors import ConfigError, RankSearchError
from .evaluate import Evaluator, ProxySettings
from .executors import Executor, get_executor
from .fingerprint import Fingerprint
from .pareto import Objective, best, front, hypervolume, knee, parse_objectives, reference_point
from .result import Result
from .space import Choice, Config, RankSpace, SpaceSpec
from .store import Store, default_url
from .strategy import SearchContext, StopSearch, Strategy, load_strategy
from .task import Task

log = logging.getLogger(__name__)

#: Rounds in a row without a new evaluation before a strategy is taken to be exhausted.
MAX_IDLE_ROUNDS = 100


class ConstraintUnreachableError(RankSearchError):
    """No configuration of the space can meet a constraint."""


@dataclass
class SearchResult:
    """The outcome of a search: every result in the store, and the fronts over them."""

    results: list[Result]
    objectives: tuple[Objective, ...]
    constraints: tuple[Constraint, ...]
    space: RankSpace
    costs: CostModel
    store_url: str
    study: str
    stopped: str = "finished"
    evaluated: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    evaluator: Evaluator | None = field(default=None, repr=False)

    def front(self, constraints: Sequence[str | Constraint] | None = None) -> list[Result]:
        """The non-dominated results that satisfy the constraints (the search's by default)."""
        cons = self.constraints if constraints is None else parse_constraints(constraints)
        return front(self.results, self.objectives, cons)

    def hypervolume(self) -> float:
        """Hypervolume of the front against the dense model's costs and zero accuracy."""
        ref = reference_point(self.objectives, self.costs.metrics(Config()))
        return hypervolume(self.front(), self.objectives, ref)

    def best(self, *constraints: str | Constraint | Sequence[str | Constraint],
             metric: str = "accuracy") -> Result | None:
        """The most accurate result meeting ``constraints`` (the search's when none given),
        given one by one (``best("flops<=0.5", "params<=2M")``) or as one list, as `search`
        takes them (``best(["flops<=0.5"])``)."""
        if len(constraints) == 1 and isinstance(constraints[0], list | tuple):
            constraints = tuple(constraints[0])
        return best(self.results, parse_constraints(constraints) or self.constraints,
                    metric=metric)

    def knee(self) -> Result | None:
        points = self.front()
        return knee(points, self.objectives) if points else None

    def model(self, result: Result | Config) -> nn.Module:
        """The candidate that was scored for ``result`` (or a config): built from the same
        factors and fine-tuned by the same seeded proxy, in eval mode."""
        if self.evaluator is None:
            raise RankSearchError("this SearchResult has no evaluator; use "
                                  "ranksearch.export.scored_model(model, task, ...)")
        config = result.config if isinstance(result, Result) else result
        return self.evaluator.candidate(config)[0].eval()


def search(
    model: nn.Module,
    task: Task,
    strategy: str | Strategy = "uniform",
    strategy_options: Mapping[str, Any] | None = None,
    constraints: Sequence[str | Constraint] = (),
    objectives: Sequence[str | Objective] = ("accuracy", "flops"),
    evaluations: int = 40,
    time_limit: float | None = None,
    executor: str | Executor = "local",
    executor_options: Mapping[str, Any] | None = None,
    store: str | None = None,
    study: str | None = None,
    out: str = "ranksearch-out",
    seed: int = 0,
    proxy: ProxySettings | None = None,
    space: RankSpace | SpaceSpec | None = None,
    methods: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    min_params: int = 0,
    multiple_of: int = 1,
    dearer: bool = False,
    retry_failed: bool = False,
    share_results: bool = False,
    progress: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Search rank configurations of ``model`` on ``task``.

    Strategies propose configs; each new one is scored by the proxy in ``proxy`` and committed
    to the store before the next is asked for. Configs already in the store (from this run or
    an earlier one with the same study) are never evaluated again, so re-running the same call
    resumes. Stops after ``evaluations`` stored results, after ``time_limit`` seconds, when the
    strategy is done, or on Ctrl-C (``stopped`` says which).

    ``executor`` is "local" (this process) or "ray" (Ray Tune; ``executor_options`` such as
    ``address``, ``cpus_per_trial``, ``max_concurrent``, ``early_stop``).
    ``constraints`` are strings like ``"flops<=0.5"`` (a ratio of the dense model) or
    ``"params<=2e6"`` (absolute); ``store`` is a database URL (default: SQLite in ``out``).

    The space is ``space`` (a `RankSpace`, or a `SpaceSpec` to discover), or discovered with
    ``methods``, ``include``, ``exclude``, ``min_params``, ``multiple_of`` and ``dearer`` (see
    `SpaceSpec`); not both. The study name (unless given) and the stored fingerprint cover
    every option, the model's weights and the task's data, so a different search never
    resumes another's results. ``retry_failed`` evaluates stored failures again (once per
    run). ``share_results`` reuses results of other studies in the store whose fingerprint is
    exactly this search's.

    Before anything is written, the task is checked against the dense model on the proxy's
    device (`ranksearch.checks.check_task`); its accuracy and loss are in ``meta["dense"]``.
    """
    if evaluations < 1:
        raise RankSearchError(f"evaluations must be at least 1, got {evaluations}")
    proxy = proxy or ProxySettings()
    cons = parse_constraints(constraints)
    objs = parse_objectives(objectives)
    if any(x.metric == "latency" for x in (*cons, *objs)) and not proxy.latency:
        proxy = replace(proxy, latency=True)
    strat = load_strategy(strategy, strategy_options)
    given = SpaceSpec(methods, include, exclude, min_params, multiple_of, dearer=dearer)
    if isinstance(space, RankSpace):
        if given != SpaceSpec():
            raise ConfigError(
                "space= is a RankSpace made already, so methods/include/exclude/min_params/"
                "multiple_of/dearer would be ignored; pass them to RankSpace.discover, or pass "
                "a SpaceSpec (or the options alone) instead"
            )
    else:
        if space is not None and given != SpaceSpec():
            raise ConfigError("pass the space options either in the SpaceSpec or one by one, "
                              "not both")
        space = (space or given).discover(model, task.example_input())
    costs = CostModel(space)
    check_reachable(space, costs, cons)
    evaluator = Evaluator(model, task, proxy, space)
    dense = check_task(model, task, proxy, evaluator)  # before anything is written
    url = store or default_url(out)
    name = study or study_name(task.name, strat.name, cons, objs, proxy, strategy_options, seed,
                               space, evaluator.fingerprint)
    run_meta = {"task": task.name, "strategy": strat.name,
                "strategy_options": dict(strategy_options or {}),
                "constraints": [str(c) for c in cons], "proxy": proxy.to_json(), "seed": seed,
                "space": space.spec.to_json(), "dense": dense, **dict(meta or {})}
    db = Store(url, name, space, objs, meta=run_meta, fingerprint=evaluator.fingerprint,
               share=share_results)
    runner = get_executor(executor, **dict(executor_options or {}))
    loop = SearchLoop(db, evaluator, runner, evaluations, time_limit, progress, retry_failed)
    ctx = SearchContext(
        space=space, costs=costs, cache=evaluator.cache, constraints=cons, objectives=objs,
        rng=np.random.default_rng(seed), evaluations=evaluations, evaluate=loop.evaluate_now,
        evaluator=evaluator,
    )
    loop.ctx = ctx
    strat.setup(ctx)
    driver = getattr(runner, "run", None)
    stopped = driver(loop, strat) if driver is not None else loop.run(strat)
    return SearchResult(
        results=db.results(), objectives=objs, constraints=cons, space=space, costs=costs,
        store_url=url, study=name, stopped=stopped, evaluated=loop.evaluated, meta=run_meta,
        evaluator=evaluator,
    )


class SearchLoop:
    """The ask → dedupe → evaluate → store → tell cycle of one search.

    `run` drives it in this process; an executor with a ``run(loop, strategy)`` method (Ray
    Tune) drives it itself through `triage`, `record` and `exhausted`.
    """

    def __init__(self, store: Store, evaluator: Evaluator, executor: Executor, evaluations: int,
                 time_limit: float | None, progress: bool, retry_failed: bool = False) -> None:
        self.store = store
        self.retry_failed = retry_failed
        self._retried: set[str] = set()
        #: stored failures a retry may evaluate again; they do not count against the budget
        self._failures = {r.config.key for r in store if r.status == "failed"} \
            if retry_failed else set()
        self.evaluator = evaluator
        self.executor = executor
        self.evaluations = evaluations
        self.deadline = None if time_limit is None else time.monotonic() + time_limit
        self.evaluated = 0
        self.best: Result | None = None
        self.ctx: SearchContext
        self.bar = tqdm(total=evaluations, initial=min(self.stored, evaluations),
                        disable=not progress, desc="search", unit="eval")

    def run(self, strategy: Strategy) -> str:
        idle = 0
        try:
            while True:
                if (reason := self.exhausted()) is not None:
                    return reason
                try:
                    configs = strategy.ask()
                except StopSearch:
                    return "strategy finished"
                before = self.evaluated
                results = self.evaluate_now(configs)
                if results:
                    self.tell(strategy, results)
                idle = 0 if self.evaluated > before else idle + 1
                if idle >= MAX_IDLE_ROUNDS:
                    log.warning("%s proposed nothing new in %d rounds; stopping",
                                strategy.name, idle)
                    return "strategy exhausted"
        except KeyboardInterrupt:
            log.warning("interrupted: finished evaluations are stored; run again to resume")
            return "interrupted"
        finally:
            self.bar.close()

    def evaluate_now(self, configs: Sequence[Config]) -> list[Result]:
        """Results for ``configs``, in their order: stored ones as they are, infeasible ones
        marked failed (not stored), new ones evaluated by the executor and committed one by
        one as they finish."""
        known, todo = self.triage(configs)
        for result in self.executor.map(self.evaluator, todo):
            self.record(result)
            known[result.config.key] = result
        return in_order(configs, known)

    def triage(self, configs: Sequence[Config]) -> tuple[dict[str, Result], list[Config]]:
        """Split ``configs`` into the results already known (stored, or infeasible by cost)
        and the new configs to evaluate, deduplicated and within the evaluation budget."""
        known: dict[str, Result] = {}
        todo: dict[str, Config] = {}
        for config in configs:
            config = self.store.space.validate(config)
            if config.key in known or config.key in todo:
                continue
            stored = self.store.get(config)
            if stored is not None and self._retry(stored):
                stored = None
            if stored is not None:
                known[config.key] = stored
            elif config not in self.ctx.probes and not self.ctx.feasible(config):
                known[config.key] = self._infeasible(config)
            elif self.exhausted() is None and self.stored + len(todo) < self.evaluations:
                todo[config.key] = config
        return known, list(todo.values())

    @property
    def stored(self) -> int:
        """Stored results that count against the evaluation budget (every stored result, less
        the failures a retry has yet to evaluate again)."""
        return len(self.store) - len(self._failures)

    def _retry(self, stored: Result) -> bool:
        """Whether to evaluate a stored result again: a failure, once per run, when asked."""
        if stored.config.key not in self._failures or stored.config.key in self._retried:
            return False
        self._retried.add(stored.config.key)
        return True

    def tell(self, strategy: Strategy, results: Sequence[Result]) -> None:
        """Hand ``results`` to the strategy and append them to ``ctx.history``."""
        self.ctx.history.extend(results)
        strategy.tell(results)

    def record(self, result: Result) -> None:
        """Commit a finished evaluation to the store (before anything else is asked)."""
        self.store.save(result)
        self._failures.discard(result.config.key)
        self.evaluated += 1
        self.bar.update(1)
        self._show_best(result)

    def _infeasible(self, config: Config) -> Result:
        metrics = self.ctx.costs.metrics(config)
        broken = [str(c) for c in self.ctx.cost_constraints() if not c.satisfied(metrics)]
        return Result(config, metrics, "failed", f"infeasible: violates {', '.join(broken)}",
                      proxy="cost check", fingerprint=self.evaluator.fingerprint.digest)

    def exhausted(self) -> str | None:
        if self.stored >= self.evaluations:
            return "finished"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "time limit"
        return None

    def _show_best(self, result: Result) -> None:
        """Keep the best result so far (updated with each new one) on the progress bar."""
        if self.best is None:
            self.best = best(self.store.results(), self.ctx.constraints)
        else:
            self.best = best([self.best, result], self.ctx.constraints)
        top = self.best
        if top is not None:
            self.bar.set_postfix_str(
                f"best acc {top.metrics['accuracy']:.4f} at flops "
                f"{top.metrics.get('flops_ratio', float('nan')):.3f}"
            )


def in_order(configs: Sequence[Config], results: Mapping[str, Result]) -> list[Result]:
    """``results`` (by config key) in the order of ``configs``."""
    order = {c.key: i for i, c in enumerate(configs)}
    return sorted(results.values(), key=lambda r: order.get(r.config.key, len(order)))


def check_reachable(space: RankSpace, costs: CostModel, constraints: Sequence[Constraint]
                    ) -> None:
    """Raise when no configuration of the space can meet the cost constraints: an upper bound
    that even the cheapest config breaks, a lower bound that even the dearest breaks, or an
    upper and a lower bound on one metric that leave nothing between them."""
    priced = [c for c in constraints if c.metric in PRICED]
    for c in priced:
        pick = min if c.op == "<=" else max
        extreme = Config({
            name: pick(space.choices(name), key=lambda ch, n=name: _site_cost(costs, n, ch,
                                                                              c.metric))
            for name in space.names
        })
        metrics = costs.metrics(extreme)
        if not c.satisfied(metrics):
            which = "cheapest" if c.op == "<=" else "dearest"
            raise ConstraintUnreachableError(
                f"no configuration of the space meets {c}: the {which} reaches "
                f"{c.key} {c.format_value(metrics[c.key], 4)}. Relax the constraint, allow "
                "lower ranks (min_rank) or more factorizations (methods)."
            )
    for low in (c for c in priced if c.op == ">="):
        for high in (c for c in priced if c.op == "<=" and c.metric == low.metric):
            if low.value > high.value and low.relative == high.relative:
                raise ConstraintUnreachableError(
                    f"the constraints {low} and {high} leave no room between them; loosen one"
                )


def _site_cost(costs: CostModel, name: str, choice: Choice, metric: str) -> float:
    return costs.metrics(Config({name: choice}))[metric]


def study_name(task: str, strategy: str, constraints: Sequence[Constraint],
               objectives: Sequence[Objective], proxy: ProxySettings,
               options: Mapping[str, Any] | None, seed: int, space: RankSpace,
               fingerprint: Fingerprint) -> str:
    """A name that is the same for the same search, so re-running it resumes: it covers every
    option, the space, and the fingerprint (weights, data, loss)."""
    spec = json.dumps({
        "constraints": [str(c) for c in constraints],
        "objectives": [str(o) for o in objectives],
        "proxy": proxy.to_json(),
        "options": dict(options or {}),
        "seed": seed,
        "space": space.spec.to_json(),
        "fingerprint": fingerprint.digest,
    }, sort_keys=True, default=str)
    return f"{task}-{strategy}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


__all__ = ["SearchLoop", "SearchResult", "check_reachable", "in_order", "search", "study_name"]
