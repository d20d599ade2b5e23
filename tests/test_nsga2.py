import numpy as np
import pytest
import torch
from ranksearch_strategies.baselines import Random
from ranksearch_strategies.nsga2 import NSGA2, MissingValues, narrow, site_choices
from torch import nn

import ranksearch
from ranksearch.cache import FactorCache
from ranksearch.config import Choice, Config
from ranksearch.constraints import parse_constraints
from ranksearch.cost import CostModel
from ranksearch.errors import RankSearchError
from ranksearch.evaluate import ProxySettings
from ranksearch.pareto import Objective, front, hypervolume, parse_objectives
from ranksearch.result import Result
from ranksearch.space import RankSpace
from ranksearch.strategy import SearchContext, StopSearch, Strategy

OBJECTIVES = ("accuracy", "flops")
WEIGHTS = (0.3, 0.2, 0.1, 0.05, 0.02)


@pytest.fixture(scope="module")
def synthetic():
    """Five 32×32 linear layers with 8 SVD ranks each (9 choices with dense: 59,049 configs)
    and accuracy = 1 − Σ w_l (1 − r_l/32)²; dense counts as full rank.

    The space keeps the ranks that cost as much as the dense layer (``dearer=True``: 19 to
    32), so that NSGA2's own filter (`site_choices`, ``cheaper``) has them to leave out,
    leaving it the 4 cheaper ranks and dense, while the random baseline draws from all 9."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(32, 32) for _ in WEIGHTS))
    space = RankSpace.discover(model, torch.zeros(1, 32), max_choices=8, dearer=True)
    assert all(space.ranks(n, "svd") == (1, 5, 10, 14, 19, 23, 28, 32) for n in space.names)
    weights = dict(zip(space.names, WEIGHTS, strict=True))

    def accuracy(config: Config) -> float:
        return 1.0 - sum(w * (1 - config[n].rank / 32) ** 2
                         for n, w in weights.items() if n in config)

    return model, space, CostModel(space), weights, accuracy


def context(synthetic, budget, constraints=(), seed=0):
    model, space, costs, _, _ = synthetic
    return SearchContext(space=space, costs=costs, cache=FactorCache(model, space),
                         constraints=parse_constraints(constraints),
                         objectives=parse_objectives(OBJECTIVES),
                         rng=np.random.default_rng(seed), evaluations=budget)


def drive(strategy: Strategy, ctx: SearchContext, accuracy, max_idle=100) -> list[Result]:
    """The search loop's contract without a model: known configs come back as they were,
    infeasible ones as failed and unevaluated, new ones scored up to the budget."""
    strategy.setup(ctx)
    stored: dict[str, Result] = {}
    idle = 0
    while len(stored) < ctx.evaluations and idle < max_idle:
        try:
            configs = strategy.ask()
        except StopSearch:
            break
        answers, before = [], len(stored)
        for config in configs:
            metrics = ctx.costs.metrics(config)
            if config.key in stored:
                answers.append(stored[config.key])
            elif not ctx.feasible(config):
                answers.append(Result(config, metrics, "failed", "infeasible"))
            elif len(stored) < ctx.evaluations:
                stored[config.key] = Result(config, {**metrics, "accuracy": accuracy(config)})
                answers.append(stored[config.key])
        if answers:
            strategy.tell(answers)
        idle = 0 if len(stored) > before else idle + 1
    return list(stored.values())


def exact_front(synthetic) -> np.ndarray:
    """The exact front (accuracy, flops) by merging the sites' additive trade-offs."""
    _, space, costs, weights, _ = synthetic
    dense = costs.metrics(Config())["flops"]
    points = [(0.0, 0.0)]  # (accuracy lost, flops added to the dense model)
    for name in space.names:
        options = [(0.0 if c.is_dense else weights[name] * (1 - c.rank / 32) ** 2,
                    costs.metrics(Config({name: c}))["flops"] - dense)
                   for c in space.choices(name)]
        merged = sorted({(a + x, b + y) for a, b in points for x, y in options})
        points, lowest = [], np.inf
        for lost, flops in merged:
            if flops < lowest:
                points.append((lost, flops))
                lowest = flops
    return np.array([(1 - lost, dense + flops) for lost, flops in points])


def test_exact_front_is_exact(synthetic):
    _, space, costs, _, accuracy = synthetic
    exact = exact_front(synthetic)
    rng = np.random.default_rng(1)
    for _ in range(300):  # no sampled config beats the exact front
        config = Config({n: space.choices(n)[rng.integers(len(space.choices(n)))]
                         for n in space.names})
        acc, flops = accuracy(config), costs.metrics(config)["flops"]
        assert not ((exact[:, 0] <= acc) & (exact[:, 1] >= flops)
                    & ((exact[:, 0] < acc) | (exact[:, 1] > flops))).any()
    full = Config({n: space.choices(n)[0] for n in space.names})  # every site at rank 1
    assert np.isclose(exact, [accuracy(full), costs.metrics(full)["flops"]]).all(axis=1).any()


