"""The built-in language-model task: byte-level text, the GPT reference model, its baseline
training and a search with perplexity as the objective."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ranksearch
from ranksearch import training
from ranksearch.datasets import REFERENCE_MODELS, load_task
from ranksearch.errors import DatasetNotFoundError, TaskError
from ranksearch.evaluate import ProxySettings
from ranksearch.models import GPT, build_model
from ranksearch.text import (
    load_text,
    read_text,
    stdlib_files,
    text_files,
    token_cross_entropy,
    windows,
)
from ranksearch.training import evaluate_metrics, pretrained, train_baseline

CONTEXT = 16


@pytest.fixture(scope="module")
def text_task():
    """40 kB of the standard library's sources in windows of 16 bytes, side by side."""
    return load_text(context=CONTEXT, max_bytes=40_000, stride=CONTEXT)


@pytest.fixture(scope="module")
def tiny_gpt(text_task):
    """A one-layer GPT (dim 32) trained for two epochs on `text_task`."""
    torch.manual_seed(0)
    model = GPT(context=CONTEXT, dim=32, layers=1, heads=2)
    metrics = train_baseline(model, text_task, epochs=2, lr=5e-3, batch_size=32)
    return model, metrics


def _stream(task_bytes: int) -> np.ndarray:
    return np.frombuffer(read_text(stdlib_files(), task_bytes), np.uint8)


def test_default_text_is_the_sorted_stdlib_sources_cut_at_max_bytes() -> None:
    files = stdlib_files()
    assert files == sorted(files) and all(f.suffix == ".py" for f in files)
    data = read_text(files, 50_000)
    assert len(data) == 50_000
    whole = b"".join(f.read_bytes() for f in files[:40])
    assert data == whole[:50_000]
    assert read_text(files, 10) == files[0].read_bytes()[:10]
    task = load_task("text")  # 1,000,000 bytes: 800,000 / 100,000 / 100,000
    assert task.input_shape == (64,)
    assert (len(task.train), len(task.val), len(task.test)) == (24_998, 1_562, 1_562)


def test_windows_are_the_bytes_and_targets_are_shifted_by_one(text_task) -> None:
    stream = _stream(40_000)
    n_train = len(stream) - 2 * 4_000
    x, y = text_task.train.tensors
    assert x.dtype == y.dtype == torch.int64 and x.shape[1] == CONTEXT
    stride = CONTEXT
    for i in (0, 1, 7, len(x) - 1):
        start = i * stride
        assert x[i].tolist() == stream[start : start + CONTEXT].tolist()
        assert y[i].tolist() == stream[start + 1 : start + CONTEXT + 1].tolist()
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert int(x.max()) < 256
    # validation follows training in the stream, windows side by side
    vx, vy = text_task.val.tensors
    assert vx[0].tolist() == stream[n_train : n_train + CONTEXT].tolist()
    assert vx[1].tolist() == stream[n_train + CONTEXT : n_train + 2 * CONTEXT].tolist()
    assert torch.equal(vy[:, :-1], vx[:, 1:])
    assert str(text_task.metric) == "perplexity"
    assert text_task.input_shape == (CONTEXT,) and text_task.num_classes == 256


def test_the_text_task_is_deterministic(text_task) -> None:
    again = load_task("text", context=CONTEXT, max_bytes=40_000, stride=CONTEXT)
    for split in ("train", "val", "test"):
        for a, b in zip(getattr(text_task, split).tensors, getattr(again, split).tensors,
                        strict=True):
            assert torch.equal(a, b)
    assert len(load_task("text", context=CONTEXT, max_bytes=40_000, val_size=5).val) == 5
    overlapping = load_text(context=CONTEXT, max_bytes=40_000)  # default stride: context / 2
    assert torch.equal(overlapping.train.tensors[0][2], text_task.train.tensors[0][1])


def test_windows_size_spreads_evenly() -> None:
    data = bytes(range(100))
    all_windows = windows(data, 4)
    assert len(all_windows) == 24  # starts 0, 4, …, 92; the last needs bytes 92..96
    some = windows(data, 4, size=3)
    assert some.tensors[0][:, 0].tolist() == [0, 48, 92]
    with pytest.raises(TaskError, match="no window"):
        windows(b"abc", 4)


def test_user_files_folders_and_globs(tmp_path) -> None:
    (tmp_path / "a.txt").write_bytes(b"hello world, " * 40)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_bytes(b"goodbye moon. " * 40)
    assert text_files(tmp_path) == [tmp_path / "a.txt", tmp_path / "sub" / "b.txt"]
    assert text_files(str(tmp_path / "**" / "b.txt")) == [tmp_path / "sub" / "b.txt"]
    task = load_task("text", root=tmp_path / "a.txt", context=8, max_bytes=None)
    assert bytes(task.train[0][0].tolist()) == b"hello wo"
    both = load_task("text", files=[tmp_path / "a.txt", tmp_path / "sub"], context=8,
                     max_bytes=None)
    assert len(both.train) > len(task.train)
    with pytest.raises(DatasetNotFoundError, match="no such file"):
        load_text(files=str(tmp_path / "missing*.txt"))
    with pytest.raises(TaskError, match="no window"):
        load_text(files=tmp_path / "a.txt", context=64, max_bytes=200)
    with pytest.raises(TaskError, match="no option"):
        load_task("text", epochs=3)


