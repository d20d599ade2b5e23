"""Test accuracy at equal budgets: every strategy against uniform ranks, one-shot VBMF and
tensorly-torch, on Fashion-MNIST with ResNet-20 and a small VGG.

For each model and budget (params<=0.25, params<=0.5, flops<=0.5):

1. every strategy searches with the same number of proxy evaluations and the same proxy; its
   most accurate configuration under the budget is kept;
2. baselines: uniform ranks (the largest equal fraction of parameters in every layer that meets
   the budget) for tucker2, CP (cp3_tpm) and svd; one-shot VBMF ranks (scaled down when they
   break the budget); tensorly-torch's ``FactorizedConv.from_conv`` (Tucker) on every
   convolution at the largest uniform fraction that meets the budget, where it is installed;
3. each is fine-tuned with the same one-shot schedule and scored on the whole test set;
4. CPU latency at batch 1 and batch 64 against the dense model, with the ranks as chosen and
   rounded to multiples of 8.

Writes ``quality.json``, ``quality.md`` and one front plot per model and budget (proxy
accuracy against the budget's metric) to ``--results``; search stores, baselines and the
fine-tuning cache go to ``--out``, so an interrupted run resumes where it stopped.

Run: ``make bench-quality`` (``python benchmarks/bench_quality.py``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fashion import ensure_fashion_mnist
from torch import nn
from torch.utils.data import Subset
from torch.utils.flop_counter import FlopCounterMode

import ranksearch
from ranksearch import factorize
from ranksearch.cache import FactorCache
from ranksearch.clone import clone_module
from ranksearch.config import Choice, Config
from ranksearch.constraints import Constraint
from ranksearch.cost import CostModel, measure_latency
from ranksearch.datasets import load_task
from ranksearch.pareto import hypervolume
from ranksearch.report import format_config, front_figure, write_atomic
from ranksearch.space import RankSpace
from ranksearch.strategy import largest_true
from ranksearch.task import Task
from ranksearch.training import evaluate_accuracy, pretrained, train_baseline

HERE = Path(__file__).resolve().parent
STRATEGIES = ("auto", "uniform", "proportional", "random", "vbmf", "errorbound", "pca_energy",
              "sensitivity", "beam", "nsga2", "optuna", "rl")
# cp3_tpm: the 3-way CP fitted by the tensor power method (Astrid & Lee); CP-ALS takes minutes
# per 256-channel layer on a CPU
# beam scores about width × sites² × moves children on a mini-batch, each a stored partial
# score counted against the evaluation budget: with its defaults that is hours on a CPU for
# ResNet-20's 20 layers
STRATEGY_OPTIONS: dict[str, dict[str, Any]] = {"beam": {"width": 1, "moves": 2}}
UNIFORM_METHODS = ("tucker2", "cp3_tpm", "svd")
BUDGETS = ("params<=0.25", "params<=0.5", "flops<=0.5")
# model -> options of its baseline training (`ranksearch.training.pretrained`)
MODELS: dict[str, dict[str, Any]] = {"resnet20": {"epochs": 4}, "vgg-small": {"epochs": 3}}
NOT_RUN = {"bayes_tt": "searches tensor-train ranks only, a space of its own"}


@dataclass(frozen=True)
class Settings:
    """One run of the benchmark; the defaults are the run the README reports."""

    task: str = "fashion-mnist"
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: dict(MODELS))
    budgets: tuple[str, ...] = BUDGETS
    strategies: tuple[str, ...] = STRATEGIES
    # proxy evaluations per strategy and budget: this, or the model's site count + 4 when
    # that is more (sensitivity probes every site once, plus the dense model)
    evaluations: int = 12
    # fine-tuning steps of the search proxy: 0, zero-shot with BatchNorm recalibrated (the
    # default proxy, chosen by bench_fidelity)
    proxy_steps: int = 0
    proxy_lr: float = 3e-3
    proxy_images: int = 512         # validation images the proxy scores on
    finetune_images: int = 6000     # training images of the final fine-tuning (one epoch)
    finetune_epochs: int = 1
    finetune_lr: float = 2e-3
    batch_size: int = 128
    latency_repeats: int = 20       # timed calls at batch 1 (a sixth of that at batch 64)
    latency_rounds: int = 3         # back-to-back dense/compressed pairs per configuration
    multiple: int = 8               # rounding of the "rounded ranks" latency column
    seed: int = 0
    tltorch: bool = True
    out: Path = HERE / "out" / "quality"
    results: Path = HERE / "results"
    checkpoints: Path = HERE / "checkpoints"


@dataclass(frozen=True)
class Entry:
    """One configuration to fine-tune: a strategy's pick or a baseline."""

    label: str
    kind: str                       # "strategy" or "baseline"
    config: Config | None           # None for tensorly-torch
    proxy_accuracy: float | None
    search_seconds: float
    fraction: float | None = None   # tensorly-torch's rank fraction


