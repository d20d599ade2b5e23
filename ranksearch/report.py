"""Reports of a search: a text table of the Pareto front, CSV and JSON exports, and plots of
accuracy against the cost ratios (params, FLOPs, energy) with one front per run.

Every file is written atomically (a temporary file in the same folder, then ``os.replace``),
so a reader never sees a half-written report. Plots use Matplotlib's ``Figure`` directly
(Agg rendering, no pyplot and no global state).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .constraints import COST_METRICS, Constraint, metric_value, parse_constraints
from .errors import ConstraintError
from .pareto import Objective, eligible, front, parse_objectives
from .result import Result
from .space import Config

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STATUSES = ("ok", "failed", "pruned")
PLOT_AXES = ("params", "flops", "energy")

_AXIS_LABELS = {"params": "params", "flops": "FLOPs", "energy": "energy"}
# Metrics the table always shows; other objectives get a column of their own.
_TABLE_METRICS = frozenset({"accuracy", *(m for a in PLOT_AXES for m in (a, f"{a}_ratio"))})
_FIGSIZE = (7.0, 5.0)


# -- text ---------------------------------------------------------------------------------------
def summarize(results: Iterable[Result]) -> dict[str, int]:
    """Counts of results by status: ``ok``, ``failed`` and ``pruned`` always (0 when none),
    then any other status in order of first appearance."""
    counts = dict.fromkeys(STATUSES, 0)
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts


def summary_line(results: Sequence[Result]) -> str:
    """``"N evaluations: a ok, b failed, c pruned"``."""
    counts = summarize(results)
    noun = "evaluation" if len(results) == 1 else "evaluations"
    parts = ", ".join(f"{n} {status}" for status, n in counts.items())
    return f"{len(results)} {noun}: {parts}"


def format_config(config: Config, width: int | None = None) -> str:
    """A config in one line, ``"conv1=tucker2:8x16, fc=svd:32"`` (``"dense"`` when empty),
    cut to ``width`` characters with a trailing ``"..."`` when longer."""
    text = ", ".join(f"{name}={choice}" for name, choice in config.items()) or "dense"
    if width is not None and len(text) > width:
        return text[: max(width - 3, 0)] + "..."
    return text


def _count(x: float) -> str:
    """A count with a k/M/G suffix: ``1234567`` → ``"1.23M"``."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def _cell(metrics: Mapping[str, Any], key: str) -> str:
    """One table cell: counts with a suffix, ratios as ``0.450x``, accuracy to 4 decimals,
    anything else to 4 significant digits; ``-`` when missing."""
    x = metric_value(metrics, key)
    if math.isnan(x):
        return "-"
    if key.endswith("_ratio"):
        return f"{x:.3f}x"
    if key == "accuracy":
        return f"{x:.4f}"
    if key in ("params", "macs", "flops"):
        return _count(x)
    return f"{x:.4g}"


def front_table(
    results: Sequence[Result],
    objectives: Iterable[str | Objective],
    constraints: Iterable[str | Constraint] = (),
    *,
    config_width: int = 60,
) -> str:
    """The Pareto front (see `pareto.front`) as a plain-text table, one row per front result
    in front order (by the first cost objective, ascending), then a line counting the
    evaluations by status.

    Columns: accuracy, params with its ratio to the dense model, the FLOPs and energy ratios,
    any objective not among those (e.g. latency, loss), and the config (`format_config`, cut
    to ``config_width`` characters). A missing metric shows as ``-``.
    """
    objs = parse_objectives(objectives)
    cons = parse_constraints(constraints)
    points = front(results, objs, cons)
    extra = [o.metric for o in objs if o.metric not in _TABLE_METRICS]
    header = ["accuracy", "params", "FLOPs", "energy", *extra, "config"]
    rows = [
        [
            _cell(r.metrics, "accuracy"),
            f"{_cell(r.metrics, 'params')} ({_cell(r.metrics, 'params_ratio')})",
            _cell(r.metrics, "flops_ratio"),
            _cell(r.metrics, "energy_ratio"),
            *(_cell(r.metrics, m) for m in extra),
            format_config(r.config, config_width),
        ]
        for r in points
    ]
    widths = [max(len(row[j]) for row in [header, *rows]) for j in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        numbers = (c.rjust(w) for c, w in zip(cells[:-1], widths[:-1], strict=True))
        return "  ".join([*numbers, cells[-1]]).rstrip()

    title = f"Pareto front of {', '.join(map(str, objs))}"
    if cons:
        title += f" under {', '.join(map(str, cons))}"
    out = [f"{title}: {len(points)} configs", line(header)]
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(row) for row in rows)
    if not rows:
        out.append("(no result on the front)")
    out += ["", summary_line(results)]
    return "\n".join(out)


