"""Rank selection from layer spectra (of the weights, or data-aware of the whitened weights):
the ALDS error bound and PCA energy."""

from __future__ import annotations

import bisect
import itertools
import logging
import math
from collections.abc import Sequence

import numpy as np

from ranksearch import options
from ranksearch.config import Choice, Config
from ranksearch.cost import METRICS as PRICED
from ranksearch.refine import Handover
from ranksearch.site import Rank
from ranksearch.strategy import SearchContext, Strategy
from ranksearch.vbmf import per_matrix, site_spectra, spectral_sites

log = logging.getLogger(__name__)


class SpectralPath(Strategy):
    """A path of configs from every site at its smallest grid rank upwards, along which ranks
    only rise (so every cost rises and feasibility only falls).

    The last config of the path that meets the cost constraints (found by bisection) is
    proposed first, then ``count`` in all (default: the evaluation budget), spaced evenly in
    cost down to the path's start to trace the front below it (see `_spread`); all in one
    ask. Without constraints the whole path is spanned. Sites get ``method`` (default: their
    first); those that do not admit it, and TT/TR sites, stay dense. The spectra are those of
    `ranksearch.vbmf.site_spectra` (per-group spectra pooled for grouped convolutions): svd
    from ``ctx.cache.singular_values``, the others computed from
    ``ctx.cache.spectral_weight`` once per setup. With a data-aware cache these are the
    spectra of the whitened weights, so the errors and energies they give are those of each
    layer's output on the calibration data, and ranks go where the output error is. Once
    they are used up, ``refine`` (default) refines the front for the rest of the budget
    (`ranksearch.refine.Handover`); ``refine=False`` stops there.
    """

    def __init__(self, count: int | None = None, method: str | None = None,
                 metric: str | None = None, refine: bool = True) -> None:
        self.handover = Handover(self.name, options.boolean(refine, "refine", self.name))
        self.count = options.positive_int(count, "count", self.name, optional=True)
        self.method = options.method_name(method, "method", self.name, spectral=True)
        self.metric = options.choice(metric, "metric", self.name, PRICED, optional=True)

    def setup(self, ctx: SearchContext) -> None:
        super().setup(ctx)
        self.handover.setup(ctx)
        cons = ctx.cost_constraints()
        self.cost_metric = self.metric or ctx.cost_metric
        self.sites = spectral_sites(ctx.space, self.method, self.name)
        self.spectra = {name: self._spectra(name, m) for name, m in self.sites.items()}
        self.path = self.build_path()
        costs = [ctx.costs.metrics(c)[self.cost_metric] for c in self.path]
        top = bisect.bisect_left(self.path, True, key=lambda c: not ctx.feasible(c)) - 1
        self.chosen: Config | None = None
        self._queue: list[Config] = []
        if top < 0:
            log.warning("%s: even the smallest ranks break %s; nothing to propose", self.name,
                        ", ".join(map(str, cons)))
            return
        top = self.settle(top)
        self.chosen = self.fit(top)
        count = self.count or ctx.evaluations
        lead = [self.chosen] if self.chosen != self.path[top] else []
        picks = [self.path[i] for i in _spread(costs[: top + 1], max(count - len(lead), 1))]
        self._queue = [*lead, *picks]

    def ask(self) -> list[Config]:
        if not self._queue:
            return self.handover.ask()
        queue, self._queue = self._queue, []
        return queue

    def build_path(self) -> list[Config]:
        """The configs of the path, cheapest first."""
        raise NotImplementedError

    def settle(self, top: int) -> int:
        """The path index the proposals start from, given the last feasible one."""
        return top

    def fit(self, top: int) -> Config:
        """The config proposed for the budget, given the path index from `settle`."""
        return self.path[top]

    def _spectra(self, name: str, method: str) -> tuple[np.ndarray, ...]:
        if method == "svd":
            return (self.ctx.cache.singular_values(name).cpu().numpy(),)
        site, weight = self.ctx.space.site(name), self.ctx.cache.spectral_weight(name, method)
        return tuple(s.cpu().numpy() for s in site_spectra(site, weight, method))

    def components(self, name: str, rank: Rank) -> tuple[int, ...]:
        """The rank each matrix of the site is truncated at: tucker2 one component each, the
        others one rank for all (CP reads the Tucker unfoldings as a proxy)."""
        if isinstance(rank, tuple):
            return rank
        return (rank,) * len(self.spectra[name])


