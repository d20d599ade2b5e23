import numpy as np
import pytest
import torch
from ranksearch_strategies.sensitivity import Sensitivity, allocate
from torch import nn
from torch.utils.data import TensorDataset

import ranksearch
from ranksearch.config import Choice, Config
from ranksearch.errors import RankSearchError
from ranksearch.evaluate import ProxySettings
from ranksearch.task import Task

ZERO_SHOT = ProxySettings(steps=0)


class TwoPath(nn.Module):
    """``main(x) + side(x)``: ``main`` is an orthogonal 16×16 map that carries the labels (every
    rank matters equally); ``side`` is a small perturbation that hardly matters."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.main = nn.Linear(16, 16)
        self.side = nn.Linear(16, 16)
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
            self.main.weight.copy_(q)
            self.side.weight.copy_(0.01 * torch.randn(16, 16, generator=g))
            self.main.bias.zero_()
            self.side.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.side(x)


def two_path() -> tuple[nn.Module, Task]:
    """The `TwoPath` model and a task labelled by it (the dense model is 100% accurate)."""
    model = TwoPath().eval()
    x = torch.randn(640, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    task = Task("two-path", TensorDataset(x[:128], y[:128]), TensorDataset(x[128:], y[128:]))
    return model, task


class Recording(Sensitivity):
    """Sensitivity that keeps every config it proposes (and which were probes)."""

    def setup(self, ctx):
        super().setup(ctx)
        self.asked = []
        self.probed = []

    def ask(self):
        proposals = super().ask()
        for p in proposals:
            self.asked.append(getattr(p, "config", p))
            if getattr(p, "probe", False):
                self.probed.append(p.config)
        return proposals


def search(model, task, out, **kw):
    kw.setdefault("strategy", "sensitivity")
    return ranksearch.search(model, task, proxy=ZERO_SHOT, out=str(out), **kw)


def test_allocate_is_proportional_to_loss_and_capped():
    # uncapped: Astrid & Lee's formula, rank_l = loss_l / Σ loss · r_avg · L
    assert allocate([3, 1], [10, 10], 0.4) == pytest.approx([6, 2])
    assert allocate([3, 1], [10, 10], 0.6) == pytest.approx([9, 3])
    # the first layer hits its maximum; what it cannot take goes to the other
    assert allocate([3, 1], [10, 10], 0.8) == pytest.approx([10, 6])
    assert allocate([3, 1, 1], [10, 20, 30], 0.5) == pytest.approx([10, 10, 10])
    assert allocate([1, 1], [10, 20], 1.0) == pytest.approx([10, 20])
    ranks = [allocate([0.5, 0.2, 0.001], [9, 32, 64], k) for k in np.linspace(0.02, 1, 50)]
    assert np.all(np.diff(ranks, axis=0) >= -1e-9)  # ranks grow with the knob


def test_higher_rank_where_compression_hurts_and_probes_are_reused(tmp_path):
    model, task = two_path()
    strategy = Recording()
    first = search(model, task, tmp_path, strategy=strategy, constraints=["flops<=0.5"],
                   evaluations=6)
    assert first.evaluated == 6
    probes = {Config(): "dense", Config({"main": Choice("svd", 2)}): "main",
              Config({"side": Choice("svd", 2)}): "side"}
    assert strategy.asked[:3] == list(probes) == strategy.probed  # one batch of probes, first
    results = {r.config: r for r in first.results}
    assert results[Config()].metrics["accuracy"] == 1.0
    assert results[Config({"main": Choice("svd", 2)})].metrics["accuracy"] < 0.3
    assert strategy.losses["main"] > 0.7
    assert 1e-3 <= strategy.losses["side"] < 0.03
    proposals = strategy.asked[3:]
    assert len(proposals) == 3 and all(c["main"].rank >= c["side"].rank for c in proposals)
    assert proposals[0] == Config({"main": Choice("svd", 7), "side": Choice("svd", 1)})
    assert first.best().metrics["accuracy"] > 0.3
    # another budget, same store, sharing results between studies: every probe comes from
    # the store
    second = search(model, task, tmp_path, constraints=["flops<=0.3"], evaluations=6,
                    share_results=True)
    assert second.study != first.study
    again = {r.config: r for r in second.results}
    assert all(again[p] == results[p] for p in probes)
    new = set(again) - set(results)  # evaluated by the second search
    assert len(again) == 6 and second.evaluated == len(new) == 2 and not new & set(probes)


def test_meets_the_budget_within_one_rank_step(digits_model, digits, tmp_path):
    strategy = Recording()
    result = search(digits_model, digits, tmp_path, strategy=strategy,
                    constraints=["flops<=0.5"], evaluations=9)
    space, costs = result.space, result.costs
    probes, proposals = strategy.asked[:6], strategy.asked[6:]
    assert len(proposals) == 3
    flops = [costs.metrics(c)["flops_ratio"] for c in proposals]
    assert all(f <= 0.5 for f in flops) and flops == sorted(flops, reverse=True)
    # the probes are measured even though most break the budget (they are not proposals)
    measured = {r.config: r for r in result.results}
    over = [p for p in probes if costs.metrics(p)["flops_ratio"] > 0.5]
    assert len(over) >= 4 and all(measured[p].ok for p in over)
    # the largest knob that meets the budget, found here by a bisection of our own
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if costs.metrics(strategy.make(mid))["flops_ratio"] <= 0.5 else (lo, mid)
    top, above = strategy.make(lo), strategy.make(hi)
    assert proposals[0] == top
    assert costs.metrics(above)["flops_ratio"] > 0.5

    def index(config, name):
        return space.ranks(name, config[name].method).index(config[name].rank)

    steps = {n: index(above, n) - index(top, n) for n in space.names}
    assert sorted(steps.values()) == [0, 0, 0, 0, 1]  # one grid step at one site
    # separate averages: each group's ranks sum to k · Σ of its maximum ranks (up to rounding)
    # (the maximum ranks are 9, 32, 64 and 64, 10; each grid stops short of its maximum,
    # where it would cost as much as the dense layer, and the top of the grid is the cap)
    tops = {n: max(np.atleast_1d(space.ranks(n, space.site(n).methods[0])[-1]))
            for n in space.names}
    assert tops == {"features.0": 5, "features.3": 27, "features.7": 55,
                    "classifier.1": 60, "classifier.3": 8}
    for group, sizes in ((("features.0", "features.3", "features.7"), (5, 27, 55)),
                         (("classifier.1", "classifier.3"), (60, 8))):
        total = sum(max(np.atleast_1d(top[n].rank)) for n in group)
        assert abs(total - lo * sum(sizes)) <= 0.5 * len(group)


def test_front_without_constraints(digits_model, digits, tmp_path):
    result = search(digits_model, digits, tmp_path, evaluations=10)
    assert result.evaluated == 10
    front = result.front()
    assert len(front) >= 3
    swept = [r for r in result.results if len(r.config) == 5]
    flops = [r.metrics["flops_ratio"] for r in swept]
    assert len(swept) == 4 and flops == sorted(flops, reverse=True)
    # from the top of every grid (k = 1: short of full rank, which would cost more than the
    # dense model) down to k = 0.02
    space = result.space
    top = Config({n: Choice(m, space.ranks(n, m)[-1])
                  for n in space.names for m in space.site(n).methods[:1]})
    assert swept[0].config == top
    assert 1.0 > flops[0] > 0.9 and flops[-1] < 0.1
    assert result.costs.metrics(space.full())["flops_ratio"] > 1.0


def test_probe_rank_and_method(digits_model, digits, tmp_path):
    strategy = Recording(probe_rank=3, method="svd", points=[0.5, 0.25])
    search(digits_model, digits, tmp_path, strategy=strategy, evaluations=5)
    assert strategy.asked == [
        Config(), Config({"classifier.1": Choice("svd", 3)}),
        Config({"classifier.3": Choice("svd", 3)}),
        strategy.make(0.5), strategy.make(0.25),
    ]
    assert set(strategy.make(0.5)) == {"classifier.1", "classifier.3"}  # convs stay dense
    # r_avg = 0.5 · mean(60, 8), the tops of the grids (the maximum ranks 64 and 10 would
    # cost as much as the dense layers), so the two ranks sum to 0.5 · (60 + 8) = 34
    assert strategy.make(1.0) == Config({"classifier.1": Choice("svd", 60),
                                         "classifier.3": Choice("svd", 8)})
    assert strategy.make(0.5)["classifier.1"].rank + strategy.make(0.5)["classifier.3"].rank == 34


@pytest.mark.parametrize("options, message", [
    ({"probe_fraction": 0}, "probe_fraction"),
    ({"probe_fraction": 1.5}, "probe_fraction"),
    ({"probe_rank": 0}, "probe_rank"),
    ({"probe_rank": 2.5}, "probe_rank"),
    ({"epsilon": -1}, "epsilon"),
    ({"count": 0}, "count"),
    ({"points": [0.5, 2]}, "points"),
    ({"colour": "red"}, "bad options"),
    ({"method": "nope"}, "unknown factorization"),
])
def test_bad_options(options, message):
    with pytest.raises(RankSearchError, match=message):
        ranksearch.load_strategy("sensitivity", options)


def test_too_few_evaluations(tmp_path):
    model, task = two_path()
    with pytest.raises(RankSearchError, match="more evaluations than its 3 probes"):
        search(model, task, tmp_path, evaluations=3)
    with pytest.raises(RankSearchError, match="admits the method"):
        search(model, task, tmp_path, strategy_options={"method": "tucker2"}, evaluations=5)
