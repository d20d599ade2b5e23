import json
import textwrap

import matplotlib.image
import pytest
import torch

import ranksearch
from ranksearch.cli import main
from ranksearch.datasets import load_task
from ranksearch.models import build_model
from ranksearch.store import read_study
from ranksearch.strategy import available_strategies
from ranksearch.training import evaluate_accuracy

PNG = b"\x89PNG\r\n\x1a\n"
# options that a strategy needs on this small model (e.g. a space that offers TT)
STRATEGY_ARGS = {
    "bayes_tt": ["--methods", "svd,tt", "--option", "steps=15", "--option",
                 "strengths=[0.03, 0.1]"],
}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """One output folder for the module, so the digits CNN is trained once."""
    return tmp_path_factory.mktemp("cli")


def search(out, *args):
    return main(["search", "--task", "digits", "--out", str(out), "--no-progress",
                 "--evaluations", "6", *args])


def test_search_report_export_round_trip(out, capsys):
    assert search(out, "--strategy", "uniform", "--steps", "10", "--constraint",
                  "flops<=0.6") == 0
    printed = capsys.readouterr().out
    assert "Pareto front" in printed and "hypervolume" in printed
    assert main(["report", "--out", str(out)]) == 0
    pngs = sorted(out.glob("front_*.png"))
    assert {p.name for p in pngs} == {"front_params.png", "front_flops.png",
                                      "front_energy.png"}
    for png in pngs:
        assert png.read_bytes()[:8] == PNG
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    study = next(out.glob("digits-uniform-*.csv")).stem
    assert main(["export", "--out", str(out), "--study", study, "--pick", "flops<=0.6"]) == 0
    printed = capsys.readouterr().out
    reported = float(printed.split("accuracy of the rebuilt scored model")[1].split()[0])
    summary = json.loads((out / "model.json").read_text())
    assert summary["rebuilt_metrics"]["accuracy"] == pytest.approx(reported, abs=1e-4)
    results, _ = read_study(f"sqlite:///{out / 'ranksearch.db'}", study)
    best = ranksearch.pareto.best(results, ["flops<=0.6"])
    assert summary["config"] == best.config.to_json()
    # the written model is the scored one: the proxy's fine-tuning rebuilt, same accuracy
    assert summary["rebuilt_metrics"]["accuracy"] == best.metrics["accuracy"]
    assert summary["rebuilt_metrics"]["loss"] == pytest.approx(best.metrics["loss"], rel=1e-6)
    assert summary["search_metrics"]["flops_ratio"] <= 0.6
    task = load_task("digits")
    base = build_model("digits-cnn", in_channels=1, num_classes=10)
    model, config = ranksearch.load(out / "model.pt", base)
    assert config == best.config
    assert evaluate_accuracy(model, task.val) == pytest.approx(reported, abs=1e-4)
    # the iterative schedule fine-tunes: the written model is more accurate than the raw one
    assert main(["export", "--out", str(out), "--study", study, "--pick", "flops<=0.6",
                 "--finetune-epochs", "1", "--schedule", "iterative",
                 "--output", str(out / "tuned.pt")]) == 0
    tuned = json.loads((out / "tuned.json").read_text())
    assert tuned["schedule"] == "iterative" and tuned["config"] == best.config.to_json()
    assert tuned["finetuned_val_accuracy"] >= reported - 0.02
    model, _ = ranksearch.load(out / "tuned.pt", base)
    assert evaluate_accuracy(model, task.val) == pytest.approx(tuned["finetuned_val_accuracy"],
                                                               abs=1e-4)


@pytest.mark.parametrize("name", sorted(available_strategies()))
def test_every_strategy_writes_a_front(out, capsys, name):
    assert search(out, "--strategy", name, "--steps", "0", "--evaluations", "8",
                  *STRATEGY_ARGS.get(name, [])) == 0
    printed = capsys.readouterr().out
    assert "Pareto front" in printed
    study = printed.split("study ", 1)[1].split()[0]
    assert study.startswith(f"digits-{name}-")
    data = json.loads((out / f"{study}.json").read_text())
    assert len(data["front"]) >= 1 and len(data["results"]) >= 1
    assert (out / f"{study}-front_flops.png").read_bytes()[:8] == PNG


def test_inspect_builtin_and_user_model(tmp_path, capsys):
    assert main(["inspect", "resnet20"]) == 0
    printed = capsys.readouterr().out
    assert "layer1.0.conv1" in printed and "16x16x3x3" in printed
    assert "19 decomposable of 20 layers" in printed or "20 decomposable" in printed
    factory = tmp_path / "mine.py"
    factory.write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from torch.utils.data import TensorDataset
        from ranksearch.task import Task

        def make():
            model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
            data = TensorDataset(torch.randn(6, 3, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
            return model, Task("mine", train=data, val=data)
    """))
    assert main(["inspect", f"{factory}:make", "--methods", "svd"]) == 0
    printed = capsys.readouterr().out
    assert "8x12" in printed and "2 decomposable of 2 layers" in printed
    assert main(["inspect", f"{factory}:missing"]) == 2
    assert "missing" in capsys.readouterr().err


def test_strategies_lists_the_builtins(capsys):
    assert main(["strategies"]) == 0
    printed = capsys.readouterr().out
    for name in ("uniform", "proportional", "random"):
        assert name in printed


def test_bad_input_is_a_clear_error(out, capsys, tmp_path):
    threads = torch.get_num_threads()
    assert search(out, "--strategy", "nope") == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err
    assert search(out, "--constraint", "flops<=") == 2
    assert "constraint" in capsys.readouterr().err.lower()
    assert search(out, "--constraint", "params<=0.0001") == 2
    assert "no configuration of the space meets" in capsys.readouterr().err
    assert main(["search", "--task", f"{tmp_path}/none.py:f", "--out", str(tmp_path)]) == 2
    assert "none.py" in capsys.readouterr().err
    assert search(out, "--store", "postgresql://nobody@127.0.0.1:1/none") == 2
    assert "cannot open the store" in capsys.readouterr().err
    assert search(out, "--address", "auto") == 2
    assert "--executor ray" in capsys.readouterr().err
    assert main(["export", "--out", str(tmp_path / "empty")]) == 2
    assert "no searches" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "model.pt").exists()
    assert torch.get_num_threads() == threads  # failed commands leave torch's threads alone
