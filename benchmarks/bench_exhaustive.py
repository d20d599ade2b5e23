"""Every strategy against the exhaustive front of spaces small enough to enumerate.

Two models, each with a coarse rank grid whose every configuration is scored with the
zero-shot proxy; those fronts are the limit:

- ``digits``: the trained digits CNN, ``--choices`` ranks per site (dense included), 243
  configurations;
- ``fashion``: a 7-layer Fashion-MNIST CNN (``FashionCNN``) trained briefly once (cached
  under ``--out``), its 6 layers after the stem searched with 4 choices each (4,096
  configurations), scored on a ``--val-size`` validation subset.

The exhaustive table is computed once per model and cached as JSON under ``--out`` (keyed by
the evaluator's fingerprint: weights, data, proxy and space), so re-runs are instant. It is
computed layer by layer, sharing the activations of common prefixes, and checked against the
real evaluator on a few configurations.

Each strategy then searches the same space in each setting (``free``: unconstrained;
``flopsX``: ``flops<=X``, hypervolume of the feasible points only), its evaluations answered
from the table (`Lookup`), with ``--seeds`` seeds. Rows: every registered strategy (those that
cannot apply are skipped with the reason), ``tpe`` (plain Optuna ``TPESampler``, one categorical
per site over the space's choices: cheaper-than-dense ranks and dense; every trial counts as an
evaluation, repeats included; the constraint goes to ``constraints_func``) and
``feasible-random`` (uniform draws without replacement among the table's feasible configs).
Columns: the fraction of the exhaustive hypervolume (accuracy vs FLOPs) reached after each
budget, median and worst seed; ``evals@64``: evaluations actually used (median; a strategy
that stops early shows it); ``best``: constrained only, seeds whose results hold the best
feasible accuracy of the table; ``off-grid``: configs asked outside the table (tucker2 ranks
chosen independently), evaluated for real; ``s/seed``: wall seconds per seed.

Run (the defaults)::

    python benchmarks/bench_exhaustive.py --models digits fashion --settings free flops0.4 \
        --seeds 5 --budgets 16 32 64

Options: ``--strategies NAME ...`` (registered names, ``tpe``, ``feasible-random``; default
all), ``--out DIR`` (tables, checkpoints, ``exhaustive.md`` and a plot of the fronts),
``--threads N``, ``--val-size N`` (Fashion-MNIST validation subset), ``--choices N`` (digits
grid).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import torch
from fashion import ensure_fashion_mnist
from matplotlib.figure import Figure
from torch import nn

import ranksearch
from ranksearch.config import Config
from ranksearch.constraints import parse_constraints
from ranksearch.datasets import load_task
from ranksearch.errors import RankSearchError
from ranksearch.evaluate import Evaluator, ProxySettings
from ranksearch.executors import LocalExecutor, Loop
from ranksearch.metrics import METRICS, Meter, prediction
from ranksearch.pareto import front, hypervolume, parse_objectives, reference_point
from ranksearch.result import Result
from ranksearch.store import quiet_optuna
from ranksearch.strategy import available_strategies
from ranksearch.task import Task
from ranksearch.training import pretrained, train_baseline

OBJECTIVES = parse_objectives(("accuracy", "flops"))
EXTRA = ("tpe", "feasible-random")


# ----------------------------------------------------------------------------- the models
def _block(i: int, o: int) -> list[nn.Module]:
    return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]


class FashionCNN(nn.Module):
    """A small 7-layer CNN for 1×28×28 inputs: a stride-2 stem, three 3×3 convs, three linear
    layers. The stem (one input channel) is left out of the searched space."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            *_block(8, 16), nn.MaxPool2d(2), *_block(16, 32), *_block(32, 32),
            nn.AdaptiveAvgPool2d(3))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(288, 64), nn.ReLU(),
                                        nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


FASHION_TRAIN = {"epochs": 4, "lr": 3e-3, "batch_size": 128, "seed": 0}


def fashion_cnn(task: Task, cache: Path) -> nn.Module:
    """`FashionCNN` trained on ``task`` (weights cached in ``cache``)."""
    torch.manual_seed(0)
    model = FashionCNN()
    tag = hashlib.sha256(f"{model!r} {sorted(FASHION_TRAIN.items())}".encode()).hexdigest()
    path = cache / f"fashion-cnn-{tag[:12]}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        print("training the Fashion-MNIST CNN once ...", flush=True)
        got = train_baseline(model, task, **FASHION_TRAIN)
        print(f"  val accuracy {got['val_accuracy']:.3f} in {got['seconds']:.0f} s")
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval()


