"""Fingerprints: digests of everything that decides a score.

A stored result may stand in for a new evaluation only when it was measured on the same
weights, the same data and loss, with the same proxy settings, over the same space, by the same
code. `Fingerprint` keeps one digest per part, so a mismatch can say which part differs.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from collections.abc import Callable, Mapping, Sized
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

if TYPE_CHECKING:
    from .evaluate import ProxySettings
    from .space import RankSpace
    from .task import Task

#: Datasets of other kinds are read whole up to this many samples, beyond it at evenly spaced
#: samples (with the length and type).
FULL_READ_LIMIT = 20_000
SAMPLED = 512

PARTS = ("weights", "data", "loss", "proxy", "space", "code")


@dataclass(frozen=True)
class Fingerprint:
    """One digest per part (`PARTS`) and the readable settings behind the proxy and space
    parts, so a mismatch names the setting that differs."""

    parts: Mapping[str, str]
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """A short digest of every part: equal exactly when every part is equal."""
        text = json.dumps(dict(self.parts), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def differences(self, other: Fingerprint) -> list[str]:
        """What differs from ``other`` (the stored fingerprint), in words."""
        out = []
        for part in sorted(set(self.parts) | set(other.parts)):
            if self.parts.get(part) == other.parts.get(part):
                continue
            mine, theirs = self.settings.get(part), other.settings.get(part)
            if isinstance(mine, Mapping) and isinstance(theirs, Mapping):
                keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                changes = ", ".join(f"{k} {theirs.get(k)!r} → {mine.get(k)!r}" for k in keys)
                out.append(f"{part} settings differ ({changes or 'in detail'})")
            else:
                out.append(f"{_WORDS.get(part, part)} differ{'s' if part == 'data' else ''}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"parts": dict(self.parts), "settings": dict(self.settings)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fingerprint:
        return cls(dict(data.get("parts", {})), dict(data.get("settings", {})))


_WORDS = {"weights": "the model's weights", "data": "the task's data", "loss": "the task's loss",
          "code": "the ranksearch version"}


def fingerprint(model: nn.Module, task: Task, settings: ProxySettings, space: RankSpace
                ) -> Fingerprint:
    """The fingerprint of scoring configs of ``space`` on ``model`` and ``task`` with
    ``settings``."""
    from . import __version__
    from .store import space_signature
    from .timing import device_label

    proxy = settings.to_json()
    if settings.data_aware:  # results of an earlier whitening are not these
        from .calibration import WHITENING
        proxy = {**proxy, "whitening": WHITENING}
    if settings.latency:  # timings belong to the machine they were taken on
        proxy = {**proxy, "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "machine": device_label(settings.device)}
    space_settings = space.spec.to_json()
    parts = {
        "weights": model_digest(model),
        "data": task_digest(task),
        "loss": task_code_digest(task),
        "proxy": _digest(json.dumps(proxy, sort_keys=True, default=str).encode()),
        "space": space_signature(space),
        "code": __version__,
    }
    return Fingerprint(parts, {"proxy": proxy, "space": space_settings})


def task_code_digest(task: Task) -> str:
    """A digest of what the task computes a score with: its loss, its metric (name,
    direction and functions), its output selector and its own training and evaluation
    functions (by source, see `callable_digest`)."""
    metric = task.metric
    parts = [callable_digest(task.loss), f"metric:{metric}"]
    if not isinstance(metric, str):
        parts.append(metric.direction)
        parts += [callable_digest(f) for f in (metric.fn, metric.batch, metric.finish)
                  if f is not None]
    output = task.output
    parts.append(callable_digest(output) if callable(output) else f"output:{output}")
    for name in ("train_step", "finetune", "evaluate"):
        fn = getattr(task, name, None)
        if fn is not None:
            parts.append(f"{name}:{callable_digest(fn)}")
    return _digest("\n".join(parts).encode())


def model_digest(model: nn.Module) -> str:
    """A digest of the model's class and of every tensor of its state dict (names, dtypes,
    shapes and values)."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(_bytes(tensor))
    return h.hexdigest()[:16]


