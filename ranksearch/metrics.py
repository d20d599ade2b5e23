"""Metrics: a name, a direction, and how a value is computed from the model's predictions.

A `Metric` is computed over the validation batches in one of two ways:

- ``batch(prediction, target) -> (total, count)`` per batch, summed over the batches; the
  value is ``finish(Σ total / Σ count)`` (``finish`` defaults to the identity). The built-in
  metrics work so, with no predictions kept: ``accuracy`` (a fraction), ``top5``,
  ``perplexity`` (``exp`` of the mean token cross-entropy), ``mse`` and ``mae``;
- ``fn(predictions, targets) -> float`` once, on every batch's predictions and targets
  concatenated along the first dimension (kept on the CPU): for metrics that do not add up
  over batches, such as mAP or AUC. ``Metric("map", "max", my_map)``.

``loss`` is the task's own loss, its mean over the samples (batches weighted by their size).

Classification metrics read class scores on the last dimension: N×C logits with N targets, or
per token B×T×C logits with B×T targets; targets equal to ``IGNORE_INDEX`` (-100, as in
`torch.nn.functional.cross_entropy`) do not count. `get_metric` finds a metric by name.

What the model returns is turned into the prediction by `prediction`: the tensor as it is, a
tuple's or list's first element, a mapping's or ``ModelOutput``'s ``"logits"``; or as the
task's ``output`` says (a key or attribute name, or a callable ``output(out) -> Tensor``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import TaskError

__all__ = ["IGNORE_INDEX", "METRICS", "Meter", "Metric", "OutputSelector", "get_metric",
           "prediction"]

Direction = Literal["max", "min"]
BatchFn = Callable[[Tensor, Tensor], tuple[float, float]]
WholeFn = Callable[[Tensor, Tensor], float]
Loss = Callable[[Any, Any], Tensor]
#: Which part of the model's output is the prediction: a key or attribute name, or a callable.
OutputSelector = str | Callable[[Any], Any] | None

#: Targets with this value are left out of classification metrics (padding tokens).
IGNORE_INDEX = -100


@dataclass(frozen=True, eq=False)
class Metric:
    """A metric ``name``, its ``direction`` (``"max"``: higher is better, or ``"min"``) and how
    it is computed: ``fn(predictions, targets)`` on all of them at once, or ``batch(prediction,
    target) -> (total, count)`` per batch with the value ``finish(Σ total / Σ count)`` (see
    the module docstring). ``fraction`` marks a value in [0, 1], which a constraint may give
    in percent (``accuracy>=90%``). A metric with neither ``fn`` nor ``batch`` is the task's
    loss, and must be named ``loss``. A metric equals its name (``metric == "accuracy"``) and
    a metric of the same name and direction."""

    name: str
    direction: Direction
    fn: WholeFn | None = field(default=None, compare=False)
    batch: BatchFn | None = field(default=None, compare=False)
    finish: Callable[[float], float] | None = field(default=None, compare=False)
    fraction: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.replace("_", "").isalnum():
            raise TaskError(f"a metric name must be a word such as 'map' or 'top_5', "
                            f"got {self.name!r}")
        if self.direction not in ("max", "min"):
            raise TaskError(f"metric {self.name!r}: direction must be 'max' (higher is better) "
                            f"or 'min', got {self.direction!r}")
        if self.fn is not None and self.batch is not None:
            raise TaskError(f"metric {self.name!r}: give fn (all predictions at once) or batch "
                            "(per batch totals), not both")
        if self.fn is None and self.batch is None and self.name != "loss":
            raise TaskError(f"metric {self.name!r} has no way to be computed: pass "
                            "fn(predictions, targets) -> float or batch(prediction, target) -> "
                            "(total, count)")
        for name in ("fn", "batch", "finish"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TaskError(f"metric {self.name!r}: {name} must be callable, got "
                                f"{type(value).__name__}")

    @property
    def is_loss(self) -> bool:
        """Whether this is the task's loss (computed from the task's loss function)."""
        return self.fn is None and self.batch is None

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return other == self.name
        if isinstance(other, Metric):
            return (other.name, other.direction) == (self.name, self.direction)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.name)

    def __str__(self) -> str:
        return self.name


def prediction(out: Any, output: OutputSelector = None) -> Any:
    """The prediction in a model's output ``out``: ``output(out)`` for a callable, the key or
    attribute ``output`` for a name; by default ``out`` itself when it is a tensor, the first
    element of a tuple or list, and the ``"logits"`` of a mapping or of an object with that
    attribute (a Hugging Face ``ModelOutput``)."""
    if callable(output):
        return output(out)
    if isinstance(output, str):
        if isinstance(out, Mapping) and output in out:
            return out[output]
        if hasattr(out, output):
            return getattr(out, output)
        have = list(out) if isinstance(out, Mapping) else type(out).__name__
        raise TaskError(f"the model's output has no {output!r} (it is {have}); set the task's "
                        "output= to the field that holds the prediction")
    if output is not None:
        raise TaskError(f"output= must be a field name or a callable, got {output!r}")
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        if "logits" in out:
            return out["logits"]
    elif isinstance(out, tuple | list):
        if out:
            return out[0]
    elif hasattr(out, "logits"):
        return out.logits
    fields = f" (fields: {', '.join(map(str, out))})" if isinstance(out, Mapping) else ""
    raise TaskError(f"cannot tell the prediction in a model output of type {type(out).__name__}"
                    f"{fields}; pass output='field' or output=lambda out: ... to the Task")


def _classes(pred: Tensor, target: Tensor, name: str) -> None:
    if pred.shape[:-1] != target.shape:
        raise TaskError(f"{name} needs class scores on the last dimension of the prediction and "
                        f"one class index per position of the target: prediction "
                        f"{tuple(pred.shape)} does not fit target {tuple(target.shape)} (N×C "
                        "with N, or B×T×C with B×T)")


def _accuracy(pred: Tensor, target: Tensor) -> tuple[float, float]:
    _classes(pred, target, "accuracy")
    keep = target != IGNORE_INDEX
    return float(((pred.argmax(-1) == target) & keep).sum()), float(keep.sum())


def _top5(pred: Tensor, target: Tensor) -> tuple[float, float]:
    _classes(pred, target, "top5")
    keep = target != IGNORE_INDEX
    top = pred.topk(min(5, pred.shape[-1]), dim=-1).indices
    hit = (top == target.unsqueeze(-1)).any(-1) & keep
    return float(hit.sum()), float(keep.sum())


def _token_cross_entropy(pred: Tensor, target: Tensor) -> tuple[float, float]:
    _classes(pred, target, "perplexity")
    total = F.cross_entropy(pred.reshape(-1, pred.shape[-1]).float(), target.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return float(total), float((target != IGNORE_INDEX).sum())


def _aligned(pred: Tensor, target: Tensor, name: str) -> tuple[Tensor, Tensor]:
    if pred.shape != target.shape:
        if pred.numel() != target.numel():
            raise TaskError(f"{name} needs a prediction of the target's shape: prediction "
                            f"{tuple(pred.shape)}, target {tuple(target.shape)}")
        pred = pred.reshape(target.shape)  # N×1 against N
    return pred.float(), target.float()


def _squared_error(pred: Tensor, target: Tensor) -> tuple[float, float]:
    p, t = _aligned(pred, target, "mse")
    return float(((p - t) ** 2).sum()), float(t.numel())


def _absolute_error(pred: Tensor, target: Tensor) -> tuple[float, float]:
    p, t = _aligned(pred, target, "mae")
    return float((p - t).abs().sum()), float(t.numel())


#: The metrics known by name.
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("accuracy", "max", batch=_accuracy, fraction=True),
    Metric("top5", "max", batch=_top5, fraction=True),
    Metric("loss", "min"),
    Metric("perplexity", "min", batch=_token_cross_entropy, finish=math.exp),
    Metric("mse", "min", batch=_squared_error),
    Metric("mae", "min", batch=_absolute_error),
)}


def get_metric(metric: str | Metric) -> Metric:
    """The metric named ``metric`` (one of `METRICS`), or ``metric`` itself when it is a
    `Metric`."""
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str) and metric.strip().lower() in METRICS:
        return METRICS[metric.strip().lower()]
    raise TaskError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}, or your own: "
                    "Metric('name', 'max' or 'min', fn) with fn(predictions, targets) -> float")


class Meter:
    """Sums ``metrics`` over batches: `add` each batch's prediction and target, then read
    `values`. The task's ``loss`` computes the ``loss`` metric (its mean per sample)."""

    def __init__(self, metrics: Iterable[Metric], loss: Loss) -> None:
        self.metrics = list({m.name: m for m in metrics}.values())
        self.loss = loss
        self._sums = {m.name: [0.0, 0.0] for m in self.metrics}
        self._kept: tuple[list[Tensor], list[Tensor]] = ([], [])

    def add(self, pred: Any, target: Any) -> None:
        """Count one batch."""
        keep = False
        for m in self.metrics:
            if m.fn is not None:
                keep = True
                continue
            if m.is_loss:
                n = _count(target)
                total, count = float(self.loss(pred, target)) * n, float(n)
            else:
                total, count = m.batch(pred, target)  # type: ignore[misc]
            sums = self._sums[m.name]
            sums[0] += total
            sums[1] += count
        if keep:
            self._kept[0].append(pred.detach().cpu())
            self._kept[1].append(target.detach().cpu())

    def values(self) -> dict[str, float]:
        """Each metric's value over the batches added (NaN for one with nothing counted)."""
        out = {}
        for m in self.metrics:
            if m.fn is not None:
                preds, targets = (torch.cat(k) if k else torch.empty(0) for k in self._kept)
                out[m.name] = float(m.fn(preds, targets))
                continue
            total, count = self._sums[m.name]
            mean = total / count if count else math.nan
            out[m.name] = m.finish(mean) if m.finish is not None and count else mean
        return out


def _count(target: Any) -> int:
    """The number of samples in a batch of targets (its first dimension)."""
    if isinstance(target, Tensor) and target.dim():
        return int(target.shape[0])
    from .inputs import batch_size

    return batch_size(target)
