"""Poisoned candidates: a config whose evaluation raises, kills its process, hangs or gives NaN
is stored as failed with its reason, and the search finishes and resumes; time limits and
signals stop a search with what finished stored."""

import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from helpers import stored
from torch import nn

import ranksearch
from ranksearch.errors import ConfigError
from ranksearch.evaluate import Evaluator
from ranksearch.executors import LocalExecutor
from ranksearch.executors.isolated import IsolatedEvaluator
from ranksearch.surgery import compress

POINTS = [0.8, 0.5, 0.3, 0.2]


class Poisoned(nn.Module):
    """Wraps a model; a candidate with a parameter count in ``actions`` misbehaves when it
    runs: raises KeyError, calls ``os._exit(3)``, hangs, or outputs NaN."""

    def __init__(self, inner, actions=None):
        super().__init__()
        self.inner = inner
        self.actions = dict(actions or {})

    def forward(self, x):
        action = self.actions.get(sum(p.numel() for p in self.parameters()))
        if action == "keyerror":
            raise KeyError("poisoned")
        if action == "exit":
            os._exit(3)
        if action == "hang":
            time.sleep(3600)
        out = self.inner(x)
        return out * math.nan if action == "nan" else out


def poison(model, task, actions):
    """A `Poisoned` model and its configs at ``POINTS``, with ``actions`` by point index."""
    wrapped = Poisoned(model)
    space = Evaluator(wrapped, task).space
    configs = [space.uniform(f) for f in POINTS]
    for index, action in actions.items():
        wrapped.actions[sum(p.numel() for p in compress(wrapped, configs[index]).parameters())] \
            = action
    return wrapped, configs


def run(model, task, out, **kw):
    return ranksearch.search(model, task, strategy="uniform", strategy_options={"points": POINTS},
                             evaluations=len(POINTS), out=str(out), **kw)


def test_keyerror_exit_and_nan_are_failed_results_and_the_search_resumes(digits_model, digits,
                                                                         tmp_path):
    model, configs = poison(digits_model, digits, {0: "keyerror", 1: "exit", 3: "nan"})
    result = run(model, digits, tmp_path)
    assert result.stopped == "finished" and result.evaluated == 4
    got = {r.config: r for r in result.results}
    assert got[configs[0]].status == "failed" and got[configs[0]].reason == "KeyError: 'poisoned'"
    assert got[configs[1]].status == "failed"
    assert got[configs[1]].reason == "the evaluation process died with exit code 3"
    assert got[configs[1]].metrics["params"] > 0  # its costs are stored with the failure
    assert got[configs[2]].ok and 0 < got[configs[2]].metrics["accuracy"] <= 1
    assert got[configs[3]].status == "failed" and "non-finite" in got[configs[3]].reason
    again = run(model, digits, tmp_path)
    assert again.evaluated == 0 and summary(again.results) == summary(result.results)


def summary(results):
    return [(r.config.key, r.status, r.reason, r.metrics.get("accuracy")) for r in results]


def test_in_process_exception_outside_the_evaluator_is_a_failed_result(digits_model, digits):
    evaluator = Evaluator(digits_model, digits)
    configs = [evaluator.space.uniform(f) for f in POINTS]

    def evaluate(config, partial=None):  # a user's wrapper that raises before the evaluator
        if config == configs[1]:
            raise AttributeError("wrapper broke")
        return evaluator(config, partial=partial)

    class Loop:  # the loop's protocol, over the four configs
        def __init__(self):
            self.todo = [ranksearch.executors.Work(c) for c in configs]
            self.done = []
            self.stopped = None
            self.termination = ranksearch.loop.Termination(len(configs))

        def propose(self):
            return self.todo.pop(0) if self.todo else ranksearch.executors.DONE

        def finish(self, result):
            self.done.append(result)

        def interrupt(self):
            self.stopped = "interrupted"

    loop = Loop()
    LocalExecutor(isolate=False).drive(loop, evaluate)
    assert [r.status for r in loop.done] == ["ok", "failed", "ok", "ok"]
    assert loop.done[1].reason == "AttributeError: wrapper broke"
    assert loop.done[0].metrics == evaluator(configs[0]).metrics
    assert loop.done[1].config == configs[1]


def test_a_hang_past_the_trial_timeout_fails_and_the_search_goes_on(digits_model, digits,
                                                                   tmp_path):
    model, configs = poison(digits_model, digits, {1: "hang"})
    start = time.monotonic()
    result = run(model, digits, tmp_path, trial_timeout=2)
    assert time.monotonic() - start < 30
    got = {r.config: r for r in result.results}
    assert result.stopped == "finished" and len(got) == 4
    assert got[configs[1]].status == "failed" and "timed out after 2 s" in got[configs[1]].reason
    assert all(got[c].ok for c in (configs[0], configs[2], configs[3]))
    again = run(model, digits, tmp_path, trial_timeout=2)
    assert again.evaluated == 0 and summary(again.results) == summary(result.results)


