import math

import pytest

from ranksearch.constraints import Constraint, parse_constraints, satisfies
from ranksearch.errors import ConstraintError, RankSearchError

# text -> (metric, op, value, relative, key)
PARSE_TABLE = {
    # bare numbers on cost metrics: <= 1 is a ratio, > 1 absolute
    "flops<=0.5": ("flops", "<=", 0.5, True, "flops_ratio"),
    "flops<=1": ("flops", "<=", 1.0, True, "flops_ratio"),
    "params<=2e6": ("params", "<=", 2e6, False, "params"),
    "macs<=1.5": ("macs", "<=", 1.5, False, "macs"),
    # energy and latency take a unit or x/% (a bare number is ambiguous there)
    "energy<=0.25x": ("energy", "<=", 0.25, True, "energy_ratio"),
    "energy<=3J": ("energy", "<=", 3.0, False, "energy"),
    "latency<=0.8x": ("latency", "<=", 0.8, True, "latency_ratio"),
    "latency<=2s": ("latency", "<=", 2.0, False, "latency"),
    "energy_ratio<=0.25": ("energy", "<=", 0.25, True, "energy_ratio"),
    # % and x force the ratio reading
    "flops<=50%": ("flops", "<=", 0.5, True, "flops_ratio"),
    "params<=0.3x": ("params", "<=", 0.3, True, "params_ratio"),
    "latency<=1.2x": ("latency", "<=", 1.2, True, "latency_ratio"),
    "energy<=150%": ("energy", "<=", 1.5, True, "energy_ratio"),
    "macs<=0.5X": ("macs", "<=", 0.5, True, "macs_ratio"),
    # count units
    "params<=2M": ("params", "<=", 2e6, False, "params"),
    "params<=500k": ("params", "<=", 5e5, False, "params"),
    "params<=0.5M": ("params", "<=", 5e5, False, "params"),
    "params<=1.5K": ("params", "<=", 1500.0, False, "params"),
    "flops<=2G": ("flops", "<=", 2e9, False, "flops"),
    "macs<=300k": ("macs", "<=", 3e5, False, "macs"),
    # energy units: even a value <= 1 is absolute with a unit
    "energy<=1J": ("energy", "<=", 1.0, False, "energy"),
    "energy<=0.5J": ("energy", "<=", 0.5, False, "energy"),
    "energy<=5mJ": ("energy", "<=", 0.005, False, "energy"),
    "energy<=20uJ": ("energy", "<=", 2e-5, False, "energy"),
    "energy<=20µJ": ("energy", "<=", 2e-5, False, "energy"),
    # latency units
    "latency<=0.5s": ("latency", "<=", 0.5, False, "latency"),
    "latency<=10ms": ("latency", "<=", 0.01, False, "latency"),
    "latency<=250us": ("latency", "<=", 2.5e-4, False, "latency"),
    # accuracy and loss are absolute
    "accuracy>=0.9": ("accuracy", ">=", 0.9, False, "accuracy"),
    "accuracy>=90%": ("accuracy", ">=", 0.9, False, "accuracy"),
    "accuracy>=1": ("accuracy", ">=", 1.0, False, "accuracy"),
    "loss<=0.5": ("loss", "<=", 0.5, False, "loss"),
    "loss<=2.5": ("loss", "<=", 2.5, False, "loss"),
    # strict operators read as the non-strict ones; whitespace and case are free
    "flops<0.5": ("flops", "<=", 0.5, True, "flops_ratio"),
    "accuracy>0.7": ("accuracy", ">=", 0.7, False, "accuracy"),
    "  accuracy >= 90 %  ": ("accuracy", ">=", 0.9, False, "accuracy"),
    "params <= 2 M": ("params", "<=", 2e6, False, "params"),
    "FLOPs<=0.5": ("flops", "<=", 0.5, True, "flops_ratio"),
    "flops ≤ 0.5": ("flops", "<=", 0.5, True, "flops_ratio"),
    # _ratio names are ratios whatever the number
    "flops_ratio<=0.5": ("flops", "<=", 0.5, True, "flops_ratio"),
    "params_ratio<=2": ("params", "<=", 2.0, True, "params_ratio"),
    # number forms
    "flops<=.25": ("flops", "<=", 0.25, True, "flops_ratio"),
    "params<=+3E6": ("params", "<=", 3e6, False, "params"),
}


