import logging

import pytest
import torch
from torch import nn

import ranksearch
from ranksearch import schedules
from ranksearch.config import Choice, Config
from ranksearch.errors import RankSearchError
from ranksearch.schedules import finetune
from ranksearch.space import RankSpace
from ranksearch.surgery import compress
from ranksearch.training import evaluate_accuracy

CONVS = ("features.0", "features.3", "features.7")
LINEARS = ("classifier.1", "classifier.3")


@pytest.fixture(scope="module")
def config():
    """Low ranks everywhere: zero-shot accuracy falls from 0.99 to about 0.13."""
    return Config({
        "features.0": Choice("tucker2", (1, 3)), "features.3": Choice("tucker2", (4, 8)),
        "features.7": Choice("tucker2", (6, 12)), "classifier.1": Choice("svd", 6),
        "classifier.3": Choice("svd", 6),
    })


@pytest.fixture(scope="module")
def trained(digits_model, digits, config):
    """Each schedule run once, with its events."""
    before = {k: v.clone() for k, v in digits_model.state_dict().items()}
    runs = {}
    for schedule in schedules.SCHEDULES:
        events = []
        model = finetune(digits_model, config, digits, schedule=schedule, events=events)
        runs[schedule] = (model, events)
    after = digits_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the input is untouched
    return runs


def test_event_orders(trained):
    one = [("decompose", (*CONVS, *LINEARS)), ("finetune", 1)]
    def each(names):
        return [e for name in names for e in (("decompose", (name,)), ("finetune", 1))]

    iterative = each((*CONVS, *LINEARS))
    hybrid = each(CONVS)
    hybrid += [("decompose", LINEARS), ("finetune", 1)]
    assert trained["one-shot"][1] == one
    assert trained["iterative"][1] == iterative
    assert trained["hybrid"][1] == hybrid


def test_same_architecture_as_one_shot_and_the_config(trained, digits_model, config, tmp_path):
    target = compress(digits_model, config, decompose=False)

    def shape(model):
        return ([(n, type(m)) for n, m in model.named_modules()],
                {k: tuple(v.shape) for k, v in model.state_dict().items()})

    assert shape(trained["iterative"][0]) == shape(trained["one-shot"][0]) == shape(target)
    assert shape(trained["hybrid"][0]) == shape(target)
    # the saved model reloads from the config alone, with the same outputs
    model = trained["iterative"][0]
    ranksearch.save(tmp_path / "it.pt", model, config)
    loaded, saved_config = ranksearch.load(tmp_path / "it.pt", digits_model)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert saved_config == config
    assert torch.equal(loaded.eval()(x), model(x))
    assert not model.training


def test_finetuning_recovers_accuracy(trained, digits_model, digits, config):
    zero_shot = evaluate_accuracy(compress(digits_model, config), digits.val)
    assert zero_shot < 0.3
    for schedule, (model, _) in trained.items():
        assert evaluate_accuracy(model, digits.val) > zero_shot + 0.3, schedule
    iterative = trained["iterative"][0].state_dict()
    one_shot = trained["one-shot"][0].state_dict()
    assert not torch.equal(iterative["features.3.1.weight"], one_shot["features.3.1.weight"])


def test_iterative_decomposes_the_current_weights_and_trains_everything(
    digits_model, digits, config, monkeypatch
):
    """Each layer is decomposed from the model the previous fine-tune returned, and every
    fine-tune trains all parameters of a model with exactly the layers decomposed so far."""
    calls = []
    real_compress, real_train = schedules.compress, schedules.train_baseline

    def spy_compress(model, step, **kw):
        calls.append(("compress", model, dict(step)))
        return real_compress(model, step, **kw)

    def spy_train(model, task, **kw):
        factorized = tuple(n for n in (*CONVS, *LINEARS)
                           if not isinstance(model.get_submodule(n), nn.Conv2d | nn.Linear))
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        calls.append(("train", model, factorized, frozen))
        return real_train(model, task, **kw)

    monkeypatch.setattr(schedules, "compress", spy_compress)
    monkeypatch.setattr(schedules, "train_baseline", spy_train)
    sub = Config({n: config[n] for n in ("features.3", "features.7", "classifier.1")})
    result = finetune(digits_model, sub, digits, schedule="iterative")
    steps = calls[1:]  # calls[0] is the architecture check
    assert [c[0] for c in steps] == ["compress", "train"] * 3
    assert [c[2] for c in steps[1::2]] == [("features.3",), ("features.3", "features.7"),
                                           ("features.3", "features.7", "classifier.1")]
    assert all(c[3] == [] for c in steps[1::2])
    assert steps[0][1] is digits_model
    for (_, trained_model, *_), (_, decomposed_from, step) in zip(steps[1::2], steps[2::2],
                                                                  strict=False):
        assert decomposed_from is trained_model  # the fine-tuned model, not the original
        (name,) = step
        original = digits_model.get_submodule(name).weight
        assert not torch.equal(decomposed_from.get_submodule(name).weight, original)
    assert steps[-1][1] is result


def test_cache_gives_the_first_decomposition(digits_model, digits):
    space = RankSpace.discover(digits_model, digits.example_input())
    cache = ranksearch.FactorCache(digits_model, space)
    config = space.uniform(0.5)
    finetune(digits_model, config, digits, schedule="hybrid", cache=cache)
    assert set(cache.decompositions) == {("features.0", "tucker2")}


def test_logging_and_empty_config(digits_model, digits, caplog):
    events = []
    with caplog.at_level(logging.INFO, logger="ranksearch.schedules"):
        model = finetune(digits_model, Config(), digits, schedule="iterative", events=events)
    assert events == [("decompose", ()), ("finetune", 1)]
    assert "iterative fine-tuning: finetune 1" in caplog.text
    assert [type(m) for m in model.modules()] == [type(m) for m in digits_model.modules()]
    assert model is not digits_model


def test_bad_input(digits_model, digits, config):
    with pytest.raises(RankSearchError, match=r"unknown fine-tuning schedule 'layerwise'.*"
                                              r"one-shot, iterative, hybrid"):
        finetune(digits_model, config, digits, schedule="layerwise")
    with pytest.raises(RankSearchError, match="epochs"):
        finetune(digits_model, config, digits, epochs=0)
    events = []
    bad = config.with_choices({"features.3": Choice("tucker2", (99, 99))})
    with pytest.raises(RankSearchError, match="exceeds the maximum"):
        finetune(digits_model, bad, digits, schedule="iterative", events=events)
    with pytest.raises(RankSearchError, match="no layer named"):
        finetune(digits_model, Config({"nope": Choice("svd", 2)}), digits)
    assert events == []  # nothing was decomposed or trained before the check
