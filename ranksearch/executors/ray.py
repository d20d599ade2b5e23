"""The Ray executor: a search driven by Ray Tune over the cores, GPUs and nodes of a Ray cluster.

`RayExecutor.drive` hands the search loop to a `ray.tune.Tuner` whose search algorithm adapts
it (`StrategySearcher`): each piece of work the loop proposes becomes a Tune trial that runs
our `Evaluator` on a worker, reporting the proxy accuracy at each validation so that ASHA can
stop weak candidates early. Every finished trial is committed to the store as it ends, so a
search on Ray resumes after an interruption exactly like a local one. The base model and the
task's data go to the cluster once, through the object store; each worker process builds the
evaluator once (with its factor cache) and keeps it for the trials it runs.

Code that defines the model or the task outside installed packages (a user task file, a script,
a test module) is shipped with them; anything else must be importable on every node
(``pip install ranksearch`` there).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from importlib.metadata import packages_distributions
from typing import TYPE_CHECKING, Any

import ray
import torch
from ray import cloudpickle, tune
from ray.exceptions import (
    AuthenticationError,
    RayActorError,
    RayError,
    RaySystemError,
    RayTaskError,
)
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher
from ray.tune.stopper import Stopper

from ..errors import RankSearchError
from ..evaluate import Evaluator, ProxySettings
from ..result import Result
from ..space import Config
from . import DONE, WAIT, Evaluate, Loop, Work

if TYPE_CHECKING:
    from ray.tune.experiment import Trial


log = logging.getLogger(__name__)

METRIC = "accuracy"
#: Tune's time attribute: the fine-tuning step of a report.
STEP = "step"
EARLY_STOP = ("asha", "none")
DEFAULT_TEMP_DIR = "/tmp/rs-ray"
DEFAULT_OBJECT_STORE = 200 * 2**20
_AUTH_HELP = (
    "The cluster uses token authentication: set RAY_AUTH_MODE=token here and make the cluster's "
    "token available (`ray get-auth-token` on the head node; copy it to ~/.ray/auth_token or set "
    "RAY_AUTH_TOKEN)."
)
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


class RayExecutor:
    """Runs a search on a Ray cluster through Ray Tune.

    ``address``: a running cluster to join ("host:port" of ``ray start --head``, or "auto" for
    the one on this machine); without it a local cluster of ``num_cpus`` CPUs (default: all) is
    started, with an object store of ``object_store_memory`` bytes (it must hold the model and
    the task's data) and its files in ``temp_dir``. The cluster it started is shut down at the
    end of the search (a joined one is only disconnected from); a Ray session already open in
    this process is used as it is, and left open.

    Each trial takes ``cpus_per_trial`` CPUs (and as many torch threads) and ``gpus_per_trial``
    GPUs (a fraction shares a GPU; set ``ProxySettings(device="cuda")`` to use it); at most
    ``max_concurrent`` run at once (default: as many as the cluster holds). ``early_stop="asha"``
    stops candidates whose proxy accuracy falls behind at ``grace_steps`` fine-tuning steps
    (default: the first report) and at every ``reduction_factor`` times more; they are stored
    as pruned. A trial that raises or whose worker dies is retried ``max_failures`` times, then
    stored as failed with the reason.

    ``trials`` records where and how each evaluation ran; ``startup_seconds`` the time taken
    to start or join the cluster.
    """

    def __init__(
        self,
        address: str | None = None,
        cpus_per_trial: float = 1,
        gpus_per_trial: float = 0,
        max_concurrent: int | None = None,
        early_stop: str = "asha",
        grace_steps: int | None = None,
        reduction_factor: float = 3,
        max_failures: int = 1,
        num_cpus: int | None = None,
        object_store_memory: int = DEFAULT_OBJECT_STORE,
        temp_dir: str | None = None,
    ) -> None:
        if cpus_per_trial <= 0 or gpus_per_trial < 0:
            raise RankSearchError(
                f"cpus_per_trial must be > 0 and gpus_per_trial >= 0, got {cpus_per_trial} and "
                f"{gpus_per_trial}"
            )
        if gpus_per_trial > 1 and gpus_per_trial != int(gpus_per_trial):
            raise RankSearchError(
                f"gpus_per_trial above 1 must be a whole number, got {gpus_per_trial}"
            )
        if max_concurrent is not None and max_concurrent < 1:
            raise RankSearchError(f"max_concurrent must be at least 1, got {max_concurrent}")
        if early_stop not in EARLY_STOP:
            raise RankSearchError(
                f"early_stop must be one of {', '.join(EARLY_STOP)}, got {early_stop!r}"
            )
        if grace_steps is not None and grace_steps < 1:
            raise RankSearchError(f"grace_steps must be at least 1, got {grace_steps}")
        if reduction_factor <= 1:
            raise RankSearchError(f"reduction_factor must be above 1, got {reduction_factor}")
        if max_failures < 0:
            raise RankSearchError(f"max_failures must be >= 0, got {max_failures}")
        if num_cpus is not None and num_cpus < 1:
            raise RankSearchError(f"num_cpus must be at least 1, got {num_cpus}")
        if object_store_memory < 80 * 2**20:
            raise RankSearchError(
                f"object_store_memory must be at least 80 MB, got {object_store_memory} bytes"
            )
        if address is not None and num_cpus is not None:
            raise RankSearchError("num_cpus sizes a local cluster; a joined cluster has its own")
        if address not in (None, "auto"):
            _host_port(address)
        self.address = address
        self.cpus_per_trial = cpus_per_trial
        self.gpus_per_trial = gpus_per_trial
        self.max_concurrent = max_concurrent
        self.early_stop = early_stop
        self.grace_steps = grace_steps
        self.reduction_factor = reduction_factor
        self.max_failures = max_failures
        self.num_cpus = num_cpus
        self.object_store_memory = object_store_memory
        self.temp_dir = temp_dir or DEFAULT_TEMP_DIR
        self.trials: list[TrialInfo] = []
        self.startup_seconds = 0.0
        self._owned = False
        self._shipped: tuple[Callable[[Config], Result], _Payload] | None = None

    # ------------------------------------------------------------------ the cluster

    def connect(self) -> None:
        """Join the cluster at ``address``, or start a local one (nothing when Ray is up)."""
        if ray.is_initialized():
            return
        start = time.perf_counter()
        quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
        if self.address is not None:
            _check_reachable(self.address)
            try:
                ray.init(address=self.address, **quiet)
            except Exception as e:  # ConnectionError, auth and version errors vary by release
                raise RankSearchError(
                    f"cannot join the Ray cluster at {self.address!r} ({type(e).__name__}: {e}). "
                    + (_AUTH_HELP if isinstance(e.__cause__, AuthenticationError) else
                       "Start one with `ray start --head` on the head node (and `ray start "
                       "--address=HEAD:6379` on the others), or leave address unset to start a "
                       "local cluster.")
                ) from e
        else:
            try:
                ray.init(num_cpus=self.num_cpus, include_dashboard=False,
                         object_store_memory=self.object_store_memory, _temp_dir=self.temp_dir,
                         **quiet)
            except Exception as e:
                raise RankSearchError(
                    f"cannot start a local Ray cluster ({type(e).__name__}: {e}); check that "
                    f"{self.temp_dir} is writable (temp_dir) and the memory is available"
                ) from e
        self._owned = True
        self.startup_seconds = time.perf_counter() - start
        self._check_resources()

    def close(self) -> None:
        """Shut down the local cluster this executor started, or leave the one it joined (which
        keeps running); a session opened by someone else is left open."""
        self._shipped = None
        if self._owned:
            ray.shutdown()
            self._owned = False

    def _check_resources(self) -> None:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        if any(n.get("CPU", 0) >= self.cpus_per_trial and n.get("GPU", 0) >= self.gpus_per_trial
               for n in nodes):
            return
        largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        self.close()
        raise RankSearchError(
            f"no node of the Ray cluster can run a trial of {self.cpus_per_trial} CPU(s) and "
            f"{self.gpus_per_trial} GPU(s); the largest has {largest.get('CPU', 0):g} CPU(s) and "
            f"{largest.get('GPU', 0):g} GPU(s). Lower cpus_per_trial / gpus_per_trial or add "
            "nodes."
        )

    def _payload(self, evaluate: Callable[[Config], Result]) -> _Payload:
        """The evaluator's parts in the object store (put once per evaluator)."""
        if self._shipped is not None and self._shipped[0] is evaluate:
            return self._shipped[1]
        if isinstance(evaluate, Evaluator):
            parts: Any = (evaluate.model, evaluate.task, evaluate.settings, evaluate.space, None,
                          evaluate.fingerprint)
            _ship_by_value(_defining_modules(evaluate))
        else:
            parts = evaluate
            _ship_by_value([getattr(evaluate, "__module__", None), type(evaluate).__module__])
        payload = _Payload(uuid.uuid4().hex, [ray.put(parts)], max(1, int(self.cpus_per_trial)))
        self._shipped = (evaluate, payload)
        return payload

    # ------------------------------------------------------------------ evaluations

    def map(self, evaluate: Callable[[Config], Result], configs: Sequence[Config]
            ) -> Iterator[Result]:
        """Evaluate ``configs`` as Ray tasks (at most ``max_concurrent`` at a time), yielding
        each result as it finishes; a task that fails ``max_failures`` + 1 times gives a failed
        result (scoring outside a search; a search runs through `drive`)."""
        if not configs:
            return
        self.connect()
        payload = self._payload(evaluate)
        task = ray.remote(_evaluate).options(
            num_cpus=self.cpus_per_trial, num_gpus=self.gpus_per_trial,
            max_retries=self.max_failures, retry_exceptions=True,
        )
        todo = deque(configs)
        running: dict[ray.ObjectRef, Config] = {}
        try:
            while todo or running:
                while todo and len(running) < (self.max_concurrent or len(configs)):
                    config = todo.popleft()
                    running[task.remote(payload, config.key)] = config
                [done], _ = ray.wait(list(running), num_returns=1)
                config = running.pop(done)
                try:
                    data, node = ray.get(done)
                    result = Result.from_json(data)
                except RayError as e:
                    error = _unwrap(e)
                    if (stop := _environment_error(error)) is not None:
                        raise stop from e
                    result, node = _failed(evaluate, config, _describe(error)), None
                self.trials.append(TrialInfo(config.key, node, result.status, result.wall_time))
                yield result
        finally:
            for ref in running:
                ray.cancel(ref)

    def drive(self, loop: Loop, evaluate: Evaluate) -> None:
        """Drive the search loop with Ray Tune until it is done (see `StrategySearcher`)."""
        if not isinstance(evaluate, Evaluator):
            raise RankSearchError("the ray executor drives searches scored by an Evaluator")
        settings = evaluate.settings
        searcher = StrategySearcher(loop, evaluate, self)
        storage = tempfile.mkdtemp(prefix="rs-tune-")
        try:
            if settings.device.startswith("cuda") and not self.gpus_per_trial:
                raise RankSearchError(
                    f"the proxy runs on {settings.device} but gpus_per_trial is 0, so trials see "
                    "no GPU; set gpus_per_trial (e.g. 0.5 to share a GPU between two trials)"
                )
            if self.gpus_per_trial and not settings.device.startswith("cuda"):
                log.warning("gpus_per_trial is %g but the proxy runs on %s; the GPUs sit idle",
                            self.gpus_per_trial, settings.device)
            self.connect()
            scheduler = self._scheduler(settings)
            trainable = tune.with_parameters(_trial, payload=self._payload(evaluate),
                                             intermediate=scheduler is not None)
            resources = {"cpu": self.cpus_per_trial, "gpu": self.gpus_per_trial}
            tuner = tune.Tuner(
                tune.with_resources(trainable, resources),
                tune_config=tune.TuneConfig(
                    search_alg=searcher, scheduler=scheduler, num_samples=-1,
                    max_concurrent_trials=self.max_concurrent, reuse_actors=True,
                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
                ),
                run_config=tune.RunConfig(
                    name="ranksearch", storage_path=storage, verbose=0, stop=_Stop(searcher),
                    callbacks=[_Hooks(searcher)],
                    failure_config=tune.FailureConfig(max_failures=self.max_failures),
                ),
            )
            with _tune_environment():
                tuner.fit()
        except KeyboardInterrupt:
            loop.interrupt()  # what finished is stored; a re-run resumes
        finally:
            shutil.rmtree(storage, ignore_errors=True)
            self.close()
        if searcher.error is not None:
            raise searcher.error
        if loop.stopped is None:  # Tune ended on its own (e.g. every trial errored)
            loop.interrupt()


    def _scheduler(self, settings: ProxySettings) -> ASHAScheduler | None:
        """ASHA on the proxy accuracy over fine-tuning steps (nothing to stop at zero shot)."""
        if self.early_stop == "none" or settings.steps == 0:
            return None
        grace = min(self.grace_steps or settings.report_every, settings.steps)
        return ASHAScheduler(time_attr=STEP, metric=METRIC, mode="max", max_t=settings.steps,
                             grace_period=grace, reduction_factor=self.reduction_factor)


# ---------------------------------------------------------------------- the driver side


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
        if work is None:
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
        if METRIC not in last:
            return _failed(evaluator, work, "the trial ended without reporting")
        metrics = {**evaluator.costs.metrics(work.config), METRIC: float(last[METRIC])}
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
    """Ends the Tune run at once when the searcher hit an error of its own."""

    def __init__(self, searcher: StrategySearcher) -> None:
        self.searcher = searcher

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.searcher.error is not None


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


def _host_port(address: str) -> tuple[str, int]:
    """The host and port of a Ray address ("host:port", optionally with a scheme)."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise RankSearchError(
            f"Ray address {address!r} is not of the form host:port (e.g. 10.0.0.1:6379) or "
            "'auto'"
        )
    return host.strip("[]"), int(port)


def _check_reachable(address: str) -> None:
    """Fail fast, naming the address, when nothing listens there ("auto" is looked up by Ray)."""
    if address == "auto":
        return
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        raise RankSearchError(
            f"cannot reach a Ray cluster at {address} ({e}). Start one with `ray start --head "
            f"--port={port}` on {host} (and `ray start --address={host}:{port}` on the other "
            "nodes), check the host and firewall, or leave address unset to start a local "
            "cluster."
        ) from None


# ---------------------------------------------------------------------- the worker side


@dataclass(frozen=True)
class _Payload:
    """What a worker needs to build the evaluator: a key for its per-process cache, a
    reference to the pickled parts (in a list, so Ray hands it over unresolved) and the torch
    threads per trial."""

    key: str
    ref: list[ray.ObjectRef]
    threads: int


#: The evaluator of the current search in this worker process, by payload key.
_EVALUATORS: dict[str, Callable[..., Result]] = {}


def _evaluator(payload: _Payload) -> Callable[..., Result]:
    found = _EVALUATORS.get(payload.key)
    if found is None:
        parts = ray.get(payload.ref[0])
        torch.set_num_threads(payload.threads)
        if isinstance(parts, tuple):
            model, task, settings, *rest = parts
            found = Evaluator(model, task, _worker_settings(settings), *rest)
        else:
            found = parts
        _EVALUATORS.clear()
        _EVALUATORS[payload.key] = found
    return found


def _worker_settings(settings: ProxySettings) -> ProxySettings:
    """The proxy settings on this worker: a CUDA proxy runs on the GPU Ray assigned to it,
    whatever index the driver named. Ray makes only the assigned GPUs visible
    (``CUDA_VISIBLE_DEVICES``), so that GPU is usually ``cuda:0`` here. The fingerprint comes
    from the driver, so results stay comparable."""
    ids = [str(i) for i in ray.get_gpu_ids()]
    if not settings.device.startswith("cuda") or not ids:
        return settings
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:  # Ray left every GPU visible: address the assigned one by its id
        index = int(ids[0]) if ids[0].isdigit() else 0
    else:
        order = [v.strip() for v in visible.split(",")]
        index = order.index(ids[0]) if ids[0] in order else 0
    return replace(settings, device=f"cuda:{index}")


def _trial(params: dict[str, Any], payload: _Payload, intermediate: bool) -> None:
    """The Tune trainable: evaluate one config, reporting the accuracy at each intermediate
    validation when a scheduler (ASHA) watches them and may stop the trial there, then the
    whole result."""
    evaluator = _evaluator(payload)
    assert isinstance(evaluator, Evaluator)
    steps = evaluator.settings.steps
    node = ray.get_runtime_context().get_node_id()

    def report(step: int, accuracy: float) -> bool:
        if step < steps:  # the last validation comes with the result
            tune.report({METRIC: accuracy, STEP: step, "node": node})
        return True

    config, partial = Config.from_json(params["config"]), params.get("partial")
    result = evaluator(config, report=report if intermediate and partial is None else None,
                       partial=partial)
    tune.report({METRIC: result.metrics.get(METRIC, math.nan), STEP: steps, "node": node,
                 "result": json.dumps(result.to_json())})


def _evaluate(payload: _Payload, key: str) -> tuple[dict[str, Any], str]:
    """A Ray task of `RayExecutor.map`: one result, and the node that made it."""
    result = _evaluator(payload)(Config.from_json(key))
    return result.to_json(), ray.get_runtime_context().get_node_id()


def _defining_modules(evaluator: Evaluator) -> list[str | None]:
    """Modules whose code the model and the task need."""
    task = evaluator.task
    names = [type(m).__module__ for m in evaluator.model.modules()]
    names += [getattr(task.loss, "__module__", None), type(task.loss).__module__]
    names += [type(d).__module__ for d in (task.train, task.val, task.test) if d is not None]
    return names


def _ship_by_value(modules: Iterable[str | None]) -> None:
    """Pickle the code of ``modules`` with the objects when it is not in an installed package
    (workers could not import it: user task files, scripts, test modules)."""
    installed = packages_distributions()
    for name in set(filter(None, modules)):
        top = name.partition(".")[0]
        module = sys.modules.get(name)
        if name == "__main__" or module is None or top in installed \
                or top in sys.stdlib_module_names or top in sys.builtin_module_names:
            continue
        cloudpickle.register_pickle_by_value(module)


__all__ = ["RayExecutor", "StrategySearcher", "TrialInfo"]
