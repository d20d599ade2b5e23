"""Any Optuna sampler as a strategy: TPE and GP (Bayesian optimization), NSGA-II, random, QMC.

The sampler drives an in-memory Optuna study through ask/tell (the search's store stays the
system of record, so a re-run with the same seed replays the same asks and tells and resumes).
Each site is one parameter, the index of its choice (`site_choices`), as an integer (ordered:
ranks grow with it) or a categorical. The objectives become the study's directions, and every
cost constraint an Optuna constraint set on each trial (``Trial.set_constraint``, read by the
TPE, GP and NSGA-II samplers). Samplers: TPE (Bergstra et al., NeurIPS 2011; multi-objective:
Ozaki et al., GECCO 2020 / JAIR 2022), GP with log-EI / log-EHVI, NSGA-II (Deb et al., IEEE
TEVC 2002), random and quasi-Monte Carlo (Sobol or Halton); Akiba et al., KDD 2019 for Optuna.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import Trial, TrialState

from ranksearch.config import Config
from ranksearch.errors import OptionError
from ranksearch.options import boolean, choice, mapping, positive_int
from ranksearch.population import MissingValues, objective_costs, site_choices
from ranksearch.refine import Refiner
from ranksearch.result import Result
from ranksearch.store import quiet_optuna
from ranksearch.strategy import SearchContext, Strategy

if not hasattr(Trial, "set_constraint"):
    raise ImportError(f"the optuna strategy needs optuna>=5.0 (Trial.set_constraint); this is "
                      f"optuna {optuna.__version__}")

SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {
    "tpe": optuna.samplers.TPESampler,
    "gp": optuna.samplers.GPSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
    "random": optuna.samplers.RandomSampler,
    "qmc": optuna.samplers.QMCSampler,
}
#: Sampled configs that break a cost constraint told back before one ask gives up filtering.
MAX_REJECTED = 100


class OptunaSampler(Strategy):
    """An Optuna sampler proposing configs ``batch`` at a time.

    Options: ``sampler`` (one of `SAMPLERS`), ``sampler_options`` (its keyword arguments; by
    default TPE and GP start with random trials for a quarter of the budget, 4 to 10, and
    NSGA-II's population is a quarter of the budget, 4 to 16; QMC is scrambled, so that the
    seed matters), ``batch``, ``encoding`` (``"int"`` or ``"categorical"``), ``dense`` and
    ``cheaper`` (see `site_choices`). A sampled config that breaks a cost constraint is told
    back at once as infeasible (objectives at their worst, constraint violation positive) and
    another is sampled; evaluations that fail are told as FAIL, pruned ones as PRUNED. An ask
    with nothing new to evaluate (the sampler repeating stored configs, or finding nothing
    feasible) gets one new config from `ranksearch.refine.Refiner` added.

    A larger budget replays the earlier run only while those budget-derived defaults stay the
    same: to extend a search, give ``n_startup_trials`` (``population_size``) explicitly.
    """

    name = "optuna"
    description = "any Optuna sampler: TPE or GP (Bayesian optimization), NSGA-II, random, QMC"

    def __init__(self, sampler: str = "tpe", sampler_options: Mapping[str, Any] | None = None,
                 batch: int = 1, encoding: str = "int", dense: bool = True,
                 cheaper: bool = True) -> None:
        who = self.name
        self.sampler = choice(sampler, "sampler", who, sorted(SAMPLERS))
        self.sampler_options = mapping(sampler_options, "sampler_options", who)
        self.batch = positive_int(batch, "batch", who)
        self.encoding = choice(encoding, "encoding", who, ("int", "categorical"))
        self.dense = boolean(dense, "dense", who)
        self.cheaper = boolean(cheaper, "cheaper", who)
        self._make_sampler(seed=0, evaluations=16)  # bad sampler options fail here

    @quiet_optuna()  # Optuna logs every study created and trial told at INFO
    def setup(self, ctx: SearchContext) -> None:
        super().setup(ctx)
        self.choices = {n: site_choices(ctx, n, self.dense, self.cheaper)
                        for n in ctx.space.names}
        self.study = optuna.create_study(
            directions=["maximize" if o.direction == "max" else "minimize"
                        for o in ctx.objectives],
            sampler=self._make_sampler(int(ctx.rng.integers(2**31 - 1)), ctx.evaluations),
        )
        self.missing = MissingValues(ctx.objectives)
        self.pending: list[tuple[Trial, Config]] = []
        self.refiner = Refiner(ctx)
        self._told: set[str] = set()

    def ask(self) -> list[Config]:
        rejected = 0
        while len(self.pending) < self.batch:
            trial = self.study.ask()
            config = self._sample(trial)
            if rejected < MAX_REJECTED and not self.ctx.feasible(config):
                self._tell(trial, Result(config, self.ctx.costs.metrics(config), "failed",
                                         "infeasible: breaks a cost constraint"))
                rejected += 1
                continue
            self.pending.append((trial, config))
        return self.refiner.ensure_new([config for _, config in self.pending])

    def tell(self, results: Sequence[Result]) -> None:
        by_key = {r.config.key: r for r in results}
        waiting = []
        for trial, config in self.pending:
            if config.key in by_key:
                self._tell(trial, by_key[config.key])
            else:  # not answered (the budget ran out): proposed again by the next ask
                waiting.append((trial, config))
        self.pending = waiting

    @quiet_optuna()
    def seed(self, results: Sequence[Result]) -> None:
        """Tell the study results it did not ask for (those of other strategies), each as a
        trial with its config's parameters; results already told, and configs off its
        choices, are left out."""
        pending = {config.key for _, config in self.pending}
        for result in results:
            key = result.config.key
            index = self._params(result.config)
            if key in self._told or key in pending or index is None:
                continue
            self.study.enqueue_trial(index)
            self._tell(self.study.ask(), result)

    # -- internals ------------------------------------------------------------------------------
    def _params(self, config: Config) -> dict[str, int] | None:
        """The trial parameters of ``config`` (None if a site's choice is not encoded)."""
        params = {}
        for name, choices in self.choices.items():
            if config.get(name) not in choices:
                return None
            params[name] = choices.index(config.get(name))
        return params

    def _sample(self, trial: Trial) -> Config:
        for name, choices in self.choices.items():
            if self.encoding == "int":
                trial.suggest_int(name, 0, len(choices) - 1)
            else:
                trial.suggest_categorical(name, list(range(len(choices))))
        return self.config_of(trial.params)

    def config_of(self, params: Mapping[str, int]) -> Config:
        """The config of a trial's parameters (one choice index per site)."""
        return Config({n: choices[params[n]] for n, choices in self.choices.items()})

    @quiet_optuna()
    def _tell(self, trial: Trial, result: Result) -> None:
        self._told.add(result.config.key)
        for c in self.ctx.cost_constraints():
            trial.set_constraint(str(c), c.violation(result.metrics))
        infeasible = not self.ctx.feasible(result.config)
        if result.ok or infeasible:
            costs = self.missing.fill(objective_costs([result], self.ctx.objectives))[0]
            signs = np.array([o.sign for o in self.ctx.objectives])
            self.study.tell(trial, (costs * signs).tolist())
        else:
            state = TrialState.PRUNED if result.status == "pruned" else TrialState.FAIL
            self.study.tell(trial, state=state)

    def _make_sampler(self, seed: int, evaluations: int) -> optuna.samplers.BaseSampler:
        options: dict[str, Any] = {"seed": seed}
        if self.sampler in ("tpe", "gp"):
            options["n_startup_trials"] = max(4, min(10, evaluations // 4))
        elif self.sampler == "nsga2":
            options["population_size"] = max(4, min(16, evaluations // 4))
        elif self.sampler == "qmc":
            options["scramble"] = True  # else every seed gives the same sequence
        options.update(self.sampler_options)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return SAMPLERS[self.sampler](**options)
        except (TypeError, ValueError) as e:
            raise OptionError(
                f"optuna: bad sampler_options {self.sampler_options!r} for {self.sampler!r} "
                f"({e}); they must be keyword arguments of {SAMPLERS[self.sampler].__name__}"
            ) from e


__all__ = ["SAMPLERS", "OptunaSampler"]
