"""Baseline training and evaluation of the reference models.

`train_baseline` is AdamW with a per-step cosine learning-rate schedule down to zero;
`pretrained` trains a reference model once and caches its weights per user
(`default_cache_dir`: ``$RANKSEARCH_CACHE``, else ``$XDG_CACHE_HOME/ranksearch/checkpoints``,
else ``~/.cache/ranksearch/checkpoints``), after looking in the read-only folders of
`checkpoint_dirs` (the checkout's committed ``benchmarks/checkpoints``). `evaluate_accuracy`
is the top-1 accuracy of a model on a dataset (per token for a language model),
`evaluate_metrics` any metrics of `ranksearch.metrics`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from .datasets import REFERENCE_MODELS, load_task
from .errors import TaskError
from .inputs import call, move
from .metrics import Meter, Metric, OutputSelector, get_metric, prediction
from .models import MODELS, build_model
from .task import Loss, Task

__all__ = [
    "checkpoint_dirs",
    "checkpoint_name",
    "default_cache_dir",
    "evaluate_accuracy",
    "evaluate_batches",
    "evaluate_metrics",
    "pretrained",
    "train_baseline",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- training


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def evaluate_batches(model: nn.Module, loader: Iterable, loss: Loss,
                     metrics: Sequence[str | Metric], output: OutputSelector = None
                     ) -> dict[str, float]:
    """``metrics`` (names of `ranksearch.metrics`, "loss" the mean of ``loss``) of ``model``
    over the batches of ``loader``, its prediction read from its output by ``output``, in eval
    mode; the model's train/eval mode is restored afterwards."""
    device, was_training = _device(model), model.training
    meter = Meter([get_metric(m) for m in metrics], loss)
    model.eval()
    batches = 0
    with torch.inference_mode():
        for x, y in loader:
            meter.add(prediction(call(model, move(x, device)), output), move(y, device))
            batches += 1
    model.train(was_training)
    if batches == 0:
        raise TaskError("cannot evaluate on an empty dataset")
    return meter.values()


def _loader(data: Dataset | DataLoader, batch_size: int) -> DataLoader:
    return data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)


def evaluate_metrics(model: nn.Module, data: Dataset | DataLoader,
                     metrics: Sequence[str | Metric] = ("accuracy",),
                     loss: Loss = F.cross_entropy, batch_size: int = 256,
                     output: OutputSelector = None) -> dict[str, float]:
    """``metrics`` (names of `ranksearch.metrics`: "accuracy", "perplexity", "loss" (the mean
    of ``loss``), …, or `Metric` objects) of ``model`` on a dataset of ``(x, y)`` pairs or a
    DataLoader of batches (then ``batch_size`` is unused); ``output`` as in `Task`."""
    return evaluate_batches(model, _loader(data, batch_size), loss, metrics, output)


