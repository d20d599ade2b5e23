"""A third-party strategy (tests/third_party_strategy.py, public API only) under both executors."""

import itertools

import pytest
from third_party_strategy import GreedyHalving

import ranksearch

ZERO = ranksearch.ProxySettings(steps=0)


def run(model, task, out, executor="local", **kw):
    strategy = GreedyHalving()
    result = ranksearch.search(model, task, strategy=strategy, evaluations=9, proxy=ZERO,
                               out=str(out), executor=executor, constraints=["flops<=0.8"],
                               **kw)
    return strategy, result


def stored(result):
    """The stored results by config (under Ray they are stored in the order trials end)."""
    return sorted((r.config.key, r.status, r.metrics.get("accuracy")) for r in result.results)


def test_runs_locally_within_the_budget(digits_model, digits, tmp_path):
    strategy, result = run(digits_model, digits, tmp_path)
    assert result.stopped in ("finished", "strategy finished")
    assert result.evaluated == len(result.results) <= 9
    asked = [c for batch in strategy.asked for c in batch]
    feasible = [c for c in asked if result.costs.metrics(c)["flops_ratio"] <= 0.8]
    assert {r.config for r in result.results} <= set(feasible)
    # each round it kept the most accurate child: it is the parent of every later batch
    for batch, later in itertools.pairwise(strategy.asked):
        parent = max((r for r in result.results if r.config in batch),
                     key=lambda r: r.metrics["accuracy"]).config
        assert all(sum(c[n] != parent[n] for n in parent) == 1 for c in later)


@pytest.mark.ray
def test_gives_the_same_stored_results_under_ray(digits_model, digits, tmp_path):
    pytest.importorskip("ray")
    from ranksearch.executors.ray import RayExecutor

    _, local = run(digits_model, digits, tmp_path / "local")
    _, remote = run(digits_model, digits, tmp_path / "ray",
                    executor=RayExecutor(max_concurrent=2, num_cpus=2))
    assert stored(remote) == stored(local) and len(stored(local)) >= 5
