"""Every stored figure comes from the measurement it names; the exported model is the scored one."""

import dataclasses
import json
import subprocess
import sys

import optuna
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import ranksearch
from ranksearch.cli import main
from ranksearch.config import Choice, Config
from ranksearch.cost import CostModel
from ranksearch.evaluate import Evaluator, ProxySettings
from ranksearch.export import scored_model
from ranksearch.fingerprint import fingerprint
from ranksearch.search import ConstraintUnreachableError
from ranksearch.space import RankSpace, SpaceSpec
from ranksearch.store import StoreError, read_study
from ranksearch.surgery import compress

ZERO = ProxySettings(steps=0)
TUNE = ProxySettings(steps=4, batch_size=32)
POINTS = {"points": [0.7, 0.4]}


def run(model, task, out, **kw):
    kw.setdefault("proxy", ZERO)
    kw.setdefault("strategy", "uniform")
    kw.setdefault("strategy_options", POINTS)
    kw.setdefault("evaluations", 2)
    return ranksearch.search(model, task, out=str(out), **kw)


# -- fingerprints -----------------------------------------------------------------------------
CHANGES = {"eval_batches": 1, "seed": 1, "device": "meta", "eval_batch_size": 128,
           "weight_decay": 0.1, "temperature": 2.0, "steps": 3, "lr": 0.5}


def test_every_proxy_setting_weight_data_and_space_option_changes_the_fingerprint(
        digits_model, digits):
    space = RankSpace.discover(digits_model, digits.example_input())
    base = fingerprint(digits_model, digits, ZERO, space)
    assert fingerprint(digits_model, digits, ZERO, space) == base  # deterministic
    for key, value in CHANGES.items():
        other = fingerprint(digits_model, digits, dataclasses.replace(ZERO, **{key: value}), space)
        assert other.digest != base.digest, key
        assert any(key in d for d in other.differences(base)), (key, other.differences(base))
    # no setting is left out: those of latency and calibration whenever they are on
    both = dataclasses.replace(ZERO, latency=True, data_aware=True)
    on = fingerprint(digits_model, digits, both, space).settings["proxy"]
    assert {f.name for f in dataclasses.fields(ProxySettings)} <= set(on)
    off = {f.name for f in dataclasses.fields(ProxySettings)} - set(base.settings["proxy"])
    assert off == {"backend", "latency_batch", "data_aware", "calibration_batches"}
    for key, value in {"backend": "channels_last", "latency_batch": 8,
                       "calibration_batches": 3}.items():
        other = fingerprint(digits_model, digits, dataclasses.replace(both, **{key: value}),
                            space)
        assert other.digest != fingerprint(digits_model, digits, both, space).digest, key
    weights = ranksearch.surgery.clone_module(digits_model)
    with torch.no_grad():
        weights.classifier[3].bias[0] += 1e-6
    moved = fingerprint(weights, digits, ZERO, space)
    assert moved.digest != base.digest and moved.differences(base) == ["the model's weights differ"]
    x, y = digits.train.tensors
    data = dataclasses.replace(digits, train=TensorDataset(x.clone(), y.roll(1)))
    assert fingerprint(digits_model, data, ZERO, space).differences(base) == [
        "the task's data differs"]
    loss = dataclasses.replace(digits, loss=nn.functional.nll_loss)
    assert fingerprint(digits_model, loss, ZERO, space).differences(base) == [
        "the task's loss differ"]
    for spec in (SpaceSpec(exclude=("classifier*",)), SpaceSpec(methods=("svd",)),
                 SpaceSpec(min_params=5000), SpaceSpec(multiple_of=4), SpaceSpec(dearer=True)):
        other = fingerprint(digits_model, digits, ZERO, spec.discover(digits_model,
                                                                      digits.example_input()))
        assert other.digest != base.digest, spec
        assert any("space settings differ" in d for d in other.differences(base)), spec


def test_resuming_a_study_with_another_fingerprint_names_the_difference(
        digits_model, digits, tmp_path):
    first = run(digits_model, digits, tmp_path, study="mine")
    assert first.evaluated == 2
    with pytest.raises(StoreError, match=r"proxy settings differ \(eval_batches None → 1\)"):
        run(digits_model, digits, tmp_path, study="mine",
            proxy=ProxySettings(steps=0, eval_batches=1))
    other = ranksearch.surgery.clone_module(digits_model)
    with torch.no_grad():
        other.features[0].weight.mul_(1.01)
    with pytest.raises(StoreError, match="the model's weights differ"):
        run(other, digits, tmp_path, study="mine")
    with pytest.raises(StoreError, match="space settings differ"):
        run(digits_model, digits, tmp_path, study="mine", exclude=["classifier*"])
    again = run(digits_model, digits, tmp_path, study="mine")
    assert again.evaluated == 0 and len(again.results) == 2


