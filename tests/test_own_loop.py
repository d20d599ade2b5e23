"""A regression task scored by MSE end to end, your own training step / fine-tuning /
evaluation run by the proxy, DataLoaders and iterables as data, and kept fine-tuned weights."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import ranksearch
from ranksearch import Task
from ranksearch.errors import RankSearchError, TaskError
from ranksearch.evaluate import Evaluator, ProxySettings
from ranksearch.export import scored_model
from ranksearch.pareto import Objective
from ranksearch.report import front_table


def regression_data(n: int = 160, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    w = torch.randn(12, 4, generator=g)
    return x, torch.tanh(x @ w).sum(1)


def regressor() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 1), nn.Flatten(0))
    x, y = regression_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def reg() -> tuple[nn.Module, Task]:
    x, y = regression_data()
    return regressor(), Task("reg", TensorDataset(x[:128], y[:128]),
                             TensorDataset(x[128:], y[128:]), loss=F.mse_loss, metric="mse")


def test_regression_with_mse_end_to_end(reg, tmp_path) -> None:
    model, task = reg
    sr = ranksearch.search(model, task, strategy="random", evaluations=8, out=str(tmp_path),
                           seed=0)
    assert sr.objectives == (Objective("mse", "min"), Objective("flops", "min"))
    ok = [r for r in sr.results if r.ok]
    assert len(ok) >= 6 and all("mse" in r.metrics and "accuracy" not in r.metrics for r in ok)
    x, y = task.val.tensors
    with torch.no_grad():
        assert sr.meta["dense"]["mse"] == pytest.approx(F.mse_loss(model(x), y).item(), rel=1e-5)
    lowest = min(ok, key=lambda r: r.metrics["mse"])
    assert sr.best() == lowest  # min MSE, not max
    assert sr.best(metric="mse") == lowest and sr.best(metric="max:mse") != lowest
    front = sr.front()
    for r in front:  # nothing with lower-or-equal mse and flops, one strictly lower
        assert not any(o.metrics["mse"] <= r.metrics["mse"] and o.metrics["flops"] <= r.metrics[
            "flops"] and (o.metrics["mse"], o.metrics["flops"]) != (r.metrics["mse"],
                                                                    r.metrics["flops"])
                       for o in ok)
    assert lowest in front
    worse = [r for r in ok if any(o.metrics["mse"] < r.metrics["mse"]
                                  and o.metrics["flops"] < r.metrics["flops"] for o in ok)]
    assert worse and not any(r in front for r in worse)
    table = front_table(sr.results, sr.objectives)
    assert table.splitlines()[1].split()[0] == "mse"
    assert sr.best("mse<=1e-12") is None


class Counter:
    def __init__(self) -> None:
        self.steps = self.evaluations = self.finetunes = 0


def own_task(counter: Counter, val=True, **kw) -> Task:
    x, y = regression_data()

    def train_step(model, batch, optimizer):
        counter.steps += 1
        inputs, targets = batch
        optimizer.zero_grad()
        loss = F.mse_loss(model(inputs), targets)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # what the proxy's loop does not do
        optimizer.step()
        return loss

    def evaluate(model):
        counter.evaluations += 1
        with torch.no_grad():
            pred = model(x[128:])
        return {"mae": (pred - y[128:]).abs().mean().item(), "bias": (pred - y[128:]).mean()}

    return Task("own", TensorDataset(x[:128], y[:128]),
                TensorDataset(x[128:], y[128:]) if val else None, loss=F.mse_loss,
                metric="mae", train_step=train_step, evaluate=evaluate, **kw)


def test_own_train_step_and_evaluate_are_what_the_proxy_runs(reg, tmp_path) -> None:
    counter = Counter()
    task = own_task(counter, val=False)
    model = reg[0]
    sr = ranksearch.search(model, task, strategy="random", evaluations=3, out=str(tmp_path),
                           proxy=ProxySettings(steps=4, batch_size=32), isolate=False)
    candidates = [r for r in sr.results if r.ok]
    assert len(candidates) == 3
    assert counter.steps == 4 * 3  # every fine-tuning step is the task's
    assert counter.evaluations == 3 + 1  # each candidate, and the dense model once
    assert all(set(r.metrics) >= {"mae", "bias"} and "loss" not in r.metrics
               for r in candidates)
    assert sr.best() == min(candidates, key=lambda r: r.metrics["mae"])


def test_own_finetune_replaces_the_loop(reg) -> None:
    calls = []
    x, y = regression_data()

    def finetune(model, steps):
        calls.append(steps)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
        for _ in range(steps):
            opt.zero_grad()
            F.mse_loss(model(x[:128]), y[:128]).backward()
            opt.step()
            sched.step()

    task = Task("ft", TensorDataset(x[:128], y[:128]), TensorDataset(x[128:], y[128:]),
                loss=F.mse_loss, metric="mse", finetune=finetune)
    model = reg[0]
    ev = Evaluator(model, task, ProxySettings(steps=5))
    config = ranksearch.Config({name: ev.space.choices(name)[0] for name in ev.space.names})
    zero_shot = Evaluator(model, task).validate(ev.build(config))["mse"]
    tuned = ev(config)
    assert calls == [5] and tuned.ok
    assert tuned.metrics["mse"] < zero_shot
    with pytest.raises(RankSearchError, match="distill"):
        Evaluator(model, task, ProxySettings(steps=5, distill=0.5))
    with pytest.raises(TaskError, match="not both"):
        Task("x", task.train, task.val, finetune=finetune, train_step=lambda m, b, o: 0.0)


class Stream(IterableDataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y, strict=True))


class Batches:
    """An iterable of ready batches (no length: a list would be a dataset of samples)."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __iter__(self):
        return iter(self.items)


