"""The search loop: one non-blocking state machine that every executor drives.

A driver asks the loop for work (`SearchLoop.propose`) and hands back each finished
evaluation (`SearchLoop.finish`); the loop asks the strategy, skips what the store holds,
marks what breaks a cost constraint, claims each new config in the store before queueing it
(so processes sharing a study never evaluate one config twice), commits every result before
anything else is asked, and tells the strategy the results of each ask, in order, once they
are all known (a config another writer is evaluating is waited for). `Termination`
decides when to stop. Drivers: `ranksearch.executors.local` (in this process) and
`ranksearch.executors.ray` (Ray Tune's searcher adapts ``suggest``/``on_trial_complete``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .constraints import Constraint
from .executors import DONE, WAIT, Done, Wait, Work
from .pareto import best
from .result import Result, result_key
from .store import Store
from .strategy import Proposal, SearchContext, StopSearch, Strategy

log = logging.getLogger(__name__)

#: Asks in a row that bring nothing new to evaluate before a strategy is taken to be exhausted.
MAX_IDLE_ROUNDS = 100

#: Seconds between reads of the store while waiting on configs other writers evaluate.
POLL = 0.25


@dataclass
class Termination:
    """When a search stops: its evaluation budget, its time limit, the strategy being done,
    ``MAX_IDLE_ROUNDS`` asks in a row with nothing new, or an interruption (Ctrl-C)."""

    evaluations: int
    time_limit: float | None = None
    reason: str | None = None
    _deadline: float | None = field(default=None, repr=False)
    _idle: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.time_limit is not None:
            self._deadline = time.monotonic() + self.time_limit

    @property
    def deadline(self) -> float | None:
        """When the time limit runs out (`time.monotonic` seconds), or None without one; a
        driver stops an evaluation still running then (see `ranksearch.executors`)."""
        return self._deadline

    def check(self, counted: int) -> str | None:
        """The reason to stop given ``counted`` results toward the budget (stored plus in
        flight), or None; a reason once given stays."""
        if self.reason is None:
            if counted >= self.evaluations:
                self.reason = "finished"
            elif self._deadline is not None and time.monotonic() >= self._deadline:
                self.reason = "time limit"
        return self.reason

    def stop(self, reason: str) -> None:
        """Stop for ``reason`` (the strategy finished, an interruption, an error)."""
        self.reason = self.reason or reason

    def idle(self, productive: bool) -> None:
        """Count one ask; stop after ``MAX_IDLE_ROUNDS`` unproductive ones in a row."""
        self._idle = 0 if productive else self._idle + 1
        if self._idle >= MAX_IDLE_ROUNDS:
            log.warning("the strategy proposed nothing new in %d rounds; stopping", self._idle)
            self.stop("strategy exhausted")


@dataclass
class _Ask:
    """One ask's proposals and their results so far (told once none is missing)."""

    keys: list[str]
    results: dict[str, Result]
    waiting: set[str]


