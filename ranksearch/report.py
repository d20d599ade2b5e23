"""Reports of a search: a text table of the Pareto front, CSV and JSON exports, and plots of
accuracy against the cost ratios (params, FLOPs, energy) with one front per run.

Every file is written atomically (a temporary file in the same folder, then ``os.replace``),
so a reader never sees a half-written report. Plots use Matplotlib's ``Figure`` directly
(Agg rendering, no pyplot and no global state).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config
from .constraints import (
    COST_METRICS,
    COUNT_METRICS,
    FRACTIONS,
    Constraint,
    metric_value,
    parse_constraints,
)
from .errors import ConstraintError, RankSearchError
from .pareto import Objective, eligible, front, parse_objectives
from .result import Result

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STATUSES = ("ok", "failed", "pruned")
PLOT_AXES = ("params", "flops", "energy")

_AXIS_LABELS = {"params": "params", "flops": "FLOPs", "energy": "energy"}
# Metrics the table always shows; other objectives get a column of their own.
_TABLE_METRICS = frozenset({"accuracy", *(m for a in PLOT_AXES for m in (a, f"{a}_ratio"))})
_FIGSIZE = (7.0, 5.0)
#: The metric of a front point's latency measured end to end (`ranksearch.search.check_front`).
_CHECKED = "latency_measured_ratio"


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


def wrap_config(config: Config, width: int = 60) -> list[str]:
    """A config over as many lines of about ``width`` characters as it needs, never cutting a
    ``layer=choice`` item (one longer than ``width`` gets a line of its own); every line but
    the last ends with a comma. ``["dense"]`` when empty."""
    items = [f"{name}={choice}" for name, choice in config.items()] or ["dense"]
    lines = [items[0]]
    for item in items[1:]:
        if len(lines[-1]) + 2 + len(item) <= width:
            lines[-1] += f", {item}"
        else:
            lines[-1] += ","
            lines.append(item)
    return lines


def _count(x: float) -> str:
    """A count with a k/M/G suffix: ``1234567`` → ``"1.23M"``."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


_SI = ((1.0, ""), (1e-3, "m"), (1e-6, "µ"), (1e-9, "n"))
_UNIT = {"energy": "J", "latency": "s"}


def _si(x: float, unit: str) -> str:
    """``x`` base units with an SI prefix: ``0.0023, "s"`` → ``"2.3ms"``."""
    if x == 0:
        return f"0{unit}"
    scale, prefix = next(((s, p) for s, p in _SI if abs(x) >= s), _SI[-1])
    return f"{x / scale:.3g}{prefix}{unit}"


def format_value(metric: str, x: float) -> str:
    """One metric value for people: ratios as ``0.450x``, accuracy and top5 to 4 decimals,
    counts with
    a k/M/G suffix, energy and latency in J/s with an SI prefix (``2.3ms``), anything else to
    4 significant digits; ``-`` for NaN."""
    if math.isnan(x):
        return "-"
    if metric.endswith("_ratio"):
        return f"{x:.3f}x"
    if metric in FRACTIONS:
        return f"{x:.4f}"
    if metric in COUNT_METRICS:
        return _count(x)
    if metric in _UNIT:
        return _si(x, _UNIT[metric])
    return f"{x:.4g}"


def _cell(metrics: Mapping[str, Any], key: str) -> str:
    """One table cell: `format_value` of ``metrics[key]`` (``-`` when missing)."""
    return format_value(key, metric_value(metrics, key))


