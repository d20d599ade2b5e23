"""End-to-end searches on models of every kind: a ViT on digits (attention in reach of
``params<=0.5``), a Hugging Face BERT classifier on dict inputs under a latency constraint, a
Hugging Face GPT-2 scored by perplexity, a regression model scored by MSE, and a whole
fine-tuning loop of your own on a DataLoader and an IterableDataset, kept and exported."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import ranksearch
from ranksearch import Task
from ranksearch.constraints import satisfies
from ranksearch.errors import ConstraintUnreachableError
from ranksearch.evaluate import ProxySettings
from ranksearch.export import scored_model
from ranksearch.factorize.attention import FactorizedAttention
from ranksearch.pareto import Objective
from ranksearch.result import Result
from ranksearch.search import SearchResult

transformers = pytest.importorskip("transformers")

E = 32
TINY = {"vocab_size": 64, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}


def better(a: Result, b: Result, objective: Objective) -> bool:
    return (a.metrics[objective.metric] > b.metrics[objective.metric]) if \
        objective.direction == "max" else a.metrics[objective.metric] < b.metrics[objective.metric]


def dominates(a: Result, b: Result, objectives: tuple[Objective, ...]) -> bool:
    """``a`` is at least as good as ``b`` in every objective and better in one."""
    return (not any(better(b, a, o) for o in objectives)
            and any(better(a, b, o) for o in objectives))


def check_front_and_best(sr: SearchResult, metric: Objective) -> list[Result]:
    """The front is the non-dominated feasible results in the objectives' directions, and
    ``best()`` is the best feasible value of the task's metric, both recomputed here."""
    assert sr.metric == metric and sr.objectives[0] == metric
    feasible = [r for r in sr.results if r.ok and satisfies(r.metrics, sr.constraints)]
    front = sr.front()
    assert all(r in feasible for r in front)
    for r in feasible:
        dominated = any(dominates(o, r, sr.objectives) for o in feasible)
        if r in front:
            assert not dominated
        else:  # dominated, or the same point as one listed
            assert dominated or any(all(o.metrics[ob.metric] == r.metrics[ob.metric]
                                        for ob in sr.objectives) for o in front)
    pick = max if metric.direction == "max" else min
    top = sr.best()
    if not feasible:
        assert top is None
        return feasible
    assert top in feasible
    assert top.metrics[metric.metric] == pick(r.metrics[metric.metric] for r in feasible)
    return feasible


# --------------------------------------------------------------------------- ViT on digits