class SearchLoop:
    """ask → dedupe → evaluate → store → tell, driven from outside.

    `propose` returns the next `Work` to evaluate, `WAIT` while the strategy waits for
    results still being evaluated, or `DONE`; `finish` takes each finished result. Drivers
    call `interrupt` on Ctrl-C and `close` at the end.
    """

    def __init__(self, store: Store, strategy: Strategy, ctx: SearchContext,
                 termination: Termination, fingerprint: str, retry_failed: bool = False,
                 progress: bool = False) -> None:
        self.store = store
        self.strategy = strategy
        self.ctx = ctx
        self.termination = termination
        self.fingerprint = fingerprint
        self.evaluated = 0
        self.best: Result | None = None
        self._queue: deque[Work] = deque()
        self._pending: set[str] = set()  # keys queued or running
        self._elsewhere: dict[str, Work] = {}  # asked, but another writer is evaluating it
        self._asks: deque[_Ask] = deque()
        self._waiting = False
        #: stored failures a retry may evaluate again; they do not count against the budget
        self._failures = {r.key for r in store if r.status == "failed"} if retry_failed \
            else set()
        self._retried: set[str] = set()
        self.bar = tqdm(total=termination.evaluations,
                        initial=min(self.stored, termination.evaluations),
                        disable=not progress, desc="search", unit="eval")

    # -- the protocol ---------------------------------------------------------------------------
    @property
    def stopped(self) -> str | None:
        """Why the search stopped (None while it runs)."""
        return self.termination.reason

    @property
    def stored(self) -> int:
        """Stored results that count against the budget (every stored result, less the
        failures a retry has yet to evaluate again)."""
        return len(self.store) - len(self._failures)

    @property
    def counted(self) -> int:
        """What counts against the budget: stored, ours in flight, and other writers' live
        claims on this study."""
        return self.stored + len(self._pending) + self.store.claimed

    def propose(self) -> Work | Wait | Done:
        """The next evaluation to run, `WAIT` while the strategy waits on running ones, or
        `DONE` (see `stopped`)."""
        while True:
            if self._queue:
                return self._queue.popleft()
            self.store.refresh()  # what other writers stored and claimed meanwhile
            self._settle()
            if self._queue:
                continue
            if self.termination.check(self.counted) is not None:
                return DONE
            if self._waiting:
                return WAIT
            if self._elsewhere:  # asked, evaluated by another writer: wait for its result
                if self._pending:
                    return WAIT
                time.sleep(POLL)
                continue
            try:
                proposals = self.strategy.ask()
            except StopSearch:
                self.termination.stop("strategy finished")
                return DONE
            queued = self._add(proposals)
            if queued:
                self.termination.idle(True)
                continue
            if self._pending:
                self._waiting = True
                return WAIT
            if not self._elsewhere:
                self.termination.idle(False)

    def finish(self, result: Result) -> None:
        """Commit a finished evaluation, then tell the strategy every ask now complete."""
        self.store.save(result)
        result = self.store.get(result.config, result.partial) or result  # theirs, if first
        self._failures.discard(result.key)
        self._pending.discard(result.key)
        self._waiting = False
        self.evaluated += 1
        self.bar.update(1)
        self._show_best(result)
        for ask in self._asks:
            if result.key in ask.waiting:
                ask.waiting.discard(result.key)
                ask.results[result.key] = result
        self._tell_ready()

    def interrupt(self) -> None:
        """Ctrl-C: stop asking; what finished is stored, and a re-run resumes."""
        self.termination.stop("interrupted")
        log.warning("interrupted: finished evaluations are stored; run again to resume")

    def close(self) -> None:
        """End the search: claims not evaluated are released for other writers."""
        self.bar.close()
        self.store.release()

    # -- one ask --------------------------------------------------------------------------------
    def _add(self, proposals: Sequence[object]) -> int:
        """Triage one ask: stored and infeasible results are known at once, new work is
        queued within the budget. Returns the number queued."""
        ask = _Ask([], {}, set())
        queued = 0
        for item in proposals:
            proposal = item if isinstance(item, Proposal) else Proposal(item)  # type: ignore[arg-type]
            config = self.store.space.validate(proposal.config)
            key = result_key(config, proposal.partial)
            if key in ask.results or key in ask.waiting:
                continue
            ask.keys.append(key)
            stored = self.store.get(config, proposal.partial)
            retry = stored is not None and self._retry(stored)
            if stored is not None and not retry:
                ask.results[key] = stored
            elif not proposal.probe and not self.ctx.feasible(config):
                ask.results[key] = self._infeasible(config, proposal.partial)
            elif key in self._pending or key in self._elsewhere:
                ask.waiting.add(key)
            elif self.counted < self.termination.evaluations:
                work = Work(config, proposal.partial)
                ask.waiting.add(key)
                if self._claim(work, retry):
                    queued += 1
                elif key not in self._elsewhere:
                    ask.waiting.discard(key)
                    found = self.store.get(config, proposal.partial)
                    if found is not None:  # else the budget filled up ("full")
                        ask.results[key] = found
        self._asks.append(ask)
        self._tell_ready()
        return queued

    def _claim(self, work: Work, retry: bool = False) -> bool:
        """Claim ``work`` in the store: queued when ours (True); when another writer is
        evaluating it, awaited; when stored meanwhile, or recorded failed because its
        evaluations kept dying, its result is in the store."""
        # the budget is checked in the store too, against every writer's claims at once;
        # stored failures a retry may evaluate again are not in it, so not then
        budget = None if self._failures else self.termination.evaluations
        claim = self.store.claim(work.config, work.partial, retry, budget)
        if claim.status == "full":
            self.termination.stop("finished")
            return False
        if claim.status == "ours":
            self._elsewhere.pop(work.key, None)
            self._queue.append(work)
            self._pending.add(work.key)
            return True
        if claim.status == "busy":
            self._elsewhere[work.key] = work
            return False
        self._elsewhere.pop(work.key, None)
        if claim.status == "abandoned":
            failed = Result(work.config, self.ctx.costs.metrics(work.config), "failed",
                            claim.reason, proxy="claim expired", fingerprint=self.fingerprint,
                            partial=work.partial)
            self.store.save(failed)
        return False

    def _settle(self) -> None:
        """Hand over the results other writers stored for configs we wait on; take over
        their claims that expired."""
        for key, work in list(self._elsewhere.items()):
            if self.store.busy(key):
                continue
            found = self.store.get(work.config, work.partial)
            if found is None:
                if self._claim(work) or key in self._elsewhere:
                    continue
                found = self.store.get(work.config, work.partial)
            self._elsewhere.pop(key, None)
            for ask in self._asks:
                if key in ask.waiting and found is not None:
                    ask.waiting.discard(key)
                    ask.results[key] = found
        self._tell_ready()

    def _retry(self, stored: Result) -> bool:
        """Whether to evaluate a stored result again: a failure, once per run, when asked."""
        if stored.key not in self._failures or stored.key in self._retried:
            return False
        self._retried.add(stored.key)
        return True

    def _tell_ready(self) -> None:
        while self._asks and not self._asks[0].waiting:
            ask = self._asks.popleft()
            results = [ask.results[k] for k in ask.keys if k in ask.results]
            if results:
                self.ctx.record(results)
                self.strategy.tell(results)

    def _infeasible(self, config: object, partial: int | None) -> Result:
        metrics = self.ctx.costs.metrics(config)  # type: ignore[arg-type]
        broken = [str(c) for c in self.ctx.cost_constraints() if not c.satisfied(metrics)]
        return Result(config, metrics, "failed",  # type: ignore[arg-type]
                      f"infeasible: violates {', '.join(broken)}", proxy="cost check",
                      fingerprint=self.fingerprint, partial=partial)

    def _show_best(self, result: Result) -> None:
        """Keep the best result so far (updated with each new one) on the progress bar."""
        if result.partial is not None:
            return
        cons: Sequence[Constraint] = self.ctx.constraints
        pool = self.store.results() if self.best is None else [self.best, result]
        quality = self.ctx.quality
        self.best = best(pool, cons, quality)
        if self.best is not None:
            self.bar.set_postfix_str(
                f"best {quality.metric} {quality.value(self.best.metrics):.4g} at flops "
                f"{self.best.metrics.get('flops_ratio', float('nan')):.3f}"
            )
