"""A search survives what its candidates and its store do, through the command line's defaults:
a candidate that kills its process or hangs fails alone even when torch runs many threads, a
time limit stops a hung evaluation, a resume with a trial timeout finishes, NaN fails in every
proxy, and a store deleted mid-search ends the search with its real cause."""

import os
import textwrap
import time

import pytest
import torch
from test_poisoned import poison

from ranksearch.cli import main
from ranksearch.evaluate import Evaluator, ProxySettings
from ranksearch.executors import LocalExecutor
from ranksearch.store import list_studies, read_study

TASK_FILE = textwrap.dedent("""
    import os, time
    import torch
    from torch import nn
    from ranksearch.datasets import load_task
    from ranksearch.evaluate import Evaluator
    from ranksearch.models import build_model
    from ranksearch.surgery import compress

    POINTS = [0.8, 0.5, 0.3, 0.2]
    ACTIONS = {1: "exit", 2: "hang"}  # by index in POINTS


    class Poisoned(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.actions = inner, {}

        def forward(self, x):
            action = self.actions.get(sum(p.numel() for p in self.parameters()))
            if action == "exit":
                os._exit(3)
            if action == "hang":
                time.sleep(3600)
            return self.inner(x)


    def factory():
        torch.manual_seed(0)
        task = load_task("digits")
        model = Poisoned(build_model("digits-cnn"))
        space = Evaluator(model, task).space
        for index, action in ACTIONS.items():
            candidate = compress(model, space.uniform(POINTS[index]))
            model.actions[sum(p.numel() for p in candidate.parameters())] = action
        return model, task
""")


@pytest.fixture
def many_threads():
    """torch on two threads whose OpenMP pool is up, as in a search's process by default."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    a = torch.randn(300, 300)
    (a @ a).sum()
    yield
    torch.set_num_threads(before)


def stored(out):
    url = f"sqlite:///{out / 'ranksearch.db'}"
    [study] = list_studies(url)
    return {r.metrics["params"]: (r.status, r.reason) for r in read_study(url, study)[0]}


def test_cli_defaults_survive_an_exit_and_a_hang_with_many_threads(many_threads, tmp_path, capsys):
    task = tmp_path / "poisoned_task.py"
    task.write_text(TASK_FILE)
    out = tmp_path / "out"
    args = ["search", "--task", f"{task}:factory", "--out", str(out), "--no-progress",
            "--strategy", "uniform", "--option", "points=[0.8,0.5,0.3,0.2]", "--evaluations", "4",
            "--eval-batches", "2"]
    start = time.monotonic()
    assert main([*args, "--time-limit", "4"]) == 0
    took = time.monotonic() - start
    assert "(time limit; 2 evaluated now, 2 stored)" in capsys.readouterr().out
    assert took < 4 + 60  # setup, then a bounded overshoot past the hung third config (not 1 h)
    first = stored(out)
    assert sorted(s for s, _ in first.values()) == ["failed", "ok"]
    assert ("failed", "the evaluation process died with exit code 3") in first.values()
    assert main([*args, "--trial-timeout", "2"]) == 0  # the resume does not hang
    assert "(finished; 2 evaluated now, 4 stored)" in capsys.readouterr().out
    second = stored(out)
    assert {k: second[k] for k in first} == first  # nothing stored before was lost
    reasons = [r for s, r in second.values() if s == "failed"]
    assert len(reasons) == 2 and any("timed out after 2 s" in r for r in reasons)


def test_isolation_is_the_default_whatever_torch_threads(many_threads, digits):
    evaluator = Evaluator(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)),
                          digits)
    assert LocalExecutor().isolated(evaluator)
    assert not LocalExecutor(isolate=False).isolated(evaluator)


@pytest.mark.parametrize("proxy, partial", [(ProxySettings(steps=0), None),
                                            (ProxySettings(steps=3, report_every=3), None),
                                            (ProxySettings(steps=0), 1)])
def test_nan_outputs_fail_in_every_proxy(digits_model, digits, proxy, partial):
    model, configs = poison(digits_model, digits, {0: "nan"})
    evaluator = Evaluator(model, digits, proxy)
    bad = evaluator(configs[0], partial=partial)
    assert bad.status == "failed" and ("non-finite" in bad.reason or "became nan" in bad.reason)
    good = evaluator(configs[1], partial=partial)
    assert good.ok and 0 < good.metrics["accuracy"] <= 1


def test_store_deleted_mid_search_exits_2_naming_it(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    calls = []
    evaluate = Evaluator.__call__

    def deleting(self, *args, **kwargs):  # the file goes away after two evaluations
        calls.append(1)
        if len(calls) == 3:
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(f"{out / 'ranksearch.db'}{suffix}"):
                    os.remove(f"{out / 'ranksearch.db'}{suffix}")
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "__call__", deleting)
    args = ["search", "--task", "digits", "--out", str(out), "--no-progress", "--no-isolate",
            "--evaluations", "5", "--strategy", "random", "--eval-batches", "1"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "was deleted while the search ran" in captured.err
    assert "Traceback" not in captured.err and "stored)" not in captured.out
    assert not (out / "ranksearch.db").exists()
