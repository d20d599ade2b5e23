import pytest
from ranksearch_strategies.beam import Beam
from test_sensitivity import two_path

import ranksearch
from ranksearch.errors import RankSearchError
from ranksearch.evaluate import ProxySettings
from ranksearch.space import Choice, Config

ZERO_SHOT = ProxySettings(steps=0)


class Recording(Beam):
    """Beam search that keeps everything it proposes."""

    def ask(self):
        configs = super().ask()
        self.asked = configs
        return configs


def search(model, task, out, **kw):
    kw.setdefault("strategy", Recording())
    return ranksearch.search(model, task, proxy=ZERO_SHOT, out=str(out), **kw)


def test_beats_uniform_at_equal_flops(tmp_path):
    model, task = two_path()
    beam = Recording()
    result = search(model, task, tmp_path / "beam", strategy=beam, constraints=["flops<=0.5"],
                    evaluations=4)
    costs = result.costs
    assert beam.asked[0] == beam.answer[0] == Config({"main": Choice("svd", 7),
                                                      "side": Choice("svd", 1)})
    assert len(beam.asked) == 4
    assert all(costs.metrics(c)["flops_ratio"] <= 0.5 for c in beam.asked)
    # uniform's first proposal is the largest fraction that meets the same budget
    uniform = search(model, task, tmp_path / "uniform", strategy="uniform",
                     constraints=["flops<=0.5"], evaluations=1)
    assert uniform.results[0].config == Config({"main": Choice("svd", 4),
                                                "side": Choice("svd", 4)})
    best, base = result.best(), uniform.best()
    assert best.metrics["flops_ratio"] == base.metrics["flops_ratio"] == 0.5
    assert best.metrics["accuracy"] > base.metrics["accuracy"] + 0.08


def test_front_without_constraints_spreads_over_the_path(tmp_path):
    model, task = two_path()
    beam = Recording()
    result = search(model, task, tmp_path, strategy=beam, evaluations=3)
    path = [c for c, _ in beam.path]
    # each grid is svd:1..7 (from svd:8 on, a 16 × 16 layer costs as much as dense), so the
    # beam starts at svd:7 on both sites and moves one grid step at a time
    assert result.space.ranks("main", "svd") == result.space.ranks("side", "svd") == tuple(
        range(1, 8))
    assert len(path) == 12  # 2 sites × 6 moves of 1 grid step
    assert beam.answer is None
    assert beam.asked == [path[0], path[6], path[11]]  # evenly spaced, both ends included
    assert path[-1] == Config({"main": Choice("svd", 1), "side": Choice("svd", 1)})
    assert path[0] == Config({"main": Choice("svd", 7), "side": Choice("svd", 6)})
    assert len(result.front()) == 3
    # a re-run replays from the store
    again = search(model, task, tmp_path, evaluations=3)
    assert again.evaluated == 0 and [r.config for r in again.results] == beam.asked


def test_moves_sets_the_path_length(tmp_path):
    model, task = two_path()
    beam = Recording(moves=2)
    search(model, task, tmp_path, strategy=beam, evaluations=3)
    path = [c for c, _ in beam.path]
    assert len(path) == 4  # 2 sites × 2 moves of 4 grid steps
    assert path[-1] == Config({"main": Choice("svd", 1), "side": Choice("svd", 1)})
    with pytest.raises(RankSearchError, match="moves"):
        Beam(moves=0)


def test_digits_end_to_end_never_over_budget(digits_model, digits, tmp_path):
    beam = Recording(width=2)
    result = search(digits_model, digits, tmp_path, strategy=beam, constraints=["flops<=0.4"],
                    evaluations=5)
    space, costs = result.space, result.costs
    assert result.evaluated == 5 and len(beam.asked) == 5
    flops = [costs.metrics(c)["flops_ratio"] for c in beam.asked]
    assert all(f <= 0.4 for f in flops)
    assert [r.config for r in result.results] == beam.asked
    answer = beam.asked[0]
    assert answer == beam.answer[0] and result.best().config == answer
    assert result.best().metrics["accuracy"] > 0.8
    # the move that crossed the budget stopped as high as it could: one grid step more on
    # some site breaks it
    def raised(name):
        grid = space.ranks(name, answer[name].method)
        up = grid[min(grid.index(answer[name].rank) + 1, len(grid) - 1)]
        return answer.with_choices({name: Choice(answer[name].method, up)})

    assert any(costs.metrics(raised(n))["flops_ratio"] > 0.4 for n in space.names)
    assert flops[0] > 0.3 and flops[-1] < 0.05  # the front below the budget, down to the end
    assert len(result.front()) >= 3


def test_unreachable_by_lowering_ranks(digits_model, digits, tmp_path):
    with pytest.raises(RankSearchError, match="reached the lowest ranks"):
        search(digits_model, digits, tmp_path, strategy="beam", constraints=["flops<=0.3"],
               strategy_options={"method": "svd", "width": 1}, evaluations=2)


@pytest.mark.parametrize("options, message", [
    ({"width": 0}, "width"),
    ({"step": 0}, "step"),
    ({"step": 1.5}, "step"),
    ({"minibatches": "2"}, "minibatches"),
    ({"beam": 3}, "bad options"),
    ({"method": "nope"}, "unknown factorization"),
])
def test_bad_options(options, message):
    with pytest.raises(RankSearchError, match=message):
        ranksearch.load_strategy("beam", options)
