"""auto, the default strategy: analytic sweeps first, then refinement of the front (and TPE),
for the whole budget, within the constraints; and the refiner it builds on."""

import inspect
import itertools

import pytest
from test_budget_use import LIMIT, ZERO, context, feasible_configs, mlp  # noqa: F401

import ranksearch
from ranksearch.pareto import front, hypervolume, parse_objectives, reference_point
from ranksearch.refine import Refiner
from ranksearch.result import Result
from strategies.auto import spread

OBJECTIVES = parse_objectives(("accuracy", "flops"))


def test_auto_is_the_default_strategy(mlp):  # noqa: F811
    model, task, space = mlp
    assert inspect.signature(ranksearch.search).parameters["strategy"].default == "auto"
    result = ranksearch.search(model, task, evaluations=6, proxy=ZERO, space=space,
                               store="memory")
    assert result.meta["strategy"] == "auto" and result.evaluated == 6


def test_auto_starts_with_the_analytic_sweeps_and_stays_feasible(mlp):  # noqa: F811
    model, task, space = mlp
    budget = 14
    pca = ranksearch.search(model, task, strategy="pca_energy",
                            strategy_options={"count": 2, "refine": False},
                            evaluations=budget, proxy=ZERO, space=space, store="memory",
                            constraints=[LIMIT])
    auto = ranksearch.search(model, task, strategy="auto", evaluations=budget, proxy=ZERO,
                             space=space, store="memory", constraints=[LIMIT])
    assert auto.results[0].config == pca.results[0].config  # the budget's PCA-energy config
    assert auto.evaluated == budget and auto.stopped == "finished"
    ctx = context(space)
    assert all(ctx.feasible(r.config) for r in auto.results)
    assert len({r.config.key for r in auto.results}) == budget  # nothing twice


def test_spread_takes_both_ends_then_the_widest_gaps_middle():
    for n in range(40):
        order = spread(n)
        assert sorted(order) == list(range(n))
        if n >= 3:
            assert order[:3] == [0, n - 1, (n - 1) // 2]
    # every prefix leaves no gap more than twice as wide as the narrowest it could
    order = spread(33)
    for k in range(2, 33):
        taken = sorted(order[:k])
        widest = max(b - a for a, b in itertools.pairwise(taken))
        assert widest <= 2 * (32 / (k - 1)) + 1, (k, taken)


@pytest.mark.parametrize("constraints", [(), (LIMIT,)])
def test_auto_reaches_at_least_the_hypervolume_of_random_and_the_sweep(mlp, constraints):  # noqa: F811
    model, task, space = mlp
    budget = 12
    volume = {}
    ref = reference_point(OBJECTIVES, ranksearch.CostModel(space).metrics(ranksearch.Config()),
                          scale=1.5)
    for name in ("auto", "pca_energy", "random"):
        r = ranksearch.search(model, task, strategy=name, evaluations=budget, proxy=ZERO,
                              space=space, store="memory", constraints=list(constraints))
        volume[name] = hypervolume(r.results, OBJECTIVES, ref, constraints)
    assert volume["auto"] >= max(volume["pca_energy"], volume["random"]) * 0.99, volume


def test_the_refiner_proposes_feasible_unevaluated_neighbours_of_the_front(mlp):  # noqa: F811
    model, task, space = mlp
    ctx = context(space)
    evaluator = ranksearch.Evaluator(model, task, ZERO, space)
    seen = feasible_configs(space)[::3]
    ctx.record([evaluator(c) for c in seen])
    refiner = Refiner(ctx)
    (proposal,) = refiner.propose(1)
    assert ctx.feasible(proposal) and proposal not in seen
    points = front(list(ctx.history), ctx.objectives, ctx.cost_constraints())
    # one site one step along its choices from a front point
    def steps(a, b):
        return sum(abs(refiner.choices[n].index(a.get(n)) - refiner.choices[n].index(b.get(n)))
                   for n in space.names)

    assert min(steps(proposal, p.config) for p in points) == 1
    # it never proposes a config twice, and stops only when every feasible one is known
    rest = refiner.propose(1000)
    known = {c.key for c in seen} | {proposal.key} | {c.key for c in rest}
    assert known == {c.key for c in feasible_configs(space)}
    assert len(rest) + 1 + len(seen) == len(known)
    assert refiner.propose(1) == []
    assert isinstance(ctx.history[0], Result)


def test_auto_evaluates_the_dense_model_first_when_it_is_feasible(mlp):  # noqa: F811
    model, task, space = mlp
    auto = ranksearch.search(model, task, strategy="auto", evaluations=6, proxy=ZERO,
                             space=space, store="memory")
    assert auto.results[0].config == ranksearch.Config()
    constrained = ranksearch.search(model, task, strategy="auto", evaluations=6, proxy=ZERO,
                                    space=space, store="memory", constraints=[LIMIT])
    assert all(r.config != ranksearch.Config() for r in constrained.results)


def test_refiner_swaps_move_one_site_up_and_another_down(mlp):  # noqa: F811
    model, task, space = mlp
    ctx = context(space)
    evaluator = ranksearch.Evaluator(model, task, ZERO, space)
    ctx.record([evaluator(c) for c in feasible_configs(space)[::5]])
    plain, swapping = Refiner(ctx), Refiner(ctx, swaps=True)
    config = front(list(ctx.history), ctx.objectives, ctx.cost_constraints())[-1].config
    singles = set(plain._moves(config))
    pairs = set(swapping._moves(config)) - singles
    assert singles <= set(swapping._moves(config)) and pairs

    def step(c, n):
        return plain.choices[n].index(c.get(n)) - plain.choices[n].index(config.get(n))

    for c in pairs:
        assert sorted(step(c, n) for n in space.names if step(c, n)) == [-1, 1]


def test_refiner_best_proposes_a_neighbour_of_the_most_accurate_front_point(mlp):  # noqa: F811
    model, task, space = mlp
    ctx = context(space)
    evaluator = ranksearch.Evaluator(model, task, ZERO, space)
    ctx.record([evaluator(c) for c in feasible_configs(space)[::4]])
    refiner = Refiner(ctx)
    points = front(list(ctx.history), ctx.objectives, ctx.cost_constraints())
    top = max(points, key=lambda r: r.metrics["accuracy"]).config
    neighbours = {c for c in refiner._moves(top) if ctx.feasible(c)} - set(
        r.config for r in ctx.history)
    assert neighbours  # the test needs one left to propose
    (proposal,) = refiner.propose(1, best=True)
    assert proposal in neighbours
    # once the best point's neighbours are all known it falls back on the whole front
    refiner.asked.update(c.key for c in neighbours)
    (other,) = refiner.propose(1, best=True)
    assert other not in neighbours and ctx.feasible(other)