def test_token_cross_entropy_is_the_mean_over_tokens() -> None:
    torch.manual_seed(0)
    logits, y = torch.randn(3, 5, 256), torch.randint(0, 256, (3, 5))
    expected = -torch.log_softmax(logits, -1).gather(-1, y[..., None]).mean()
    assert float(token_cross_entropy(logits, y)) == pytest.approx(float(expected), rel=1e-6)


def test_gpt_is_causal_and_gives_logits_per_position() -> None:
    torch.manual_seed(0)
    model = build_model("gpt-tiny").eval()
    assert REFERENCE_MODELS["text"] == "gpt-tiny"
    assert sum(p.numel() for p in model.parameters()) == 470_528
    tokens = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        logits = model(tokens)
        changed = tokens.clone()
        changed[:, 40] = (changed[:, 40] + 1) % 256
        other = model(changed)
    assert logits.shape == (2, 64, 256)
    assert torch.allclose(logits[:, :40], other[:, :40], atol=1e-5)
    assert not torch.allclose(logits[:, 40:], other[:, 40:], atol=1e-3)
    assert model.head.weight.data_ptr() != model.tok.weight.data_ptr()  # untied
    with pytest.raises(ValueError, match="T ≤ 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_a_tiny_gpt_beats_uniform_and_unigram_perplexity(text_task, tiny_gpt) -> None:
    model, metrics = tiny_gpt
    counts = torch.bincount(text_task.train.tensors[1].flatten(), minlength=256).double() + 1
    log_p = torch.log(counts / counts.sum())
    val_y = text_task.val.tensors[1].flatten()
    unigram = math.exp(float(-log_p[val_y].mean()))
    assert unigram < 60  # source code is far from uniform bytes
    ppl = metrics["val_perplexity"]
    assert ppl == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-5)
    assert ppl < 0.75 * unigram, (ppl, unigram)
    again = evaluate_metrics(model, text_task.val, ("perplexity", "accuracy"),
                             loss=token_cross_entropy)
    assert again["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert again["accuracy"] == pytest.approx(metrics["val_accuracy"])
    assert 0.15 < again["accuracy"] < 1


def test_pretrained_gpt_trains_once_and_is_cached(tmp_path, monkeypatch) -> None:
    task = load_text(context=8, max_bytes=8_000, train_size=128)
    first = pretrained(None, "text", cache_dir=tmp_path, task=task, epochs=1)
    assert isinstance(first, GPT) and first.context == 8
    (checkpoint,) = tmp_path.glob("gpt-tiny-text-*.pt")
    saved = torch.load(checkpoint, weights_only=True)
    assert "val_perplexity" in saved["metrics"]

    def no_training(*args, **kwargs):
        raise AssertionError("the cached model was trained again")

    monkeypatch.setattr(training, "train_baseline", no_training)
    second = pretrained(None, "text", cache_dir=tmp_path, task=task, epochs=1)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_search_with_perplexity_as_objective(text_task, tiny_gpt) -> None:
    model, _ = tiny_gpt
    result = ranksearch.search(
        model, text_task, objectives=["perplexity", "params"], constraints=["params<=0.5"],
        evaluations=6, store="memory", proxy=ProxySettings(steps=5, batch_size=32,
                                                           eval_batches=4),
    )
    ok = [r for r in result.results if r.status == "ok"]
    assert len(ok) >= 3, [(r.status, r.reason) for r in result.results]
    for r in ok:
        assert math.isfinite(r.metrics["perplexity"]) and r.metrics["perplexity"] > 1
    feasible = [r for r in ok if r.metrics["params_ratio"] <= 0.5]
    best = result.best()
    assert best is not None
    assert best.metrics["perplexity"] == min(r.metrics["perplexity"] for r in feasible)
    front = result.front()
    assert front
    # minimized perplexity: along the front, fewer parameters never come with lower perplexity
    ordered = sorted(front, key=lambda r: r.metrics["params"])
    perplexities = [r.metrics["perplexity"] for r in ordered]
    assert perplexities == sorted(perplexities, reverse=True)
    for r in ok:
        dominated = any(
            f.metrics["perplexity"] <= r.metrics["perplexity"]
            and f.metrics["params"] <= r.metrics["params"] and f is not r for f in front)
        assert r in front or dominated
