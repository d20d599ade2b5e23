"""The local executor: evaluations one after another, in this process or in a child of it."""

from __future__ import annotations

import logging

from ..errors import ConfigError
from ..result import Result
from . import DONE, WAIT, Evaluate, Loop, Work, failed_result, sigterm_interrupts
from .isolated import IsolatedEvaluator, Overtime, can_fork

log = logging.getLogger(__name__)


class LocalExecutor:
    """Drives the loop on this machine, one evaluation at a time (the default).

    ``isolate`` runs each evaluation in a forked child process (`IsolatedEvaluator`), so
    that a candidate that crashes the process, calls ``os._exit`` or hangs is stored as failed
    with the reason and the search goes on. None (the default) turns it on wherever it can
    fork: on Linux, with a CPU proxy (measured on digits zero-shot: 6–8 ms, 13%, more per
    evaluation, and 0.13 s per child started). The child runs torch on one thread (a warning
    says so when this process uses more); ``isolate=False`` keeps every thread. A latency
    search isolates too: its latency table is timed in this process, on its threads, before
    the first evaluation, and its front end to end after the last, so a child only prices
    from the table. Without isolation an exception is still a failed result, but a crash or a
    hang ends the search.

    ``trial_timeout`` (seconds) fails an evaluation that runs longer; it needs isolation
    (None turns it on; with ``isolate=False`` it is an error). The search's time limit holds
    within a bounded overshoot: an isolated evaluation still running when it passes is
    stopped and not stored (the config is not at fault; a resume evaluates it again), while
    without isolation the running evaluation finishes first. SIGTERM stops the search as
    Ctrl-C does (``stopped == "interrupted"``); what finished is stored.
    """

    def __init__(self, isolate: bool | None = None, trial_timeout: float | None = None) -> None:
        if trial_timeout is not None and not trial_timeout > 0:
            raise ConfigError(f"trial_timeout must be positive seconds, got {trial_timeout}")
        if trial_timeout is not None and isolate is False:
            raise ConfigError("trial_timeout needs isolated evaluations (a hung one is stopped "
                              "by killing its process); drop isolate=False (--no-isolate) or "
                              "trial_timeout (--trial-timeout)")
        self.isolate = isolate
        self.trial_timeout = trial_timeout

    def isolated(self, evaluate: Evaluate) -> bool:
        """Whether evaluations of ``evaluate`` run in a child process under this executor."""
        if self.isolate is not None:
            return self.isolate
        settings = getattr(evaluate, "settings", None)
        return self.trial_timeout is not None or can_fork(str(getattr(settings, "device", "cpu")))

    def drive(self, loop: Loop, evaluate: Evaluate) -> None:
        child = IsolatedEvaluator(evaluate, self.trial_timeout) if self.isolated(evaluate) \
            else None
        try:
            with sigterm_interrupts():
                while (work := loop.propose()) is not DONE:
                    if work is WAIT:  # nothing runs here, so nothing can be waited for
                        raise RuntimeError("the loop waits on results while none is running")
                    assert isinstance(work, Work)
                    if child is None:
                        result = _in_process(evaluate, work)
                    else:
                        try:
                            result = child(work.config, partial=work.partial,
                                           deadline=loop.termination.deadline)
                        except Overtime:
                            log.warning("time limit reached during an evaluation; it was "
                                        "stopped and is not stored (a resume runs it again)")
                            loop.termination.stop("time limit")
                            break
                    loop.finish(result)
        except KeyboardInterrupt:
            loop.interrupt()
        finally:
            if child is not None:
                child.close(kill=True)


def _in_process(evaluate: Evaluate, work: Work) -> Result:
    """``evaluate`` on ``work`` here; any exception (an `Evaluator` catches its own, a user's
    evaluate function may not) is a failed result with its reason."""
    try:
        return evaluate(work.config, partial=work.partial)
    except Exception as e:
        log.warning("candidate %s failed: %s: %s", work.config, type(e).__name__, e)
        return failed_result(evaluate, work, f"{type(e).__name__}: {e}")
