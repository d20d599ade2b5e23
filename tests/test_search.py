import os
import signal
import subprocess
import sys
import textwrap
import time

import optuna
import pytest
from helpers import stored

import ranksearch
from ranksearch.config import Config
from ranksearch.constraints import Constraint
from ranksearch.errors import RankSearchError
from ranksearch.evaluate import Evaluator, ProxySettings
from ranksearch.search import ConstraintUnreachableError
from ranksearch.store import StoreError, read_study
from ranksearch.strategy import UnknownStrategyError, available_strategies
from ranksearch.training import evaluate_accuracy

PROXY = ProxySettings(steps=5, batch_size=32, lr=1e-3, report_every=5)


def run(model, task, tmp_path, **kw):
    kw.setdefault("out", str(tmp_path))
    kw.setdefault("proxy", PROXY)
    return ranksearch.search(model, task, **kw)


def test_same_seed_same_results_no_duplicates_constraints_met(digits_model, digits, tmp_path):
    kw = dict(strategy="random", constraints=["flops<=0.5"], evaluations=8, seed=3)
    a = run(digits_model, digits, tmp_path / "a", **kw)
    b = run(digits_model, digits, tmp_path / "b", **kw)
    assert [r.config for r in a.results] == [r.config for r in b.results]
    assert [r.metrics["accuracy"] for r in a.results] == [r.metrics["accuracy"] for r in b.results]
    keys = [r.config.key for r in a.results]
    assert len(keys) == len(set(keys)) == 8 and a.evaluated == 8
    front = a.front()
    assert front and all(r.metrics["flops_ratio"] <= 0.5 for r in front)
    assert all(r.metrics["flops_ratio"] <= 0.5 for r in a.results)
    other = run(digits_model, digits, tmp_path / "c", **{**kw, "seed": 4})
    assert [r.config for r in other.results] != [r.config for r in a.results]


def test_rerun_resumes_without_repeating(digits_model, digits, tmp_path):
    kw = dict(strategy="uniform", evaluations=4, seed=0)
    first = run(digits_model, digits, tmp_path, **kw)
    assert first.evaluated == 4
    again = run(digits_model, digits, tmp_path, **kw)
    assert again.evaluated == 0 and len(again.results) == 4
    more = run(digits_model, digits, tmp_path, **{**kw, "evaluations": 6})
    assert more.evaluated == 2 and len(more.results) == 6
    assert [r.config for r in more.results[:4]] == [r.config for r in first.results]


def test_store_is_an_optuna_study(digits_model, digits, tmp_path):
    result = run(digits_model, digits, tmp_path, strategy="uniform", evaluations=3)
    study = optuna.load_study(study_name=result.study, storage=result.store_url)
    trials = study.get_trials()
    assert len(trials) == 3
    assert [t.values[0] for t in trials] == [r.metrics["accuracy"] for r in result.results]
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE,
                                optuna.study.StudyDirection.MINIMIZE]
    results, meta = read_study(result.store_url, result.study)
    assert results == result.results and meta["strategy"] == "uniform"


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    import ranksearch
    from ranksearch.datasets import load_task
    from ranksearch.evaluate import ProxySettings
    from ranksearch.training import pretrained

    torch.set_num_threads(1)
    out, ckpt = sys.argv[1], sys.argv[2]
    task = load_task("digits")
    model = pretrained("digits-cnn", "digits", cache_dir=ckpt, task=task, epochs=8)
    proxy = ProxySettings(steps=40, batch_size=32)
    r = ranksearch.search(model, task, strategy="random", evaluations=10, seed=1, out=out,
                          proxy=proxy)
    print("EVALUATED", r.evaluated, len(r.results))