def _first_line(reason: str | None, width: int) -> str:
    """A failure reason's first non-empty line, cut to ``width`` characters with ``…``."""
    lines = [line.strip() for line in (reason or "").splitlines() if line.strip()]
    text = lines[0] if lines else "(no reason given)"
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def failure_summary(results: Iterable[Result], *, width: int = 100, limit: int = 8) -> str:
    """The distinct reasons of the failed results with their counts, most frequent first, as
    ``"3 failed:"`` then one line ``"  2 × loss became nan at step 3"`` per reason (its first
    line, cut to ``width`` characters); past ``limit`` reasons a last line counts the rest.
    Empty when nothing failed."""
    reasons: dict[str, int] = {}
    for r in results:
        if r.status == "failed":
            key = _first_line(r.reason, width)
            reasons[key] = reasons.get(key, 0) + 1
    if not reasons:
        return ""
    ranked = sorted(reasons.items(), key=lambda kv: -kv[1])  # stable: ties in first order
    out = [f"{sum(reasons.values())} failed:"]
    out += [f"  {n} × {reason}" for reason, n in ranked[:limit]]
    rest = ranked[limit:]
    if rest:
        count = sum(n for _, n in rest)
        out.append(f"  {count} × {len(rest)} other reasons (see the CSV's reason column)")
    return "\n".join(out)


def _reached(pool: Sequence[Result], c: Constraint) -> str:
    """Why no result of ``pool`` meets ``c``: its best value of the bounded metric."""
    values = [v for r in pool if not math.isnan(v := metric_value(r.metrics, c.key))]
    if not values:
        return f"no ok result has a {c.key} value to check {c} against"
    lowest = c.op == "<="
    word = "lowest" if lowest else "highest"
    what = f"{c.metric} ratio" if c.relative else c.metric
    best = min(values) if lowest else max(values)
    return f"no ok result meets {c}; the {word} {what} reached is {format_value(c.key, best)}"


def _meet(n: int, c: Constraint) -> str:
    return f"{n} {'meets' if n == 1 else 'meet'} {c}"


def empty_front_reason(
    results: Sequence[Result],
    objectives: Iterable[str | Objective],
    constraints: Iterable[str | Constraint] = (),
) -> str | None:
    """Why the front of ``results`` is empty, e.g. ``"no ok result meets latency<=0.001s;
    the lowest latency reached is 2.3ms"``; None when it is not empty."""
    objs = parse_objectives(objectives)
    cons = parse_constraints(constraints)
    if front(results, objs, cons):
        return None
    if not results:
        return "nothing was evaluated"
    ok = [r for r in results if r.ok]
    if not ok:
        return "no evaluation finished ok"
    pool = eligible(ok, objs)
    if not pool:
        missing = [o.metric for o in objs if not eligible(ok, (o,))]
        return f"no ok result has a value for {', '.join(missing) or 'every objective'}"
    blocking = [c for c in cons if not eligible(pool, (), (c,))]
    if blocking:
        return "; ".join(_reached(pool, c) for c in blocking)
    counts = ", ".join(_meet(len(eligible(pool, (), (c,))), c) for c in cons)
    return f"no ok result meets {' and '.join(map(str, cons))} together ({counts})"


def _dense_metrics(
    results: Iterable[Result], dense: Mapping[str, Any] | None = None
) -> dict[str, float]:
    """The dense model's metrics: the numbers of ``dense``, and for each cost metric it lacks
    the value the results imply (``metric / metric_ratio``)."""
    results = list(results)
    out = {k: v for k in (dense or {}) if not math.isnan(v := metric_value(dense, k))}
    for m in COST_METRICS:
        if m not in out and (value := _dense_value(results, m)) is not None:
            out[m] = value
    return out


def _row(metrics: Mapping[str, Any], extra: Sequence[str], dense: bool = False,
         quality: str = "accuracy") -> list[str]:
    """The number cells of one table row, ``quality`` (the task's metric) first; the dense
    row shows absolute FLOPs and energy."""
    def both(key: str) -> str:
        x = metric_value(metrics, key)
        return _cell(metrics, key) if math.isnan(x) else f"{_cell(metrics, key)} (1.000x)"

    if dense:
        return [_cell(metrics, quality), both("params"), _cell(metrics, "flops"),
                _cell(metrics, "energy"), *(_cell(metrics, m) for m in extra)]
    return [
        _cell(metrics, quality),
        f"{_cell(metrics, 'params')} ({_cell(metrics, 'params_ratio')})",
        _cell(metrics, "flops_ratio"),
        _cell(metrics, "energy_ratio"),
        *(_cell(metrics, m) for m in extra),
    ]