def test_fewer_eval_batches_is_a_new_measurement_from_the_cli(digits_model, tmp_path, capsys):
    args = ["search", "--task", "digits", "--out", str(tmp_path), "--no-progress",
            "--strategy", "uniform", "--option", "points=[0.7,0.4]", "--evaluations", "2"]
    assert main(args) == 0
    assert "2 evaluated now, 2 stored" in capsys.readouterr().out
    assert main([*args, "--eval-batches", "1"]) == 0
    assert "2 evaluated now, 2 stored" in capsys.readouterr().out
    assert main(args) == 0  # the first search again: resumed, nothing new
    assert "0 evaluated now, 2 stored" in capsys.readouterr().out


def test_sharing_between_studies_is_opt_in_and_exact(digits_model, digits, tmp_path):
    run(digits_model, digits, tmp_path, strategy_options={"points": [0.7, 0.4, 0.2]},
        evaluations=3)
    alone = run(digits_model, digits, tmp_path)
    assert alone.evaluated == 2
    shared = run(digits_model, digits, tmp_path, strategy_options={"points": [0.4, 0.2]},
                 share_results=True)
    assert shared.evaluated == 0 and len(shared.results) == 2
    other = run(digits_model, digits, tmp_path, strategy_options={"points": [0.4, 0.2]},
                share_results=True, proxy=ProxySettings(steps=0, eval_batches=1))
    assert other.evaluated == 2


# -- space options ----------------------------------------------------------------------------
def test_cli_space_flags_reach_discovery_and_name_the_study(digits_model, tmp_path, capsys):
    args = ["search", "--task", "digits", "--out", str(tmp_path), "--no-progress",
            "--strategy", "uniform", "--option", "points=[0.5]", "--evaluations", "1"]
    assert main([*args, "--exclude", "classifier*"]) == 0
    url = f"sqlite:///{tmp_path / 'ranksearch.db'}"
    (study,) = ranksearch.store.list_studies(url)
    results, meta = read_study(url, study)
    assert meta["space"]["exclude"] == ["classifier*"]
    assert set(results[0].config) == {"features.0", "features.3", "features.7"}
    assert main([*args, "--methods", "svd"]) == 0  # another space: another study, no error
    assert main([*args, "--include", "features.7", "--min-params", "10"]) == 0
    studies = ranksearch.store.list_studies(url)
    assert len(studies) == 3
    by_space = {json.dumps(read_study(url, s)[1]["space"], sort_keys=True): s for s in studies}
    assert len(by_space) == 3
    for study in studies:
        results, meta = read_study(url, study)
        if meta["space"]["methods"] == ["svd"]:
            assert all(c.method == "svd" for c in results[0].config.values())
        if meta["space"]["include"] == ["features.7"]:
            assert set(results[0].config) == {"features.7"}


def test_search_api_takes_space_options_and_refuses_them_beside_a_made_space(
        digits_model, digits, tmp_path):
    result = run(digits_model, digits, tmp_path, exclude=["features.*"], evaluations=1,
                 strategy_options={"points": [0.5]})
    assert set(result.space.names) == {"classifier.1", "classifier.3"}
    assert set(result.results[0].config) <= {"classifier.1", "classifier.3"}
    space = RankSpace.discover(digits_model, digits.example_input())
    with pytest.raises(ranksearch.errors.ConfigError, match="ignored"):
        run(digits_model, digits, tmp_path, space=space, methods=["svd"])
    spec = run(digits_model, digits, tmp_path / "spec", space=SpaceSpec(methods=("svd",)),
               evaluations=1, strategy_options={"points": [0.5]})
    assert {s.methods for s in spec.space.decomposable} == {("svd",)}


# -- costs match what is built ----------------------------------------------------------------
class TiedLM(nn.Module):
    """A tiny language model whose head shares the embedding's weight."""

    def __init__(self, vocab=40, width=24):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mix(self.embed(ids))))


def built_costs(model, example):
    with FlopCounterMode(display=False) as counter:
        model(example)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2


def test_tied_weights_stay_tied_and_are_priced_as_built():
    model = TiedLM().eval()
    ids = torch.randint(0, 40, (1, 7))
    space = RankSpace.discover(model, ids)
    assert space.names == ("mix",)
    assert "tied to embed.weight" in space.site("head").reason
    costs = CostModel(space)
    for config in (Config(), space.uniform(0.3), Config({"mix": Choice("svd", 2)})):
        built = compress(model, config)
        assert built.head.weight is built.embed.weight
        params, macs = built_costs(built, ids)
        metrics = costs.metrics(config)
        assert (metrics["params"], metrics["macs"]) == (params, macs), config