@pytest.mark.parametrize("text", list(PARSE_TABLE))
def test_parse_table(text):
    metric, op, value, relative, key = PARSE_TABLE[text]
    c = Constraint.parse(text)
    assert (c.metric, c.op, c.relative, c.key) == (metric, op, relative, key)
    assert c.value == pytest.approx(value, rel=1e-15)
    assert isinstance(c.value, float)


@pytest.mark.parametrize("text", [*PARSE_TABLE, "energy<=3e-06J", "latency<=1e-07s"])
def test_str_round_trips(text):
    c = Constraint.parse(text)
    again = Constraint.parse(str(c))
    assert again == c
    assert str(again) == str(c)


def test_str_canonical_forms():
    assert str(Constraint.parse("flops<=50%")) == "flops<=0.5x"
    assert str(Constraint.parse("params<=2M")) == "params<=2000000"
    assert str(Constraint.parse("energy<=5mJ")) == "energy<=0.005J"
    assert str(Constraint.parse("latency<=10ms")) == "latency<=0.01s"
    assert str(Constraint.parse("accuracy>90%")) == "accuracy>=0.9"
    assert str(Constraint("latency", "<=", 1.5, relative=True)) == "latency<=1.5x"


def test_direct_construction_normalizes():
    c = Constraint("flops_ratio", "<", 0.5)
    assert (c.metric, c.op, c.value, c.relative, c.key) == ("flops", "<=", 0.5, True, "flops_ratio")
    assert c == Constraint.parse("flops<=0.5")
    assert Constraint("params", "<=", 2_000_000).key == "params"
    assert hash(c) == hash(Constraint.parse("flops<=50%"))


def test_unit_conversion_is_exact():
    # 0.9 mJ must be the double nearest to 9e-4, not 0.9 * 1e-3 (0.0009000000000000001)
    assert 0.9 * 1e-3 != 9e-4
    assert Constraint.parse("energy<=0.9mJ").value == 9e-4
    assert Constraint.parse("latency<=1.3ms").value == 1.3e-3
    assert Constraint.parse("latency<=2.1us").value == 2.1e-6
    assert Constraint.parse("params<=1.1M").value == 1_100_000.0


@pytest.mark.parametrize(
    ("text", "inside", "boundary", "outside"),
    [
        ("flops<=0.5", 0.4, 0.5, 0.6),
        ("params<=2M", 1.5e6, 2e6, 2.5e6),
        ("accuracy>=0.9", 0.95, 0.9, 0.85),
        ("energy<=5mJ", 0.004, 0.005, 0.006),
        ("loss<=0", -0.5, 0.0, 0.5),
    ],
)
def test_satisfied_and_violation_signs(text, inside, boundary, outside):
    c = Constraint.parse(text)
    assert c.satisfied({c.key: inside}) and c.violation({c.key: inside}) < 0
    assert c.satisfied({c.key: boundary}) and c.violation({c.key: boundary}) == 0
    assert not c.satisfied({c.key: outside}) and c.violation({c.key: outside}) > 0


def test_violation_is_scaled_by_the_bound():
    flops = Constraint.parse("flops<=0.5")
    params = Constraint.parse("params<=2M")
    acc = Constraint.parse("accuracy>=0.8")
    # each 10 % beyond its bound
    assert flops.violation({"flops_ratio": 0.55}) == pytest.approx(0.1)
    assert params.violation({"params": 2.2e6}) == pytest.approx(0.1)
    assert acc.violation({"accuracy": 0.72}) == pytest.approx(0.1)
    assert acc.violation({"accuracy": 0.88}) == pytest.approx(-0.1)
    # a bound of 0 is scaled by 1
    assert Constraint.parse("loss<=0").violation({"loss": 0.25}) == pytest.approx(0.25)


def test_relative_reads_the_ratio_key_only():
    rel = Constraint.parse("flops<=0.5")
    absolute = Constraint.parse("flops<=2e6")
    metrics = {"flops": 1e6, "flops_ratio": 0.8}
    assert not rel.satisfied(metrics)  # reads flops_ratio = 0.8
    assert absolute.satisfied(metrics)  # reads flops = 1e6


