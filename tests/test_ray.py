"""The Ray executor: the same results as the local one, ASHA, failures, and two nodes.

Most tests share one local Ray session of 2 CPUs; the two-node test starts its own cluster
(a head and a worker node on this machine) with ``ray start``.
"""

import logging
import os
import signal
import socket
import subprocess
import sys
import time

import optuna
import pytest
from torch import nn

pytest.importorskip("ray.tune")
import ray

import ranksearch
from ranksearch.errors import RankSearchError
from ranksearch.evaluate import Evaluator, ProxySettings
from ranksearch.executors.ray import RayExecutor
from ranksearch.strategy import Proposal, StopSearch, Strategy
from ranksearch.surgery import compress

pytestmark = pytest.mark.ray

FINETUNE = ProxySettings(steps=10, batch_size=32, report_every=5)


@pytest.fixture(scope="module")
def ray_module():
    yield
    ray.shutdown()


@pytest.fixture
def local_ray(ray_module):
    """The module's local Ray session (2 CPUs), started when not running."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 2**20,
                 _temp_dir="/tmp/rs-ray", logging_level=logging.ERROR, log_to_driver=False)


class Fixed(Strategy):
    """Asks ``probes`` first, one probe proposal at a time (as sensitivity does), then the given
    batches in turn, each only once the one before was told; keeps what it is told."""

    name = "fixed"

    def __init__(self, batches, probes=()):
        self.probes = list(probes)
        self.batches = [[Proposal(p, probe=True)] for p in self.probes]
        self.batches += [list(b) for b in batches]
        self.told = []
        self.probed = []
        self._waiting = False

    def ask(self):
        if self._waiting:
            return []
        if not self.batches:
            raise StopSearch
        self._waiting = True
        return self.batches.pop(0)

    def tell(self, results):
        self._waiting = False
        if len(self.probed) < len(self.probes):
            self.probed += results
        else:
            self.told.append(list(results))


class Boom(Exception):
    pass


class Tripwire(nn.Module):
    """Wraps a model; a candidate with a parameter count in ``actions`` raises or kills its
    worker process when it runs (the failures a user's model can cause in a worker)."""

    def __init__(self, inner, actions):
        super().__init__()
        self.inner = inner
        self.actions = actions

    def forward(self, x):
        count = sum(p.numel() for p in self.parameters())
        action = self.actions.get(count)
        if action == "raise":
            raise Boom(f"tripped at {count} parameters")
        if action == "kill":
            os._exit(1)
        return self.inner(x)


def by_key(results):
    return {r.config.key: (r.status, dict(r.metrics), r.proxy) for r in results}


def search(model, task, out, **kw):
    return ranksearch.search(model, task, out=str(out), **kw)


def test_same_results_as_local_and_resumes(local_ray, digits_model, digits, tmp_path):
    kw = dict(strategy="uniform", strategy_options={"points": [0.9, 0.6, 0.4, 0.25, 0.15]},
              evaluations=5, proxy=FINETUNE)
    local = search(digits_model, digits, tmp_path / "local", **kw)
    executor = RayExecutor(max_concurrent=2, early_stop="none")
    remote = search(digits_model, digits, tmp_path / "ray", executor=executor, **kw)
    assert remote.evaluated == 5 and remote.stopped == local.stopped
    assert by_key(remote.results) == by_key(local.results)
    assert len(executor.trials) == 5 and all(t.node for t in executor.trials)
    again = search(digits_model, digits, tmp_path / "ray", executor=executor, **kw)
    assert again.evaluated == 0 and by_key(again.results) == by_key(local.results)
    # map: a batch of evaluations as Ray tasks (what a strategy's ctx.evaluate uses)
    zero_shot = Evaluator(digits_model, digits, space=local.space)
    configs = [local.space.uniform(f) for f in (0.5, 0.3, 0.2)]
    mapped = list(executor.map(zero_shot, configs))
    assert by_key(mapped) == by_key([zero_shot(c) for c in configs])
    assert ray.is_initialized()  # a session the executor did not open stays open


def test_asha_stops_weak_candidates(local_ray, digits_model, digits, tmp_path):
    space = Evaluator(digits_model, digits).space
    configs = [space.uniform(f) for f in (0.9, 0.6, 0.4, 0.25, 0.15, 0.1, 0.06, 0.03)]
    probes = [space.uniform(0.5), space.uniform(0.35)]
    strategy = Fixed([configs], probes)
    executor = RayExecutor(max_concurrent=2, grace_steps=5, reduction_factor=2)
    proxy = ProxySettings(steps=40, batch_size=32, report_every=5)
    result = search(digits_model, digits, tmp_path, strategy=strategy, evaluations=10,
                    proxy=proxy, executor=executor)
    # the probes run as trials too (ASHA may stop them), each before the next ask
    assert [r.config for r in strategy.probed] == probes
    assert all(r.status in ("ok", "pruned") for r in strategy.probed)
    assert [r.config for r in result.results[:2]] == probes  # stored before the trials
    statuses = [r.status for r in result.results[2:]]
    assert len(statuses) == 8 and "pruned" in statuses and "ok" in statuses
    local = Evaluator(digits_model, digits, proxy, space=result.space)
    for r in result.results:
        if r.status == "pruned":
            assert "ASHA" in r.reason
            # the accuracy reported at the step ASHA stopped it, as the local proxy measures it
            step = int(r.reason.split(" at step ")[1].split()[0])
            again = local(r.config, report=lambda s, _acc, stop=step: s < stop)
            assert again.status == "pruned" and r.metrics["accuracy"] == again.metrics["accuracy"]
            assert r.metrics["flops"] > 0 and r.metrics["params"] > 0
    assert result.front() and all(r.ok for r in result.front())
    [told] = strategy.told
    assert [r.config for r in told] == configs
    assert by_key(told) == by_key(result.results[2:])
    study = optuna.load_study(study_name=result.study, storage=result.store_url)
    assert sum(t.state.name == "PRUNED" for t in study.trials) == \
        [r.status for r in result.results].count("pruned")


def test_failures_do_not_end_the_search(local_ray, digits_model, digits, tmp_path):
    model = Tripwire(digits_model, {})
    space = Evaluator(model, digits).space
    configs = [space.uniform(f) for f in (0.8, 0.5, 0.3, 0.2)]
    count = {c: sum(p.numel() for p in compress(model, c).parameters()) for c in configs}
    model.actions.update({count[configs[1]]: "raise", count[configs[2]]: "kill"})
    strategy = Fixed([configs[:2], configs[2:]])
    executor = RayExecutor(max_concurrent=2, max_failures=1)
    result = search(model, digits, tmp_path, strategy=strategy, evaluations=10,
                    executor=executor)
    assert result.stopped == "strategy finished" and result.evaluated == 4
    got = {r.config: r for r in result.results}
    assert got[configs[0]].ok and got[configs[3]].ok
    raised, killed = got[configs[1]], got[configs[2]]
    assert raised.status == killed.status == "failed"
    # an exception is the candidate's own failure (as under the local executor): no retry
    assert raised.reason.startswith("Boom: tripped") and "attempts" not in raised.reason
    # a one-CPU trial runs isolated in the worker: its death is the candidate's failure
    assert "evaluation process died" in killed.reason
    assert raised.metrics["params"] > 0  # the costs are recorded with the failure
    assert [[r.status for r in batch] for batch in strategy.told] == [["ok", "failed"],
                                                                     ["failed", "ok"]]


def test_bad_options():
    for options, message in [
        ({"cpus_per_trial": 0}, "cpus_per_trial"),
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"early_stop": "median"}, "early_stop"),
        ({"grace_steps": 0}, "grace_steps"),
        ({"address": "10.0.0.1:6379", "num_cpus": 2}, "num_cpus"),
        ({"address": "head-node"}, "host:port"),
    ]:
        with pytest.raises(RankSearchError, match=message):
            RayExecutor(**options)
    with pytest.raises(RankSearchError, match="early_stop"):
        ranksearch.executors.get_executor("ray", early_stop="never")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_start(*args):
    """A Ray node of 1 CPU on this machine, held by a blocking `ray start` (SIGTERM stops it)."""
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    return subprocess.Popen(
        [ray_cli, "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1",
         "--object-store-memory=100000000", "--disable-usage-stats", "--temp-dir=/tmp/rs-ray2",
         f"--dashboard-agent-listen-port={free_port()}", *args],
        env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def test_two_nodes_share_one_search(local_ray, digits_model, digits, tmp_path):
    ray.shutdown()  # this test joins a cluster of its own
    with pytest.raises(RankSearchError, match="ray start --head"):
        search(digits_model, digits, tmp_path / "none", evaluations=1,
               executor=RayExecutor(address=f"127.0.0.1:{free_port()}"))
    port = free_port()
    nodes = [ray_start("--head", f"--port={port}", "--include-dashboard=false")]
    try:
        nodes.append(ray_start(f"--address=127.0.0.1:{port}"))
        executor = RayExecutor(address=f"127.0.0.1:{port}", max_concurrent=2, early_stop="none")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                executor.connect()
                if sum(n["Alive"] for n in ray.nodes()) == 2:
                    break
            except RankSearchError:  # the head is not listening yet
                pass
            time.sleep(0.5)
        assert sum(n["Alive"] for n in ray.nodes()) == 2
        result = search(digits_model, digits, tmp_path / "out", strategy="uniform", evaluations=4,
                        proxy=ProxySettings(steps=30, batch_size=32, report_every=10),
                        executor=executor)
        assert result.evaluated == 4 and all(r.ok for r in result.results)
        assert len({t.node for t in executor.trials}) == 2
        assert not ray.is_initialized()  # disconnected from the joined cluster
    finally:
        ray.shutdown()
        for node in nodes:
            node.send_signal(signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()

