"""BatchNorm recalibration of candidates: the statistics it sets, what it leaves alone, the
proxy option and its fingerprint, and export of the recalibrated model that was scored."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import search_arguments
from torch import nn

import ranksearch
from ranksearch import cli
from ranksearch.calibration import calibration_inputs, recalibrate_batchnorm
from ranksearch.errors import OptionError, TaskError
from ranksearch.evaluate import Evaluator, ProxySettings
from ranksearch.fingerprint import fingerprint
from ranksearch.models import build_model
from ranksearch.space import RankSpace
from ranksearch.task import Task


class Net(nn.Module):
    """conv → BN → ReLU → dropout → conv → BN → pool → linear → BN1d: two BatchNorms in a
    chain (the second sees the first's train-mode output) and a dropout that must stay off."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.b1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.c2, self.b2 = nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3)
        self.fc, self.b3 = nn.Linear(3, 5), nn.BatchNorm1d(5)
        self.double()
        for bn in (self.b1, self.b2, self.b3):  # trained-looking affine and statistics
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b2(self.c2(self.drop(torch.relu(self.b1(self.c1(x))))))
        return self.b3(self.fc(y.mean((2, 3))))


def batches(n: int = 3, size: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(size, 2, 6, 6, generator=g, dtype=torch.float64) * 2 + 1
            for _ in range(n)]


def by_hand(model: Net, xs: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per BN layer: the average over ``xs`` of the batch mean and the unbiased batch variance
    of its input, each BN normalising by its batch's biased statistics (train mode), no
    dropout."""

    def train_bn(bn: nn.BatchNorm2d | nn.BatchNorm1d, z: torch.Tensor, dims: tuple[int, ...],
                 seen: list) -> torch.Tensor:
        mean, var = z.mean(dims), z.var(dims, unbiased=False)
        seen.append((mean, z.var(dims, unbiased=True)))
        shape = (1, -1) + (1,) * (z.dim() - 2)
        return ((z - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + bn.eps)
                * bn.weight.reshape(shape) + bn.bias.reshape(shape))

    seen: dict[str, list] = {"b1": [], "b2": [], "b3": []}
    with torch.no_grad():
        for x in xs:
            y = torch.relu(train_bn(model.b1, model.c1(x), (0, 2, 3), seen["b1"]))
            y = train_bn(model.b2, model.c2(y), (0, 2, 3), seen["b2"])
            train_bn(model.b3, model.fc(y.mean((2, 3))), (0,), seen["b3"])
    return {k: (torch.stack([m for m, _ in v]).mean(0), torch.stack([s for _, s in v]).mean(0))
            for k, v in seen.items()}


def test_recalibrated_statistics_are_the_average_batch_statistics():
    model, xs = Net().eval(), batches()
    model.b2.momentum = 0.3
    expected = by_hand(model, xs)
    assert recalibrate_batchnorm(model, xs) == 3
    for name, (mean, var) in expected.items():
        bn = model.get_submodule(name)
        assert torch.allclose(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
        assert torch.allclose(bn.running_var, var, rtol=1e-12, atol=1e-12)
        assert int(bn.num_batches_tracked) == len(xs)
    assert (model.b1.momentum, model.b2.momentum) == (0.1, 0.3)  # restored
    assert not any(m.training for m in model.modules())
    model.train()
    recalibrate_batchnorm(model, xs)
    assert all(m.training for m in model.modules())


def test_recalibration_changes_only_the_batchnorm_statistics():
    model, xs = Net().eval(), batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = batches(1, 4)[0]
    with torch.no_grad():
        out_before = model(x)
    recalibrate_batchnorm(model, xs)
    after = model.state_dict()
    stats = ("running_mean", "running_var", "num_batches_tracked")
    for k, v in before.items():
        if k.endswith(stats):
            assert not torch.equal(v, after[k]), k
        else:
            assert torch.equal(v, after[k]), k
    with torch.no_grad():
        out_after = model(x)
    assert not torch.allclose(out_before, out_after)
    fresh = Net().eval()  # the same weights, with the recalibrated statistics put in
    fresh.load_state_dict({k: after[k] if k.endswith(stats) else v for k, v in before.items()})
    with torch.no_grad():
        assert torch.equal(fresh(x), out_after)


def test_no_batches_or_no_batchnorm_leaves_the_model_bit_identical():
    model = Net().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate_batchnorm(model, []) == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    plain = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4)).double()
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    assert recalibrate_batchnorm(plain, batches()) == 0
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in state.items())


# -- the proxy option --------------------------------------------------------------------------
RECAL = ProxySettings(eval_batches=2, bn_recalibrate=2)


def test_proxy_settings_check_describe_and_fingerprint_the_option(digits_model, digits):
    with pytest.raises(OptionError, match=r"^ProxySettings: bn_recalibrate"):
        ProxySettings(bn_recalibrate=-1)
    with pytest.raises(OptionError, match=r"^ProxySettings: bn_recalibrate"):
        ProxySettings(bn_recalibrate=1.5)
    assert RECAL.describe() == "zero-shot, BN recalibrated (2 batches)"
    off = dataclasses.replace(RECAL, bn_recalibrate=0)
    assert "bn_recalibrate" not in off.to_json()  # stores made before the option still match
    # the default recalibrates, so results stored before the option are not reused by it
    assert ProxySettings().bn_recalibrate > 0
    assert ProxySettings().to_json()["bn_recalibrate"] == ProxySettings().bn_recalibrate
    assert RECAL.to_json()["bn_recalibrate"] == 2
    space = RankSpace.discover(digits_model, digits.example_input())
    prints = [fingerprint(digits_model, digits, p, space)
              for p in (off, RECAL, dataclasses.replace(RECAL, bn_recalibrate=3))]
    assert len({p.digest for p in prints}) == 3
    assert any("bn_recalibrate" in d for d in prints[2].differences(prints[1]))


def test_the_evaluator_scores_the_recalibrated_candidate(digits_model, digits):
    space = RankSpace.discover(digits_model, digits.example_input())
    config = space.uniform(0.3)
    scored = Evaluator(digits_model, digits, RECAL, space)(config)
    plain = Evaluator(digits_model, digits, dataclasses.replace(RECAL, bn_recalibrate=0),
                      space)(config)
    by_hand = ranksearch.compress(digits_model, config)
    recalibrate_batchnorm(by_hand, calibration_inputs(digits, 2, RECAL.batch_size, RECAL.seed))
    evaluator = Evaluator(digits_model, digits, dataclasses.replace(RECAL, bn_recalibrate=0),
                          space)
    assert scored.metrics["accuracy"] == evaluator.validate(by_hand.eval())["accuracy"]
    assert scored.metrics["loss"] != plain.metrics["loss"]
    assert scored.proxy == "zero-shot, BN recalibrated (2 batches)"
    assert digits_model.features[1].num_batches_tracked > 2  # the dense model is untouched


def test_without_batchnorm_the_option_changes_nothing_and_needs_no_training_data(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 64, 10)).eval()
    space = RankSpace.discover(model, digits.example_input())
    config = space.uniform(0.4)
    off = Evaluator(model, digits, dataclasses.replace(RECAL, bn_recalibrate=0), space)
    on = Evaluator(model, digits, RECAL, space)
    assert off(config).metrics == on(config).metrics
    x = digits.val.tensors[0][:32]
    with torch.no_grad():
        assert torch.equal(off.build(config)(x), on.build(config)(x))
    bare = Task("bare", train=None, val=digits.val)
    Evaluator(model, bare, RECAL, space)  # nothing to recalibrate, so no data needed
    with pytest.raises(TaskError, match=r"no training data.*bn_recalibrate off"):
        with_bn = build_model("digits-cnn").eval()
        Evaluator(with_bn, bare, RECAL, RankSpace.discover(with_bn, digits.example_input()))


@pytest.mark.parametrize(("steps", "batches"), [(0, 2), (3, 2), (0, 0)])
def test_the_exported_model_is_the_recalibrated_model_that_was_scored(digits_model, digits,
                                                                      tmp_path, steps, batches):
    proxy = dataclasses.replace(RECAL, steps=steps, bn_recalibrate=batches)
    result = ranksearch.search(digits_model, digits, strategy="uniform",
                               strategy_options={"points": [0.3]}, evaluations=1,
                               out=str(tmp_path), proxy=proxy)
    first = result.results[0]
    x = digits.val.tensors[0][:64]
    exported = ranksearch.scored_model(digits_model, digits, out=str(tmp_path),
                                       study=result.study, config=first.config)
    assert exported.metrics == {k: first.metrics[k] for k in exported.metrics}
    by_hand = ranksearch.compress(digits_model, first.config)
    if batches:
        recalibrate_batchnorm(by_hand, calibration_inputs(digits, batches, proxy.batch_size,
                                                          proxy.seed))
    model = result.model(first)  # rebuilt, recalibrated and fine-tuned again
    with torch.no_grad():
        scored = model(x)
        assert torch.equal(exported.model(x), scored)
        if steps == 0:
            assert torch.allclose(by_hand.eval()(x), scored, atol=1e-5)
    bn = next(m for m in exported.model.modules() if isinstance(m, nn.BatchNorm2d))
    dense_bn = digits_model.features[1]
    assert torch.equal(bn.running_mean, dense_bn.running_mean) == (steps == 0 and not batches)


def test_the_cli_passes_bn_recalibrate_to_the_proxy(tmp_path, capsys, monkeypatch, digits_model,
                                                    digits):
    out = str(tmp_path / "out")
    seen = search_arguments(monkeypatch, digits_model, digits)
    assert cli.main(["search", "--out", out, "--no-progress", "--bn-recalibrate", "4"]) == 2
    assert seen["proxy"].bn_recalibrate == 4
    assert cli.main(["search", "--out", out, "--no-progress"]) == 2
    assert seen["proxy"].bn_recalibrate == ProxySettings.bn_recalibrate
    with pytest.raises(SystemExit):
        cli.main(["search", "--out", out, "--bn-recalibrate", "-1"])
    assert "--bn-recalibrate" in capsys.readouterr().err
