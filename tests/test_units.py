"""Unit tests on a tiny untrained model and the in-memory store: no trained CNN, no database."""

import json
import time

import numpy as np
import optuna
import pytest
import torch
from helpers import proposals
from optuna.trial import TrialState
from ranksearch_strategies.baselines import Proportional, proportional
from torch import nn
from torch.utils.data import TensorDataset

import ranksearch
from ranksearch.cache import FactorCache
from ranksearch.config import Choice, Config
from ranksearch.constraints import parse_constraints
from ranksearch.cost import CostModel
from ranksearch.errors import ConstraintError
from ranksearch.evaluate import Evaluator, ProxySettings
from ranksearch.loop import MAX_IDLE_ROUNDS
from ranksearch.pareto import knee, parse_objectives
from ranksearch.result import Result
from ranksearch.space import RankSpace
from ranksearch.store import MEMORY, Store, open_storage, read_study, space_signature
from ranksearch.strategy import (
    SearchContext,
    StopSearch,
    Strategy,
    SweepStrategy,
    fit_to_budget,
    largest_true,
)

ZERO_SHOT = ProxySettings(steps=0)
OBJECTIVES = parse_objectives(("accuracy", "flops"))


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    """An untrained conv → linear classifier for 3×8×8 inputs, 10 classes."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


@pytest.fixture(scope="module")
def tiny_task():
    """Random 3×8×8 inputs with labels in [0, 10)."""
    g = torch.Generator().manual_seed(0)

    def data(n: int) -> TensorDataset:
        return TensorDataset(torch.randn(n, 3, 8, 8, generator=g),
                             torch.randint(0, 10, (n,), generator=g))

    return ranksearch.Task("tiny", data(64), data(32))


@pytest.fixture(scope="module")
def deep():
    """Three layers whose maximum svd ranks are their output channels: 16, 32 and 8."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * 4 * 4, 8))


def context(model: nn.Module, space: RankSpace, constraints=(), evaluations: int = 10
            ) -> SearchContext:
    return SearchContext(space=space, costs=CostModel(space), cache=FactorCache(model, space),
                         constraints=parse_constraints(constraints), objectives=OBJECTIVES,
                         rng=np.random.default_rng(0), evaluations=evaluations)


def svd_space(model: nn.Module) -> RankSpace:
    return RankSpace.discover(model, torch.zeros(1, 3, 8, 8), methods=["svd"])


def run(model, task, **kw):
    kw.setdefault("proxy", ZERO_SHOT)
    kw.setdefault("store", MEMORY)
    return ranksearch.search(model, task, **kw)


class Scripted(Strategy):
    """Proposes the uniform configs of ``fractions`` one by one, then raises ``end``."""

    name = "scripted"

    def __init__(self, fractions, end: type[BaseException] = StopSearch) -> None:
        self.fractions = list(fractions)
        self.end = end
        self.asks = 0
        self.told: list[Result] = []

    def setup(self, ctx):
        super().setup(ctx)
        self.todo = [ctx.space.uniform(f) for f in self.fractions]

    def ask(self):
        self.asks += 1
        if not self.todo:
            raise self.end
        return [self.todo.pop(0)]

    def tell(self, results):
        self.told.extend(results)


class Repeating(Strategy):
    """Proposes the same config for ever."""

    name = "repeating"

    def setup(self, ctx):
        super().setup(ctx)
        self.asks = 0

    def ask(self):
        self.asks += 1
        return [self.ctx.space.uniform(0.5)]


# -- the in-memory store ------------------------------------------------------------------------
def test_memory_storage_is_fresh_per_call():
    a, b = open_storage(MEMORY), open_storage("memory")
    assert isinstance(a, optuna.storages.InMemoryStorage) and a is not b
    optuna.create_study(storage=a, study_name="only-in-a")
    assert [s.study_name for s in optuna.get_all_study_summaries(a)] == ["only-in-a"]
    assert optuna.get_all_study_summaries(b) == []


