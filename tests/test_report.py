import csv
import json
import math
import re

import numpy as np
import pytest

from ranksearch import pareto, report
from ranksearch.config import Choice, Config
from ranksearch.errors import ConstraintError
from ranksearch.result import Result

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OBJECTIVES = ("accuracy", "flops")
DENSE = {"params": 1e6, "flops": 2e8, "energy": 0.05}


def metrics(accuracy, params, flops, energy=None, **extra):
    """Metrics with absolute values consistent with the ratios to the dense model."""
    out = {
        "accuracy": accuracy,
        "loss": 1.0 - accuracy,
        "params": params * DENSE["params"],
        "params_ratio": params,
        "macs": flops * DENSE["flops"] / 2,
        "macs_ratio": flops,
        "flops": flops * DENSE["flops"],
        "flops_ratio": flops,
    }
    if energy is not None:
        out.update(energy=energy * DENSE["energy"], energy_ratio=energy)
    out.update(extra)
    return out


def cfg(rank, **more):
    return Config({"fc": Choice("svd", rank), **more})


def results(energy=True):
    """Four ok results (one dominated for flops), two failed and a pruned one that would
    dominate everything if it counted. Input order is not cost order."""

    def e(x):
        return x if energy else None

    return [
        Result(cfg(16), metrics(0.90, 0.6, 0.65, e(0.70)), wall_time=3.0, proxy="ft:100"),
        Result(cfg(2), metrics(0.70, 0.1, 0.12, e(0.15)), wall_time=1.0, proxy="ft:100"),
        Result(
            Config({"fc": Choice("svd", 64)}), {"loss": math.nan}, "failed", "loss diverged", 0.5
        ),
        Result(cfg(8), metrics(0.78, 0.4, 0.35, e(0.30)), wall_time=2.0, proxy="ft:100"),
        Result(cfg(3), metrics(0.99, 0.05, 0.05, e(0.05)), "pruned", None, 0.2, "ft:20"),
        Result(cfg(4, conv=Choice("tucker2", (4, 8))), metrics(0.80, 0.2, 0.22, e(0.25))),
        Result(cfg(5), {}, "failed", "out of memory", 0.1),
    ]


def ids(rs):
    return [id(r) for r in rs]


# -- summarize and the table -------------------------------------------------------------------
def test_summarize_counts_every_status():
    assert report.summarize(results()) == {"ok": 4, "failed": 2, "pruned": 1}
    assert report.summarize([]) == {"ok": 0, "failed": 0, "pruned": 0}
    assert list(report.summarize(results())) == ["ok", "failed", "pruned"]


def test_format_config_is_compact_and_elided():
    config = Config({"conv": Choice("tucker2", (4, 8)), "fc": Choice("svd", 16)})
    assert report.format_config(config) == "conv=tucker2:4x8, fc=svd:16"
    assert report.format_config(Config()) == "dense"
    cut = report.format_config(config, 12)
    assert cut == "conv=tuck..."
    assert len(cut) == 12


