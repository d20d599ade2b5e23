"""Tasks (data, loss, metric, and optionally your own training and evaluation) and user task
files.

A `Task` holds train / val (/ test) data of ``(x, y)`` pairs: ``x`` the model's input (a tensor,
a tuple of positional arguments or a dict of keyword arguments, see `ranksearch.inputs`), ``y``
the target (a class index, per-token class indices, a regression target, ...). Each split is a
map-style dataset of samples (anything with a length and indexing, a list too; batched by the
proxy), an `IterableDataset` of samples, a `DataLoader`, or any other iterable of ``(x, y)``
batches that can be read more than once (loaders and iterables are used as they are: their
batch size, order and shuffling generator are yours).
`load_user_task` imports a task file ``path/to/file.py:factory`` that returns
``(model, task)``. The built-in data sets are in `ranksearch.datasets`, baseline training in
`ranksearch.training`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Mapping, Sized
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate

from .errors import TaskError
from .inputs import rows
from .metrics import METRICS, Metric, OutputSelector, get_metric

__all__ = ["Task", "load_user_task"]

Loss = Callable[[Any, Any], Tensor]
#: ``train_step(model, batch, optimizer) -> loss``: one whole training step of your own.
TrainStep = Callable[[nn.Module, Any, torch.optim.Optimizer], Any]
#: ``finetune(model, steps)``: fine-tune ``model`` in place, instead of the proxy's loop.
Finetune = Callable[[nn.Module, int], None]
#: ``evaluate(model) -> {metric: value}``: validation of your own.
Evaluate = Callable[[nn.Module], Mapping[str, float]]
SPLITS = ("train", "val", "test")
#: Metrics scored on class indices: their labels are counted into ``num_classes``.
_CLASS_METRICS = ("accuracy", "top5", "perplexity")


@dataclass(frozen=True)
class Task:
    """A supervised task: data of ``(x, y)`` pairs, a loss and a metric.

    ``loss(prediction, y)`` returns a scalar (default: cross-entropy). ``metric`` is a name
    (``"accuracy"``, ``"top5"``, ``"loss"``, ``"perplexity"``, ``"mse"``, ``"mae"``) or a
    `ranksearch.metrics.Metric` of your own; it is kept as a `Metric`. ``output`` says which
    part of the model's output is the prediction (a key or attribute name such as
    ``"logits"``, or a callable ``output(out) -> Tensor``; default: a tensor as it is, a
    tuple's first element, a dict's or ``ModelOutput``'s ``"logits"``).

    Your own loop, run by the proxy in place of its own (seeded as its own is):
    ``train_step(model, batch, optimizer) -> loss`` does one whole step on one training batch
    (forward, backward, clipping, ``optimizer.step()``, AMP: as you like) with the proxy's
    optimizer and step count; ``finetune(model, steps)`` does all the fine-tuning (your
    optimizer and scheduler); ``evaluate(model) -> {name: value}`` replaces validation and
    must return the metric's name (``val`` may then be left out).

    ``input_shape`` defaults to the shape of the first training sample when it is a tensor of
    a map-style dataset; ``num_classes`` to 1 + the largest training label for the class
    metrics (accuracy, top5, perplexity; read from the label tensor of a `TensorDataset`,
    otherwise by one pass over ``train``), and to None where it cannot be told.
    """

    name: str
    train: Any
    val: Any = None
    test: Any = None
    loss: Loss = F.cross_entropy
    metric: str | Metric = "accuracy"
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    output: OutputSelector = None
    train_step: TrainStep | None = None
    finetune: Finetune | None = None
    evaluate: Evaluate | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "metric", get_metric(self.metric))
        for name in ("loss", "train_step", "finetune", "evaluate"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TaskError(f"task {self.name!r}: {name} must be a function, got "
                                f"{type(value).__name__}")
        if self.train_step is not None and self.finetune is not None:
            raise TaskError(f"task {self.name!r}: give train_step (one step, the proxy's loop) "
                            "or finetune (the whole fine-tuning), not both")
        if self.val is None and self.evaluate is None:
            raise TaskError(f"task {self.name!r} has no val data: pass val=... or your own "
                            "evaluate=lambda model: {...}")
        for split in SPLITS:
            data = getattr(self, split)
            if data is not None:
                _check_data(self.name, split, data)
        shape = self.input_shape
        if shape is None and _is_map(self.train):
            first = self.train[0][0]
            shape = tuple(first.shape) if isinstance(first, Tensor) else None
        object.__setattr__(self, "input_shape",
                           None if shape is None else tuple(int(s) for s in shape))
        if self.num_classes is None and _is_map(self.train):
            classes = self.metric.name in _CLASS_METRICS and METRICS.get(
                self.metric.name) is self.metric
            object.__setattr__(self, "num_classes", _count_classes(self.train, classes))
        if self.num_classes is not None and self.num_classes < 1:
            raise TaskError(f"task {self.name!r}: num_classes must be ≥ 1, got {self.num_classes}")

    def dataset(self, split: str) -> Any:
        """The data of ``split`` ("train", "val" or "test")."""
        if split not in SPLITS:
            raise TaskError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
        data = getattr(self, split)
        if data is None:
            fix = "use 'train' or add val=..." if split == "val" else "use 'val' or add test=..."
            raise TaskError(f"task {self.name!r} has no {split} split; {fix}")
        return data

    def size(self, split: str) -> int | None:
        """The number of samples of ``split``, None when it cannot be told without reading it."""
        data = self.dataset(split)
        if isinstance(data, DataLoader):
            data = data.dataset
        return len(data) if isinstance(data, Sized) and not isinstance(data, IterableDataset) \
            else None

    def example_input(self, batch: int = 1) -> Any:
        """A batch of ``batch`` model inputs, e.g. for tracing the model: zeros of shape
        batch×input_shape when the training inputs are float tensors (images), otherwise the
        first training inputs as they are (token ids, tuples, dicts)."""
        if _is_map(self.train):
            first = self.train[0][0]
            if isinstance(first, Tensor) and first.is_floating_point() and self.input_shape:
                return torch.zeros(batch, *self.input_shape)
            count = min(batch, len(self.train))
            return default_collate([self.train[i][0] for i in range(count)])
        x = _first_batch(self.name, self.loader("train", batch, shuffle=False))[0]
        if isinstance(x, Tensor) and x.is_floating_point() and self.input_shape:
            return torch.zeros(batch, *self.input_shape)
        return rows(x, batch)

    def loader(
        self, split: str, batch_size: int = 128, shuffle: bool | None = None, seed: int = 0
    ) -> Iterable[Any]:
        """The batches of ``split``: a single-process DataLoader over a dataset (batches of
        ``batch_size``), or the split's own DataLoader or iterable as it is.

        ``shuffle`` (map-style datasets only) defaults to True for "train" only; shuffling
        draws from a generator seeded with ``seed``, so the batch order is the same on every
        call.
        """
        if batch_size < 1:
            raise TaskError(f"batch_size must be ≥ 1, got {batch_size}")
        data = self.dataset(split)
        if isinstance(data, IterableDataset):
            return DataLoader(data, batch_size=batch_size, num_workers=0)
        if not _is_map(data):
            return data
        return DataLoader(
            data,
            batch_size=batch_size,
            shuffle=split == "train" if shuffle is None else shuffle,
            generator=torch.Generator().manual_seed(seed),
            num_workers=0,
        )

    def batches(self, split: str, batch_size: int, limit: int | None = None,
                shuffle: bool | None = None, seed: int = 0) -> list[tuple[Any, Any]]:
        """The first ``limit`` batches of `loader` (all when None), kept in memory: each an
        ``(inputs, targets)`` pair, else a `TaskError`, as when the split gives none."""
        loader = self.loader(split, batch_size, shuffle, seed)
        found = list(islice(loader, limit)) if limit else list(loader)
        if not found:
            raise TaskError(f"task {self.name!r}: the {split} data gave no batches")
        bad = next((b for b in found if not (isinstance(b, list | tuple) and len(b) == 2)),
                   None)
        if bad is not None:
            raise TaskError(f"task {self.name!r}: a {split} batch must be an (inputs, targets) "
                            f"pair, got {type(bad).__name__}")
        return found


def _is_map(data: Any) -> bool:
    """Whether ``data`` is a map-style dataset of samples (batched by the task's loader)."""
    return (isinstance(data, Sized) and hasattr(data, "__getitem__")
            and not isinstance(data, DataLoader | IterableDataset | Mapping | str))


def _check_data(task: str, split: str, data: Any) -> None:
    kinds = ("a Dataset of (x, y) samples (e.g. a TensorDataset), an IterableDataset, a "
             "DataLoader, or an iterable of (x, y) batches")
    if isinstance(data, Mapping | str | bytes | Tensor) or not isinstance(data, Iterable | Sized):
        raise TaskError(f"task {task!r}: the {split} data must be {kinds}, got "
                        f"{type(data).__name__}")
    if _is_map(data) and len(data) == 0:
        raise TaskError(f"task {task!r}: the {split} dataset must be a non-empty Dataset "
                        f"with a length (e.g. a TensorDataset of x and y), got an empty "
                        f"{type(data).__name__}")
    if not _is_map(data) and not isinstance(data, DataLoader | IterableDataset) \
            and iter(data) is data:
        raise TaskError(f"task {task!r}: the {split} data is a {type(data).__name__}, which can "
                        "be read only once; pass a list of batches, a DataLoader or a Dataset "
                        "(every candidate reads the data again)")


def _first_batch(task: str, batches: Iterable[Any]) -> tuple[Any, Any]:
    batch = next(iter(batches), None)
    if not (isinstance(batch, list | tuple) and len(batch) == 2):
        got = "nothing" if batch is None else type(batch).__name__
        raise TaskError(f"task {task!r}: a batch must be an (inputs, targets) pair, got {got}")
    return batch[0], batch[1]


def _count_classes(data: Dataset, required: bool) -> int | None:
    """1 + the largest label; None when the labels are not integers (or cannot be read) and
    ``required`` is false."""
    if isinstance(data, TensorDataset) and len(data.tensors) >= 2:
        labels = data.tensors[1]
    else:
        try:
            first = torch.as_tensor(data[0][1])
            if first.is_floating_point() or first.is_complex():
                labels = first
            else:
                labels = torch.stack([torch.as_tensor(data[i][1]).max()
                                      for i in range(len(data))])  # type: ignore[arg-type]
        except (TypeError, ValueError, RuntimeError, IndexError):
            if required:
                raise TaskError("cannot read the labels to count the classes; pass "
                                "num_classes=") from None
            return None
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        if required:
            raise TaskError("labels must be integer class indices; pass num_classes= for other "
                            "tasks, or a metric for them (metric='mse')")
        return None
    return int(labels.max()) + 1 if labels.numel() else None


# --------------------------------------------------------------------------- user tasks

_USER_TASK_HELP = "define `def factory(): return model, Task(...)` and pass path/to/file.py:factory"


def load_user_task(spec: str, **kwargs: Any) -> tuple[nn.Module, Task]:
    """Import ``path/to/file.py`` of ``spec = "path/to/file.py:factory"`` and return
    ``factory(**kwargs)``, which must be a pair ``(model, task)`` of an ``nn.Module`` and a
    `Task`. Each way this can go wrong raises `TaskError` naming the problem and the fix."""
    path_text, sep, attribute = spec.rpartition(":")
    if not sep or not path_text or not attribute.isidentifier():
        raise TaskError(f"task spec {spec!r} is not of the form path/to/file.py:factory")
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist; check the path in {spec!r}")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"_ranksearch_user_task_{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise TaskError(f"cannot import {path}: it must be a Python source file (.py)")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up there
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise TaskError(f"importing task file {path} failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attribute, None)
    if factory is None:
        public = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise TaskError(
            f"{path} has no attribute {attribute!r} (callables there: "
            f"{', '.join(sorted(public)) or 'none'}); {_USER_TASK_HELP}"
        )
    if not callable(factory):
        raise TaskError(
            f"{path}:{attribute} is a {type(factory).__name__}, not a function; " + _USER_TASK_HELP
        )
    try:
        result = factory(**kwargs)
    except Exception as exc:
        raise TaskError(f"{spec} raised {type(exc).__name__}: {exc}") from exc
    if not (
        isinstance(result, tuple | list)
        and len(result) == 2
        and isinstance(result[0], nn.Module)
        and isinstance(result[1], Task)
    ):
        got = (
            f"({', '.join(type(v).__name__ for v in result)})"
            if isinstance(result, tuple | list)
            else type(result).__name__
        )
        raise TaskError(
            f"{spec} returned {got}; it must return (model: nn.Module, task: Task): "
            + _USER_TASK_HELP
        )
    return result[0], result[1]
