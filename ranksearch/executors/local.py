"""The local executor: evaluations one after another in this process."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from ..result import Result
from ..space import Config


class LocalExecutor:
    """Evaluates configurations in order, in this process (the default; nothing to set up)."""

    def map(self, evaluate: Callable[[Config], Result], configs: Sequence[Config]
            ) -> Iterator[Result]:
        for config in configs:
            yield evaluate(config)