def reference(synthetic):
    _, _, costs, weights, _ = synthetic
    return (1 - sum(weights.values()), costs.metrics(Config())["flops"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reaches_90_percent_of_the_exact_hypervolume(synthetic, seed):
    ref = reference(synthetic)
    target = hypervolume(exact_front(synthetic), OBJECTIVES, ref)
    found = drive(NSGA2(), context(synthetic, 160, seed=seed), synthetic[4])
    assert len(found) == 160
    assert hypervolume(found, OBJECTIVES, ref) >= 0.9 * target
    # the same budget of random configs falls short
    drawn = drive(Random(batch=16), context(synthetic, 160, seed=seed), synthetic[4])
    assert hypervolume(drawn, OBJECTIVES, ref) < 0.9 * target


def test_meets_a_cost_constraint(synthetic):
    ref = reference(synthetic)
    exact = exact_front(synthetic)
    limit = 0.5 * ref[1]
    feasible = exact[exact[:, 1] <= limit]
    found = drive(NSGA2(), context(synthetic, 120, ["flops<=0.5"]), synthetic[4])
    assert len(found) == 120
    assert all(r.metrics["flops_ratio"] <= 0.5 for r in found)  # none infeasible evaluated
    points = front(found, OBJECTIVES, ["flops<=0.5"])
    assert points and all(r.metrics["flops"] <= limit for r in points)
    best = max(r.metrics["accuracy"] for r in points)
    assert best >= feasible[:, 0].max() - 0.02
    assert hypervolume(points, OBJECTIVES, ref) >= 0.9 * hypervolume(feasible, OBJECTIVES, ref)


def test_narrow():
    lower, upper = np.zeros(4, int), np.array([8, 8, 3, 8])
    lo, hi = narrow(np.array([4, 1, 3, 8]), 2, lower, upper)
    assert lo.tolist() == [2, 0, 1, 6] and hi.tolist() == [6, 3, 3, 8]


def test_pstrn_narrows_around_the_incumbent(synthetic):
    ctx = context(synthetic, 200)
    strategy = NSGA2(pop_size=8, narrow_after=2, narrow_width=(2, 1))
    strategy.setup(ctx)
    full_lower, full_upper = strategy.box
    assert full_lower.tolist() == [0] * 5 and full_upper.tolist() == [4] * 5  # 4 ranks + dense
    seen: dict[str, Result] = {}

    def generation():
        configs = strategy.ask()
        for c in configs:
            seen.setdefault(c.key, Result(c, {**ctx.costs.metrics(c),
                                              "accuracy": synthetic[4](c)}))
        strategy.tell([seen[c.key] for c in configs])
        return configs

    generation()
    assert strategy.box[0].tolist() == full_lower.tolist()  # not yet
    generation()
    centre = strategy.encode(strategy.incumbent().config)
    lower, upper = strategy.box
    assert lower.tolist() == np.maximum(0, centre - 2).tolist()
    assert upper.tolist() == np.minimum(4, centre + 2).tolist()
    assert strategy.problem.xl.tolist() == lower.tolist()
    # the new first population: half of it the front (its ends included), clipped into the box
    clipped = [tuple(np.clip(strategy.encode(r.config), lower, upper))
               for r in front(list(seen.values()), OBJECTIVES)]
    first = generation()
    codes = np.array([strategy.encode(c) for c in first])
    assert ((codes >= lower) & (codes <= upper)).all()
    kept = {tuple(c) for c in codes} & set(clipped)
    assert len(kept) == min(len(set(clipped)), strategy.size // 2) >= 2
    assert {clipped[0], clipped[-1]} <= kept
    later = generation()  # second narrowing, width 1, around the new incumbent
    centre = strategy.encode(strategy.incumbent().config)
    assert (strategy.box[1] - strategy.box[0] <= 2).all()
    assert (np.abs(strategy.box[0] - centre) <= 1).all() and (strategy.box[0] <= centre).all()
    assert all(((strategy.encode(c) >= lower) & (strategy.encode(c) <= upper)).all()
               for c in later)


def test_a_used_up_box_widens_back(synthetic, monkeypatch):
    strategy = NSGA2(pop_size=8, narrow_after=1, narrow_width=1)
    sizes = []
    start = strategy._start

    def record(lower, upper, seeds):
        sizes.append(int((upper - lower).sum()))
        start(lower, upper, seeds)

    monkeypatch.setattr(strategy, "_start", record)
    found = drive(strategy, context(synthetic, 80), synthetic[4], max_idle=3)
    assert len(found) == 80
    assert min(sizes) < sizes[0] and sizes.count(sizes[0]) >= 2


def test_pstrn_focuses_on_the_budget(synthetic):
    exact = exact_front(synthetic)
    best = exact[exact[:, 1] <= 0.5 * reference(synthetic)[1]][:, 0].max()

    def top(strategy, seed):
        found = drive(strategy, context(synthetic, 96, ["flops<=0.5"], seed), synthetic[4])
        return max(r.metrics["accuracy"] for r in found)

    narrowed = [top(NSGA2(narrow_after=3), seed) for seed in range(6)]
    plain = [top(NSGA2(), seed) for seed in range(6)]
    assert np.mean(narrowed) > np.mean(plain) + 0.02
    assert sum(np.isclose(narrowed, best)) >= 3


def test_partial_generation_waits(synthetic):
    ctx = context(synthetic, 10)
    strategy = NSGA2(pop_size=4)
    strategy.setup(ctx)

    def answer(configs):
        return [Result(c, {**ctx.costs.metrics(c), "accuracy": synthetic[4](c)}) for c in configs]

    strategy.tell(answer(strategy.ask()))
    second = strategy.ask()
    strategy.tell(answer(second[:2]))  # the budget ran out halfway
    assert strategy.ask() == second and strategy.generation == 1
    strategy.tell(answer(second))
    assert strategy.generation == 2 and strategy.ask() != second


def test_generations_and_determinism(synthetic):
    a = drive(NSGA2(pop_size=6, generations=3), context(synthetic, 100, seed=5), synthetic[4])
    b = drive(NSGA2(pop_size=6, generations=3), context(synthetic, 100, seed=5), synthetic[4])
    c = drive(NSGA2(pop_size=6, generations=3), context(synthetic, 100, seed=6), synthetic[4])
    assert [r.config for r in a] == [r.config for r in b] != [r.config for r in c]
    assert 6 < len(a) <= 18


def test_seed_with_uniform(synthetic):
    ctx = context(synthetic, 64)
    strategy = NSGA2(pop_size=8, seed_with="uniform")
    strategy.setup(ctx)
    first = strategy.ask()
    uniform = {ctx.space.uniform(k) for k in np.linspace(1.0, 0.02, 4)}
    assert uniform <= set(first) and len(first) == 8


def test_bad_options():
    with pytest.raises(RankSearchError, match="pop_size"):
        NSGA2(pop_size=1)
    with pytest.raises(RankSearchError, match="narrow_width"):
        NSGA2(narrow_width=[2, 0])
    with pytest.raises(RankSearchError, match="narrow_after"):
        NSGA2(narrow_after=0)
    with pytest.raises(RankSearchError, match="one-knob"):
        NSGA2(seed_with=["uniform", "random"])
    with pytest.raises(RankSearchError, match="unknown strategy"):
        NSGA2(seed_with="nope")


def test_site_choices(synthetic):
    ctx = context(synthetic, 10)
    name = ctx.space.names[0]
    kept = site_choices(ctx, name)
    # svd rank r of a 32×32 layer costs 64r MACs against 1024: ranks under 16 are cheaper
    assert [c.rank for c in kept[:-1]] == [r for r in ctx.space.ranks(name, "svd") if r < 16]
    assert kept[-1] == Choice("dense")
    assert site_choices(ctx, name, cheaper=False) == ctx.space.choices(name)
    assert Choice("dense") not in site_choices(ctx, name, dense=False)


def test_missing_values_take_the_worst_seen():
    fill = MissingValues((Objective("accuracy"), Objective("loss")))
    assert fill.fill(np.array([[np.nan, np.nan]])).tolist() == [[0.0, 0.0]]
    out = fill.fill(np.array([[-0.9, 2.0], [np.nan, np.nan], [-0.5, 3.0]]))
    assert out[1].tolist() == [0.0, 3.0]
    assert fill.fill(np.array([[np.nan, 1.0]])).tolist() == [[0.0, 1.0]]
    assert fill.fill(np.array([[-0.2, np.nan]])).tolist() == [[-0.2, 3.0]]


ZERO_SHOT = ProxySettings(steps=0)


def test_search_on_digits(digits_model, digits, tmp_path):
    kw = dict(evaluations=12, seed=2, proxy=ZERO_SHOT, out=str(tmp_path),
              constraints=["flops<=0.5"])
    result = ranksearch.search(digits_model, digits, strategy="nsga2", **kw)
    assert result.evaluated == 12
    points = result.front()
    assert points and all(r.metrics["flops_ratio"] <= 0.5 for r in result.results)
    assert max(r.metrics["accuracy"] for r in points) > 0.5
    again = ranksearch.search(digits_model, digits, strategy="nsga2", **kw)
    assert again.evaluated == 0 and again.results == result.results
    # a larger budget replays the same generations (pop_size 4 either way), then goes on
    longer = NSGA2()
    more = ranksearch.search(digits_model, digits, strategy=longer, **{**kw, "evaluations": 16})
    assert more.evaluated == 4 and more.results[:12] == result.results
    replayed = [r.config for r in longer.told if r.ok]
    assert replayed[:12] == [r.config for r in result.results]
    free = ranksearch.search(digits_model, digits, strategy="nsga2", evaluations=8, seed=2,
                             proxy=ZERO_SHOT, out=str(tmp_path / "free"),
                             strategy_options={"seed_with": "uniform", "narrow_after": 1})
    assert free.evaluated == 8 and len(free.front()) >= 2