@pytest.mark.parametrize("metrics", [{}, {"flops_ratio": None}, {"flops_ratio": math.nan}])
def test_missing_metric_is_never_satisfied(metrics):
    c = Constraint.parse("flops<=0.5")
    assert not c.satisfied(metrics)
    assert c.violation(metrics) == math.inf


def test_tiny_violation_stays_positive():
    c = Constraint("energy", "<=", 1e300)
    metrics = {"energy": math.nextafter(1e300, math.inf)}
    assert not c.satisfied(metrics)
    assert c.violation(metrics) > 0


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("flop<=0.5", "unknown metric 'flop'"),
        ("top_1>=0.9", "unknown metric 'top_1'"),
        ("flops=<0.5", "bad operator '=<'"),
        ("flops==0.5", "bad operator '=='"),
        ("flops!=0.5", "bad operator '!='"),
        ("flops 0.5", "cannot read"),
        ("flops<=abc", "no number"),
        ("flops<=", "no number"),
        ("<=0.5", "cannot read"),
        ("", "cannot read"),
        ("params<=2m", "unknown suffix 'm'"),
        ("params<=2MB", "unknown suffix 'MB'"),
        ("energy<=5ms", "unknown suffix 'ms'"),
        ("latency<=5mJ", "unknown suffix 'mJ'"),
        ("flops<=1e", "unknown suffix 'e'"),
        ("flops_ratio<=2M", "unknown suffix 'M'"),
        ("accuracy>=0.9x", "cannot be bounded relative"),
        ("loss<=0.9x", "cannot be bounded relative"),
        ("loss<=5%", "percent"),
        ("accuracy>=90", "fraction in [0, 1]"),
        ("accuracy>=-0.1", "fraction in [0, 1]"),
        ("flops<=-0.2", "cannot be negative"),
        ("energy<=1e400", "finite"),
        ("energy<=1e400J", "finite"),
        ("energy<=2e-5", "energy<=2e-05 is ambiguous: write energy<=2e-05J for joules or "
                         "energy<=2e-05x for a ratio of the dense model"),
        ("energy<=3", "energy<=3 is ambiguous"),
        ("latency<=0.002", "latency<=0.002 is ambiguous: write latency<=0.002s for seconds or "
                           "latency<=0.002x for a ratio of the dense model (other units: ms, us)"),
        ("latency>2", "latency>=2 is ambiguous"),
    ],
)
def test_bad_input_raises_clear_error(text, fragment):
    with pytest.raises(ConstraintError) as info:
        Constraint.parse(text)
    message = str(info.value)
    assert fragment in message
    assert isinstance(info.value, RankSearchError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("text", ["flop<=0.5", "flops=<0.5", "flops<=abc", "params<=2m"])
def test_syntax_errors_list_what_is_accepted(text):
    with pytest.raises(ConstraintError) as info:
        Constraint.parse(text)
    message = str(info.value)
    for example in ("'flops<=0.5'", "'params<=2M'", "'accuracy>=90%'", "latency"):
        assert example in message


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("accuracy", "<=", 0.5, True), "cannot be bounded relative"),
        (("flops", "=", 0.5), "unknown operator"),
        (("latency_ms", "<=", 0.5), "unknown metric"),
        (("flops", "<=", math.nan, True), "finite"),
        (("flops", "<=", "half", True), "must be a number"),
        (("params", "<=", 0.5), "must be above 1"),
    ],
)
def test_bad_direct_construction(args, fragment):
    with pytest.raises(ConstraintError) as info:
        Constraint(*args)
    assert fragment in str(info.value)


def test_parse_constraints():
    c = Constraint.parse("accuracy>=0.9")
    got = parse_constraints(["flops<=0.5", c, "params<=2M, latency<=10ms"])
    assert [str(x) for x in got] == [
        "flops<=0.5x",
        "accuracy>=0.9",
        "params<=2000000",
        "latency<=0.01s",
    ]
    assert got[1] is c
    assert parse_constraints("flops<=0.5") == (Constraint.parse("flops<=0.5"),)
    assert parse_constraints(c) == (c,)
    assert parse_constraints(()) == ()
    assert parse_constraints(None) == ()
    assert parse_constraints(x for x in ["loss<=1"]) == (Constraint.parse("loss<=1"),)
    with pytest.raises(ConstraintError, match="string or a Constraint"):
        parse_constraints([0.5])
    with pytest.raises(ConstraintError, match="empty constraint"):
        parse_constraints([" , "])
    with pytest.raises(ConstraintError, match="unknown metric"):
        parse_constraints(["flops<=0.5, flop<=0.5"])


