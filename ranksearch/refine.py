"""Refinement: new feasible configs near a search's front, then feasible configs at random.

What a strategy falls back on so that a search uses its whole evaluation budget: a
deterministic strategy whose own proposals are used up hands the rest of the budget to
`Refiner` (`Handover`), and a strategy whose asks bring nothing new (all stored, or all
breaking a cost constraint) gets one new config added to them (`Refiner.ensure_new`).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np

from .config import Choice, Config
from .pareto import front, minimized_volume
from .population import site_choices
from .result import Result
from .strategy import Proposal, SearchContext, StopSearch

log = logging.getLogger(__name__)

#: Uniform draws tried per feasible random config before other ways are tried.
DRAWS = 1000
#: Spaces up to this many configs are enumerated when uniform draws find nothing new.
ENUMERATE = 200_000


class Refiner:
    """Unevaluated configs that meet the cost constraints: first neighbours of the front of
    the results told so far (one site one step up or down its choices, `site_choices`: its
    rank grid, then dense), the one with the largest estimated hypervolume gain first; once
    none is left, feasible configs drawn uniformly at random; with ``swaps``, also one site one
    step up and another one step down (moves along a cost constraint's boundary); `propose`
    returns nothing only when every feasible config has been proposed or evaluated.

    The gain estimate predicts each objective that is not a cost (accuracy, loss, ...) of a
    neighbour as its front point's value plus the difference a ridge regression on one-hot
    site choices, fitted to every result so far, predicts between the two.
    """

    def __init__(self, ctx: SearchContext, swaps: bool = False) -> None:
        self.ctx = ctx
        self.swaps = swaps
        self.names = ctx.space.names
        self.choices = {n: site_choices(ctx, n) for n in self.names}
        self.asked: set[str] = set()
        self._all = {n: ctx.space.choices(n) for n in self.names}
        self._column = {(n, c): i for i, (n, c) in enumerate(
            (n, c) for n in self.names for c in self._all[n])}

    def known(self) -> set[str]:
        """Keys of the configs evaluated (told with a full score) or proposed already."""
        return self.asked | {r.config.key for r in self.ctx.history if r.partial is None}

    def propose(self, count: int = 1, best: bool = False) -> list[Config]:
        """Up to ``count`` new feasible configs (fewer only when none is left); with ``best``,
        neighbours of the front point best in the first objective come first."""
        out: list[Config] = []
        known = self.known()
        ranked = self._neighbours(known, best)
        while len(out) < count:
            config = ranked.pop(0) if ranked else feasible_draw(
                self.ctx, self._all, known, self.ctx.rng)
            if config is None:
                break
            known.add(config.key)
            out.append(config)
        self.asked.update(c.key for c in out)
        return out

    def ensure_new(self, proposals: Sequence[Config | Proposal]) -> list[Config | Proposal]:
        """``proposals`` plus one new feasible config when none of them is new and feasible
        (an ask that would leave the search idle); `StopSearch` when there is none left."""
        known = self.known()
        for item in proposals:
            p = item if isinstance(item, Proposal) else Proposal(item)
            if p.partial is None and p.config.key not in known and (
                    p.probe or self.ctx.feasible(p.config)):
                return list(proposals)
        extra = self.propose(1)
        if not extra:
            raise StopSearch  # every feasible config is evaluated
        return [*proposals, *extra]

    # -- neighbours -----------------------------------------------------------------------------
    def _neighbours(self, known: set[str], best: bool = False) -> list[Config]:
        ctx = self.ctx
        results = [r for r in ctx.history if r.partial is None]
        points = front(results, ctx.objectives, ctx.cost_constraints())
        found: dict[Config, Result] = {}
        if best and points:
            first = ctx.objectives[0]
            found = self._around([min(points, key=lambda r: first.cost(r.metrics))], known)
        found = found or self._around(points, known)
        if not found:
            return []
        gains = self._gains(found, points, results)
        return sorted(found, key=lambda c: -gains[c])

    def _around(self, points: Sequence[Result], known: set[str]) -> dict[Config, Result]:
        """The unknown feasible moves from ``points``, each with the point it moves from."""
        found: dict[Config, Result] = {}
        for p in points:
            for config in self._moves(p.config):
                if config.key not in known and config not in found and self.ctx.feasible(config):
                    found[config] = p
        return found

    def _moves(self, config: Config) -> Iterable[Config]:
        steps = {name: dict(self._steps(config, name)) for name in self.names}
        for name in self.names:
            for choice in steps[name].values():
                yield config.with_choices({name: choice})
        if self.swaps:
            for up, down in itertools.permutations(self.names, 2):
                if +1 in steps[up] and -1 in steps[down]:
                    yield config.with_choices({up: steps[up][+1], down: steps[down][-1]})

    def _steps(self, config: Config, name: str) -> Iterable[tuple[int, Choice]]:
        """(direction, choice) of site ``name`` one step down (-1) and up (+1) its choices."""
        grid = self.choices[name]
        current = config.get(name)
        if current in grid:
            i = grid.index(current)
            for d in (-1, 1):
                if 0 <= i + d < len(grid):
                    yield d, grid[i + d]

    def _gains(self, found: dict[Config, Result], points: list[Result],
               results: list[Result]) -> dict[Config, float]:
        """Estimated hypervolume gain of each candidate over the front (in objective space
        normalized by the front's range); a candidate estimated dominated scores minus its
        distance to the front."""
        ctx = self.ctx
        objs = ctx.objectives
        ok = [r for r in results if r.ok]
        models = {}
        for o in objs:
            if o.metric not in ctx.costs.metrics(Config()):
                ys = [o.cost(r.metrics) for r in ok]
                models[o.metric] = _ridge(np.array([self._features(r.config) for r in ok]),
                                          np.array(ys, dtype=float))
        F = np.array([[o.cost(p.metrics) for o in objs] for p in points], dtype=float)
        cands = list(found)
        C = np.empty((len(cands), len(objs)))
        for i, c in enumerate(cands):
            p = found[c]
            metrics = ctx.costs.metrics(c)
            diff = self._features(c) - self._features(p.config)
            for j, o in enumerate(objs):
                w = models.get(o.metric)
                C[i, j] = o.cost(metrics) if w is None else o.cost(p.metrics) + float(diff @ w)
        low = np.minimum(F.min(0), C.min(0))
        span = np.maximum(F.max(0) - low, 1e-12)
        F, C = (F - low) / span, (C - low) / span
        ref = np.full(len(objs), 1.1)
        base = minimized_volume(F, ref)
        out = {}
        for c, row in zip(cands, C, strict=True):
            gain = minimized_volume(np.vstack([F, row]), ref) - base
            out[c] = gain if gain > 1e-12 else -float(np.min(np.max(row - F, axis=1)))
        return out

    def _features(self, config: Config) -> np.ndarray:
        x = np.zeros(len(self._column))
        for n in self.names:
            i = self._column.get((n, config.get(n)))
            if i is not None:
                x[i] = 1.0
        return x


def _ridge(X: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Ridge weights (no intercept needed: differences of one-hot rows cancel it)."""
    if len(y) == 0:
        return np.zeros(X.shape[1] if X.ndim == 2 else 0)
    Xc, yc = X - X.mean(0), y - y.mean()
    return np.linalg.solve(Xc.T @ Xc + alpha * np.eye(X.shape[1]), Xc.T @ yc)


def feasible_draw(ctx: SearchContext, choices: dict[str, Sequence[Choice]], exclude: set[str],
                  rng: np.random.Generator) -> Config | None:
    """A config drawn uniformly among those over ``choices`` that meet the cost constraints
    and whose key is not in ``exclude``: by rejection of uniform draws; when `DRAWS` draws
    find none, uniformly among all such configs where the space has at most `ENUMERATE`,
    else by choosing site after site (in random order) among the choices that leave the
    constraints reachable with the later sites at their first choice (feasible, not uniform).
    None when no such config exists."""
    names = list(choices)
    for _ in range(DRAWS):
        config = Config({n: choices[n][int(rng.integers(len(choices[n])))] for n in names})
        if config.key not in exclude and ctx.feasible(config):
            return config
    size = math.prod(len(c) for c in choices.values())
    if size <= ENUMERATE:
        left = [c for combo in itertools.product(*(choices[n] for n in names))
                if (c := Config(dict(zip(names, combo, strict=True)))).key not in exclude
                and ctx.feasible(c)]
        return left[int(rng.integers(len(left)))] if left else None
    for _ in range(DRAWS):
        chosen = {n: choices[n][0] for n in names}
        for n in rng.permutation(names):
            fits = [c for c in choices[n] if ctx.feasible(Config({**chosen, n: c}))]
            if fits:
                chosen[n] = fits[int(rng.integers(len(fits)))]
        config = Config(chosen)
        if config.key not in exclude and ctx.feasible(config):
            return config
    return None


class Handover:
    """What a strategy with a finite list of its own proposals asks once they run out: with
    ``refine`` (the default of every such built-in strategy), `Refiner` proposals for the
    rest of the budget (said once, at INFO); without, `StopSearch`."""

    def __init__(self, who: str, refine: bool) -> None:
        self.who = who
        self.refine = refine
        self.refiner: Refiner | None = None
        self.active = False

    def setup(self, ctx: SearchContext) -> None:
        self.refiner = Refiner(ctx) if self.refine else None
        self.active = False

    def ask(self) -> list[Config]:
        if self.refiner is None:
            raise StopSearch
        if not self.active:
            self.active = True
            done = sum(r.partial is None for r in self.refiner.ctx.history)
            log.info("%s: its own proposals are used up after %d evaluations; refining its "
                     "front for the rest of the budget (refine=False stops instead)",
                     self.who, done)
        configs = self.refiner.propose(1)
        if not configs:
            raise StopSearch  # every feasible config is evaluated
        return configs


__all__ = ["Handover", "Refiner", "feasible_draw"]
