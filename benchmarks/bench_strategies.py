"""The network-reading strategies against `uniform`, at equal evaluation counts.

For each task (digits; Fashion-MNIST from the Debian package `dataset-fashion-mnist`) and each
strategy: an unconstrained search gives a front of accuracy against FLOPs and its
hypervolume; searches under params<=0.25 and flops<=0.5 give the best accuracy under each
budget. Every candidate gets the same short fine-tuning proxy. Prints a table and writes the
overlaid fronts to ``--out``.

Run: ``python benchmarks/bench_strategies.py`` (``--tasks digits`` for a quick run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from fashion import ensure_fashion_mnist

import ranksearch
from ranksearch.datasets import load_task
from ranksearch.report import plot_fronts
from ranksearch.training import evaluate_accuracy, pretrained

STRATEGIES = ("uniform", "vbmf", "errorbound", "pca_energy", "sensitivity", "beam")
BUDGETS = ("params<=0.25", "flops<=0.5")
TASKS = {
    # task: (load options, model, training options)
    "digits": ({}, "digits-cnn", {}),
    "fashion-mnist": ({"train_size": 6000, "val_size": 1000}, "digits-cnn", {"epochs": 8}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--evaluations", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50, help="proxy fine-tuning steps")
    parser.add_argument("--out", default="benchmarks/out/strategies")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    proxy = ranksearch.ProxySettings(steps=args.steps, batch_size=64)
    for name in args.tasks:
        if name == "fashion-mnist" and not ensure_fashion_mnist():
            continue
        options, model_name, train = TASKS[name]
        task = load_task(name, **options)
        model = pretrained(model_name, name, cache_dir=out / "checkpoints", task=task, **train)
        dense = evaluate_accuracy(model, task.val)
        print(f"\n{name}: {model_name}, dense val accuracy {dense:.4f}; {args.evaluations} "
              f"evaluations per search, {args.steps} fine-tuning steps per candidate")
        print(f"{'strategy':12} {'hypervolume':>11} "
              + " ".join(f"{b:>13}" for b in BUDGETS) + f" {'seconds':>8}")
        fronts = {}
        for strategy in args.strategies:
            start = time.perf_counter()
            common = dict(strategy=strategy, evaluations=args.evaluations, proxy=proxy,
                          out=str(out / name), seed=0)
            front = ranksearch.search(model, task, **common)
            fronts[strategy] = front.results
            accuracies = []
            for budget in BUDGETS:
                result = ranksearch.search(model, task, constraints=[budget], **common)
                top = result.best()
                accuracies.append(f"{top.metrics['accuracy']:13.4f}" if top else f"{'-':>13}")
            seconds = time.perf_counter() - start
            print(f"{strategy:12} {front.hypervolume():11.4g} {' '.join(accuracies)} "
                  f"{seconds:8.1f}", flush=True)
        paths = plot_fronts(fronts, out, ("accuracy", "flops"), prefix=f"{name}-front")
        print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    sys.exit(main())
