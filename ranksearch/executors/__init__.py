"""Executors run evaluations: `local` in this process; `ray` on a Ray cluster (optional)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from ..errors import RankSearchError
from ..result import Result
from ..space import Config
from .local import LocalExecutor


class Executor(Protocol):
    """Runs an evaluator over configurations and yields each result as it finishes.

    An executor may also define ``run(loop, strategy) -> str`` to drive the whole search
    itself (see `ranksearch.search.SearchLoop`); the local loop is used otherwise.
    """

    def map(self, evaluate: Callable[[Config], Result], configs: Sequence[Config]
            ) -> Iterator[Result]: ...


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


__all__ = ["Executor", "LocalExecutor", "get_executor"]