def all_rows(table):
    """Every row of a front table under its dashes (the dense one first), split into cells
    (separated by two or more spaces; the config is the last cell, its continuation lines
    joined to it)."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if set(line) <= {"-", " "} and line) + 1
    rows = []
    for line in lines[start:]:
        if not line or line.startswith("("):
            break
        if line.startswith("   ") and not line.strip()[0].isdigit() and line.strip()[0] != "-":
            rows[-1][-1] += " " + line.strip()
            continue
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def table_rows(table):
    """The rows of the front results (`all_rows` but the dense one)."""
    rows = all_rows(table)
    assert rows[0][-1] == "dense (reference)"
    return rows[1:]


def summary(table):
    """The line counting the evaluations by status."""
    return next(line for line in table.splitlines() if " evaluation" in line and ": " in line)


def test_front_table_lists_the_front_in_cost_order():
    rs = results()
    table = report.front_table(rs, OBJECTIVES)
    rows = table_rows(table)
    expected = pareto.front(rs, OBJECTIVES)
    # by hand: svd:8 is dominated by svd:4 + tucker2, the pruned one and failures are out
    assert [r.config for r in expected] == [cfg(2), cfg(4, conv=Choice("tucker2", (4, 8))), cfg(16)]
    assert [row[-1] for row in rows] == [report.format_config(r.config) for r in expected]
    assert [row[0] for row in rows] == ["0.7000", "0.8000", "0.9000"]
    assert rows[0][1:4] == ["100k (0.100x)", "0.120x", "0.150x"]
    assert rows[2][1:4] == ["600k (0.600x)", "0.650x", "0.700x"]
    assert summary(table) == "7 evaluations: 4 ok, 2 failed, 1 pruned"


def test_front_table_applies_constraints_and_shows_extra_objectives():
    rs = results()
    table = report.front_table(rs, ("accuracy", "flops", "loss"), ["flops<=0.5"])
    rows = table_rows(table)
    assert "flops<=0.5x" in table.splitlines()[0]
    header = re.split(r"\s{2,}", table.splitlines()[1].strip())
    assert header == ["accuracy", "params", "FLOPs", "energy", "loss", "config"]
    # svd:16 breaks the constraint; svd:8 stays dominated (its loss is worse too)
    assert [row[-1] for row in rows] == ["fc=svd:2", "conv=tucker2:4x8, fc=svd:4"]
    assert [row[4] for row in rows] == ["0.3", "0.2"]


def test_front_table_wraps_long_configs_and_handles_an_empty_front():
    many = Config({f"layer{i}": Choice("svd", 8) for i in range(20)})
    rs = [Result(many, metrics(0.5, 0.5, 0.5)), Result(cfg(2), {}, "failed", "boom")]
    table = report.front_table(rs, OBJECTIVES, config_width=30)
    rows = table_rows(table)
    assert len(rows) == 1
    assert rows[0][-1] == report.format_config(many)  # every layer, over continuation lines
    assert max(len(line) for line in report.wrap_config(many, 30)) <= 30
    assert rows[0][3] == "-"  # no energy metric

    empty = report.front_table(rs, OBJECTIVES, ["accuracy>=0.9"])
    assert table_rows(empty) == []
    assert "(no result on the front)" in empty
    assert summary(empty) == "2 evaluations: 1 ok, 1 failed, 0 pruned"
    single = report.front_table(rs[:1], OBJECTIVES)
    assert single.splitlines()[-1] == "1 evaluation: 1 ok, 0 failed, 0 pruned"


# -- CSV and JSON ------------------------------------------------------------------------------
def test_csv_round_trip(tmp_path):
    rs = results()
    path = report.write_csv(tmp_path / "out" / "results.csv", rs, OBJECTIVES)
    assert path == tmp_path / "out" / "results.csv"
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = reader.fieldnames
    keys = sorted({k for r in rs for k in r.metrics})
    assert keys == sorted(
        [
            "accuracy",
            "loss",
            *(f"{m}{s}" for m in ("params", "macs", "flops", "energy") for s in ("", "_ratio")),
        ]
    )
    assert columns == ["status", "reason", "wall_time", "proxy", *keys, "config", "on_front"]
    assert len(rows) == len(rs)
    on_front = set(ids(pareto.front(rs, OBJECTIVES)))
    for r, row in zip(rs, rows, strict=True):
        assert row["status"] == r.status
        assert row["reason"] == (r.reason or "")
        assert float(row["wall_time"]) == r.wall_time
        assert row["proxy"] == r.proxy
        assert Config.from_json(row["config"]) == r.config
        assert row["on_front"] == str(id(r) in on_front)
        for k in keys:
            if k not in r.metrics:
                assert row[k] == ""
            elif math.isnan(r.metrics[k]):
                assert math.isnan(float(row[k]))
            else:
                assert float(row[k]) == r.metrics[k]
    assert [row["on_front"] for row in rows].count("True") == 3
    assert list(tmp_path.joinpath("out").iterdir()) == [path]  # no temporary file left


def test_csv_without_objectives_has_no_front_column_and_constraints_change_flags(tmp_path):
    rs = results()
    with report.write_csv(tmp_path / "plain.csv", rs).open(newline="") as f:
        assert "on_front" not in next(csv.reader(f))
    path = report.write_csv(tmp_path / "c.csv", rs, OBJECTIVES, ["flops<=0.5"])
    with path.open(newline="") as f:
        flags = [row["on_front"] == "True" for row in csv.DictReader(f)]
    expected = set(ids(pareto.front(rs, OBJECTIVES, ["flops<=0.5"])))
    assert flags == [id(r) in expected for r in rs]
    assert flags == [False, True, False, False, False, True, False]


def test_json_front_indices_and_round_trip(tmp_path):
    rs = results()
    meta = {"model": "digits_cnn", "seed": 0, "out": tmp_path}
    path = report.write_json(tmp_path / "r.json", rs, OBJECTIVES, ["flops<=0.7"], meta)

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    doc = json.loads(path.read_text(), parse_constant=refuse)  # strict: no NaN
    assert set(doc) == {"meta", "objectives", "constraints", "results", "front"}
    assert doc["meta"] == {"model": "digits_cnn", "seed": 0, "out": str(tmp_path)}
    assert doc["objectives"] == ["accuracy", "flops"]
    assert doc["constraints"] == ["flops<=0.7x"]
    assert len(doc["results"]) == len(rs)
    expected = [ids(rs).index(i) for i in ids(pareto.front(rs, OBJECTIVES, ["flops<=0.7"]))]
    assert doc["front"] == expected == [1, 5, 0]
    back = [Result.from_json(d) for d in doc["results"]]
    assert [b.config for b in back] == [r.config for r in rs]
    assert [b.status for b in back] == [r.status for r in rs]
    assert back[0] == rs[0]
    assert doc["results"][2]["metrics"] == {"loss": None}  # NaN written as null


def test_json_tells_equal_results_apart_and_writes_atomically(tmp_path):
    twin = Result(cfg(2), metrics(0.7, 0.1, 0.1))
    rs = [Result(cfg(1), metrics(0.5, 0.1, 0.2)), twin, Result(cfg(2), metrics(0.7, 0.1, 0.1))]
    path = report.write_json(tmp_path / "r.json", rs, OBJECTIVES)
    assert json.loads(path.read_text())["front"] == [1, 2]

    before = path.read_bytes()

    class Unprintable:
        def __str__(self):
            raise RuntimeError("cannot serialize")

    with pytest.raises(RuntimeError):
        report.write_json(path, rs, OBJECTIVES, meta={"bad": Unprintable()})
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


# -- plots -------------------------------------------------------------------------------------
def other_run():
    """A second run with a different front (better at low cost)."""
    return [
        Result(cfg(r), metrics(acc, p, f, e))
        for r, (acc, p, f, e) in {
            1: (0.75, 0.08, 0.1, 0.1),
            6: (0.85, 0.3, 0.3, 0.35),
            12: (0.88, 0.5, 0.55, 0.6),
            7: (0.60, 0.3, 0.32, 0.3),
        }.items()
    ]


def read_png(path):
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert 200 <= image.shape[0] < image.shape[1] <= 3000
    assert image[..., :3].std() > 0.01  # not a blank canvas
    return image


def has_colour(image, hex_colour, tol=0.02):
    rgb = np.array([int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return bool((np.abs(image[..., :3] - rgb).max(axis=-1) < tol).any())


def test_plot_fronts_writes_one_png_per_cost_axis(tmp_path):
    runs = {"uniform": results(), "optuna": other_run()}
    paths = report.plot_fronts(runs, tmp_path / "plots", OBJECTIVES, ["flops<=0.5"])
    names = ["front_params.png", "front_flops.png", "front_energy.png"]
    assert paths == [tmp_path / "plots" / n for n in names]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(names)
    for path in paths:
        image = read_png(path)
        # runs overlaid in distinct colours: Matplotlib's C0 (blue) and C1 (orange)
        assert has_colour(image, "#1f77b4")
        assert has_colour(image, "#ff7f0e")


def test_plot_fronts_skips_an_axis_without_data(tmp_path):
    runs = {"a": results(energy=False), "b": other_run()[:2]}
    for r in runs["b"]:
        del r.metrics["energy_ratio"]
    paths = report.plot_fronts(runs, tmp_path, prefix="cmp")
    assert [p.name for p in paths] == ["cmp_params.png", "cmp_flops.png"]
    assert not (tmp_path / "cmp_energy.png").exists()
    for path in paths:
        read_png(path)


def dashed(fig):
    """(label, xdata, ydata) of the dashed lines (the constraints) of a figure."""
    (ax,) = fig.axes
    return [
        (line.get_label(), list(line.get_xdata()), list(line.get_ydata()))
        for line in ax.get_lines()
        if line.get_linestyle() == "--"
    ]


def test_front_figure_draws_each_runs_front_in_its_own_colour():
    runs = {"uniform": results(), "optuna": other_run()}
    fig = report.front_figure(runs, "flops", OBJECTIVES, ["accuracy>=0.72"])
    (ax,) = fig.axes
    steps = {line.get_label(): line for line in ax.get_lines() if line.get_linestyle() == "-"}
    assert set(steps) == {"uniform", "optuna"}
    for label, rs in runs.items():
        best = pareto.front(rs, ("accuracy", "flops_ratio"), ["accuracy>=0.72"])
        assert list(steps[label].get_xdata()) == [r.metrics["flops_ratio"] for r in best]
        assert list(steps[label].get_ydata()) == [r.metrics["accuracy"] for r in best]
        assert steps[label].get_drawstyle() == "steps-post"
        assert steps[label].get_marker() == "o"
    assert list(steps["uniform"].get_xdata()) == [0.22, 0.65]  # 0.12 is below the bound
    assert steps["uniform"].get_color() != steps["optuna"].get_color()
    # faint points: every ok result with the metrics, feasible or not
    scatters = ax.collections
    assert [len(c.get_offsets()) for c in scatters] == [4, 4]
    assert all(c.get_alpha() < 0.5 for c in scatters)
    assert dashed(fig) == [("accuracy>=0.72", [0, 1], [0.72, 0.72])]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["uniform", "optuna", "accuracy>=0.72"]
    assert "accuracy" in ax.get_title() and "FLOPs" in ax.get_title()
    assert ax.get_xlabel() == "FLOPs (ratio to the dense model)"
    assert ax.get_ylabel() == "accuracy"


def test_front_figure_draws_constraints_on_their_axis_only():
    runs = {"a": results()}
    bounds = ["flops<=0.5", "params<=3e5", "energy<=0.4x"]
    # the absolute params bound is drawn at 3e5 / 1e6 dense params
    assert dashed(report.front_figure(runs, "params", OBJECTIVES, bounds)) == [
        ("params<=300000 (0.3×)", [0.3, 0.3], [0, 1])
    ]
    assert dashed(report.front_figure(runs, "flops", OBJECTIVES, bounds)) == [
        ("flops<=0.5x", [0.5, 0.5], [0, 1])
    ]
    assert dashed(report.front_figure(runs, "energy", OBJECTIVES, bounds)) == [
        ("energy<=0.4x", [0.4, 0.4], [0, 1])
    ]
    # without absolute params in the results the dense value is unknown: no line
    stripped = {
        "a": [
            Result(r.config, {k: v for k, v in r.metrics.items() if k != "params"})
            for r in results()
        ]
    }
    assert dashed(report.front_figure(stripped, "params", OBJECTIVES, bounds)) == []
    assert report.front_figure(runs, "latency", OBJECTIVES) is None
    with pytest.raises(ConstraintError):
        report.front_figure(runs, "accuracy", OBJECTIVES)


def test_plot_fronts_needs_a_quality_objective_and_returns_nothing_without_data(tmp_path):
    with pytest.raises(ConstraintError):
        report.plot_fronts({"a": results()}, tmp_path, ["flops", "params"])
    assert report.plot_fronts({"a": [Result(cfg(2), {}, "failed", "x")]}, tmp_path) == []
    assert report.plot_fronts({}, tmp_path) == []
    assert list(tmp_path.iterdir()) == []
