"""Search-loop overhead: a 50-evaluation digits search with short fine-tuning proxies.

Reports evaluations per minute and the share of wall time spent outside the evaluator: the
strategy, deduplication, cost checks, committing each result to the SQLite store and the
progress bar (target: under 2%). Start-up (discovering the space, opening the store) is
reported on its own. Run: ``python benchmarks/bench_search.py``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import ranksearch
from ranksearch.datasets import load_task
from ranksearch.training import pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=50)
    parser.add_argument("--steps", type=int, default=200, help="proxy fine-tuning steps")
    parser.add_argument("--strategy", default="random")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = load_task("digits")
    with tempfile.TemporaryDirectory() as out:
        model = pretrained("digits-cnn", "digits", cache_dir=out, task=task)
        evaluator_time = 0.0
        first_call: float | None = None
        original = ranksearch.Evaluator.__call__

        def timed(self, config, report=None):
            nonlocal evaluator_time, first_call
            begin = time.perf_counter()
            first_call = first_call or begin
            try:
                return original(self, config, report)
            finally:
                evaluator_time += time.perf_counter() - begin

        ranksearch.Evaluator.__call__ = timed
        start = time.perf_counter()
        result = ranksearch.search(
            model, task, strategy=args.strategy, constraints=["flops<=0.5"],
            evaluations=args.evaluations, out=out, seed=0,
            proxy=ranksearch.ProxySettings(steps=args.steps),
        )
        total = time.perf_counter() - start
        ranksearch.Evaluator.__call__ = original
    n = result.evaluated
    startup = first_call - start
    loop = total - startup
    outside = loop - evaluator_time
    print(f"{n} evaluations ({args.strategy}, {args.steps} fine-tuning steps each, "
          f"{args.threads} threads) in {total:.1f} s: {n / total * 60:.1f} evaluations/minute")
    print(f"start-up (space, factor cache, store) {startup:.2f} s")
    print(f"search loop {loop:.2f} s: evaluator {evaluator_time:.2f} s, outside it "
          f"{outside:.3f} s = {outside / loop:.2%} of the loop's wall time (target < 2%)")
    print(f"mean evaluation {evaluator_time / n * 1e3:.0f} ms; mean overhead per evaluation "
          f"{outside / n * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