def evaluate_accuracy(model: nn.Module, data: Dataset | DataLoader, batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (N×classes logits, or B×T×classes per token) on
    a dataset of ``(x, y)`` pairs or a DataLoader of batches (then ``batch_size`` is unused)."""
    return evaluate_metrics(model, data, ("accuracy",), batch_size=batch_size)["accuracy"]


def train_baseline(
    model: nn.Module,
    task: Task,
    epochs: int = 10,
    lr: float = 2e-3,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = False,
    weight_decay: float = 5e-4,
    desc: str | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on ``task.train`` with AdamW (``lr``, ``weight_decay``) and a
    cosine learning-rate schedule, stepped per batch, from ``lr`` down to 0 over ``epochs``.

    Shuffling is seeded with ``seed`` and the global RNG state is left untouched. The model ends
    in eval mode. ``progress`` shows a bar on stderr, labelled ``desc`` (default "train
    <task>"). Returns, on ``task.val``, ``val_loss``, ``val_<metric>`` of the task's metric
    (``val_perplexity`` for a language model) and, for classification, ``val_accuracy`` (per
    token for a language model); then ``train_loss`` (mean of the last epoch), ``epochs``,
    ``steps`` and ``seconds``.
    """
    if epochs < 1 or lr <= 0:
        raise TaskError(f"epochs must be ≥ 1 and lr > 0, got epochs={epochs}, lr={lr}")
    device, start = _device(model), time.perf_counter()
    loader = task.loader("train", batch_size, shuffle=True, seed=seed)
    steps = epochs * len(loader)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    epoch_loss = 0.0
    with (
        torch.random.fork_rng(devices=[]),
        tqdm(total=steps, disable=not progress, desc=desc or f"train {task.name}",
             unit="batch") as bar,
    ):
        torch.manual_seed(seed)
        model.train()
        for epoch in range(epochs):
            total, count = 0.0, 0
            for x, y in loader:
                x, y = move(x, device), move(y, device)
                loss = task.loss(prediction(call(model, x), task.output), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total, count = total + loss.item() * len(y), count + len(y)
                bar.update()
            epoch_loss = total / count
            bar.set_postfix(epoch=epoch + 1, loss=f"{epoch_loss:.4f}")
    val = evaluate_batches(model, task.loader("val", batch_size), task.loss,
                           _baseline_metrics(task), task.output)
    model.eval()
    result = {
        **{f"val_{name}": value for name, value in val.items()},
        "train_loss": epoch_loss,
        "epochs": epochs,
        "steps": steps,
        "seconds": time.perf_counter() - start,
    }
    log.info("trained %s on %s: %s", type(model).__name__, task.name, result)
    return result


def _baseline_metrics(task: Task) -> list[Metric]:
    """What `train_baseline` reports: the loss, the task's metric and, when the model's
    output is class scores, accuracy."""
    metric = get_metric(task.metric)
    found = [get_metric("loss"), metric]
    if metric.name in _CLASS_SCORE_METRICS:
        found.insert(0, get_metric("accuracy"))
    return list({m.name: m for m in found}.values())


_CLASS_SCORE_METRICS = ("accuracy", "top5", "perplexity")


# per built-in task: the training options `pretrained` uses unless told otherwise
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"epochs": 10, "lr": 3e-3, "batch_size": 32},
    "fashion-mnist": {"epochs": 5, "lr": 2e-3, "batch_size": 128},
    "cifar10": {"epochs": 30, "lr": 2e-3, "batch_size": 128},
    "text": {"epochs": 2, "lr": 2e-3, "batch_size": 64},
}
# per (task, model): overrides of TRAIN_DEFAULTS; on Fashion-MNIST these are the options of the
# checkpoints committed under benchmarks/checkpoints, so the command line finds them
MODEL_TRAIN_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("fashion-mnist", "resnet20"): {"epochs": 4},
    ("fashion-mnist", "vgg-small"): {"epochs": 3},
    # the models people compress, trained as benchmarks/bench_speed.py does on a subset
    # (``load_task("fashion-mnist", train_size=6000)``): 10–18 min each on 2 CPU threads,
    # validation accuracy 0.793 (vgg16), 0.824 (resnet56), 0.733 (encoder512)
    ("fashion-mnist", "vgg16"): {"epochs": 2},
    ("fashion-mnist", "resnet56"): {"epochs": 2},
    ("fashion-mnist", "encoder512"): {"epochs": 2, "lr": 5e-4},
}
_TRAIN_OPTIONS = ("epochs", "lr", "batch_size", "seed", "weight_decay")
_BASELINE_DEFAULTS = {
    name: param.default
    for name, param in inspect.signature(train_baseline).parameters.items()
    if name in _TRAIN_OPTIONS
}
CACHE_ENV = "RANKSEARCH_CACHE"
# the committed reference checkpoints of a source checkout (absent in an installed package)
_CHECKOUT_CHECKPOINTS = Path(__file__).resolve().parent.parent / "benchmarks" / "checkpoints"


