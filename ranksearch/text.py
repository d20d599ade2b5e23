"""Byte-level language-model data: the ``text`` task.

The text is the bytes of files the user names (paths, folders or glob patterns), or by default
Python's own standard-library sources: the ``.py`` files at the top of
``sysconfig.get_paths()["stdlib"]``, sorted by name, read whole until `DEFAULT_MAX_BYTES`
(the last one cut), so that the same Python gives the same bytes everywhere. The bytes are
split by position (train first, then validation, then test) and cut into windows of
``context`` bytes: ``x`` the window, ``y`` the next byte at each position (``x`` shifted by
one), both int64 of shape ``context``. The vocabulary is the 256 byte values; the metric is
perplexity.
"""

from __future__ import annotations

import glob
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from .errors import DatasetNotFoundError, TaskError
from .task import Task

__all__ = [
    "DEFAULT_MAX_BYTES",
    "VOCAB_SIZE",
    "load_text",
    "read_text",
    "stdlib_files",
    "text_files",
    "token_cross_entropy",
    "windows",
]

VOCAB_SIZE = 256
DEFAULT_MAX_BYTES = 1_000_000
_FILES_HELP = ("name text files with files=[...] (--data PATH): files, folders (every file in "
               "them) or glob patterns such as 'corpus/**/*.txt'")


def token_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """The mean next-token cross-entropy of B×T×V ``logits`` against B×T targets."""
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def stdlib_files() -> list[Path]:
    """The top-level ``.py`` files of Python's standard library, sorted by name."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def text_files(files: str | Path | Sequence[str | Path] | None = None) -> list[Path]:
    """The files ``files`` names, in order: a file as it is, a folder as every file under it
    (sorted), a glob pattern as its sorted matches; by default `stdlib_files`. Raises
    `DatasetNotFoundError` for a name that matches nothing."""
    if files is None:
        found = stdlib_files()
        if not found:
            raise DatasetNotFoundError(
                f"no .py sources in Python's standard library folder "
                f"{sysconfig.get_paths()['stdlib']}; {_FILES_HELP}")
        return found
    names = [files] if isinstance(files, str | Path) else list(files)
    if not names:
        raise TaskError(f"files is empty; {_FILES_HELP}")
    out: list[Path] = []
    for name in names:
        path = Path(name).expanduser()
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file())
        else:
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            matches = [p for p in matches if p.is_file()]
            if not matches:
                raise DatasetNotFoundError(f"text file {name}: no such file, folder or glob "
                                           f"match; {_FILES_HELP}")
            out += matches
    return out


def read_text(files: Sequence[Path], max_bytes: int | None = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of ``files`` one after another, at most ``max_bytes`` of them (all when
    None): whole files in order, the last one cut to fit."""
    if max_bytes is not None and max_bytes < 1:
        raise TaskError(f"max_bytes must be ≥ 1, got {max_bytes}")
    chunks, size = [], 0
    for path in files:
        if max_bytes is not None and size >= max_bytes:
            break
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DatasetNotFoundError(f"cannot read text file {path}: {exc}") from exc
        if max_bytes is not None:
            data = data[: max_bytes - size]
        chunks.append(data)
        size += len(data)
    return b"".join(chunks)


def windows(data: bytes | np.ndarray, context: int, stride: int | None = None,
            size: int | None = None) -> TensorDataset:
    """Windows of ``data`` as a dataset of ``(x, y)``: ``x = data[s : s + context]`` and
    ``y = data[s + 1 : s + context + 1]`` (int64) for ``s = 0, stride, 2·stride, …``
    (``stride`` defaults to ``context``: windows side by side). With ``size``, that many
    windows, evenly spread over all of them."""
    stride = stride or context
    if context < 1 or stride < 1:
        raise TaskError(f"context and stride must be ≥ 1, got {context} and {stride}")
    array = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else np.asarray(data)
    count = (len(array) - context - 1) // stride + 1 if len(array) > context else 0
    if count < 1:
        raise TaskError(f"{len(array)} bytes make no window of {context + 1} bytes; name more "
                        "text (files, max_bytes) or a shorter context")
    starts = np.arange(count) * stride
    if size is not None:
        if not 1 <= size <= count:
            raise TaskError(f"a split of {count} windows cannot give {size}; choose between 1 "
                            f"and {count}")
        starts = starts[np.linspace(0, count - 1, size).round().astype(np.int64)]
    index = starts[:, None] + np.arange(context + 1)
    tokens = torch.from_numpy(array[index].astype(np.int64))
    return TensorDataset(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())


def load_text(
    files: str | Path | Sequence[str | Path] | None = None,
    root: str | Path | None = None,
    context: int = 64,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    stride: int | None = None,
    train_size: int | None = None,
    val_size: int | None = None,
    test_size: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> Task:
    """The byte-level language-model task ``text`` over ``files`` (see `text_files`; ``root``
    is one more name, the CLI's ``--data``; default: Python's standard-library sources).

    At most ``max_bytes`` bytes are read (`read_text`) and split by position: the first
    ``1 - val_fraction - test_fraction`` for training, then validation, then test. Training
    windows start every ``stride`` bytes (default ``context // 2``, so they overlap by half);
    validation and test windows lie side by side. ``train_size``, ``val_size`` and
    ``test_size`` keep that many windows of a split, evenly spread. Inputs are ``context``
    int64 byte values, targets the next byte at each position; the loss is
    `token_cross_entropy` over B×T×256 logits and the metric perplexity.
    """
    if not (val_fraction > 0 and test_fraction > 0 and val_fraction + test_fraction < 1):
        raise TaskError("val_fraction and test_fraction must be positive with a sum below 1, "
                        f"got {val_fraction} and {test_fraction}")
    names: list[str | Path] | None = None
    if files is not None or root is not None:
        given = [] if files is None else [files] if isinstance(files, str | Path) else files
        names = [*given, *([root] if root is not None else [])]
    data = np.frombuffer(read_text(text_files(names), max_bytes), np.uint8)
    n_val, n_test = round(val_fraction * len(data)), round(test_fraction * len(data))
    n_train = len(data) - n_val - n_test
    parts = data[:n_train], data[n_train : n_train + n_val], data[n_train + n_val :]
    try:
        train = windows(parts[0], context, stride or max(context // 2, 1), train_size)
        val = windows(parts[1], context, size=val_size)
        test = windows(parts[2], context, size=test_size)
    except TaskError as exc:
        raise TaskError(f"text task of {len(data):,} bytes: {exc}") from None
    return Task("text", train, val, test=test, loss=token_cross_entropy, metric="perplexity",
                input_shape=(context,), num_classes=VOCAB_SIZE)
