"""The `ranksearch` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from . import factorize
from .cache import FactorCache, effective_rank
from .constraints import parse_constraints
from .cost import CostModel
from .errors import RankSearchError
from .evaluate import ProxySettings
from .export import scored_model, study_of
from .models import build_model
from .pareto import parse_objectives
from .report import front_table, plot_fronts, write_csv, write_json
from .schedules import SCHEDULES, finetune
from .search import SearchResult, search
from .space import Config, SpaceSpec
from .store import default_url, list_studies, read_study
from .strategy import available_strategies
from .task import Task, evaluate_accuracy, load_task, load_user_task, pretrained

DEMO_STRATEGY = "pca_energy"

DEFAULT_SHAPES = {"digits-cnn": (1, 8, 8), "resnet20": (3, 32, 32), "vgg-small": (3, 32, 32)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except RankSearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ranksearch",
        description="Search per-layer ranks to compress a network by low-rank and tensor "
        "decomposition.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list a model's decomposable layers and their costs")
    p.add_argument("model", nargs="?", default="digits-cnn",
                   help="a built-in model (digits-cnn, resnet20, vgg-small) or file.py:factory")
    p.add_argument("--input-shape", type=_shape, default=None,
                   help="per-sample input shape, e.g. 3,32,32 (default: the model's own)")
    _space_options(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("search", help="search ranks for a budget")
    _task_options(p)
    p.add_argument("--strategy", default="uniform", help="a strategy (see `ranksearch strategies`)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a strategy option (repeatable); values are read as JSON when they parse")
    p.add_argument("--constraint", action="append", default=[], metavar="EXPR",
                   help='a budget such as "flops<=0.5" (ratio of the dense model) or '
                   '"params<=2e6" (absolute); repeatable')
    p.add_argument("--objective", type=_names, default=["accuracy", "flops"],
                   help="objectives, comma separated (default: accuracy,flops)")
    p.add_argument("--evaluations", type=int, default=40, help="evaluations to run in all")
    p.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--executor", default="local", choices=("local", "ray"),
                   help="where evaluations run: this process, or Ray Tune (local or a cluster)")
    ray = p.add_argument_group("ray executor")
    ray.add_argument("--address", default=None,
                     help="join a running Ray cluster (e.g. auto or 10.0.0.1:6379); default: "
                     "start a local one")
    ray.add_argument("--cpus-per-trial", type=float, default=None, help="CPUs per trial (1)")
    ray.add_argument("--gpus-per-trial", type=float, default=None,
                     help="GPUs per trial; fractions share a GPU (e.g. 0.25)")
    ray.add_argument("--max-concurrent", type=int, default=None,
                     help="trials at a time (default: as many as the resources allow)")
    ray.add_argument("--early-stop", default=None, choices=("asha", "none"),
                     help="stop poor candidates early with ASHA on the proxy accuracy (asha)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retry-failed", action="store_true",
                   help="evaluate stored failed candidates again")
    p.add_argument("--share-results", action="store_true",
                   help="reuse results of other searches in the store that measured exactly "
                   "the same (same weights, data, proxy settings and space)")
    _proxy_options(p)
    _space_options(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("report", help="print fronts and write CSV, JSON and PNG plots")
    _store_options(p)
    p.add_argument("--study", action="append", default=None,
                   help="a search in the store (repeatable; default: all of them, overlaid)")
    p.add_argument("--objective", type=_names, default=["accuracy", "flops"])
    p.add_argument("--constraint", action="append", default=[], metavar="EXPR")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="write the compressed model picked from a search")
    _store_options(p)
    p.add_argument("--study", default=None, help="the search (default: the only one in the store)")
    p.add_argument("--pick", action="append", default=[], metavar="EXPR",
                   help='the budget the exported model must meet, e.g. "flops<=0.5"; the most '
                   "accurate stored result under it is exported (default: the search's budget)")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="fine-tune the compressed model this many epochs (per step of the "
                   "schedule) before writing it")
    p.add_argument("--schedule", default="one-shot", choices=SCHEDULES,
                   help="one-shot: decompose all, fine-tune once; iterative: one layer at a "
                   "time, fine-tuning the whole network after each; hybrid: iterative for "
                   "convolutions, then all linear layers at once (Astrid & Lee 2018)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    p.add_argument("--output", default=None, help="model file (default: OUT/model.pt)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("strategies", help="list the registered strategies")
    p.set_defaults(func=cmd_strategies)

    p = sub.add_parser("demo", help="the default search on the trained digits CNN")
    p.add_argument("--out", default="ranksearch-out", help="output folder")
    p.add_argument("--evaluations", type=int, default=40)
    p.set_defaults(func=cmd_demo)
    return parser


def _store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="ranksearch-out", help="output folder (default store)")
    p.add_argument("--store", default=None,
                   help="database URL of the store (default: SQLite in the output folder)")


def _task_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="digits",
                   help="a built-in task (digits, fashion-mnist, cifar10) or file.py:factory")
    p.add_argument("--data", default=None, help="data folder of the task")
    p.add_argument("--model", default=None,
                   help="reference model for a built-in task (default: the task's own)")
    _store_options(p)
    p.add_argument("--study", default=None,
                   help="name of the search in the store (default: derived from the options, "
                   "so the same command resumes)")


def _proxy_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=0,
                   help="proxy fine-tuning steps per candidate (0: zero-shot)")
    p.add_argument("--lr", type=float, default=1e-3, help="proxy learning rate")
    p.add_argument("--batch-size", type=int, default=64, help="proxy batch size")
    p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight of knowledge distillation from the dense model (0: off)")
    p.add_argument("--eval-batches", type=int, default=None,
                   help="validation batches per candidate (default: the whole split)")


def _space_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", type=_names, default=None,
                   help="factorizations to consider, comma separated (default: tucker2 for "
                   f"convolutions, svd for linear layers; available: {factorize.available()})")
    p.add_argument("--include", type=_names, default=None, help="glob patterns of layer names")
    p.add_argument("--exclude", type=_names, default=None, help="glob patterns of layer names")
    p.add_argument("--min-params", type=int, default=0, help="skip layers with fewer weights")
    p.add_argument("--multiple-of", type=int, default=1, help="round ranks to this multiple")
    p.add_argument("--dearer", action="store_true",
                   help="also offer ranks that cost as much as the dense layer or more")


def space_spec(args: argparse.Namespace) -> SpaceSpec:
    """The space options of the command line."""
    return SpaceSpec(methods=args.methods, include=args.include, exclude=args.exclude,
                     min_params=args.min_params, multiple_of=args.multiple_of,
                     dearer=args.dearer)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 3,32,32, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return shape


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def load_model(spec: str, input_shape: tuple[int, ...] | None) -> tuple[nn.Module, torch.Tensor]:
    """A model and an example input from a built-in name or ``file.py:factory``."""
    if _is_file_spec(spec):
        model, task = load_user_task(spec)
        if input_shape is None and isinstance(task, Task):
            return model, task.example_input()
    else:
        shape = input_shape or DEFAULT_SHAPES.get(spec)
        model = build_model(spec, in_channels=shape[0]) if shape else build_model(spec)
    shape = input_shape or DEFAULT_SHAPES.get(spec)
    if shape is None:
        raise RankSearchError(f"pass --input-shape for {spec!r} (e.g. --input-shape 3,32,32)")
    return model, torch.zeros(1, *shape)


def cmd_inspect(args: argparse.Namespace) -> int:
    model, example = load_model(args.model, args.input_shape)
    space = space_spec(args).discover(model, example)
    cache = FactorCache(model, space)
    costs = CostModel(space)
    dense = costs.metrics(Config())
    header = ("layer", "kind", "weight", "params", "MACs", "max ranks", "eff.rank", "90%σ²")
    rows = []
    for site in space.sites:
        if site.calls == 0:
            rows.append((site.name, site.kind, "x".join(map(str, site.weight_shape)), "", "",
                         site.reason or "", "", ""))
            continue
        stage = factorize.dense_stage(site)
        if site.decomposable:
            ranks = ", ".join(
                f"{m}:{_rank_str(factorize.get(m).max_rank(site))}" for m in site.methods
            )
            s = cache.singular_values(site.name)
            energy = torch.cumsum(s**2, 0) / (s**2).sum()
            eff = f"{effective_rank(s):.1f}/{len(s)}"
            r90 = str(int(torch.searchsorted(energy, torch.tensor(0.9, dtype=s.dtype))) + 1)
        else:
            ranks, eff, r90 = site.reason or "", "", ""
        rows.append((site.name, site.kind, "x".join(map(str, site.weight_shape)),
                     f"{stage.params:,}", f"{stage.macs * site.calls:,}", ranks, eff, r90))
    _print_table(header, rows)
    print(f"\n{len(space.names)} decomposable of {len(space.sites)} layers; model: "
          f"{int(dense['params']):,} params, {int(dense['macs']):,} MACs, "
          f"{dense['energy'] * 1e6:.2f} µJ per inference (energy model)")
    return 0


def model_and_task(spec: str, data: str | None, model_name: str | None, out: str
                   ) -> tuple[nn.Module, Task]:
    """The trained model and the task of a built-in task name or ``file.py:factory``."""
    if _is_file_spec(spec):
        return load_user_task(spec)
    task = load_task(spec, root=data)
    model = pretrained(model_name, spec, cache_dir=Path(out) / "checkpoints", task=task,
                       progress=True)
    return model, task


def _is_file_spec(spec: str) -> bool:
    return ":" in spec and spec.rsplit(":", 1)[0].endswith(".py")


def cmd_search(args: argparse.Namespace) -> int:
    model, task = model_and_task(args.task, args.data, args.model, args.out)
    proxy = ProxySettings(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                          optimizer=args.optimizer, distill=args.distill,
                          eval_batches=args.eval_batches)
    result = search(
        model, task, strategy=args.strategy, strategy_options=_options(args.option),
        constraints=args.constraint, objectives=args.objective, evaluations=args.evaluations,
        time_limit=args.time_limit, executor=args.executor,
        executor_options=_ray_options(args),
        store=args.store, study=args.study,
        out=args.out, seed=args.seed, proxy=proxy, space=space_spec(args),
        retry_failed=args.retry_failed, share_results=args.share_results,
        progress=not args.no_progress,
        meta={"task_spec": args.task, "data": args.data, "model": args.model},
    )
    _summarize(result, Path(args.out))
    return 0


def _summarize(result: SearchResult, out: Path) -> None:
    print(f"study {result.study} ({result.stopped}; {result.evaluated} evaluated now, "
          f"{len(result.results)} stored)")
    print(front_table(result.results, result.objectives, result.constraints))
    runs = {result.study: result.results}
    write_csv(out / f"{result.study}.csv", result.results, result.objectives, result.constraints)
    write_json(out / f"{result.study}.json", result.results, result.objectives,
               result.constraints, result.meta)
    paths = plot_fronts(runs, out, result.objectives, result.constraints,
                        prefix=f"{result.study}-front")
    print(f"hypervolume {result.hypervolume():.4g}; wrote {out / result.study}.csv, .json and "
          + ", ".join(p.name for p in paths))
    if result.stopped == "interrupted":
        print("interrupted: run the same command again to resume", file=sys.stderr)


def cmd_report(args: argparse.Namespace) -> int:
    url = args.store or default_url(args.out)
    studies = args.study or list_studies(url)
    if not studies:
        raise RankSearchError(f"the store {url} holds no search yet; run `ranksearch search`")
    objectives = parse_objectives(args.objective)
    out = Path(args.out)
    runs, budgets = {}, {}
    for name in studies:
        results, meta = read_study(url, name)
        constraints = parse_constraints(args.constraint or meta.get("constraints", []))
        runs[name], budgets[name] = results, constraints
        print(f"\n== {name}: strategy {meta.get('strategy', '?')}, "
              f"constraints {[str(c) for c in constraints] or 'none'}")
        print(front_table(results, objectives, constraints))
        write_csv(out / f"{name}.csv", results, objectives, constraints)
        write_json(out / f"{name}.json", results, objectives, constraints, meta)
    paths = plot_fronts(runs, out, objectives, budgets)
    print(f"\nwrote {', '.join(str(p) for p in paths)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    url = args.store or default_url(args.out)
    study = study_of(url, args.study)
    _, meta = read_study(url, study)
    if "task_spec" not in meta:
        raise RankSearchError(
            f"study {study!r} was made through the Python API, so the command line cannot "
            "rebuild its model and task. Export it in Python: "
            "ranksearch.scored_model(model, task, store=..., study=...).write(path), or "
            "result.model(result.best()) on the SearchResult"
        )
    model, task = model_and_task(meta["task_spec"], meta.get("data"), meta.get("model"),
                                 args.out)
    exported = scored_model(model, task, store=url, study=study, pick=args.pick)
    picked, compressed = exported.result, exported.model
    accuracy = exported.metrics["accuracy"]
    further = None
    if args.finetune_epochs:
        compressed = finetune(model, picked.config, task, schedule=args.schedule,
                              epochs=args.finetune_epochs, lr=args.lr)
        further = evaluate_accuracy(compressed, task.val)
    output = Path(args.output) if args.output else Path(args.out) / "model.pt"
    written = replace(exported, model=compressed).write(
        output, study=study, finetune_epochs=args.finetune_epochs,
        schedule=args.schedule if args.finetune_epochs else None,
        finetuned_val_accuracy=further)
    print(f"exported {picked.config}\n  search accuracy {picked.metrics['accuracy']:.4f}, "
          f"flops {picked.metrics['flops_ratio']:.3f}, params {picked.metrics['params_ratio']:.3f}"
          f"\n  accuracy of the rebuilt scored model {accuracy:.4f} (the proxy's validation)")
    if further is not None:
        print(f"  val accuracy after {args.finetune_epochs} more epoch(s) ({args.schedule}) "
              f"{further:.4f}")
    print(f"  wrote {written}")
    return 0


def cmd_strategies(args: argparse.Namespace) -> int:
    strategies = available_strategies()
    width = max(map(len, strategies))
    for name, cls in strategies.items():
        print(f"{name.ljust(width)}  {cls.description}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default search: the trained digits CNN, short fine-tuning proxies."""
    args = _parser().parse_args([
        "search", "--task", "digits", "--strategy", DEMO_STRATEGY, "--out", args.out,
        "--evaluations", str(args.evaluations), "--steps", "30", "--lr", "1e-3",
    ])
    return cmd_search(args)


def _ray_options(args: argparse.Namespace) -> dict[str, object]:
    """The Ray options given on the command line (an error without ``--executor ray``)."""
    names = ("address", "cpus_per_trial", "gpus_per_trial", "max_concurrent", "early_stop")
    given = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if given and args.executor != "ray":
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise RankSearchError(f"{flags} apply to the ray executor; add --executor ray")
    return given


def _options(items: Sequence[str]) -> dict[str, object]:
    options: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RankSearchError(f"strategy options are KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _rank_str(rank: object) -> str:
    return "x".join(map(str, rank)) if isinstance(rank, tuple) else str(rank)


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    raise SystemExit(main())
