"""Checks made once before a search, so that a bad task or device fails at once, clearly.

`check_task` runs the dense model on one validation batch and one training batch and refuses a
task whose data does not fit it (input dtype, labels, output shape, non-finite outputs or
loss), then measures the dense model on the evaluator's validation batches. `check_device`
refuses a device this machine does not have.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import RankSearchError, TaskError
from .evaluate import Evaluator, ProxySettings
from .inputs import call, move
from .metrics import prediction
from .task import Task

__all__ = ["check_device", "check_task"]


def check_device(device: str) -> torch.device:
    """``device`` as a `torch.device` when this machine has it; raises naming the fix when it
    does not (a CUDA device on a CPU-only build or machine, an index past the last GPU)."""
    dev = torch.device(device)
    if dev.type == "meta":
        raise RankSearchError("device 'meta' holds no data, so nothing can be scored on it; "
                              "use 'cpu' or 'cuda'")
    if dev.type == "cuda":
        _check_cuda(device, dev)
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise RankSearchError(f"device {device!r} is not available here (no Apple GPU, or a "
                              "torch built without MPS); use device='cpu'")
    elif dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise RankSearchError(f"device {device!r} is not available here (no Intel GPU, or a "
                              "torch built without XPU); use device='cpu'")
    return dev


def _check_cuda(device: str, dev: torch.device) -> None:
    if not torch.cuda.is_available():
        build = "built without CUDA" if torch.version.cuda is None else "that sees no GPU"
        raise RankSearchError(
            f"device {device!r} was asked for, but this is a torch {torch.__version__} {build}; "
            "use device='cpu' (--device cpu), or install a CUDA build of torch on a machine "
            "with an NVIDIA GPU"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise RankSearchError(
            f"device {device!r} does not exist: this machine has {count} GPU(s), cuda:0 to "
            f"cuda:{count - 1}; use 'cuda' or one of those"
        )


def check_task(model: nn.Module, task: Task, settings: ProxySettings,
               evaluator: Evaluator | None = None) -> dict[str, float]:
    """Check that ``task`` fits ``model`` on ``settings.device``, and return the dense
    model's accuracy and loss on the validation batches the evaluator scores candidates on.

    The model runs once (eval mode, no gradients) on the first validation batch and on a
    training batch: the input dtype must be the weights', the output an N×C tensor of finite
    logits with C ≥ ``task.num_classes``, the labels integer class indices in [0, C), and the
    loss finite. Raises `TaskError` naming what is wrong and the fix. ``evaluator`` (one made
    for this model and task) gives the validation batches; without it one is made. The model
    is left on the device it was on.
    """
    device = check_device(settings.device)
    home = next((t.device for t in _tensors(model)), None)
    training = model.training
    try:
        model.to(device).eval()
        for split, size in (("val", settings.eval_batch_size), ("train", settings.batch_size)):
            if getattr(task, split) is None:
                continue  # a task with its own evaluate may have no val data
            batch = _first_batch(task, split, size)
            if _classifier(task, batch):
                _check_batch(model, task, split, batch, device)
            else:
                _check_any_batch(model, task, split, batch, device)
        return _dense_metrics(model, task, evaluator or Evaluator(model, task, settings))
    finally:
        if home is not None:
            model.to(home)
        model.train(training)


def _dense_metrics(model: nn.Module, task: Task, evaluator: Evaluator) -> dict[str, float]:
    """Accuracy and loss of the dense model on the evaluator's validation batches."""
    try:
        return evaluator.validate(model)
    except (RuntimeError, ValueError, IndexError) as e:  # a later batch that does not fit
        raise TaskError(f"the dense model fails on the validation split of task {task.name!r}: "
                        f"{type(e).__name__}: {e}; check that every label is a class index "
                        "below the model's number of outputs") from e


def _classifier(task: Task, batch: tuple[Any, Any]) -> bool:
    """Whether the task is a plain classifier (accuracy or top5 on one label per sample, the
    prediction the model's output tensor), which the detailed checks are written for."""
    x, y = batch
    return (task.metric in ("accuracy", "top5") and task.output is None
            and isinstance(x, Tensor) and isinstance(y, Tensor)
            and (y.dim() <= 1 or (x.is_floating_point() and task.loss is F.cross_entropy)))


def _check_any_batch(model: nn.Module, task: Task, split: str, batch: tuple[Any, Any],
                     device: torch.device) -> None:
    """Run ``model`` on one batch of a task of any kind: the model must take the inputs and
    the loss must be a finite scalar on its prediction."""
    x, y = move(batch[0], device), move(batch[1], device)
    where = f"on the first {split} batch"
    with torch.inference_mode():
        try:
            out = prediction(call(model, x), task.output)
        except TaskError:
            raise
        except Exception as e:
            raise TaskError(f"the dense model fails {where}: {type(e).__name__}: {e}; check "
                            "that the task's inputs are what the model takes") from e
        _check_loss(task, out, y, where)


def _tensors(model: nn.Module) -> list[Tensor]:
    return [*model.parameters(), *model.buffers()]


