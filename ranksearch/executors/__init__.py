"""Executors drive the search loop: `local` in this process; `ray` on a Ray cluster (optional).

The loop's protocol is declared here, so that executors depend on it and not on the loop: a
driver calls ``loop.propose()`` for the next `Work` (or `WAIT` while the strategy waits on
running evaluations, or `DONE`), evaluates it with ``evaluate(config, partial=...)``, and hands
each result to ``loop.finish``; on Ctrl-C it calls ``loop.interrupt()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


class Loop(Protocol):
    """What a driver sees of the search loop."""

    @property
    def stopped(self) -> str | None: ...

    def propose(self) -> Work | Wait | Done: ...

    def finish(self, result: Result) -> None: ...

    def interrupt(self) -> None: ...


class Executor(Protocol):
    """Drives a `Loop` until it is done, evaluating its work with ``evaluate``."""

    def drive(self, loop: Loop, evaluate: Evaluate) -> None: ...


def get_executor(name: str | Executor, **options: Any) -> Executor:
    """The executor called ``name`` built with ``options`` (or the executor itself).

    ``ray`` is imported only when asked for, so ``import ranksearch`` never imports Ray.
    """
    if not isinstance(name, str):
        return name
    if name == "local":
        if options:
            raise RankSearchError(f"the local executor takes no options, got {sorted(options)}")
        return LocalExecutor()
    if name == "ray":
        try:
            from .ray import RayExecutor
        except ImportError as e:
            raise RankSearchError(
                f"the ray executor needs Ray Tune ({e}); install it with "
                "`pip install 'ranksearch[ray]'`"
            ) from e
        return RayExecutor(**options)
    raise RankSearchError(f"unknown executor {name!r}; choose 'local' or 'ray'")


from .local import LocalExecutor  # noqa: E402  (it implements the protocol above)

__all__ = ["DONE", "WAIT", "Evaluate", "Executor", "LocalExecutor", "Loop", "Work",
           "get_executor"]
