"""The command line as a new user meets it in the first hour: flags, numbers, read-only
commands, output folders, strategy options, inspect's weights, progress bars, the per-user
model cache, devices, stored objectives, export formats and the demo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ranksearch
from ranksearch import cli
from ranksearch import training as training_module
from ranksearch.cli import main
from ranksearch.training import (
    _BASELINE_DEFAULTS,
    MODEL_TRAIN_DEFAULTS,
    TRAIN_DEFAULTS,
    checkpoint_dirs,
    default_cache_dir,
    pretrained,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def user_cache(tmp_path_factory):
    """The per-user model cache of these tests: a temporary folder, never the real home."""
    cache = tmp_path_factory.mktemp("user-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANKSEARCH_CACHE", str(cache))
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        yield cache


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> Path:
    """An output folder holding one small search (accuracy against params, params ≤ 0.5)."""
    out = tmp_path_factory.mktemp("searched")
    assert main(["search", "--out", str(out), "--no-progress", "--evaluations", "2",
                 "--steps", "0", "--objective", "accuracy,params",
                 "--constraint", "params<=0.5"]) == 0
    return out


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m ranksearch ARGS`` in a subprocess (in the repository root)."""
    return subprocess.run([sys.executable, "-m", "ranksearch", *args], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=300)


def spy_training(monkeypatch, calls: list[bool], epochs: int | None = None) -> None:
    """Record the ``progress`` of each baseline training (shortened to ``epochs``)."""
    real = training_module.train_baseline

    def spy(model, task, progress=False, **options):
        calls.append(progress)
        if epochs is not None:
            options["epochs"] = epochs
        return real(model, task, progress=progress, **options)

    monkeypatch.setattr(training_module, "train_baseline", spy)


