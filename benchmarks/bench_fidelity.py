"""Proxy fidelity: how well each proxy score ranks configurations by their final accuracy.

For ResNet-20 and the small VGG on Fashion-MNIST (the quality benchmark's checkpoints), the
first ``--configs`` configurations of a seeded sequence spread over params ratios 0.15–0.8
(config i aims at 0.15 + 0.65 · frac(i · golden ratio); each layer's share of parameters is
drawn log-uniformly around that level; tucker2 on convolutions, svd on linear layers, the
search's default space) are each fine-tuned with the quality benchmark's final schedule (one
epoch over 6000 training images, AdamW lr 2e-3, batch 128, weight-only factors) and scored on a
fixed subset of ``--test-images`` test images: their final accuracy.

Proxies, each a `ProxySettings` of the search scoring on 512 validation images:

* ``zero``: zero-shot; ``zero_bn``: with BatchNorm recalibrated on 8 training batches;
  ``zero_da`` / ``zero_da_bn``: the same with data-aware factors (8 calibration batches);
* ``ft10``, ``ft10_bn``, ``ft50``, ``ft200``: 10 / 50 / 200 fine-tuning steps (Adam lr 3e-3,
  batch 64: the quality benchmark's search proxy), ``ft10_bn`` with BatchNorm recalibrated
  before the steps. ``ft50`` and ``ft200`` are read from one 200-step run (the proxy's score
  after step k is the same as a k-step proxy's, which is checked on each model's first
  configuration), each timed as its own run would be (the other intermediate validations are
  left out).

Reports Kendall τ and Spearman ρ (scipy.stats) between each proxy and the final accuracy per
model, and each proxy's seconds per configuration (the one-off input statistics of the
data-aware proxies and the BatchNorm batches are not in it). Every final accuracy and proxy
score is cached under ``benchmarks/out/fidelity`` as it finishes, so a re-run (or a larger
one) resumes. ``--configs``, ``--models`` and ``--proxies`` run a part.

Run: ``python benchmarks/bench_fidelity.py`` (full: 30 configs, both models).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch
from bench_data_aware import QUALITY, finetune, finetune_task, load_model, test_subset
from bench_quality import MODELS, JsonCache, hardware
from fashion import ensure_fashion_mnist
from torch import nn

import ranksearch
from ranksearch import factorize
from ranksearch.config import Choice, Config
from ranksearch.cost import CostModel
from ranksearch.datasets import load_task
from ranksearch.evaluate import Evaluator, ProxySettings
from ranksearch.result import Result
from ranksearch.space import RankSpace
from ranksearch.task import Task
from ranksearch.training import evaluate_accuracy

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "fidelity"
GOLDEN = (math.sqrt(5) - 1) / 2
LOW, HIGH = 0.15, 0.8
PROXY = ProxySettings(lr=QUALITY.proxy_lr, batch_size=64, eval_batch_size=256,
                      eval_batches=max(1, QUALITY.proxy_images // 256), seed=QUALITY.seed,
                      bn_recalibrate=0)
ONE_RUN = {
    "zero": PROXY,
    "zero_bn": replace(PROXY, bn_recalibrate=8),
    "zero_da": replace(PROXY, data_aware=True),
    "zero_da_bn": replace(PROXY, data_aware=True, bn_recalibrate=8),
    "ft10": replace(PROXY, steps=10),
    "ft10_bn": replace(PROXY, steps=10, bn_recalibrate=8),
}
#: Proxies read from one run of `LONG` steps, reporting every `REPORT_EVERY`.
FROM_LONG = {"ft50": 50, "ft200": 200}
LONG, REPORT_EVERY = 200, 50
PROXIES = (*ONE_RUN, *FROM_LONG)


# -- configurations --------------------------------------------------------------------------
def config_at(space: RankSpace, costs: CostModel, seed: int, i: int) -> Config:
    """Config ``i`` of the sequence (see the module docstring): layer s keeps the largest grid
    rank with at most min(1, a · w_s) of its parameters (dense when that is 1), w_s drawn
    log-uniformly in [1/3, 3] from (seed, i), a set by bisection so that the params ratio is
    at most the target."""
    target = LOW + (HIGH - LOW) * ((i * GOLDEN) % 1.0)
    rng = np.random.default_rng([seed, i])
    sites = list(space.decomposable)
    weights = np.exp(rng.uniform(np.log(1 / 3), np.log(3), len(sites)))

    def build(scale: float) -> Config:
        choices = {}
        for site, w in zip(sites, weights, strict=True):
            share = scale * float(w)
            if share >= 1:
                continue
            method = site.methods[0]
            fac, grid = factorize.get(method), space.ranks(site.name, method)
            fits = [r for r in grid if fac.params(site, r) <= share * site.dense_params]
            choices[site.name] = Choice(method, fits[-1] if fits else grid[0])
        return Config(choices)

    lo, hi = 1e-3, 3.0 * 3
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if costs.metrics(build(mid))["params_ratio"] <= target else (lo, mid)
    return build(lo)


# -- one model ---------------------------------------------------------------------------------
class TimedEvaluator(Evaluator):
    """An `Evaluator` that keeps how long each validation took (``validations``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.validations: list[float] = []

    def validate(self, model: nn.Module, batches: list[tuple] | None = None
                 ) -> dict[str, float]:
        start = time.perf_counter()
        out = super().validate(model, batches)
        self.validations.append(time.perf_counter() - start)
        return out


class ModelFidelity:
    """Final accuracies and proxy scores of one model's configurations, cached."""

    def __init__(self, name: str, task: Task, test_images: int, out: Path, seed: int) -> None:
        self.name, self.task, self.seed = name, task, seed
        self.model = load_model(name, task)
        self.space = RankSpace.discover(self.model, task.example_input())
        self.costs = CostModel(self.space)
        self.test = test_subset(task, test_images)
        self.train = finetune_task(task)
        self.data = JsonCache(out / f"{name}-seed{seed}-test{len(self.test)}.json")
        self._evaluators: dict[str, TimedEvaluator] = {}
        self.setup_seconds: dict[str, float] = {}
        self._configs: dict[int, Config] = {}

    def evaluator(self, proxy: str) -> TimedEvaluator:
        if proxy not in self._evaluators:
            settings = ONE_RUN.get(proxy) or replace(PROXY, steps=LONG,
                                                       report_every=REPORT_EVERY)
            start = time.perf_counter()
            self._evaluators[proxy] = TimedEvaluator(self.model, self.task, settings,
                                                     self.space)
            self.setup_seconds[proxy] = time.perf_counter() - start
        return self._evaluators[proxy]

    def config(self, i: int) -> Config:
        if i not in self._configs:
            self._configs[i] = config_at(self.space, self.costs, self.seed, i)
        return self._configs[i]

    def entry(self, i: int) -> tuple[str, dict[str, Any]]:
        """The cache key of config ``i`` and what is cached of it."""
        config = self.config(i)
        if config.key not in self.data:
            self.data[config.key] = {"index": i, "proxies": {},
                                     "params_ratio": self.costs.metrics(config)["params_ratio"]}
        return config.key, self.data[config.key]

    def final(self, i: int) -> float:
        key, entry = self.entry(i)
        if "final" not in entry:
            start = time.perf_counter()
            module = ranksearch.compress(self.model, self.config(i))
            finetune(module, self.train)
            entry = {**entry, "final": evaluate_accuracy(module, self.test),
                     "final_seconds": time.perf_counter() - start}
            self.data[key] = entry
        return entry["final"]

    def proxies(self, i: int, wanted: tuple[str, ...]) -> dict[str, dict[str, float]]:
        key, entry = self.entry(i)
        config = self.config(i)
        scores = dict(entry["proxies"])
        for proxy in wanted:
            if proxy in scores or proxy in FROM_LONG:
                continue
            result = self.evaluator(proxy)(config)
            scores[proxy] = scored(result)
            self.data[key] = {**self.data[key], "proxies": scores}
        if any(p in FROM_LONG and p not in scores for p in wanted):
            scores |= self.long_run(config)
            self.data[key] = {**self.data[key], "proxies": scores}
        return scores

    def long_run(self, config: Config) -> dict[str, dict[str, float]]:
        """``ft50`` and ``ft200`` from one run of `LONG` steps: score after each step k, and
        the run's time to it less the other validations before it."""
        evaluator = self.evaluator("long")
        reports: dict[int, tuple[float, float]] = {}
        evaluator.validations.clear()
        start = time.perf_counter()

        def report(step: int, score: float) -> bool:
            earlier = sum(evaluator.validations[:-1])
            reports[step] = (score, time.perf_counter() - start - earlier)
            return True

        result = evaluator(config, report=report)
        if not result.ok:
            return {p: {"score": float("nan"), "seconds": result.wall_time} for p in FROM_LONG}
        return {p: {"score": reports[k][0], "seconds": reports[k][1]}
                for p, k in FROM_LONG.items()}

    def check_long(self, i: int) -> None:
        """The ``ft50`` score read from the long run equals a 50-step proxy's own score."""
        _, entry = self.entry(i)
        if "ft50" not in entry["proxies"]:
            return
        own = Evaluator(self.model, self.task, replace(PROXY, steps=50),
                        self.space)(self.config(i))
        got = entry["proxies"]["ft50"]["score"]
        if own.metrics["accuracy"] != got:
            raise SystemExit(f"{self.name}: the 50-step score of the long run {got} differs from "
                             f"a 50-step proxy's {own.metrics['accuracy']}")
        print(f"  checked: the long run's score at step 50 equals a 50-step proxy's ({got:.4f})",
              flush=True)


def scored(result: Result) -> dict[str, float]:
    value = result.metrics.get("accuracy", float("nan")) if result.ok else float("nan")
    return {"score": value, "seconds": result.wall_time}


def correlations(finals: list[float], scores: list[float]) -> dict[str, float]:
    pairs = [(f, s) for f, s in zip(finals, scores, strict=True) if math.isfinite(s)]
    if len(pairs) < 3:
        return {"kendall": float("nan"), "spearman": float("nan"), "n": len(pairs)}
    f, s = zip(*pairs, strict=True)
    return {"kendall": float(scipy.stats.kendalltau(f, s).statistic),
            "spearman": float(scipy.stats.spearmanr(f, s).statistic), "n": len(pairs)}


def summarize(bench: ModelFidelity, indices: range, wanted: tuple[str, ...]
              ) -> dict[str, Any]:
    entries = [bench.entry(i)[1] for i in indices]
    done = [e for e in entries if "final" in e]
    finals = [e["final"] for e in done]
    rows = {}
    for proxy in wanted:
        have = [e for e in done if proxy in e["proxies"]]
        if not have:
            continue
        stats = correlations([e["final"] for e in have],
                             [e["proxies"][proxy]["score"] for e in have])
        stats["seconds"] = float(np.mean([e["proxies"][proxy]["seconds"] for e in have]))
        rows[proxy] = stats
    return {"configs": len(done), "final": {"min": min(finals, default=float("nan")),
                                            "max": max(finals, default=float("nan"))},
            "params_ratio": [e["params_ratio"] for e in done],
            "final_seconds": float(np.mean([e["final_seconds"] for e in done])) if done else 0,
            "setup_seconds": bench.setup_seconds, "proxies": rows}


def markdown(report: dict[str, Any]) -> str:
    models = list(report["models"])
    head = "| proxy | " + " | ".join(f"{m}: τ / ρ / s" for m in models) + " |"
    lines = [head, "|---|" + "---|" * len(models)]
    for proxy in PROXIES:
        cells = []
        for m in models:
            row = report["models"][m]["proxies"].get(proxy)
            cells.append("-" if row is None else
                         f"{row['kendall']:.2f} / {row['spearman']:.2f} / {row['seconds']:.1f}")
        if any(c != "-" for c in cells):
            lines.append(f"| {proxy} | " + " | ".join(cells) + " |")
    lines.append("")
    for m in models:
        d = report["models"][m]
        lines.append(f"{m}: {d['configs']} configs, params ratio "
                     f"{min(d['params_ratio'], default=0):.2f}–"
                     f"{max(d['params_ratio'], default=0):.2f}, final accuracy "
                     f"{d['final']['min']:.4f}–{d['final']['max']:.4f} "
                     f"({d['final_seconds']:.0f} s each).")
    return "\n".join(lines)


def run_model(name: str, task: Task, args: argparse.Namespace, wanted: tuple[str, ...],
              emit: Callable[[str], None]) -> dict[str, Any]:
    bench = ModelFidelity(name, task, args.test_images, args.out, args.seed)
    indices = range(args.configs)
    for i in indices:
        start = time.perf_counter()
        final = bench.final(i)
        scores = bench.proxies(i, wanted)
        if i == 0:
            bench.check_long(i)
        emit(f"  {name} config {i} (params {bench.entry(i)[1]['params_ratio']:.3f}): final "
             f"{final:.4f}; " + ", ".join(f"{p} {scores[p]['score']:.4f}" for p in wanted
                                          if p in scores)
             + f" ({time.perf_counter() - start:.0f} s)")
    return summarize(bench, indices, wanted)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--configs", type=int, default=30)
    parser.add_argument("--proxies", nargs="+", default=list(PROXIES), choices=list(PROXIES))
    parser.add_argument("--test-images", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not ensure_fashion_mnist():
        return 0
    task = load_task(QUALITY.task)
    wanted = tuple(p for p in PROXIES if p in args.proxies)
    report: dict[str, Any] = {"hardware": hardware(), "configs": args.configs,
                              "test_images": args.test_images, "seed": args.seed,
                              "models": {}}
    start = time.perf_counter()
    for name in args.models:
        report["models"][name] = run_model(name, task, args, wanted,
                                           lambda line: print(line, flush=True))
        path = args.out / f"fidelity-{args.configs}.json"
        path.write_text(json.dumps(report, indent=1))
    print("\n" + markdown(report))
    print(f"\ntotal {time.perf_counter() - start:.0f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
