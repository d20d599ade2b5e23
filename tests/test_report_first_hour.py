"""What a new user meets in the reports (issue 17): failure reasons, why a front is empty, the
files written, the hypervolume's reference, whole configs, and the dense reference in the
table and the plots."""

import math

import pytest
from test_report import DENSE, all_rows, cfg, metrics, other_run, read_png, results, table_rows

from ranksearch import pareto, report
from ranksearch.config import Choice, Config
from ranksearch.result import Result

OBJECTIVES = ("accuracy", "flops")
NAN_STEP = "loss became nan at fine-tuning step 3"


def failed(reason, rank=64):
    return Result(cfg(rank), {}, "failed", reason)


def with_latency(rs, seconds):
    """``rs`` with a latency metric (absolute and ratio to 10 ms dense) on the ok ones."""
    out = []
    for r, s in zip(rs, seconds, strict=True):
        extra = {"latency": s, "latency_ratio": s / 0.01} if r.ok else {}
        out.append(Result(r.config, {**r.metrics, **extra}, r.status, r.reason))
    return out


# -- reasons -----------------------------------------------------------------------------------
def test_failure_summary_counts_distinct_reasons_most_frequent_first():
    rs = [
        failed("infeasible: violates flops<=0.5x"),
        failed(NAN_STEP),
        *results()[:2],
        failed(NAN_STEP),
    ]
    assert report.failure_summary(rs) == (
        f"3 failed:\n  2 × {NAN_STEP}\n  1 × infeasible: violates flops<=0.5x"
    )
    assert report.failure_summary(results()[:2]) == ""
    assert report.failure_summary([]) == ""
    pruned = Result(cfg(3), {}, "pruned")
    assert report.failure_summary([pruned]) == ""


def test_failure_summary_shortens_long_reasons_and_many_of_them():
    trace = "RuntimeError: CUDA out of memory. " + "x" * 300 + "\nTraceback (most recent...)"
    text = report.failure_summary([failed(trace), failed(None)], width=60)
    first, second = text.splitlines()[1:]
    assert first.startswith("  1 × RuntimeError: CUDA out of memory.")
    assert first.endswith("…") and len(first) == len("  1 × ") + 60
    assert "Traceback" not in text
    assert second == "  1 × (no reason given)"
    many = [failed(f"reason {i}") for i in range(12)] + [failed("reason 0")]
    lines = report.failure_summary(many, limit=3).splitlines()
    assert lines[0] == "13 failed:"
    assert lines[1] == "  2 × reason 0"
    assert len(lines) == 5
    assert lines[-1] == "  9 × 9 other reasons (see the CSV's reason column)"


def test_front_table_shows_the_failure_reasons_under_the_counts():
    rs = [*results()[:2], failed(NAN_STEP), failed(NAN_STEP), failed("infeasible: x")]
    lines = report.front_table(rs, OBJECTIVES).splitlines()
    at = lines.index("5 evaluations: 2 ok, 3 failed, 0 pruned")
    assert lines[at + 1 :] == ["3 failed:", f"  2 × {NAN_STEP}", "  1 × infeasible: x"]


def test_an_empty_front_under_a_latency_budget_says_why():
    rs = with_latency(results(), [0.004, 0.0023, 0, 0.003, 0, 0.005, 0])
    table = report.front_table(rs, OBJECTIVES, ["latency<=1ms"])
    assert "(no result on the front)" in table
    assert (
        "why: no ok result meets latency<=0.001s; the lowest latency reached is 2.3ms"
        in table.splitlines()
    )
    # read as a ratio, the bound says so in the reason
    why = report.empty_front_reason(rs, OBJECTIVES, ["latency<=0.1x"])
    assert why == "no ok result meets latency<=0.1x; the lowest latency ratio reached is 0.230x"


@pytest.mark.parametrize(
    ("rs", "constraints", "expected"),
    [
        ([], [], "nothing was evaluated"),
        ([failed("boom")], [], "no evaluation finished ok"),
        (results(), ["accuracy>=0.95"],
         "no ok result meets accuracy>=0.95; the highest accuracy reached is 0.9000"),
        (results(), ["latency<=1ms"],
         "no ok result has a latency value to check latency<=0.001s against"),
        (results(), ["accuracy>=0.85", "flops<=0.5"],
         "no ok result meets accuracy>=0.85 and flops<=0.5x together "
         "(1 meets accuracy>=0.85, 3 meet flops<=0.5x)"),
        (results(), ["flops<=0.5"], None),
    ],
)
def test_empty_front_reason(rs, constraints, expected):
    assert report.empty_front_reason(rs, OBJECTIVES, constraints) == expected


def test_empty_front_reason_names_a_missing_objective():
    why = report.empty_front_reason(results(), ("accuracy", "latency"))
    assert why == "no ok result has a value for latency"


