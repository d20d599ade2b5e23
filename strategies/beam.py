"""Beam search over joint rank reductions (Eo, Kang & Rhee, "An effective low-rank compression
with a joint rank selection followed by a compression-friendly training", Neural Networks 161,
2023: the modified beam search of BSR)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ranksearch import options
from ranksearch.config import Choice, Config
from ranksearch.errors import RankSearchError
from ranksearch.refine import Handover
from ranksearch.result import Result
from ranksearch.space import method_for
from ranksearch.strategy import Proposal, SearchContext, Strategy

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


class _Step(NamedTuple):
    """One asked beam step: each child's point and whether some parent breaks the budget,
    by config key; ``root`` when the step also scores the starting config."""

    children: dict[str, tuple[Point, Config, bool]]
    root: Config | None
    asked: int


class Beam(Strategy):
    """Beam search from the top ranks down, scored by mini-batch accuracy without fine-tuning.

    The beam starts at the top of every site's grid for ``method`` (default: each site's
    first; sites without it stay dense): its maximum rank, unless the grid stops short of it
    where it would cost as much as the dense layer. Each step, every member
    has one child per site: that site's rank lowered by ``step`` grid steps (default:
    1/``moves`` of the site's grid, at least one step, so that each site reaches its lowest
    rank in about ``moves`` moves; ``step=1`` is the finest search and the slowest). Children
    are scored by their partial score (``Proposal(child, partial=minibatches)``: zero-shot
    accuracy on the first ``minibatches`` validation batches, evaluated, stored and counted
    by the search like any proposal) and the best ``width`` kept. BSR keeps the most accurate
    candidates at each compression step; since our children differ in how much cost they
    save, they are ranked by accuracy lost per unit of cost saved, both counted from the start
    (so the accuracy at the cost reached decides), ties going to the cheaper. Cost is the
    search's cost metric (`SearchContext.cost`: that of the first cost constraint, else of the
    first cost objective, else FLOPs), as a ratio to the dense model.

    Where a member breaks a cost constraint, each line of the beam stops at the budget: a move
    that crosses it lowers the site only as far as needed, and the most accurate of these
    crossing children is the budget's answer (``answer``). The search then goes on down to
    the lowest ranks, and the best member of each step (``path``) traces a front below the
    budget. Then it proposes evaluations under the search's proxy: the answer first, then the
    path's configs that meet the budget, spread evenly over what is left of the evaluation
    budget. Nothing over the budget is ever proposed; without constraints the path is.

    Ask/tell: each ask is one beam step, all its children asked at once (so an executor can
    score them in parallel); the next step is asked once they are told. Cost, to size
    ``evaluations``: the first step is 1 + sites partial scores (the start and its children),
    every later one at most width × sites (fewer where sites reach their lowest rank or
    children coincide), and a full search takes about Σ ⌈top index / step⌉ ≈ sites × moves
    steps (one more with a budget to cross): about width × sites² × moves partial scores in
    all, plus the final proposals. Beam asks a step only while it fits in the evaluation
    budget with one evaluation to spare; otherwise (or when the search refuses some of a
    step's children) it stops there, warns, and proposes the best it has: the answer if the
    budget was crossed, else its latest best member brought within the budget
    (`SearchContext.repair`), and the path's feasible configs in what remains. Once those are
    proposed, ``refine`` (default) refines the front for the rest of the budget
    (`ranksearch.refine.Handover`); ``refine=False`` stops there.
    """

    name = "beam"
    description = "beam search lowering one layer's rank at a time, scored on a mini-batch (BSR)"

    def __init__(self, width: int = 4, step: int | None = None, minibatches: int = 1,
                 method: str | None = None, moves: int = 8, refine: bool = True) -> None:
        self.handover = Handover(self.name, options.boolean(refine, "refine", self.name))
        self.width = options.positive_int(width, "width", self.name)
        self.step = options.positive_int(step, "step", self.name, optional=True)
        self.minibatches = options.positive_int(minibatches, "minibatches", self.name)
        self.method = options.method_name(method, "method", self.name)
        self.moves = options.positive_int(moves, "moves", self.name)

    def setup(self, ctx: SearchContext) -> None:
        super().setup(ctx)
        self.handover.setup(ctx)
        methods = {s.name: m for s in ctx.space.decomposable
                   if (m := method_for(s, self.method)) is not None}
        if not methods:
            raise RankSearchError(f"no layer of the space admits the method {self.method!r}")
        self._names = tuple(methods)
        self._methods = tuple(methods.values())
        self._grids = tuple(ctx.space.ranks(n, m) for n, m in zip(self._names, self._methods,
                                                                   strict=True))
        self._steps = tuple(self.step or -(-len(g) // self.moves) for g in self._grids)
        self._budget = bool(ctx.cost_constraints())
        if self._budget and not ctx.feasible(self._config((0,) * len(self._names))):
            # cost only falls as ranks do: no line of the beam can ever meet the budget
            raise RankSearchError(
                f"beam search cannot meet {', '.join(map(str, ctx.cost_constraints()))} even "
                "at the lowest ranks; relax the constraints, allow lower ranks (min_rank) or "
                "another method"
            )
        self._root = tuple(len(g) - 1 for g in self._grids)
        steps = sum(-(-top // s) for top, s in zip(self._root, self._steps, strict=True))
        #: an upper bound on the partial scores of a full search
        self.estimate = 1 + (steps + self._budget) * self.width * len(self._names)
        log.info("beam search: %d sites, about %d steps, at most %d partial scores "
                 "(evaluations=%d)", len(self._names), steps, self.estimate, ctx.evaluations)
        self._beam: list[Point] = [self._root]
        self._root_acc: float | None = None
        self._crossed: list[_Child] = []  # children that meet the budget while a parent does not
        self._pending: _Step | None = None
        self._searching, self._done, self._cut = True, False, False
        self._spent = 0  # results told (each a stored measurement, counted by the search)
        #: (config, partial accuracy) of the best member of each step, from the grid tops down
        self.path: list[tuple[Config, float]] = []
        #: (config, partial accuracy) of the most accurate child that crossed the budget
        self.answer: tuple[Config, float] | None = None

    def ask(self) -> list[Config | Proposal]:
        if self._done:
            return self.handover.ask()
        if self._pending is not None:
            return []  # the step asked last is still being scored
        if self._searching:
            step = self._next_step()
            if step is not None and step.asked + 1 <= self.ctx.evaluations - self._spent:
                self._pending = step
                configs = ([step.root] if step.root is not None else []) + \
                    [config for _, config, _ in step.children.values()]
                return [Proposal(c, probe=True, partial=self.minibatches) for c in configs]
            if step is not None:
                self._stop(f"the next step needs {step.asked} partial scores and "
                           f"{self.ctx.evaluations - self._spent} evaluations are left")
            self._searching = False
            log.info("beam search: %d steps, %d partial scores, answer %s", len(self.path),
                     self._spent, self.answer)
        self._done = True
        return list(self._proposals())

    def tell(self, results: Sequence[Result]) -> None:
        step, self._pending = self._pending, None
        if step is None:
            return  # the final proposals: nothing more to decide
        self._spent += len(results)
        quality = self.ctx.quality  # scored higher-is-better: accuracy, or −loss, −mse, ...
        scored = {r.config.key: -quality.cost(r.metrics) for r in results
                  if r.partial == self.minibatches and r.status == "ok"
                  and not np.isnan(quality.value(r.metrics))}
        if step.root is not None:
            self._root_acc = scored.get(step.root.key)
            if self._root_acc is None:
                self._stop("the starting config was not scored")
                return
            if self._budget and self.ctx.feasible(step.root):
                self.answer = (step.root, self._root_acc)
        root_cost = self.ctx.cost(self._config(self._root))
        children = []
        for key, (point, config, over) in step.children.items():
            if key not in scored:
                continue  # not scored (past the evaluation budget, or failed)
            acc, cost = scored[key], self.ctx.cost(config)
            slope = (self._root_acc - acc) / max(root_cost - cost, 1e-12)
            child = _Child(slope, cost, key, point, config, acc)
            children.append(child)
            if over and self.ctx.feasible(config):
                self._crossed.append(child)
        if self._crossed:
            best = max(self._crossed, key=lambda c: (c.accuracy, -c.cost, c.key))
            self.answer = (best.config, best.accuracy)
        if children:
            children.sort()
            self._beam = [c.point for c in children[: self.width]]
            self.path.append((children[0].config, children[0].accuracy))
        if len(scored) < step.asked:
            self._stop(f"{step.asked - len(scored)} of the step's {step.asked} partial scores "
                       "came back missing or failed")

    def _stop(self, why: str) -> None:
        """End the search early (the evaluation budget, or scores missing)."""
        self._searching, self._cut = False, True
        log.warning("beam search stopped after %d steps: %s (a full search needs up to %d "
                    "partial scores; raise evaluations); proposing the best so far",
                    len(self.path), why, self.estimate)

    def _config(self, point: Point) -> Config:
        return Config({
            n: Choice(m, grid[i])
            for n, m, grid, i in zip(self._names, self._methods, self._grids, point, strict=True)
        })

    def _next_step(self) -> _Step | None:
        """The children of the current beam (and the start, on the first step), or None when
        nothing is left to lower."""
        feasible = self.ctx.feasible
        children: dict[str, tuple[Point, Config, bool]] = {}
        for point in self._beam:
            over = self._budget and not feasible(self._config(point))
            for i in range(len(point)):
                if point[i]:
                    child = self._lower(point, i, over)
                    config = self._config(child)
                    held = children.get(config.key)
                    children[config.key] = (child, config, over or (held is not None and held[2]))
        if not children:
            return None
        root = self._config(self._root) if self._root_acc is None else None
        return _Step(children, root, len(children) + (root is not None))

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

    def _proposals(self) -> list[Config]:
        ctx = self.ctx
        head = [] if self.answer is None else [self.answer[0]]
        if self._budget and self.answer is None:
            # cut short above the budget: the latest best member, scaled down to meet it
            head = [ctx.repair(self.path[-1][0] if self.path else self._config(self._root))]
        rest = [c for c in dict.fromkeys(c for c, _ in self.path)
                if c not in head and ctx.feasible(c)]
        if not head and not rest:
            rest = [self._config(self._root)]  # unconstrained, cut before the first step
        room = ctx.evaluations - self._spent - len(head)
        if room < len(rest):
            picks = np.unique(np.round(np.linspace(0, len(rest) - 1, max(room, 0))).astype(int))
            rest = [rest[i] for i in picks]
        return head + rest


__all__ = ["Beam"]