def task_digest(task: Task) -> str:
    """A digest of the task's name, shapes and its train, val and test data (see
    `data_digest`)."""
    h = hashlib.sha256(f"{task.name}:{task.input_shape}:{task.num_classes}".encode())
    for split in ("train", "val", "test"):
        data = getattr(task, split)
        h.update(f"{split}:".encode())
        if data is not None:
            h.update(data_digest(data).encode())
    return h.hexdigest()[:16]


def data_digest(data: Any) -> str:
    """A digest of one split: `dataset_digest` of a map-style dataset; of a `DataLoader`, its
    batch size and its dataset's digest; of an `IterableDataset` or another iterable of
    batches, the items it yields (up to `FULL_READ_LIMIT` of them)."""
    if isinstance(data, DataLoader):
        inner = data.dataset
        head = f"DataLoader:{data.batch_size}:{data.drop_last}:"
        return _digest((head + data_digest(inner)).encode())
    if isinstance(data, Sized) and hasattr(data, "__getitem__") \
            and not isinstance(data, IterableDataset):
        return dataset_digest(data)
    h = hashlib.sha256(f"{type(data).__qualname__}:".encode())
    items = list(islice(data, FULL_READ_LIMIT))
    for item in items:
        _update(h, item)
    h.update(f":{len(items)}".encode())
    return h.hexdigest()[:16]


def dataset_digest(data: Dataset) -> str:
    """A digest of a dataset's samples: the tensors of a `TensorDataset` (and the indices of a
    `Subset` of one) byte for byte; other datasets sample by sample, every sample up to
    `FULL_READ_LIMIT` samples and `SAMPLED` evenly spaced ones beyond."""
    h = hashlib.sha256(f"{type(data).__qualname__}:{len(data)}".encode())  # type: ignore[arg-type]
    if isinstance(data, TensorDataset):
        for tensor in data.tensors:
            h.update(f"{tensor.dtype}:{tuple(tensor.shape)}".encode())
            h.update(_bytes(tensor))
    elif isinstance(data, Subset):
        h.update(json.dumps([int(i) for i in data.indices]).encode())
        h.update(dataset_digest(data.dataset).encode())
    else:
        n = len(data)  # type: ignore[arg-type]
        indices = range(n) if n <= FULL_READ_LIMIT else sorted(
            {k * n // SAMPLED for k in range(SAMPLED)})
        for i in indices:
            _update(h, data[i])
    return h.hexdigest()[:16]


def callable_digest(fn: Callable[..., Any]) -> str:
    """A digest of a function: its module, name and source when it has one (the arguments of
    a `functools.partial` too)."""
    parts = []
    while isinstance(fn, functools.partial):
        parts.append(repr((fn.args, sorted(fn.keywords.items()))))
        fn = fn.func
    target = fn if inspect.isfunction(fn) or inspect.isbuiltin(fn) else type(fn)
    parts.append(f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}")
    try:
        parts.append(inspect.getsource(target))
    except (OSError, TypeError):
        parts.append(repr(fn) if not inspect.isfunction(fn) else "")
    return _digest("\n".join(parts).encode())


def _update(h: Any, item: Any) -> None:
    if isinstance(item, torch.Tensor):
        h.update(f"{item.dtype}:{tuple(item.shape)}".encode())
        h.update(_bytes(item))
    elif isinstance(item, tuple | list):
        for x in item:
            _update(h, x)
    elif isinstance(item, Mapping):
        for k in sorted(item):
            h.update(str(k).encode())
            _update(h, item[k])
    elif hasattr(item, "tobytes"):  # NumPy arrays, PIL images
        h.update(f"{type(item).__name__}:{getattr(item, 'shape', getattr(item, 'size', ''))}"
                 .encode())
        h.update(item.tobytes())
    else:
        h.update(repr(item).encode())


def _bytes(tensor: torch.Tensor) -> memoryview | bytes:
    """The tensor's bytes, without a copy where it is contiguous on the CPU."""
    t = tensor.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]
