import dataclasses

import pytest
from ranksearch_strategies.beam import Beam
from test_sensitivity import two_path

import ranksearch
from ranksearch.config import Choice, Config
from ranksearch.errors import RankSearchError
from ranksearch.evaluate import ProxySettings
from ranksearch.result import Result
from ranksearch.store import Store
from ranksearch.strategy import Proposal, StopSearch

# the scores these beams were worked out on: zero-shot with the trained BatchNorm statistics
ZERO_SHOT = ProxySettings(steps=0, bn_recalibrate=0)
#: partial scores of a full beam search on `two_path` (2 sites, svd:1..7 each, width 4):
#: the start and its 2 children, then the children of each step, 12 steps in all
TWO_PATH_STEPS = [3, 3, 4, 5, 5, 5, 4, 4, 4, 3, 2, 1]


class Recording(Beam):
    """Beam search that keeps every ask: its partial-score steps, then its final configs."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.asks = []
        self.ctx = None

    def ask(self):
        proposals = super().ask()
        self.asks.append(proposals)
        return proposals

    @property
    def steps(self):
        """The asks of partial scores, one per beam step."""
        return [a for a in self.asks if a and isinstance(a[0], Proposal)]

    @property
    def asked(self):
        """The final (full proxy) proposals."""
        finals = [a for a in self.asks if a and not isinstance(a[0], Proposal)]
        assert len(finals) == 1
        return finals[0]


def search(model, task, out, **kw):
    kw.setdefault("strategy", Recording())
    return ranksearch.search(model, task, proxy=ZERO_SHOT, out=str(out), **kw)


def check_accounting(result, beam, evaluations):
    """Every partial score beam used is a stored, counted measurement, and beam's scores are
    the stored ones; nothing past the evaluation budget."""
    store = Store(result.store_url, result.study, result.space, result.objectives)
    partials = [p for step in beam.steps for p in step]
    assert all(p.partial == beam.minibatches and p.probe for p in partials)
    assert len(partials) == len({p.config for p in partials})  # never scored twice
    stored = {p.config: store.get(p.config, partial=beam.minibatches) for p in partials}
    assert all(r is not None and r.partial == beam.minibatches and r.ok
               for r in stored.values())
    for config, accuracy in beam.path + ([beam.answer] if beam.answer else []):
        assert stored[config].metrics["accuracy"] == accuracy
    assert [r.config for r in store.results()] == beam.asked  # partials are no candidates
    assert len(store) == len(partials) + len(beam.asked) == result.evaluated <= evaluations
    # every step fits the documented cost: 1 + sites, then at most width × sites
    sites = len(result.space.names)
    assert all(len(step) <= (1 + sites if i == 0 else beam.width * sites)
               for i, step in enumerate(beam.steps))
    return store


def test_beats_uniform_at_equal_flops(tmp_path):
    model, task = two_path()
    beam = Recording()
    evaluations = sum(TWO_PATH_STEPS) + 4
    result = search(model, task, tmp_path / "beam", strategy=beam, constraints=["flops<=0.5"],
                    evaluations=evaluations)
    costs = result.costs
    assert [len(s) for s in beam.steps] == TWO_PATH_STEPS
    check_accounting(result, beam, evaluations)
    assert result.evaluated == evaluations
    assert beam.asked[0] == beam.answer[0] == Config({"main": Choice("svd", 7),
                                                      "side": Choice("svd", 1)})
    assert beam.answer[1] == pytest.approx(0.34375)
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
    evaluations = sum(TWO_PATH_STEPS) + 3
    result = search(model, task, tmp_path, strategy=beam, evaluations=evaluations)
    path = [c for c, _ in beam.path]
    # each grid is svd:1..7 (from svd:8 on, a 16 × 16 layer costs as much as dense), so the
    # beam starts at svd:7 on both sites and moves one grid step at a time
    assert result.space.ranks("main", "svd") == result.space.ranks("side", "svd") == tuple(
        range(1, 8))
    start = Config({"main": Choice("svd", 7), "side": Choice("svd", 7)})
    # one ask per step: the first scores the start and its two children
    assert [p.config for p in beam.steps[0]] == [
        start, Config({"main": Choice("svd", 6), "side": Choice("svd", 7)}),
        Config({"main": Choice("svd", 7), "side": Choice("svd", 6)})]
    assert [len(s) for s in beam.steps] == TWO_PATH_STEPS
    # the children of each step are those of the members kept by the one before (width 4)
    assert {p.config for p in beam.steps[1]} == {
        Config({"main": Choice("svd", a), "side": Choice("svd", b)})
        for a, b in [(5, 7), (6, 6), (7, 5)]}
    check_accounting(result, beam, evaluations)
    assert len(path) == 12  # 2 sites × 6 moves of 1 grid step
    assert beam.answer is None
    assert beam.asked == [path[0], path[6], path[11]]  # evenly spaced, both ends included
    assert path[-1] == Config({"main": Choice("svd", 1), "side": Choice("svd", 1)})
    assert path[0] == Config({"main": Choice("svd", 7), "side": Choice("svd", 6)})
    assert path[5] == Config({"main": Choice("svd", 7), "side": Choice("svd", 1)})
    assert [a for _, a in beam.path[:2]] == pytest.approx([0.33984375, 0.33984375])
    assert len(result.front()) == 3
    # a re-run finds its budget spent in the store: nothing evaluated, the same results
    again = search(model, task, tmp_path, evaluations=evaluations)
    assert again.evaluated == 0 and [r.config for r in again.results] == beam.asked
    # with one more it replays every step from the store (nothing evaluated again) and
    # spreads 4 finals; only path[4] is new within the budget: path[7] is past it, since
    # path[6], stored by the first run, counts against it too
    more = Recording()
    again = search(model, task, tmp_path, strategy=more, evaluations=evaluations + 1)
    assert more.path == beam.path and more.asked == [path[0], path[4], path[7], path[11]]
    assert again.evaluated == 1
    assert [r.config for r in again.results] == [path[0], path[6], path[11], path[4]]


def test_moves_sets_the_path_length(tmp_path):
    model, task = two_path()
    beam = Recording(moves=2)
    result = search(model, task, tmp_path, strategy=beam, evaluations=12)
    path = [c for c, _ in beam.path]
    assert [len(s) for s in beam.steps] == [3, 3, 2, 1]
    check_accounting(result, beam, 12)
    assert len(path) == 4  # 2 sites × 2 moves of 4 grid steps
    assert path[-1] == Config({"main": Choice("svd", 1), "side": Choice("svd", 1)})
    with pytest.raises(RankSearchError, match="moves"):
        Beam(moves=0)


@pytest.mark.parametrize("constraints, evaluations, steps", [
    (["flops<=0.5"], 3, 0),  # the first step (start + 2 children) and one final: 4
    (["flops<=0.5"], 1, 0),
    (["flops<=0.5"], 9, 2),  # two steps (6), then 4 more do not fit with a final
    ([], 2, 0),
    ([], 6, 1),  # the first step, then 3 more do not fit with a final
])
def test_budget_too_small_stops_cleanly(tmp_path, constraints, evaluations, steps):
    model, task = two_path()
    beam = Recording(refine=False)  # its own proposals only (no refinement after them)
    result = search(model, task, tmp_path, strategy=beam, constraints=constraints,
                    evaluations=evaluations)
    assert len(beam.steps) == len(beam.path) == steps
    check_accounting(result, beam, evaluations)
    start = Config({"main": Choice("svd", 7), "side": Choice("svd", 7)})
    assert beam.answer is None and len(beam.asked) >= 1
    assert all(r.ok for r in result.results)
    if constraints:
        # the best so far (the start, else the latest best member) brought within the budget
        latest = beam.path[-1][0] if beam.path else start
        assert beam.asked == [result.best().config]
        assert beam.asked[0] == beam.ctx.repair(latest) != latest
        assert result.best().metrics["flops_ratio"] <= 0.5
    else:
        assert beam.asked == ([c for c, _ in beam.path] or [start])
    assert len(result.front()) >= 1


def test_a_short_tell_ends_the_search_with_the_best_so_far(tmp_path):
    model, task = two_path()
    seen = Recording()
    search(model, task, tmp_path, strategy=seen, constraints=["flops<=0.5"], evaluations=1)
    ctx = dataclasses.replace(seen.ctx, evaluations=100, _history=[])
    beam = Beam(refine=False)
    beam.setup(ctx)
    first = beam.ask()
    assert len(first) == 3 and all(p.partial == 1 and p.probe for p in first)
    assert beam.ask() == []  # waiting for the step (an executor may ask again meanwhile)
    # past the budget: only the start and the first child come back
    start, child = first[0].config, first[1].config
    beam.tell([Result(start, {"accuracy": 0.5}, partial=1),
               Result(child, {"accuracy": 0.4}, partial=1)])
    assert beam.path == [(child, 0.4)] and beam.answer is None
    final = beam.ask()
    assert final == [ctx.repair(child)] and ctx.feasible(final[0])
    with pytest.raises(StopSearch):
        beam.ask()


def test_digits_end_to_end_never_over_budget(digits_model, digits, tmp_path):
    beam = Recording(width=2)
    evaluations = 300  # 295 partial scores and 5 final proposals
    result = search(digits_model, digits, tmp_path, strategy=beam, constraints=["flops<=0.4"],
                    evaluations=evaluations)
    space, costs = result.space, result.costs
    check_accounting(result, beam, evaluations)
    assert sum(len(s) for s in beam.steps) == 295 <= beam.estimate
    assert result.evaluated == evaluations and len(beam.asked) == 5
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
    beam = Recording(method="svd", width=1)
    with pytest.raises(RankSearchError, match="even at the lowest ranks"):
        search(digits_model, digits, tmp_path, strategy=beam, constraints=["flops<=0.3"],
               evaluations=2)
    assert beam.asks == []  # found before anything is scored


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
