"""The local executor: evaluations one after another in this process."""

from __future__ import annotations

from . import DONE, WAIT, Evaluate, Loop


class LocalExecutor:
    """Drives the loop in this process, one evaluation at a time (the default)."""

    def drive(self, loop: Loop, evaluate: Evaluate) -> None:
        try:
            while (work := loop.propose()) is not DONE:
                if work is WAIT:  # nothing runs here, so nothing can be waited for
                    raise RuntimeError("the loop waits on results while none is running")
                loop.finish(evaluate(work.config, partial=work.partial))  # type: ignore[union-attr]
        except KeyboardInterrupt:
            loop.interrupt()