# -- the summary lines -------------------------------------------------------------------------
def test_written_line_never_ends_in_a_dangling_and(tmp_path):
    out = tmp_path / "runs"
    files = [out / "s.csv", out / "s.json"]
    line = report.written_line(files)
    assert line == f"wrote s.csv and s.json in {out} (no plot: no ok result to draw)"
    assert not line.rstrip().endswith("and")
    pngs = [out / "s-front_params.png", out / "s-front_flops.png"]
    assert report.written_line([*files, *pngs]) == (
        f"wrote s.csv, s.json, s-front_params.png and s-front_flops.png in {out}"
    )
    elsewhere = [out / "a.png", tmp_path / "b.png"]
    assert report.written_line(elsewhere) == f"wrote {elsewhere[0]} and {elsewhere[1]}"
    assert report.written_line(["a.png"]) == "wrote a.png"
    assert report.written_line([]) == "wrote nothing"


def test_written_line_after_real_plots(tmp_path):
    paths = report.plot_fronts({"a": results()}, tmp_path, OBJECTIVES, prefix="a-front")
    line = report.written_line([tmp_path / "a.csv", *paths])
    assert line == (
        f"wrote a.csv, a-front_params.png, a-front_flops.png and a-front_energy.png in {tmp_path}"
    )
    none = report.plot_fronts({"a": [failed("boom")]}, tmp_path, OBJECTIVES)
    assert "no plot" in report.written_line([tmp_path / "a.csv", *none])


def test_the_hypervolume_states_its_reference():
    assert pareto.describe_reference(("accuracy", "flops_ratio")) == (
        "accuracy 0 and the dense model's flops ratio (1)"
    )
    assert pareto.describe_reference(OBJECTIVES, DENSE) == (
        "accuracy 0 and the dense model's flops (2e+08)"
    )
    assert pareto.describe_reference(("accuracy", "flops", "loss"), DENSE, scale=1.1,
                                     overrides={"loss": 3}) == (
        "accuracy 0, 1.1 × the dense model's flops (2.2e+08) and loss 3"
    )
    assert pareto.describe_reference(("flops",)) == "the dense model's flops"

    ratio = ("accuracy", "flops_ratio")
    value = pareto.hypervolume(results(), ratio, pareto.reference_point(ratio, DENSE))
    assert pareto.describe_hypervolume(value, ratio, DENSE) == (
        f"hypervolume {value:.4g} (of accuracy × flops ratio, against accuracy 0 and the dense "
        "model's flops ratio (1))"
    )
    # in absolute FLOPs the share of the most possible volume is the ratio form's value
    absolute = pareto.hypervolume(results(), OBJECTIVES, pareto.reference_point(OBJECTIVES, DENSE))
    assert math.isclose(absolute / DENSE["flops"], value)
    assert pareto.describe_hypervolume(absolute, OBJECTIVES, DENSE) == (
        f"hypervolume {absolute:.4g} (of accuracy × flops, against accuracy 0 and the dense "
        f"model's flops (2e+08); {value:.3g} of the most possible)"
    )


# -- the front table ---------------------------------------------------------------------------
def test_front_table_shows_every_layer_of_a_long_config():
    layers = {f"features.{i}": Choice("tucker2", (8, 16)) for i in range(0, 12, 3)}
    layers |= {"classifier.1": Choice("svd", 32), "classifier.4": Choice("svd", 8)}
    config = Config(layers)
    assert len(report.format_config(config)) > 60
    table = report.front_table([Result(config, metrics(0.9, 0.3, 0.3))], OBJECTIVES)
    (row,) = table_rows(table)
    assert row[-1] == report.format_config(config)
    for name in layers:
        assert name in table
    assert "..." not in table
    wrapped = report.wrap_config(config, 60)
    assert len(wrapped) > 1 and all(len(line) <= 60 for line in wrapped)
    assert ", ".join(line.rstrip(",") for line in wrapped) == report.format_config(config)
    assert report.wrap_config(Config()) == ["dense"]


def test_front_table_starts_with_the_dense_model():
    dense = {"accuracy": 0.95, "loss": 0.12, **DENSE}
    rows = all_rows(report.front_table(results(), ("accuracy", "flops", "loss"), dense=dense))
    assert rows[0] == ["0.9500", "1M (1.000x)", "200M", "50mJ", "0.12", "dense (reference)"]
    # without the dense metrics: the costs the results imply, accuracy unknown
    rows = all_rows(report.front_table(results(), OBJECTIVES))
    assert rows[0] == ["-", "1M (1.000x)", "200M", "50mJ", "dense (reference)"]
    # shown even when the front is empty
    rows = all_rows(report.front_table([failed("boom")], OBJECTIVES, dense=dense))
    assert rows == [["0.9500", "1M (1.000x)", "200M", "50mJ", "dense (reference)"]]


def test_format_value_speaks_in_units():
    assert report.format_value("latency", 0.0023) == "2.3ms"
    assert report.format_value("latency", 2.5) == "2.5s"
    assert report.format_value("energy", 2e-5) == "20µJ"
    assert report.format_value("energy", 0) == "0J"
    assert report.format_value("flops", 2.4e8) == "240M"
    assert report.format_value("flops_ratio", 0.12) == "0.120x"
    assert report.format_value("accuracy", 0.9) == "0.9000"
    assert report.format_value("loss", math.nan) == "-"


