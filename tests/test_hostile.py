"""Hostile or shared stores and interrupted searches: study names never write outside --out,
export runs no code a store names, the local Ray cluster listens on loopback, and an
interrupted search exits 130."""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import optuna
import pytest

from ranksearch.cli import main
from ranksearch.evaluate import Evaluator
from ranksearch.report import output_file, safe_stem
from ranksearch.store import list_studies

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

QUICK = ["--no-progress", "--evaluations", "2", "--strategy", "uniform"]
NAME = "my study: *1*"  # a study name that is no plain file name


def files_under(root: Path, but: Path | None = None) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and (but is None or but not in p.parents)}


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> Path:
    """An output folder, two levels down a scratch folder, holding one small digits search
    called `NAME`."""
    out = tmp_path_factory.mktemp("hostile") / "a" / "b" / "out"
    assert main(["search", "--task", "digits", "--out", str(out), "--study", NAME, *QUICK]) == 0
    return out


def copy_study(out: Path, name: str) -> None:
    """Copy the search in ``out``'s store to a study called ``name``, as a hostile or
    careless store holds it."""
    url = f"sqlite:///{out / 'ranksearch.db'}"
    optuna.copy_study(from_study_name=NAME, from_storage=url, to_storage=url,
                      to_study_name=name)


# -- study names in paths ----------------------------------------------------------------------
def test_safe_stem_keeps_plain_names_and_confines_the_rest(tmp_path):
    assert safe_stem("digits-uniform-1a2b3c4d") == "digits-uniform-1a2b3c4d"
    for name in ("../../escaped-study", "/etc/passwd", "..", ".", "a/b", "a\\b", "x\0y", "",
                 "é" * 300, ".hidden"):
        stem = safe_stem(name)
        assert stem and len(stem) <= 89 and not stem.startswith(".")
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in stem)
        assert ".." not in stem
        assert output_file(tmp_path, f"{stem}.csv").parent == tmp_path
    assert safe_stem("a/b") != safe_stem("a\\b")  # the hash tells apart names that map alike
    assert safe_stem("../../escaped-study").startswith("____escaped-study-")
    for bad in ("../x.csv", "/tmp/x.csv", "a/b.csv", "..", "", "x\0.csv"):
        with pytest.raises(Exception, match="not a plain file name"):
            output_file(tmp_path, bad)


def test_search_refuses_a_traversing_study_name(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["search", "--task", "digits", "--out", str(out), "--study",
              "../../escaped-study", *QUICK])
    assert exit_.value.code == 2
    assert "is not a study name" in capsys.readouterr().err
    assert files_under(tmp_path) == set()


def test_search_names_files_after_a_sanitised_study_name(searched):
    stem = safe_stem(NAME)
    assert stem.startswith("my_study_1_-")
    names = {p.name for p in searched.iterdir()}
    assert {f"{stem}.csv", f"{stem}.json"} <= names
    assert any(n.startswith(f"{stem}-front_") and n.endswith(".png") for n in names)
    assert NAME in list_studies(f"sqlite:///{searched / 'ranksearch.db'}")  # the store keeps it


def test_report_of_a_hostile_store_writes_only_inside_out(searched, tmp_path, capsys):
    """Study names read from a store, traversing or absolute, are sanitised."""
    root = searched.parents[2]
    absolute = tmp_path / "elsewhere" / "absolute-study"
    names = ["../../escaped-study", "../escaped-study", str(absolute), ".."]
    for name in names:
        copy_study(searched, name)
    before = files_under(root, but=searched)
    assert main(["report", "--out", str(searched)]) == 0
    printed = capsys.readouterr().out
    assert f"== {absolute}" in printed  # still shown under its own name
    assert files_under(root, but=searched) == before == set()
    assert not list(tmp_path.rglob("*"))
    written = {p.name for p in searched.iterdir()}
    for name in names:
        assert {f"{safe_stem(name)}.csv", f"{safe_stem(name)}.json"} <= written
    # one study asked for by its hostile name
    assert main(["report", "--out", str(searched), "--study", "../../escaped-study"]) == 0
    assert files_under(root, but=searched) == set()


# -- export runs only code the user names ------------------------------------------------------
TASK_FILE = '''
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ranksearch.task import Task
from ranksearch.training import train_baseline

Path(__file__).with_name("imported").write_text("the task file ran")


def factory():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(240, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    task = Task("marker", train=TensorDataset(x[:180], y[:180]),
                val=TensorDataset(x[180:], y[180:]))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    train_baseline(model, task, epochs=3, lr=1e-2, batch_size=32)
    return model, task
'''