def test_store_on_memory_keeps_attrs_trials_and_metric_names(tiny, tiny_task):
    evaluator = Evaluator(tiny, tiny_task, ZERO_SHOT)
    space = evaluator.space
    store = Store(MEMORY, "s", space, OBJECTIVES, meta={"who": "test"},
                  fingerprint=evaluator.fingerprint)
    attrs = store.study.user_attrs
    assert attrs["space"] == space_signature(space)
    assert attrs["objectives"] == ["accuracy", "flops"]
    assert store.meta == {"who": "test"}
    assert attrs["fingerprint"] == evaluator.fingerprint.to_json()
    assert store.study.metric_names == ["accuracy", "flops"]

    good = evaluator(space.uniform(0.5))
    bad = Result(space.uniform(0.2), {"accuracy": float("nan"), "flops": 1.0}, "failed", "boom")
    store.save(good)
    store.save(bad)
    store.save(good)  # stored once
    assert len(store) == 2 and store.results() == [good, bad]
    assert good.config in store and space.uniform(0.9) not in store
    assert store.get(good.config) == good and store.get(space.uniform(0.9)) is None
    trials = store.study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert trials[0].values == [good.metrics["accuracy"], good.metrics["flops"]]
    assert trials[0].params == {name: str(good.config[name]) for name in space.names}
    assert Result.from_json(json.loads(trials[0].user_attrs["result"])) == good
    # a second Store on "memory" has a storage of its own: it starts empty
    assert len(Store(MEMORY, "s", space, OBJECTIVES)) == 0


def test_share_lists_the_other_studies_of_one_memory_storage(tiny, tiny_task, monkeypatch):
    evaluator = Evaluator(tiny, tiny_task, ZERO_SHOT)
    space, fp = evaluator.space, evaluator.fingerprint
    shared = open_storage(MEMORY)
    monkeypatch.setattr("ranksearch.store.open_storage", lambda url: shared)
    first = Store(MEMORY, "first", space, OBJECTIVES, fingerprint=fp)
    done = evaluator(space.uniform(0.5))
    first.save(done)
    alone = Store(MEMORY, "alone", space, OBJECTIVES, fingerprint=fp)
    assert alone.get(done.config) is None  # without share, another study is never read
    second = Store(MEMORY, "second", space, OBJECTIVES, fingerprint=fp, share=True)
    assert second.get(done.config) == done
    assert len(second) == 1 and len(second.study.get_trials()) == 1  # copied in
    assert second.get(space.uniform(0.2)) is None


def test_search_on_memory_writes_nothing(tiny, tiny_task, tmp_path):
    out = tmp_path / "out"
    result = run(tiny, tiny_task, strategy="uniform", evaluations=3, out=str(out))
    assert result.store_url == "memory" and result.evaluated == 3
    assert [r.config for r in result.results] == \
        [result.space.uniform(f) for f in np.linspace(1.0, 0.02, 3)]
    assert not out.exists() and list(tmp_path.iterdir()) == []
    again = run(tiny, tiny_task, strategy="uniform", evaluations=3, out=str(out))
    assert again.evaluated == 3  # nothing resumed: each search has its own memory store
    assert [r.metrics["accuracy"] for r in again.results] == \
        [r.metrics["accuracy"] for r in result.results]


# -- stop reasons -------------------------------------------------------------------------------
def test_stops_finished_at_the_budget(tiny, tiny_task):
    strategy = Scripted([0.9, 0.7, 0.5, 0.3, 0.1])
    result = run(tiny, tiny_task, strategy=strategy, evaluations=2)
    assert result.stopped == "finished" and result.evaluated == 2
    assert [r.config for r in result.results] == [result.space.uniform(f) for f in (0.9, 0.7)]
    assert strategy.asks == 2 and len(strategy.todo) == 3


