"""Ray executor throughput: one fine-tuning search run locally, and on Ray with 1 and 2 trials
at a time.

The same search each time: ``--evaluations`` (16) random configurations of the digits CNN,
each fine-tuned ``--steps`` (100) steps, without early stopping (so every run does the same
work), one torch thread per evaluation, each run in a fresh store. Prints the wall time of each
run, the throughput of 2 concurrent trials over 1 (target ≥ 1.6× on 2 free cores), the time to
start a local Ray cluster, and Ray's overhead per trial over the local executor. For scale, it
first measures what the machine allows right now: the throughput of the same evaluations in 2
plain processes at once over 1 (other load on the machine lowers both ratios).

Run on a quiet machine (check ``uptime``): ``python benchmarks/bench_ray.py``.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

import ranksearch
from ranksearch.datasets import load_task
from ranksearch.evaluate import Evaluator, ProxySettings
from ranksearch.executors.ray import RayExecutor
from ranksearch.training import pretrained


def evaluate_in_process(job: tuple[str, int, int]) -> float:
    """Seconds to evaluate ``count`` configs in this (new) process, after one to warm up."""
    cache_dir, steps, count = job
    torch.set_num_threads(1)
    task = load_task("digits")
    model = pretrained("digits-cnn", "digits", cache_dir=cache_dir, task=task, epochs=8)
    evaluator = Evaluator(model, task, ProxySettings(steps=steps, batch_size=32))
    configs = [evaluator.space.uniform(0.9 - 0.8 * i / count) for i in range(count + 1)]
    evaluator(configs[0])
    start = time.perf_counter()
    for config in configs[1:]:
        evaluator(config)
    return time.perf_counter() - start


def machine_parallelism(cache_dir: str, steps: int, count: int) -> float:
    """Throughput of 2 processes evaluating at once over 1 process."""
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        [one] = pool.map(evaluate_in_process, [(cache_dir, steps, count)])
        two = max(pool.map(evaluate_in_process, [(cache_dir, steps, count)] * 2))
    return 2 * one / two


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; the median")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        task = load_task("digits")
        model = pretrained("digits-cnn", "digits", cache_dir=tmp, task=task, epochs=8)
        proxy = ProxySettings(steps=args.steps, batch_size=32, report_every=25)
        runs = itertools.count()

        def timed(executor: Callable[[], str | RayExecutor]) -> float:
            """Median seconds of the search with a new ``executor()`` each run."""
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                result = ranksearch.search(
                    model, task, strategy="random", seed=1, proxy=proxy,
                    evaluations=args.evaluations, executor=executor(),
                    out=f"{tmp}/run{next(runs)}",
                )
                times.append(time.perf_counter() - start)
                assert result.evaluated == args.evaluations, result.stopped
            return statistics.median(times)

        parallel = machine_parallelism(tmp, args.steps, args.evaluations // 2)
        local = timed(lambda: "local")
        session = RayExecutor(num_cpus=2)  # holds one local cluster for both Ray runs
        session.connect()
        try:
            one = timed(lambda: RayExecutor(max_concurrent=1, early_stop="none"))
            two = timed(lambda: RayExecutor(max_concurrent=2, early_stop="none"))
        finally:
            session.close()
    n = args.evaluations
    print(f"{n} evaluations × {args.steps} fine-tuning steps (digits CNN)")
    print(f"machine: 2 processes vs 1   {parallel:7.2f}×  (the most 2 trials can give now)")
    print(f"local executor              {local:7.1f} s   {n / local:5.2f} eval/s")
    print(f"ray, 1 trial at a time      {one:7.1f} s   {n / one:5.2f} eval/s")
    print(f"ray, 2 trials at a time     {two:7.1f} s   {n / two:5.2f} eval/s")
    print(f"throughput 2 vs 1 trials    {one / two:7.2f}×  (target ≥ 1.6×)")
    print(f"ray start-up (local)        {session.startup_seconds:7.1f} s")
    print(f"ray overhead per trial      {(one - local) / n:7.2f} s  (1 at a time, vs local)")


if __name__ == "__main__":
    main()