def test_dataloaders_and_iterables_score_as_datasets_do(reg) -> None:
    model, task = reg
    x, y = regression_data()
    settings = ProxySettings(steps=3, batch_size=32, eval_batch_size=16)
    batches = Batches([(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)])
    reference = Evaluator(model, Task("reg", batches, task.val, loss=F.mse_loss, metric="mse"),
                          settings)
    config = ranksearch.Config({n: reference.space.choices(n)[1] for n in reference.space.names})
    expected = reference(config).metrics
    zero_shot = Evaluator(model, task, ProxySettings(eval_batch_size=16))(config).metrics
    for val in [
        DataLoader(task.val, batch_size=16),
        Stream(x[128:], y[128:]),
        Batches([(x[128:144], y[128:144]), (x[144:], y[144:])]),
    ]:
        other = Task("reg", DataLoader(task.train, batch_size=32), val, loss=F.mse_loss,
                     metric="mse")
        assert other.input_shape is None and torch.equal(other.example_input(2), x[:2])
        got = Evaluator(model, other, settings)(config).metrics
        assert got["mse"] == pytest.approx(expected["mse"], rel=1e-5)
        assert got["mse"] != pytest.approx(zero_shot["mse"], rel=1e-3)  # it did train
        got = Evaluator(model, other, ProxySettings(eval_batch_size=16))(config).metrics
        assert got["mse"] == pytest.approx(zero_shot["mse"], rel=1e-5)
    with pytest.raises(TaskError, match="can be read only once"):
        Task("gen", (b for b in [(x, y)]), task.val)
    with pytest.raises(TaskError, match="must be a Dataset of"):
        Task("bad", 3, task.val)
    with pytest.raises(TaskError, match="has no val data"):
        Task("none", task.train)


def test_kept_weights_are_exported_without_fine_tuning_again(reg, tmp_path) -> None:
    counter = Counter()
    task = own_task(counter)
    model = reg[0]
    sr = ranksearch.search(model, task, strategy="random", evaluations=3, out=str(tmp_path),
                           proxy=ProxySettings(steps=3, batch_size=32), keep_weights=True,
                           isolate=False)  # the calls are counted in this process
    top = sr.best()
    assert top is not None and top.weights is not None
    kept = torch.load(top.weights, weights_only=True)
    assert kept["key"] == top.config.key and kept["fingerprint"] == top.fingerprint
    steps = counter.steps
    assert steps == 9
    rebuilt = sr.model(top)
    exported = scored_model(model, task, out=str(tmp_path))
    assert counter.steps == steps  # neither fine-tuned again
    for got in (rebuilt, exported.model):
        state = got.state_dict()
        assert state.keys() == kept["state"].keys()
        assert all(torch.equal(state[k].cpu(), v) for k, v in kept["state"].items())
    assert exported.metrics["mae"] == pytest.approx(top.metrics["mae"], rel=1e-6)
    fresh = sr.evaluator.candidate(top.config)[0]  # fine-tuning again gives the same model
    assert counter.steps == steps + 3
    assert all(torch.allclose(a, b) for a, b in zip(fresh.state_dict().values(),
                                                    kept["state"].values(), strict=True))
    with pytest.raises(RankSearchError, match="keep_weights"):
        ranksearch.search(model, task, evaluations=1, store="memory", keep_weights=True)
    assert np.isfinite(top.metrics["mae"])