class ErrorBound(SpectralPath):
    """One global bound ε on every layer's relative error, bisected to meet the budget.

    After ALDS (Liebenwein, Maalouf, Gal, Feldman & Rus, "Compressing neural networks: towards
    determining the optimal layer-wise decomposition", NeurIPS 2021): the relative error of a
    matrix truncated at rank r is σ_{r+1}/σ_1 (its spectral norm over the matrix's); every site
    takes the smallest grid rank whose error is at most ε. For tucker2 each component takes
    the smallest grid value whose unfolding's error is at most ε (the site's error is the
    larger of the two); for CP the Tucker unfoldings stand in for the CP error (a proxy: the
    error of a CP fit is not known without fitting). The path steps through every breakpoint
    of ε (``breakpoints``, from the largest to 0), so the fitted config is tight: the next
    breakpoint below it breaks the budget. Data-free (or, with a data-aware cache, on the
    output error of the calibration data). ``thresholds`` proposes exactly those ε instead
    (most expensive first).
    """

    name = "errorbound"
    description = "one global relative-error bound σ_{r+1}/σ_1 bisected to the budget (ALDS)"

    def __init__(self, thresholds: Sequence[float] | None = None, count: int | None = None,
                 method: str | None = None, refine: bool = True) -> None:
        super().__init__(count, method, refine=refine)
        fixed = options.values_in(thresholds, "thresholds (relative errors)", self.name, 0.0, 1.0)
        self.fixed = None if fixed is None else sorted(fixed)

    def setup(self, ctx: SearchContext) -> None:
        super().setup(ctx)
        if self.fixed is not None:
            self._queue = list(dict.fromkeys(self.config_at(e) for e in self.fixed))

    def build_path(self) -> list[Config]:
        self._tables = {name: self._errors(name, m) for name, m in self.sites.items()}
        steps = {float(e) for tables in self._tables.values() for _, errs in tables for e in errs}
        self.breakpoints = sorted(steps, reverse=True)
        return [self.config_at(e) for e in self.breakpoints]

    def config_at(self, eps: float) -> Config:
        """Every site at its smallest grid rank whose relative error is at most ``eps``."""
        choices = {}
        for name, tables in self._tables.items():
            parts = tuple(int(values[np.argmax(errs <= eps) if errs[-1] <= eps else -1])
                          for values, errs in tables)
            rank = parts if per_matrix(self.sites[name]) else parts[0]
            choices[name] = Choice(self.sites[name], rank)
        return Config(choices)

    def error(self, name: str, rank: Rank) -> float:
        """The relative error of site ``name`` at ``rank``: max over its matrices of
        σ_{r+1}/σ_1 (0 for a zero matrix or a rank at least the matrix's)."""
        return max(_relative_error(s, r)
                   for s, r in zip(self.spectra[name], self.components(name, rank), strict=True))

    def _errors(self, name: str, method: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """(grid values, their errors) per rank component; the errors never rise."""
        grid = self.ctx.space.ranks(name, method)
        if per_matrix(method):
            tables = []
            for i, s in enumerate(self.spectra[name]):
                values = np.array(sorted({g[i] for g in grid}))  # type: ignore[index]
                tables.append((values, np.array([_relative_error(s, v) for v in values])))
            return tables
        values = np.array(grid)
        return [(values, np.array([self.error(name, int(v)) for v in values]))]


class PCAEnergy(SpectralPath):
    """Maximize the product of kept spectral energy under the budget, greedily.

    After Zhang, Zou, He & Sun, "Accelerating very deep convolutional networks for
    classification and detection", TPAMI 38(10), 2016: the objective is Π_l E_l(r_l), with
    E(r) = Σ_{i≤r} σ_i² / Σ σ_i² the energy a truncation at rank r keeps (for tucker2 the
    product over the two channel unfoldings; for CP the same, as a proxy). Greedy: every site
    starts at its smallest grid rank; each step raises the site whose next grid step gains
    the most log energy per unit of ``metric`` (default: the first cost constraint's metric,
    else the first cost objective's, else flops); the steps form the path. The proposal for
    the budget continues from the last feasible step with the best steps that still fit and
    still gain energy.
    """

    name = "pca_energy"
    description = "greedy maximum product of kept spectral energy under the budget (Zhang)"

    def energy(self, config: Config) -> float:
        """Π over the ranked sites of the kept energy; a site not in ``config`` keeps all."""
        return math.exp(sum(self._log_energy(name, config[name].rank)
                            for name in self.sites if name in config))

    def build_path(self) -> list[Config]:
        space, costs = self.ctx.space, self.ctx.costs
        self._grids = {name: space.ranks(name, m) for name, m in self.sites.items()}
        self._gain = {name: [self._log_energy(name, r) for r in grid]
                      for name, grid in self._grids.items()}
        self._cost = {
            name: [costs.metrics(Config({name: Choice(self.sites[name], r)}))[self.cost_metric]
                   for r in grid]
            for name, grid in self._grids.items()
        }
        steps = {name: 0 for name in self.sites}
        self._steps = [dict(steps)]
        while (name := next(iter(self._ranked(steps)), None)) is not None:
            steps[name] += 1
            self._steps.append(dict(steps))
        self._logs = [sum(self._gain[name][k] for name, k in s.items()) for s in self._steps]
        return [self._config(s) for s in self._steps]

    def settle(self, top: int) -> int:
        """The first path index that keeps as much energy as ``top``: the steps after it gain
        none (a layer of zeros, a spectrum that ends early), so they would only add cost."""
        return next(i for i in range(top + 1) if self._logs[i] >= self._logs[top])

    def fit(self, top: int) -> Config:
        steps = dict(self._steps[top])
        while True:
            for name in self._ranked(steps, useful=True):
                if self.ctx.feasible(self._config({**steps, name: steps[name] + 1})):
                    steps[name] += 1
                    break
            else:
                return self._config(steps)

    def _ranked(self, steps: dict[str, int], useful: bool = False) -> list[str]:
        """The sites that can rise (``useful``: and gain energy), best log-energy gain per
        unit cost first (ties: model order)."""
        scores = {}
        for name, k in steps.items():
            if k + 1 < len(self._grids[name]):
                gain = self._gain[name][k + 1] - self._gain[name][k]
                if useful and gain <= 0:
                    continue
                extra = self._cost[name][k + 1] - self._cost[name][k]
                scores[name] = gain / extra if extra > 0 else math.inf
        return sorted(scores, key=lambda n: -scores[n])

    def _config(self, steps: dict[str, int]) -> Config:
        return Config({name: Choice(self.sites[name], self._grids[name][k])
                       for name, k in steps.items()})

    def _log_energy(self, name: str, rank: Rank) -> float:
        return sum(math.log(_kept_energy(s, r))
                   for s, r in zip(self.spectra[name], self.components(name, rank), strict=True))


def _spread(costs: list[float], count: int) -> list[int]:
    """``count`` indices of a path with non-decreasing ``costs`` (all if it is shorter), the
    last and the first among them, spaced evenly in cost; where several targets land on one
    config, the widest gaps are split. Most expensive first."""
    last = len(costs) - 1
    if last < count:
        return list(range(last, -1, -1))
    chosen = {0, last, *(bisect.bisect_right(costs, t) - 1
                         for t in np.linspace(costs[0], costs[-1], count))}
    while len(chosen) < count:
        ordered = sorted(chosen)
        _, a, b = max((b - a, a, b) for a, b in itertools.pairwise(ordered))
        chosen.add((a + b) // 2)
    return sorted(chosen, reverse=True)[:count]


def _relative_error(s: np.ndarray, rank: int) -> float:
    """σ_{r+1}/σ_1 of a descending spectrum (0 past its end or for a zero matrix)."""
    if rank >= len(s) or s[0] <= 0:
        return 0.0
    return float(s[rank] / s[0])


def _kept_energy(s: np.ndarray, rank: int) -> float:
    """Σ_{i≤r} σ_i² / Σ σ_i² (1 for a zero matrix)."""
    total = float(np.sum(s**2))
    return float(np.sum(s[:rank] ** 2)) / total if total > 0 else 1.0

