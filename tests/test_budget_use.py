"""Every strategy uses its whole budget while unevaluated feasible configs remain, and random
samples uniformly among the feasible configs."""

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from torch import nn
from torch.utils.data import TensorDataset

import ranksearch
from ranksearch.config import Config
from ranksearch.constraints import parse_constraints
from ranksearch.pareto import parse_objectives
from ranksearch.strategy import SearchContext, StopSearch, available_strategies

ZERO = ranksearch.ProxySettings(steps=0)
LIMIT = "flops<=0.6"
#: options that keep each strategy's own search small on the tiny model
SMALL = {"beam": {"width": 1, "moves": 2}, "nsga2": {"pop_size": 4}, "rl": {"warmup": 2}}


def classifier() -> tuple[nn.Module, ranksearch.Task]:
    """A three-layer MLP trained a little on a synthetic 4-class problem."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(192, 12, generator=g)
    y = (x[:, :4] * torch.tensor([2.0, 1.0, -1.0, 0.5])).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                          nn.Linear(24, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:128]), y[:128]).backward()
        opt.step()
    task = ranksearch.Task("mlp4", TensorDataset(x[:128], y[:128]),
                           TensorDataset(x[128:], y[128:]), loss=nn.functional.cross_entropy)
    return model.eval(), task


@pytest.fixture(scope="module")
def mlp():
    model, task = classifier()
    space = ranksearch.RankSpace.discover(model, task.example_input(), max_choices=4)
    return model, task, space


def all_configs(space) -> list[Config]:
    return [Config(dict(zip(space.names, combo, strict=True)))
            for combo in itertools.product(*(space.choices(n) for n in space.names))]


def context(space, constraints=(LIMIT,), seed=0) -> SearchContext:
    return SearchContext(space=space, costs=ranksearch.CostModel(space), cache=None,
                         constraints=parse_constraints(list(constraints)),
                         objectives=parse_objectives(("accuracy", "flops")),
                         rng=np.random.default_rng(seed), evaluations=10)


def feasible_configs(space) -> list[Config]:
    ctx = context(space)
    return [c for c in all_configs(space) if ctx.feasible(c)]


def test_the_small_space_has_a_known_feasible_count(mlp):
    _, _, space = mlp
    configs, feasible = all_configs(space), feasible_configs(space)
    assert len(configs) == np.prod([len(space.choices(n)) for n in space.names])
    assert 10 < len(feasible) < len(configs)  # the constraint cuts, and enough are left


@pytest.mark.parametrize("name", sorted(set(available_strategies()) - {"bayes_tt"}))
def test_no_strategy_ends_below_its_budget(mlp, name):
    """bayes_tt is left out: it needs TT sites and trains; it proposes its one config."""
    model, task, space = mlp
    budget = len(feasible_configs(space)) - 2
    result = ranksearch.search(model, task, strategy=name, strategy_options=SMALL.get(name),
                               evaluations=budget, proxy=ZERO, space=space, store="memory",
                               constraints=[LIMIT])
    assert result.stopped == "finished", result.stopped
    assert result.evaluated == budget


@pytest.mark.parametrize("name", ["uniform", "pca_energy", "random", "optuna", "auto"])
def test_past_the_space_every_feasible_config_is_evaluated(mlp, name):
    model, task, space = mlp
    feasible = {c.key for c in feasible_configs(space)}
    result = ranksearch.search(model, task, strategy=name, evaluations=len(feasible) + 20,
                               proxy=ZERO, space=space, store="memory", constraints=[LIMIT])
    scored = {r.config.key for r in result.results if r.partial is None}
    assert feasible <= scored
    assert result.stopped in ("strategy finished", "strategy exhausted")


def test_random_is_uniform_over_feasible_configs(mlp):
    _, _, space = mlp
    feasible = feasible_configs(space)
    index = {c: i for i, c in enumerate(feasible)}
    draws = 20 * len(feasible)
    counts = np.zeros(len(feasible))
    for seed in range(draws):  # the first draw of a fresh search, seed after seed
        strategy = ranksearch.load_strategy("random")
        strategy.setup(context(space, seed=seed))
        (config,) = strategy.ask()
        counts[index[config]] += 1  # a KeyError here is an infeasible draw
    assert chisquare(counts).pvalue > 1e-3
    # the old repair toward the cheapest ranks put about twice its share on the cheapest
    costs = ranksearch.CostModel(space)
    cheapest = min(feasible, key=lambda c: costs.ratio("flops", c))
    assert counts[index[cheapest]] < 2 * draws / len(feasible)


def test_random_proposes_each_feasible_config_once_then_stops(mlp):
    _, _, space = mlp
    strategy = ranksearch.load_strategy("random", {"batch": 7})
    strategy.setup(context(space))
    seen = []
    with pytest.raises(StopSearch):
        for _ in range(1000):
            seen += strategy.ask()
    assert sorted(c.key for c in seen) == sorted(c.key for c in feasible_configs(space))


def test_a_deterministic_strategy_stops_when_asked_to(mlp):
    model, task, space = mlp
    refined = ranksearch.search(model, task, strategy="uniform", evaluations=12, proxy=ZERO,
                                space=space, store="memory", constraints=[LIMIT])
    stopped = ranksearch.search(model, task, strategy="uniform",
                                strategy_options={"refine": False, "count": 3}, evaluations=12,
                                proxy=ZERO, space=space, store="memory", constraints=[LIMIT])
    assert refined.evaluated == 12
    assert stopped.stopped == "strategy finished" and stopped.evaluated <= 3
    # the handover keeps what the sweep proposed and adds only feasible configs
    ctx = context(space)
    assert all(ctx.feasible(r.config) for r in refined.results)
