"""VBMF ranks (Kim et al. 2016), weakened towards full rank (MUSCO, Gusak et al. 2019)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ranksearch import options
from ranksearch.config import Choice, Config
from ranksearch.site import Rank
from ranksearch.strategy import SearchContext, SweepStrategy, fit_to_budget
from ranksearch.vbmf import site_vbmf_rank, snap, spectral_sites

log = logging.getLogger(__name__)


class VBMF(SweepStrategy):
    """Empirical VBMF ranks, and a sweep between them and the top of the grid.

    Each site's rank is the EVBMF rank of its matrices (`ranksearch.vbmf.site_vbmf_rank`:
    Nakajima et al., JMLR 2013; those of the whitened weight with a data-aware cache, see
    `ranksearch.FactorCache.spectral_weight`), as Kim et al. ("Compression of deep
    convolutional neural networks for fast and low power mobile applications", ICLR 2016)
    chose Tucker-2 ranks.
    ``one_shot=True`` proposes only that config. Otherwise the knob is MUSCO's weakening
    factor w (Gusak et al., "Automated multi-stage compression of neural networks", ICCV
    Workshops 2019): rank = vbmf + w·(top − vbmf) for w in [0, 1], top being the top of the
    site's grid (its full rank, unless the grid stops short of it where it would cost as much
    as the dense layer), swept from the largest w that meets the budget down to 0
    (``points``: exactly these w). When even the VBMF ranks
    break the budget, the knob extends below VBMF: for w in [−1, 0) the ranks are
    vbmf·(1 + w), down to the grid minimum at w = −1 (one-shot then proposes the largest such
    w that fits). Ranks snap up to the site's grid, component by component. ``method``: one
    factorization for all sites (default: each site's first); sites it does not apply to, and
    TT/TR sites (whose ranks are not matrix ranks), stay dense. ``refine``: once its configs
    are used up, refine the front for the rest of the budget (`SweepStrategy`), else stop.
    """

    name = "vbmf"
    description = "empirical VBMF ranks (Kim et al.), weakened towards full rank (MUSCO)"

    def __init__(self, one_shot: bool = False, points: Sequence[float] | None = None,
                 count: int | None = None, method: str | None = None,
                 refine: bool = True) -> None:
        self.one_shot = options.boolean(one_shot, "one_shot", self.name)
        points = options.values_in(points, "points (weakening factors)", self.name, -1.0, 1.0)
        super().__init__(points, options.positive_int(count, "count", self.name, optional=True),
                         refine)
        self.method = options.method_name(method, "method", self.name, spectral=True)

    def setup(self, ctx: SearchContext) -> None:
        self.ctx = ctx
        self._sites: dict[str, tuple[str, Rank, Rank, tuple[Rank, ...]]] = {}
        for name, method in spectral_sites(ctx.space, self.method, self.name).items():
            grid = ctx.space.ranks(name, method)
            weight = ctx.cache.spectral_weight(name, method)  # whitened when data-aware
            rank = site_vbmf_rank(ctx.space.site(name), weight, method, grid)
            self._sites[name] = (method, rank, grid[-1], grid)
        vbmf_fits = ctx.feasible(self.make(0.0))
        if self.one_shot:
            knob = 0.0 if vbmf_fits else fit_to_budget(ctx, self.make, -1.0, 0.0)
            if knob < 0:
                log.info("vbmf: the VBMF ranks break %s; scaled by %.3f to fit",
                         ", ".join(map(str, ctx.cost_constraints())), 1 + knob)
            self._queue = [self.make(knob)]
            self.handover.setup(ctx)
            return
        self.low = 0.0 if vbmf_fits else -1.0  # below VBMF only when the budget needs it
        super().setup(ctx)

    def make(self, knob: float) -> Config:
        """Every site at weakening factor ``knob`` (see the class docstring)."""
        choices = {}
        for name, (method, vbmf, top, grid) in self._sites.items():
            low, high = _parts(vbmf), _parts(top)
            if knob >= 0:
                target = tuple(v + knob * (t - v) for v, t in zip(low, high, strict=True))
            else:
                target = tuple(v * (1 + knob) for v in low)
            rank = snap(grid, target if isinstance(vbmf, tuple) else target[0])
            choices[name] = Choice(method, rank)
        return Config(choices)

    @property
    def ranks(self) -> dict[str, Rank]:
        """The VBMF rank of every ranked site, snapped to its grid (after `setup`)."""
        return {name: rank for name, (_, rank, _, _) in self._sites.items()}


def _parts(rank: Rank) -> tuple[int, ...]:
    return (rank,) if isinstance(rank, int) else rank
