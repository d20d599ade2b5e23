"""Sensitivity-proportional ranks (Astrid & Lee, "Deep compression of convolutional neural
networks with low-rank approximation", ETRI Journal 40(4), 2018, §2.5 and Algorithm 2).

Each layer is decomposed alone at a small common rank and evaluated (a *probe*); its
sensitivity is the accuracy it loses against the dense model. Ranks are then proportional to
sensitivity, ``rank_l = loss_l / Σ loss · r_avg · L``, with separate averages for convolutions
and linear layers, and the average is fitted to the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ranksearch import factorize, options
from ranksearch.config import Choice, Config
from ranksearch.errors import RankSearchError
from ranksearch.pareto import Objective
from ranksearch.result import Result
from ranksearch.site import Rank
from ranksearch.space import method_for, nearest_rank
from ranksearch.strategy import Proposal, SearchContext, Strategy, SweepStrategy


class Sensitivity(Strategy):
    """Ranks proportional to each layer's accuracy loss when it alone is decomposed.

    First one batch of probes: the dense model, and for every site a config with only that site
    decomposed at a small rank (``probe_rank``, each tuple component capped at its maximum, or
    else the grid rank nearest ``probe_fraction`` of the maximum rank). Probes are ordinary
    evaluations under the search's proxy (the paper fine-tunes each for one epoch): they count
    against the evaluation budget, are stored, and are reused by a later search in the same
    store that passes ``share_results=True`` and measures alike (same model, data, proxy and
    space). A probe breaking a cost constraint is still evaluated (it is a measurement, never a
    proposal).
    ``loss_l = max(acc_dense − acc_l, epsilon)``; a probe that failed counts as accuracy 0.

    Then one knob ``k`` sets the average rank of each group, ``r_avg = k · mean top rank`` for
    convolutions and for linear layers alike, and ``rank_l = loss_l / Σ loss · r_avg · L``
    within the group (`allocate`), each capped at the site's top rank: the top of its grid (its
    maximum rank, unless the grid stops short of it where it would cost as much as the dense
    layer). Ranks are measured along each site's grid line (for tuple ranks such as tucker2's,
    the largest component; every component takes the same fraction of its top) and rounded to
    the nearest grid rank; so ``k = 1`` is every site at the top of its grid. Like
    `SweepStrategy`, it proposes ``count`` configs (default: the evaluations left after the
    probes) from the largest ``k`` that meets the cost constraints, fitted by bisection, down to
    0.02, or exactly the knobs in ``points``. ``method``: one factorization for all sites
    (default: each site's first; sites without it stay dense). Once the sweep is used up,
    ``refine`` (default) refines the front for the rest of the budget, else it stops.
    """

    name = "sensitivity"
    description = "ranks proportional to each layer's accuracy loss when decomposed alone"

    def __init__(
        self,
        points: Sequence[float] | None = None,
        count: int | None = None,
        probe_fraction: float = 0.1,
        probe_rank: int | None = None,
        method: str | None = None,
        epsilon: float = 1e-3,
        refine: bool = True,
    ) -> None:
        who = self.name
        self.refine = options.boolean(refine, "refine", who)
        self.points = options.values_in(points, "points (knobs)", who, 0.0, 1.0, open_low=True)
        self.count = options.positive_int(count, "count", who, optional=True)
        self.probe_fraction = options.fraction(probe_fraction, "probe_fraction", who)
        self.probe_rank = options.positive_int(probe_rank, "probe_rank", who, optional=True)
        self.method = options.method_name(method, "method", who)
        self.epsilon = options.positive(epsilon, "epsilon", who)
        #: accuracy loss per site, once the probes are in
        self.losses: dict[str, float] | None = None

    def setup(self, ctx: SearchContext) -> None:
        super().setup(ctx)
        space = ctx.space
        self._methods = {
            s.name: m for s in space.decomposable if (m := method_for(s, self.method)) is not None
        }
        if not self._methods:
            raise RankSearchError(f"no layer of the space admits the method {self.method!r}")
        # the top of each site's grid, which stops short of the maximum rank where that
        # would cost as much as the dense layer: ranks are fractions of it, and it caps them
        self._tops = {n: np.atleast_1d(space.ranks(n, m)[-1]) for n, m in self._methods.items()}
        self._groups = [names for kind in ("conv2d", "linear")
                        if (names := [n for n in self._methods if space.site(n).kind == kind])]
        probes = {Config(): "dense"}
        for name, method in self._methods.items():
            top = np.atleast_1d(factorize.get(method).max_rank(space.site(name)))
            if self.probe_rank is None:
                target = top * self.probe_fraction
            else:
                target = np.minimum(top, self.probe_rank)
            probes[Config({name: Choice(method, _nearest(space.ranks(name, method), target))})] = (
                name
            )
        if ctx.evaluations <= len(probes):
            raise RankSearchError(
                f"sensitivity needs more evaluations than its {len(probes)} probes (the dense "
                f"model and one per site), got {ctx.evaluations}"
            )
        self._probes = probes
        self._measured: dict[str, Result] = {}
        self._asked = False
        self._sweep: _Sweep | None = None
        self.losses = None

    def ask(self) -> list[Config | Proposal]:
        if self._sweep is not None:
            return self._sweep.ask()
        if self._asked:
            return []  # waiting for the probes
        self._asked = True
        # measurements, evaluated even where one decomposed layer breaks a cost constraint
        return [Proposal(config, probe=True) for config in self._probes]

    def tell(self, results: Sequence[Result]) -> None:
        if self._sweep is not None:
            return
        for result in results:
            if result.config in self._probes:
                self._measured[self._probes[result.config]] = result
        if len(self._measured) < len(self._probes):
            return
        self.losses = sensitivities(self._measured, self.epsilon, self.ctx.quality)
        count = self.count or self.ctx.evaluations - len(self._probes)
        self._sweep = _Sweep(self.make, self.points, count, self.refine)
        self._sweep.setup(self.ctx)

    def make(self, knob: float) -> Config:
        """The config at knob ``k``: ``r_avg = k · mean top rank`` in each group."""
        if self.losses is None:
            raise RankSearchError("the sensitivities are not known until the probes are told")
        choices = {}
        for names in self._groups:  # convolutions, then linear layers
            sizes = [int(self._tops[n].max()) for n in names]
            ranks = allocate([self.losses[n] for n in names], sizes, knob)
            for name, rank, size in zip(names, ranks, sizes, strict=True):
                method = self._methods[name]
                grid = self.ctx.space.ranks(name, method)
                choices[name] = Choice(method, _nearest(grid, self._tops[name] * (rank / size)))
        return Config(choices)


_ACCURACY = Objective("accuracy")


def sensitivities(probes: Mapping[str, Result], epsilon: float,
                  quality: Objective = _ACCURACY) -> dict[str, float]:
    """``max(q_dense − q_l, epsilon)`` per site from the probe results (``"dense"`` holds the
    reference), ``q`` the ``quality`` objective with higher better (accuracy, or −mse, ...); a
    failed probe counts as accuracy 0 (for a min metric: as the worst probe)."""
    dense = probes["dense"]
    if not dense.ok:
        raise RankSearchError(
            f"the dense reference of the sensitivity probes failed: {dense.reason}"
        )
    reference = -quality.cost(dense.metrics)
    scores = {name: -quality.cost(r.metrics) for name, r in probes.items()
              if name != "dense" and r.status != "failed"}
    worst = 0.0 if quality.direction == "max" else min(scores.values(), default=reference)
    return {
        name: max(reference - scores.get(name, worst), epsilon)
        for name in probes
        if name != "dense"
    }


def allocate(losses: Sequence[float], sizes: Sequence[float], knob: float) -> np.ndarray:
    """Astrid & Lee's ``rank_l = loss_l / Σ loss · r_avg · L`` with ``r_avg = knob · mean(sizes)``,
    each rank capped at its site's size (maximum rank).

    What the caps cut off goes to the uncapped sites, again in proportion to their loss, so the
    ranks always sum to ``knob · Σ sizes`` (and ``knob ≥ 1`` gives every site its size).
    Without a cap it is the paper's formula exactly. Ranks grow with ``knob``.
    """
    loss = np.asarray(losses, dtype=float)
    size = np.asarray(sizes, dtype=float)
    total = knob * size.sum()
    capped = np.zeros(len(size), dtype=bool)
    while not capped.all():
        scale = (total - size[capped].sum()) / loss[~capped].sum()
        over = ~capped & (scale * loss >= size)
        if not over.any():
            return np.where(capped, size, scale * loss)
        capped |= over
    return size


class _Sweep(SweepStrategy):
    """The `SweepStrategy` over the sensitivity knob, set up once the probes are in."""

    name = "sensitivity"

    def __init__(self, make: Callable[[float], Config], points: Sequence[float] | None,
                 count: int, refine: bool) -> None:
        super().__init__(points, count, refine)
        self._make = make

    def make(self, knob: float) -> Config:
        return self._make(knob)


def _nearest(grid: Sequence[Rank], target: np.ndarray) -> Rank:
    """The grid rank nearest ``target`` (one value per rank component)."""
    return grid[nearest_rank(grid, target)]


__all__ = ["Sensitivity", "allocate", "sensitivities"]
