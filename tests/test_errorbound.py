import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import proposals
from ranksearch_strategies.errorbound import ErrorBound, PCAEnergy
from ranksearch_strategies.vbmf import VBMF
from torch import nn

import ranksearch
from ranksearch.cache import FactorCache
from ranksearch.config import Choice, Config
from ranksearch.constraints import parse_constraints
from ranksearch.cost import CostModel
from ranksearch.errors import RankSearchError
from ranksearch.evaluate import ProxySettings
from ranksearch.pareto import parse_objectives
from ranksearch.space import RankSpace
from ranksearch.strategy import SearchContext, fit_to_budget, load_strategy

BUDGETS = ["flops<=0.3", "flops<=0.5", "params<=0.4"]


@pytest.fixture(scope="module")
def parts(digits_model, digits):
    space = RankSpace.discover(digits_model, digits.example_input())
    return space, CostModel(space), FactorCache(digits_model, space)


def context(parts, constraints=(), evaluations=12):
    space, costs, cache = parts
    return SearchContext(space=space, costs=costs, cache=cache,
                         constraints=parse_constraints(constraints),
                         objectives=parse_objectives(("accuracy", "flops")),
                         rng=np.random.default_rng(0), evaluations=evaluations)


def started(strategy, ctx):
    strategy.setup(ctx)
    return strategy


def spectra(model, name):
    """Per rank component, the singular values that decide it (written out independently):
    tucker2 (in, out) from the channel unfoldings, svd from the weight matrix."""
    w = model.get_submodule(name).weight.detach().double()
    if w.dim() == 2:
        return [torch.linalg.svdvals(w).numpy()]
    return [torch.linalg.svdvals(w.transpose(0, 1).reshape(w.shape[1], -1)).numpy(),
            torch.linalg.svdvals(w.reshape(w.shape[0], -1)).numpy()]


def components(space, name):
    """The values each rank component takes on the site's grid."""
    grid = space.ranks(name, space.site(name).methods[0])
    if isinstance(grid[0], int):
        return [list(grid)]
    return [sorted({g[i] for g in grid}) for i in range(len(grid[0]))]


# -- error bound ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(parts, digits_model):
    """For every site and rank component: (grid values, σ_{r+1}/σ_1 at each)."""
    space = parts[0]
    out = {}
    for name in space.names:
        out[name] = []
        for s, values in zip(spectra(digits_model, name), components(space, name),
                             strict=True):
            out[name].append((values, [s[v] / s[0] if v < len(s) else 0.0 for v in values]))
    return out


def reference_config(space, reference, eps):
    """Every component at its smallest grid value whose error is at most ``eps``; at the top
    of its grid where none is (the grid stops below full rank where full rank would cost as
    much as the dense layer, so its top need not be exact)."""
    choices = {}
    for name, tables in reference.items():
        parts = tuple(min((v for v, e in zip(values, errs, strict=True) if e <= eps),
                          default=values[-1])
                      for values, errs in tables)
        choices[name] = Choice(space.site(name).methods[0],
                               parts[0] if len(parts) == 1 else parts)
    return Config(choices)


def grid_end(space, i):
    """Every site at rank ``i`` of its first method's grid (0: the bottom, -1: the top)."""
    return Config({n: Choice(m, space.ranks(n, m)[i])
                   for n in space.names for m in space.site(n).methods[:1]})


