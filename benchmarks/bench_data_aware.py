"""Data-aware factors against weight-only ones, zero-shot and fine-tuned, on Fashion-MNIST.

For ResNet-20 and the small VGG (the quality benchmark's checkpoints), uniform ranks (the
largest equal fraction of parameters in every layer meeting the budget) at params<=0.25 and
params<=0.5, with svd and tucker2 on the convolutions (svd on the linear layers), on every
layer and again with the output layer kept dense (as most compression papers keep it: a
10-way classifier at rank 4 of 10 caps the accuracy whatever the factors):

* zero-shot test accuracy, weight-only and data-aware factors (statistics of 8 training batches
  of 64, `ranksearch.calibration`), each without and with BatchNorm statistics re-estimated on
  the same 8 batches (`recalibrate_batchnorm`);
* test accuracy after the quality benchmark's final fine-tuning (one epoch over 6000 training
  images, AdamW lr 2e-3, batch 128), weight-only and data-aware.

Test accuracy is measured on a fixed, seeded subset of ``--test-images`` test images (all
10,000 with ``--test-images 10000``). Prints a markdown table and the fraction of the zero-shot
drop from dense that data-aware factors remove at params<=0.5; writes
``benchmarks/out/data_aware/data_aware.json`` (finished cells are cached there, so a re-run
resumes).

Run: ``python benchmarks/bench_data_aware.py`` (``--models``, ``--threads``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_quality import MODELS, JsonCache, Settings, hardware, largest_fraction, subset
from fashion import ensure_fashion_mnist
from torch import nn
from torch.utils.data import Subset

import ranksearch
from ranksearch.cache import FactorCache
from ranksearch.calibration import calibration_inputs, collect, recalibrate_batchnorm
from ranksearch.cost import CostModel
from ranksearch.datasets import load_task
from ranksearch.site import find_layers
from ranksearch.space import RankSpace
from ranksearch.task import Task
from ranksearch.training import evaluate_accuracy, pretrained, train_baseline

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "data_aware"
METHODS = ("svd", "tucker2")
#: Which layers the uniform ranks go on: every one, or all but the output layer.
LAYERS = ("all", "output dense")
BUDGETS = (0.25, 0.5)
CALIBRATION_BATCHES = 8
CALIBRATION_BATCH_SIZE = 64
QUALITY = Settings()  # the quality benchmark's checkpoints and final fine-tuning schedule


def test_subset(task: Task, images: int, seed: int = 0) -> Subset:
    """A fixed, seeded subset of ``images`` test images (all of them when ``images`` ≥ the
    test set's size)."""
    n = len(task.test)
    order = np.random.default_rng(seed).permutation(n)[:min(images, n)]
    return Subset(task.test, sorted(order.tolist()))


def finetune(module: nn.Module, train: Task) -> None:
    """The quality benchmark's final fine-tuning of ``module`` in place (``train``: its
    training subset, see `finetune_task`)."""
    train_baseline(module, train, epochs=QUALITY.finetune_epochs, lr=QUALITY.finetune_lr,
                   batch_size=QUALITY.batch_size, seed=QUALITY.seed)


def finetune_task(task: Task) -> Task:
    """The quality benchmark's fine-tuning subset of ``task``; its validation set cut to one
    batch, which `train_baseline` only reports on after training (the training is the same)."""
    tuned = subset(task, QUALITY.finetune_images, QUALITY.seed)
    return replace(tuned, val=Subset(task.val, range(QUALITY.batch_size)))


def load_model(name: str, task: Task) -> nn.Module:
    """The quality benchmark's checkpoint of ``name`` on ``task``, in eval mode."""
    return pretrained(name, task.name, cache_dir=QUALITY.checkpoints, task=task,
                      **MODELS[name]).eval()


def uniform_config(space: RankSpace, limit: float) -> tuple[float, ranksearch.Config]:
    """The largest uniform fraction whose config has params ratio ≤ ``limit``, and the config."""
    costs = CostModel(space)
    fraction = largest_fraction(lambda f: costs.metrics(space.uniform(f))["params_ratio"],
                                limit)
    if fraction is None:
        raise SystemExit(f"params<={limit} is out of reach with uniform ranks")
    return fraction, space.uniform(fraction)


class ModelRun:
    """The cells of one model: its spaces, caches and calibration batches."""

    def __init__(self, name: str, task: Task, test: Subset, cells: JsonCache) -> None:
        self.name, self.task, self.test, self.cells = name, task, test, cells
        self.model = load_model(name, task)
        example = task.example_input()
        last = [layer.name for layer in find_layers(self.model)][-1]
        self.spaces = {(m, layers): RankSpace.discover(
            self.model, example, methods={"conv2d": [m], "linear": ["svd"]},
            exclude=[last] if layers == "output dense" else None)
            for m in METHODS for layers in LAYERS}
        self.inputs = calibration_inputs(task, CALIBRATION_BATCHES, CALIBRATION_BATCH_SIZE,
                                         QUALITY.seed)
        self.train = finetune_task(task)
        self._stats: dict | None = None
        self._caches: dict[tuple[str, bool, str], FactorCache] = {}
        key = f"{name}/dense"
        if key not in cells:
            cells[key] = {"test_accuracy": evaluate_accuracy(self.model, test)}
        self.dense = cells[key]["test_accuracy"]

    def cache(self, method: str, aware: bool, layers: str) -> FactorCache:
        key = (method, aware, layers)
        if key not in self._caches:
            space, stats = self.spaces[method, layers], None
            if aware:
                if self._stats is None:  # the same sites in every space of all layers
                    self._stats = collect(self.model, self.spaces[method, "all"], self.inputs)
                stats = {n: self._stats[n] for n in space.names if n in self._stats}
            self._caches[key] = FactorCache(self.model, space, stats)
        return self._caches[key]

    def cell(self, method: str, limit: float, layers: str) -> dict[str, Any]:
        key = f"{self.name}/{method}/params<={limit}" + ("" if layers == "all" else "/" + layers)
        if key in self.cells:
            return self.cells[key]
        start = time.perf_counter()
        space = self.spaces[method, layers]
        fraction, config = uniform_config(space, limit)
        # the ratio of the whole model (the excluded output layer counts, dense)
        ratio = CostModel(self.spaces[method, "all"]).metrics(config)["params_ratio"]
        row: dict[str, Any] = {"fraction": fraction, "params_ratio": ratio}
        for aware in (False, True):
            tag = "aware" if aware else "weight"
            cache = self.cache(method, aware, layers)
            built = ranksearch.compress(self.model, config, cache=cache)
            row[f"{tag}_zero"] = evaluate_accuracy(built, self.test)
            recalibrate_batchnorm(built, self.inputs)
            row[f"{tag}_zero_bn"] = evaluate_accuracy(built, self.test)
            tuned = ranksearch.compress(self.model, config, cache=cache)
            finetune(tuned, self.train)
            row[f"{tag}_tuned"] = evaluate_accuracy(tuned, self.test)
        row["seconds"] = time.perf_counter() - start
        self.cells[key] = row
        return row


    def sequential_cell(self, method: str, limit: float) -> dict[str, Any]:
        """Zero-shot accuracy of data-aware factors whose statistics are collected in order
        through the layers already compressed (each site's inputs as the compressed model
        before it gives them), without and with BatchNorm recalibration."""
        key = f"{self.name}/{method}/params<={limit}/sequential"
        if key in self.cells:
            return self.cells[key]
        start = time.perf_counter()
        space = self.spaces[method, "all"]
        _, config = uniform_config(space, limit)
        stats: dict = {}
        for site in space.decomposable:
            done = ranksearch.Config({n: c for n, c in config.items() if n in stats})
            partial = ranksearch.compress(self.model, done,
                                          cache=FactorCache(self.model, space, stats))
            found = collect(partial, space, self.inputs)
            if site.name in found:
                stats[site.name] = found[site.name]
        built = ranksearch.compress(self.model, config, cache=FactorCache(self.model, space,
                                                                          stats))
        row = {"sequential_zero": evaluate_accuracy(built, self.test)}
        recalibrate_batchnorm(built, self.inputs)
        row["sequential_zero_bn"] = evaluate_accuracy(built, self.test)
        row["seconds"] = time.perf_counter() - start
        self.cells[key] = row
        return row


def removed(dense: float, weight: float, aware: float) -> float:
    """The fraction of the weight-only drop from dense that ``aware`` removes."""
    return (aware - weight) / (dense - weight) if dense != weight else float("nan")


def markdown(report: dict[str, Any]) -> str:
    lines = ["| model | method | layers | budget | params × | zero-shot weight / aware | "
             "+ BN recal weight / aware | fine-tuned weight / aware |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(
            f"| {r['model']} (dense {r['dense']:.4f}) | {r['method']} | {r['layers']} | "
            f"params≤{r['budget']} | "
            f"{r['params_ratio']:.3f} | {r['weight_zero']:.4f} / {r['aware_zero']:.4f} | "
            f"{r['weight_zero_bn']:.4f} / {r['aware_zero_bn']:.4f} | "
            f"{r['weight_tuned']:.4f} / {r['aware_tuned']:.4f} |")
    lines += ["", "Fraction of the weight-only zero-shot drop from dense removed at params≤0.5 "
              "(data-aware; data-aware + BN recal against weight-only + BN recal; data-aware + "
              "BN recal against plain weight-only):", ""]
    for r in report["rows"]:
        if r["budget"] == 0.5:
            d = r["dense"]
            lines.append(
                f"- {r['model']} {r['method']}, {r['layers']}: "
                f"{removed(d, r['weight_zero'], r['aware_zero']):.2f}; "
                f"{removed(d, r['weight_zero_bn'], r['aware_zero_bn']):.2f}; "
                f"{removed(d, r['weight_zero'], r['aware_zero_bn']):.2f}"
                + ("" if "sequential_zero" not in r else
                   f"; sequential statistics {r['sequential_zero']:.4f} / "
                   f"{r['sequential_zero_bn']:.4f} with BN recal: "
                   f"{removed(d, r['weight_zero'], r['sequential_zero']):.2f}; "
                   f"{removed(d, r['weight_zero_bn'], r['sequential_zero_bn']):.2f}"))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--test-images", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sequential", action="store_true",
                        help="also data-aware factors with statistics collected sequentially "
                        "through the compressed earlier layers (zero-shot, params<=0.5)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not ensure_fashion_mnist():
        return 0
    task = load_task(QUALITY.task)
    test = test_subset(task, args.test_images)
    cells = JsonCache(args.out / f"cells-{len(test)}.json")
    report: dict[str, Any] = {"hardware": hardware(), "test_images": len(test),
                              "calibration": [CALIBRATION_BATCHES, CALIBRATION_BATCH_SIZE],
                              "rows": []}
    start = time.perf_counter()
    for name in args.models:
        run = ModelRun(name, task, test, cells)
        print(f"{name}: dense test accuracy {run.dense:.4f} on {len(test)} images", flush=True)
        for layers, method, limit in itertools.product(LAYERS, METHODS, BUDGETS):
            row = {"model": name, "method": method, "layers": layers, "budget": limit,
                   "dense": run.dense, **run.cell(method, limit, layers)}
            report["rows"].append(row)
            print(f"  {method} {layers} params<={limit}: zero-shot "
                  f"{row['weight_zero']:.4f} → {row['aware_zero']:.4f}, with BN recal "
                  f"{row['weight_zero_bn']:.4f} → {row['aware_zero_bn']:.4f}, fine-tuned "
                  f"{row['weight_tuned']:.4f} → {row['aware_tuned']:.4f} "
                  f"({row['seconds']:.0f} s)", flush=True)
            if args.sequential and limit == 0.5 and layers == "all":
                seq = run.sequential_cell(method, limit)
                row |= {k: v for k, v in seq.items() if k != "seconds"}
                print(f"    sequential statistics: zero-shot {seq['sequential_zero']:.4f}, "
                      f"with BN recal {seq['sequential_zero_bn']:.4f} "
                      f"({seq['seconds']:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_aware.json").write_text(json.dumps(report, indent=1))
    print("\n" + markdown(report))
    print(f"\ntotal {time.perf_counter() - start:.0f} s; wrote {args.out / 'data_aware.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
