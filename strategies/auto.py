"""The default strategy: a portfolio that spends the whole budget in phases."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ranksearch import options
from ranksearch.config import Config
from ranksearch.errors import RankSearchError
from ranksearch.refine import Refiner
from ranksearch.strategy import Proposal, SearchContext, StopSearch, Strategy, load_strategy

from .optuna import OptunaSampler

log = logging.getLogger(__name__)

#: The analytic sweeps of the first phase, strongest at small budgets first.
SWEEPS = ("pca_energy", "errorbound", "vbmf")


class Auto(Strategy):
    """The dense model and the analytic sweeps first, then refinement of the front (optionally
    with TPE asks), for the whole budget.

    Phase one, ``analytic`` of the budget (at least 4 evaluations): the dense model where it
    meets the constraints, then the first config of each data-free sweep in ``sweeps`` (PCA
    energy, the ALDS error bound, VBMF: each traces a front under the cost constraints from
    layer spectra alone, from the costliest config that meets them down), then the rest of
    the sweeps, the one whose first config scored best first, each in `spread` order (its
    cheapest end, then the middle of the widest gap left, ...), duplicates once. Phase two,
    for the rest of the budget: `ranksearch.refine.Refiner` proposals (unevaluated feasible
    neighbours of the front, by estimated hypervolume gain, then feasible configs at random;
    with ``swaps``, also one-up-one-down moves along a cost constraint); every
    ``best_every``-th of them (default: 2 under a cost constraint, else 0: never) takes the
    neighbours of the front point best in the first objective (the most accurate feasible
    config) first, and every ``tpe_every``-th ask (0, the default: never) is instead a TPE
    proposal (`OptunaSampler`, one categorical per site, told every result so far).

    On the exhaustive benchmark: under ``flops<=0.4`` asking around the most accurate point
    every second time raised the hypervolume at 64 evaluations, and unconstrained it lowered
    it at 16 and 32 (there the whole front counts, not its most accurate end); TPE asks and
    swaps lowered it; the spread order of the sweeps raised it at 16 on the coarse digits
    grid, and made this ahead of the sensitivity probes, which an earlier version used
    unconstrained. It never stops while the budget lasts and a feasible config is
    unevaluated.
    """

    name = "auto"
    description = "analytic sweeps, then refinement of the front, for the whole budget"

    def __init__(self, analytic: float = 0.0625, sweeps: str | Sequence[str] = SWEEPS,
                 tpe_every: int = 0, best_every: int | None = None,
                 swaps: bool = False) -> None:
        who = self.name
        self.analytic = options.fraction(analytic, "analytic", who)
        self.sweeps = options.names(sweeps, "sweeps", who)
        self.tpe_every = options.integer(tpe_every, "tpe_every", who, 0)
        self.best_every = None if best_every is None else options.integer(
            best_every, "best_every", who, 0)
        self.swaps = options.boolean(swaps, "swaps", who)

    def setup(self, ctx: SearchContext) -> None:
        super().setup(ctx)
        constrained = bool(ctx.cost_constraints())
        self.refiner = Refiner(ctx, swaps=self.swaps and constrained)
        self._every = (2 if constrained else 0) if self.best_every is None else self.best_every
        self._share = max(4, round(self.analytic * ctx.evaluations))
        self._lists = [c for c in (self._sweep(n, self._share) for n in self.sweeps) if c]
        self._queue = [Config(), *(c[0] for c in self._lists)]
        self._ranked = False
        self._tpe: OptunaSampler | None = None
        self._told = 0
        self._asks = 0

    def _rank_sweeps(self) -> None:
        """Queue the rest of the sweeps, the one whose first config scored best first, each
        in `spread` order."""
        score = {r.config.key: self.ctx.objectives[0].cost(r.metrics)
                 for r in self.ctx.history if r.ok and r.partial is None}
        lists = sorted(self._lists, key=lambda c: score.get(c[0].key, float("inf")))
        queue = dict.fromkeys(c[i] for c in lists for i in spread(len(c)))
        self._queue = list(queue)[: self._share]
        self._ranked = True

    def _sweep(self, name: str, count: int) -> list[Config]:
        """The configs sweep ``name`` proposes with ``count`` (none if it does not apply)."""
        try:
            sweep = load_strategy(name, {"count": count, "refine": False})
            sweep.setup(self.ctx)
            out: list[Config] = []
            while True:
                out += [c for c in sweep.ask() if isinstance(c, Config)]
        except StopSearch:
            return out
        except RankSearchError as e:
            log.info("auto: sweep %s does not apply (%s)", name, e)
            return []

    def ask(self) -> list[Config | Proposal]:
        known = self.refiner.known()
        if not self._queue and not self._ranked:
            self._rank_sweeps()
        while self._queue:
            config = self._queue.pop(0)
            if config.key not in known and self.ctx.feasible(config):
                self.refiner.asked.add(config.key)
                return [config]
        self._asks += 1
        if self.tpe_every and self._asks % self.tpe_every == 0:
            return self._tpe_ask()
        best = bool(self._every) and self._asks % self._every == 0
        configs = self.refiner.propose(1, best=best)
        if not configs:
            raise StopSearch  # every feasible config is evaluated
        return list(configs)

    def _tpe_ask(self) -> list[Config]:
        if self._tpe is None:
            self._tpe = OptunaSampler(encoding="categorical")
            self._tpe.setup(self.ctx)
        history = self.ctx.history
        self._tpe.seed([r for r in history[self._told:] if r.partial is None])
        self._told = len(history)
        configs = [c for c in self._tpe.ask() if isinstance(c, Config)]
        self.refiner.asked.update(c.key for c in configs)
        return configs

    def tell(self, results: Sequence[object]) -> None:
        if self._tpe is not None:
            self._tpe.tell(results)  # type: ignore[arg-type]


def spread(n: int) -> list[int]:
    """The indices 0..n-1 with the ends first, then the middle of the widest gap left, in
    turn: 0, n-1, (n-1)//2, ... A sweep's configs go from the costliest that meets the
    constraints to the cheapest, so a prefix of this order spans the sweep's whole range."""
    if n <= 2:
        return list(range(n))
    out, gaps = [0, n - 1], [(0, n - 1)]
    while gaps:
        lo, hi = max(gaps, key=lambda g: (g[1] - g[0], -g[0]))
        gaps.remove((lo, hi))
        if hi - lo >= 2:
            mid = (lo + hi) // 2
            out.append(mid)
            gaps += [(lo, mid), (mid, hi)]
    return out


__all__ = ["SWEEPS", "Auto", "spread"]
