"""Tasks (data, loss, metric), the built-in data sets, user task files and baseline training.

A `Task` holds train / val (/ test) datasets of ``(x, y)`` pairs: ``x`` a float tensor of the
per-sample ``input_shape`` (C×H×W for images), ``y`` an int64 class index.

Built-in tasks, by name through `load_task`:

- ``digits``: scikit-learn's 8×8 digits (1×8×8 in [0, 1]), a stratified 60/20/20 split.
- ``fashion-mnist``: the IDX files of the Debian package ``dataset-fashion-mnist`` (or any folder
  with them), 1×28×28; validation carved from the training file, test = t10k.
- ``cifar10``: the CIFAR-10 "python version" batches in a folder the user names, 3×32×32,
  normalized per channel.

No loader downloads anything. Baseline training (`train_baseline`) is AdamW with a per-step
cosine learning-rate schedule down to zero; `pretrained` trains a reference model once and
caches its weights per user (`default_cache_dir`: ``$RANKSEARCH_CACHE``, else
``$XDG_CACHE_HOME/ranksearch/checkpoints``, else ``~/.cache/ranksearch/checkpoints``), after
looking in the read-only folders of `checkpoint_dirs` (the checkout's committed
``benchmarks/checkpoints``).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import pickle
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from .errors import DatasetNotFoundError, TaskError
from .models import build_model

__all__ = [
    "FASHION_MNIST_DIR",
    "REFERENCE_MODELS",
    "TASKS",
    "Task",
    "checkpoint_dirs",
    "checkpoint_name",
    "default_cache_dir",
    "evaluate_accuracy",
    "load_cifar10",
    "load_digits",
    "load_fashion_mnist",
    "load_task",
    "load_user_task",
    "pretrained",
    "read_idx",
    "train_baseline",
]

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- splits


def _balanced_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(len(labels))`` in which every prefix (and every suffix)
    holds each class in proportion to its frequency, to within one sample."""
    perm = np.random.default_rng(seed).permutation(len(labels))
    _, inverse, counts = np.unique(labels[perm], return_inverse=True, return_counts=True)
    by_class = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(perm), dtype=np.int64)
    rank[by_class] = np.arange(len(perm)) - np.repeat(starts, counts)
    return perm[np.argsort((rank + 0.5) / counts[inverse], kind="stable")]


def _check_size(name: str, value: int | None, available: int) -> int:
    if value is None:
        return available
    if not 1 <= value <= available:
        raise TaskError(f"{name} must be between 1 and {available}, got {value}")
    return value


