"""Beam search over joint rank reductions (Eo, Kang & Rhee, "An effective low-rank compression
with a joint rank selection followed by a compression-friendly training", Neural Networks 161,
2023: the modified beam search of BSR)."""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

from ranksearch import factorize
from ranksearch.cost import METRICS as PRICED
from ranksearch.errors import RankSearchError
from ranksearch.space import Choice, Config, method_for
from ranksearch.strategy import SearchContext, StopSearch, Strategy

log = logging.getLogger(__name__)

Point = tuple[int, ...]  # one grid index per site


class _Child(NamedTuple):
    """A scored child; tuples sort by slope, then cost, then key (deterministic)."""

    slope: float
    cost: float
    key: str
    point: Point
    config: Config
    accuracy: float


class Beam(Strategy):
    """Beam search from the top ranks down, scored by mini-batch accuracy without fine-tuning.

    The beam starts at the top of every site's grid for ``method`` (default: each site's
    first; sites without it stay dense): its maximum rank, unless the grid stops short of it
    where it would cost as much as the dense layer. Each step, every member
    has one child per site: that site's rank lowered by ``step`` grid steps (default:
    1/``moves`` of the site's grid, at least one step, so that each site reaches its lowest
    rank in about ``moves`` moves; ``step=1`` is the finest search and the slowest). The
    search scores about width × sites × sites × moves children, so ``width`` and ``moves``
    bound its time on deep models. Children are
    scored by `Evaluator.quick_accuracy` on the first ``minibatches`` validation batches (not
    stored) and the best ``width`` kept. BSR keeps the most accurate candidates at each
    compression step; since our children differ in how much cost they save, they are ranked
    by accuracy lost per unit of cost saved, both counted from the start (so the
    accuracy at the cost reached decides), ties going to the cheaper. Cost is the mean ratio to
    the dense model of the constrained metrics (else of the cost objectives, else FLOPs).

    Where a member breaks a cost constraint, each line of the beam stops at the budget: a move
    that crosses it lowers the site only as far as needed, and the most accurate of these
    crossing children is the budget's answer (``answer``). The search then goes on down to
    the lowest ranks, and the best member of each step (``path``) traces a front below the
    budget. Proposed as evaluations under the search's proxy: the answer first, then the
    path's configs that meet the budget, spread evenly when there are more than the evaluation
    budget allows. Nothing over the budget is ever proposed; without constraints the path is.
    """

    name = "beam"
    description = "beam search lowering one layer's rank at a time, scored on a mini-batch (BSR)"

    def __init__(self, width: int = 4, step: int | None = None, minibatches: int = 1,
                 method: str | None = None, moves: int = 8) -> None:
        checked = (("width", width), ("step", 1 if step is None else step),
                   ("minibatches", minibatches), ("moves", moves))
        for key, value in checked:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RankSearchError(f"{key} must be an integer ≥ 1, got {value!r}")
        if method is not None:
            factorize.get(method)  # an unknown name raises here
        self.width = width
        self.step = step
        self.minibatches = minibatches
        self.method = method
        self.moves = moves

    def setup(self, ctx: SearchContext) -> None:
        super().setup(ctx)
        if ctx.evaluator is None:
            raise RankSearchError("beam search scores candidates with the search's evaluator")
        methods = {s.name: m for s in ctx.space.decomposable
                   if (m := method_for(s, self.method)) is not None}
        if not methods:
            raise RankSearchError(f"no layer of the space admits the method {self.method!r}")
        self._names = tuple(methods)
        self._methods = tuple(methods.values())
        self._grids = tuple(ctx.space.ranks(n, m) for n, m in zip(self._names, self._methods,
                                                                   strict=True))
        self._steps = tuple(self.step or -(-len(g) // self.moves) for g in self._grids)
        constrained = [c.metric for c in ctx.cost_constraints()]
        objectives = [o.metric for o in ctx.objectives if o.metric in PRICED]
        self._metrics = tuple(dict.fromkeys(constrained or objectives or ["flops"]))
        self._done = False
        #: (config, quick accuracy) of the best member of each step, from the grid tops down
        self.path: list[tuple[Config, float]] = []
        #: (config, quick accuracy) of the most accurate child that crossed the budget
        self.answer: tuple[Config, float] | None = None

    def ask(self) -> list[Config]:
        if self._done:
            raise StopSearch
        self._done = True
        self._search()
        return self._proposals()

    def cost(self, config: Config) -> float:
        """The mean cost ratio (to the dense model) that ranks the children."""
        metrics = self.ctx.costs.metrics(config)
        return float(np.mean([metrics[f"{m}_ratio"] for m in self._metrics]))

    def _config(self, point: Point) -> Config:
        return Config({
            n: Choice(m, grid[i])
            for n, m, grid, i in zip(self._names, self._methods, self._grids, point, strict=True)
        })

    def _search(self) -> None:
        ctx = self.ctx
        start = tuple(len(g) - 1 for g in self._grids)
        root = self._config(start)
        root_acc, root_cost = self._score(root), self.cost(root)
        budget = bool(ctx.cost_constraints())
        crossed: list[_Child] = []  # children that meet the budget while a parent does not
        if budget and ctx.feasible(root):
            self.answer = (root, root_acc)
        beam = [start]
        while True:
            parents: dict[Point, bool] = {}  # child → whether some parent breaks the budget
            for point in beam:
                over = budget and not ctx.feasible(self._config(point))
                for i in range(len(point)):
                    if point[i]:
                        child = self._lower(point, i, over)
                        parents[child] = parents.get(child, False) or over
            if not parents:
                break
            children = []
            for point, over in parents.items():
                config = self._config(point)
                acc, cost = self._score(config), self.cost(config)
                slope = (root_acc - acc) / max(root_cost - cost, 1e-12)
                child = _Child(slope, cost, config.key, point, config, acc)
                children.append(child)
                if over and ctx.feasible(config):
                    crossed.append(child)
            children.sort()
            beam = [c.point for c in children[: self.width]]
            self.path.append((children[0].config, children[0].accuracy))
        if crossed:
            best = max(crossed, key=lambda c: (c.accuracy, -c.cost, c.key))
            self.answer = (best.config, best.accuracy)
        log.info("beam search: %d steps, answer %s", len(self.path), self.answer)

    def _lower(self, point: Point, i: int, over: bool) -> Point:
        """``point`` with site ``i`` lowered by one move; a move from ``point`` over the budget
        (``over``) that crosses it stops at the highest grid rank that meets it."""
        def at(index: int) -> Point:
            return (*point[:i], index, *point[i + 1:])

        low = max(point[i] - self._steps[i], 0)
        feasible = self.ctx.feasible
        if over and low < point[i] - 1 and feasible(self._config(at(low))):
            low = next(j for j in range(point[i] - 1, low - 1, -1)
                       if feasible(self._config(at(j))))
        return at(low)

    def _score(self, config: Config) -> float:
        return self.ctx.evaluator.quick_accuracy(config, batches=self.minibatches)

    def _proposals(self) -> list[Config]:
        ctx = self.ctx
        if ctx.cost_constraints() and self.answer is None:
            raise RankSearchError(
                "beam search reached the lowest ranks without meeting "
                f"{', '.join(map(str, ctx.cost_constraints()))}; relax the constraints, allow "
                "lower ranks (min_rank) or another method"
            )
        head = [] if self.answer is None else [self.answer[0]]
        rest = [c for c in dict.fromkeys(c for c, _ in self.path)
                if c not in head and ctx.feasible(c)]
        room = ctx.evaluations - len(head)
        if room < len(rest):
            picks = np.unique(np.round(np.linspace(0, len(rest) - 1, max(room, 0))).astype(int))
            rest = [rest[i] for i in picks]
        return head + rest


__all__ = ["Beam"]