def front_table(
    results: Sequence[Result],
    objectives: Iterable[str | Objective],
    constraints: Iterable[str | Constraint] = (),
    *,
    config_width: int = 60,
    dense: Mapping[str, Any] | None = None,
) -> str:
    """The Pareto front (see `pareto.front`) as a plain-text table: a first row for the dense
    model, then one row per front result in front order (by the first cost objective,
    ascending), then a line counting the evaluations by status and the `failure_summary`.

    Columns: the quality metric (the first objective that is not a cost, such as accuracy or
    mse; accuracy when every objective is a cost), params with its ratio to the dense model,
    the FLOPs and energy ratios, any objective not among those (e.g. latency, loss), and the
    whole config (`wrap_config`
    over continuation lines of about ``config_width`` characters). A missing metric shows as
    ``-``. The dense row shows absolute params, FLOPs and energy: those of ``dense`` (the
    dense model's metrics, accuracy included when known), else those the results imply. An
    empty front is explained (`empty_front_reason`). Where front points were timed end to
    end (a latency search), the priced and the measured latency ratios get columns and the
    prediction error a line (`prediction_line`).
    """
    objs = parse_objectives(objectives)
    cons = parse_constraints(constraints)
    points = front(results, objs, cons)
    quality = next((o.metric for o in objs if o.metric.removesuffix("_ratio")
                    not in COST_METRICS), "accuracy")
    extra = [o.metric for o in objs if o.metric not in _TABLE_METRICS and o.metric != quality]
    if any(_CHECKED in r.metrics for r in points):  # priced and measured side by side
        extra += [m for m in ("latency_ratio", _CHECKED) if m not in extra]
    header = [quality, "params", "FLOPs", "energy", *extra, "config"]
    rows = [(_row(_dense_metrics(results, dense), extra, True, quality), ["dense (reference)"])]
    rows += [(_row(r.metrics, extra, quality=quality), wrap_config(r.config, config_width))
             for r in points]
    cells = [header[:-1], *(numbers for numbers, _ in rows)]
    widths = [max(len(row[j]) for row in cells) for j in range(len(header) - 1)]
    widths.append(max(len(text) for _, config in rows for text in config))
    indent = " " * (sum(widths[:-1]) + 2 * (len(widths) - 1))

    def line(numbers: Sequence[str], config: Sequence[str]) -> list[str]:
        padded = (c.rjust(w) for c, w in zip(numbers, widths, strict=False))
        first = "  ".join([*padded, config[0]]).rstrip()
        return [first, *(indent + more for more in config[1:])]

    title = f"Pareto front of {', '.join(map(str, objs))}"
    if cons:
        title += f" under {', '.join(map(str, cons))}"
    out = [f"{title}: {len(points)} configs", *line(header[:-1], [header[-1]])]
    out.append("  ".join("-" * w for w in widths))
    for numbers, config in rows:
        out += line(numbers, config)
    if not points:
        out += ["(no result on the front)", f"why: {empty_front_reason(results, objs, cons)}"]
    checked = prediction_line(points)
    if checked:
        out.append(checked)
    out += ["", summary_line(results)]
    failures = failure_summary(results)
    return "\n".join([*out, failures] if failures else out)