# -- plots -------------------------------------------------------------------------------------
def lines_by_label(fig):
    (ax,) = fig.axes
    return {line.get_label(): line for line in ax.get_lines()}


def legend(fig):
    (ax,) = fig.axes
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_plots_show_the_dense_model_at_ratio_one():
    dense = {"accuracy": 0.95, **DENSE}
    fig = report.front_figure({"a": results()}, "flops", OBJECTIVES, dense=dense)
    star = lines_by_label(fig)["dense model (0.9500)"]
    assert list(star.get_xdata()) == [1.0] and list(star.get_ydata()) == [0.95]
    assert star.get_marker() == "*"
    # accuracy unknown: a dotted line at ratio 1
    fig = report.front_figure({"a": results()}, "flops", OBJECTIVES, dense={})
    line = lines_by_label(fig)["dense model (1×, accuracy unknown)"]
    assert list(line.get_xdata()) == [1, 1] and line.get_linestyle() == ":"
    # not asked for: not drawn
    assert not any("dense" in t for t in legend(report.front_figure({"a": results()}, "flops")))


def test_each_study_draws_its_own_budget_with_its_label():
    runs = {"uniform": results(), "optuna": other_run()}
    budgets = {"uniform": ["flops<=0.5"], "optuna": ["flops<=0.3", "accuracy>=0.8"]}
    fig = report.front_figure(runs, "flops", OBJECTIVES, budgets)
    lines = lines_by_label(fig)
    assert list(lines["uniform: flops<=0.5x"].get_xdata()) == [0.5, 0.5]
    assert list(lines["optuna: flops<=0.3x"].get_xdata()) == [0.3, 0.3]
    assert list(lines["optuna: accuracy>=0.8"].get_ydata()) == [0.8, 0.8]
    assert lines["uniform: flops<=0.5x"].get_color() == lines["uniform"].get_color()
    assert lines["optuna: flops<=0.3x"].get_color() == lines["optuna"].get_color()
    # a bound shared by some runs is one grey line naming them; by all, the bound alone
    runs["third"] = other_run()
    shared = {"uniform": ["flops<=0.5"], "optuna": ["flops<=0.5"], "third": []}
    assert "uniform, optuna: flops<=0.5x" in legend(report.front_figure(runs, "flops",
                                                                        OBJECTIVES, shared))
    assert "flops<=0.5x" in legend(report.front_figure(runs, "flops", OBJECTIVES, ["flops<=0.5"]))


def test_an_absolute_budget_is_drawn_as_a_ratio_labelled_with_both():
    runs = {"a": results()}
    fig = report.front_figure(runs, "energy", OBJECTIVES, ["energy<=2e-2J"])
    line = lines_by_label(fig)["energy<=0.02J (0.4×)"]
    assert list(line.get_xdata()) == [0.4, 0.4]
    # the dense value given wins over the one the results imply
    fig = report.front_figure(runs, "energy", OBJECTIVES, ["energy<=2e-2J"],
                              dense={"energy": 0.04})
    assert list(lines_by_label(fig)["energy<=0.02J (0.5×)"].get_xdata()) == [0.5, 0.5]
    assert fig.axes[0].get_xlabel() == "energy (ratio to the dense model)"


def test_a_study_without_ok_results_is_marked_in_the_legend():
    runs = {"good": results(), "broken": [failed(NAN_STEP)]}
    fig = report.front_figure(runs, "flops", OBJECTIVES)
    assert legend(fig) == ["good", "broken (no ok result)"]
    broken = lines_by_label(fig)["broken (no ok result)"]
    assert len(broken.get_xdata()) == 0 and broken.get_marker() in ("None", "none", None)
    tight = report.front_figure({"good": results()}, "flops", OBJECTIVES, ["accuracy>=0.95"])
    assert legend(tight)[0] == "good (none within its budget)"


def test_per_study_dense_models(tmp_path):
    runs = {"a": results(), "b": other_run()}
    dense = {"a": {"accuracy": 0.95}, "b": {"accuracy": 0.9}}
    fig = report.front_figure(runs, "flops", OBJECTIVES, dense=dense)
    assert {"a: dense model (0.9500)", "b: dense model (0.9000)"} <= set(legend(fig))
    same = {"a": {"accuracy": 0.95}, "b": {"accuracy": 0.95}}
    assert "dense model (0.9500)" in legend(report.front_figure(runs, "flops", OBJECTIVES,
                                                                dense=same))
    paths = report.plot_fronts(runs, tmp_path, OBJECTIVES, {"a": ["energy<=0.02J"]},
                               dense={"accuracy": 0.95, **DENSE})
    assert [p.name for p in paths] == ["front_params.png", "front_flops.png", "front_energy.png"]
    for path in paths:
        read_png(path)