def test_stops_at_the_time_limit(tiny, tiny_task, monkeypatch):
    none = run(tiny, tiny_task, strategy=Scripted([0.9, 0.5]), evaluations=5, time_limit=1e-9)
    assert none.stopped == "time limit" and none.evaluated == 0 and none.results == []

    # a clock that jumps one second at each tell: the deadline passes after the second result
    real, skipped = time.monotonic, []
    monkeypatch.setattr(time, "monotonic", lambda: real() + len(skipped))

    class Ticking(Scripted):
        def tell(self, results):
            super().tell(results)
            skipped.append(1)

    result = run(tiny, tiny_task, strategy=Ticking([0.9, 0.7, 0.5, 0.3]), evaluations=5,
                 time_limit=1.5)
    assert result.stopped == "time limit" and result.evaluated == 2
    assert [r.config for r in result.results] == [result.space.uniform(f) for f in (0.9, 0.7)]


def test_stops_when_the_strategy_finishes(tiny, tiny_task):
    strategy = Scripted([0.8, 0.4])
    result = run(tiny, tiny_task, strategy=strategy, evaluations=5)
    assert result.stopped == "strategy finished" and result.evaluated == 2
    assert strategy.asks == 3 and strategy.told == result.results


def test_stops_when_the_strategy_is_exhausted(tiny, tiny_task):
    strategy = Repeating()
    result = run(tiny, tiny_task, strategy=strategy, evaluations=5)
    assert result.stopped == "strategy exhausted" and result.evaluated == 1
    assert [r.config for r in result.results] == [result.space.uniform(0.5)]
    assert strategy.asks == 1 + MAX_IDLE_ROUNDS  # one new, then the idle rounds


def test_strategy_interrupt_keeps_results(tiny, tiny_task):
    strategy = Scripted([0.9, 0.6], end=KeyboardInterrupt)
    result = run(tiny, tiny_task, strategy=strategy, evaluations=5)
    assert result.stopped == "interrupted" and result.evaluated == 2
    assert [r.config for r in result.results] == [result.space.uniform(f) for f in (0.9, 0.6)]


def test_evaluator_interrupt_keeps_committed_results(tiny, tiny_task, tmp_path, monkeypatch):
    original = Evaluator.__call__
    calls = []

    def interrupted_third(self, config, *args, **kwargs):
        calls.append(config)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, config, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "__call__", interrupted_third)
    url = f"sqlite:///{tmp_path / 'units.db'}"
    # in process: an isolated evaluation lives in a child, where Ctrl-C reaches the parent too
    result = run(tiny, tiny_task, strategy=Scripted([0.9, 0.7, 0.5, 0.3]), evaluations=5,
                 store=url, isolate=False)
    assert result.stopped == "interrupted" and result.evaluated == 2 and len(calls) == 3
    stored, _ = read_study(url, result.study)
    assert [r.config for r in stored] == calls[:2] == [r.config for r in result.results]


# -- proportional -------------------------------------------------------------------------------
def test_proportional_ranks_follow_channels(deep):
    space = svd_space(deep)
    ranks = {f: {n: c.rank for n, c in proportional(space, f).items()} for f in (0.5, 0.25)}
    assert ranks[0.5] == {"0": 8, "2": 16, "5": 4}  # half of 16, 32 and 8 channels
    assert ranks[0.25] == {"0": 4, "2": 8, "5": 2}
    tucker = RankSpace.discover(deep, torch.zeros(1, 3, 8, 8), methods={"conv2d": ["tucker2"]})
    # every component of its own maximum: (16, 32) → (4, 8); (3, 16) → (0.75, 4) → (1, 4)
    assert proportional(tucker, 0.25) == Config({"0": Choice("tucker2", (1, 4)),
                                                 "2": Choice("tucker2", (4, 8))})