def test_satisfies_all():
    cons = parse_constraints(["flops<=0.5", "accuracy>=0.9"])
    assert satisfies({"flops_ratio": 0.4, "accuracy": 0.95}, cons)
    assert not satisfies({"flops_ratio": 0.6, "accuracy": 0.95}, cons)
    assert not satisfies({"flops_ratio": 0.4, "accuracy": 0.85}, cons)
    assert satisfies({}, ())


# -- through a search --------------------------------------------------------------------------
def tiny():
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from ranksearch.task import Task

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    data = TensorDataset(torch.randn(24, 3, 4), torch.arange(24) % 3)
    return model, Task("tiny", train=data, val=data)


def tiny_search(out, **kw):
    import ranksearch
    from ranksearch.evaluate import ProxySettings

    return ranksearch.search(*tiny(), out=str(out), evaluations=3, proxy=ProxySettings(steps=0),
                             strategy="uniform", strategy_options={"points": [0.9, 0.5, 0.2]},
                             **kw)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("energy<=2e-5", "energy<=2e-05 is ambiguous: write energy<=2e-05J for joules or "
                         "energy<=2e-05x for a ratio of the dense model"),
        ("latency<=0.002", "latency<=0.002 is ambiguous: write latency<=0.002s for seconds"),
    ],
)
def test_search_refuses_a_bare_energy_or_latency_bound(tmp_path, text, fragment):
    with pytest.raises(ConstraintError) as info:
        tiny_search(tmp_path / "out", constraints=[text])
    assert fragment in str(info.value)
    assert not (tmp_path / "out").exists()


def test_the_cli_refuses_a_bare_latency_bound(tmp_path, capsys):
    from ranksearch.cli import main

    factory = tmp_path / "user_task.py"
    factory.write_text(
        "import torch\nfrom torch import nn\nfrom torch.utils.data import TensorDataset\n"
        "from ranksearch.task import Task\n\n"
        "def make():\n"
        "    data = TensorDataset(torch.randn(6, 3, 4), torch.tensor([0, 1, 2, 0, 1, 2]))\n"
        "    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))\n"
        "    return model, Task('mine', train=data, val=data)\n"
    )
    assert main(["search", "--task", f"{factory}:make", "--out", str(tmp_path / "out"),
                 "--constraint", "latency<=0.002", "--no-progress", "--evaluations", "1"]) == 2
    err = capsys.readouterr().err
    assert "latency<=0.002 is ambiguous" in err and "latency<=0.002x" in err
    assert not (tmp_path / "out" / "ranksearch.db").exists()


@pytest.mark.parametrize(
    ("text", "reached"),
    [("flops<=0.001", r"the cheapest reaches flops_ratio 0\.\d+x"),
     ("energy<=1e-12J", r"the cheapest reaches energy [\d.e+-]+J")],
)
def test_unreachable_bounds_say_which_reading_was_used(tmp_path, text, reached):
    from ranksearch.search import ConstraintUnreachableError

    with pytest.raises(ConstraintUnreachableError, match=reached):
        tiny_search(tmp_path, constraints=[text])


def test_best_takes_constraints_one_by_one_or_as_a_list(tmp_path):
    result = tiny_search(tmp_path)
    by_list = result.best(["flops<=0.5"])
    within = [r for r in result.results if r.ok and r.metrics["flops_ratio"] <= 0.5]
    assert by_list.metrics["accuracy"] == max(r.metrics["accuracy"] for r in within)
    assert by_list in within
    assert result.best("flops<=0.5") == by_list == result.best(("flops<=0.5",))
    assert result.best(["flops<=0.5", "params<=0.5"]) == result.best("flops<=0.5",
                                                                      "params<=0.5")
    assert result.best() == result.best(list(result.constraints) or ())
    assert result.best(["flops<=0.0001x"]) is None
