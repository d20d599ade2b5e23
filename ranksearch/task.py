"""Tasks (data, loss, metric) and user task files.

A `Task` holds train / val (/ test) datasets of ``(x, y)`` pairs: ``x`` a float tensor of the
per-sample ``input_shape`` (C×H×W for images), ``y`` an int64 class index. `load_user_task`
imports a task file ``path/to/file.py:factory`` that returns ``(model, task)``. The built-in
data sets are in `ranksearch.datasets`, baseline training in `ranksearch.training`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Callable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .errors import TaskError

__all__ = ["Task", "load_user_task"]

Loss = Callable[[Tensor, Tensor], Tensor]
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Task:
    """A supervised task: datasets of ``(x, y)`` pairs, a loss and a metric.

    ``train``, ``val`` and the optional ``test`` yield ``x`` of shape ``input_shape`` and an
    integer class ``y``. ``loss(logits, y)`` takes N×num_classes logits and N labels and returns
    a scalar (default: cross-entropy). ``input_shape`` defaults to the shape of the first
    training sample; ``num_classes`` to 1 + the largest training label (read from the label
    tensor of a `TensorDataset`, otherwise by one pass over ``train``).
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset | None = None
    loss: Loss = F.cross_entropy
    metric: str = "accuracy"
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None

    def __post_init__(self) -> None:
        for split in SPLITS:
            data = getattr(self, split)
            if data is None and split == "test":
                continue
            if not isinstance(data, Sized) or len(data) == 0:
                raise TaskError(
                    f"task {self.name!r}: the {split} dataset must be a non-empty Dataset "
                    f"with a length (e.g. a TensorDataset of x and y), got {type(data).__name__}"
                )
        if self.input_shape is None:
            object.__setattr__(self, "input_shape", tuple(self.train[0][0].shape))
        else:
            object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        if self.num_classes is None:
            object.__setattr__(self, "num_classes", _count_classes(self.train))
        if self.num_classes < 1:
            raise TaskError(f"task {self.name!r}: num_classes must be ≥ 1, got {self.num_classes}")

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` ("train", "val" or "test")."""
        if split not in SPLITS:
            raise TaskError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
        data = getattr(self, split)
        if data is None:
            raise TaskError(f"task {self.name!r} has no test split; use 'val' or add test=...")
        return data

    def example_input(self, batch: int = 1) -> Tensor:
        """Zeros of shape batch×input_shape, e.g. for tracing the model."""
        return torch.zeros(batch, *self.input_shape)

    def loader(
        self, split: str, batch_size: int = 128, shuffle: bool | None = None, seed: int = 0
    ) -> DataLoader:
        """A single-process DataLoader over ``split``; batches are (B×input_shape, B).

        ``shuffle`` defaults to True for "train" only; shuffling draws from a generator seeded
        with ``seed``, so the batch order is the same on every call.
        """
        if batch_size < 1:
            raise TaskError(f"batch_size must be ≥ 1, got {batch_size}")
        data = self.dataset(split)
        return DataLoader(
            data,
            batch_size=batch_size,
            shuffle=split == "train" if shuffle is None else shuffle,
            generator=torch.Generator().manual_seed(seed),
            num_workers=0,
        )


def _count_classes(data: Dataset) -> int:
    if isinstance(data, TensorDataset) and len(data.tensors) >= 2:
        labels = data.tensors[1]
    else:
        labels = torch.as_tensor([int(data[i][1]) for i in range(len(data))])
    if labels.is_floating_point() or labels.is_complex():
        raise TaskError("labels must be integer class indices; pass num_classes= for other tasks")
    return int(labels.max()) + 1


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