def setup(name: str, args: argparse.Namespace, out: Path) -> Evaluator:
    """The evaluator (model, task, space) of benchmark model ``name``."""
    if name == "digits":
        task = load_task("digits")
        model = pretrained("digits-cnn", "digits", cache_dir=out / "checkpoints", task=task)
        space = ranksearch.RankSpace.discover(model, task.example_input(),
                                              max_choices=args.choices)
    elif name == "fashion":
        if not ensure_fashion_mnist():
            raise SystemExit("Fashion-MNIST is not available; pass --models digits")
        task = load_task("fashion-mnist", train_size=12000, val_size=args.val_size)
        model = fashion_cnn(task, out / "checkpoints")
        space = ranksearch.RankSpace.discover(model, task.example_input(), max_choices=4,
                                              exclude=["features.0"])
    else:
        raise SystemExit(f"unknown model {name!r}; choose digits or fashion")
    # zero-shot as the shared-prefix table scores it: the dense model's BatchNorm statistics
    return Evaluator(model, task, ProxySettings(bn_recalibrate=0), space=space)


# ----------------------------------------------------------------------------- the table
def _chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's leaf modules in order when it is a chain of `nn.Sequential` children."""
    return [(f"{top}.{name}", module) for top, seq in model.named_children()
            for name, module in seq.named_children()]


def exhaustive(evaluator: Evaluator) -> dict[str, Result]:
    """Every config of the space scored zero-shot, sharing the activations of common prefixes
    (a chain of layers), checked against ``evaluator`` on a few configs."""
    space, model, task = evaluator.space, evaluator.model, evaluator.task
    chain = _chain(model)
    position = {name: i for i, (name, _) in enumerate(chain)}
    sites = sorted(space.names, key=position.__getitem__)
    modules = {s: {str(c): evaluator.build(Config({s: c})).get_submodule(s).eval()
                   for c in space.choices(s)} for s in sites}
    batches = [(x, y) for x, y in task.loader("val", evaluator.settings.eval_batch_size)]
    with torch.inference_mode():
        check = [model(x) for x, _ in batches]

        def run(xs: list[torch.Tensor], start: int, stop: int) -> list[torch.Tensor]:
            for _, module in chain[start:stop]:
                xs = [module(x) for x in xs]
            return xs

        dense = run([x for x, _ in batches], 0, len(chain))
        if not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(dense, check, strict=True)):
            raise SystemExit("the model is not a chain of its Sequential children")
        outputs: dict[tuple[str, ...], list[torch.Tensor]] = {}

        def walk(depth: int, xs: list[torch.Tensor], start: int, picked: tuple[str, ...]
                 ) -> None:
            if depth == len(sites):
                outputs[picked] = run(xs, start, len(chain))
                return
            site = sites[depth]
            xs = run(xs, start, position[site])
            for text, module in modules[site].items():
                walk(depth + 1, [module(x) for x in xs], position[site] + 1, (*picked, text))

        walk(0, [x for x, _ in batches], 0, ())
    template = evaluator(Config())
    by_text = {s: {str(c): c for c in space.choices(s)} for s in sites}
    table = {}
    for picked, outs in outputs.items():
        config = Config({s: by_text[s][t] for s, t in zip(sites, picked, strict=True)})
        meter = Meter((evaluator.metric, METRICS["loss"]), task.loss)
        for out, (_, y) in zip(outs, batches, strict=True):
            meter.add(prediction(out, task.output), y)
        metrics = {**evaluator.costs.metrics(config), **meter.values()}
        table[config.key] = dataclasses.replace(template, config=config, metrics=metrics)
    for config in random.Random(0).sample([r.config for r in table.values()], 4):
        real = evaluator(config).metrics
        mine = table[config.key].metrics
        if abs(real["accuracy"] - mine["accuracy"]) > 1e-9 or \
                abs(real["loss"] - mine["loss"]) > 1e-4 * max(1.0, abs(real["loss"])):
            raise SystemExit(f"the shared-prefix table disagrees with the evaluator on "
                             f"{config}: {mine} vs {real}")
    return table


