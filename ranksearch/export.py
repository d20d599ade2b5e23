"""Export: rebuild exactly the model a search scored, and write it.

The stored result of a config was measured on a candidate built from the factor cache and
fine-tuned by the proxy (seeded). `scored_model` gives that candidate back, after checking
that the model and task given are the ones the search measured (the study's fingerprint):
with the weights the search kept (``keep_weights=True``), nothing trained again, or rebuilt
through the same `Evaluator.candidate`; and validates it again, so the written model is the
one whose figures the store holds.

`Exported.write` writes it as a ``ranksearch`` file, which `ranksearch.load` rebuilds on the
dense model, or as a file that stands alone (`ranksearch.formats`), for the backend its
latency was timed on (`BACKEND_RUN`): onnx as an ``.onnx`` file by default, channels_last with
its weights in that memory format, compile with a note to compile it at load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .clone import clone_module
from .config import Config
from .constraints import Constraint
from .evaluate import Evaluator, ProxySettings
from .formats import check_format, ranksearch_record, target_path, write_standalone
from .inputs import Inputs
from .pareto import best
from .report import write_atomic
from .result import Result
from .space import SpaceSpec
from .store import StoreError, default_url, list_studies, read_fingerprint, read_study
from .surgery import save
from .task import Task

#: How to run an exported model the way its latency was timed, by backend.
BACKEND_RUN = {
    "eager": "call the model as it is",
    "channels_last": "weights in channels_last memory format; after loading run "
                     "model.to(memory_format=torch.channels_last) and give it inputs "
                     "x.contiguous(memory_format=torch.channels_last)",
    "compile": "compile it after loading, as its latency was timed: torch.compile(model)",
    "onnx": "run the .onnx file with onnxruntime, as its latency was timed",
}


@dataclass(frozen=True)
class Exported:
    """A rebuilt candidate: the ``model``, its ``config``, the stored ``result`` it was
    picked as, ``metrics``, the validation measured again on the rebuilt model, and the
    ``backend`` its search timed latency on (one of `BACKEND_RUN`)."""

    model: nn.Module = field(repr=False)
    config: Config
    result: Result
    metrics: dict[str, float]
    backend: str = "eager"

    @property
    def format(self) -> str:
        """The format written by default: ``onnx`` for the onnx backend, else ``ranksearch``."""
        return "onnx" if self.backend == "onnx" else "ranksearch"

    def write(
        self,
        path: str | os.PathLike,
        fmt: str | None = None,
        example_input: Inputs | None = None,
        **extra: Any,
    ) -> Path:
        """Write the model as ``fmt`` (one of `FORMATS`; default `format`) and a JSON record
        beside it (``.json``: the format, how to load the file, the input, the backend and
        how to run it there, the config and metrics, and ``extra``). Returns the path
        written. For the channels_last backend the weights are written in that memory format.

        ``ranksearch`` is `ranksearch.save` (load it with `ranksearch.load` on the dense
        model; ``example_input``, of any kind, is recorded if given); the other formats stand
        alone (see `write_standalone`) and need ``example_input``, one batch as a tensor. A
        suffix of another format (or none) is replaced by the format's own (``.pt``, ``.pt2``,
        ``.onnx``).
        """
        fmt = check_format(fmt or self.format)
        path = target_path(path, fmt)
        model = self.model
        if self.backend == "channels_last":
            model = clone_module(model).to(memory_format=torch.channels_last)
        if fmt == "ranksearch":
            path = save(path, model, self.config)
            record = ranksearch_record(path, example_input)
        else:
            record = write_standalone(model, path, fmt, example_input)
        backend = {"name": self.backend, "run": BACKEND_RUN[self.backend]}
        doc = {**record, "backend": backend, "config": self.config.to_json(),
               "search_metrics": dict(self.result.metrics), "rebuilt_metrics": self.metrics,
               "fingerprint": self.result.fingerprint, **extra}
        write_atomic(path.with_suffix(".json"), json.dumps(doc, indent=2).encode())
        return path


def study_of(url: str, study: str | None) -> str:
    """``study``, or the only study of the store."""
    if study is not None:
        return study
    names = list_studies(url)
    if len(names) != 1:
        raise StoreError(f"the store holds {names or 'no searches'}; name one with --study")
    return names[0]


def scored_model(
    model: nn.Module,
    task: Task,
    *,
    store: str | None = None,
    out: str = "ranksearch-out",
    study: str | None = None,
    pick: Sequence[str | Constraint] = (),
    config: Config | None = None,
) -> Exported:
    """The candidate a search scored, rebuilt from ``model`` (the dense model searched) and
    ``task``: ``config``, or the best stored result by the task's metric meeting ``pick``
    (default: the search's constraints). Its kept weights are loaded when the search kept them
    (see `Evaluator.scored`); otherwise it is fine-tuned again by the same seeded proxy.

    Raises `StoreError` when the model, the task or the settings differ from those the study
    measured (naming what differs), or when nothing meets ``pick``.
    """
    url = store or default_url(out)
    study = study_of(url, study)
    results, meta = read_study(url, study)
    if config is None:
        picked = best(results, pick or meta.get("constraints", []),
                      metric=task.metric)  # type: ignore[arg-type]
        if picked is None:
            raise StoreError(f"no stored result of {study!r} meets {list(map(str, pick))}; "
                             "relax the budget")
    else:
        found = [r for r in results if r.config == config and r.ok]
        if not found:
            raise StoreError(f"{config} has no successful result in {study!r}")
        picked = found[-1]
    if "space" not in meta or "proxy" not in meta:
        raise StoreError(f"study {study!r} does not record its space and proxy settings; run "
                         "the search again with this version to export from it")
    space = SpaceSpec.from_json(meta["space"]).discover(model, task.example_input())
    # no stored bn_recalibrate means off (to_json leaves 0 out, older stores have none)
    proxy = ProxySettings(**{"bn_recalibrate": 0, **meta["proxy"]})
    evaluator = Evaluator(model, task, proxy, space)
    stored = read_fingerprint(url, study)
    if stored is not None:
        differences = evaluator.fingerprint.differences(stored)
        if differences:
            raise StoreError(f"the model or task given is not the one study {study!r} measured: "
                             f"{'; '.join(differences)}. Pass the model and task of the search.")
    candidate = evaluator.scored(picked)
    return Exported(candidate, picked.config, picked, evaluator.validate(candidate),
                    backend=evaluator.settings.backend)