class ViT(nn.Module):
    """Patch embedding (2×2 patches of an 8×8 image), a class token, positions, a 2-layer
    batch-first nn.TransformerEncoder and a head on the class token."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, E, 2, stride=2)
        self.cls = nn.Parameter(torch.zeros(1, 1, E))
        self.pos = nn.Parameter(torch.randn(1, 17, E) * 0.02)
        layer = nn.TransformerEncoderLayer(E, 4, 64, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(E, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        return self.head(self.encoder(x)[:, 0])


@pytest.fixture(scope="module")
def vit(digits) -> nn.Module:
    torch.manual_seed(0)
    model = ViT()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(3):
        for x, y in digits.loader("train", 64, seed=epoch):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def vit_search(vit, digits) -> SearchResult:
    return ranksearch.search(vit, digits, strategy="random", constraints=["params<=0.5"],
                             evaluations=6, store="memory", seed=0,
                             proxy=ProxySettings(steps=3, batch_size=32))


def test_vit_search_reaches_half_the_parameters_through_attention(vit, vit_search, digits):
    sr = vit_search
    x, y = digits.val.tensors
    with torch.no_grad():
        dense = (vit(x).argmax(1) == y).float().mean().item()
    assert sr.meta["dense"]["accuracy"] == pytest.approx(dense)
    feasible = check_front_and_best(sr, Objective("accuracy", "max"))
    assert len(feasible) == 6 and all(r.metrics["params_ratio"] <= 0.5 for r in feasible)
    attention = [n for n in sr.space.names if ".self_attn." in n]
    assert len(attention) == 8  # q, k, v, out of both layers
    top = sr.best()
    assert any(n in top.config for n in attention)
    assert top.metrics["accuracy"] < dense  # half the parameters cost accuracy here
    with pytest.raises(ConstraintUnreachableError):  # without attention, out of reach
        ranksearch.search(vit, digits, constraints=["params<=0.5"], evaluations=1,
                          store="memory", exclude=["*self_attn*"])


def test_the_scored_vit_runs_in_train_and_eval_with_and_without_grad(vit, vit_search, digits):
    sr = vit_search
    x, y = digits.val.tensors
    full = ranksearch.compress(vit, sr.space.full())
    with torch.inference_mode():  # the dense encoder on its fused path, the full-rank one off it
        assert torch.allclose(full(x), vit(x), atol=1e-4)
    top = sr.best()
    model = sr.model(top)
    layers = model.encoder.layers
    assert any(isinstance(layer.self_attn, FactorizedAttention) for layer in layers)
    with torch.no_grad():
        evaluated = model(x)
    assert (evaluated.argmax(1) == y).float().mean().item() == pytest.approx(
        top.metrics["accuracy"])  # it is the scored model
    with torch.inference_mode():
        assert torch.allclose(model(x), evaluated, atol=1e-5)
    graded = model(x[:16])
    assert torch.allclose(graded, evaluated[:16], atol=1e-5)
    model.train()  # dropout is 0: training mode computes the same
    with torch.no_grad():
        assert torch.allclose(model(x[:16]), evaluated[:16], atol=1e-5)
    loss = F.cross_entropy(model(x[:16]), y[:16])
    loss.backward()
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# --------------------------------------------------------------------------- Hugging Face


def token_batches(n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids in 1..63, padded with 0 after a random length, and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, length), generator=g)
    mask = (torch.arange(length) < torch.randint(length // 2, length + 1, (n, 1),
                                                 generator=g)).long()
    return ids * mask, mask


@pytest.fixture(scope="module")
def bert() -> tuple[nn.Module, Task]:
    ids, mask = token_batches(320, 12, seed=0)
    labels = (ids[:, 0] >= 32).long()
    samples = [({"input_ids": ids[i], "attention_mask": mask[i]}, labels[i])
               for i in range(len(ids))]
    task = Task("bert", samples[:256], samples[256:])
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32,
                                     num_labels=2, **TINY)
    model = transformers.BertForSequenceClassification(config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(2):
        for x, y in task.loader("train", 32, seed=epoch):
            opt.zero_grad()
            F.cross_entropy(model(**x).logits, y).backward()
            opt.step()
    return model.eval(), task


def test_bert_on_dict_inputs_under_a_latency_constraint(bert, tmp_path) -> None:
    model, task = bert
    example = task.example_input(2)
    assert set(example) == {"input_ids", "attention_mask"} and example["input_ids"].shape == (
        2, 12)
    assert task.num_classes == 2
    sr = ranksearch.search(model, task, strategy="random", constraints=["latency<=3x"],
                           evaluations=5, out=str(tmp_path), seed=0)
    x = {k: torch.stack([s[0][k] for s in task.val]) for k in example}
    y = torch.stack([s[1] for s in task.val])
    with torch.no_grad():
        dense = (model(**x).logits.argmax(1) == y).float().mean().item()  # the `logits` field
    assert sr.meta["dense"]["accuracy"] == pytest.approx(dense) and dense > 0.9
    ok = [r for r in sr.results if r.ok]
    assert len(ok) == 5
    for r in ok:  # measured on every candidate, against the dense model's latency
        assert r.metrics["latency"] > 0 and r.metrics["latency_ratio"] > 0
        assert satisfies(r.metrics, sr.constraints) == (r.metrics["latency_ratio"] <= 3)
    check_front_and_best(sr, Objective("accuracy", "max"))
    built = sr.model(ok[0])
    with torch.no_grad():
        got = built(**x)
    assert isinstance(got, transformers.modeling_outputs.SequenceClassifierOutput)
    assert (got.logits.argmax(1) == y).float().mean().item() == pytest.approx(
        ok[0].metrics["accuracy"])
    exported = scored_model(model, task, out=str(tmp_path))
    path = exported.write(tmp_path / "bert.pt", example_input=example)
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["input"] == {k: {"shape": ["batch", 12], "dtype": "int64", "batch_dim": 0}
                               for k in ("input_ids", "attention_mask")}
    loaded, config = ranksearch.load(path, transformers.BertForSequenceClassification(
        model.config))
    assert config == exported.config
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**x).logits, exported.model(**x).logits)


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@pytest.fixture(scope="module")
def gpt2() -> tuple[nn.Module, Task]:
    ids = torch.randint(1, 64, (160, 17), generator=torch.Generator().manual_seed(1))
    ids[:, 1::2] = (ids[:, 0:-1:2] * 3) % 64  # every other token follows from the one before
    task = Task("lm", TensorDataset(ids[:128, :-1], ids[:128, 1:]),
                TensorDataset(ids[128:, :-1], ids[128:, 1:]), loss=token_loss,
                metric="perplexity")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, **TINY)
    model = transformers.GPT2LMHeadModel(config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(3):
        for x, y in task.loader("train", 32, seed=epoch):
            opt.zero_grad()
            token_loss(model(x).logits, y).backward()
            opt.step()
    return model.eval(), task


def test_gpt2_by_perplexity_with_its_tied_head_left_dense(gpt2) -> None:
    model, task = gpt2
    sr = ranksearch.search(model, task, strategy="random", constraints=["params<=0.8"],
                           evaluations=6, store="memory", seed=0,
                           proxy=ProxySettings(steps=2, batch_size=32))
    assert "lm_head" not in sr.space.names
    assert "tied to transformer.wte.weight" in sr.space.site("lm_head").reason
    assert set(sr.space.names) == {f"transformer.h.{i}.{m}" for i in range(2) for m in (
        "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    x, y = task.val.tensors
    with torch.no_grad():
        ce = token_loss(model(x).logits, y).item()
    assert sr.meta["dense"]["perplexity"] == pytest.approx(math.exp(ce), rel=1e-5)
    assert ce < math.log(64)  # it learnt something
    feasible = check_front_and_best(sr, Objective("perplexity", "min"))
    assert len(feasible) == 6
    top = sr.best()
    assert top.metrics["perplexity"] < max(r.metrics["perplexity"] for r in feasible)
    assert top.metrics["perplexity"] == pytest.approx(math.exp(top.metrics["loss"]), rel=1e-5)
    scored = sr.model(top)
    assert scored.lm_head.weight is scored.transformer.wte.weight  # still tied
    with torch.no_grad():
        assert math.exp(token_loss(scored(x).logits, y).item()) == pytest.approx(
            top.metrics["perplexity"], rel=1e-5)


# --------------------------------------------------------------------------- regression


def regression() -> tuple[nn.Module, Task]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(192, 12, generator=g)
    y = torch.tanh(x @ torch.randn(12, 4, generator=g)).sum(1, keepdim=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                          nn.Linear(48, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.mse_loss(model(x[:160]), y[:160]).backward()
        opt.step()
    return model.eval(), Task("reg", TensorDataset(x[:160], y[:160]),
                              TensorDataset(x[160:], y[160:]), loss=F.mse_loss, metric="mse")


def test_regression_front_and_best_under_a_budget() -> None:
    model, task = regression()
    sr = ranksearch.search(model, task, strategy="random", constraints=["params<=0.6"],
                           evaluations=8, store="memory", seed=0)
    feasible = check_front_and_best(sr, Objective("mse", "min"))
    assert len(feasible) == 8
    assert sr.best().metrics["mse"] < max(r.metrics["mse"] for r in feasible)
    front = sorted(sr.front(), key=lambda r: r.metrics["flops"])
    mses = [r.metrics["mse"] for r in front]
    assert mses == sorted(mses, reverse=True)  # more flops buy a lower MSE along the front


# --------------------------------------------------------------------------- your own loop


class Stream(IterableDataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y, strict=True))


def test_own_finetune_on_loaders_is_run_kept_and_exported_once(tmp_path) -> None:
    model, reference = regression()
    x, y = reference.train.tensors
    calls: list[int] = []

    def finetune(candidate: nn.Module, steps: int) -> None:
        calls.append(steps)
        opt = torch.optim.SGD(candidate.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        batches = DataLoader(TensorDataset(x, y), batch_size=32)
        for _, (xb, yb) in zip(range(steps), batches, strict=False):
            opt.zero_grad()
            F.mse_loss(candidate(xb), yb).backward()
            opt.step()
            sched.step()

    vx, vy = reference.val.tensors
    task = Task("own", DataLoader(reference.train, batch_size=32), Stream(vx, vy),
                loss=F.mse_loss, metric="mse", finetune=finetune)
    assert torch.equal(task.example_input(3), x[:3])
    sr = ranksearch.search(model, task, strategy="random", evaluations=3, out=str(tmp_path),
                           seed=0, proxy=ProxySettings(steps=4), keep_weights=True,
                           isolate=False)
    ok = [r for r in sr.results if r.ok]
    assert len(ok) == 3 and calls == [4, 4, 4]  # the task's loop, the proxy's step count
    top = sr.best()
    assert top == min(ok, key=lambda r: r.metrics["mse"]) and top.weights is not None
    rebuilt = sr.model(top)
    exported = scored_model(model, task, out=str(tmp_path))
    assert calls == [4, 4, 4]  # the kept weights: no second fine-tuning
    with torch.no_grad():
        for got in (rebuilt, exported.model):
            assert F.mse_loss(got(vx), vy).item() == pytest.approx(top.metrics["mse"],
                                                                    rel=1e-5)
    zero_shot = ranksearch.compress(model, top.config)
    with torch.no_grad():
        assert F.mse_loss(zero_shot(vx), vy).item() != pytest.approx(top.metrics["mse"],
                                                                      rel=1e-4)
