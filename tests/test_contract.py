"""The strategy contract: a read-only context that never hands out the model, the task or the
executor, and every score a strategy uses stored and counted, under both executors."""

import dataclasses

import pytest
import torch
from torch import nn

import ranksearch
from ranksearch.evaluate import Evaluator
from ranksearch.strategy import SearchContext, available_strategies

ZERO = ranksearch.ProxySettings(steps=0)
#: options that keep each strategy's search small on the digits CNN
SMALL = {"beam": {"width": 1, "moves": 1}, "nsga2": {"pop_size": 4}}


def test_the_context_holds_no_model_task_evaluator_or_executor():
    names = {f.name for f in dataclasses.fields(SearchContext)}
    assert names == {"space", "costs", "cache", "constraints", "objectives", "rng",
                     "evaluations", "training", "metric", "_history"}
    for verb in ("evaluate", "evaluator", "probes", "model", "task"):
        assert not hasattr(SearchContext, verb), verb


class Guard:
    """Forward hooks on the dense model that fail while a strategy method runs."""

    def __init__(self, model: nn.Module) -> None:
        self.inside = False
        self.calls = 0
        for module in model.modules():
            module.register_forward_pre_hook(self.check)

    def check(self, module, args):
        if self.inside:
            self.calls += 1
            raise AssertionError("a strategy ran the model")

    def wrap(self, strategy):
        for name in ("setup", "ask", "tell"):
            method = getattr(strategy, name)

            def guarded(*args, _method=method, **kw):
                self.inside = True
                try:
                    return _method(*args, **kw)
                finally:
                    self.inside = False

            setattr(strategy, name, guarded)
        return strategy


@pytest.mark.parametrize("name", sorted(set(available_strategies()) - {"bayes_tt"}))
def test_no_strategy_runs_the_model(digits_model, digits, tmp_path, name):
    """bayes_tt is left out: it trains a compressed copy through ``ctx.training``, its one
    sanctioned way to the data."""
    model = ranksearch.surgery.clone_module(digits_model)
    guard = Guard(model)
    strategy = guard.wrap(ranksearch.load_strategy(name, SMALL.get(name)))
    result = ranksearch.search(model, digits, strategy=strategy, evaluations=12, proxy=ZERO,
                               out=str(tmp_path), constraints=["flops<=0.5"])
    assert guard.calls == 0 and result.evaluated >= 1


def test_training_strategies_get_a_copy_not_the_model(digits_model, digits):
    space = ranksearch.RankSpace.discover(digits_model, digits.example_input(), methods=["tt"])
    training = ranksearch.Training.of(digits_model, digits, ranksearch.FactorCache(digits_model,
                                                                                   space))
    built = training.build(space.uniform(0.5, "tt"))
    before = {k: v.clone() for k, v in digits_model.state_dict().items()}
    x, y = next(training.batches(16, seed=0))
    training.loss(built(x), y).backward()
    with torch.no_grad():
        for p in built.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, digits_model.state_dict()[k]) for k, v in before.items())
    assert training.size == len(digits.train) and x.shape == (16, 1, 8, 8)


def stored_measurements(result):
    """Every measurement in the study (partial scores included)."""
    store = ranksearch.store.Store(result.store_url, result.study, result.space,
                                   result.objectives)
    return list(store)


@pytest.mark.ray
@pytest.mark.parametrize("name", ["beam", "sensitivity"])
def test_under_ray_every_score_is_stored_and_counted(digits_model, digits, tmp_path, name):
    pytest.importorskip("ray")
    from ranksearch.executors.ray import RayExecutor

    budget = 14
    strategy = ranksearch.load_strategy(name, SMALL.get(name))
    result = ranksearch.search(digits_model, digits, strategy=strategy, evaluations=budget,
                               proxy=ZERO, out=str(tmp_path), constraints=["flops<=0.5"],
                               executor=RayExecutor(max_concurrent=2, num_cpus=2))
    measured = stored_measurements(result)
    assert len(measured) == result.evaluated <= budget
    # what the strategy was told is exactly what the store holds for it (nothing unstored)
    told = {r.key for r in strategy.ctx.history if r.proxy != "cost check"}
    assert told <= {r.key for r in measured}
    if name == "beam":
        partial = [r for r in measured if r.partial is not None]
        assert partial and all(r.partial == strategy.minibatches for r in partial)
        local = Evaluator(digits_model, digits, ZERO, result.space)
        for r in partial[:3]:  # the workers measured what the local evaluator measures
            again = local(r.config, partial=r.partial)
            assert again.metrics["accuracy"] == r.metrics["accuracy"]


def test_repair_keeps_the_allocation_and_meets_the_budget(digits_model, digits):
    space = ranksearch.RankSpace.discover(digits_model, digits.example_input())
    costs = ranksearch.CostModel(space)
    ctx = SearchContext(space=space, costs=costs, cache=ranksearch.FactorCache(digits_model,
                                                                               space),
                        constraints=ranksearch.constraints.parse_constraints(["flops<=0.3"]),
                        objectives=(), rng=None, evaluations=1)
    top = ranksearch.Config({n: ranksearch.Choice(space.site(n).methods[0],
                                                  space.ranks(n, space.site(n).methods[0])[-1])
                             for n in space.names})
    assert not ctx.feasible(top)
    fixed = ctx.repair(top)
    assert ctx.feasible(fixed) and set(fixed) == set(top)
    assert ctx.repair(fixed) == fixed  # a feasible config is left alone
    # no rank was raised, and the cost is near the budget (one factor for every site)
    def parts(rank):
        return (rank,) if isinstance(rank, int) else rank

    assert all(a <= b for n in top
               for a, b in zip(parts(fixed[n].rank), parts(top[n].rank), strict=True))
    assert ctx.cost(fixed, "flops") > 0.2
    assert ctx.cost_metric == "flops"
