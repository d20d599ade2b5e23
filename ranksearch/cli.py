"""The `ranksearch` command line."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import math
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from . import __version__, factorize
from .cache import FactorCache, effective_rank
from .checks import check_device
from .config import Config
from .constraints import parse_constraints
from .cost import CostModel
from .datasets import REFERENCE_MODELS, load_task
from .errors import RankSearchError
from .evaluate import ProxySettings
from .export import BACKEND_RUN, scored_model, study_of
from .formats import FORMATS, load_hint
from .models import build_model
from .pareto import describe_hypervolume, parse_objectives
from .report import (
    front_table,
    output_file,
    plot_fronts,
    safe_stem,
    write_csv,
    write_json,
    written_line,
)
from .schedules import SCHEDULES, finetune
from .search import SearchResult, search
from .space import SpaceSpec
from .store import list_studies, read_objectives, read_study
from .strategy import Strategy, available_strategies, load_strategy
from .task import Task, load_user_task
from .timing import BACKENDS
from .training import evaluate_accuracy, pretrained

DEMO_STRATEGY = "pca_energy"

DEFAULT_SHAPES = {"digits-cnn": (1, 8, 8), "resnet20": (3, 32, 32), "vgg-small": (3, 32, 32)}
# built-in tasks whose data ships with the package's dependencies or Python (no --data needed)
SHIPPED_TASKS = ("digits", "text")
DB_NAME = "ranksearch.db"
# the exit status of an interrupted search (as a shell reports SIGINT: 128 + 2)
INTERRUPTED = 130
# the default file in --out of each export format
EXPORT_FILES = {"ranksearch": "model.pt", "torchscript": "model.torchscript.pt",
                "torch.export": "model.pt2", "onnx": "model.onnx"}


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
        return INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ranksearch",
        description="Search per-layer ranks to compress a network by low-rank and tensor "
        "decomposition.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    # -v after the subcommand too; SUPPRESS keeps a -v given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    command = partial(sub.add_parser, parents=[common])

    p = command("inspect", help="list a model's decomposable layers and their costs")
    p.add_argument("model", nargs="?", default=None,
                   help="a built-in model (digits-cnn, resnet20, vgg-small) or file.py:factory "
                   "(default: the --task's reference model, else digits-cnn)")
    p.add_argument("--task", default=None,
                   help="inspect the weights trained on this built-in task (trained once and "
                   "cached); default: digits for digits-cnn, none (untrained) for the others")
    p.add_argument("--data", default=None, help="data folder of the task")
    p.add_argument("--input-shape", type=_shape, default=None,
                   help="per-sample input shape of an untrained built-in model, e.g. 3,32,32 "
                   "(default: the model's own)")
    p.add_argument("--no-progress", action="store_true",
                   help="hide the bar of the reference model's training")
    _space_options(p)
    p.set_defaults(func=cmd_inspect)

    p = command("search", help="search ranks for a budget")
    _task_options(p)
    p.add_argument("--strategy", default="auto", help="a strategy (see `ranksearch strategies`)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a strategy option (repeatable); values are read as JSON when they parse")
    p.add_argument("--constraint", action="append", default=[], metavar="EXPR",
                   help='a budget such as "flops<=0.5" (ratio of the dense model), '
                   '"params<=2e6" (absolute), "energy<=5mJ" or "latency<=3ms" (energy and '
                   'latency need a unit, or x for a ratio); repeatable')
    p.add_argument("--objective", type=_names, default=None,
                   help="objectives, comma separated (default: the task's metric, then flops)")
    p.add_argument("--evaluations", type=_number(int, 1), default=40,
                   help="evaluations to run in all")
    p.add_argument("--time-limit", type=_number(float, 0, strict=True), default=None,
                   help="stop after this many seconds")
    p.add_argument("--device", default="cpu",
                   help="where the proxy fine-tunes and scores candidates: cpu, cuda, cuda:1, "
                   "... (default: cpu)")
    p.add_argument("--executor", default="local", choices=("local", "ray"),
                   help="where evaluations run: this process, or Ray Tune (local or a cluster)")
    ray = p.add_argument_group("ray executor")
    ray.add_argument("--address", default=None,
                     help="join a running Ray cluster (e.g. auto or 10.0.0.1:6379); default: "
                     "start a local one")
    ray.add_argument("--cpus-per-trial", type=_number(float, 0, strict=True), default=None,
                     help="CPUs per trial (1)")
    ray.add_argument("--gpus-per-trial", type=_number(float, 0), default=None,
                     help="GPUs per trial; fractions share a GPU (e.g. 0.25); needs --device cuda")
    ray.add_argument("--max-concurrent", type=_number(int, 1), default=None,
                     help="trials at a time (default: as many as the resources allow)")
    ray.add_argument("--early-stop", default=None, choices=("asha", "none"),
                     help="stop poor candidates early with ASHA on the proxy accuracy (asha)")
    ray.add_argument("--ray-host", default=None, metavar="IP",
                     help="the address a local Ray cluster listens on (default: 127.0.0.1, "
                     "reachable from this machine only); give this machine's network address "
                     "to let other machines join it")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="score each candidate in a child process, so one that crashes or hangs "
                   "fails alone (default: the library's)")
    p.add_argument("--trial-timeout", type=_number(float, 0, strict=True), default=None,
                   metavar="SECONDS",
                   help="fail a candidate whose evaluation runs longer than this")
    p.add_argument("--seed", type=_number(int, 0), default=0, help="random seed (default: 0)")
    p.add_argument("--retry-failed", action="store_true",
                   help="evaluate stored failed candidates again")
    p.add_argument("--share-results", action="store_true",
                   help="reuse results of other searches in the store that measured exactly "
                   "the same (same weights, data, proxy settings and space)")
    _proxy_options(p)
    _space_options(p)
    p.add_argument("--no-progress", action="store_true",
                   help="hide the progress bars (search, reference-model training)")
    p.set_defaults(func=cmd_search)

    p = command("report", help="print fronts and write CSV, JSON and PNG plots")
    _store_options(p)
    p.add_argument("--study", action="append", default=None,
                   help="a search in the store (repeatable; default: all of them, overlaid)")
    p.add_argument("--objective", type=_names, default=None,
                   help="objectives, comma separated (default: those each search used)")
    p.add_argument("--constraint", action="append", default=[], metavar="EXPR")
    p.set_defaults(func=cmd_report)

    p = command("export", help="write the compressed model picked from a search")
    _store_options(p)
    p.add_argument("--study", default=None, help="the search (default: the only one in the store)")
    p.add_argument("--task", default=None,
                   help="the task file (file.py:factory) of a search made from one; export "
                   "never runs code a store names, so a task file is run only when given here")
    p.add_argument("--data", default=None,
                   help="data folder of a built-in task (default: the one the search used)")
    p.add_argument("--pick", action="append", default=[], metavar="EXPR",
                   help='the budget the exported model must meet, e.g. "flops<=0.5"; the most '
                   "accurate stored result under it is exported (default: the search's budget)")
    p.add_argument("--finetune-epochs", type=_number(int, 0), default=0,
                   help="fine-tune the compressed model this many epochs (per step of the "
                   "schedule) before writing it")
    p.add_argument("--schedule", default="one-shot", choices=SCHEDULES,
                   help="one-shot: decompose all, fine-tune once; iterative: one layer at a "
                   "time, fine-tuning the whole network after each; hybrid: iterative for "
                   "convolutions, then all linear layers at once (Astrid & Lee 2018)")
    p.add_argument("--lr", type=_number(float, 0, strict=True), default=1e-3,
                   help="fine-tuning learning rate")
    p.add_argument("--format", default=None, choices=FORMATS,
                   help="ranksearch: a .pt that ranksearch.load reads with the dense model; "
                   "torchscript, torch.export: files that run with plain torch; onnx: needs "
                   "the onnx package (and onnxruntime to run it). Default: onnx for a search "
                   "timed on the onnx backend, else ranksearch")
    p.add_argument("--output", default=None,
                   help="model file (default: OUT/model.pt, model.torchscript.pt, model.pt2 "
                   "or model.onnx by --format)")
    p.add_argument("--no-progress", action="store_true",
                   help="hide the progress bars (fine-tuning, reference-model training)")
    p.set_defaults(func=cmd_export)

    p = command("strategies", help="list the registered strategies and their options")
    p.set_defaults(func=cmd_strategies)

    p = command("demo", help="the default search on the trained digits CNN")
    p.add_argument("--out", default="ranksearch-out", help="output folder")
    p.add_argument("--evaluations", type=_number(int, 1), default=40)
    p.set_defaults(func=cmd_demo)
    return parser


def _store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="ranksearch-out", help="output folder (default store)")
    p.add_argument("--store", default=None,
                   help="database URL of the store (default: SQLite in the output folder)")


def _task_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="digits",
                   help="a built-in task (digits, fashion-mnist, cifar10, text) or file.py:factory")
    p.add_argument("--data", default=None, help="data folder of the task")
    p.add_argument("--model", default=None,
                   help="reference model for a built-in task (default: the task's own)")
    _store_options(p)
    p.add_argument("--study", default=None, type=_study_name,
                   help="name of the search in the store (default: derived from the options, "
                   "so the same command resumes)")


def _proxy_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=_number(int, 0), default=0,
                   help="proxy fine-tuning steps per candidate (0: zero-shot)")
    p.add_argument("--lr", type=_number(float, 0, strict=True), default=1e-3,
                   help="proxy learning rate")
    p.add_argument("--batch-size", type=_number(int, 1), default=64, help="proxy batch size")
    p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    p.add_argument("--distill", type=_number(float, 0, high=1), default=0.0,
                   help="weight of knowledge distillation from the dense model (0: off)")
    p.add_argument("--eval-batches", type=_number(int, 1), default=None,
                   help="validation batches per candidate (default: the whole split)")
    timed = p.add_argument_group("latency (a constraint or objective on it prices it from a "
                                 "table of per-layer times, measured once and kept in the store)")
    timed.add_argument("--backend", default="eager", choices=BACKENDS,
                       help="what latency is timed on, and what export writes for: eager "
                       "(default), channels_last, compile (torch.compile) or onnx (onnxruntime, "
                       "the onnx extra)")
    timed.add_argument("--latency-batch", type=_number(int, 1), default=1,
                       help="samples per call the latency table times (default: 1)")
    aware = p.add_argument_group("data-aware factors and BatchNorm recalibration")
    aware.add_argument("--data-aware", action="store_true",
                       help="fit the factors to each layer's inputs on a few training batches "
                       "(its output error), not to its weights alone; costs are unchanged")
    aware.add_argument("--calibration-batches", type=_number(int, 1), default=None,
                       help="training batches of --batch-size the statistics of --data-aware "
                       "are collected on (default: 8)")
    aware.add_argument("--bn-recalibrate", type=_number(int, 0),
                       default=ProxySettings.bn_recalibrate, metavar="N",
                       help="re-estimate each candidate's BatchNorm statistics on N training "
                       f"batches of --batch-size before scoring it (0: off; default: "
                       f"{ProxySettings.bn_recalibrate})")


def _space_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", type=_names, default=None,
                   help="factorizations to consider, comma separated (default: tucker2 for "
                   f"convolutions, svd for linear layers; available: {factorize.available()})")
    p.add_argument("--include", type=_names, default=None, help="glob patterns of layer names")
    p.add_argument("--exclude", type=_names, default=None, help="glob patterns of layer names")
    p.add_argument("--min-params", type=_number(int, 0), default=0,
                   help="skip layers with fewer weights")
    p.add_argument("--multiple-of", type=_multiple, default=1,
                   help="round ranks to this multiple; 'auto' (search, with latency priced): "
                   "per layer, the multiple its latency table finds fast")
    p.add_argument("--dearer", action="store_true",
                   help="also offer ranks that cost as much as the dense layer or more")


def space_spec(args: argparse.Namespace) -> SpaceSpec:
    """The space options of the command line."""
    return SpaceSpec(methods=args.methods, include=args.include, exclude=args.exclude,
                     min_params=args.min_params,
                     multiple_of=1 if args.multiple_of == "auto" else args.multiple_of,
                     dearer=args.dearer)


def _multiple(text: str) -> int | str:
    """--multiple-of: an integer ≥ 1, or "auto"."""
    return text if text == "auto" else int(_number(int, 1)(text))


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


def _number(kind: type[int] | type[float], low: float, *, strict: bool = False,
            high: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite ``kind`` ≥ ``low`` (> with ``strict``), and ≤ ``high`` if
    given."""
    noun = "an integer" if kind is int else "a finite number"
    bound = f"in [{low:g}, {high:g}]" if high is not None else f"{'>' if strict else '≥'} {low:g}"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun} {bound}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low) or (
                high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {noun} {bound}, got {text}")
        return value

    return parse


def _study_name(text: str) -> str:
    """An argparse type: a study name that is not a path (the name also names report
    files)."""
    if not text or text in (".", "..") or any(c in text for c in "/\\\0"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a study name: it must not be empty, '.' or '..' or hold '/', "
            "'\\' or NUL; the report files take its name in --out")
    return text


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


def inspected_model(args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor, str]:
    """The model `inspect` looks at, an example input, and a line saying where its weights
    come from: trained on ``--task`` (or the shipped reference task), the user's own, or
    untrained."""
    spec = args.model or (None if args.task else "digits-cnn")
    if args.task and (args.input_shape or (spec and _is_file_spec(spec))):
        raise RankSearchError("with --task the task decides the model's input and weights; "
                              "drop --input-shape, or drop --task to inspect file.py:factory")
    if args.data and not args.task:
        raise RankSearchError("--data is the data folder of --task; add --task")
    if spec is not None and _is_file_spec(spec):
        model, example = load_model(spec, args.input_shape)
        return model, example, f"weights: as {spec} returns them"
    task_name = args.task or (_reference_task(spec) if args.input_shape is None else None)
    if task_name is None:
        model, example = load_model(spec, args.input_shape)
        return model, example, _untrained_note(spec)
    model, task = model_and_task(task_name, args.data, spec, progress=not args.no_progress)
    if _is_file_spec(task_name):
        return model, task.example_input(), f"weights: as {task_name} returns them"
    name = spec or REFERENCE_MODELS.get(task_name, "")
    return model, task.example_input(), f"weights: {name} trained on {task.name} (cached)"


def _reference_task(model: str) -> str | None:
    """The task whose reference model ``model`` is, when its data ships here."""
    return next((t for t in SHIPPED_TASKS if REFERENCE_MODELS[t] == model), None)


def _untrained_note(model: str) -> str:
    tasks = [t for t, m in REFERENCE_MODELS.items() if m == model and t not in SHIPPED_TASKS]
    example = f"`ranksearch inspect {model} --task {tasks[0]}`" if tasks else "--task TASK"
    return (f"weights: UNTRAINED ({model} at its random initialization); the eff.rank and "
            f"90%σ² columns say nothing about a trained {model}. For trained weights pass "
            f"{example} (--data DIR for the data folder; trains once, then cached), or your "
            "own trained model as file.py:factory.")


def cmd_inspect(args: argparse.Namespace) -> int:
    model, example, weights = inspected_model(args)
    print(weights + "\n")
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


def model_and_task(spec: str, data: str | None, model_name: str | None, progress: bool = True
                   ) -> tuple[nn.Module, Task]:
    """The trained model and the task of a built-in task name or ``file.py:factory``; a
    built-in task's reference model is trained once per user and cached (`pretrained`)."""
    if _is_file_spec(spec):
        return load_user_task(spec)
    task = load_task(spec, root=data)
    return pretrained(model_name, spec, task=task, progress=progress), task


def _is_file_spec(spec: str) -> bool:
    return ":" in spec and spec.rsplit(":", 1)[0].endswith(".py")


def writable_out(out: str) -> Path:
    """``out`` checked as an output folder that is, or can be made, a writable directory;
    the check leaves nothing behind (a folder it had to create is removed again)."""
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise RankSearchError(f"--out {out} is a file, not a folder; choose a folder "
                              "(it is created if missing)")
    missing = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise RankSearchError(f"cannot create or write the output folder {folder} "
                              f"({e.strerror or e}); choose another --out") from None
    finally:
        for created in missing:
            with contextlib.suppress(OSError):
                created.rmdir()
    return folder


def existing_store(args: argparse.Namespace) -> str:
    """The store URL of a command that only reads it: ``--store``, or the database a search
    left in ``--out``, which must exist (nothing is created)."""
    if args.store:
        return args.store
    folder = Path(args.out).expanduser()
    db = folder / DB_NAME
    if not db.is_file():
        why = ("does not exist" if not folder.exists() else
               "is not a folder" if not folder.is_dir() else f"has no {DB_NAME}")
        raise RankSearchError(
            f"the output folder {folder} {why}, so it holds no searches; check --out (the "
            f"folder `ranksearch search --out` wrote to) or run `ranksearch search --out "
            f"{args.out}` first"
        )
    return f"sqlite:///{db.resolve()}"


def cmd_search(args: argparse.Namespace) -> int:
    writable_out(args.out)
    ray = _ray_options(args)
    if args.calibration_batches is not None and not args.data_aware:
        raise RankSearchError("--calibration-batches sets the batches of data-aware factors; "
                              "add --data-aware (or leave it out)")
    proxy = ProxySettings(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                          optimizer=args.optimizer, distill=args.distill,
                          eval_batches=args.eval_batches, device=args.device,
                          backend=args.backend, latency_batch=args.latency_batch,
                          data_aware=args.data_aware,
                          calibration_batches=args.calibration_batches
                          or ProxySettings.calibration_batches,
                          bn_recalibrate=args.bn_recalibrate)
    if ray.get("gpus_per_trial", 0) > 0 and str(proxy.device).lower() == "cpu":
        raise RankSearchError("--gpus-per-trial reserves GPUs but the proxy runs on cpu; "
                              "add --device cuda")
    # checked before a reference model is trained
    parse_constraints(args.constraint)
    check_device(proxy.device)
    load_strategy(args.strategy, _options(args.option))
    model, task = model_and_task(args.task, args.data, args.model,
                                 progress=not args.no_progress)
    result = search(
        model, task, strategy=args.strategy, strategy_options=_options(args.option),
        constraints=args.constraint, objectives=args.objective, evaluations=args.evaluations,
        time_limit=args.time_limit, executor=args.executor, executor_options=ray,
        store=args.store, study=args.study,
        out=args.out, seed=args.seed, proxy=proxy, space=space_spec(args),
        multiple_of="auto" if args.multiple_of == "auto" else 1,
        retry_failed=args.retry_failed, share_results=args.share_results,
        progress=not args.no_progress, isolate=args.isolate, trial_timeout=args.trial_timeout,
        meta={"task_spec": args.task, "data": args.data, "model": args.model},
    )
    _summarize(result, Path(args.out))
    return INTERRUPTED if result.stopped == "interrupted" else 0


def _summarize(result: SearchResult, out: Path) -> None:
    print(f"study {_shown(result.study)} ({result.stopped}; {result.evaluated} evaluated now, "
          f"{len(result.results)} stored)")
    dense = {**result.costs.metrics(Config()), **(result.meta.get("dense") or {})}
    print(front_table(result.results, result.objectives, result.constraints, dense=dense))
    runs = {result.study: result.results}
    stem = safe_stem(result.study)
    written = [
        write_csv(output_file(out, f"{stem}.csv"), result.results, result.objectives,
                  result.constraints),
        write_json(output_file(out, f"{stem}.json"), result.results, result.objectives,
                   result.constraints, result.meta),
    ]
    paths = plot_fronts(runs, out, result.objectives, result.constraints,
                        prefix=f"{stem}-front", dense=dense)
    print(describe_hypervolume(result.hypervolume(), result.objectives, dense))
    print(written_line([*written, *paths]))
    if result.stopped == "interrupted":
        print("interrupted: run the same command again to resume", file=sys.stderr)


def _shown(name: str) -> str:
    """A study name as printed: quoted when it holds characters a terminal would act on."""
    return name if name.isprintable() else repr(name)


def cmd_report(args: argparse.Namespace) -> int:
    url = existing_store(args)
    studies = args.study or list_studies(url)
    if not studies:
        raise RankSearchError(f"the store {url} holds no search yet; run `ranksearch search`")
    given = parse_objectives(args.objective) if args.objective else None
    out = Path(args.out)
    runs, budgets, used, written, denses = {}, {}, [], [], {}
    for name in studies:
        results, meta = read_study(url, name)
        objectives = given or parse_objectives(read_objectives(url, name))
        constraints = parse_constraints(args.constraint or meta.get("constraints", []))
        runs[name], budgets[name] = results, constraints
        used.append(objectives)
        print(f"\n== {_shown(name)}: strategy {meta.get('strategy', '?')}, "
              f"objectives {', '.join(map(str, objectives))}, "
              f"constraints {[str(c) for c in constraints] or 'none'}")
        denses[name] = meta.get("dense") or {}
        print(front_table(results, objectives, constraints, dense=meta.get("dense")))
        stem = safe_stem(name)
        written += [write_csv(output_file(out, f"{stem}.csv"), results, objectives, constraints),
                    write_json(output_file(out, f"{stem}.json"), results, objectives,
                               constraints, meta)]
    paths = plot_fronts(runs, out, used[0], budgets, dense=denses)
    print("\n" + written_line([*written, *paths]))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    url = existing_store(args)
    study = study_of(url, args.study)
    _, meta = read_study(url, study)
    if "task_spec" not in meta:
        raise RankSearchError(
            f"study {study!r} was made through the Python API, so the command line cannot "
            "rebuild its model and task. Export it in Python: "
            "ranksearch.scored_model(model, task, store=..., study=...).write(path), or "
            "result.model(result.best()) on the SearchResult"
        )
    progress = not args.no_progress
    model, task = model_and_task(_export_task(args, study, meta), args.data or meta.get("data"),
                                 meta.get("model"), progress=progress)
    exported = scored_model(model, task, store=url, study=study, pick=args.pick)
    picked, compressed = exported.result, exported.model
    name = task.metric.name
    score = exported.metrics[name]
    further = None
    if args.finetune_epochs and name != "accuracy":
        raise RankSearchError(f"--finetune-epochs trains classifiers by their accuracy; this "
                              f"task's metric is {name}: fine-tune the exported model in "
                              "your own training loop instead")
    if args.finetune_epochs:
        compressed = finetune(model, picked.config, task, schedule=args.schedule,
                              epochs=args.finetune_epochs, lr=args.lr, progress=progress)
        further = evaluate_accuracy(compressed, task.val)
    fmt = args.format or exported.format
    output = Path(args.output) if args.output else Path(args.out) / EXPORT_FILES[fmt]
    written = replace(exported, model=compressed).write(
        output, fmt=fmt, example_input=task.example_input(), study=study,
        finetune_epochs=args.finetune_epochs,
        schedule=args.schedule if args.finetune_epochs else None,
        finetuned_val_accuracy=further)
    print(f"exported {picked.config}\n  search {name} {picked.metrics[name]:.4f}, "
          f"flops {picked.metrics['flops_ratio']:.3f}, params {picked.metrics['params_ratio']:.3f}"
          f"\n  {name} of the rebuilt scored model {score:.4f} (the proxy's validation)")
    if further is not None:
        print(f"  val accuracy after {args.finetune_epochs} more epoch(s) ({args.schedule}) "
              f"{further:.4f}")
    print(f"  wrote {written} ({fmt}; load it with {load_hint(fmt, written.name)['code']})")
    if exported.backend != "eager":
        print(f"  its latency was timed on {exported.backend}: {BACKEND_RUN[exported.backend]}")
    return 0


def _export_task(args: argparse.Namespace, study: str, meta: dict[str, object]) -> str:
    """The task `export` rebuilds: the built-in one the store names, or the task file the
    user names with ``--task`` (code named by a store is never run)."""
    stored = str(meta["task_spec"])
    if not _is_file_spec(stored):
        if args.task is not None and args.task != stored:
            raise RankSearchError(f"study {_shown(study)} searched the built-in task "
                                  f"{stored!r}, not {args.task!r}; drop --task")
        return stored
    if args.task is None:
        raise RankSearchError(
            f"study {_shown(study)} was made from the task file {stored!r}; export runs no code "
            "named by a store, so name the file yourself once you trust it: add --task "
            f"{stored!r} (or its path here)")
    if not _is_file_spec(args.task):
        raise RankSearchError(f"study {_shown(study)} was made from the task file {stored!r}; "
                              f"--task must be a task file (file.py:factory), not {args.task!r}")
    return args.task


def strategy_options(cls: type[Strategy]) -> str:
    """The keyword options of a strategy's constructor, with their defaults."""
    params = [p for p in inspect.signature(cls).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}"
                     for p in params) or "none"


def cmd_strategies(args: argparse.Namespace) -> int:
    strategies = available_strategies()
    width = max(map(len, strategies))
    for name, cls in strategies.items():
        print(f"{name.ljust(width)}  {cls.description} (options: {strategy_options(cls)})")
    print("\npass options as --option KEY=VALUE (values read as JSON)")
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
    flags = {"address": "address", "cpus_per_trial": "cpus_per_trial",
             "gpus_per_trial": "gpus_per_trial", "max_concurrent": "max_concurrent",
             "early_stop": "early_stop", "ray_host": "host"}  # attribute: executor option
    given = [n for n in flags if getattr(args, n) is not None]
    if given and args.executor != "ray":
        names = ", ".join("--" + n.replace("_", "-") for n in given)
        raise RankSearchError(f"{names} apply to the ray executor; add --executor ray")
    if args.address is not None and args.ray_host is not None:
        raise RankSearchError("--ray-host sets where a local Ray cluster listens; a joined "
                              "cluster (--address) has its own; drop one")
    return {flags[n]: getattr(args, n) for n in given}


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
