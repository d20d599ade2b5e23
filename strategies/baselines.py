"""Baselines every smarter strategy must beat: uniform, rank ∝ channels, and random."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ranksearch import factorize
from ranksearch.config import Choice, Config
from ranksearch.options import boolean, method_name, positive_int, values_in
from ranksearch.refine import feasible_draw
from ranksearch.space import RankSpace, method_for, nearest_rank
from ranksearch.strategy import SearchContext, StopSearch, Strategy, SweepStrategy


class Uniform(SweepStrategy):
    """The same fraction of parameters in every layer, over a grid of fractions.

    The convention of tensorly-torch (``rank=0.5``) and of the thesis that compared
    decompositions with it. ``points``: the fractions (default: ``count`` fractions from the
    largest that meets the budget down to 0.02); ``method``: one factorization for all sites
    (default: each site's first); ``refine``: once the fractions are used up, refine the
    front for the rest of the budget (`SweepStrategy`), else stop.
    """

    name = "uniform"
    description = "the same fraction of parameters in every layer, over a grid of fractions"

    def __init__(self, points: Sequence[float] | None = None, count: int | None = None,
                 method: str | None = None, refine: bool = True) -> None:
        super().__init__(*sweep_options(self.name, points, count), refine=refine)
        self.method = method_name(method, "method", self.name)

    def make(self, knob: float) -> Config:
        return self.ctx.space.uniform(knob, self.method)


class Proportional(SweepStrategy):
    """Rank proportional to channels: every site at the same fraction of its maximum rank
    (each tuple component of its own maximum), swept like `Uniform`."""

    name = "proportional"
    description = "rank proportional to channels (one fraction of the maximum rank everywhere)"

    def __init__(self, points: Sequence[float] | None = None, count: int | None = None,
                 method: str | None = None, refine: bool = True) -> None:
        super().__init__(*sweep_options(self.name, points, count), refine=refine)
        self.method = method_name(method, "method", self.name)

    def make(self, knob: float) -> Config:
        return proportional(self.ctx.space, knob, self.method)


class Random(Strategy):
    """Configurations drawn uniformly among those that meet the cost constraints (rejection
    of uniform draws over each site's choices; see `ranksearch.refine.feasible_draw` for
    when the feasible share is tiny), never one proposed or evaluated before; stops once
    every feasible config is. ``dense``: whether a site may stay dense."""

    name = "random"
    description = "uniform among the configs that meet the constraints"

    def __init__(self, batch: int = 1, dense: bool = True) -> None:
        self.batch = positive_int(batch, "batch", self.name)
        self.dense = boolean(dense, "dense", self.name)

    def setup(self, ctx: SearchContext) -> None:
        super().setup(ctx)
        self.options = {n: ctx.space.choices(n)[: None if self.dense else -1]
                        for n in ctx.space.names}
        self.asked: set[str] = set()

    def ask(self) -> list[Config]:
        known = self.asked | {r.config.key for r in self.ctx.history}
        out = []
        for _ in range(self.batch):
            config = feasible_draw(self.ctx, self.options, known, self.ctx.rng)
            if config is None:
                break
            known.add(config.key)
            out.append(config)
        if not out:
            raise StopSearch  # every feasible config is proposed
        self.asked.update(c.key for c in out)
        return out


def sweep_options(who: str, points: Sequence[float] | None, count: int | None
                  ) -> tuple[list[float] | None, int | None]:
    """The checked ``points`` (fractions in (0, 1]) and ``count`` of a fraction sweep."""
    return (values_in(points, "points (fractions)", who, 0.0, 1.0, open_low=True),
            positive_int(count, "count", who, optional=True))


def proportional(space: RankSpace, fraction: float, method: str | None = None) -> Config:
    """Every site at the grid rank nearest ``fraction`` of its maximum rank."""
    choices = {}
    for site in space.decomposable:
        m = method_for(site, method)
        if m is None:
            continue
        top = factorize.get(m).max_rank(site)
        target = np.atleast_1d(np.asarray(top, dtype=float)) * fraction
        grid = space.ranks(site.name, m)
        choices[site.name] = Choice(m, grid[nearest_rank(grid, target)])
    return Config(choices)
