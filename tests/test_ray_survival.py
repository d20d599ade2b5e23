"""On Ray, a poisoned candidate fails with the same status and reason as in a local search."""

import pytest
from test_poisoned import POINTS, poison, run

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # a Ray cluster's start


def test_ray_and_local_agree_on_poisoned_candidates(digits_model, digits, tmp_path):
    ray = pytest.importorskip("ray")
    from ranksearch.executors.ray import RayExecutor

    model, configs = poison(digits_model, digits, {0: "keyerror", 1: "exit", 3: "nan"})
    local = run(model, digits, tmp_path / "local")
    executor = RayExecutor(max_concurrent=2, early_stop="none", num_cpus=2,
                           object_store_memory=150 * 2**20)
    try:
        remote = run(model, digits, tmp_path / "ray", executor=executor)
    finally:
        ray.shutdown()
    assert remote.stopped == local.stopped == "finished"

    def outcome(result):
        return {r.config: (r.status, r.reason) for r in result.results}

    assert len(outcome(remote)) == len(POINTS)
    assert outcome(remote) == outcome(local)
    assert outcome(remote)[configs[1]] == ("failed",
                                           "the evaluation process died with exit code 3")
    assert outcome(remote)[configs[2]] == ("ok", None)
