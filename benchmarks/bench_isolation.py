"""The cost of isolated evaluations: digits zero-shot, in process and in a forked child.

The same configs are scored in turn in this process and through `IsolatedEvaluator` (one
persistent child, torch on one thread in both), interleaved so that load on the machine hits
both alike; prints the median seconds per evaluation of each, their ratio, the overhead per
evaluation, and the time to fork a new child (as after a crash or a timeout).

Run: ``python benchmarks/bench_isolation.py [--evaluations 60]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ranksearch.datasets import load_task
from ranksearch.evaluate import Evaluator
from ranksearch.executors.isolated import IsolatedEvaluator
from ranksearch.training import pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = load_task("digits")
    model = pretrained("digits-cnn", "digits", task=task, epochs=8)  # the user's cache
    evaluator = Evaluator(model, task)
    configs = [evaluator.space.uniform(0.05 + 0.9 * i / args.evaluations)
               for i in range(args.evaluations)]
    for config in configs:  # the factor cache is filled once, before the fork
        evaluator(config)
    isolated = IsolatedEvaluator(evaluator)
    isolated(configs[0])  # the fork
    here, there = [], []
    for config in configs:
        start = time.perf_counter()
        a = evaluator(config)
        here.append(time.perf_counter() - start)
        start = time.perf_counter()
        b = isolated(config)
        there.append(time.perf_counter() - start)
        assert a.metrics == b.metrics
    forks = []
    for _ in range(5):
        isolated.close(kill=True)
        start = time.perf_counter()
        isolated(configs[0])
        forks.append(time.perf_counter() - start - statistics.median(there))
    isolated.close()
    h, t = statistics.median(here), statistics.median(there)
    print(f"digits zero-shot, {len(configs)} evaluations, median seconds per evaluation")
    print(f"  in process  {h * 1e3:8.2f} ms")
    print(f"  isolated    {t * 1e3:8.2f} ms   ratio {t / h:.3f}   overhead {(t - h) * 1e3:.2f} ms")
    print(f"  a new child {statistics.median(forks) * 1e3:8.2f} ms (median of 5 forks)")


if __name__ == "__main__":
    main()