def default_cache_dir() -> Path:
    """Where `pretrained` caches reference models by default: ``$RANKSEARCH_CACHE``, else
    ``$XDG_CACHE_HOME/ranksearch/checkpoints``, else ``~/.cache/ranksearch/checkpoints``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ranksearch" / "checkpoints"


def checkpoint_dirs() -> list[Path]:
    """Read-only folders `pretrained` looks in before training: the committed
    ``benchmarks/checkpoints`` when running from a source checkout."""
    return [_CHECKOUT_CHECKPOINTS] if _CHECKOUT_CHECKPOINTS.is_dir() else []


def _fingerprint(task: Task) -> str:
    """A digest of the task's train and val data (tensor bytes for TensorDatasets, otherwise
    their sizes), so that a cache entry is never reused for other data."""
    digest = hashlib.sha256(f"{task.name}:{task.input_shape}:{task.num_classes}".encode())
    for data in (task.train, task.val):
        digest.update(str(len(data)).encode())
        if isinstance(data, TensorDataset):
            for tensor in data.tensors:
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def checkpoint_name(model_name: str, task: Task, task_name: str, options: dict[str, Any]) -> str:
    """``{model}-{task}-{hash}.pt``, the hash covering the model, the task name, the training
    options and the data."""
    key = json.dumps(
        {"model": model_name, "task": task_name, "options": options, "data": _fingerprint(task)},
        sort_keys=True,
    )
    return f"{model_name}-{task_name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"


def pretrained(
    model_name: str | None,
    task_name: str,
    cache_dir: str | Path | None = None,
    *,
    task: Task | None = None,
    root: str | Path | None = None,
    progress: bool = False,
    search_dirs: Iterable[str | Path] | None = None,
    **train_options: Any,
) -> nn.Module:
    """The reference model ``model_name`` (default: `REFERENCE_MODELS` of the task, e.g.
    digits → digits-cnn, fashion-mnist → resnet20, text → gpt-tiny; ``vgg-small`` works too)
    trained on the task, in eval mode.

    The task is ``task`` or ``load_task(task_name, root)``; the model gets its channels
    (``input_shape[0]``) and classes, or a language model its context (``input_shape[-1]``)
    and vocabulary (``num_classes``). ``train_options`` (``epochs``, ``lr``, ``batch_size``,
    ``seed``, ``weight_decay``; defaults from `TRAIN_DEFAULTS`, `MODEL_TRAIN_DEFAULTS` and
    `train_baseline`) go to `train_baseline`, with the model initialized from ``seed``.
    The weights are ``{model}-{task}-{hash}.pt`` (`checkpoint_name`: the hash covers the
    options and the data), loaded from ``cache_dir`` (default: `default_cache_dir`) or from a
    read-only folder of ``search_dirs`` (default: `checkpoint_dirs`) when one holds them;
    otherwise the model is trained (a bar on stderr when ``progress``) and saved in
    ``cache_dir``.
    """
    unknown = sorted(set(train_options) - set(_TRAIN_OPTIONS))
    if unknown:
        raise TaskError(
            f"unknown training option {', '.join(unknown)}; valid: {', '.join(_TRAIN_OPTIONS)}"
        )
    if task is None:
        task = load_task(task_name, root)
    model_name = model_name or REFERENCE_MODELS.get(task_name)
    if model_name is None:
        raise TaskError(f"task {task_name!r} has no reference model; name one explicitly")
    options = (_BASELINE_DEFAULTS | TRAIN_DEFAULTS.get(task_name, {})
               | MODEL_TRAIN_DEFAULTS.get((task_name, model_name), {}) | train_options)
    name = checkpoint_name(model_name, task, task_name, options)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options["seed"])
        model = build_model(model_name, **_model_options(model_name, task))
    folders = [cache, *(checkpoint_dirs() if search_dirs is None else map(Path, search_dirs))]
    found = next((f / name for f in folders if (f / name).is_file()), None)
    if found is not None:
        log.info("loading cached %s", found)
        state = torch.load(found, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict(state)
        return model.eval()
    metrics = train_baseline(model, task, progress=progress, **options)
    _save_checkpoint(cache / name, model, options, metrics)
    return model.eval()


def _model_options(model_name: str, task: Task) -> dict[str, int]:
    """What the reference model ``model_name`` is built with for ``task``: a language model
    (its constructor takes ``vocab_size``) the task's context and vocabulary, an image model
    its channels and classes."""
    factory = MODELS.get(model_name)
    if factory is not None and "vocab_size" in inspect.signature(factory).parameters:
        return {"context": task.input_shape[-1], "vocab_size": task.num_classes}
    return {"in_channels": task.input_shape[0], "num_classes": task.num_classes}


def _save_checkpoint(path: Path, model: nn.Module, options: dict[str, Any],
                     metrics: dict[str, float]) -> None:
    """Save the trained weights atomically; a cache folder that cannot be written is a warning
    (the model is still returned, and trained again next time)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            torch.save({"state_dict": model.state_dict(), "options": options, "metrics": metrics},
                       tmp)
        os.replace(tmp.name, path)  # atomic: a concurrent reader never sees half a file
    except OSError as e:
        log.warning("cannot cache the trained reference model in %s (%s); set %s to a "
                    "writable folder to keep it", path.parent, e, CACHE_ENV)
        return
    log.info("cached %s (%s)", path, ", ".join(
        f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_")))
