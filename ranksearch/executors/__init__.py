"""Executors run evaluations: `local` in this process; `ray` on a Ray cluster (optional)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from ..errors import RankSearchError
from ..result import Result
from ..space import Config
from .local import LocalExecutor


class Executor(Protocol):
    """Runs an evaluator over configurations and yields each result as it finishes."""

    def map(self, evaluate: Callable[[Config], Result], configs: Sequence[Config]
            ) -> Iterator[Result]: ...


def get_executor(name: str | Executor) -> Executor:
    """The executor called ``name`` (or the executor itself)."""
    if not isinstance(name, str):
        return name
    if name == "local":
        return LocalExecutor()
    raise RankSearchError(f"unknown executor {name!r}; choose 'local'")


__all__ = ["Executor", "LocalExecutor", "get_executor"]
