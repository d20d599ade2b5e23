"""Tasks: built-in data sets (written small by the tests), user task files, baseline training
and the pretrained-model cache."""

from __future__ import annotations

import gzip
import pickle
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ranksearch import datasets as datasets_module
from ranksearch import training as training_module
from ranksearch.datasets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_cifar10,
    load_fashion_mnist,
    load_task,
    read_idx,
)
from ranksearch.errors import DatasetNotFoundError, RankSearchError, TaskError
from ranksearch.models import DigitsCNN
from ranksearch.task import Task, load_user_task
from ranksearch.training import evaluate_accuracy, pretrained, train_baseline


@pytest.fixture(scope="module")
def digits() -> Task:
    return load_task("digits")


def _rows(data: TensorDataset) -> set[bytes]:
    return {row.numpy().tobytes() for row in data.tensors[0]}


def _tiny_task(n: int = 40) -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = (x.sum((1, 2, 3)) > 0).long()
    return Task("tiny", TensorDataset(x, y), TensorDataset(x[:10], y[:10]))


# --------------------------------------------------------------------------- Task


def test_task_infers_shape_and_classes() -> None:
    x, y = torch.zeros(6, 3, 5, 7), torch.tensor([0, 1, 4, 2, 0, 1])
    task = Task("t", TensorDataset(x, y), TensorDataset(x, y))
    assert task.input_shape == (3, 5, 7)
    assert task.num_classes == 5
    assert task.metric == "accuracy"
    assert task.example_input(4).shape == (4, 3, 5, 7)
    assert not task.example_input().any()
    assert float(task.loss(torch.tensor([[0.0, 0.0]]), torch.tensor([1]))) == pytest.approx(
        np.log(2)
    )


def test_task_rejects_empty_and_float_labels() -> None:
    empty = TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    full = TensorDataset(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TaskError, match="val dataset must be a non-empty"):
        Task("t", full, empty)
    with pytest.raises(TaskError, match="integer class indices"):
        Task("t", TensorDataset(torch.zeros(3, 2), torch.zeros(3)), full)
    with pytest.raises(TaskError, match="num_classes must be ≥ 1"):
        Task("t", full, full, num_classes=0)


def test_loader_is_seeded_and_checks_the_split() -> None:
    task = _tiny_task()

    def labels(**kwargs: object) -> list[int]:
        return torch.cat([y for _, y in task.loader("train", 8, **kwargs)]).tolist()

    assert labels(seed=3) == labels(seed=3)
    assert torch.cat([x for x, _ in task.loader("train", 8, seed=3)]).shape == (40, 1, 4, 4)
    orders = {
        tuple(torch.cat([x[:, 0, 0, 0] for x, _ in task.loader("train", 8, seed=s)]).tolist())
        for s in range(3)
    }
    assert len(orders) == 3
    val = torch.cat([x for x, _ in task.loader("val", 4)])
    torch.testing.assert_close(val, task.val.tensors[0])  # not shuffled
    with pytest.raises(TaskError, match="no test split"):
        task.loader("test")
    with pytest.raises(TaskError, match="unknown split"):
        task.loader("validation")


# --------------------------------------------------------------------------- digits


def test_digits_sizes_values_and_classes(digits: Task) -> None:
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1079, 359, 359)
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    for split in (digits.train, digits.val, digits.test):
        x, y = split.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8)
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
        counts = torch.bincount(y, minlength=10)
        share = counts.float() / len(y)
        assert torch.all((share - 0.1).abs() < 0.02), counts  # stratified


def test_digits_split_is_a_deterministic_partition(digits: Task) -> None:
    from sklearn.datasets import load_digits as sklearn_digits

    train, val, test = _rows(digits.train), _rows(digits.val), _rows(digits.test)
    assert not train & val and not train & test and not val & test
    every = {(row / 16.0).astype(np.float32).tobytes() for row in sklearn_digits().data}
    assert train | val | test == every
    again = load_task("digits")
    for split in ("train", "val", "test"):
        for a, b in zip(digits.dataset(split).tensors, again.dataset(split).tensors, strict=True):
            assert torch.equal(a, b)
    assert _rows(load_task("digits", seed=1).val) != val


# --------------------------------------------------------------------------- fashion-mnist


