"""The worker side of a search on Ray: the payload that carries the evaluator's parts through
the object store, the evaluator each worker process builds once and keeps, the Tune trainable
and the Ray task that score a config, and shipping by value the code workers cannot import."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from importlib.metadata import packages_distributions
from typing import Any

import ray
import torch
from ray import cloudpickle, tune

from ...config import Config
from ...evaluate import Evaluator, ProxySettings
from ...result import Result
from ..isolated import IsolatedEvaluator

#: Tune's metric: the task's metric with higher better (negated for a min metric, as loss).
METRIC = "score"
#: Tune's time attribute: the fine-tuning step of a report.
STEP = "step"


@dataclass(frozen=True)
class _Payload:
    """What a worker needs to build the evaluator: a key for its per-process cache, a
    reference to the pickled parts (in a list, so Ray hands it over unresolved), the torch
    threads per trial and the seconds a trial may run (None: no limit)."""

    key: str
    ref: list[ray.ObjectRef]
    threads: int
    timeout: float | None = None


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
    """The Tune trainable: evaluate one config, reporting the task's metric at each intermediate
    validation when a scheduler (ASHA) watches them and may stop the trial there, then the
    whole result."""
    evaluator = _evaluator(payload)
    assert isinstance(evaluator, Evaluator)
    steps = evaluator.settings.steps
    node = ray.get_runtime_context().get_node_id()

    name, sign = evaluator.metric.name, 1.0 if evaluator.metric.direction == "max" else -1.0

    def report(step: int, value: float) -> bool:
        if step < steps:  # the last validation comes with the result
            tune.report({METRIC: sign * value, name: value, STEP: step, "node": node})
        return True

    config, partial = Config.from_json(params["config"]), params.get("partial")
    if _isolates(payload, intermediate):  # in a child process that may die or be killed
        result = _isolated(payload, evaluator)(config, partial=partial)
    else:
        result = evaluator(config, report=report if intermediate and partial is None else None,
                           partial=partial)
    tune.report({METRIC: sign * result.metrics.get(name, math.nan), STEP: steps, "node": node,
                 "result": json.dumps(result.to_json())})


def _isolates(payload: _Payload, intermediate: bool) -> bool:
    """Whether a trial runs in a forked child: always under a timeout; otherwise when it
    reports only its final result and runs on one thread (the child's), so that a candidate
    that kills its process fails with the same reason as in a local search."""
    return payload.timeout is not None or (not intermediate and payload.threads == 1)


#: The isolated evaluator of this worker process, by payload key.
_ISOLATED: dict[str, IsolatedEvaluator] = {}


def _isolated(payload: _Payload, evaluator: Evaluator) -> IsolatedEvaluator:
    found = _ISOLATED.get(payload.key)
    if found is None:
        for old in _ISOLATED.values():
            old.close(kill=True)
        _ISOLATED.clear()
        found = _ISOLATED[payload.key] = IsolatedEvaluator(evaluator, payload.timeout)
    return found


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