def test_time_limit_stops_a_hung_evaluation(digits_model, digits, tmp_path):
    model, configs = poison(digits_model, digits, {1: "hang"})
    start = time.monotonic()
    result = run(model, digits, tmp_path, time_limit=3)
    took = time.monotonic() - start
    assert result.stopped == "time limit"
    assert took < 3 + 10  # setup (space, check, store) plus a bounded overshoot
    assert [r.config for r in result.results] == configs[:1]  # the hung one is not stored
    with pytest.raises(ConfigError, match="isolat"):
        run(model, digits, tmp_path, trial_timeout=1, isolate=False)


SCRIPT = textwrap.dedent("""
    import sys, time, torch
    import ranksearch
    from ranksearch.datasets import load_task
    from test_poisoned import POINTS, poison

    torch.set_num_threads(1)
    out, weights = sys.argv[1], sys.argv[2]
    task = load_task("digits")
    model, configs = poison(torch.load(weights, weights_only=False), task, {2: "hang"})
    r = ranksearch.search(model, task, strategy="uniform", strategy_options={"points": POINTS},
                          evaluations=4, out=out)
    print("STOPPED", r.stopped, len(r.results), flush=True)
""")


def test_sigterm_to_a_search_process_interrupts_and_keeps_results(digits_model, tmp_path):
    ckpt = tmp_path / "model.pt"
    torch.save(digits_model, ckpt)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "out"), str(ckpt)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while stored(tmp_path / "out") < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)  # the third config hangs
    time.sleep(0.5)
    children = _children(proc.pid)
    assert children  # the isolated evaluation's process
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert "STOPPED interrupted 2" in stdout, stderr
    assert all(not os.path.exists(f"/proc/{pid}") for pid in children)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_an_isolated_evaluation_interrupts(digits_model, digits, tmp_path, sig):
    model, configs = poison(digits_model, digits, {2: "hang"})

    def signal_at_the_hang():
        while stored(tmp_path) < 2:
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(os.getpid(), sig)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=signal_at_the_hang, daemon=True).start()
    result = run(model, digits, tmp_path)
    assert result.stopped == "interrupted"
    assert [r.config for r in result.results] == configs[:2]
    assert signal.getsignal(signal.SIGTERM) is before  # the search's handler is gone




def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def test_isolation_after_torch_threads_and_its_default(digits_model, digits):
    evaluator = Evaluator(digits_model, digits)
    config = evaluator.space.uniform(0.4)
    assert LocalExecutor().isolated(evaluator)  # torch on one thread (conftest)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = torch.randn(300, 300)
        (a @ a).sum()  # the parent's OpenMP pool is up: a fork using it would deadlock
        assert LocalExecutor().isolated(evaluator)  # the child runs on one thread
        assert LocalExecutor(isolate=True).isolated(evaluator)
        child = IsolatedEvaluator(evaluator, timeout=30)
        try:
            result = child(config)
        finally:
            child.close()
    finally:
        torch.set_num_threads(before)
    assert result.ok and result.metrics == evaluator(config).metrics
    assert child.started == 1


@pytest.mark.ray
@pytest.mark.slow  # a Ray cluster's start, and a hang to its timeout
def test_ray_exit_and_hang_are_failed_results(digits_model, digits, tmp_path):
    ray = pytest.importorskip("ray")
    from ranksearch.executors.ray import RayExecutor

    model, configs = poison(digits_model, digits, {1: "exit", 2: "hang"})
    executor = RayExecutor(max_concurrent=2, early_stop="none", trial_timeout=8, num_cpus=2,
                           object_store_memory=150 * 2**20)
    try:
        result = run(model, digits, tmp_path, executor=executor)
    finally:
        ray.shutdown()
    got = {r.config: r for r in result.results}
    assert result.stopped == "finished" and len(got) == 4
    assert got[configs[1]].reason == "the evaluation process died with exit code 3"
    assert "timed out after 8 s" in got[configs[2]].reason
    assert got[configs[0]].ok and got[configs[3]].ok


def test_latency_searches_isolate_on_several_threads_too():
    """The latency table is timed in the parent (before the loop, and the front after it),
    so a latency proxy isolates like any other, on any thread count."""
    timed = SimpleNamespace(settings=ranksearch.ProxySettings(latency=True))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert LocalExecutor().isolated(timed) is True
        assert LocalExecutor(isolate=True).isolated(timed) is True
        assert LocalExecutor(isolate=False).isolated(timed) is False
    finally:
        torch.set_num_threads(before)
