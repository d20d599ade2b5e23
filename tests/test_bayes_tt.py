"""Bayesian TT ranks: the prior, planted-rank recovery, the strength knob, the search."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ranksearch_strategies.bayes_tt import BayesTT, MapSettings, Prior, grid_rank, infer_ranks
from torch import nn
from torch.utils.data import TensorDataset

import ranksearch
from ranksearch.cache import FactorCache
from ranksearch.errors import RankSearchError
from ranksearch.evaluate import ProxySettings
from ranksearch.factorize.tt import TTLinear
from ranksearch.space import RankSpace
from ranksearch.strategy import Training, load_strategy
from ranksearch.task import Task

PLANTED = (2, 3)


@pytest.fixture(scope="module")
def planted():
    """A Linear 64 → 64 fitted by least squares to noisy samples of a TT-matrix with modes
    (4, 4, 4) and ranks (2, 3): its weight is full rank, the signal is not."""
    g = torch.Generator().manual_seed(0)
    target = TTLinear((4, 4, 4), (4, 4, 4), PLANTED, bias=False)
    with torch.no_grad():
        for core in target.cores:
            core.weight.copy_(torch.randn(core.weight.shape, generator=g) / core.in_features**0.5)
        weight = target(torch.eye(64)).T
    x = torch.randn(768, 64, generator=g)
    y = x @ weight.T + 0.1 * torch.randn(768, 64, generator=g)
    layer = nn.Linear(64, 64)
    fit = torch.linalg.lstsq(torch.cat([x[:512], torch.ones(512, 1)], 1), y[:512]).solution
    with torch.no_grad():
        layer.weight.copy_(fit[:64].T)
        layer.bias.copy_(fit[64])
    model = nn.Sequential(layer)
    task = Task(
        "planted",
        TensorDataset(x[:512], y[:512]),
        TensorDataset(x[512:], y[512:]),
        loss=F.mse_loss,
        num_classes=64,
    )
    space = RankSpace.discover(model, torch.zeros(1, 64), methods=["tt"])
    return model, task, space


@pytest.mark.parametrize("kind", ["half_cauchy", "log_uniform"])
def test_closed_form_variance_minimizes_the_prior(kind):
    prior = Prior(kind, eta=0.7)
    m = torch.tensor([1e-6, 0.03, 1.0, 40.0], dtype=torch.float64)
    lam = prior.variance(m, 50)
    for i in range(len(m)):
        best = prior.nll(m[i : i + 1], lam[i : i + 1], 50)
        for factor in (0.98, 1.02):
            assert best < prior.nll(m[i : i + 1], lam[i : i + 1] * factor, 50)


def test_recovers_planted_tt_ranks_and_a_stronger_prior_prunes_more(planted):
    model, task, space = planted
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training = Training.of(model, task, FactorCache(model, space))
    none = infer_ranks(training, space, 0.0)["0"]
    ranks = {s: infer_ranks(training, space, s)["0"] for s in (1e-3, 1e-2, 0.3)}
    assert none == (16, 16)  # without the prior the noise keeps every slice
    for s in (1e-3, 1e-2):
        assert all(abs(r - p) <= 1 for r, p in zip(ranks[s], PLANTED, strict=True)), ranks
    assert all(a <= b for a, b in zip(ranks[0.3], ranks[1e-2], strict=True))
    assert sum(ranks[0.3]) < sum(ranks[1e-2])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_log_uniform_prior_recovers_too(planted):
    model, task, space = planted
    training = Training.of(model, task, FactorCache(model, space))
    ranks = infer_ranks(training, space, 1e-2, MapSettings(Prior("log_uniform")))["0"]
    assert all(abs(r - p) <= 1 for r, p in zip(ranks, PLANTED, strict=True)), ranks


def space_model(space):
    return nn.Sequential(nn.Linear(64, 64))


def test_grid_rank_rounds_up_along_the_grid(planted):
    _, _, space = planted
    grid = space.ranks("0", "tt")
    assert grid_rank(space, "0", (2, 3)) == (3, 3)
    assert grid_rank(space, "0", (1, 1)) == grid[0]
    # the grid stops below TT ranks that cost as much as the dense 64 x 64 layer
    assert grid_rank(space, "0", (16, 5)) == grid[-1] == (15, 15)
    dearer = RankSpace.discover(space_model(space), torch.zeros(1, 64), methods=["tt"],
                                dearer=True)
    assert grid_rank(dearer, "0", (16, 5)) == dearer.ranks("0", "tt")[-1] == (16, 16)


def test_needs_tt_in_the_space(digits_model, digits, tmp_path):
    with pytest.raises(RankSearchError, match="methods including 'tt'"):
        ranksearch.search(
            digits_model,
            digits,
            strategy="bayes_tt",
            evaluations=2,
            proxy=ProxySettings(steps=0),
            out=str(tmp_path),
        )


@pytest.mark.parametrize(
    "options",
    [
        {"strengths": []},
        {"strengths": [-1.0]},
        {"prior": "laplace"},
        {"eta": 0.0},
        {"steps": 0},
        {"lr": 0.0},
        {"batch_size": 0},
        {"threshold": 1.0},
        {"max_rank": 0},
    ],
)
def test_bad_options(options):
    with pytest.raises(RankSearchError):
        BayesTT(**options)


# a capped, short MAP run: ranks ≤ 8 per bond, so the prior must be strong to prune
FAST = {"strengths": [0.3, 3.0], "steps": 30, "max_rank": 8, "lr": 0.03}


def test_search_traces_a_front_and_meets_a_budget(digits_model, digits, tmp_path):
    kw = dict(
        strategy="bayes_tt",
        strategy_options=FAST,
        methods=["svd", "tt"],
        proxy=ProxySettings(steps=0),
        evaluations=8,
    )
    free = ranksearch.search(digits_model, digits, out=str(tmp_path / "free"), **kw)
    assert free.stopped == "strategy finished" and len(free.results) == 2
    assert free.front() and all(r.ok for r in free.results)
    configs = [r.config for r in free.results]
    assert all(c.method == "tt" for config in configs for c in config.values())
    flops = [r.metrics["flops_ratio"] for r in free.results]
    assert flops[0] > flops[1]  # the weaker prior keeps more
    again = ranksearch.search(digits_model, digits, out=str(tmp_path / "free"), **kw)
    assert again.evaluated == 0 and [r.config for r in again.results] == configs  # seeded
    budget = ranksearch.search(
        digits_model,
        digits,
        constraints=[f"flops<={flops[1] / 2:.4f}"],
        out=str(tmp_path / "budget"),
        **kw,
    )
    assert budget.results and all(r.ok for r in budget.results)
    assert all(r.metrics["flops_ratio"] <= flops[1] / 2 for r in budget.results)


def test_loads_by_name():
    strategy = load_strategy("bayes_tt", {"strengths": [1, 0.1], "prior": "log_uniform"})
    assert isinstance(strategy, BayesTT) and strategy.strengths == [0.1, 1.0]