# -- files --------------------------------------------------------------------------------------
def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and
    ``os.replace``, creating the folder if needed; the file is never seen half-written."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; reports are ordinary files
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target


def _front_flags(
    results: Sequence[Result],
    objectives: Iterable[str | Objective],
    constraints: Iterable[str | Constraint],
) -> tuple[list[bool], list[int]]:
    """Per result whether it is on the front, and the front's indices into ``results`` in
    front order (by identity, so equal results at different positions are told apart)."""
    position = {id(r): i for i, r in enumerate(results)}
    indices = [position[id(r)] for r in front(results, objectives, constraints)]
    on = set(indices)
    return [i in on for i in range(len(results))], indices


def write_csv(
    path: str | os.PathLike,
    results: Sequence[Result],
    objectives: Iterable[str | Objective] | None = None,
    constraints: Iterable[str | Constraint] = (),
) -> Path:
    """One row per result: ``status``, ``reason`` (empty when none), ``wall_time``, ``proxy``,
    every metric key found in any result (sorted; empty where a result lacks it), ``config``
    (its JSON text, readable by `Config.from_json`), and ``on_front`` (``True``/``False``)
    when ``objectives`` are given. Returns the path written."""
    metric_keys = sorted({k for r in results for k in r.metrics})
    fields = ["status", "reason", "wall_time", "proxy", *metric_keys, "config"]
    flags: list[bool] | None = None
    if objectives is not None:
        fields.append("on_front")
        flags, _ = _front_flags(results, objectives, constraints)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(fields)
    for i, r in enumerate(results):
        row: list[Any] = [r.status, r.reason or "", r.wall_time, r.proxy]
        row += [r.metrics.get(k, "") for k in metric_keys]
        row.append(r.config.key)
        if flags is not None:
            row.append(flags[i])
        writer.writerow(row)
    return write_atomic(path, buf.getvalue().encode("utf-8"))


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_json(
    path: str | os.PathLike,
    results: Sequence[Result],
    objectives: Iterable[str | Objective],
    constraints: Iterable[str | Constraint] = (),
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """``{"meta": ..., "objectives": [...], "constraints": [...], "results": [...],
    "front": [...]}``: objectives and constraints in their canonical text, each result's
    `Result.to_json`, and the front as indices into ``results`` in front order. NaN and
    infinite numbers become ``null``; values of ``meta`` JSON cannot hold (paths, ...) are
    written as text. Returns the path written."""
    objs = parse_objectives(objectives)
    cons = parse_constraints(constraints)
    _, indices = _front_flags(results, objs, cons)
    doc = {
        "meta": dict(meta or {}),
        "objectives": [str(o) for o in objs],
        "constraints": [str(c) for c in cons],
        "results": [r.to_json() for r in results],
        "front": indices,
    }
    text = json.dumps(_finite(doc), indent=2, allow_nan=False, default=str)
    return write_atomic(path, (text + "\n").encode("utf-8"))


# -- plots --------------------------------------------------------------------------------------
def _quality(objectives: Iterable[str | Objective]) -> Objective:
    """The first objective that is not a cost metric: the plots' y axis."""
    costs = {*COST_METRICS, *(f"{m}_ratio" for m in COST_METRICS)}
    for o in parse_objectives(objectives):
        if o.metric not in costs:
            return o
    raise ConstraintError(
        "plot_fronts needs an objective that is not a cost metric for the y axis, such as "
        "'accuracy' or 'min:loss'"
    )


def _dense_value(results: Iterable[Result], metric: str) -> float | None:
    """The dense model's ``metric``, read as ``metric / metric_ratio`` from the first result
    that has both (None when none has)."""
    for r in results:
        absolute = metric_value(r.metrics, metric)
        ratio = metric_value(r.metrics, f"{metric}_ratio")
        if math.isfinite(absolute) and math.isfinite(ratio) and ratio > 0:
            return absolute / ratio
    return None


#: Constraints for every run alike, or per run label.
RunConstraints = Iterable[str | Constraint] | Mapping[str, Iterable[str | Constraint]]


def front_figure(
    runs: Mapping[str, Sequence[Result]],
    axis: str,
    objectives: Iterable[str | Objective] = ("accuracy",),
    constraints: RunConstraints = (),
) -> Figure | None:
    """A Matplotlib ``Figure`` (no pyplot) of each run's results and Pareto front against the
    ratio to the dense model of the cost metric ``axis`` (params, flops, energy, macs or
    latency); None when no ok result has a value for it.

    ``runs`` maps a label (shown in the legend) to that run's results. The y axis is the first
    of ``objectives`` that is not a cost metric (accuracy by default); the x axis is the
    ``<axis>_ratio`` metric. Every ok result shows as a faint point; each run's front for
    (y, x) under ``constraints`` (one set for every run, or a mapping from label to each run's
    own) as a step line with markers, one colour per run. Constraints
    on ``axis`` are drawn as vertical dashed lines (absolute ones converted to a ratio with the
    dense value the results imply, and left out when none does) and those on the y metric as
    horizontal ones.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    if axis not in COST_METRICS:
        raise ConstraintError(f"cannot plot against {axis!r}; choose one of {COST_METRICS}")
    y = _quality(objectives)
    per_run = _per_run(runs, constraints)
    cons = tuple(dict.fromkeys(c for run in per_run.values() for c in run))
    x = Objective(f"{axis}_ratio")
    points = {label: eligible(results, (y, x)) for label, results in runs.items()}
    if not any(points.values()):
        return None
    fig = Figure(figsize=_FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    palette = None if len(runs) <= 10 else colormaps["tab20"]  # distinct colours past 10
    for i, (label, results) in enumerate(runs.items()):
        color = f"C{i}" if palette is None else palette(i % 20)
        ax.scatter(
            [x.value(r.metrics) for r in points[label]],
            [y.value(r.metrics) for r in points[label]],
            s=14,
            color=color,
            alpha=0.25,
            linewidths=0,
        )
        best = front(results, (y, x), per_run[label])
        ax.step(
            [x.value(r.metrics) for r in best],
            [y.value(r.metrics) for r in best],
            where="post",
            color=color,
            marker="o",
            markersize=5,
            label=label,
        )
    dense = _dense_value((r for rs in runs.values() for r in rs), axis)
    for c in cons:
        if c.metric == axis:
            at = c.value if c.relative else None if dense is None else c.value / dense
            if at is not None:
                ax.axvline(at, linestyle="--", color="0.35", linewidth=1, label=str(c))
        elif c.key == y.metric:
            ax.axhline(c.value, linestyle="--", color="0.35", linewidth=1, label=str(c))
    name = _AXIS_LABELS.get(axis, axis)
    ax.set_title(f"{y.metric} vs {name}: Pareto front per run")
    ax.set_xlabel(f"{name} (ratio to the dense model)")
    ax.set_ylabel(y.metric)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return fig


def _per_run(runs: Mapping[str, Sequence[Result]], constraints: RunConstraints
             ) -> dict[str, tuple[Constraint, ...]]:
    """Each run's constraints: its own from a mapping, or the one set for all."""
    if isinstance(constraints, Mapping):
        return {label: parse_constraints(constraints.get(label, ())) for label in runs}
    shared = parse_constraints(constraints)
    return dict.fromkeys(runs, shared)


def plot_fronts(
    runs: Mapping[str, Sequence[Result]],
    out_dir: str | os.PathLike,
    objectives: Iterable[str | Objective] = ("accuracy",),
    constraints: RunConstraints = (),
    prefix: str = "front",
    *,
    dpi: int = 100,
) -> list[Path]:
    """Write `front_figure` for params, flops and energy in turn as
    ``<out_dir>/<prefix>_<axis>.png`` and return the paths written; an axis that no ok result
    has a value for is skipped. ``objectives`` gives the y axis (the first that is not a cost
    metric, accuracy by default; the search's objectives can be passed as they are)."""
    objectives = parse_objectives(objectives)
    constraints = _per_run(runs, constraints)
    written: list[Path] = []
    for axis in PLOT_AXES:
        fig = front_figure(runs, axis, objectives, constraints)
        if fig is None:
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        written.append(write_atomic(Path(out_dir) / f"{prefix}_{axis}.png", buf.getvalue()))
    return written
