"""NSGA-II over per-layer rank codes, with PSTRN's progressive narrowing of the code ranges.

Each site is one integer gene: an index into the site's choices (`RankSpace.choices`: each
method's rank grid, then ``dense``). The population evolves by NSGA-II (Deb, Pratap, Agarwal,
Meyarivan, "A fast and elitist multiobjective genetic algorithm: NSGA-II", IEEE TEVC 6(2),
2002) through pymoo 0.6's ask/tell, with the search's objectives in minimization form and its
cost constraints as pymoo's inequality constraints ``G <= 0`` (constrained domination). PSTRN
(Li, Pan, Chen, Ding, Zhao, Xu, "Heuristic rank selection with progressively searching tensor
ring network", Complex & Intelligent Systems 8(2), 2022) alternates such an evolutionary phase
with a progressive phase that narrows every gene's range around the best codes found.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2 as PymooNSGA2
from pymoo.core.evaluator import Evaluator as PymooEvaluator
from pymoo.core.problem import Problem
from pymoo.core.termination import NoTermination
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair
from pymoo.problems.static import StaticProblem

from ranksearch import options
from ranksearch.config import Choice, Config
from ranksearch.errors import OptionError, UnknownStrategyError
from ranksearch.pareto import best, front, knee
from ranksearch.population import MissingValues, objective_costs, site_choices
from ranksearch.refine import Refiner
from ranksearch.result import Result
from ranksearch.strategy import (
    SearchContext,
    StopSearch,
    Strategy,
    SweepStrategy,
    fit_to_budget,
    load_strategy,
)


class NSGA2(Strategy):
    """NSGA-II on integer rank codes; a whole generation is asked at once.

    Options: ``pop_size`` (default: a quarter of the budget, between 4 and 16),
    ``generations`` (default: until the budget runs out), ``dense`` (whether a site may stay
    dense), ``cheaper`` (only factorizations cheaper than the dense layer, see `site_choices`),
    ``narrow_after`` (PSTRN: after this many generations narrow the ranges around the
    incumbent and restart the evolution there, seeded with the current front; a generation
    with nothing new in a narrowed box widens it back to the whole space and starts the cycle
    over; default: never narrow), ``narrow_width`` (the half-width in codes of each narrowed
    range, or one per successive narrowing, the last one repeating; PSTRN shrank 5 → 2 → 1),
    ``seed_with`` (one-knob strategies, e.g. ``"uniform"``, whose configs at a few knobs from
    the budget down seed half the first population), ``crossover_eta`` and ``mutation_eta``
    (SBX and polynomial mutation). Seeded as it is by the search, a re-run replays the same
    generations; with a larger budget only while the default ``pop_size`` stays the same (to
    extend a search, give ``pop_size``). A generation with nothing new to evaluate (all
    stored, or all breaking a cost constraint) gets one new config from `Refiner` added, and
    when no offspring can be produced the search goes on with `Refiner` proposals, so the
    budget is used while feasible configs remain.
    """

    name = "nsga2"
    description = "NSGA-II on per-layer rank codes (pymoo), optionally with PSTRN's narrowing"

    def __init__(
        self,
        pop_size: int | None = None,
        generations: int | None = None,
        dense: bool = True,
        cheaper: bool = True,
        narrow_after: int | None = None,
        narrow_width: int | Sequence[int] = (4, 2, 1),
        seed_with: str | Sequence[str] = (),
        crossover_eta: float = 15.0,
        mutation_eta: float = 20.0,
    ) -> None:
        who = self.name
        self.pop_size = options.integer(pop_size, "pop_size", who, 2, optional=True)
        self.generations = options.positive_int(generations, "generations", who, optional=True)
        self.dense = options.boolean(dense, "dense", who)
        self.cheaper = options.boolean(cheaper, "cheaper", who)
        self.narrow_after = options.positive_int(narrow_after, "narrow_after", who,
                                                 optional=True)
        self.widths = options.integers(narrow_width, "narrow_width", who)
        self.crossover_eta = options.positive(crossover_eta, "crossover_eta", who)
        self.mutation_eta = options.positive(mutation_eta, "mutation_eta", who)
        self.seeders = [_seeder(name, seed_with)
                        for name in options.names(seed_with, "seed_with", who)]

    # -- strategy interface ---------------------------------------------------------------------
    def setup(self, ctx: SearchContext) -> None:
        super().setup(ctx)
        space = ctx.space
        self.choices = {n: site_choices(ctx, n, self.dense, self.cheaper) for n in space.names}
        self.upper = np.array([len(c) - 1 for c in self.choices.values()])
        self.lower = np.zeros_like(self.upper)
        self.size = self.pop_size or min(16, max(4, ctx.evaluations // 4))
        self.missing = MissingValues(ctx.objectives)
        self.told: list[Result] = []
        self.seen: set[str] = set()
        self.generation = 0
        self.narrowings = 0
        self.pending: list[Config] | None = None
        self.refiner = Refiner(ctx)
        seeds = [self.encode(c) for c in self._seed_configs()]
        self._start(self.lower, self.upper, seeds)

    def ask(self) -> list[Config]:
        if self.pending is not None:  # a generation only partly answered
            return self.refiner.ensure_new(self.pending)
        if self.generations is not None and self.generation >= self.generations:
            raise StopSearch
        self.population = self.algorithm.ask()
        if self.population is None or len(self.population) == 0:
            # no new offspring could be produced: refine the front instead
            configs = self.refiner.propose(1)
            if not configs:
                raise StopSearch  # every feasible config is evaluated
            return list(configs)
        self.pending = [self.decode(x) for x in self.population.get("X")]
        return self.refiner.ensure_new(self.pending)

    def tell(self, results: Sequence[Result]) -> None:
        by_key = {r.config.key: r for r in results}
        new = [r for key, r in by_key.items() if key not in self.seen]
        self.seen.update(by_key)
        self.told.extend(new)
        if self.pending is None or any(c.key not in by_key for c in self.pending):
            return  # the budget ran out inside the generation: nothing more will be asked
        answered = [by_key[c.key] for c in self.pending]
        self.pending = None
        F = self.missing.fill(objective_costs(answered, self.ctx.objectives))
        out = {"F": F}
        cons = self.ctx.cost_constraints()
        if cons:
            out["G"] = np.array([[c.violation(r.metrics) for c in cons] for r in answered])
        PymooEvaluator(skip_already_evaluated=False).eval(
            StaticProblem(self.problem, **out), self.population)
        self.algorithm.tell(infills=self.population)
        self.generation += 1
        self.age += 1
        if self.narrowings and not new:  # the narrowed box is used up: widen it back
            self.narrowings = 0
            self._start(self.lower, self.upper, self._front_codes())
        elif self.narrow_after and self.age >= self.narrow_after:
            self._narrow()

    # -- codes ----------------------------------------------------------------------------------
    def decode(self, codes: np.ndarray) -> Config:
        """The config of a code vector (one index into each site's choices)."""
        return Config({n: ch[int(i)] for (n, ch), i in zip(self.choices.items(), codes,
                                                            strict=True)})

    def encode(self, config: Config) -> np.ndarray:
        """The code vector of ``config``; a choice off the grid takes the nearest grid rank of
        its method, and a dense site without the dense choice takes the top code."""
        return np.array([_code(ch, config.get(n)) for n, ch in self.choices.items()])

    # -- internals ------------------------------------------------------------------------------
    def _start(self, lower: np.ndarray, upper: np.ndarray, seeds: Sequence[np.ndarray]) -> None:
        """(Re)start pymoo in the box [lower, upper], the first population being ``seeds``
        (clipped into the box; at most half the population, evenly spread over them) filled up
        with random codes."""
        self.box = (lower, upper)
        self.age = 0
        rows = np.clip(np.array(seeds, dtype=int).reshape(-1, len(lower)), lower, upper)
        rows = rows[np.sort(np.unique(rows, axis=0, return_index=True)[1])]
        if len(rows) > self.size // 2:
            rows = rows[np.linspace(0, len(rows) - 1, self.size // 2).round().astype(int)]
        fill = self.ctx.rng.integers(lower, upper + 1, size=(self.size - len(rows), len(lower)))
        self.problem = Problem(n_var=len(lower), n_obj=len(self.ctx.objectives),
                               n_ieq_constr=len(self.ctx.cost_constraints()), xl=lower,
                               xu=upper, vtype=int)
        self.algorithm = PymooNSGA2(
            pop_size=self.size,
            sampling=np.vstack([rows, fill]),
            crossover=SBX(prob=0.9, eta=self.crossover_eta, vtype=float, repair=RoundingRepair()),
            mutation=PM(eta=self.mutation_eta, vtype=float, repair=RoundingRepair()),
            eliminate_duplicates=True,
            seed=int(self.ctx.rng.integers(2**31 - 1)),
        )
        self.algorithm.setup(self.problem, termination=NoTermination())

    def _narrow(self) -> None:
        """PSTRN's progressive phase: narrow every range around the best codes and restart the
        evolution there from the current front."""
        centre = self.incumbent()
        if centre is None:
            return
        width = self.widths[min(self.narrowings, len(self.widths) - 1)]
        self.narrowings += 1
        lower, upper = narrow(self.encode(centre.config), width, self.lower, self.upper)
        self._start(lower, upper, self._front_codes())

    def _front_codes(self) -> list[np.ndarray]:
        points = front(self.told, self.ctx.objectives, self.ctx.cost_constraints())
        return [self.encode(r.config) for r in points]

    def incumbent(self) -> Result | None:
        """The incumbent the ranges narrow around: the best result under the constraints by
        the first maximized objective when there are constraints, else the front's knee."""
        if not any(r.ok for r in self.told):
            return None
        if self.ctx.constraints:
            top = next((o for o in self.ctx.objectives if o.direction == "max"),
                       self.ctx.objectives[0])
            incumbent = best(self.told, self.ctx.constraints, metric=top)
            if incumbent is not None:
                return incumbent
        return knee(self.told, self.ctx.objectives)

    def _seed_configs(self) -> list[Config]:
        configs: list[Config] = []
        per = max(1, self.size // (2 * len(self.seeders))) if self.seeders else 0
        for seeder in self.seeders:
            seeder.setup(self.ctx)
            top = fit_to_budget(self.ctx, seeder.make, seeder.low, seeder.high)
            configs.extend(seeder.make(float(k)) for k in np.linspace(top, seeder.low, per))
        return configs


def _seeder(name: str, seed_with: object) -> SweepStrategy:
    """The one-knob strategy ``name`` of the ``seed_with`` option: any `SweepStrategy`
    (`OptionError` if it is unknown or not a sweep)."""
    hint = "each must be a one-knob SweepStrategy, e.g. 'uniform', 'proportional' or 'vbmf'"
    try:
        seeder = load_strategy(name)
    except UnknownStrategyError as e:
        raise OptionError(f"nsga2: seed_with={seed_with!r}: {e} ({hint})") from None
    if not isinstance(seeder, SweepStrategy):
        raise OptionError(f"nsga2: seed_with={seed_with!r}: {name!r} is not a one-knob "
                          f"strategy (not a SweepStrategy); {hint}")
    return seeder


def narrow(centre: np.ndarray, width: int, lower: np.ndarray, upper: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """The box ``centre ± width`` clipped to [lower, upper] (PSTRN's progressive phase)."""
    centre = np.clip(centre, lower, upper)
    return np.maximum(lower, centre - width), np.minimum(upper, centre + width)


def _code(choices: Sequence[Choice], choice: Choice) -> int:
    if choice in choices:
        return choices.index(choice)
    same = [i for i, c in enumerate(choices) if c.method == choice.method]
    if not same:
        return len(choices) - 1
    size = float(np.sum(choice.rank))
    return min(same, key=lambda i: abs(float(np.sum(choices[i].rank)) - size))


__all__ = ["NSGA2", "MissingValues", "narrow", "objective_costs", "site_choices"]