# -- helpers ---------------------------------------------------------------------------------
def budget_metric(budget: str) -> str:
    return Constraint.parse(budget).metric


def slug(budget: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", budget.lower()).strip("-")


def timing_key(budget: str, strategy: str, options: Mapping[str, Any] | None,
               study: str | None) -> str:
    return json.dumps([budget, strategy, options or {}, study], sort_keys=True)


def largest_fraction(cost_ratio: Callable[[float], float], limit: float, lo: float = 0.005,
                     hi: float = 1.0) -> float | None:
    """The largest fraction in [lo, hi] whose cost ratio is at most ``limit`` (the cost grows
    with the fraction); None when even ``lo`` costs more."""
    if cost_ratio(lo) > limit:
        return None
    return largest_true(lambda f: cost_ratio(f) <= limit, lo, hi, iters=24)


def weight_params(model: nn.Module) -> int:
    """Parameters outside normalization layers (what the cost model counts)."""
    norms = (nn.BatchNorm2d, nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm)
    return sum(p.numel() for m in model.modules() if not isinstance(m, norms)
               for p in m.parameters(recurse=False))


def counted_flops(model: nn.Module, example: torch.Tensor) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.eval()(example)
    return counter.get_total_flops()


def tltorch_model(model: nn.Module, convs: Sequence[str], fraction: float,
                  decompose: bool = True) -> nn.Module:
    """A copy of ``model`` with each convolution in ``convs`` replaced by tensorly-torch's
    ``FactorizedConv.from_conv(conv, rank=fraction, factorization="tucker")``, run factorized."""
    import tltorch

    layers = {}
    for name in convs:
        conv = model.get_submodule(name)
        layers[id(conv)] = tltorch.FactorizedConv.from_conv(
            conv, rank=fraction, factorization="tucker", implementation="factorized",
            decompose_weights=decompose,
        )
    return clone_module(model, replace=layers).eval()


def round_ranks(space: RankSpace, config: Config, multiple: int) -> Config:
    """``config`` with every rank component rounded to the nearest multiple of ``multiple``
    (at least ``multiple``, at most the site's maximum rank)."""
    out = {}
    for name, choice in config.items():
        if choice.rank is None:
            out[name] = choice
            continue
        top = factorize.get(choice.method).max_rank(space.site(name))

        def near(value: int, limit: int) -> int:
            return min(limit, max(multiple, multiple * round(value / multiple)))

        rank = (tuple(near(v, t) for v, t in zip(choice.rank, top, strict=True))
                if isinstance(choice.rank, tuple) else near(choice.rank, top))
        out[name] = Choice(choice.method, rank)
    return space.validate(Config(out))


def subset(task: Task, images: int, seed: int) -> Task:
    """``task`` with a seeded random ``images`` of its training set."""
    order = np.random.default_rng(seed).permutation(len(task.train))[:images]
    return replace(task, train=Subset(task.train, order.tolist()))


class JsonCache:
    """A dict persisted to one JSON file after every write (finished work survives a crash)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        write_atomic(self.path, json.dumps(self.data, indent=1).encode())


# -- one model -------------------------------------------------------------------------------
class ModelBench:
    """Searches, baselines, fine-tuning and latency for one model on one task."""

    def __init__(self, name: str, task: Task, s: Settings) -> None:
        self.name, self.task, self.s = name, task, s
        self.model = pretrained(name, task.name, cache_dir=s.checkpoints, task=task,
                                progress=True, **s.models[name])
        self.example = task.example_input()
        self.inputs = {"b1": task.example_input(1), "b64": task.example_input(64)}
        self.space = RankSpace.discover(self.model, self.example)  # what strategies search
        # every method of the baselines, to price and round any entry's config
        self.priced = RankSpace.discover(self.model, self.example, methods={
            "conv2d": list(UNIFORM_METHODS), "linear": ["svd"]})
        self.costs = CostModel(self.priced)
        self.uniform_spaces = {
            m: RankSpace.discover(self.model, self.example,
                                  methods={"conv2d": [m], "linear": ["svd"]})
            for m in UNIFORM_METHODS
        }
        self.cache = FactorCache(self.model, self.priced)
        self.proxy = ranksearch.ProxySettings(
            steps=s.proxy_steps, lr=s.proxy_lr, batch_size=64, eval_batch_size=256,
            eval_batches=max(1, s.proxy_images // 256), seed=s.seed,
        )
        self.ft_task = subset(task, s.finetune_images, s.seed)
        self.finetuned = JsonCache(s.out / name / "finetuned.json")
        self.timings = JsonCache(s.out / name / "search_seconds.json")
        self.dense_test = evaluate_accuracy(self.model, task.test)
        self.dense_latency = self.latency(self.model)
        self.dense_flops = counted_flops(self.model, self.example)
        self.convs = [x.name for x in self.space.decomposable if x.kind == "conv2d"]
        self.evaluations = max(s.evaluations, len(self.space.decomposable) + 4)

    def search(self, budget: str, strategy: str, options: Mapping[str, Any] | None = None,
               evaluations: int | None = None, space: RankSpace | None = None,
               study: str | None = None) -> tuple[ranksearch.SearchResult, float]:
        start = time.perf_counter()
        result = ranksearch.search(
            self.model, self.task, strategy=strategy, strategy_options=options,
            constraints=[budget], objectives=("accuracy", budget_metric(budget)),
            evaluations=evaluations or self.evaluations, proxy=self.proxy,
            out=str(self.s.out / self.name), seed=self.s.seed, space=space or self.space,
            study=study, share_results=True,
        )
        seconds = time.perf_counter() - start
        # a search that only replayed stored results keeps the time of the run that did them
        key = timing_key(budget, strategy, options, study)
        if result.evaluated or key not in self.timings:
            self.timings[key] = seconds
        return result, self.timings[key]

    def entries(self, budget: str) -> tuple[list[Entry], dict[str, list]]:
        """Every strategy's pick and every baseline under ``budget``, and each strategy's
        stored results (for its front)."""
        entries, runs = [], {}
        for strategy in self.s.strategies:
            result, seconds = self.search(budget, strategy, STRATEGY_OPTIONS.get(strategy))
            runs[strategy] = result.results
            top = result.best()
            print(f"  {strategy:13} {result.evaluated:3d} new evaluations, {seconds:7.1f} s, "
                  f"best proxy accuracy {top.metrics['accuracy'] if top else float('nan'):.4f}",
                  flush=True)
            if top is not None:
                entries.append(Entry(strategy, "strategy", top.config,
                                     top.metrics["accuracy"], seconds))
        for method, space in self.uniform_spaces.items():
            # each site's first method: ``method`` on convolutions, svd on linear layers
            result, seconds = self.search(budget, "uniform", {"count": 1}, evaluations=1,
                                          space=space, study=f"uniform-{method}-{slug(budget)}")
            top = result.best()
            if top is not None:
                entries.append(Entry(f"uniform {method}", "baseline", top.config,
                                     top.metrics["accuracy"], seconds))
        result, seconds = self.search(budget, "vbmf", {"one_shot": True}, evaluations=1)
        if (top := result.best()) is not None:
            entries.append(Entry("vbmf one-shot", "baseline", top.config,
                                 top.metrics["accuracy"], seconds))
        if self.s.tltorch and (entry := self.tltorch_entry(budget)) is not None:
            entries.append(entry)
        return entries, runs

    def tltorch_entry(self, budget: str) -> Entry | None:
        try:
            import tltorch  # noqa: F401
        except ImportError:
            print("  tensorly-torch: skipped (pip install tensorly-torch)", flush=True)
            return None
        start = time.perf_counter()
        c = Constraint.parse(budget)
        dense = (weight_params(self.model) if c.metric == "params" else self.dense_flops)
        limit = c.value if c.relative else c.value / dense

        def ratio(fraction: float) -> float:
            built = tltorch_model(self.model, self.convs, fraction, decompose=False)
            if c.metric == "params":
                return weight_params(built) / dense
            return counted_flops(built, self.example) / dense

        fraction = largest_fraction(ratio, limit)
        if fraction is None:
            print(f"  tensorly-torch: skipped, {budget} is out of reach with only the "
                  "convolutions factorized", flush=True)
            return None
        return Entry("tensorly-torch tucker", "baseline", None, None,
                     time.perf_counter() - start, fraction)

    def build(self, entry: Entry, decompose: bool = True) -> nn.Module:
        if entry.config is None:
            return tltorch_model(self.model, self.convs, entry.fraction, decompose)
        return ranksearch.compress(self.model, entry.config,
                                   cache=self.cache if decompose else None, decompose=decompose)

    def finetuned_model(self, entry: Entry) -> tuple[nn.Module, dict[str, float]]:
        """The compressed model (fine-tuned unless its result is cached) and its test accuracy
        after the one-shot schedule of `ranksearch.schedules.finetune`: decompose, then
        ``finetune_epochs`` of `train_baseline` on the fine-tuning subset."""
        key = (f"tltorch:{entry.fraction:.6f}" if entry.config is None else entry.config.key)
        if key in self.finetuned:
            return self.build(entry, decompose=False), self.finetuned[key]
        start, s = time.perf_counter(), self.s
        module = self.build(entry)
        train_baseline(module, self.ft_task, epochs=s.finetune_epochs, lr=s.finetune_lr,
                       batch_size=s.batch_size, seed=s.seed)
        self.finetuned[key] = {"test_accuracy": evaluate_accuracy(module, self.task.test),
                               "seconds": time.perf_counter() - start}
        return module, self.finetuned[key]

    def latency(self, module: nn.Module) -> dict[str, float]:
        """Median latency (seconds) of ``module`` at batch 1 and batch 64."""
        repeats = self.s.latency_repeats
        return {"b1": measure_latency(module, self.inputs["b1"], warmup=2, repeats=repeats),
                "b64": measure_latency(module, self.inputs["b64"], warmup=2,
                                       repeats=max(3, repeats // 6))}

    def speedups(self, module: nn.Module) -> dict[str, float]:
        """Dense latency over ``module``'s at batch 1 and 64: the median ratio of
        ``latency_rounds`` back-to-back pairs, so that drift in the machine's speed cancels."""
        pairs = [(self.latency(self.model), self.latency(module))
                 for _ in range(self.s.latency_rounds)]
        return {b: float(np.median([dense[b] / own[b] for dense, own in pairs]))
                for b in ("b1", "b64")}

    def costs_of(self, entry: Entry, module: nn.Module) -> dict[str, float]:
        if entry.config is not None:
            m = self.costs.metrics(entry.config)
            return {"params_ratio": m["params_ratio"], "flops_ratio": m["flops_ratio"]}
        return {"params_ratio": weight_params(module) / weight_params(self.model),
                "flops_ratio": counted_flops(module, self.example) / self.dense_flops}

    def row(self, entry: Entry) -> dict[str, Any]:
        module, tuned = self.finetuned_model(entry)
        speed = self.speedups(module)
        row = {
            "label": entry.label, "kind": entry.kind, "proxy_accuracy": entry.proxy_accuracy,
            "test_accuracy": tuned["test_accuracy"], **self.costs_of(entry, module),
            "speedup_b1": speed["b1"], "speedup_b64": speed["b64"],
            "search_seconds": entry.search_seconds, "finetune_seconds": tuned["seconds"],
            "config": (format_config(entry.config) if entry.config is not None
                       else f"tensorly-torch tucker rank={entry.fraction:.4f}"),
        }
        if entry.config is not None:
            rounded = round_ranks(self.priced, entry.config, self.s.multiple)
            fast = self.speedups(ranksearch.compress(self.model, rounded, decompose=False))
            row |= {
                "rounded_flops_ratio": self.costs.metrics(rounded)["flops_ratio"],
                "rounded_speedup_b1": fast["b1"], "rounded_speedup_b64": fast["b64"],
            }
        return row

    def run(self, budget: str) -> dict[str, Any]:
        print(f"\n{self.name}, {budget}", flush=True)
        entries, runs = self.entries(budget)
        rows = []
        for entry in entries:
            rows.append(self.row(entry))
            r = rows[-1]
            print(f"  {entry.label:22} test accuracy {r['test_accuracy']:.4f}  params "
                  f"{r['params_ratio']:.3f}  FLOPs {r['flops_ratio']:.3f}  speed-up "
                  f"{r['speedup_b1']:.2f} / {r['speedup_b64']:.2f}", flush=True)
        c = Constraint.parse(budget)
        metric = c.metric
        dense_cost = self.costs.dense()[metric]
        reference = {"accuracy": 1.0 / self.task.num_classes,
                     metric: c.value * dense_cost if c.relative else c.value}
        volumes = {name: hypervolume(results, ("accuracy", metric), reference, [budget])
                   for name, results in runs.items()}
        figure = front_figure(runs, metric, ("accuracy", metric), [budget])
        plot = None
        if figure is not None:
            ax = figure.axes[0]
            ax.set_title(f"{self.name}, {budget}: proxy accuracy of each strategy")
            if c.relative:  # the budget's neighbourhood; probes of single layers lie far right
                ax.set_xlim(0, 1.2 * c.value)
            buf = io.BytesIO()
            figure.savefig(buf, format="png", dpi=90)
            plot = write_atomic(self.s.results / f"quality-{self.name}-{slug(budget)}.png",
                                buf.getvalue())
        return {"budget": budget, "rows": rows, "hypervolume": volumes,
                "plot": plot.name if plot else None}


# -- summary ---------------------------------------------------------------------------------
def summarize(cell: Mapping[str, Any]) -> dict[str, Any]:
    """Best strategy against the best uniform baseline, and the front's hypervolume ratio."""
    rows = cell["rows"]
    strategies = [r for r in rows if r["kind"] == "strategy" and r["label"] != "uniform"]
    uniform = [r for r in rows if r["label"].startswith("uniform")]  # the sweep counts too
    out: dict[str, Any] = {}
    if strategies and uniform:
        best = max(strategies, key=lambda r: r["test_accuracy"])
        base = max(uniform, key=lambda r: r["test_accuracy"])
        out |= {"best_strategy": best["label"], "best_uniform": base["label"],
                "gain_points": 100 * (best["test_accuracy"] - base["test_accuracy"])}
        volumes = cell["hypervolume"]
        if volumes.get("uniform"):
            out["hypervolume_ratio"] = volumes.get(best["label"], 0.0) / volumes["uniform"]
    if budget_metric(cell["budget"]) == "flops":
        # measured speed-up as a fraction of the FLOPs reduction (1 / flops ratio)
        out["speed_efficiency"] = {
            r["label"]: {b: r[f"speedup_{b}"] * r["flops_ratio"] for b in ("b1", "b64")}
            for r in rows
        }
    return out


def markdown(report: Mapping[str, Any]) -> str:
    lines = []
    for model, data in report["models"].items():
        lines += [f"### {model}", "",
                  f"Dense test accuracy {data['dense_test_accuracy']:.4f}; dense CPU latency "
                  f"{1e3 * data['dense_latency']['b1']:.2f} ms at batch 1, "
                  f"{1e3 * data['dense_latency']['b64']:.1f} ms at batch 64. "
                  f"{data['evaluations']} proxy evaluations per strategy and budget.", ""]
        for cell in data["cells"]:
            lines += [f"**{cell['budget']}**", "",
                      "| method | proxy acc | test acc | params × | FLOPs × | speed-up b1 / b64 "
                      "| ranks ×8: FLOPs ×, speed-up b1 / b64 | search s | fine-tune s |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for r in cell["rows"]:
                proxy = "-" if r["proxy_accuracy"] is None else f"{r['proxy_accuracy']:.4f}"
                rounded = ("-" if "rounded_speedup_b1" not in r else
                           f"{r['rounded_flops_ratio']:.3f}, {r['rounded_speedup_b1']:.2f} / "
                           f"{r['rounded_speedup_b64']:.2f}")
                lines.append(
                    f"| {r['label']} | {proxy} | {r['test_accuracy']:.4f} | "
                    f"{r['params_ratio']:.3f} | {r['flops_ratio']:.3f} | "
                    f"{r['speedup_b1']:.2f} / {r['speedup_b64']:.2f} | {rounded} | "
                    f"{r['search_seconds']:.0f} | {r['finetune_seconds']:.0f} |")
            summary = cell["summary"]
            if "gain_points" in summary:
                hv = summary.get("hypervolume_ratio")
                lines += ["", f"Best strategy {summary['best_strategy']} vs best uniform "
                              f"({summary['best_uniform']}): {summary['gain_points']:+.2f} points"
                              + (f"; front hypervolume ratio vs uniform {hv:.3f}" if hv else "")
                              + "."]
            if "speed_efficiency" in summary:
                shares = summary["speed_efficiency"]
                met = sum(v["b1"] >= 0.7 or v["b64"] >= 0.7 for v in shares.values())
                lines += ["", "Measured speed-up as a share of the FLOPs reduction (target 0.7): "
                              f"median {np.median([v['b1'] for v in shares.values()]):.2f} at "
                              f"batch 1, {np.median([v['b64'] for v in shares.values()]):.2f} "
                              f"at batch 64; {met} of {len(shares)} configurations reach 0.7 "
                              "at either batch size."]
            if cell.get("plot"):
                lines += ["", f"![{model} {cell['budget']}]({cell['plot']})"]
            lines.append("")
    return "\n".join(lines)


def hardware() -> dict[str, Any]:
    return {"machine": platform.machine(), "processor": platform.processor() or "unknown",
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def portable(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` for a report: paths as text, relative to the repository when inside it
    (a report names no folder of the machine it was made on)."""
    root = HERE.parent
    out = {}
    for key, value in settings.items():
        if isinstance(value, Path):
            value = str(value.relative_to(root) if value.is_relative_to(root) else value)
        out[key] = value
    return out


def run(s: Settings) -> dict[str, Any]:
    """Run the benchmark; returns the report written to ``s.results / quality.json`` (which
    keeps the models and budgets of earlier runs that this one does not repeat)."""
    task = load_task(s.task)
    settings = portable(asdict(s))
    saved = s.results / "quality.json"
    # models run before (by another invocation, e.g. ``--models vgg-small``) are kept
    report: dict[str, Any] = {
        "hardware": hardware(), "not_run": NOT_RUN,
        "models": json.loads(saved.read_text())["models"] if saved.is_file() else {},
    }
    for name in s.models:
        t0 = time.perf_counter()
        bench = ModelBench(name, task, s)
        print(f"\n{name}: dense test accuracy {bench.dense_test:.4f}; {bench.evaluations} "
              "proxy evaluations per strategy and budget", flush=True)
        # cells of budgets this run does not repeat are kept
        kept = [c for c in report["models"].get(name, {}).get("cells", [])
                if c["budget"] not in s.budgets]
        data = report["models"][name] = {
            "dense_test_accuracy": bench.dense_test, "dense_latency": bench.dense_latency,
            "baseline_training": dict(s.models[name]), "evaluations": bench.evaluations,
            "settings": settings, "cells": kept,
        }
        for budget in s.budgets:
            cell = bench.run(budget)
            cell["summary"] = summarize(cell)
            order: dict[str, int] = {}
            for b in (*BUDGETS, *s.budgets):
                order.setdefault(b, len(order))
            data["cells"] = sorted([*data["cells"], cell],
                                   key=lambda c: order.get(c["budget"], len(order)))
            data["seconds"] = time.perf_counter() - t0
            write(report, s.results)  # after every cell, so a partial run leaves its tables
    return report


def write(report: Mapping[str, Any], folder: Path) -> None:
    write_atomic(folder / "quality.json", json.dumps(report, indent=1).encode())
    write_atomic(folder / "quality.md", markdown(report).encode())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--evaluations", type=int, default=Settings.evaluations)
    parser.add_argument("--proxy-steps", type=int, default=Settings.proxy_steps)
    parser.add_argument("--out", type=Path, default=Settings.out)
    parser.add_argument("--results", type=Path, default=Settings.results)
    parser.add_argument("--no-tltorch", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not ensure_fashion_mnist():
        return 0
    s = Settings(models={m: MODELS[m] for m in args.models}, budgets=tuple(args.budgets),
                 strategies=tuple(args.strategies), evaluations=args.evaluations,
                 proxy_steps=args.proxy_steps, out=args.out, results=args.results,
                 tltorch=not args.no_tltorch)
    start = time.perf_counter()
    report = run(s)
    print("\n" + markdown(report))
    print(f"total {time.perf_counter() - start:.0f} s; wrote {s.results / 'quality.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
