"""Real speed: latency-constrained search against a FLOPs-constrained one, uniform ranks and
torch-pruning, on Fashion-MNIST with the models people compress (VGG-16, ResNet-56, a d=512
transformer encoder), at batch 1 and batch 64 on this machine's CPU.

For each model and batch size:

1. a latency search at ``latency<=0.5x`` (auto strategy, zero-shot proxy with BatchNorm
   recalibration, ``--evaluations`` evaluations; the latency table timed once per batch size
   and kept in the store) and a FLOPs search at ``flops<=0.5`` of the same budget; uniform
   ranks (the largest uniform fraction meeting the latency budget by the table);
2. torch-pruning (L2 magnitude importance, ``MetaPruner``; the classifier kept) at the
   pruning ratio whose MEASURED latency first matches the latency search's best config
   (bisection on the ratio);
3. every one of them fine-tuned with the quality benchmark's schedule (one epoch of
   `train_baseline` on a seeded training subset, `bench_quality.Settings`) and scored on the
   test set;
4. end-to-end latency of each against the dense model (interleaved pairs, median ratio), the
   latency search's front as the search stored it (priced against measured), the speed-up
   measured against the one predicted, and the share of the FLOPs reduction realised as
   speed-up (``speed-up × FLOPs ratio``), FLOPs search against latency search.

Writes ``speed.json`` and ``speed.md`` to ``--out`` (default ``benchmarks/out/speed``), where
the search stores and the fine-tuning and timing caches live too, so that an interrupted run
resumes where it stopped. The baselines are trained once on ``--train-size`` images (cached
per user by `ranksearch.training.pretrained`).

Run: ``python benchmarks/bench_speed.py`` (reduced: ``--models resnet56 --batches 1
--evaluations 8 --finetune-images 1024 --test-images 2000``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from bench_quality import JsonCache, counted_flops, hardware, portable, subset
from bench_quality import Settings as QualitySettings
from fashion import ensure_fashion_mnist
from torch import nn

import ranksearch
from ranksearch.config import Config
from ranksearch.cost import CostModel
from ranksearch.datasets import load_task
from ranksearch.errors import ConstraintUnreachableError
from ranksearch.latency import LatencyTable
from ranksearch.models import BasicBlock, ResNet
from ranksearch.report import format_config, write_atomic
from ranksearch.result import Result
from ranksearch.space import SpaceSpec
from ranksearch.store import default_url, latency_book
from ranksearch.task import Task
from ranksearch.timing import Timing, measuring, paired_ratio, prepare, time_paired
from ranksearch.training import evaluate_accuracy, pretrained, train_baseline

HERE = Path(__file__).resolve().parent
MODELS = ("vgg16", "resnet56", "encoder512")
BATCHES = (1, 64)
LATENCY_BUDGET = "latency<=0.5x"
FLOPS_BUDGET = "flops<=0.5"
QUALITY = QualitySettings()  # the quality benchmark's fine-tuning schedule


@dataclass(frozen=True)
class Settings:
    """One run of the benchmark."""

    models: tuple[str, ...] = MODELS
    batches: tuple[int, ...] = BATCHES
    evaluations: int = 12
    threads: int = 2
    train_size: int = 6000          # training images of the baselines and the proxy
    max_choices: int = 8            # ranks per site and method (the table times each)
    latency_repeats: int = 10       # timed samples per table entry and per measurement
    proxy_images: int = 512         # validation images the zero-shot proxy scores on
    bn_recalibrate: int = 2         # batches re-estimating BatchNorm statistics in the proxy
    finetune_images: int = QUALITY.finetune_images
    finetune_epochs: int = QUALITY.finetune_epochs
    finetune_lr: float = QUALITY.finetune_lr
    batch_size: int = QUALITY.batch_size
    test_images: int | None = None  # None: the whole test set
    prune_steps: int = 6            # bisection steps on torch-pruning's ratio
    seed: int = 0
    out: Path = HERE / "out" / "speed"


# -- measuring --------------------------------------------------------------------------------
def measured_ratio(dense: nn.Module, module: nn.Module, inputs: Any, timing: Timing
                   ) -> dict[str, float]:
    """``module`` against ``dense`` end to end, interleaved: the median of the paired ratios,
    and each one's median seconds (as `LatencyTable.check` times a front point)."""
    with measuring(timing):
        first, second = time_paired(prepare(copy.deepcopy(dense), inputs, timing),
                                    prepare(module, inputs, timing), timing)
    return {"ratio": paired_ratio(first, second), "seconds": statistics.median(second),
            "dense_seconds": statistics.median(first)}


