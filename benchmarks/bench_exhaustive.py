"""Every strategy against the exhaustive front of a space small enough to enumerate.

The trained digits CNN with a coarse rank grid (``--choices`` ranks per site plus dense) is
evaluated in every configuration with the zero-shot proxy; that front is the limit. Each
strategy then searches the same space, its evaluations answered from the exhaustive table (an
executor that looks results up), and the fraction of the exhaustive hypervolume (accuracy vs
FLOPs) reached after 16, 32 and 64 evaluations is reported, median over 5 seeds. Target for
the best strategy: 95% within 64 evaluations. Writes a plot of the fronts to ``--out``.

The grid of a tucker2 site is one line (both ranks scale together); strategies that choose the
two ranks independently can leave it. Such configs are evaluated when asked ("off-grid"
column) and can take a strategy past 100% of the enumerated front.

Run: ``python benchmarks/bench_exhaustive.py``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from tqdm import tqdm

import ranksearch
from ranksearch.config import Config
from ranksearch.datasets import load_task
from ranksearch.pareto import front, hypervolume, parse_objectives, reference_point
from ranksearch.result import Result
from ranksearch.strategy import available_strategies
from ranksearch.training import pretrained

CHECKPOINTS = (16, 32, 64)
OBJECTIVES = parse_objectives(("accuracy", "flops"))
SKIP = {"bayes_tt": "needs TT sites; this space offers tucker2 and svd"}


class Lookup:
    """An executor that answers from a table of precomputed results.

    Configs outside the table (strategies that pick tucker2's two ranks independently leave
    the grid's line) are evaluated and counted in ``misses``.
    """

    def __init__(self, table: dict[str, Result]) -> None:
        self.table = table
        self.misses: set[str] = set()

    def map(self, evaluate: Callable[[Config], Result], configs: Sequence[Config]
            ) -> Iterator[Result]:
        for config in configs:
            if config.key not in self.table:
                self.misses.add(config.key)
                self.table[config.key] = evaluate(config)
            yield self.table[config.key]


def exhaustive(evaluator: ranksearch.Evaluator) -> dict[str, Result]:
    space = evaluator.space
    options = [space.choices(name) for name in space.names]
    table = {}
    total = 1
    for o in options:
        total *= len(o)
    for combo in tqdm(itertools.product(*options), total=total, desc="exhaustive"):
        config = Config(dict(zip(space.names, combo, strict=True)))
        table[config.key] = evaluator(config)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--choices", type=int, default=3, help="ranks per site (plus dense)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--strategies", nargs="+", default=None)
    parser.add_argument("--out", default="benchmarks/out/exhaustive")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = load_task("digits")
    model = pretrained("digits-cnn", "digits", cache_dir=out / "checkpoints", task=task)
    space = ranksearch.RankSpace.discover(model, task.example_input(), max_choices=args.choices)
    evaluator = ranksearch.Evaluator(model, task, space=space)
    start = time.perf_counter()
    table = exhaustive(evaluator)
    print(f"{len(table)} configurations evaluated in {time.perf_counter() - start:.0f} s")
    enumerated = list(table.values())
    dense = evaluator.costs.metrics(Config())
    ref = reference_point(OBJECTIVES, dense, scale=1.5)
    best_hv = hypervolume(enumerated, OBJECTIVES, ref)
    limit = front(enumerated, OBJECTIVES)
    print(f"exhaustive front: {len(limit)} points, hypervolume {best_hv:.4g}")

    names = args.strategies or [n for n in available_strategies() if n not in SKIP]
    for name, why in SKIP.items():
        if name not in names:
            print(f"skipped {name}: {why}")
    print(f"\n{'strategy':12} " + " ".join(f"{f'HV@{c}':>8}" for c in CHECKPOINTS)
          + f" {'seconds':>8} {'off-grid':>8}")
    fronts = {"exhaustive": limit}
    summary = {}
    for name in names:
        fractions: dict[int, list[float]] = {c: [] for c in CHECKPOINTS}
        lookup = Lookup(table)
        begin = time.perf_counter()
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as tmp:
                result = ranksearch.search(
                    model, task, strategy=name, evaluations=max(CHECKPOINTS), space=space,
                    executor=lookup, out=tmp, seed=seed,
                )
            for c in CHECKPOINTS:
                fractions[c].append(hypervolume(result.results[:c], OBJECTIVES, ref) / best_hv)
            if seed == 0:
                fronts[name] = front(result.results, OBJECTIVES)
        seconds = (time.perf_counter() - begin) / args.seeds
        summary[name] = {c: statistics.median(v) for c, v in fractions.items()}
        print(f"{name:12} " + " ".join(f"{summary[name][c]:8.1%}" for c in CHECKPOINTS)
              + f" {seconds:8.1f} {len(lookup.misses):8d}", flush=True)
    top = max(summary, key=lambda n: summary[n][64])
    print(f"\nbest at 64 evaluations: {top} with {summary[top][64]:.1%} (target ≥ 95%)")
    figure = Figure(figsize=(7, 5))
    ax = figure.subplots()
    for label, points in fronts.items():
        xs = [r.metrics["flops_ratio"] for r in points]
        ys = [r.metrics["accuracy"] for r in points]
        ax.step(xs, ys, where="post", marker="o", markersize=3, label=label,
                linewidth=2.5 if label == "exhaustive" else 1)
    ax.set(xlabel="FLOPs (ratio to dense)", ylabel="accuracy (zero-shot)",
           title=f"fronts after {max(CHECKPOINTS)} evaluations (seed 0)")
    ax.legend(fontsize=7)
    figure.savefig(out / "exhaustive_fronts.png", dpi=100)
    print(f"wrote {out / 'exhaustive_fronts.png'}")


if __name__ == "__main__":
    main()
