"""Executors drive the search loop: `local` in this process; `ray` on a Ray cluster (optional).

The loop's protocol is declared here, so that executors depend on it and not on the loop: a
driver calls ``loop.propose()`` for the next `Work` (or `WAIT` while the strategy waits on
running evaluations, or `DONE`), evaluates it with ``evaluate(config, partial=...)``, and hands
each result to ``loop.finish``; on Ctrl-C or SIGTERM it calls ``loop.interrupt()``. An
evaluation that raises is a failed result, never the end of the search.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any, Final, Protocol

from ..config import Config
from ..errors import RankSearchError
from ..result import Result, result_key


@dataclass(frozen=True)
class Work:
    """One evaluation to run: a config, and the number of validation batches of a partial
    score (None: the proxy's full score)."""

    config: Config
    partial: int | None = None

    @property
    def key(self) -> str:
        return result_key(self.config, self.partial)


class Wait:
    """`SearchLoop.propose`: nothing to start now; results still running are awaited."""

    def __repr__(self) -> str:
        return "WAIT"


class Done:
    """`SearchLoop.propose`: the search is over (``loop.stopped`` says why)."""

    def __repr__(self) -> str:
        return "DONE"


WAIT: Final = Wait()
DONE: Final = Done()

#: Scores one config: ``evaluate(config, partial=None) -> Result`` (an `Evaluator`).
Evaluate = Callable[..., Result]


class Limits(Protocol):
    """What a driver sees of the loop's `ranksearch.loop.Termination`."""

    @property
    def deadline(self) -> float | None: ...

    def stop(self, reason: str) -> None: ...


class Loop(Protocol):
    """What a driver sees of the search loop."""

    @property
    def stopped(self) -> str | None: ...

    @property
    def termination(self) -> Limits: ...

    def propose(self) -> Work | Wait | Done: ...

    def finish(self, result: Result) -> None: ...

    def interrupt(self) -> None: ...


class Executor(Protocol):
    """Drives a `Loop` until it is done, evaluating its work with ``evaluate``."""

    def drive(self, loop: Loop, evaluate: Evaluate) -> None: ...


def failed_result(evaluate: Evaluate, work: Work | Config, reason: str) -> Result:
    """A failed result of ``work`` with ``reason``, and its costs when ``evaluate`` is an
    `~ranksearch.evaluate.Evaluator` (which stamps its proxy and fingerprint too)."""
    from ..evaluate import Evaluator

    work = work if isinstance(work, Work) else Work(work)
    if isinstance(evaluate, Evaluator):
        return evaluate.result(work.config, evaluate.costs.metrics(work.config), "failed",
                               reason, partial=work.partial)
    inner = getattr(evaluate, "evaluate", None)  # an isolated evaluator's own
    if inner is not None and inner is not evaluate:
        return failed_result(inner, work, reason)
    return Result(work.config, {}, "failed", reason, partial=work.partial)


def _as_sigint(signum: int, frame: FrameType | None) -> None:
    """Handle a signal as SIGINT is handled now (Tune's handler while Tune runs)."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While it is open, SIGTERM is handled as Ctrl-C is (`KeyboardInterrupt` in the main
    thread, or the SIGINT handler in place), so that a terminated search stops the same way;
    the previous handler comes back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _as_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def get_executor(name: str | Executor, isolate: bool | None = None,
                 trial_timeout: float | None = None, **options: Any) -> Executor:
    """The executor called ``name`` built with ``options`` (or the executor itself), running
    each evaluation ``isolate``-d in a child process and within ``trial_timeout`` seconds
    (see `LocalExecutor`; Ray trials always run in worker processes).

    ``ray`` is imported only when asked for, so ``import ranksearch`` never imports Ray.
    """
    if not isinstance(name, str):
        if isolate is not None or trial_timeout is not None:
            raise RankSearchError(
                "isolate and trial_timeout configure an executor named by a string; pass them "
                f"to the constructor of the {type(name).__name__} given instead"
            )
        return name
    if name == "local":
        if options:
            raise RankSearchError(f"the local executor takes no options, got {sorted(options)}")
        return LocalExecutor(isolate=isolate, trial_timeout=trial_timeout)
    if name == "ray":
        try:
            from .ray import RayExecutor
        except ImportError as e:
            raise RankSearchError(
                f"the ray executor needs Ray Tune ({e}); install it with "
                "`pip install 'ranksearch[ray]'`"
            ) from e
        if isolate is False:
            raise RankSearchError("Ray trials always run in worker processes; isolate=False "
                                  "applies to the local executor only")
        return RayExecutor(trial_timeout=trial_timeout, **options)
    raise RankSearchError(f"unknown executor {name!r}; choose 'local' or 'ray'")


from .local import LocalExecutor  # noqa: E402  (it implements the protocol above)

__all__ = ["DONE", "WAIT", "Evaluate", "Executor", "Limits", "LocalExecutor", "Loop", "Work",
           "failed_result", "get_executor", "sigterm_interrupts"]