def cached_table(name: str, evaluator: Evaluator, out: Path) -> dict[str, Result]:
    """The exhaustive table of ``evaluator``, from ``out/tables`` when computed before."""
    path = out / "tables" / f"{name}-{evaluator.fingerprint.digest}.json"
    if path.is_file():
        return {r.key: r for r in map(Result.from_json, json.loads(path.read_text()))}
    start = time.perf_counter()
    table = exhaustive(evaluator)
    print(f"{name}: {len(table)} configurations scored in {time.perf_counter() - start:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r.to_json() for r in table.values()]))
    return table


# ----------------------------------------------------------------------------- the searches
class Lookup(LocalExecutor):
    """The local executor, answering evaluations from a table of precomputed results.

    Configs outside the table (strategies that pick tucker2's two ranks independently leave
    the grid's line) and partial scores are evaluated for real; the configs outside are kept
    in ``misses`` (the table itself is left as it is).
    """

    def __init__(self, table: dict[str, Result]) -> None:
        super().__init__(isolate=False)
        self.table = table
        self.misses: dict[str, Result] = {}

    def drive(self, loop: Loop, evaluate: Callable[..., Result]) -> None:
        def answer(config: Config, partial: int | None = None) -> Result:
            if partial is not None:
                return evaluate(config, partial=partial)
            found = self.table.get(config.key) or self.misses.get(config.key)
            if found is None:
                found = self.misses[config.key] = evaluate(config)
            return found

        super().drive(loop, answer)


def run_strategy(name: str, evaluator: Evaluator, table: dict[str, Result],
                 constraints: Sequence[str], budget: int, seed: int, lookup: Lookup
                 ) -> list[Result]:
    """The results of one search, in the order evaluated."""
    if name == "feasible-random":
        cons = parse_constraints(constraints)
        pool = sorted(r.key for r in table.values()
                      if all(c.satisfied(r.metrics) for c in cons))
        return [table[k] for k in random.Random(seed).sample(pool, min(budget, len(pool)))]
    if name == "tpe":
        return tpe(evaluator, table, constraints, budget, seed)
    result = ranksearch.search(
        evaluator.model, evaluator.task, strategy=name, evaluations=budget,
        space=evaluator.space, constraints=constraints, executor=lookup, store="memory",
        seed=seed, proxy=evaluator.settings)
    return result.results


def tpe(evaluator: Evaluator, table: dict[str, Result], constraints: Sequence[str],
        budget: int, seed: int) -> list[Result]:
    """Plain Optuna TPE: one categorical per site, every trial an evaluation."""
    space = evaluator.space
    cons = parse_constraints(constraints)
    choices = {s: {str(c): c for c in space.choices(s)} for s in space.names}
    results: list[Result] = []

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        config = Config({s: choices[s][trial.suggest_categorical(s, list(choices[s]))]
                         for s in space.names})
        r = table[config.key]  # the table holds every config of the grid
        results.append(r)
        trial.set_user_attr("violation", [c.violation(r.metrics) for c in cons])
        return r.metrics["accuracy"], r.metrics["flops"]

    sampler = optuna.samplers.TPESampler(
        seed=seed, constraints_func=(lambda t: t.user_attrs["violation"]) if cons else None)
    with quiet_optuna():
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
        study.optimize(objective, n_trials=budget)
    return results


# ----------------------------------------------------------------------------- the report
def parse_setting(text: str) -> list[str]:
    """``free`` → no constraint; ``flops0.4`` / ``params0.5`` → ``flops<=0.4`` / ..."""
    if text == "free":
        return []
    metric = text.rstrip("0123456789.")
    if not metric or metric == text:
        raise SystemExit(f"setting {text!r}: use free or METRICvalue such as flops0.4")
    return [f"{metric}<={text[len(metric):]}"]


def bench(name: str, evaluator: Evaluator, table: dict[str, Result], setting: str,
          strategies: Sequence[str], args: argparse.Namespace, fronts: dict[str, Any]
          ) -> list[str]:
    """Markdown table rows of one model and setting (printed as they come)."""
    constraints = parse_setting(setting)
    budgets = sorted(args.budgets)
    dense = evaluator.costs.metrics(Config())
    ref = reference_point(OBJECTIVES, dense, scale=1.5)
    enumerated = list(table.values())
    limit = hypervolume(enumerated, OBJECTIVES, ref, constraints)
    cons = parse_constraints(constraints)
    feasible = [r for r in enumerated if r.status == "ok"
                and all(c.satisfied(r.metrics) for c in cons)]
    top = max(r.metrics["accuracy"] for r in feasible)
    print(f"\n## {name}, {setting}: {len(table)} configs, {len(feasible)} feasible, "
          f"best feasible accuracy {top:.4f}, front HV {limit:.4g}")
    head = (["strategy"] + [f"HV@{b} med/worst" for b in budgets]
            + [f"evals@{budgets[-1]}", "best" if constraints else "", "off-grid", "s/seed"])
    head = [h for h in head if h]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    print(lines[0], flush=True)
    fronts[(name, setting, "exhaustive")] = front(enumerated, OBJECTIVES, constraints)
    for strategy in strategies:
        lookup = Lookup(table)
        hv: dict[int, list[float]] = {b: [] for b in budgets}
        used, found = [], 0
        begin = time.perf_counter()
        try:
            for seed in range(args.seeds):
                got = run_strategy(strategy, evaluator, table, constraints, budgets[-1],
                                   seed, lookup)
                for b in budgets:
                    hv[b].append(hypervolume(got[:b], OBJECTIVES, ref, constraints) / limit)
                used.append(len(got))
                found += any(r.status == "ok" and r.metrics["accuracy"] >= top
                             and all(c.satisfied(r.metrics) for c in cons) for r in got)
                if seed == 0:
                    fronts[(name, setting, strategy)] = front(got, OBJECTIVES, constraints)
        except RankSearchError as e:
            why = str(e).splitlines()[0].split(": ")[0][:150]
            print(f"| {strategy} | skipped: {why} |", flush=True)
            lines.append(f"| {strategy} | skipped: {why} |")
            continue
        seconds = (time.perf_counter() - begin) / args.seeds
        cells = [strategy] + [f"{statistics.median(hv[b]):.1%} / {min(hv[b]):.1%}"
                              for b in budgets]
        cells.append(f"{statistics.median(used):g}")
        if constraints:
            cells.append(f"{found}/{args.seeds}")
        cells += [str(len(lookup.misses)), f"{seconds:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return [f"### {name}, {setting}", "",
            f"{len(table)} configs, {len(feasible)} feasible; best feasible accuracy "
            f"{top:.4f}; {args.seeds} seeds.", "", *lines, ""]


def plot(fronts: dict[tuple[str, str, str], list[Result]], path: Path) -> None:
    panels = sorted({(m, s) for m, s, _ in fronts})
    figure = Figure(figsize=(6 * len(panels), 5))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (model, setting) in zip(axes, panels, strict=True):
        for (m, s, label), points in fronts.items():
            if (m, s) != (model, setting) or not points:
                continue
            ax.step([r.metrics["flops_ratio"] for r in points],
                    [r.metrics["accuracy"] for r in points], where="post", marker="o",
                    markersize=3, label=label, linewidth=2.5 if label == "exhaustive" else 1)
        ax.set(xlabel="FLOPs (ratio to dense)", ylabel="accuracy (zero-shot)",
               title=f"{model}, {setting} (seed 0)")
        ax.legend(fontsize=6)
    figure.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits", "fashion"])
    parser.add_argument("--settings", nargs="+", default=["free", "flops0.4"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budgets", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--strategies", nargs="+", default=None)
    parser.add_argument("--choices", type=int, default=3, help="digits: choices per site")
    parser.add_argument("--val-size", type=int, default=256, help="Fashion-MNIST val subset")
    parser.add_argument("--out", default="benchmarks/out/exhaustive")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    registered = list(available_strategies())
    strategies = args.strategies or [*registered, *EXTRA]
    unknown = [s for s in strategies if s not in registered and s not in EXTRA]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; choose from {registered + list(EXTRA)}")
    report = ["# Exhaustive benchmark", "", "    python " + " ".join(sys.argv), ""]
    fronts: dict[tuple[str, str, str], list[Result]] = {}
    for name in args.models:
        evaluator = setup(name, args, out)
        table = cached_table(name, evaluator, out)
        for setting in args.settings:
            report += bench(name, evaluator, table, setting, strategies, args, fronts)
    (out / "exhaustive.md").write_text("\n".join(report))
    plot(fronts, out / "exhaustive_fronts.png")
    print(f"\nwrote {out / 'exhaustive.md'} and {out / 'exhaustive_fronts.png'}")


if __name__ == "__main__":
    main()