def prediction_line(results: Sequence[Result]) -> str | None:
    """How far the latency priced from the latency table is from the latency measured end to
    end, over the results that have both (the front of a latency search): the relative
    error of the ratio to the dense model and of the seconds, on average and at worst
    (``"latency priced vs measured end to end on 4 front points: ratio to dense off by 2.1%
    on average, 5.3% at worst; seconds off by 3.0%, 6.2% at worst"``). None when no result
    has both."""
    ratio, seconds = [], []
    for r in results:
        priced, measured = (metric_value(r.metrics, k) for k in ("latency_ratio", _CHECKED))
        took, timed = (metric_value(r.metrics, k) for k in ("latency", "latency_measured"))
        if all(math.isfinite(x) and x > 0 for x in (priced, measured, took, timed)):
            ratio.append(abs(priced / measured - 1))
            seconds.append(abs(took / timed - 1))
    if not ratio:
        return None
    n = len(ratio)
    return (f"latency priced vs measured end to end on {n} front point{'s' * (n != 1)}: ratio "
            f"to dense off by {sum(ratio) / n:.1%} on average, {max(ratio):.1%} at worst; "
            f"seconds off by {sum(seconds) / n:.1%}, {max(seconds):.1%} at worst")


def written_line(paths: Iterable[str | os.PathLike]) -> str:
    """``"wrote a.csv, a.json and a-front_flops.png in runs"`` (the folder once when every
    path shares it, else the paths in full); when no path is a PNG it adds that no plot was
    made, and with no path at all it says nothing was written."""
    files = [Path(p) for p in paths]
    if not files:
        return "wrote nothing"
    folders = {p.parent for p in files}
    names = [p.name for p in files] if len(folders) == 1 else [str(p) for p in files]
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    text = f"wrote {listed}"
    if len(folders) == 1 and files[0].parent != Path():
        text += f" in {files[0].parent}"
    if not any(p.suffix.lower() == ".png" for p in files):
        text += " (no plot: no ok result to draw)"
    return text


# -- files --------------------------------------------------------------------------------------
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+|\.{2,}")
STEM_LENGTH = 80


def safe_stem(name: str) -> str:
    """``name`` as a file stem that cannot leave its folder: runs of characters other than
    ASCII letters, digits, ``_``, ``-`` and single dots become ``_``, leading dots are dropped
    (no ``..``, no hidden file) and it is cut to 80 characters. A name that had to change gets
    ``-`` and 8 hex digits of its SHA-256, so two names never share a file."""
    stem = _UNSAFE.sub("_", name).lstrip(".")[:STEM_LENGTH]
    if stem and stem == name:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{stem}-{digest}" if stem else digest


def output_file(folder: str | os.PathLike, name: str) -> Path:
    """``folder/name``, checked to stay in ``folder``: ``name`` must be a plain file name (no
    path separator, not ``.`` or ``..``, no NUL); see `safe_stem` to make one."""
    seps = {"/", os.sep, os.altsep or "/", "\0"}
    path = Path(folder) / name
    if (name in ("", ".", "..") or any(s in name for s in seps)
            or path.parent.resolve() != Path(folder).resolve()):
        raise RankSearchError(f"refusing to write {name!r}: not a plain file name in {folder}")
    return path


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
#: The dense model's metrics for every run alike, or per run label.
RunDense = Mapping[str, Any] | Mapping[str, Mapping[str, Any]]


def _per_run(runs: Mapping[str, Sequence[Result]], constraints: RunConstraints
             ) -> dict[str, tuple[Constraint, ...]]:
    """Each run's constraints: its own from a mapping, or the one set for all."""
    if isinstance(constraints, Mapping):
        return {label: parse_constraints(constraints.get(label, ())) for label in runs}
    shared = parse_constraints(constraints)
    return dict.fromkeys(runs, shared)


def _dense_per_run(runs: Mapping[str, Sequence[Result]], dense: RunDense | None
                   ) -> dict[str, dict[str, float]]:
    """Each run's dense metrics (`_dense_metrics`): from its own entry of ``dense`` when that
    maps labels to mappings, else from ``dense`` itself."""
    per_run = dense is not None and any(isinstance(v, Mapping) for v in dense.values())
    return {
        label: _dense_metrics(results, dense.get(label) if per_run else dense)  # type: ignore[union-attr,arg-type]
        for label, results in runs.items()
    }