def test_proportional_fits_the_budget_and_the_next_step_breaks_it(deep):
    space = svd_space(deep)
    ctx = context(deep, space, ["params<=0.3"], evaluations=4)
    strategy = Proportional()
    strategy.setup(ctx)
    first = strategy.ask()[0]
    top = fit_to_budget(ctx, strategy.make, strategy.low, strategy.high)
    assert first == proportional(space, top)
    assert ctx.costs.ratio("params", first) <= 0.3
    above = proportional(space, top + 1e-9)
    assert ctx.costs.ratio("params", above) > 0.3
    changed = [n for n in space.names if above[n] != first[n]]
    assert len(changed) == 1  # one site moves up ...
    grid = space.ranks(changed[0], "svd")
    assert grid.index(above[changed[0]].rank) == grid.index(first[changed[0]].rank) + 1  # ... one
    rest = proposals(strategy)
    assert len(rest) == 3 and all(ctx.feasible(c) for c in rest)
    params = [ctx.costs.metrics(c)["params"] for c in [first, *rest]]
    assert params == sorted(params, reverse=True) and len(set(params)) == 4


# -- SweepStrategy ------------------------------------------------------------------------------
class Tenths(SweepStrategy):
    """Site "2" at svd rank round(10 × knob) (at least 1)."""

    name = "tenths"

    def make(self, knob):
        return Config({"2": Choice("svd", max(1, round(10 * knob)))})


def ranks_of(configs):
    return [c["2"].rank for c in configs]


def test_sweep_count_defaults_to_the_budget(deep):
    ctx = context(deep, svd_space(deep), evaluations=3)
    sweep = Tenths()
    sweep.setup(ctx)
    assert ranks_of(proposals(sweep)) == [10, 5, 1]  # knobs 1.0, 0.51, 0.02
    sweep = Tenths(count=5)
    sweep.setup(ctx)
    assert ranks_of(proposals(sweep)) == [10, 8, 5, 3, 1]  # knobs 1.0, 0.755, 0.51, 0.265, 0.02
    sweep = Tenths(count=50)
    sweep.setup(ctx)
    assert ranks_of(proposals(sweep)) == list(range(10, 0, -1))  # duplicates proposed once


def test_sweep_points_most_expensive_first_then_stop(deep):
    ctx = context(deep, svd_space(deep), ["params<=0.01"])
    sweep = Tenths(points=[0.3, 0.9, 0.61, 0.6], count=1)
    sweep.setup(ctx)
    # points are taken as they are: not cut to count, nor fitted to the budget
    assert ranks_of([sweep.ask()[0] for _ in range(3)]) == [9, 6, 3]
    with pytest.raises(StopSearch):
        sweep.ask()
    with pytest.raises(StopSearch):
        sweep.ask()


def test_sweep_starts_at_the_largest_feasible_knob(deep):
    space = svd_space(deep)
    ctx = context(deep, space, ["params<=0.6"], evaluations=4)
    sweep = Tenths()
    sweep.setup(ctx)
    # params ≤ 0.6 leaves site "2" svd rank ≤ 5, so the top knob is just under 0.55; the
    # knobs 0.55, 0.373, 0.197, 0.02 give ranks 5, 4, 2, 1
    assert ranks_of(proposals(sweep)) == [5, 4, 2, 1]
    assert ctx.feasible(sweep.make(0.5)) and not ctx.feasible(sweep.make(0.6))


# -- largest_true and fit_to_budget -------------------------------------------------------------
def test_largest_true_bisects_to_the_boundary():
    calls = []

    def below(x):
        calls.append(x)
        return x <= 0.3

    assert largest_true(below, 0.0, 1.0, iters=5) == 0.28125  # 0.5 0.25 0.375 0.3125 0.28125
    assert calls == [1.0, 0.5, 0.25, 0.375, 0.3125, 0.28125]
    x = largest_true(below, 0.0, 1.0)
    assert 0.3 - 2**-40 <= x <= 0.3