def _carve(
    labels: np.ndarray,
    seed: int,
    val_fraction: float,
    train_size: int | None,
    val_size: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) of a stratified, seeded split of a training file: ``val_size``
    samples (default ``val_fraction`` of them) for validation, then at most ``train_size`` of
    the rest for training."""
    if not 0 < val_fraction < 1:
        raise TaskError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(labels)
    if val_size is None:
        n_val = max(round(val_fraction * n), 1)
    else:
        n_val = _check_size("val_size", val_size, n - 1)
    n_train = _check_size("train_size", train_size, n - n_val)
    order = _balanced_order(labels, seed)
    return order[n_val : n_val + n_train], order[:n_val]


def _subsample(labels: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """All indices, or a stratified seeded subset of ``size`` of them."""
    if size is None:
        return np.arange(len(labels))
    return _balanced_order(labels, seed)[: _check_size("test_size", size, len(labels))]


def _dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y))


# --------------------------------------------------------------------------- digits


def load_digits(seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2) -> Task:
    """scikit-learn's 1,797 handwritten digits as 1×8×8 floats in [0, 1], 10 classes.

    The split is stratified and fixed by ``seed``: ``test_fraction`` for test, ``val_fraction``
    for validation (default 60/20/20: 1,079 / 359 / 359 samples).
    """
    from sklearn.datasets import load_digits as sklearn_digits

    if not (val_fraction > 0 and test_fraction > 0 and val_fraction + test_fraction < 1):
        raise TaskError(
            "val_fraction and test_fraction must be positive with a sum below 1, "
            f"got {val_fraction} and {test_fraction}"
        )
    bunch = sklearn_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    order = _balanced_order(y, seed)
    n_test, n_val = round(test_fraction * len(y)), round(val_fraction * len(y))
    test, val, train = np.split(order, [n_test, n_test + n_val])
    return Task(
        "digits",
        _dataset(x[train], y[train]),
        _dataset(x[val], y[val]),
        test=_dataset(x[test], y[test]),
        input_shape=(1, 8, 8),
        num_classes=10,
    )


# --------------------------------------------------------------------------- fashion-mnist

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type code (third magic byte) → big-endian numpy dtype
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FASHION_HELP = (
    "install it with `sudo apt-get install dataset-fashion-mnist` (it puts the files in "
    f"{FASHION_MNIST_DIR}/) or pass --data PATH (root=PATH) naming a folder with "
    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
    "t10k-labels-idx1-ubyte (each plain or .gz)"
)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain, or gzip when the name ends in ``.gz``) into an array of its
    shape and type, e.g. N×28×28 uint8 for images and N uint8 for labels.

    Raises `TaskError` when the magic number, the header or the size is wrong.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise TaskError(f"{path}: cannot read it ({exc}); the file is corrupt") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise TaskError(
            f"{path}: not an IDX file (magic number {data[:4].hex() or 'missing'}; expected "
            "00 00, a type code and the number of dimensions); the file is corrupt"
        )
    ndim, header = data[3], 4 + 4 * data[3]
    if len(data) < header:
        raise TaskError(f"{path}: the IDX header is truncated; the file is corrupt")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise TaskError(
            f"{path}: the header announces {'×'.join(map(str, dims))} values ({expected} bytes) "
            f"but {len(data) - header} bytes follow; the file is corrupt or truncated"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_file(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetNotFoundError(f"Fashion-MNIST: {stem}[.gz] is missing in {root}; {_FASHION_HELP}")


def _read_fashion(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = (_idx_file(root, stem) for stem in _FASHION_FILES[split])
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise TaskError(
            f"{images_path}: expected N×H×W uint8 images, got {images.dtype} "
            f"{'×'.join(map(str, images.shape))}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise TaskError(
            f"{labels_path}: expected {len(images)} labels for {images_path.name}, "
            f"got shape {labels.shape}"
        )
    if len(labels) and labels.max() > 9:
        raise TaskError(f"{labels_path}: labels must be 0..9, found {int(labels.max())}")
    return images, labels.astype(np.int64)


def load_fashion_mnist(
    root: str | Path | None = None,
    train_size: int | None = None,
    val_size: int | None = None,
    test_size: int | None = None,
    val_fraction: float = 0.1,
    normalize: bool = False,
    seed: int = 0,
) -> Task:
    """Fashion-MNIST from its IDX files in ``root`` (default `FASHION_MNIST_DIR`, where the
    Debian package ``dataset-fashion-mnist`` installs them): 1×28×28 floats in [0, 1] (or
    standardized with the data set's mean 0.2860 and std 0.3530 when ``normalize``), 10 classes.

    Validation is a stratified, seeded carve of the training file: ``val_size`` images (default
    ``val_fraction`` of 60,000 = 6,000); training is the rest, or ``train_size`` of it; test is
    t10k, or a stratified ``test_size`` subset. Sizes only shrink sets, so proxies stay fast.
    Raises `DatasetNotFoundError` for a missing folder or file, `TaskError` for a corrupt one.
    """
    folder = Path(root) if root is not None else FASHION_MNIST_DIR
    if not folder.is_dir():
        raise DatasetNotFoundError(f"Fashion-MNIST folder {folder} does not exist; {_FASHION_HELP}")
    images, labels = _read_fashion(folder, "train")
    test_images, test_labels = _read_fashion(folder, "test")
    train, val = _carve(labels, seed, val_fraction, train_size, val_size)
    test = _subsample(test_labels, test_size, seed)

    def tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        x = x[:, None].astype(np.float32) / 255.0
        if normalize:
            x = (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        return _dataset(x, y)

    return Task(
        "fashion-mnist",
        tensors(images[train], labels[train]),
        tensors(images[val], labels[val]),
        test=tensors(test_images[test], test_labels[test]),
        input_shape=(1, *images.shape[1:]),
        num_classes=10,
    )


# --------------------------------------------------------------------------- cifar-10

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_HELP = (
    "download the CIFAR-10 python version (cifar-10-python.tar.gz) from the CIFAR-10 home page, "
    "extract it and pass --data PATH (root=PATH) naming the cifar-10-batches-py folder, which "
    "holds data_batch_1 … data_batch_5 and test_batch"
)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch → (N×3×32×32 uint8 images, N int64 labels). Only open trusted files:
    the format is a pickle."""
    try:
        with path.open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        raise TaskError(f"{path}: cannot unpickle it ({exc}); the file is corrupt") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise TaskError(f"{path}: expected a pickled dict with keys b'data' and b'labels'")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise TaskError(f"{path}: b'data' must be N×3072 uint8, got {data.dtype} {data.shape}")
    if labels.shape != (len(data),) or (len(labels) and not 0 <= labels.min() <= labels.max() <= 9):
        raise TaskError(f"{path}: b'labels' must hold {len(data)} classes in 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(
    root: str | Path | None = None,
    train_size: int | None = None,
    val_size: int | None = None,
    test_size: int | None = None,
    val_fraction: float = 0.1,
    normalize: bool = True,
    seed: int = 0,
) -> Task:
    """CIFAR-10 from the python batches in ``root`` (required; the folder itself or its parent
    holding ``cifar-10-batches-py``): 3×32×32 floats, standardized per channel with the usual
    CIFAR-10 mean and std (or left in [0, 1] when ``normalize`` is False), 10 classes.

    Splits as in `load_fashion_mnist`: validation carved from the five training batches
    (default 5,000 images), test = ``test_batch``. Nothing is downloaded.
    """
    if root is None:
        raise DatasetNotFoundError(f"cifar10 needs the folder of its data; {_CIFAR_HELP}")
    folder = Path(root)
    if not (folder / "test_batch").is_file() and (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    if not folder.is_dir():
        raise DatasetNotFoundError(f"CIFAR-10 folder {folder} does not exist; {_CIFAR_HELP}")
    missing = [n for n in (*_CIFAR_TRAIN, "test_batch") if not (folder / n).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"CIFAR-10: {', '.join(missing)} missing in {folder}; {_CIFAR_HELP}"
        )
    parts = [_read_cifar_batch(folder / name) for name in _CIFAR_TRAIN]
    images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    test_images, test_labels = _read_cifar_batch(folder / "test_batch")
    train, val = _carve(labels, seed, val_fraction, train_size, val_size)
    test = _subsample(test_labels, test_size, seed)
    mean = np.asarray(CIFAR10_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(CIFAR10_STD, np.float32).reshape(1, 3, 1, 1)

    def tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        x = x.astype(np.float32) / 255.0
        return _dataset((x - mean) / std if normalize else x, y)

    return Task(
        "cifar10",
        tensors(images[train], labels[train]),
        tensors(images[val], labels[val]),
        test=tensors(test_images[test], test_labels[test]),
        input_shape=(3, 32, 32),
        num_classes=10,
    )


# --------------------------------------------------------------------------- registry

TASKS: dict[str, Callable[..., Task]] = {
    "digits": load_digits,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
}
# the reference model of each built-in task, built with the task's channels and classes
REFERENCE_MODELS = {"digits": "digits-cnn", "fashion-mnist": "resnet20", "cifar10": "resnet20"}


def load_task(name: str, root: str | Path | None = None, **options: Any) -> Task:
    """Load the built-in task ``name`` (a key of `TASKS`). ``root`` is its data folder (the
    ``--data`` option of the CLI; not used by digits); ``options`` go to its loader (e.g.
    ``train_size``, ``val_size``, ``seed``)."""
    if name not in TASKS:
        raise TaskError(
            f"unknown task {name!r}; choose one of: {', '.join(TASKS)}, "
            "or pass a task file as path/to/file.py:factory"
        )
    loader = TASKS[name]
    accepted = inspect.signature(loader).parameters
    if root is not None:
        if "root" not in accepted:
            raise TaskError(f"task {name!r} takes no data folder (root / --data)")
        options["root"] = root
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        valid = ", ".join(p for p in accepted if p != "root")
        raise TaskError(f"task {name!r} has no option {', '.join(unknown)}; valid: {valid}")
    return loader(**options)


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


# --------------------------------------------------------------------------- training


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _evaluate(model: nn.Module, loader: Iterable, loss: Loss) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` over the batches of ``loader``, in eval mode; the
    model's train/eval mode is restored afterwards."""
    device, was_training = _device(model), model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    with torch.inference_mode():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            total_loss += float(loss(logits, y)) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            count += len(y)
    model.train(was_training)
    if count == 0:
        raise TaskError("cannot evaluate on an empty dataset")
    return total_loss / count, correct / count


def evaluate_accuracy(model: nn.Module, data: Dataset | DataLoader, batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (N×C×H×W → N×classes logits) on a dataset of
    ``(x, y)`` pairs or a DataLoader of (B×…, B) batches (then ``batch_size`` is unused)."""
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    return _evaluate(model, loader, F.cross_entropy)[1]


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
    <task>"). Returns ``val_accuracy`` and ``val_loss`` (on ``task.val``), ``train_loss`` (mean
    of the last epoch), ``epochs``, ``steps`` and ``seconds``.
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
                x, y = x.to(device), y.to(device)
                loss = task.loss(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total, count = total + loss.item() * len(y), count + len(y)
                bar.update()
            epoch_loss = total / count
            bar.set_postfix(epoch=epoch + 1, loss=f"{epoch_loss:.4f}")
    val_loss, val_accuracy = _evaluate(model, task.loader("val", batch_size), task.loss)
    model.eval()
    result = {
        "val_accuracy": val_accuracy,
        "val_loss": val_loss,
        "train_loss": epoch_loss,
        "epochs": epochs,
        "steps": steps,
        "seconds": time.perf_counter() - start,
    }
    log.info("trained %s on %s: %s", type(model).__name__, task.name, result)
    return result


# per built-in task: the training options `pretrained` uses unless told otherwise
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"epochs": 10, "lr": 3e-3, "batch_size": 32},
    "fashion-mnist": {"epochs": 5, "lr": 2e-3, "batch_size": 128},
    "cifar10": {"epochs": 30, "lr": 2e-3, "batch_size": 128},
}
# per (task, model): overrides of TRAIN_DEFAULTS; on Fashion-MNIST these are the options of the
# checkpoints committed under benchmarks/checkpoints, so the command line finds them
MODEL_TRAIN_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("fashion-mnist", "resnet20"): {"epochs": 4},
    ("fashion-mnist", "vgg-small"): {"epochs": 3},
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
    digits → digits-cnn, fashion-mnist → resnet20; ``vgg-small`` works too) trained on the
    task, in eval mode.

    The task is ``task`` or ``load_task(task_name, root)``; the model gets its channels
    (``input_shape[0]``) and classes. ``train_options`` (``epochs``, ``lr``, ``batch_size``,
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
        model = build_model(
            model_name, in_channels=task.input_shape[0], num_classes=task.num_classes
        )
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
    log.info("cached %s (val accuracy %.4f)", path, metrics["val_accuracy"])