def _colour(i: int, n: int) -> Any:
    """Matplotlib's C0..C9 up to 10 runs, tab20 past that."""
    from matplotlib import colormaps

    return f"C{i}" if n <= 10 else colormaps["tab20"](i % 20)


def _draw_run(ax: Any, label: str, results: Sequence[Result], y: Objective, x: Objective,
              constraints: Sequence[Constraint], colour: Any) -> None:
    """A run's ok results as faint points and its front as a step line; the legend says
    when the run has no ok result or none within its budget."""
    points = eligible(results, (y, x))
    ax.scatter([x.value(r.metrics) for r in points], [y.value(r.metrics) for r in points],
               s=14, color=colour, alpha=0.25, linewidths=0)
    best = front(results, (y, x), constraints)
    if not points:
        missing = "ok result" if not any(r.ok for r in results) else x.metric
        # text only in the legend: nothing of this run is drawn
        ax.plot([], [], linestyle="none", label=f"{label} (no {missing})")
        return
    if not best:
        label = f"{label} (none within its budget)"
    ax.step([x.value(r.metrics) for r in best], [y.value(r.metrics) for r in best],
            where="post", color=colour, marker="o", markersize=5, label=label)


def _budget_at(c: Constraint, dense: Mapping[str, float]) -> tuple[float, str] | None:
    """Where a bound on a cost metric falls on its ratio axis, and its label: ``str(c)`` for
    a ratio, ``"energy<=2e-05J (0.43×)"`` for an absolute bound (None when the dense value
    is unknown)."""
    if c.relative:
        return c.value, str(c)
    base = dense.get(c.metric)
    if base is None or not base > 0:
        return None
    return c.value / base, f"{c} ({c.value / base:.2g}×)"


def _draw_budgets(ax: Any, per_run: Mapping[str, Sequence[Constraint]], axis: str,
                  y: Objective, dense: Mapping[str, Mapping[str, float]],
                  colours: Mapping[str, Any]) -> None:
    """Each run's bounds on ``axis`` (vertical) and on the y metric (horizontal) as dashed
    lines, one per bound and place: labelled by the bound alone when every run has it, else
    ``"<run>: <bound>"`` (``"<run>, <run>: <bound>"`` when several share it); in the run's
    colour when it is one run's, grey otherwise."""
    drawn: dict[tuple[str, float], list[str]] = {}
    for label, cons in per_run.items():
        for c in cons:
            if c.metric == axis:
                at = _budget_at(c, dense[label])
            elif c.key == y.metric:
                at = (c.value, str(c))
            else:
                continue
            if at is not None:
                drawn.setdefault(("v" if c.metric == axis else "h", *at), []).append(label)
    for (kind, at, text), labels in drawn.items():
        line = ax.axvline if kind == "v" else ax.axhline
        colour = colours[labels[0]] if len(labels) == 1 else "0.35"
        name = text if len(labels) == len(per_run) else f"{', '.join(labels)}: {text}"
        line(at, linestyle="--", linewidth=1, color=colour, label=name)


def _draw_dense(ax: Any, y: Objective, dense: Mapping[str, Mapping[str, float]],
                colours: Mapping[str, Any]) -> None:
    """The dense model at ratio 1: a black star at its y value when known (one per run in
    the run's colour when the runs' dense values differ), else a dotted line at 1."""
    values = {label: d.get(y.metric) for label, d in dense.items()}
    known = {label: v for label, v in values.items() if v is not None}
    if not known:
        ax.axvline(1.0, linestyle=":", color="black", linewidth=1,
                   label=f"dense model (1×, {y.metric} unknown)")
        return
    if len(set(known.values())) == 1:
        value = next(iter(known.values()))
        ax.plot([1.0], [value], linestyle="none", marker="*", markersize=12, color="black",
                label=f"dense model ({format_value(y.metric, value)})")
        return
    for label, value in known.items():
        ax.plot([1.0], [value], linestyle="none", marker="*", markersize=12,
                color=colours[label], markeredgecolor="black",
                label=f"{label}: dense model ({format_value(y.metric, value)})")