def test_export_does_not_run_a_task_file_the_store_names(tmp_path, capsys):
    code = tmp_path / "code"
    code.mkdir()
    (code / "marker_task.py").write_text(textwrap.dedent(TASK_FILE))
    spec = f"{code / 'marker_task.py'}:factory"
    marker = code / "imported"
    out = tmp_path / "out"
    assert main(["search", "--task", spec, "--out", str(out), *QUICK]) == 0
    assert marker.exists()  # the search ran the file it was given
    marker.unlink()
    capsys.readouterr()
    assert main(["export", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "export runs no code named by a store" in err and f"--task '{spec}'" in err
    assert not marker.exists() and not (out / "model.pt").exists()
    assert main(["export", "--out", str(out), "--task", "digits", "--no-progress"]) == 2
    assert "must be a task file" in capsys.readouterr().err
    assert not marker.exists()
    # named on the command line, it runs, and the fingerprint checks it is the same task
    assert main(["export", "--out", str(out), "--task", spec, "--no-progress"]) == 0
    assert marker.exists() and (out / "model.pt").is_file()


def test_export_of_a_built_in_task_refuses_another_task(searched, capsys):
    assert main(["export", "--out", str(searched), "--study", NAME,
                 "--task", "fashion-mnist", "--no-progress"]) == 2
    assert "searched the built-in task 'digits', not 'fashion-mnist'" in capsys.readouterr().err


# -- exit status of an interrupted search ------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_search_exits_130_and_says_how_to_resume(tmp_path, capsys, monkeypatch,
                                                             signum):
    calls = []
    evaluate = Evaluator.__call__

    def signalled(self, *args, **kwargs):  # the signal comes during the second evaluation
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signum)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "__call__", signalled)
    out = tmp_path / "out"
    args = ["search", "--task", "digits", "--out", str(out), "--no-progress", "--no-isolate",
            "--evaluations", "3", "--strategy", "random"]
    assert main(args) == 130
    captured = capsys.readouterr()
    assert "(interrupted; 1 evaluated now, 1 stored)" in captured.out
    assert "interrupted: run the same command again to resume" in captured.err
    assert list(out.glob("digits-random-*.csv"))  # the summary of what is stored is written
    monkeypatch.setattr(Evaluator, "__call__", evaluate)
    assert main(args) == 0  # the same command resumes and finishes
    assert "(finished; 2 evaluated now, 3 stored)" in capsys.readouterr().out


# -- the local Ray cluster listens on loopback -------------------------------------------------
def test_local_ray_cluster_binds_to_loopback_unless_asked(monkeypatch, tmp_path):
    ray = pytest.importorskip("ray")
    from ray._private import ray_constants

    from ranksearch.errors import RankSearchError
    from ranksearch.executors.ray import RayExecutor, cluster

    seen = []

    def fake_init(**kwargs):  # records what the cluster would be started with
        seen.append((kwargs, ray_constants.ENABLE_RAY_CLUSTER))

    monkeypatch.setattr(ray, "init", fake_init)
    before = ray_constants.ENABLE_RAY_CLUSTER
    cluster.start_cluster(1, 100 * 2**20, str(tmp_path))
    kwargs, multi_node = seen[-1]
    # loopback, and not turned into the machine's network address by Ray
    assert kwargs["_node_ip_address"] == "127.0.0.1" and multi_node is False
    assert ray_constants.ENABLE_RAY_CLUSTER is before
    cluster.start_cluster(1, 100 * 2**20, str(tmp_path), host="192.0.2.7")
    kwargs, multi_node = seen[-1]
    assert kwargs["_node_ip_address"] == "192.0.2.7" and multi_node is before
    executor = RayExecutor(num_cpus=1, host="192.0.2.7", temp_dir=str(tmp_path))
    assert executor.host == "192.0.2.7"
    for bad in ("0.0.0.0", "::", "my-laptop", ""):
        with pytest.raises(RankSearchError, match="IP address of this machine"):
            RayExecutor(host=bad)
    with pytest.raises(RankSearchError, match="joined cluster has its own"):
        RayExecutor(address="10.0.0.1:6379", host="127.0.0.1")


def test_ray_host_option_on_the_command_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(["search", "--out", str(out), "--ray-host", "127.0.0.1"]) == 2
    assert "--ray-host apply to the ray executor" in capsys.readouterr().err
    assert main(["search", "--out", str(out), "--executor", "ray", "--address", "auto",
                 "--ray-host", "127.0.0.1"]) == 2
    assert "drop one" in capsys.readouterr().err
    import ranksearch.cli as cli

    seen = {}

    def fake_search(model, task, **kwargs):
        seen.update(kwargs)
        raise cli.RankSearchError("stopped by the test")

    monkeypatch.setattr(cli, "search", fake_search)
    assert main(["search", "--out", str(out), "--no-progress", "--executor", "ray",
                 "--ray-host", "192.0.2.7", "--trial-timeout", "30", "--isolate"]) == 2
    assert seen["executor_options"] == {"host": "192.0.2.7"}
    assert seen["trial_timeout"] == 30.0 and seen["isolate"] is True
    assert main(["search", "--out", str(out), "--no-progress"]) == 2
    assert seen["trial_timeout"] is None and seen["isolate"] is None
