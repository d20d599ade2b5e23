"""Strategy options are checked at the boundary: a bad value is an `OptionError` that names
the strategy, the option, the value and what is valid."""

import inspect
import math
from importlib.metadata import entry_points

import numpy as np
import pytest

from ranksearch import options
from ranksearch.cli import main
from ranksearch.errors import OptionError, RankSearchError
from ranksearch.strategy import GROUP, load_strategy

NAN = float("nan")
REFINE = {"refine": ["yes", 1]}
SWEEP = {"points": [[0.0], [1.5], [], 0.5, "x", ["a"], [NAN]],
         "count": [0, -3, "3", 2.5, True], "method": ["nope", 3], **REFINE}
#: For every built-in strategy, bad values of each of its options.
BAD = {
    "uniform": SWEEP,
    "proportional": SWEEP,
    "random": {"batch": [0, "2", 1.5], "dense": ["yes", 1]},
    "vbmf": {"one_shot": ["yes", 1], "points": [[2.0], [-1.5], [], 0.5],
             "count": [0, "x"], "method": ["tt", "nope"], **REFINE},
    "errorbound": {"thresholds": [[1.5], [-0.1], ["x"], []], "count": [0],
                   "method": ["tr", "nope"], **REFINE},
    "pca_energy": {"count": [-1], "method": ["tt"], "metric": ["accuracy", 3], **REFINE},
    "sensitivity": {"points": [[0.5, 2], [0]], "count": [0], "probe_fraction": [0, 1.5, "x"],
                    "probe_rank": [0, 2.5], "method": ["nope"], "epsilon": [-1, 0, NAN],
                    **REFINE},
    "beam": {"width": [0, True], "step": [0, 1.5], "minibatches": ["2"], "method": ["nope"],
             "moves": [0], **REFINE},
    "auto": {"analytic": [0, 1.5, "x"], "sweeps": [3, [1]], "tpe_every": [-1, 1.5],
             "best_every": [-1, "x"], "swaps": ["yes", 2]},
    "nsga2": {"pop_size": [1, "8"], "generations": [0], "dense": ["no"], "cheaper": [0],
              "narrow_after": [0], "narrow_width": [[2, 0], [], 0, "4"],
              "seed_with": ["nope", ["uniform", "random"], 3], "crossover_eta": [0, "x"],
              "mutation_eta": [-1]},
    "rl": {"warmup": [-1, 1.5], "batch": [0], "lr": [0.0, "x"], "hidden": [0],
           "a_min": [1.0, -0.1], "cost_weight": [-1.0], "baseline_decay": [1.0],
           "method": ["nope"]},
    "bayes_tt": {"strengths": [[], [-1], "x", [math.inf]], "prior": ["laplace"],
                 "eta": [0.0], "steps": [0], "lr": [0.0], "batch_size": [0],
                 "threshold": [1.0, 0.0], "max_rank": [0, 2.5]},
    "optuna": {"sampler": ["x"], "sampler_options": [{"bogus": 1}, "x", [1]],
               "batch": [0, True], "encoding": ["onehot"], "dense": ["yes"], "cheaper": [None]},
}
CASES = [(s, o, v) for s, opts in BAD.items() for o, values in opts.items() for v in values]


def builtin_strategies():
    return {ep.name: ep for ep in entry_points(group=GROUP)
            if ep.value.startswith("ranksearch_strategies.")}


def test_every_option_of_every_builtin_strategy_is_covered():
    eps = builtin_strategies()
    assert set(BAD) == set(eps)
    for name, ep in eps.items():
        params = set(inspect.signature(ep.load()).parameters) - {"self"}
        assert set(BAD[name]) == params, name


@pytest.mark.parametrize(("strategy", "option", "value"), CASES,
                         ids=[f"{s}-{o}-{v!r}" for s, o, v in CASES])
def test_bad_option_is_an_option_error(strategy, option, value):
    with pytest.raises(OptionError) as caught:
        load_strategy(strategy, {option: value})
    e = caught.value
    assert isinstance(e, ValueError) and isinstance(e, RankSearchError)
    message = str(e)
    assert message.startswith(f"{strategy}: "), message
    assert option in message and repr(value) in message, message
    assert "must be" in message, message  # and what is valid


def test_defaults_pass():
    for name in BAD:
        load_strategy(name)


def test_checks_return_canonical_values():
    who = "demo"
    assert options.positive_int(np.int64(3), "n", who) == 3
    assert type(options.positive_int(np.int64(3), "n", who)) is int
    assert options.positive_int(None, "n", who, optional=True) is None
    assert options.integer(0, "n", who, 0) == 0
    assert options.fraction(1, "f", who) == 1.0
    assert options.number_in(0.5, "x", who, 0, 1, open_low=True, open_high=True) == 0.5
    assert options.values_in((0.2, np.float32(0.5)), "v", who, 0, 1) == [0.2, 0.5]
    assert options.values_in(None, "v", who) is None
    assert options.integers(3, "w", who) == [3]
    assert options.integers([4, 2], "w", who) == [4, 2]
    assert options.names("uniform, errorbound,", "s", who) == ["uniform", "errorbound"]
    assert options.names((), "s", who) == []
    assert options.mapping(None, "m", who) == {}
    assert options.choice("b", "c", who, ("a", "b")) == "b"
    assert options.method_name("svd", "method", who, spectral=True) == "svd"
    assert options.boolean(False, "b", who) is False


@pytest.mark.parametrize(("check", "value", "valid"), [
    (lambda v: options.positive_int(v, "n", "demo"), None, "≥ 1"),
    (lambda v: options.fraction(v, "f", "demo"), 0, "in (0, 1]"),
    (lambda v: options.positive(v, "p", "demo"), math.inf, "> 0"),
    (lambda v: options.number_in(v, "x", "demo", high=1, open_high=True), 1, "< 1"),
    (lambda v: options.number_in(v, "x", "demo", 0, 1, open_high=True), -1, "in [0, 1)"),
    (lambda v: options.choice(v, "c", "demo", ("a", "b")), "z", "['a', 'b']"),
    (lambda v: options.method_name(v, "method", "demo"), "svd2", "'tucker2'"),
    (lambda v: options.method_name(v, "method", "demo", spectral=True), "tt", "'svd'"),
    (lambda v: options.mapping(v, "m", "demo"), {1: 2}, "mapping"),
    (lambda v: options.names(v, "s", "demo"), [1], "list of names"),
])
def test_errors_say_what_is_valid(check, value, valid):
    with pytest.raises(OptionError, match=r"^demo: ") as caught:
        check(value)
    assert valid in str(caught.value) and repr(value) in str(caught.value)


def test_cli_reports_a_bad_option_without_a_traceback(tmp_path, capsys):
    code = main(["search", "--task", "digits", "--strategy", "uniform", "--option", "count=-3",
                 "--evaluations", "1", "--out", str(tmp_path / "out"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: uniform: count must be an integer ≥ 1"), captured.err
    assert "-3" in captured.err and "Traceback" not in captured.err