def test_cost_model_equals_built_module_with_tied_grouped_and_depthwise_layers():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4)
            self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.embed = nn.Embedding(10, 16)
            self.head = nn.Linear(16, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, x):
            h = self.depthwise(self.grouped(x)).mean((2, 3))
            return self.head(h) + self.embed.weight.sum()

    model = Mixed().eval()
    x = torch.randn(1, 8, 6, 6)
    space = RankSpace.discover(model, x, methods=["svd", "tucker2"])
    assert "grouped" in space.names and "head" not in space.names
    costs = CostModel(space)
    configs = [Config()] + [Config({"grouped": c}) for c in space.choices("grouped")[:6]]
    for config in configs:
        built = compress(model, config)
        params, macs = built_costs(built, x)
        metrics = costs.metrics(config)
        assert (metrics["params"], metrics["macs"]) == (params, macs), config


# -- reports ----------------------------------------------------------------------------------
def test_csv_json_and_table_show_the_same_front(digits_model, tmp_path, capsys):
    args = ["search", "--task", "digits", "--out", str(tmp_path), "--no-progress",
            "--strategy", "uniform", "--option", "points=[0.9,0.6,0.4,0.25,0.15]",
            "--evaluations", "5", "--constraint", "flops<=0.5"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["report", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    (csv_path,) = tmp_path.glob("digits-uniform-*.csv")
    doc = json.loads(csv_path.with_suffix(".json").read_text())
    lines = csv_path.read_text().splitlines()
    header = lines[0].split(",")
    flags = [row.rsplit(",", 1)[1] == "True" for row in lines[1:]]
    assert [i for i, f in enumerate(flags) if f] == sorted(doc["front"])
    assert all(doc["results"][i]["metrics"]["flops_ratio"] <= 0.5 for i in doc["front"])
    assert f"Pareto front of accuracy, flops under flops<=0.5x: {len(doc['front'])} configs" \
        in printed
    assert header[-1] == "on_front"
    # a tighter budget on the command line: table, CSV and JSON all use it
    assert main(["report", "--out", str(tmp_path), "--constraint", "flops<=0.3"]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(csv_path.with_suffix(".json").read_text())
    flags = [row.rsplit(",", 1)[1] == "True" for row in csv_path.read_text().splitlines()[1:]]
    assert doc["front"] and [i for i, f in enumerate(flags) if f] == sorted(doc["front"])
    assert all(doc["results"][i]["metrics"]["flops_ratio"] <= 0.3 for i in doc["front"])
    assert any(r["metrics"]["flops_ratio"] > 0.3 for r in doc["results"])
    assert f"under flops<=0.3x: {len(doc['front'])} configs" in printed


# -- failures ---------------------------------------------------------------------------------
class Flaky:
    """A loss that raises in training while ``broken`` is set (a fault outside the config,
    which the check of the dense model before the search does not meet)."""

    broken = True

    def __call__(self, out, y):
        if Flaky.broken and out.requires_grad:
            raise ValueError("the device is not ready")
        return nn.functional.cross_entropy(out, y)


def test_retry_failed_evaluates_stored_failures_again(digits_model, digits, tmp_path):
    task = dataclasses.replace(digits, loss=Flaky())
    first = run(digits_model, task, tmp_path, study="flaky", proxy=TUNE)
    assert [r.status for r in first.results] == ["failed", "failed"]
    Flaky.broken = False
    try:
        replay = run(digits_model, task, tmp_path, study="flaky", proxy=TUNE)
        assert replay.evaluated == 0 and all(r.status == "failed" for r in replay.results)
        retry = run(digits_model, task, tmp_path, study="flaky", retry_failed=True, proxy=TUNE)
        assert retry.evaluated == 2 and all(r.ok for r in retry.results)
        later = run(digits_model, task, tmp_path, study="flaky", proxy=TUNE)
        assert later.evaluated == 0 and [r.metrics["accuracy"] for r in later.results] == [
            r.metrics["accuracy"] for r in retry.results]
    finally:
        Flaky.broken = True


def test_nan_weights_are_refused_before_anything_is_stored(digits_model, digits, tmp_path):
    broken = ranksearch.surgery.clone_module(digits_model)
    with torch.no_grad():
        broken.classifier[3].weight.fill_(float("nan"))
    with pytest.raises(ranksearch.errors.TaskError, match="not finite"):
        run(broken, digits, tmp_path)
    assert ranksearch.store.list_studies(f"sqlite:///{tmp_path / 'ranksearch.db'}") == []
    good = run(digits_model, digits, tmp_path)
    assert good.evaluated == 2 and all(r.ok for r in good.results)


# -- export -----------------------------------------------------------------------------------
def test_export_of_an_api_study_is_the_scored_model(digits_model, digits, tmp_path, capsys):
    result = run(digits_model, digits, tmp_path, proxy=TUNE, constraints=["flops<=0.6"])
    picked = result.best()
    scored = result.model(picked)
    exported = scored_model(digits_model, digits, out=str(tmp_path), study=result.study)
    assert exported.config == picked.config
    assert exported.metrics["accuracy"] == picked.metrics["accuracy"]
    x = torch.stack([digits.val[i][0] for i in range(32)])
    with torch.no_grad():
        assert torch.equal(exported.model(x), scored(x))
    # a fresh evaluator scoring the same config measures the same figure
    again = Evaluator(digits_model, digits, TUNE, result.space)(picked.config)
    assert again.metrics["accuracy"] == picked.metrics["accuracy"]
    path = exported.write(tmp_path / "small.pt")
    base = ranksearch.models.build_model("digits-cnn", in_channels=1, num_classes=10)
    loaded, config = ranksearch.load(path, base)
    with torch.no_grad():
        assert config == picked.config and torch.equal(loaded.eval()(x), scored(x))
    # the command line says how to export a study made in Python
    assert main(["export", "--out", str(tmp_path), "--study", result.study]) == 2
    assert "made through the Python API" in capsys.readouterr().err
    other = ranksearch.surgery.clone_module(digits_model)
    with torch.no_grad():
        other.features[0].weight.mul_(2)
    with pytest.raises(StoreError, match="the model's weights differ"):
        scored_model(other, digits, out=str(tmp_path), study=result.study)


# -- constraints and the space ------------------------------------------------------------------
def test_lower_and_upper_bounds_together(digits_model, digits, tmp_path):
    result = run(digits_model, digits, tmp_path, strategy="random", evaluations=4,
                 strategy_options={}, constraints=["params>=0.2", "params<=0.5"])
    assert all(0.2 <= r.metrics["params_ratio"] <= 0.5 for r in result.front())
    with pytest.raises(ConstraintUnreachableError, match="no room"):
        run(digits_model, digits, tmp_path, constraints=["params>=0.6", "params<=0.5"])
    with pytest.raises(ConstraintUnreachableError, match="dearest"):
        run(digits_model, digits, tmp_path, constraints=["params>=5e6"])


def test_no_proposal_costs_more_than_the_dense_model(digits_model, digits, tmp_path):
    result = run(digits_model, digits, tmp_path, strategy="random", strategy_options={},
                 evaluations=12, seed=1)
    for r in result.results:
        for name, choice in r.config.items():
            site = result.space.site(name)
            fac = ranksearch.factorize.get(choice.method)
            dense = ranksearch.factorize.dense_stage(site)
            assert fac.params(site, choice.rank) < dense.params or \
                fac.macs(site, choice.rank) < dense.macs, (name, choice)
    # fc on 64 x 32 inputs: svd:32 costs 3,072 weights against 2,048 dense: not offered
    space = RankSpace.discover(nn.Sequential(nn.Linear(32, 64)), torch.zeros(1, 32))
    assert max(space.ranks("0", "svd")) < 32 * 64 / (32 + 64)
    dearer = RankSpace.discover(nn.Sequential(nn.Linear(32, 64)), torch.zeros(1, 32),
                                dearer=True)
    assert max(dearer.ranks("0", "svd")) == 32


def test_full_means_exact(digits_model, digits):
    x = torch.stack([digits.val[i][0] for i in range(16)])
    for methods in (None, ["cp3", "svd"], ["cp4_tpm", "svd"]):
        space = RankSpace.discover(digits_model, digits.example_input(), methods=methods)
        full = space.full()
        model = compress(digits_model, full).eval()
        with torch.no_grad():
            want, got = digits_model(x), model(x)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), methods
        assert all(ranksearch.factorize.get(c.method).exact_at_max for c in full.values())


# -- plugins and the dashboard ------------------------------------------------------------------
def test_a_users_strategies_module_does_not_shadow_the_builtins(tmp_path):
    (tmp_path / "strategies.py").write_text("MINE = 1\n")
    (tmp_path / "script.py").write_text(
        "import strategies, ranksearch\n"
        "assert strategies.MINE == 1\n"
        "print(len(ranksearch.available_strategies()))\n")
    done = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True,
                          text=True, check=True)
    assert int(done.stdout.strip()) >= 12


def test_dashboard_shows_choices_and_metric_names(digits_model, digits, tmp_path):
    result = run(digits_model, digits, tmp_path, objectives=["accuracy", "params"])
    study = optuna.load_study(study_name=result.study, storage=result.store_url)
    assert study.metric_names == ["accuracy", "params"]
    for trial, stored in zip(study.trials, result.results, strict=True):
        assert trial.params == {n: str(stored.config.get(n)) for n in result.space.names}
        assert any(":" in v for v in trial.params.values())