def no_training(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("trained although the weights are cached")

    monkeypatch.setattr(training_module, "train_baseline", refuse)


# -- 1. -v after the subcommand, --version, python -m ranksearch ---------------------------
def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"ranksearch {ranksearch.__version__}"


def test_python_dash_m_with_verbose_after_the_subcommand(searched):
    parser = cli._parser()
    assert parser.parse_args(["search", "-v"]).verbose
    assert parser.parse_args(["-v", "search"]).verbose
    assert parser.parse_args(["search", "--verbose"]).verbose
    assert not parser.parse_args(["search"]).verbose
    # python -m ranksearch, -v after the subcommand: INFO logs appear (the cached digits CNN)
    done = run_cli("inspect", "-v", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "INFO ranksearch.training: loading cached" in done.stderr
    assert "trained on digits" in done.stdout


# -- 2. bad numbers at parse time ----------------------------------------------------------
@pytest.mark.parametrize(("flag", "value", "bound"), [
    ("--time-limit", "-1", "> 0"), ("--time-limit", "0", "> 0"),
    ("--eval-batches", "0", "≥ 1"), ("--evaluations", "0", "≥ 1"), ("--steps", "-1", "≥ 0"),
    ("--batch-size", "0", "≥ 1"), ("--lr", "0", "> 0"), ("--multiple-of", "0", "≥ 1"),
    ("--min-params", "-1", "≥ 0"), ("--distill", "2", "in [0, 1]"),
    ("--evaluations", "ten", "≥ 1"),
])
def test_bad_numbers_are_rejected_at_parse_time(tmp_path, capsys, flag, value, bound):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["search", "--out", str(out), flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and bound in err and value in err
    assert not out.exists()


def test_bad_numbers_of_demo_and_export(tmp_path, capsys):
    for args in (["demo", "--evaluations", "0"], ["export", "--lr", "-1e-3"],
                 ["export", "--finetune-epochs", "-1"]):
        with pytest.raises(SystemExit):
            main([*args, "--out", str(tmp_path / "out")])
        assert f"argument {args[1]}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- 3. read-only commands never write; a bad --out is a clear error --------------------------
@pytest.mark.parametrize("command", ["report", "export"])
def test_read_only_commands_with_a_mistyped_out_write_nothing(tmp_path, capsys, command):
    missing, empty = tmp_path / "typo", tmp_path / "empty"
    empty.mkdir()
    for folder in (missing, empty):
        assert main([command, "--out", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(folder) in err
        assert "ranksearch search" in err and "--out" in err
    assert not missing.exists()
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize("command", ["search", "demo"])
def test_a_bad_out_is_a_clear_error_before_training(tmp_path, capsys, monkeypatch, command):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    cache = tmp_path / "cache"
    monkeypatch.setenv("RANKSEARCH_CACHE", str(cache))
    for out, says in ((a_file, "is a file, not a folder"), (a_file / "sub", "Not a directory"),
                      (Path("/proc/ranksearch-out"), "choose another --out")):
        assert main([command, "--out", str(out), "--evaluations", "1"]) == 2  # no traceback
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and str(out) in err
    assert not cache.exists()  # checked before the reference model was trained or loaded
    assert a_file.read_text() == "not a folder"


def test_the_out_check_leaves_nothing_behind(tmp_path):
    out = tmp_path / "a" / "b"
    assert cli.writable_out(str(out)) == out
    assert not (tmp_path / "a").exists()


# -- 4. strategies list their options --------------------------------------------------------
def test_strategies_list_their_options(capsys):
    assert main(["strategies"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert lines["uniform"].endswith("(options: points=None, count=None, method=None, "
                                     "refine=True)")
    assert "(options: batch=1, dense=True)" in lines["random"]
    for name in ranksearch.available_strategies():
        assert "(options: " in lines[name]


# -- 5. inspect shows trained weights, or says they are not -----------------------------------
def test_inspect_digits_cnn_shows_the_trained_reference_model(capsys, user_cache):
    assert main(["inspect", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("weights: digits-cnn trained on digits")
    assert "UNTRAINED" not in printed
    assert list(user_cache.glob("digits-cnn-digits-*.pt"))
    assert main(["inspect", "--task", "digits", "--no-progress"]) == 0  # the same, explicitly
    assert capsys.readouterr().out == printed


def test_inspect_an_untrained_builtin_says_so(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RANKSEARCH_CACHE", str(tmp_path / "cache"))
    assert main(["inspect", "resnet20"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("weights: UNTRAINED (resnet20 at its random initialization)")
    assert "say nothing about a trained resnet20" in printed
    assert "--task fashion-mnist" in printed and "file.py:factory" in printed
    assert not (tmp_path / "cache").exists()
    assert main(["inspect", "resnet20", "--task", "digits", "--input-shape", "1,8,8"]) == 2
    assert "--input-shape" in capsys.readouterr().err


# -- 6. --no-progress hides the baseline-training bar ---------------------------------------
def test_no_progress_hides_the_training_bar(tmp_path, capsys, monkeypatch):
    calls: list[bool] = []
    spy_training(monkeypatch, calls, epochs=1)
    monkeypatch.setenv("RANKSEARCH_CACHE", str(tmp_path / "first"))
    assert main(["inspect", "--no-progress"]) == 0
    assert calls == [False] and "train digits" not in capsys.readouterr().err
    monkeypatch.setenv("RANKSEARCH_CACHE", str(tmp_path / "second"))
    assert main(["search", "--out", str(tmp_path / "out"), "--no-progress", "--evaluations",
                 "1"]) == 0
    assert calls == [False, False] and "train digits" not in capsys.readouterr().err
    monkeypatch.setenv("RANKSEARCH_CACHE", str(tmp_path / "third"))
    assert main(["inspect"]) == 0
    assert calls == [False, False, True] and "train digits" in capsys.readouterr().err


# -- 7. reference models are cached per user -------------------------------------------------
def test_reference_models_are_cached_per_user_not_per_out(tmp_path, monkeypatch, capsys,
                                                          user_cache):
    assert main(["inspect", "--no-progress"]) == 0  # trained once into the user cache
    no_training(monkeypatch)
    for name in ("one", "two"):
        assert main(["search", "--out", str(tmp_path / name), "--no-progress",
                     "--evaluations", "1"]) == 0
        assert not (tmp_path / name / "checkpoints").exists()
    assert len(list(user_cache.glob("digits-cnn-digits-*.pt"))) == 1


def test_default_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("RANKSEARCH_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("RANKSEARCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "ranksearch" / "checkpoints"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "ranksearch" / "checkpoints"


def test_read_only_checkpoint_folders_are_searched_before_training(tmp_path, monkeypatch,
                                                                   digits, user_cache):
    assert main(["inspect", "--no-progress"]) == 0
    committed = tmp_path / "committed"
    committed.mkdir()
    for f in user_cache.glob("digits-cnn-digits-*.pt"):
        shutil.copy(f, committed / f.name)
    committed.chmod(0o555)
    no_training(monkeypatch)
    cache = tmp_path / "empty-cache"
    model = pretrained(None, "digits", cache_dir=cache, task=digits, search_dirs=[committed])
    assert not model.training and not cache.exists()
    # the checkout's committed benchmark checkpoints are found, under the names the CLI asks
    assert REPO / "benchmarks" / "checkpoints" in checkpoint_dirs()
    for path in (REPO / "benchmarks" / "checkpoints").glob("*-fashion-mnist-*.pt"):
        model_name = path.name.split("-fashion-mnist-")[0]
        options = (_BASELINE_DEFAULTS | TRAIN_DEFAULTS["fashion-mnist"]
                   | MODEL_TRAIN_DEFAULTS[("fashion-mnist", model_name)])
        assert torch.load(path, weights_only=True)["options"] == options


# -- 8. --device and --gpus-per-trial ---------------------------------------------------------
def test_device_goes_to_the_proxy_and_gpus_need_it(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(["search", "--out", str(out), "--executor", "ray", "--gpus-per-trial", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --gpus-per-trial reserves GPUs but the proxy runs on cpu; add --device cuda")
    seen = {}

    def fake_search(model, task, **kwargs):
        seen.update(kwargs)
        raise ranksearch.RankSearchError("stopped by the test")

    monkeypatch.setattr(cli, "search", fake_search)
    assert main(["search", "--out", str(out), "--no-progress"]) == 2
    assert seen["proxy"].device == "cpu"
    assert main(["search", "--out", str(out), "--no-progress", "--device", "cpu:0"]) == 2
    assert seen["proxy"].device == "cpu:0"
    assert not out.exists()


# -- 9. report uses the stored objectives ------------------------------------------------------
def test_report_uses_each_studys_stored_objectives(searched, capsys):
    assert main(["report", "--out", str(searched)]) == 0
    printed = capsys.readouterr().out
    assert "objectives accuracy, params" in printed
    assert "front of accuracy, params" in printed
    assert main(["report", "--out", str(searched), "--objective", "accuracy,flops"]) == 0
    assert "objectives accuracy, flops" in capsys.readouterr().out


# -- 10. export formats and the fine-tuning bar ------------------------------------------------
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_export_writes_a_torchscript_file_that_runs_with_plain_torch(searched, capsys):
    assert main(["export", "--out", str(searched), "--format", "torchscript",
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    path = searched / "model.torchscript.pt"
    assert (f"wrote {path} (torchscript; load it with torch.jit.load('model.torchscript.pt'))"
            in captured.out)
    assert "fine-tune" not in captured.err
    scripted = torch.jit.load(str(path))
    assert scripted(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["study"] and record["config"]


def test_export_shows_the_fine_tuning_bar_unless_no_progress(searched, capsys, tmp_path):
    for hide in (False, True):
        output = tmp_path / f"tuned-{hide}.pt"
        assert main(["export", "--out", str(searched), "--finetune-epochs", "1",
                     "--output", str(output), *(["--no-progress"] if hide else [])]) == 0
        assert ("fine-tune" in capsys.readouterr().err) is not hide
        model, _ = ranksearch.load(output, ranksearch.models.build_model(
            "digits-cnn", in_channels=1, num_classes=10))
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


# -- 11. the demo ---------------------------------------------------------------------------
def test_demo_runs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--evaluations", "3"]) == 0
    printed = capsys.readouterr().out
    assert "Pareto front" in printed and "hypervolume" in printed
    assert (out / "ranksearch.db").is_file() and list(out.glob("digits-pca_energy-*.csv"))
    assert not (out / "checkpoints").exists()
