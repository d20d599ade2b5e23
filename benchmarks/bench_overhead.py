"""The search's overhead: the share of a zero-shot search's wall time spent outside evaluation.

A real search (the trained digits CNN, or ``--model fashion``: the Fashion-MNIST CNN of
``bench_exhaustive``), ``--evaluations`` evaluations with the real evaluator, the local
executor and a SQLite store in a temporary folder, isolation off and on, side by side. The
evaluation time is the time from the loop handing out a config to the result coming back
(with isolation: the child's round trip); everything else of ``ranksearch.search``'s wall
time is overhead: opening the store, claims, reads of other writers' news, saves, the
strategy's ask/tell, cost lookups, bookkeeping. The store's own calls are timed too, and so
is the task check before the search (``dense check``: two batches and the dense model's
validation, the reference every result is reported against), shown in the overhead and, in
the last line, also as an evaluation.

    python benchmarks/bench_overhead.py [--model digits|fashion] [--evaluations 64]
        [--strategy random] [--repeats 2]

Target: under 2% overhead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from bench_exhaustive import setup

import ranksearch
from ranksearch.executors import DONE, WAIT, LocalExecutor, Loop, Wait, Work
from ranksearch.executors import Done as DoneType
from ranksearch.result import Result
from ranksearch.store import Store


class _TimedLoop:
    """A loop that times the evaluations between handing out work and taking its result."""

    def __init__(self, loop: Loop, clock: dict[str, float]) -> None:
        self._loop = loop
        self._clock = clock
        self._since: float | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    def propose(self) -> Work | Wait | DoneType:
        work = self._loop.propose()
        if work is not DONE and work is not WAIT:
            self._since = time.perf_counter()
        return work

    def finish(self, result: Result) -> None:
        if self._since is not None:
            self._clock["evaluation"] += time.perf_counter() - self._since
            self._since = None
        self._loop.finish(result)


class Timed(LocalExecutor):
    """The local executor, adding each evaluation's wall time to ``clock``."""

    def __init__(self, isolate: bool) -> None:
        super().__init__(isolate=isolate)
        self.clock: dict[str, float] = defaultdict(float)

    def drive(self, loop: Loop, evaluate: Callable[..., Result]) -> None:
        super().drive(_TimedLoop(loop, self.clock), evaluate)  # type: ignore[arg-type]


@contextmanager
def timing_store(clock: dict[str, float]) -> Iterator[None]:
    """Add the time of the store's calls to ``clock`` while the block runs."""
    names = ("__init__", "claim", "save", "refresh", "release")
    saved = {n: getattr(Store, n) for n in names}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock[f"store.{name.strip('_')}"] += time.perf_counter() - start
                clock[f"store.{name.strip('_')}#"] += 1
        return wrapper

    for n in names:
        setattr(Store, n, timed(n, saved[n]))
    module = sys.modules["ranksearch.search"]
    check = module.check_task

    def checked(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return check(*args, **kwargs)
        finally:
            clock["dense check"] += time.perf_counter() - start

    module.check_task = checked
    try:
        yield
    finally:
        module.check_task = check
        for n, fn in saved.items():
            setattr(Store, n, fn)


def run(evaluator: ranksearch.Evaluator, args: argparse.Namespace, isolate: bool
        ) -> dict[str, float]:
    executor = Timed(isolate)
    with tempfile.TemporaryDirectory() as tmp, timing_store(executor.clock):
        start = time.perf_counter()
        result = ranksearch.search(evaluator.model, evaluator.task, strategy=args.strategy,
                                   evaluations=args.evaluations, space=evaluator.space,
                                   executor=executor, out=tmp, seed=0,
                                   proxy=evaluator.settings)
        executor.clock["total"] = time.perf_counter() - start
    if result.evaluated != args.evaluations:
        raise SystemExit(f"the search evaluated {result.evaluated}, not {args.evaluations}")
    return dict(executor.clock)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits", choices=["digits", "fashion"])
    parser.add_argument("--evaluations", type=int, default=64)
    parser.add_argument("--strategy", default="random")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode (median)")
    parser.add_argument("--val-size", type=int, default=256, help="Fashion-MNIST val subset")
    parser.add_argument("--choices", type=int, default=8, help="digits: choices per site")
    parser.add_argument("--out", default="benchmarks/out/exhaustive")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    evaluator = setup(args.model, args, Path(args.out))
    runs = {mode: [run(evaluator, args, mode == "isolated") for _ in range(args.repeats)]
            for mode in ("in process", "isolated")}
    print(f"{args.model}, {args.strategy}, {args.evaluations} zero-shot evaluations, SQLite "
          f"store, median of {args.repeats} runs (ms per evaluation unless said)")
    keys = ["total", "evaluation", "overhead", "dense check", "store.init", "store.claim",
            "store.refresh", "store.save", "store.release"]
    print(f"{'':16}" + "".join(f"{m:>14}" for m in runs))
    for key in keys:
        cells = []
        for clocks in runs.values():
            values = [c.get(key, c["total"] - c["evaluation"] if key == "overhead" else 0.0)
                      for c in clocks]
            cells.append(f"{1000 * statistics.median(values) / args.evaluations:14.2f}")
        print(f"{key:16}" + "".join(cells))
    shares = {m: statistics.median((c["total"] - c["evaluation"]) / c["total"] for c in clocks)
              for m, clocks in runs.items()}
    print(f"{'overhead share':16}" + "".join(f"{s:14.2%}" for s in shares.values())
          + "   (target < 2%)")
    rest = {m: statistics.median((c["total"] - c["evaluation"] - c["dense check"]) / c["total"]
                                 for c in clocks) for m, clocks in runs.items()}
    print(f"{'without check':16}" + "".join(f"{s:14.2%}" for s in rest.values())
          + "   (the dense check counted as an evaluation)")


if __name__ == "__main__":
    main()