def test_largest_true_ends():
    calls = []
    assert largest_true(lambda x: calls.append(x) or True, 0.2, 0.7) == 0.7 and calls == [0.7]
    calls.clear()
    assert largest_true(lambda x: calls.append(x) or False, 0.2, 0.7, iters=8) == 0.2
    assert len(calls) == 9 and 0.2 not in calls  # ok(lo) is never asked


def test_fit_to_budget_meets_it_and_the_next_knob_does_not(deep):
    space = svd_space(deep)
    ctx = context(deep, space, ["params<=0.4"])
    knob = fit_to_budget(ctx, space.uniform, 0.02, 1.0)
    assert ctx.feasible(space.uniform(knob))
    assert ctx.costs.ratio("params", space.uniform(knob)) <= 0.4
    assert not ctx.feasible(space.uniform(knob + 1e-9))
    coarse = fit_to_budget(ctx, space.uniform, 0.02, 1.0, iters=3)
    assert ctx.feasible(space.uniform(coarse))
    assert 0 <= knob - coarse < 0.98 / 2**3  # within the bisection's tolerance after 3 halvings
    assert fit_to_budget(context(deep, space), space.uniform, 0.02, 1.0) == 1.0
    assert fit_to_budget(context(deep, space, ["params<=1e-6"]), space.uniform, 0.02, 1.0) == 0.02


# -- knee ---------------------------------------------------------------------------------------
def point(tag: str, accuracy: float, flops: float, **more) -> Result:
    status = more.pop("status", "ok")
    return Result(Config(), {"accuracy": accuracy, "flops": flops, **more}, status, proxy=tag)


def test_knee_is_farthest_from_the_chord():
    # normalized cost form: a (1, 0), b (1/9, 1/9), c (0, 1); b lies 7/9 / √2 below the chord
    results = [point("a", 0.5, 1.0), point("b", 0.9, 2.0), point("c", 0.95, 10.0)]
    assert knee(results, OBJECTIVES).proxy == "b"
    # normalization: scaling flops changes nothing
    scaled = [point(r.proxy, r.metrics["accuracy"], r.metrics["flops"] * 1e9) for r in results]
    assert knee(scaled, OBJECTIVES).proxy == "b"
    # a sharper bend wins: (0.88, 1.2) normalizes to (0.07/0.45, 0.2/9), sum 0.18 < b's 2/9
    assert knee([*results, point("d", 0.88, 1.2)], OBJECTIVES).proxy == "d"


def test_knee_ignores_failed_and_dominated_results():
    results = [point("a", 0.5, 1.0), point("b", 0.9, 2.0), point("c", 0.95, 10.0),
               point("dominated", 0.6, 5.0),
               point("failed", 0.99, 0.5, status="failed")]
    assert knee(results, OBJECTIVES).proxy == "b"


def test_knee_edge_cases():
    line = [point("a", 0.5, 1.0), point("b", 0.75, 2.0), point("c", 1.0, 3.0)]
    assert knee(line, OBJECTIVES).proxy == "a"  # no bend: the cheapest extreme
    assert knee(list(reversed(line)), OBJECTIVES).proxy == "a"  # front order, not input order
    twins = [point("first", 0.7, 3.0), point("second", 0.7, 3.0)]
    assert knee(twins, OBJECTIVES).proxy == "first"
    assert knee(twins[::-1], OBJECTIVES).proxy == "second"
    assert knee(line, parse_objectives("accuracy")).proxy == "c"
    three = parse_objectives(("accuracy", "flops", "params"))
    cube = [point("a", 0.5, 1.0, params=1.0), point("b", 0.9, 2.0, params=2.0),
            point("c", 0.95, 10.0, params=10.0)]
    assert knee(cube, three).proxy == "b"  # nearest the ideal corner
    with pytest.raises(ConstraintError, match="no knee"):
        knee([point("x", 0.9, 1.0, status="failed")], OBJECTIVES)
    with pytest.raises(ConstraintError, match="no knee"):
        knee([point("x", 0.9, 1.0)], parse_objectives(("accuracy", "params")))