""")




def test_sigkill_mid_search_then_resume(digits_model, tmp_path, tmp_path_factory):
    ckpt = tmp_path_factory.getbasetemp() / "ckpt-kill"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(ckpt)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while stored(out) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = stored(out)
    assert 3 <= killed_at < 10
    done = subprocess.run([sys.executable, str(script), str(out), str(ckpt)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    evaluated, total = map(int, done.stdout.split("EVALUATED")[1].split())
    assert total == 10 and evaluated == 10 - killed_at
    assert stored(out) == 10


PLUGIN = textwrap.dedent("""
    from ranksearch.strategy import Strategy, StopSearch

    class Halves(Strategy):
        name = "halves"
        description = "every layer at half its parameters, then a quarter"

        def setup(self, ctx):
            super().setup(ctx)
            self.todo = [ctx.space.uniform(0.5), ctx.space.uniform(0.25)]
            self.told = []

        def ask(self):
            if not self.todo:
                raise StopSearch
            return [self.todo.pop(0)]

        def tell(self, results):
            self.told.extend(results)
""")


def test_third_party_strategy_through_entry_point(digits_model, digits, tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "halves_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "halves_plugin.py").write_text(PLUGIN)
    (site / "halves_plugin-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: halves-plugin\nVersion: 0.1\n")
    (site / "halves_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[ranksearch.strategies]\nhalves = halves_plugin:Halves\n")
    monkeypatch.syspath_prepend(str(site))
    assert "halves" in available_strategies()
    assert {"uniform", "proportional", "random"} <= set(available_strategies())
    result = run(digits_model, digits, tmp_path / "out", strategy="halves", evaluations=5)
    assert result.stopped == "strategy finished"
    space = result.space
    assert [r.config for r in result.results] == [space.uniform(0.5), space.uniform(0.25)]


def test_failed_candidate_does_not_stop_the_search(digits_model, digits, tmp_path):
    bad = ProxySettings(steps=20, lr=1e6, batch_size=32, optimizer="sgd")
    result = run(digits_model, digits, tmp_path, strategy="uniform", evaluations=3, proxy=bad)
    assert len(result.results) == 3
    assert all(r.status == "failed" for r in result.results)
    assert all("diverged" in r.reason or "nan" in r.reason.lower() for r in result.results)
    assert result.front() == [] and result.best() is None


def test_evaluator_reports_and_prunes(digits_model, digits):
    evaluator = Evaluator(digits_model, digits, ProxySettings(steps=20, report_every=5))
    config = evaluator.space.uniform(0.3)
    seen = []
    result = evaluator(config, report=lambda step, acc: seen.append((step, acc)) or step < 10)
    assert [s for s, _ in seen] == [5, 10]
    assert result.status == "pruned" and result.metrics["accuracy"] == seen[-1][1]
    full = evaluator(config)
    assert full.ok and full.metrics["params"] < evaluator.costs.metrics(Config())["params"]
    zero = Evaluator(digits_model, digits)(evaluator.space.full())
    dense_acc = evaluate_accuracy(digits_model, digits.val)
    assert zero.metrics["accuracy"] == pytest.approx(dense_acc, abs=1e-9)


def test_distillation_changes_training(digits_model, digits):
    space = Evaluator(digits_model, digits).space
    cfg = space.uniform(0.2)
    plain = Evaluator(digits_model, digits, ProxySettings(steps=10), space=space)(cfg)
    kd = Evaluator(digits_model, digits, ProxySettings(steps=10, distill=0.7), space=space)(cfg)
    assert plain.ok and kd.ok and plain.metrics["loss"] != kd.metrics["loss"]


def test_bad_input(digits_model, digits, tmp_path):
    with pytest.raises(UnknownStrategyError, match="available"):
        run(digits_model, digits, tmp_path, strategy="nope")
    with pytest.raises(RankSearchError, match="flops"):
        run(digits_model, digits, tmp_path, constraints=["flops<=<0.5"])
    with pytest.raises(ConstraintUnreachableError, match="cheapest"):
        run(digits_model, digits, tmp_path, constraints=["params<=0.001"])
    with pytest.raises(StoreError, match="cannot open"):
        run(digits_model, digits, tmp_path, store="postgresql://nobody@127.0.0.1:1/none")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot create the output folder"):
        run(digits_model, digits, blocker / "out")
    with pytest.raises(StoreError, match="does not exist"):
        run(digits_model, digits, tmp_path, store=f"sqlite:///{tmp_path}/missing/x.db")
    assert list(tmp_path.glob("**/*.db")) == []
    assert not Constraint.parse("params<=2e6").relative


def test_unwritable_output_folder(digits_model, digits, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user can write anywhere (root)")
        with pytest.raises(StoreError, match=r"cannot create|not writable"):
            run(digits_model, digits, locked / "out")
        assert not (locked / "out").exists()
    finally:
        locked.chmod(0o700)


def test_other_searches_in_the_store_are_reused(digits_model, digits, tmp_path):
    first = run(digits_model, digits, tmp_path, strategy="uniform", evaluations=4,
                strategy_options={"points": [0.9, 0.6, 0.3, 0.2]})
    assert first.evaluated == 4
    # another search (another study) in the same store asks two of the same configs
    second = run(digits_model, digits, tmp_path, strategy="uniform", evaluations=3,
                 strategy_options={"points": [0.6, 0.3, 0.45]}, share_results=True)
    assert second.study != first.study
    assert second.evaluated == 1 and len(second.results) == 3
    reused = {r.config.key: r for r in first.results}
    assert sum(r.config.key in reused and r == reused[r.config.key]
               for r in second.results) == 2
    # a different proxy is a different measurement: nothing is reused
    third = run(digits_model, digits, tmp_path, strategy="uniform", evaluations=2,
                strategy_options={"points": [0.6, 0.3]}, proxy=ProxySettings(steps=0),
                share_results=True)
    assert third.evaluated == 2
    # without share_results, another study never copies results in
    alone = run(digits_model, digits, tmp_path, strategy="uniform", evaluations=2,
                strategy_options={"points": [0.6, 0.3, 0.1]})
    assert alone.evaluated == 2


def test_latency_constraint_prices_candidates_from_a_table(digits_model, digits, tmp_path):
    proxy = ProxySettings(steps=0, latency_repeats=3)
    result = run(digits_model, digits, tmp_path, strategy="uniform", evaluations=3,
                 constraints=["latency<=5x"], proxy=proxy)
    table = result.costs.latency_table
    assert table is not None and table.measured > 0 and len(result.results) == 3
    for r in result.results:  # priced from the table, not timed per candidate
        assert r.metrics["latency"] == table.price(r.config) > 0
        assert r.metrics["latency_ratio"] == r.metrics["latency"] / table.dense
    assert all(r.metrics["latency_ratio"] <= 5 for r in result.front())
    for r in result.front():  # and each front point timed end to end
        assert r.metrics["latency_measured"] > 0 and r.metrics["latency_measured_ratio"] > 0
    # a budget below the fastest config is refused before anything is evaluated
    with pytest.raises(ConstraintUnreachableError, match=r"latency<=1e-09s: the cheapest"):
        run(digits_model, digits, tmp_path / "b", strategy="uniform", evaluations=2,
            constraints=["latency<=1e-9s"], proxy=proxy)


def test_context_history_holds_every_told_result(digits_model, digits, tmp_path):
    from ranksearch.strategy import Strategy

    class Recorder(Strategy):
        name = "recorder"

        def setup(self, ctx):
            super().setup(ctx)
            self.told = []
            self.todo = [ctx.space.uniform(f) for f in (0.8, 0.5, 0.8, 0.3)]

        def ask(self):
            if not self.todo:
                raise ranksearch.StopSearch
            return [self.todo.pop(0)]

        def tell(self, results):
            self.told.extend(results)

    strategy = Recorder()
    result = run(digits_model, digits, tmp_path, strategy=strategy, evaluations=5)
    assert list(strategy.ctx.history) == strategy.told
    assert len(strategy.told) == 4 and result.evaluated == 3  # the repeat came from the store