def _first_batch(task: Task, split: str, size: int) -> tuple[Any, Any]:
    """The first batch of ``split`` (unshuffled), as the evaluator reads it."""
    try:
        batch = next(iter(task.loader(split, size, shuffle=False)))
    except Exception as e:  # a dataset that cannot be read or batched
        raise TaskError(f"task {task.name!r}: cannot read a batch of the {split} split "
                        f"({type(e).__name__}: {e}); its samples must be (x, y) pairs of a "
                        "tensor and an integer label") from e
    if not (isinstance(batch, list | tuple) and len(batch) == 2):
        raise TaskError(f"task {task.name!r}: a {split} batch must be (inputs, labels) tensors, "
                        f"got {type(batch).__name__}; make each sample an (x, y) pair")
    return batch[0], batch[1]


def _check_batch(model: nn.Module, task: Task, split: str, batch: tuple[Tensor, Tensor],
                 device: torch.device) -> None:
    """Run ``model`` on one batch of ``split`` and check inputs, output, labels and loss."""
    x, y = batch
    where = f"on the first {split} batch"
    _check_dtype(model, x, where)
    _check_labels_dtype(y, len(x), where)
    x, y = x.to(device), y.to(device)
    with torch.inference_mode():
        try:
            out = model(x)
        except Exception as e:
            raise TaskError(f"the dense model fails {where} (input {_shape(x)} of {x.dtype}): "
                            f"{type(e).__name__}: {e}; check task.input_shape and the model's "
                            "first layer") from e
        classes = _check_output(model, out, len(x), where)
        _check_labels(task, y.cpu(), classes, where)
        _check_loss(task, out, y, where)


def _check_dtype(model: nn.Module, x: Tensor, where: str) -> None:
    weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if weights is not None and x.is_floating_point() and x.dtype != weights:
        fix = ".float()" if weights == torch.float32 else f".to({weights})"
        raise TaskError(
            f"the task's inputs are {x.dtype} {where} but the model's weights are {weights}; "
            f"convert the data (e.g. x{fix} before making the TensorDataset) or the model "
            f"(model.to({x.dtype}))"
        )


def _check_labels_dtype(y: Tensor, n: int, where: str) -> None:
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TaskError(f"the labels are {y.dtype} {where}; they must be integer class indices "
                        "(convert them with y.long())")
    if y.shape != (n,):
        raise TaskError(f"the labels {where} have shape {_shape(y)}; they must be one class index "
                        f"per sample, shape ({n},) (not one-hot: use y.argmax(1))")


def _check_output(model: nn.Module, out: object, n: int, where: str) -> int:
    """The number of outputs (classes) of the model; raises when ``out`` is not N×C finite
    logits."""
    if not isinstance(out, Tensor):
        raise TaskError(f"the dense model returns a {type(out).__name__} {where}; it must return "
                        "a tensor of N×C logits (wrap it to return only the logits)")
    if out.dim() != 2 or out.shape[0] != n:
        raise TaskError(f"the dense model's output is {_shape(out)} {where}, for {n} inputs; it "
                        f"must be {n}×C logits, one row per sample (flatten it, or add a "
                        "classifier layer)")
    if not out.is_floating_point() or not bool(torch.isfinite(out).all()):
        bad = next((name for name, p in model.named_parameters()
                    if p.is_floating_point() and not bool(torch.isfinite(p).all())), None)
        also = f" ({bad} holds NaN or inf)" if bad else ""
        raise TaskError(f"the dense model's output is not finite {where}: check its weights"
                        f"{also} and the inputs")
    return int(out.shape[1])


def _check_labels(task: Task, y: Tensor, classes: int, where: str) -> None:
    if len(y) and (int(y.max()) >= classes or int(y.min()) < 0):
        label = int(y.max()) if int(y.max()) >= classes else int(y.min())
        raise TaskError(
            f"label {label} is out of range for a model with {classes} outputs ({where}): labels "
            f"must be class indices in [0, {classes}); renumber the labels or give the model "
            "as many outputs as there are classes"
        )
    if task.num_classes is not None and classes < task.num_classes:
        raise TaskError(
            f"the task has {task.num_classes} classes (labels 0 to {task.num_classes - 1}) but "
            f"the dense model has {classes} outputs; give it {task.num_classes} outputs, or "
            "pass num_classes= to the Task"
        )


def _check_loss(task: Task, out: Tensor, y: Tensor, where: str) -> None:
    try:
        loss = task.loss(out, y)
    except Exception as e:
        raise TaskError(f"the task's loss fails {where}: {type(e).__name__}: {e}; it must take "
                        "N×C logits and N labels and return a scalar") from e
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TaskError(f"the task's loss returns {_shape(loss)} {where}; it must return a "
                        "scalar tensor (e.g. reduction='mean')")
    if not bool(torch.isfinite(loss).all()):
        raise TaskError(f"the task's loss is {float(loss)} {where}, not finite; check the loss "
                        "function and the labels")


def _shape(value: object) -> str:
    if isinstance(value, Tensor):
        return "×".join(map(str, value.shape)) or "a scalar"
    return type(value).__name__