@pytest.mark.parametrize("budget", BUDGETS)
def test_error_bound_is_tight_and_meets_the_budget(parts, reference, budget):
    space, costs, _ = parts
    (con,) = parse_constraints([budget])
    strategy = started(ErrorBound(), context(parts, [budget]))
    chosen = strategy.ask()[0]
    assert con.satisfied(costs.metrics(chosen))
    # tight: ε* is the smallest breakpoint of ε whose config meets the budget, so the config
    # at the next breakpoint below it (the next step up in rank) breaks it
    breakpoints = sorted({e for tables in reference.values() for _, errs in tables
                          for e in errs}, reverse=True)
    feasible = [con.satisfied(costs.metrics(reference_config(space, reference, e)))
                for e in breakpoints]
    k = feasible.index(False) - 1
    assert k >= 0 and not any(feasible[k + 1:])
    assert chosen == reference_config(space, reference, breakpoints[k])
    assert not con.satisfied(costs.metrics(reference_config(space, reference, breakpoints[k + 1])))
    assert strategy.breakpoints == pytest.approx(breakpoints)
    # every component holds the bound, at the smallest grid value that does; one that no
    # grid value holds (the grid stops short of full rank, where it costs as much as dense)
    # sits at the top of its grid
    eps = breakpoints[k]
    for name, choice in chosen.items():
        ranks = choice.rank if isinstance(choice.rank, tuple) else (choice.rank,)
        errors = []
        for (values, errs), r in zip(reference[name], ranks, strict=True):
            i = values.index(r)
            if errs[i] <= eps:
                assert i == 0 or errs[i - 1] > eps
            else:
                assert i == len(values) - 1 and min(errs) > eps
            errors.append(errs[i])
        assert strategy.error(name, choice.rank) == pytest.approx(max(errors))


def test_error_bound_traces_a_front(parts):
    space, costs, _ = parts
    strategy = started(ErrorBound(), context(parts))
    configs = proposals(strategy)
    flops = [costs.metrics(c)["flops"] for c in configs]
    assert len(configs) == 12 and all(a > b for a, b in itertools.pairwise(flops))
    # the smallest ε puts every site at the top of its grid (short of full rank where that
    # would cost as much as the dense layer), the largest at its bottom
    assert configs[0] == grid_end(space, -1) != space.full()
    assert configs[-1] == grid_end(space, 0)
    fixed = started(ErrorBound(thresholds=[0.3, 0.1]), context(parts))
    assert proposals(fixed) == [strategy.config_at(0.1), strategy.config_at(0.3)]


# -- PCA energy -----------------------------------------------------------------------------
def kept_energy(model, space, config):
    """Π over sites of Σ_{i≤r} σ_i² / Σ σ_i² (tucker2: over both unfoldings)."""
    total = 1.0
    for name, choice in config.items():
        ranks = choice.rank if isinstance(choice.rank, tuple) else (choice.rank,)
        for s, r in zip(spectra(model, name), ranks, strict=True):
            total *= float(np.sum(s[:r] ** 2) / np.sum(s**2))
    return total


@pytest.mark.parametrize("budget", BUDGETS)
def test_pca_energy_meets_the_budget_and_beats_uniform(parts, digits_model, budget):
    space, costs, _ = parts
    (con,) = parse_constraints([budget])
    ctx = context(parts, [budget])
    strategy = started(PCAEnergy(), ctx)
    chosen = strategy.ask()[0]
    spent = costs.metrics(chosen)
    assert con.satisfied(spent)
    energy = kept_energy(digits_model, space, chosen)
    assert strategy.energy(chosen) == pytest.approx(energy, rel=1e-9)
    # no single site can take one more grid step within the budget
    for name, choice in chosen.items():
        grid = space.ranks(name, choice.method)
        i = grid.index(choice.rank)
        if i + 1 < len(grid):
            assert not ctx.feasible(chosen.with_choices({name: Choice(choice.method, grid[i + 1])}))
    # the uniform config at the same or lower cost keeps less energy
    same = parse_constraints([f"{con.metric}<={spent[con.metric]}"])
    fraction = fit_to_budget(context(parts, same), space.uniform, 0.02, 1.0)
    uniform = space.uniform(fraction)
    assert costs.metrics(uniform)[con.metric] <= spent[con.metric]
    assert energy >= kept_energy(digits_model, space, uniform)


def test_pca_energy_path_rises_in_energy_and_cost(parts, digits_model):
    space, costs, _ = parts
    strategy = started(PCAEnergy(metric="params"), context(parts))
    path = strategy.path
    params = [costs.metrics(c)["params"] for c in path]
    energy = [strategy.energy(c) for c in path]
    assert all(a < b for a, b in itertools.pairwise(params))
    assert all(a <= b * (1 + 1e-12) for a, b in itertools.pairwise(energy))
    # from every site at the bottom of its grid to every site at the top (short of full
    # rank where that would cost as much as the dense layer, so some energy is left out)
    assert path[0] == grid_end(space, 0) and path[-1] == grid_end(space, -1)
    assert energy[-1] == pytest.approx(kept_energy(digits_model, space, path[-1]), rel=1e-9)
    assert 0.5 < energy[-1] < 1.0 and energy[0] < 0.2
    configs = proposals(strategy)
    spent = [costs.metrics(c)["params"] for c in configs]
    assert len(configs) == 12 and configs[0] == path[-1]
    assert all(a > b for a, b in itertools.pairwise(spent)) and configs[-1] == path[0]


