"""The search loop: ask a strategy, skip what is known, evaluate, store, tell."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from . import options as check
from .checks import check_task
from .config import Choice, Config
from .constraints import Constraint, parse_constraints
from .cost import CostModel
from .errors import ConfigError, ConstraintUnreachableError, RankSearchError
from .evaluate import Evaluator, ProxySettings
from .executors import Executor, get_executor
from .fingerprint import Fingerprint
from .latency import LatencyTable, needs_latency, snap_space
from .loop import SearchLoop, Termination
from .pareto import Objective, best, front, hypervolume, knee, parse_objectives, reference_point
from .result import Result
from .space import RankSpace, SpaceSpec
from .store import Store, default_url, latency_book, with_checks
from .strategy import ACCURACY, SearchContext, Strategy, Training, load_strategy
from .task import Task
from .timing import Timing

log = logging.getLogger(__name__)

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
    #: the task's metric, which `best` picks by (accuracy when not known)
    metric: Objective = ACCURACY

    def front(self, constraints: Sequence[str | Constraint] | None = None) -> list[Result]:
        """The non-dominated results that satisfy the constraints (the search's by default)."""
        cons = self.constraints if constraints is None else parse_constraints(constraints)
        return front(self.results, self.objectives, cons)

    def hypervolume(self) -> float:
        """Hypervolume of the front against the dense model's costs (and dense loss, ...) and
        zero for a maximized metric such as accuracy."""
        ref = reference_point(self.objectives, self.costs.metrics(Config()))
        return hypervolume(self.front(), self.objectives, ref)

    def best(self, *constraints: str | Constraint | Sequence[str | Constraint],
                metric: str | Objective | None = None) -> Result | None:
        """The best result by ``metric`` (default: the task's, in its direction) meeting
        ``constraints`` (the search's when none given), given one by one
        (``best("flops<=0.5", "params<=2M")``) or as one list, as `search` takes them
        (``best(["flops<=0.5"])``)."""
        if len(constraints) == 1 and isinstance(constraints[0], list | tuple):
            constraints = tuple(constraints[0])
        picked = self.metric if metric is None or metric == self.metric.metric else metric
        return best(self.results, parse_constraints(constraints) or self.constraints,
                    metric=picked)

    def knee(self) -> Result | None:
        points = self.front()
        return knee(points, self.objectives) if points else None

    def model(self, result: Result | Config) -> nn.Module:
        """The candidate that was scored for ``result`` (or a config), in eval mode: with its
        kept weights when the search kept them (``keep_weights``), else built from the same
        factors and fine-tuned by the same seeded proxy."""
        if self.evaluator is None:
            raise RankSearchError("this SearchResult has no evaluator; use "
                                  "ranksearch.export.scored_model(model, task, ...)")
        if isinstance(result, Result):
            return self.evaluator.scored(result)
        return self.evaluator.candidate(result)[0].eval()


def search(
    model: nn.Module,
    task: Task,
    strategy: str | Strategy = "auto",
    strategy_options: Mapping[str, Any] | None = None,
    constraints: Sequence[str | Constraint] = (),
    objectives: Sequence[str | Objective] | None = None,
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
    multiple_of: int | str = 1,
    dearer: bool = False,
    retry_failed: bool = False,
    share_results: bool = False,
    progress: bool = False,
    meta: Mapping[str, Any] | None = None,
    keep_weights: bool = False,
    isolate: bool | None = None,
    trial_timeout: float | None = None,
) -> SearchResult:
    """Search rank configurations of ``model`` on ``task``.

    Strategies propose configs; each new one is scored by the proxy in ``proxy`` and committed
    to the store before the next is asked for. Configs already in the store (from this run or
    an earlier one with the same study) are never evaluated again, so re-running the same call
    resumes. Stops after ``evaluations`` stored results, after ``time_limit`` seconds, when the
    strategy is done, or on Ctrl-C (``stopped`` says which).

    ``executor`` is "local" (this process) or "ray" (Ray Tune; ``executor_options`` such as
    ``address``, ``cpus_per_trial``, ``max_concurrent``, ``early_stop``). A candidate that
    raises is stored as failed with the reason. ``isolate`` runs each local evaluation in a
    child process, so that a crash or ``os._exit`` is a failed result too (None: on where it
    is cheap, see `ranksearch.executors.local.LocalExecutor`; Ray trials run in worker
    processes anyway). ``trial_timeout`` fails an evaluation that runs longer than that many
    seconds (it turns isolation on). A ``time_limit`` passing during an isolated or Ray
    evaluation stops it (it is not stored); a local one not isolated finishes first. SIGTERM
    stops a search as Ctrl-C does (``stopped == "interrupted"``).
    ``constraints`` are strings like ``"flops<=0.5"`` (a ratio of the dense model) or
    ``"params<=2e6"`` (absolute); ``store`` is a database URL (default: SQLite in ``out``),
    or ``"memory"`` for a store held in this process only (nothing is written, ``out`` is not
    created, and the store is gone when the search returns: its results are the returned
    `SearchResult`'s, and a second call starts afresh).

    The space is ``space`` (a `RankSpace`, or a `SpaceSpec` to discover), or discovered with
    ``methods``, ``include``, ``exclude``, ``min_params``, ``multiple_of`` and ``dearer`` (see
    `SpaceSpec`); not both. The study name (unless given) and the stored fingerprint cover
    every option, the model's weights and the task's data, so a different search never
    resumes another's results. ``retry_failed`` evaluates stored failures again (once per
    run). ``share_results`` reuses results of other studies in the store whose fingerprint is
    exactly this search's.

    ``objectives`` default to the task's metric (in its direction) and flops; a bare name that
    is the task's metric takes its direction. ``keep_weights`` writes the fine-tuned weights
    of every candidate scored ``ok`` under ``out``/weights/<study> (`Result.weights`), which
    `SearchResult.model` and export then use instead of fine-tuning again.

    ``proxy=ProxySettings(data_aware=True)`` scores candidates built from data-aware factors
    (fitted to the layer inputs of a few training batches, see `ranksearch.calibration`), and
    the spectral strategies (errorbound, pca_energy, vbmf) then read whitened spectra; prices
    are unchanged, and the setting is part of the fingerprint like every proxy setting.

    A constraint or objective on latency (``"latency<=0.5x"``, ``"latency<=3ms"``) prices it
    from a `ranksearch.latency.LatencyTable`: every choice of every layer timed alone on the
    proxy's ``device`` and ``backend`` at batches of ``latency_batch``, once (with a progress
    bar) and kept in the store, so later searches on the same machine reuse it; nothing is
    timed per candidate. Every front point is then timed end to end against the dense model
    (``latency_measured``, ``latency_measured_ratio`` in its metrics, recorded with the study).
    With latency priced, ``multiple_of="auto"`` rounds each site's ranks to the multiple that
    the table finds fast there (`ranksearch.latency.snap_space`).

    Before anything is written, the task is checked against the dense model on the proxy's
    device (`ranksearch.checks.check_task`); its metric and loss are in ``meta["dense"]``.
    """
    evaluations = check.positive_int(evaluations, "evaluations", "search")
    time_limit = check.number_in(time_limit, "time_limit", "search", 0.0, open_low=True,
                                 optional=True)
    seed = check.integer(seed, "seed", "search", 0)
    proxy = proxy or ProxySettings()
    cons = parse_constraints(constraints)
    objs = parse_objectives((task.metric, "flops") if objectives is None else objectives,
                            metric=task.metric)  # type: ignore[arg-type]
    if keep_weights and store == "memory":
        raise RankSearchError("keep_weights writes files under out, and store='memory' writes "
                              "nothing; use the default store (or another URL) to keep weights")
    if needs_latency(x.metric for x in (*cons, *objs)) and not proxy.latency:
        proxy = replace(proxy, latency=True)
    timing = Timing(backend=proxy.backend, batch_size=proxy.latency_batch, device=proxy.device,
                    repeats=proxy.latency_repeats) if proxy.latency else None
    strat = load_strategy(strategy, strategy_options)
    snap = multiple_of == "auto"
    if snap and timing is None:
        raise ConfigError("multiple_of='auto' reads the fast rank multiples off the latency "
                          "table; add a latency constraint or objective, or give an integer "
                          "multiple_of")
    given = SpaceSpec(methods, include, exclude, min_params, 1 if snap else multiple_of,
                      dearer=dearer)  # type: ignore[arg-type]
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
    evaluator = Evaluator(model, task, proxy, space, progress=progress)
    dense = check_task(model, task, proxy, evaluator)  # before anything is written
    url = store or default_url(out)
    table = None
    if timing is not None:
        example = task.example_input(timing.batch_size)
        if snap:  # the grids timed on the table of the given space, then the snapped one's
            space = snap_space(LatencyTable(model, space, example, timing, latency_book(url)))
            evaluator = Evaluator(model, task, proxy, space, progress=progress)
        table = LatencyTable(model, space, example, timing, latency_book(url))
        table.build(progress)
        costs = CostModel(space, latency=table)
        evaluator.price_latency(table)
        check_reachable(space, costs, cons)
    name = study or study_name(task.name, strat.name, cons, objs, proxy, strategy_options, seed,
                               space, evaluator.fingerprint)
    run_meta = {"task": task.name, "strategy": strat.name,
                "strategy_options": dict(strategy_options or {}),
                "constraints": [str(c) for c in cons], "proxy": proxy.to_json(), "seed": seed,
                "space": space.spec.to_json(), "dense": dense, **dict(meta or {})}
    if keep_weights:
        evaluator.keep = Path(out) / "weights" / name
    runner = get_executor(executor, isolate=isolate, trial_timeout=trial_timeout,
                          **dict(executor_options or {}))  # its errors before anything is written
    db = Store(url, name, space, objs, meta=run_meta, fingerprint=evaluator.fingerprint,
               share=share_results)
    ctx = SearchContext(
        space=space, costs=costs, cache=evaluator.cache, constraints=cons, objectives=objs,
        rng=np.random.default_rng(seed), evaluations=evaluations,
        metric=Objective.parse(task.metric),  # type: ignore[arg-type]
        training=Training.of(evaluator.model, task, evaluator.cache, proxy.device),
    )
    strat.setup(ctx)
    loop = SearchLoop(db, strat, ctx, Termination(evaluations, time_limit),
                      evaluator.fingerprint.digest, retry_failed, progress)
    try:
        runner.drive(loop, evaluator)
    finally:
        loop.close()
    results = db.results()
    if table is not None and loop.stopped != "interrupted":
        results = check_front(db, table, evaluator, results, objs, cons)
    return SearchResult(
        results=results, objectives=objs, constraints=cons, space=space, costs=costs,
        store_url=url, study=name, stopped=loop.stopped or "finished", evaluated=loop.evaluated,
        meta=run_meta, evaluator=evaluator, metric=Objective.parse(task.metric),  # type: ignore[arg-type]
    )


def check_reachable(space: RankSpace, costs: CostModel, constraints: Sequence[Constraint]
                    ) -> None:
    """Raise when no configuration of the space can meet the cost constraints: an upper bound
    that even the cheapest config breaks, a lower bound that even the dearest breaks, or an
    upper and a lower bound on one metric that leave nothing between them. Constraints on a
    metric ``costs`` does not price (latency without a latency table) are left out."""
    priced = [c for c in constraints if c.metric in costs.priced]
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


def check_front(db: Store, table: LatencyTable, evaluator: Evaluator, results: list[Result],
                objectives: Sequence[Objective], constraints: Sequence[Constraint]
                ) -> list[Result]:
    """``results`` with every front point timed end to end against the dense model
    (`LatencyTable.check`), those timed before (recorded with the study) not again."""
    known = db.checks()
    points = front(with_checks(results, known), objectives, constraints)
    todo = [r.config for r in points if r.key not in known]
    if todo:
        new = table.check(todo, evaluator.build)
        db.save_checks(new)
        known.update(new)
    return with_checks(results, known)


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


__all__ = ["SearchLoop", "SearchResult", "check_front", "check_reachable", "search",
           "study_name"]
