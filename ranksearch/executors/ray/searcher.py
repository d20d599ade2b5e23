"""The driver side of a search on Ray Tune: `StrategySearcher`, the Tune search algorithm that
adapts the search loop, the stopper and callback that pass it Tune's events, and the settings of
the Tune run."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray import tune
from ray.tune.search import Searcher
from ray.tune.stopper import Stopper

from ...evaluate import Evaluator
from ...result import Result
from .. import DONE, WAIT, Loop, Work
from .failures import _describe, _environment_error, _failed, _trial_error
from .worker import METRIC, STEP

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

    from . import RayExecutor

log = logging.getLogger(__name__)

# Tune settings read from the environment when a run starts: the legacy output engine is the one
# that verbose=0 silences; no CSV/JSON/TensorBoard result files (the store is the record); no
# traceback per failed attempt (failures are stored with their reason, and logged once).
_TUNE_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
             "TUNE_PRINT_ALL_TRIAL_ERRORS": "0"}


@dataclass(frozen=True)
class TrialInfo:
    """How one evaluation ran on the cluster: the config's key, the id of the Ray node that ran
    it (None when unknown), its status, its seconds on the worker (NaN when unknown), and the
    attempts it took."""

    key: str
    node: str | None
    status: str
    seconds: float
    attempts: int = 1


class StrategySearcher(Searcher):
    """A Tune search algorithm that adapts the search loop to Tune.

    ``suggest`` hands out the loop's next `Work`, one per trial: None while the loop waits on
    running trials, ``FINISHED`` when it is done. Each finished (or failed, or ASHA-stopped)
    trial's result goes to ``loop.finish``. The loop itself decides everything else.
    """

    def __init__(self, loop: Loop, evaluator: Evaluator, executor: RayExecutor) -> None:
        super().__init__()
        self.loop = loop
        self.evaluator = evaluator
        self.executor = executor
        self.error: BaseException | None = None
        #: the time limit passed: trials still running are stopped, and not stored
        self.overtime = False
        self._trials: dict[str, Work] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its configuration with the searcher; the store, not Tune, resumes a search.
        return {"_metric": None, "_mode": None}

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: the store is the search's checkpoint."""

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.error is not None:
            return Searcher.FINISHED
        try:
            work = self.loop.propose()
        except Exception as e:
            self._fail(e)
            return Searcher.FINISHED
        if work is DONE:
            return Searcher.FINISHED
        if work is WAIT:
            return None
        self._trials[trial_id] = work  # type: ignore[assignment]
        return {"config": work.config.key, "partial": work.partial}  # type: ignore[union-attr]

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        if error:
            return  # recorded by `trial_failed`, which sees the trial's error
        work = self._trials.pop(trial_id, None)
        if work is None:
            return
        if self.overtime and "result" not in (result or {}):
            return  # stopped by the time limit: the config is not at fault, a resume runs it
        if result is None:  # removed before it ran: its result never comes
            self._finish(_failed(self.evaluator, work, "the trial was removed before it ran"),
                         None, math.nan)
            return
        self._finish(self._result(work, result), result.get("node"),
                     result.get("time_total_s", 0.0))

    def trial_failed(self, trial: Trial) -> None:
        """Record a trial that raised, or whose worker died, on its last attempt (or stop the
        search when workers cannot load its code)."""
        work = self._trials.pop(trial.trial_id, None)
        if work is None or self.overtime:
            return
        error = _trial_error(trial)
        if (stop := _environment_error(error)) is not None:
            self._fail(stop)
            return
        attempts = trial.num_failures
        reason = f"{_describe(error)} ({attempts} attempt{'s' if attempts > 1 else ''})"
        log.warning("candidate failed on the cluster: %s", reason)
        self._finish(_failed(self.evaluator, work, reason), trial.last_result.get("node"),
                     math.nan, attempts)

    def _result(self, work: Work, last: dict[str, Any]) -> Result:
        """Our result of a trial that ended: its own, or a pruned one from its last report."""
        if "result" in last:
            return Result.from_json(json.loads(last["result"]))
        evaluator = self.evaluator
        name = evaluator.metric.name
        if METRIC not in last or name not in last:
            return _failed(evaluator, work, "the trial ended without reporting")
        metrics = {**evaluator.costs.metrics(work.config), name: float(last[name])}
        step = int(last.get(STEP, 0))
        return evaluator.result(
            work.config, metrics, "pruned",
            f"stopped early by ASHA at step {step} of {evaluator.settings.steps}",
            wall_time=float(last.get("time_total_s", 0.0)))

    def _finish(self, result: Result, node: str | None, seconds: float,
                attempts: int = 1) -> None:
        try:
            self.loop.finish(result)
        except Exception as e:
            self._fail(e)
        self.executor.trials.append(TrialInfo(result.config.key, node, result.status,
                                              float(seconds), attempts))

    def _fail(self, error: BaseException) -> None:
        """Keep the first error of our own (a strategy's, the store's) to raise after Tune."""
        if self.error is None:
            self.error = error


class _Stop(Stopper):
    """Ends the Tune run at once when the searcher hit an error of its own, or when the search's
    time limit passes (trials still running are stopped)."""

    def __init__(self, searcher: StrategySearcher) -> None:
        self.searcher = searcher

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        searcher = self.searcher
        deadline = searcher.loop.termination.deadline
        if deadline is not None and time.monotonic() >= deadline and not searcher.overtime:
            searcher.overtime = True
            searcher.loop.termination.stop("time limit")
        return searcher.error is not None or searcher.overtime


class _Hooks(tune.Callback):
    """Passes failed trials, with their errors, to the searcher."""

    def __init__(self, searcher: StrategySearcher) -> None:
        self.searcher = searcher

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        self.searcher.trial_failed(trial)


def _trial_name(trial: Trial) -> str:
    return trial.trial_id


def _no_incomplete_trials(record: logging.LogRecord) -> bool:
    """Drop Tune's closing error about failed trials: they are stored as failed."""
    return not str(record.msg).startswith("Trials did not complete")


@contextlib.contextmanager
def _tune_environment() -> Iterator[None]:
    """Tune's quiet settings, and this process's signal handlers back afterwards (Tune leaves
    its own SIGINT handler installed)."""
    saved_env = {k: os.environ.get(k) for k in _TUNE_ENV}
    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGUSR1)} if main else {}
    tune_log = logging.getLogger("ray.tune.tune")
    os.environ.update(_TUNE_ENV)
    tune_log.addFilter(_no_incomplete_trials)
    try:
        yield
    finally:
        tune_log.removeFilter(_no_incomplete_trials)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
