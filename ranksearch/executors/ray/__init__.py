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

The package's modules: `cluster` (starting or joining the cluster), `searcher` (the Tune search
algorithm and its callbacks), `worker` (what runs on the workers) and `failures` (the reasons
of failed evaluations).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray
from ray import tune
from ray.exceptions import RayError
from ray.tune.schedulers import ASHAScheduler

from ...config import Config
from ...errors import RankSearchError
from ...evaluate import Evaluator, ProxySettings
from ...result import Result
from .. import Evaluate, Loop, sigterm_interrupts
from .cluster import _host_port, check_host, join_cluster, resource_shortfall, start_cluster
from .failures import _describe, _environment_error, _failed, _unwrap
from .searcher import (
    StrategySearcher,
    TrialInfo,
    _Hooks,
    _Stop,
    _trial_name,
    _tune_environment,
)
from .worker import METRIC, STEP, _defining_modules, _evaluate, _Payload, _ship_by_value, _trial

log = logging.getLogger(__name__)

EARLY_STOP = ("asha", "none")
DEFAULT_TEMP_DIR = "/tmp/rs-ray"
DEFAULT_OBJECT_STORE = 200 * 2**20


class RayExecutor:
    """Runs a search on a Ray cluster through Ray Tune.

    ``address``: a running cluster to join ("host:port" of ``ray start --head``, or "auto" for
    the one on this machine); without it a local cluster of ``num_cpus`` CPUs (default: all) is
    started, with an object store of ``object_store_memory`` bytes (it must hold the model and
    the task's data) and its files in ``temp_dir``, listening on ``host`` (default: 127.0.0.1,
    this machine only; this machine's network address lets other machines join it). The
    cluster it started is shut down at the end of the search (a joined one is only
    disconnected from); a Ray session already open in this process is used as it is, and left
    open.

    Each trial takes ``cpus_per_trial`` CPUs (and as many torch threads) and ``gpus_per_trial``
    GPUs (a fraction shares a GPU; set ``ProxySettings(device="cuda")`` to use it); at most
    ``max_concurrent`` run at once (default: as many as the cluster holds). ``early_stop="asha"``
    stops candidates whose proxy accuracy falls behind at ``grace_steps`` fine-tuning steps
    (default: the first report) and at every ``reduction_factor`` times more; they are stored
    as pruned. A trial that raises or whose worker dies is retried ``max_failures`` times, then
    stored as failed with the reason. A trial of one CPU that ASHA does not watch runs in a
    forked child of its worker (`ranksearch.executors.isolated`), so that a candidate that
    kills its process fails with the reason a local search gives.

    ``trial_timeout`` (seconds) fails a trial that runs longer: the worker runs it in a forked
    child process (`ranksearch.executors.isolated`) that it kills then, and the trial reports
    only its final result (so ASHA cannot stop it early). A search's time limit passing stops
    the trials still running (they are not stored; a resume runs them again) within Tune's
    clean-up of about 10 s. SIGTERM stops a search as Ctrl-C does.

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
        trial_timeout: float | None = None,
        host: str | None = None,
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
        if address is not None and host is not None:
            raise RankSearchError("host is where a local cluster listens; a joined cluster has "
                                  "its own")
        if host is not None:
            check_host(host)
        if trial_timeout is not None and not trial_timeout > 0:
            raise RankSearchError(f"trial_timeout must be positive seconds, got {trial_timeout}")
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
        self.host = host
        self.trial_timeout = trial_timeout
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
        if self.address is not None:
            join_cluster(self.address)
        else:
            start_cluster(self.num_cpus, self.object_store_memory, self.temp_dir, self.host)
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
        problem = resource_shortfall(self.cpus_per_trial, self.gpus_per_trial)
        if problem is not None:
            self.close()
            raise RankSearchError(problem)

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
        payload = _Payload(uuid.uuid4().hex, [ray.put(parts)], max(1, int(self.cpus_per_trial)),
                           self.trial_timeout)
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
            with sigterm_interrupts(), _tune_environment():
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


__all__ = ["RayExecutor", "StrategySearcher", "TrialInfo"]
