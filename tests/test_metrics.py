"""Metrics by name or of your own, the prediction in any model output, and the evaluator
scoring with the task's metric (per token too)."""

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ranksearch import Task
from ranksearch.constraints import Constraint
from ranksearch.errors import ConstraintError, TaskError
from ranksearch.evaluate import Evaluator
from ranksearch.metrics import Meter, Metric, get_metric, prediction
from ranksearch.pareto import Objective, parse_objectives


def measure(metric: str | Metric, batches) -> dict[str, float]:
    meter = Meter([get_metric(metric)], F.cross_entropy)
    for p, t in batches:
        meter.add(p, t)
    return meter.values()


def test_accuracy_top5_per_sample_and_per_token() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 2])
    assert measure("accuracy", [(logits, labels)])["accuracy"] == pytest.approx(2 / 3)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 5, 7, generator=g)
    targets = torch.randint(0, 7, (2, 5), generator=g)
    targets[1, 3:] = -100  # padding does not count
    keep = targets != -100
    hits = ((tokens.argmax(-1) == targets) & keep).sum().item()
    assert measure("accuracy", [(tokens, targets)])["accuracy"] == pytest.approx(
        hits / keep.sum().item())
    top = tokens.topk(5, -1).indices
    top5 = ((top == targets.unsqueeze(-1)).any(-1) & keep).sum().item() / keep.sum().item()
    assert measure("top5", [(tokens, targets)])["top5"] == pytest.approx(top5)
    assert top5 > hits / keep.sum().item()
    with pytest.raises(TaskError, match="does not fit target"):
        measure("accuracy", [(tokens, targets[:, :2])])


def test_perplexity_accumulates_over_batches() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, 11, generator=g)
    targets = torch.randint(0, 11, (4, 6), generator=g)
    whole = math.exp(F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1)).item())
    split = measure("perplexity", [(logits[:1], targets[:1]), (logits[1:], targets[1:])])
    assert split["perplexity"] == pytest.approx(whole, rel=1e-5)
    assert get_metric("perplexity").direction == "min"


def test_mse_and_a_whole_set_metric_of_your_own() -> None:
    pred, target = torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([1.0, 3.0, 2.0])
    got = Meter([get_metric("mse")], F.mse_loss)
    got.add(pred[:2], target[:2])
    got.add(pred[2:], target[2:])
    assert got.values()["mse"] == pytest.approx((0 + 1 + 4) / 3)
    seen = []

    def largest_error(p: torch.Tensor, t: torch.Tensor) -> float:
        seen.append(len(t))
        return float((p.reshape(t.shape) - t).abs().max())

    mine = Meter([Metric("worst", "min", largest_error)], F.mse_loss)
    mine.add(pred[:2], target[:2])
    mine.add(pred[2:], target[2:])
    assert mine.values() == {"worst": 2.0} and seen == [3]  # once, on every prediction


def test_metric_definitions_are_checked() -> None:
    with pytest.raises(TaskError, match="direction must be 'max'"):
        Metric("map", "up", lambda p, t: 0.0)
    with pytest.raises(TaskError, match="no way to be computed"):
        Metric("map", "max")
    with pytest.raises(TaskError, match="unknown metric 'f1'"):
        get_metric("f1")
    assert get_metric("accuracy") == "accuracy" and str(get_metric("mse")) == "mse"


@dataclass
class FakeModelOutput:
    loss: torch.Tensor
    logits: torch.Tensor


def test_prediction_in_any_output() -> None:
    t = torch.ones(2, 3)
    assert prediction(t) is t
    assert prediction((t, "hidden")) is t
    assert prediction({"logits": t, "loss": 0}) is t
    assert prediction(FakeModelOutput(torch.zeros(()), t)) is t
    assert prediction({"scores": t}, "scores") is t
    assert prediction((0, t), lambda out: out[1]) is t
    with pytest.raises(TaskError, match="output="):
        prediction({"scores": t})
    with pytest.raises(TaskError, match="has no 'logits'"):
        prediction({"scores": t}, "logits")


class Wrapped(nn.Module):
    """A classifier whose forward returns a dict, a tuple or a ModelOutput-like object."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 3))

    def forward(self, x: torch.Tensor):
        out = self.body(x)
        if self.kind == "dict":
            return {"scores": out, "features": x}
        if self.kind == "tuple":
            return out, x
        if self.kind == "model_output":
            return FakeModelOutput(out.sum(), out)
        return out


@pytest.fixture(scope="module")
def three_classes() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(96, 16, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])


@pytest.mark.parametrize(("kind", "output"), [("tuple", None), ("dict", "scores"),
                                              ("model_output", None),
                                              ("dict", lambda out: out["scores"])])
def test_evaluator_reads_the_prediction_of_any_output(kind, output, three_classes) -> None:
    train, val = three_classes
    plain = Wrapped("tensor")
    wrapped = Wrapped(kind)
    wrapped.load_state_dict(plain.state_dict())
    reference = Evaluator(plain, Task("t", train, val)).validate(plain)
    got = Evaluator(wrapped, Task("t", train, val, output=output)).validate(wrapped)
    assert set(got) == {"accuracy", "loss"}  # a classifier reports as it always did
    assert got == pytest.approx(reference)
    with torch.no_grad():
        x, y = val.tensors
        expected = (plain(x).argmax(1) == y).float().mean().item()
    assert got["accuracy"] == pytest.approx(expected)


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 13) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@pytest.mark.parametrize("metric", ["perplexity", "accuracy"])
def test_per_token_metrics_on_a_tiny_language_model(metric) -> None:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 13, (40, 9), generator=g)
    data = TensorDataset(ids[:, :-1], ids[:, 1:])
    task = Task("lm", data, TensorDataset(ids[:8, :-1], ids[:8, 1:]), loss=token_loss,
                metric=metric)
    assert task.example_input(2).dtype == torch.int64  # token ids, not float zeros
    assert torch.equal(task.example_input(2), ids[:2, :-1])
    model = TinyLM()
    got = Evaluator(model, task).validate(model)
    with torch.no_grad():
        logits, targets = model(ids[:8, :-1]), ids[:8, 1:]
    ce = token_loss(logits, targets).item()
    expected = math.exp(ce) if metric == "perplexity" else \
        (logits.argmax(-1) == targets).float().mean().item()
    assert got[metric] == pytest.approx(expected, rel=1e-5)
    assert got["loss"] == pytest.approx(ce, rel=1e-5)


def test_objectives_and_constraints_know_the_metrics() -> None:
    assert parse_objectives(("mse", "flops"))[0] == Objective("mse", "min")
    assert parse_objectives("top5")[0].direction == "max"
    mine = Metric("map", "max", lambda p, t: 0.0)
    assert parse_objectives(("map", "flops"), metric=mine)[0] == Objective("map", "max")
    assert Objective.parse(mine) == Objective("map", "max")
    assert Constraint.parse("top5>=90%").value == pytest.approx(0.9)
    assert Constraint.parse("mse<=0.25").satisfied({"mse": 0.2})
    with pytest.raises(ConstraintError, match="perplexity cannot be given in percent"):
        Constraint.parse("perplexity<=50%")


def test_task_metric_decides_how_labels_are_read() -> None:
    x, y = torch.randn(6, 4), torch.randn(6)
    regression = Task("r", TensorDataset(x, y), TensorDataset(x, y), metric="mse")
    assert regression.num_classes is None and regression.metric.direction == "min"
    with pytest.raises(TaskError, match="integer class indices"):
        Task("c", TensorDataset(x, y), TensorDataset(x, y))