def prediction_errors(front: Sequence[Result]) -> list[dict[str, float]]:
    """Each front point's priced and measured latency ratio and the error of the price."""
    rows = []
    for r in front:
        m = r.metrics
        if "latency_measured_ratio" in m:
            rows.append({"priced": m["latency_ratio"], "measured": m["latency_measured_ratio"],
                         "error": m["latency_ratio"] / m["latency_measured_ratio"] - 1})
    return rows


# -- torch-pruning ----------------------------------------------------------------------------
def pruned(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    """A copy of ``model`` pruned by torch-pruning: L2 magnitude importance, ``ratio`` of
    the channels of every layer but the classifier (the last linear layer). A ResNet's
    option-A shortcuts pad channels where torch-pruning's graph cannot follow them, so there
    only the inner channels of each block are pruned (the stem and each block's second
    convolution kept)."""
    import torch_pruning as tp

    module = copy.deepcopy(model).eval()
    ignored = [[m for m in module.modules() if isinstance(m, nn.Linear)][-1]]
    if isinstance(module, ResNet):
        ignored += [module.conv1, *(b.conv2 for b in module.modules()
                                    if isinstance(b, BasicBlock))]
    heads = {m: m.num_heads for m in module.modules() if isinstance(m, nn.MultiheadAttention)}
    pruner = tp.pruner.MetaPruner(module, example,
                                  importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=ignored,
                                  num_heads=heads)
    pruner.step()
    return module.eval()


def match_pruning(measure: Callable[[nn.Module], float], build: Callable[[float], nn.Module],
                  target: float, steps: int) -> tuple[float, float, list[list[float]]]:
    """The smallest pruning ratio (of ``steps`` bisection steps on [0, 0.95]) whose measured
    latency ratio is at most ``target``, its ratio, and every (pruning ratio, measured) tried;
    the largest ratio tried when none reaches the target."""
    lo, hi, tried = 0.0, 0.95, []
    best: tuple[float, float] | None = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        got = measure(build(mid))
        tried.append([mid, got])
        if got <= target:
            best, hi = (mid, got), mid
        else:
            lo = mid
    if best is None:
        got = measure(build(0.95))
        tried.append([0.95, got])
        best = (0.95, got)
    return best[0], best[1], tried


# -- one model --------------------------------------------------------------------------------
class ModelBench:
    """Searches, baselines, fine-tuning and timings of one model."""

    def __init__(self, name: str, task: Task, s: Settings) -> None:
        self.name, self.task, self.s = name, task, s
        self.model = pretrained(name, task.name, task=task, progress=True)
        self.out = s.out / name
        # caches named by everything that decides their figures besides the config
        tuned = f"{s.train_size}-{s.finetune_images}-{s.finetune_epochs}-{s.finetune_lr:g}-" \
                f"{s.batch_size}-{s.seed}-{s.test_images or 'all'}"
        self.finetuned = JsonCache(self.out / f"finetuned-{tuned}.json")
        self.timed = JsonCache(self.out / f"timed-{s.threads}t-{s.latency_repeats}r-"
                                          f"{s.prune_steps}p.json")
        self.ft_task = subset(task, s.finetune_images, s.seed)
        self.test = (task.test if s.test_images is None else
                     torch.utils.data.Subset(task.test, range(s.test_images)))
        self.spec = SpaceSpec(max_choices=s.max_choices)
        self.example = task.example_input()
        self.dense_flops = counted_flops(self.model, self.example)

    def proxy(self, batch: int) -> ranksearch.ProxySettings:
        return ranksearch.ProxySettings(
            steps=0, bn_recalibrate=self.s.bn_recalibrate, eval_batch_size=256,
            eval_batches=max(1, self.s.proxy_images // 256), seed=self.s.seed,
            latency_batch=batch, latency_repeats=self.s.latency_repeats)

    def search(self, budget: str, batch: int, **options: Any) -> ranksearch.SearchResult:
        metric = budget.split("<=")[0]
        kwargs: dict[str, Any] = dict(strategy="auto", evaluations=self.s.evaluations)
        kwargs.update(options)
        return ranksearch.search(
            self.model, self.task, constraints=[budget], objectives=("accuracy", metric),
            proxy=self.proxy(batch), out=str(self.out), seed=self.s.seed, space=self.spec,
            share_results=True, progress=False, **kwargs)

    def test_accuracy(self, key: str, build: Callable[[], nn.Module]) -> dict[str, float]:
        """Test accuracy after the quality benchmark's fine-tuning of ``build()`` (cached by
        ``key``)."""
        if key not in self.finetuned:
            start, s = time.perf_counter(), self.s
            module = build()
            train_baseline(module, self.ft_task, epochs=s.finetune_epochs, lr=s.finetune_lr,
                           batch_size=s.batch_size, seed=s.seed)
            self.finetuned[key] = {"test_accuracy": evaluate_accuracy(module, self.test),
                                   "seconds": time.perf_counter() - start}
        return self.finetuned[key]

    def timing(self, batch: int) -> Timing:
        return Timing(batch_size=batch, threads=self.s.threads, repeats=self.s.latency_repeats)

    def speed(self, key: str, batch: int, build: Callable[[], nn.Module]) -> dict[str, float]:
        """``build()`` timed against the dense model at ``batch`` (cached by key and batch)."""
        cached = f"{key}@b{batch}"
        if cached not in self.timed:
            self.timed[cached] = measured_ratio(self.model, build(),
                                                self.task.example_input(batch),
                                                self.timing(batch))
        return self.timed[cached]

    def config_row(self, label: str, config: Config, proxy: float | None, batch: int,
                   costs: Any) -> dict[str, Any]:
        tuned = self.test_accuracy(config.key, lambda: ranksearch.compress(self.model, config))
        speed = self.speed(config.key, batch,
                           lambda: ranksearch.compress(self.model, config, decompose=False))
        metrics = costs.metrics(config)
        return {"label": label, "proxy_accuracy": proxy, "test_accuracy": tuned["test_accuracy"],
                "flops_ratio": metrics["flops_ratio"], "params_ratio": metrics["params_ratio"],
                "latency_priced_ratio": metrics.get("latency_ratio"),
                "latency_measured_ratio": speed["ratio"], "speedup": 1 / speed["ratio"],
                "flops_share": metrics["flops_ratio"] / speed["ratio"],
                "finetune_seconds": tuned["seconds"], "config": format_config(config)}

    def run(self, batch: int) -> dict[str, Any]:
        print(f"\n{self.name}, batch {batch}", flush=True)
        t0, notes = time.perf_counter(), []
        try:
            lat = self.search(LATENCY_BUDGET, batch)
            uniform = self.search(LATENCY_BUDGET, batch, strategy="uniform",
                                  strategy_options={"count": 1}, evaluations=1,
                                  study=f"uniform-latency-b{batch}")
        except ConstraintUnreachableError as e:  # the table says no config is that fast
            notes.append(f"{LATENCY_BUDGET}: {e}")
            print(f"  {notes[-1]}", flush=True)
            lat = uniform = None
        table = self.table(batch)  # the search's, from the store (timed there if it failed)
        costs = CostModel(table.space, latency=table)  # FLOPs, parameters and latency
        print(f"  latency table: {table.measured} entries timed outside the search; "
              f"searches {time.perf_counter() - t0:.0f} s", flush=True)
        flops = self.search(FLOPS_BUDGET, batch)
        rows = []
        for label, found in (("latency search", lat), ("FLOPs search", flops),
                             ("uniform", uniform)):
            result = found.best() if found is not None else None
            if result is None:
                continue
            rows.append(self.config_row(label, result.config, result.metrics["accuracy"],
                                        batch, costs))
            print(f"  {label:15} {self.describe(rows[-1])}", flush=True)
        if rows:  # pruned to the measured latency of ranksearch's first row
            rows.append(self.pruning_row(batch, rows[0]["latency_measured_ratio"]))
            rows[-1]["matched"] = rows[0]["label"]
            print(f"  {'torch-pruning':15} {self.describe(rows[-1])}", flush=True)
        front = prediction_errors(lat.front()) if lat is not None else []
        fastest = {n: min(table.space.choices(n), key=lambda c, n=n: table.seconds(n, c))
                   for n in table.space.names}
        errors = [abs(f["error"]) for f in front]
        lat_row = next((r for r in rows if r["label"] == "latency search"), None)
        flops_row = next((r for r in rows if r["label"] == "FLOPs search"), None)
        summary: dict[str, Any] = {
            "front_points": len(front),
            "prediction_error_median": statistics.median(errors) if errors else None,
            "prediction_error_max": max(errors) if errors else None,
            "within_10pct": sum(e <= 0.10 for e in errors),
            "fastest_priced_ratio": table.total(fastest) / table.dense,
        }
        if lat_row is not None:
            predicted = 1 / lat_row["latency_priced_ratio"]
            summary |= {"predicted_speedup": predicted, "measured_speedup": lat_row["speedup"],
                        "realised_of_predicted": lat_row["speedup"] / predicted,
                        "flops_share_latency_search": lat_row["flops_share"]}
        if flops_row is not None:
            summary["flops_share_flops_search"] = flops_row["flops_share"]
        print(f"  front: {len(front)} points, prediction error median "
              f"{_pct(summary['prediction_error_median'])}, max "
              f"{_pct(summary['prediction_error_max'])}", flush=True)
        return {"batch": batch, "rows": rows, "front": front, "summary": summary,
                "notes": notes, "table": {"entries_new": table.measured,
                                          "dense_seconds": table.whole,
                                          "clamped": table.clamped},
                "seconds": time.perf_counter() - t0}

    def table(self, batch: int) -> LatencyTable:
        """The latency table a search at ``batch`` times (the same key: its entries are read
        from the store, timed only where missing)."""
        space = self.spec.discover(self.model, self.example)
        proxy = self.proxy(batch)
        timing = Timing(backend=proxy.backend, batch_size=batch, device=proxy.device,
                        repeats=proxy.latency_repeats)
        found = LatencyTable(self.model, space, self.task.example_input(batch), timing,
                             latency_book(default_url(str(self.out))))
        found.build()
        return found

    def pruning_row(self, batch: int, target: float) -> dict[str, Any]:
        example = self.task.example_input(1)
        key = f"pruning@b{batch}"
        try:
            if key not in self.timed:
                ratio, got, tried = match_pruning(
                    lambda m: measured_ratio(self.model, m, self.task.example_input(batch),
                                             self.timing(batch))["ratio"],
                    lambda r: pruned(self.model, example, r), target, self.s.prune_steps)
                self.timed[key] = {"pruning_ratio": ratio, "ratio": got, "tried": tried}
            found = self.timed[key]
            ratio = found["pruning_ratio"]
            tuned = self.test_accuracy(f"pruning:{ratio:.6f}",
                                       lambda: pruned(self.model, example, ratio))
            module = pruned(self.model, example, ratio)
        except Exception as e:  # torch-pruning's limits on a model are a finding, not a crash
            return {"label": "torch-pruning", "error": f"{type(e).__name__}: {e}"}
        flops = counted_flops(module, self.example) / self.dense_flops
        return {"label": "torch-pruning", "proxy_accuracy": None,
                "test_accuracy": tuned["test_accuracy"], "flops_ratio": flops,
                "params_ratio": sum(p.numel() for p in module.parameters())
                / sum(p.numel() for p in self.model.parameters()),
                "latency_priced_ratio": None, "latency_measured_ratio": found["ratio"],
                "speedup": 1 / found["ratio"], "flops_share": flops / found["ratio"],
                "finetune_seconds": tuned["seconds"],
                "config": f"pruning ratio {ratio:.4f} (tried {len(found['tried'])})"}

    @staticmethod
    def describe(r: Mapping[str, Any]) -> str:
        if "error" in r:
            return f"failed: {r['error']}"
        return (f"test acc {r['test_accuracy']:.4f}  FLOPs {r['flops_ratio']:.3f}  latency "
                f"measured {r['latency_measured_ratio']:.3f}"
                + (f" (priced {r['latency_priced_ratio']:.3f})"
                   if r["latency_priced_ratio"] is not None else "")
                + f"  speed-up {r['speedup']:.2f}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# -- report -----------------------------------------------------------------------------------
def markdown(report: Mapping[str, Any]) -> str:
    lines = []
    for model, data in report["models"].items():
        lines += [f"### {model}", "", f"Dense test accuracy {data['dense_test_accuracy']:.4f} "
                  f"(baseline trained on {data['train_size']} images); "
                  f"{data['evaluations']} evaluations per search.", ""]
        for cell in data["cells"]:
            s = cell["summary"]
            lines += [f"**batch {cell['batch']}** (dense {1e3 * cell['table']['dense_seconds']:.2f}"
                      " ms)", "",
                      "| method | test acc | FLOPs × | latency priced × | latency measured × "
                      "| speed-up | FLOPs share | config |", "|---|---|---|---|---|---|---|---|"]
            for r in cell["rows"]:
                if "error" in r:
                    lines.append(f"| {r['label']} | failed: {r['error'][:80]} | | | | | | |")
                    continue
                lines.append(
                    f"| {r['label']} | {r['test_accuracy']:.4f} | {r['flops_ratio']:.3f} | "
                    f"{_num(r['latency_priced_ratio'])} | {r['latency_measured_ratio']:.3f} | "
                    f"{r['speedup']:.2f} | {r['flops_share']:.2f} | {r['config'][:60]} |")
            lines += [f"Note: {n}" for n in cell.get("notes", [])]
            lines += ["", f"Front: {s['front_points']} points timed end to end, prediction "
                          f"error median {_pct(s['prediction_error_median'])}, max "
                          f"{_pct(s['prediction_error_max'])}, {s['within_10pct']} within 10%."]
            if "predicted_speedup" in s:
                lines.append(
                    f"Latency search: predicted speed-up {s['predicted_speedup']:.2f}, measured "
                    f"{s['measured_speedup']:.2f} ({_pct(s['realised_of_predicted'])} of the "
                    "prediction; target 90%). Share of the FLOPs reduction realised as "
                    f"speed-up: latency search {s['flops_share_latency_search']:.2f}"
                    + (f", FLOPs search {s['flops_share_flops_search']:.2f}"
                       if "flops_share_flops_search" in s else "") + ".")
            lines.append("")
    return "\n".join(lines)


def run(s: Settings) -> dict[str, Any]:
    task = load_task("fashion-mnist", train_size=s.train_size)
    saved = s.out / "speed.json"
    report: dict[str, Any] = {
        "hardware": hardware(),
        "settings": portable(asdict(s)),
        "models": json.loads(saved.read_text())["models"] if saved.is_file() else {},
    }
    for name in s.models:
        bench = ModelBench(name, task, s)
        dense = evaluate_accuracy(bench.model, bench.test)
        kept = [c for c in report["models"].get(name, {}).get("cells", [])
                if c["batch"] not in s.batches]
        data = report["models"][name] = {
            "dense_test_accuracy": dense, "train_size": s.train_size,
            "evaluations": s.evaluations, "cells": kept}
        for batch in s.batches:
            data["cells"] = sorted([*data["cells"], bench.run(batch)], key=lambda c: c["batch"])
            write(report, s.out)  # after every cell, so a partial run leaves its tables
    return report


def write(report: Mapping[str, Any], folder: Path) -> None:
    write_atomic(folder / "speed.json", json.dumps(report, indent=1).encode())
    write_atomic(folder / "speed.md", markdown(report).encode())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--evaluations", type=int, default=Settings.evaluations)
    parser.add_argument("--threads", type=int, default=Settings.threads)
    parser.add_argument("--finetune-images", type=int, default=Settings.finetune_images)
    parser.add_argument("--test-images", type=int, default=None)
    parser.add_argument("--latency-repeats", type=int, default=Settings.latency_repeats)
    parser.add_argument("--out", type=Path, default=Settings.out)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not ensure_fashion_mnist():
        return 0
    s = replace(Settings(), models=tuple(args.models), batches=tuple(args.batches),
                evaluations=args.evaluations, threads=args.threads,
                finetune_images=args.finetune_images, test_images=args.test_images,
                latency_repeats=args.latency_repeats, out=args.out)
    start = time.perf_counter()
    report = run(s)
    print("\n" + markdown(report))
    print(f"total {time.perf_counter() - start:.0f} s; wrote {s.out / 'speed.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