def _idx(array: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    return header + np.asarray(array.shape, ">u4").tobytes() + array.tobytes()


def _write(path: Path, data: bytes, gz: bool) -> None:
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def _fashion_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    images[:, 0, 0], images[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256  # unique ids
    return images, (np.arange(n) % 10).astype(np.uint8)


def _fashion_folder(root: Path, gz: bool, n_train: int = 100, n_test: int = 30) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    arrays = {"train": _fashion_arrays(n_train, 0), "t10k": _fashion_arrays(n_test, 1)}
    for prefix, (images, labels) in arrays.items():
        _write(root / f"{prefix}-images-idx3-ubyte", _idx(images), gz)
        _write(root / f"{prefix}-labels-idx1-ubyte", _idx(labels), gz)
    return arrays


def _ids(x: torch.Tensor) -> list[int]:
    raw = (x[:, 0, 0, :2] * 255).round().long()
    return (raw[:, 0] + 256 * raw[:, 1]).tolist()


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_loads_idx_files(tmp_path: Path, gz: bool) -> None:
    arrays = _fashion_folder(tmp_path, gz)
    task = load_task("fashion-mnist", root=tmp_path)
    assert (len(task.train), len(task.val), len(task.test)) == (90, 10, 30)
    assert task.input_shape == (1, 28, 28) and task.num_classes == 10
    images, labels = arrays["train"]
    ids = {"train": _ids(task.train.tensors[0]), "val": _ids(task.val.tensors[0])}
    assert sorted(ids["train"] + ids["val"]) == list(range(100))  # a partition of the file
    for split in ("train", "val"):
        x, y = task.dataset(split).tensors
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
        expected = torch.from_numpy(images[ids[split]]).float().unsqueeze(1) / 255
        torch.testing.assert_close(x, expected)
        assert y.tolist() == labels[ids[split]].tolist()
    assert sorted(task.val.tensors[1].tolist()) == list(range(10))  # stratified
    test_images, test_labels = arrays["t10k"]
    test_x = torch.from_numpy(test_images).float().unsqueeze(1) / 255
    torch.testing.assert_close(task.test.tensors[0], test_x)
    assert task.test.tensors[1].tolist() == test_labels.tolist()


def test_fashion_mnist_sizes_seed_and_normalize(tmp_path: Path) -> None:
    _fashion_folder(tmp_path, gz=True)
    full = load_fashion_mnist(tmp_path)
    small = load_fashion_mnist(tmp_path, train_size=20, val_size=10, test_size=10)
    assert (len(small.train), len(small.val), len(small.test)) == (20, 10, 10)
    assert torch.bincount(small.train.tensors[1]).tolist() == [2] * 10
    assert _ids(small.val.tensors[0]) == _ids(full.val.tensors[0])
    assert set(_ids(small.train.tensors[0])) <= set(_ids(full.train.tensors[0]))
    assert _ids(load_fashion_mnist(tmp_path, seed=1).val.tensors[0]) != _ids(full.val.tensors[0])
    normalized = load_fashion_mnist(tmp_path, normalize=True)
    expected = (full.train.tensors[0] - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    torch.testing.assert_close(normalized.train.tensors[0], expected)
    with pytest.raises(TaskError, match="train_size must be between 1 and 90"):
        load_fashion_mnist(tmp_path, train_size=91)


def test_fashion_mnist_missing_folder_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(datasets_module, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(DatasetNotFoundError) as info:
        load_task("fashion-mnist")
    message = str(info.value)
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert "--data PATH" in message and str(tmp_path / "absent") in message
    assert isinstance(info.value, RankSearchError) and isinstance(info.value, FileNotFoundError)


def test_fashion_mnist_missing_file_is_named(tmp_path: Path) -> None:
    _fashion_folder(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"t10k-labels-idx1-ubyte\[\.gz\] is missing"):
        load_fashion_mnist(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00\x00\x1c\x00\x00\x00\x1c" + bytes(100),
            "bytes follow",
        ),
        (b"\x1f\x00\x08\x03" + bytes(12), "not an IDX file"),
        (b"\x00\x00\x08\x03\x00\x00", "header is truncated"),
        (b"", "not an IDX file"),
    ],
)
def test_corrupt_idx_is_a_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    _fashion_folder(tmp_path, gz=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(content)
    with pytest.raises(TaskError, match=message) as info:
        load_fashion_mnist(tmp_path)
    assert "train-images-idx3-ubyte" in str(info.value)


def test_corrupt_gzip_and_label_mismatch(tmp_path: Path) -> None:
    _fashion_folder(tmp_path, gz=True)
    data = (tmp_path / "train-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(TaskError, match="corrupt"):
        load_fashion_mnist(tmp_path)
    _write(tmp_path / "train-images-idx3-ubyte", _idx(_fashion_arrays(99, 0)[0]), gz=True)
    with pytest.raises(TaskError, match="expected 99 labels"):
        load_fashion_mnist(tmp_path)


def test_read_idx_keeps_shape_and_type(tmp_path: Path) -> None:
    values = np.arange(-6, 6, dtype=">i4").reshape(2, 3, 2)
    (tmp_path / "x.idx").write_bytes(_idx(values))
    out = read_idx(tmp_path / "x.idx")
    assert out.shape == (2, 3, 2) and out.dtype == np.int32
    assert out.tolist() == values.tolist()


# --------------------------------------------------------------------------- cifar-10


def _cifar_folder(root: Path, per_batch: int = 6, n_test: int = 5) -> dict[str, dict]:
    """CIFAR-10 binary batches: records of a label byte and 3072 pixel bytes."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    batches = {}
    names = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    for index, name in enumerate(names):
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[:, 0] = index * per_batch + np.arange(n)  # a unique id in the red channel
        labels = rng.integers(0, 10, n).astype(np.uint8)
        (root / f"{name}.bin").write_bytes(np.column_stack([labels, data]).tobytes())
        batches[name] = {"data": data, "labels": labels.tolist()}
    return batches


def test_cifar10_loads_binary_batches(tmp_path: Path) -> None:
    batches = _cifar_folder(tmp_path / "cifar-10-batches-bin")
    task = load_task("cifar10", root=tmp_path)  # the parent folder works too
    assert (len(task.train), len(task.val), len(task.test)) == (27, 3, 5)
    assert task.input_shape == (3, 32, 32) and task.num_classes == 10
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    train_raw = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    train_labels = [v for i in range(1, 6) for v in batches[f"data_batch_{i}"]["labels"]]
    seen = []
    for split in ("train", "val"):
        x, y = task.dataset(split).tensors
        raw = (x * std + mean) * 255
        ids = raw[:, 0, 0, 0].round().long().tolist()
        seen += ids
        expected = torch.from_numpy(train_raw[ids]).float().view(-1, 3, 32, 32)
        torch.testing.assert_close(raw, expected, atol=1e-3, rtol=0)
        assert y.tolist() == [train_labels[i] for i in ids]
    assert sorted(seen) == list(range(30))
    test_raw = torch.from_numpy(batches["test_batch"]["data"]).float().view(-1, 3, 32, 32)
    torch.testing.assert_close(task.test.tensors[0], (test_raw / 255 - mean) / std)
    assert task.test.tensors[1].tolist() == batches["test_batch"]["labels"]
    plain = load_cifar10(tmp_path / "cifar-10-batches-bin", normalize=False)
    torch.testing.assert_close(plain.test.tensors[0], test_raw / 255)


def test_cifar10_needs_a_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="--data PATH"):
        load_task("cifar10")
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_cifar10(tmp_path / "absent")
    _cifar_folder(tmp_path)
    (tmp_path / "data_batch_3.bin").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"data_batch_3\.bin missing"):
        load_cifar10(tmp_path)


def test_cifar10_malformed_batches(tmp_path: Path) -> None:
    _cifar_folder(tmp_path)
    good = (tmp_path / "test_batch.bin").read_bytes()
    (tmp_path / "test_batch.bin").write_bytes(good[:-10])  # truncated
    with pytest.raises(TaskError, match="not a whole number of 3073-byte"):
        load_cifar10(tmp_path)
    (tmp_path / "test_batch.bin").write_bytes(b"")
    with pytest.raises(TaskError, match="0 bytes"):
        load_cifar10(tmp_path)
    (tmp_path / "test_batch.bin").write_bytes(bytes([12]) + good[1:])  # label 12
    with pytest.raises(TaskError, match="label byte is 12"):
        load_cifar10(tmp_path)


def test_cifar10_refuses_the_pickled_python_version(tmp_path: Path) -> None:
    """The python version's batches are pickles; none is opened, so none can run code."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (marker.write_text, ("ran",))

    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        (folder / name).write_bytes(pickle.dumps(Payload()))
    for root in (folder, tmp_path):
        with pytest.raises(DatasetNotFoundError, match=r"python version.*cifar-10-binary\.tar\.gz"):
            load_cifar10(root)
    assert not marker.exists()


# --------------------------------------------------------------------------- load_task


def test_load_task_errors() -> None:
    with pytest.raises(TaskError) as info:
        load_task("mnist")
    assert all(name in str(info.value) for name in ("digits", "fashion-mnist", "cifar10"))
    with pytest.raises(TaskError, match="no option train_sise; valid: train_size"):
        load_task("fashion-mnist", train_sise=10)
    with pytest.raises(TaskError, match="takes no data folder"):
        load_task("digits", root="/tmp")


# --------------------------------------------------------------------------- user tasks

USER_TASK = """
    from dataclasses import dataclass

    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from ranksearch.task import Task


    @dataclass
    class Settings:  # a dataclass needs its module in sys.modules
        width: int = 3


    NOT_CALLABLE = 42


    def make(width=Settings().width):
        data = TensorDataset(torch.randn(8, width), torch.arange(8) % 2)
        return nn.Linear(width, 2), Task("user", data, data)


    def wrong_type():
        return nn.Linear(3, 2)


    def wrong_pair():
        return nn.Linear(3, 2), "task"


    def broken():
        raise RuntimeError("no data here")
"""


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_task.py"
    path.write_text(textwrap.dedent(USER_TASK))
    return path


def test_user_task_works(user_file: Path) -> None:
    model, task = load_user_task(f"{user_file}:make")
    assert isinstance(model, nn.Linear) and task.name == "user"
    assert task.input_shape == (3,) and task.num_classes == 2
    model, task = load_user_task(f"{user_file}:make", width=5)
    assert model.in_features == 5 and task.input_shape == (5,)


@pytest.mark.parametrize(
    ("suffix", "message"),
    [
        (":absent", "has no attribute 'absent' .*make"),
        (":NOT_CALLABLE", "is a int, not a function"),
        (":wrong_type", "returned Linear; it must return \\(model: nn.Module, task: Task\\)"),
        (":wrong_pair", "returned \\(Linear, str\\)"),
        (":broken", "raised RuntimeError: no data here"),
        ("", "not of the form path/to/file.py:factory"),
    ],
)
def test_user_task_errors(user_file: Path, suffix: str, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        load_user_task(f"{user_file}{suffix}")


def test_user_task_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="does not exist"):
        load_user_task(f"{tmp_path / 'absent.py'}:make")
    (tmp_path / "bad.py").write_text("def make(:\n")
    with pytest.raises(TaskError, match=r"importing task file .*bad\.py failed: SyntaxError"):
        load_user_task(f"{tmp_path / 'bad.py'}:make")


# --------------------------------------------------------------------------- training


class _FirstPixel(nn.Module):
    """Predicts class 1 where the first feature is positive, else class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positive = (x.flatten(1)[:, 0] > 0).float()
        return torch.stack([1 - positive, positive], 1)


def test_evaluate_accuracy_on_datasets_and_loaders() -> None:
    x = torch.tensor([[1.0], [-1.0], [2.0], [-3.0]])
    data = TensorDataset(x, torch.tensor([1, 0, 0, 0]))
    assert evaluate_accuracy(_FirstPixel(), data, batch_size=3) == 0.75
    model = _FirstPixel().train()
    assert evaluate_accuracy(model, DataLoader(data, batch_size=2)) == 0.75
    assert model.training  # the mode is restored
    with pytest.raises(TaskError, match="empty"):
        evaluate_accuracy(_FirstPixel(), TensorDataset(x[:0], torch.zeros(0).long()))


def test_train_baseline_on_digits(digits: Task) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DigitsCNN()
    state = torch.random.get_rng_state()
    result = train_baseline(model, digits, epochs=5, lr=3e-3, batch_size=32, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert result["val_accuracy"] >= 0.95
    assert result["val_accuracy"] == evaluate_accuracy(model, digits.val)
    assert result["steps"] == 5 * 34 and not model.training


def test_train_baseline_is_deterministic_and_shows_progress(capsys) -> None:
    task = _tiny_task()
    states = []
    for progress in (False, True):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(16, 2))
            torch.manual_seed(int(progress))  # dropout masks depend on `seed` only
            train_baseline(model, task, epochs=2, batch_size=8, seed=1, progress=progress)
        states.append(model.state_dict())
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name])
    assert "train tiny" in capsys.readouterr().err
    with pytest.raises(TaskError, match="epochs must be"):
        train_baseline(model, task, epochs=0)


def test_pretrained_trains_once_then_loads(tmp_path: Path, digits: Task, monkeypatch) -> None:
    first = pretrained("digits-cnn", "digits", tmp_path, task=digits, epochs=4, seed=0)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1 and files[0].name.startswith("digits-cnn-digits-")
    assert evaluate_accuracy(first, digits.val) >= 0.95

    def no_training(*args: object, **kwargs: object) -> dict:
        raise AssertionError("trained although the weights are cached")

    monkeypatch.setattr(training_module, "train_baseline", no_training)
    second = pretrained("digits-cnn", "digits", tmp_path, task=digits, epochs=4, seed=0)
    assert not second.training
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name])
    with pytest.raises(AssertionError, match="cached"):  # other options: another cache entry
        pretrained("digits-cnn", "digits", tmp_path, task=digits, epochs=3, seed=0)
    with pytest.raises(TaskError, match="unknown training option epoch"):
        pretrained("digits-cnn", "digits", tmp_path, task=digits, epoch=3)
