"""The built-in data sets, by name through `load_task`.

- ``digits``: scikit-learn's 8×8 digits (1×8×8 in [0, 1]), a stratified 60/20/20 split.
- ``fashion-mnist``: the IDX files of the Debian package ``dataset-fashion-mnist`` (or any folder
  with them), 1×28×28; validation carved from the training file, test = t10k.
- ``cifar10``: the CIFAR-10 "binary version" batches in a folder the user names, 3×32×32,
  normalized per channel (read as raw bytes; the pickled "python version" is refused).
- ``text``: byte-level language modelling (`ranksearch.text`) over files the user names, by
  default Python's own standard-library sources; perplexity is its metric.

No loader downloads anything.
"""

from __future__ import annotations

import gzip
import inspect
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .errors import DatasetNotFoundError, TaskError
from .task import Task
from .text import load_text

__all__ = [
    "FASHION_MNIST_DIR",
    "REFERENCE_MODELS",
    "TASKS",
    "load_cifar10",
    "load_digits",
    "load_fashion_mnist",
    "load_task",
    "read_idx",
]


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
_CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_TEST = "test_batch.bin"
_CIFAR_DIR = "cifar-10-batches-bin"
_CIFAR_RECORD = 1 + 3 * 32 * 32  # a label byte, then the red, green and blue 32×32 planes
_CIFAR_HELP = (
    "download the CIFAR-10 binary version (cifar-10-binary.tar.gz) from the CIFAR-10 home page, "
    f"extract it and pass --data PATH (root=PATH) naming the {_CIFAR_DIR} folder, which holds "
    "data_batch_1.bin … data_batch_5.bin and test_batch.bin"
)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch (records of a label byte and 3072 pixel bytes) → (N×3×32×32 uint8
    images, N int64 labels)."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise TaskError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise TaskError(f"{path}: {raw.size} bytes is not a whole number of {_CIFAR_RECORD}-byte "
                        f"CIFAR-10 records (a label byte and 3072 pixels); the file is truncated "
                        f"or not a CIFAR-10 binary batch; {_CIFAR_HELP}")
    records = raw.reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise TaskError(f"{path}: a label byte is {labels.max()}, not a class in 0..9; the file "
                        "is not a CIFAR-10 binary batch (CIFAR-100's has two label bytes)")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def load_cifar10(
    root: str | Path | None = None,
    train_size: int | None = None,
    val_size: int | None = None,
    test_size: int | None = None,
    val_fraction: float = 0.1,
    normalize: bool = True,
    seed: int = 0,
) -> Task:
    """CIFAR-10 from the binary batches in ``root`` (required; the folder itself or its parent
    holding ``cifar-10-batches-bin``), read as raw bytes (no pickle): 3×32×32 floats,
    standardized per channel with the usual CIFAR-10 mean and std (or left in [0, 1] when
    ``normalize`` is False), 10 classes.

    Splits as in `load_fashion_mnist`: validation carved from the five training batches
    (default 5,000 images), test = ``test_batch.bin``. Nothing is downloaded. The python
    version (pickled batches) is refused: unpickling a file can run code.
    """
    if root is None:
        raise DatasetNotFoundError(f"cifar10 needs the folder of its data; {_CIFAR_HELP}")
    folder = Path(root)
    if not (folder / _CIFAR_TEST).is_file() and (folder / _CIFAR_DIR).is_dir():
        folder = folder / _CIFAR_DIR
    if not folder.is_dir():
        raise DatasetNotFoundError(f"CIFAR-10 folder {folder} does not exist; {_CIFAR_HELP}")
    missing = [n for n in (*_CIFAR_TRAIN, _CIFAR_TEST) if not (folder / n).is_file()]
    pickled = (folder / "test_batch", folder / "cifar-10-batches-py" / "test_batch")
    if missing and any(f.is_file() for f in pickled):
        raise DatasetNotFoundError(
            f"{folder} holds the CIFAR-10 python version, whose batches are pickles (reading "
            f"them could run code), so ranksearch does not read it; {_CIFAR_HELP}"
        )
    if missing:
        raise DatasetNotFoundError(
            f"CIFAR-10: {', '.join(missing)} missing in {folder}; {_CIFAR_HELP}"
        )
    parts = [_read_cifar_batch(folder / name) for name in _CIFAR_TRAIN]
    images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    test_images, test_labels = _read_cifar_batch(folder / _CIFAR_TEST)
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
    "text": load_text,
}
# the reference model of each built-in task, built with the task's channels and classes (or, for
# a language model, its context and vocabulary)
REFERENCE_MODELS = {"digits": "digits-cnn", "fashion-mnist": "resnet20", "cifar10": "resnet20",
                    "text": "gpt-tiny"}


def load_task(name: str, root: str | Path | None = None, **options: Any) -> Task:
    """Load the built-in task ``name`` (a key of `TASKS`). ``root`` is its data folder (the
    ``--data`` option of the CLI; not used by digits; for text, a file, folder or glob);
    ``options`` go to its loader (e.g. ``train_size``, ``val_size``, ``seed``; for text
    ``files``, ``context``, ``max_bytes``)."""
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