# -- all three ------------------------------------------------------------------------------
def test_bad_options_are_clear_errors():
    for name, options, match in [
        ("errorbound", {"thresholds": [1.5]}, "thresholds"),
        ("errorbound", {"thresholds": ["x"]}, "thresholds"),
        ("errorbound", {"method": "tr"}, "matrix"),
        ("pca_energy", {"metric": "accuracy"}, "metric"),
        ("pca_energy", {"count": -1}, "count"),
        ("pca_energy", {"beam": 3}, "bad options"),
    ]:
        with pytest.raises(RankSearchError, match=match):
            load_strategy(name, options)


def test_zero_layer_and_tt_sites(caplog):
    """A layer of zeros gets its smallest rank; a TT site stays dense, with a note; a space
    of TT sites only is a clear error."""
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 6))
    with torch.no_grad():
        model[0].weight.zero_()
    space = RankSpace.discover(model, torch.zeros(1, 12), methods=["svd"])
    parts = (space, CostModel(space), FactorCache(model, space))
    for strategy in (ErrorBound(), PCAEnergy(), VBMF(one_shot=True)):
        config = proposals(started(strategy, context(parts, ["params<=0.8"])))[0]
        assert config["0"] == Choice("svd", 1), strategy.name
        assert strategy.name == "vbmf" or config["2"].rank > 1
    sites = tuple(replace(s, methods=("tt",)) if s.name == "0" else s for s in space.sites)
    mixed = RankSpace(sites, model_params=space.model_params)
    mixed_parts = (mixed, CostModel(mixed), FactorCache(model, mixed))
    for strategy in (ErrorBound(), PCAEnergy(), VBMF()):
        with caplog.at_level("INFO"):  # logged by ranksearch.vbmf.spectral_sites
            config = proposals(started(strategy, context(mixed_parts)))[0]
        # unconstrained, "2" (8 → 6) goes to the top of its grid: svd:3, the largest rank
        # that costs less than the dense layer
        assert mixed.ranks("2", "svd")[-1] == 3
        assert "0" not in config and config["2"] == Choice("svd", 3), strategy.name
    assert "0 stays dense (tt ranks are not matrix ranks)" in caplog.text
    tt = RankSpace.discover(model, torch.zeros(1, 12), methods=["tt"])
    with pytest.raises(RankSearchError, match="spectrum"):
        started(ErrorBound(), context((tt, CostModel(tt), FactorCache(model, tt))))


@pytest.mark.parametrize("strategy", ["errorbound", "pca_energy"])
def test_end_to_end_search(digits_model, digits, tmp_path, strategy):
    proxy = ProxySettings(steps=0, eval_batches=2)
    result = ranksearch.search(digits_model, digits, strategy=strategy, evaluations=4,
                               proxy=proxy, out=str(tmp_path), constraints=["flops<=0.4"])
    assert len(result.results) == 4 and all(r.ok for r in result.results)
    assert all(r.metrics["flops_ratio"] <= 0.4 for r in result.results)
    assert result.front()
    free = ranksearch.search(digits_model, digits, strategy=strategy, evaluations=3,
                             proxy=proxy, out=str(tmp_path / "free"))
    assert len(free.front()) >= 2
    # the front reaches the top of every grid, which costs less than the dense model (the
    # full ranks would cost more)
    top = CostModel(free.space).metrics(grid_end(free.space, -1))["flops_ratio"]
    assert math.isclose(max(r.metrics["flops_ratio"] for r in free.results), top)
    assert top < 1 < CostModel(free.space).metrics(free.space.full())["flops_ratio"]
