"""Failed evaluations on the cluster: the error of a trial or task out of Ray's and Tune's
wrappers, a one-line reason for it, the failed result to store, and the errors of a worker
environment that cannot load the search's code (which stop the search)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ray import cloudpickle
from ray.exceptions import RayActorError, RaySystemError, RayTaskError

from ...config import Config
from ...errors import RankSearchError
from ...evaluate import Evaluator
from ...result import Result
from .. import Work

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

log = logging.getLogger(__name__)


def _trial_error(trial: Trial) -> BaseException | str:
    """The error of a trial's last attempt: the exception (unwrapped) when Tune kept it, or the
    last line Tune wrote about it."""
    path = trial.pickled_error_file
    if path and os.path.exists(path):
        try:
            with open(path, "rb") as f:
                return _unwrap(cloudpickle.load(f))
        except Exception as e:  # an error whose class does not unpickle here
            log.debug("cannot read %s: %s", path, e)
    if trial.error_file and os.path.exists(trial.error_file):
        with open(trial.error_file) as f:
            lines = [line.strip() for line in f if line.strip()]
        if lines:
            return lines[-1]
    return "the trial failed"


def _unwrap(error: BaseException) -> BaseException:
    """The exception the evaluation raised, out of Ray's and Tune's wrappers."""
    if isinstance(error, RayTaskError):
        error = error.cause
    while error.__cause__ is not None and type(error).__name__ == "StartTraceback":
        error = error.__cause__
    return error


def _describe(error: BaseException | str) -> str:
    """A one-line reason for a failed task or trial: the exception the evaluation raised, or
    the death of its worker process."""
    if isinstance(error, str):
        return error
    if isinstance(error, RayActorError) or type(error).__name__ == "WorkerCrashedError":
        return "the worker process died during the evaluation"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}".rstrip(": ")


def _environment_error(error: BaseException | str) -> RankSearchError | None:
    """An error for a worker that cannot load the search's code: every evaluation would fail
    alike, so the search stops instead of storing them as failed."""
    if not isinstance(error, ImportError | RaySystemError):
        return None
    return RankSearchError(
        f"a Ray worker cannot load the model, the task or ranksearch ({_describe(error)}). "
        "Install ranksearch, and the packages the model and the task import, on every node of "
        "the cluster."
    )


def _failed(evaluate: Callable[..., Result], work: Work | Config, reason: str) -> Result:
    """A failed result of ``work`` with its costs (when an evaluator prices them)."""
    work = work if isinstance(work, Work) else Work(work)
    if isinstance(evaluate, Evaluator):
        return evaluate.result(work.config, evaluate.costs.metrics(work.config), "failed",
                               reason, partial=work.partial)
    return Result(work.config, {}, "failed", reason, partial=work.partial)
