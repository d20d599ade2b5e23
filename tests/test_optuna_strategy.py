import numpy as np
import pytest
import torch
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState
from ranksearch_strategies.optuna import OptunaSampler
from torch import nn

import ranksearch
from ranksearch.cache import FactorCache
from ranksearch.constraints import parse_constraints
from ranksearch.cost import CostModel
from ranksearch.errors import RankSearchError
from ranksearch.evaluate import ProxySettings
from ranksearch.pareto import parse_objectives
from ranksearch.result import Result
from ranksearch.space import RankSpace
from ranksearch.strategy import SearchContext

ZERO_SHOT = ProxySettings(steps=0)
BUDGET = ["flops<=0.4"]


def search(model, task, out, strategy, evaluations):
    return ranksearch.search(model, task, strategy=strategy, evaluations=evaluations, seed=1,
                             proxy=ZERO_SHOT, out=str(out), constraints=BUDGET)


def infeasible(trial) -> bool:
    return any(v > 0 for v in trial.constraints.values())


def test_tpe_meets_the_budget_and_resumes(digits_model, digits, tmp_path):
    first = OptunaSampler("tpe")
    a = search(digits_model, digits, tmp_path, first, 8)
    assert a.evaluated == 8 and a.stopped == "finished"
    assert all(r.metrics["flops_ratio"] <= 0.4 for r in a.results)
    assert a.front()
    # sampled configs over the budget were told back as infeasible, never evaluated
    trials = first.study.trials
    rejected = [t for t in trials if infeasible(t)]
    assert rejected and all(t.state == TrialState.COMPLETE and t.values[0] == 0.0
                            for t in rejected)
    stored = {r.config.key for r in a.results}
    assert not {first.config_of(t.params).key for t in rejected} & stored
    assert [first.config_of(t.params) for t in trials if not infeasible(t)] == \
        [r.config for r in a.results]
    # the same search again evaluates nothing; a larger budget replays, then goes on
    again = search(digits_model, digits, tmp_path, OptunaSampler("tpe"), 8)
    assert again.evaluated == 0 and again.results == a.results
    longer = OptunaSampler("tpe")
    more = search(digits_model, digits, tmp_path, longer, 12)
    assert more.evaluated == 4 and more.results[:8] == a.results
    replayed = [longer.config_of(t.params) for t in longer.study.trials if not infeasible(t)]
    assert replayed[:8] == [r.config for r in a.results]
    assert all(r.metrics["flops_ratio"] <= 0.4 for r in more.results)


@pytest.mark.parametrize("sampler", ["gp", "nsga2", "qmc", "random"])
def test_other_samplers(digits_model, digits, tmp_path, sampler):
    a = search(digits_model, digits, tmp_path, OptunaSampler(sampler), 6)
    assert a.evaluated == 6 and a.front()
    assert all(r.metrics["flops_ratio"] <= 0.4 for r in a.results)
    again = search(digits_model, digits, tmp_path, OptunaSampler(sampler), 6)
    assert again.evaluated == 0


def test_by_name_without_constraints(digits_model, digits, tmp_path):
    result = ranksearch.search(digits_model, digits, strategy="optuna", evaluations=6, seed=0,
                               proxy=ZERO_SHOT, out=str(tmp_path),
                               strategy_options={"sampler": "tpe", "encoding": "categorical"})
    assert result.evaluated == 6 and len(result.front()) >= 2


@pytest.fixture
def ctx():
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(32, 32) for _ in range(3)))
    space = RankSpace.discover(model, torch.zeros(1, 32), max_choices=8)
    return SearchContext(space=space, costs=CostModel(space), cache=FactorCache(model, space),
                         constraints=parse_constraints(["params<=0.6"]),
                         objectives=parse_objectives(["accuracy", "flops"]),
                         rng=np.random.default_rng(0), evaluations=8)


def test_tell_maps_states(ctx):
    strategy = OptunaSampler("random", batch=4, sampler_options={"seed": 5})
    strategy.setup(ctx)
    configs = strategy.ask()
    assert len(set(configs)) == 4 and all(ctx.feasible(c) for c in configs)
    costs = [ctx.costs.metrics(c) for c in configs]
    strategy.tell([
        Result(configs[0], {**costs[0], "accuracy": 0.8}),
        Result(configs[1], costs[1], "failed", "diverged"),
        Result(configs[2], {**costs[2], "accuracy": 0.3}, "pruned"),
    ])
    again = strategy.ask()  # the unanswered one is proposed again, with three new ones
    assert again[0] == configs[3] and len(again) == 4
    trials = strategy.study.trials
    told = [t for t in trials if t.state != TrialState.RUNNING and not infeasible(t)]
    assert [t.state for t in told] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED]
    assert told[0].values == [0.8, costs[0]["flops"]]
    assert list(told[0].constraints) == ["params<=0.6x"]
    assert told[0].constraints["params<=0.6x"] == pytest.approx(
        (costs[0]["params_ratio"] - 0.6) / 0.6)
    assert any(infeasible(t) for t in trials)
    for t in trials:
        if infeasible(t):  # sampled over the budget: told at once, worst accuracy
            config = strategy.config_of(t.params)
            assert not ctx.feasible(config)
            assert t.values == [0.0, ctx.costs.metrics(config)["flops"]]
    assert isinstance(trials[0].distributions[ctx.space.names[0]], IntDistribution)


def test_categorical_encoding(ctx):
    strategy = OptunaSampler("tpe", encoding="categorical", dense=False, cheaper=False)
    strategy.setup(ctx)
    strategy.ask()
    name = ctx.space.names[0]
    dist = strategy.study.trials[0].distributions[name]
    assert isinstance(dist, CategoricalDistribution)
    assert list(dist.choices) == list(range(len(ctx.space.choices(name)) - 1))


def test_bad_options():
    with pytest.raises(RankSearchError, match="unknown sampler"):
        OptunaSampler("cma")
    with pytest.raises(RankSearchError, match="bad sampler_options"):
        OptunaSampler("tpe", sampler_options={"no_such_option": 1})
    with pytest.raises(RankSearchError, match="batch"):
        OptunaSampler(batch=0)
    with pytest.raises(RankSearchError, match="encoding"):
        OptunaSampler(encoding="float")
