"""Every error class lives in ranksearch.errors and is exported; importing the package
changes no global setting."""

import importlib
import inspect
import pkgutil
import subprocess
import sys

import optuna
import pytest
import ranksearch_strategies
import torch
from torch import nn

import ranksearch
from ranksearch import errors
from ranksearch.pareto import parse_objectives
from ranksearch.space import RankSpace
from ranksearch.store import MEMORY, Store, quiet_optuna


def package_modules():
    """Every importable module of ranksearch and of the built-in strategies."""
    found = []
    for package in (ranksearch, ranksearch_strategies):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if info.name.endswith(".__main__"):  # runs the command line
                continue
            try:
                found.append(importlib.import_module(info.name))
            except ImportError:  # an optional dependency (e.g. ray) is missing
                continue
    return found


def subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from subclasses(sub)


def test_every_error_class_is_in_errors_and_exported():
    package_modules()
    ours = [c for c in subclasses(ranksearch.RankSearchError)
            if c.__module__.split(".")[0] in ("ranksearch", "ranksearch_strategies")]
    assert len(ours) >= 18
    for cls in ours:
        assert cls.__module__ == "ranksearch.errors", cls
        assert cls.__name__ in ranksearch.__all__ and getattr(ranksearch, cls.__name__) is cls
    defined = {name for name, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, ranksearch.RankSearchError)}
    assert defined <= set(ranksearch.__all__)


@pytest.mark.parametrize(("module", "name"), [
    ("ranksearch.search", "ConstraintUnreachableError"),
    ("ranksearch.strategy", "UnknownStrategyError"),
    ("ranksearch.evaluate", "CandidateFailed"),
    ("ranksearch.store", "StoreError"),
])
def test_moved_errors_are_importable_where_they_were(module, name):
    assert getattr(importlib.import_module(module), name) is getattr(errors, name)


def test_option_error_is_a_value_error():
    assert issubclass(errors.OptionError, ValueError)
    assert issubclass(errors.OptionError, errors.RankSearchError)
    assert issubclass(errors.UnknownStrategyError, KeyError)
    assert str(errors.UnknownStrategyError("no 'x'")) == "no 'x'"  # not quoted as KeyError's


def test_import_leaves_optuna_verbosity_alone():
    code = ("import optuna\n"
            "optuna.logging.set_verbosity(optuna.logging.DEBUG)\n"
            "import ranksearch, ranksearch.store, ranksearch_strategies.optuna\n"
            "assert optuna.logging.get_verbosity() == optuna.logging.DEBUG, "
            "optuna.logging.get_verbosity()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr


def test_a_store_quiets_optuna_only_while_it_works(capfd):
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        with quiet_optuna():
            assert optuna.logging.get_verbosity() == optuna.logging.WARNING
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
        space = RankSpace.discover(nn.Sequential(nn.Linear(8, 6)), torch.zeros(1, 8))
        capfd.readouterr()
        Store(MEMORY, "quiet", space, parse_objectives(("accuracy", "flops")))
        assert "study created" not in capfd.readouterr().err
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
    finally:
        optuna.logging.set_verbosity(before)