def front_figure(
    runs: Mapping[str, Sequence[Result]],
    axis: str,
    objectives: Iterable[str | Objective] = ("accuracy",),
    constraints: RunConstraints = (),
    dense: RunDense | None = None,
) -> Figure | None:
    """A Matplotlib ``Figure`` (no pyplot) of each run's results and Pareto front against the
    ratio to the dense model of the cost metric ``axis`` (params, flops, energy, macs or
    latency); None when no ok result has a value for it.

    ``runs`` maps a label (shown in the legend) to that run's results. The y axis is the first
    of ``objectives`` that is not a cost metric (accuracy by default); the x axis is the
    ``<axis>_ratio`` metric. Every ok result shows as a faint point; each run's front for
    (y, x) under ``constraints`` (one set for every run, or a mapping from label to each run's
    own) as a step line with markers, one colour per run; a run with nothing to draw is named
    in the legend with the reason (``"<run> (no ok result)"``). Bounds on ``axis`` are dashed
    vertical lines (absolute ones converted to a ratio with the run's dense value and labelled
    with both, left out when that is unknown), bounds on the y metric horizontal ones; see
    `_draw_budgets` for shared and per-run ones.

    ``dense``: the dense model's metrics (accuracy, params, flops, ...), or a mapping from run
    label to each run's. When given, the dense model is drawn at ratio 1 (a star at its y
    value when known). Dense cost values it lacks are read from the results.
    """
    from matplotlib.figure import Figure

    if axis not in COST_METRICS:
        raise ConstraintError(f"cannot plot against {axis!r}; choose one of {COST_METRICS}")
    y = _quality(objectives)
    x = Objective(f"{axis}_ratio")
    if not any(eligible(results, (y, x)) for results in runs.values()):
        return None
    per_run = _per_run(runs, constraints)
    dense_of = _dense_per_run(runs, dense)
    colours = {label: _colour(i, len(runs)) for i, label in enumerate(runs)}
    fig = Figure(figsize=_FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    for label, results in runs.items():
        _draw_run(ax, label, results, y, x, per_run[label], colours[label])
    _draw_budgets(ax, per_run, axis, y, dense_of, colours)
    if dense is not None:
        _draw_dense(ax, y, dense_of, colours)
    name = _AXIS_LABELS.get(axis, axis)
    ax.set_title(f"{y.metric} vs {name}: Pareto front per run")
    ax.set_xlabel(f"{name} (ratio to the dense model)")
    ax.set_ylabel(y.metric)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return fig


def plot_fronts(
    runs: Mapping[str, Sequence[Result]],
    out_dir: str | os.PathLike,
    objectives: Iterable[str | Objective] = ("accuracy",),
    constraints: RunConstraints = (),
    prefix: str = "front",
    *,
    dpi: int = 100,
    dense: RunDense | None = None,
) -> list[Path]:
    """Write `front_figure` for params, flops and energy in turn as
    ``<out_dir>/<prefix>_<axis>.png`` and return the paths written; an axis that no ok result
    has a value for is skipped. ``prefix`` must make a plain file name (`output_file`; a
    study's name goes through `safe_stem` first). ``objectives`` gives the y axis (the first
    that is not a cost metric, accuracy by default; the search's objectives can be passed as
    they are); ``dense`` the dense model's metrics (see `front_figure`)."""
    objectives = parse_objectives(objectives)
    constraints = _per_run(runs, constraints)
    written: list[Path] = []
    for axis in PLOT_AXES:
        fig = front_figure(runs, axis, objectives, constraints, dense)
        if fig is None:
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        written.append(write_atomic(output_file(out_dir, f"{prefix}_{axis}.png"),
                                    buf.getvalue()))
    return written
