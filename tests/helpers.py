"""Helpers shared by the tests."""

import math
import sqlite3

import torch
from torch import nn

from ranksearch.factorize import get
from ranksearch.site import Site
from ranksearch.strategy import StopSearch


def proposals(strategy):
    """Every config a strategy proposes of its own until it stops or hands the rest of the
    budget to refinement (asking with nothing told)."""
    out = []
    handover = getattr(strategy, "handover", None)
    while True:
        try:
            batch = strategy.ask()
        except StopSearch:
            return out
        if handover is not None and handover.active:
            return out
        out += batch


def rank_sweep(top, steps: int = 4) -> list:
    """Ranks from small to ``top`` (tuples scale every component)."""
    fractions = [(i + 1) / steps for i in range(steps)]
    if isinstance(top, int):
        return sorted({max(1, math.ceil(f * top)) for f in fractions})
    return sorted({tuple(max(1, math.ceil(f * t)) for t in top) for f in fractions})


def built(method: str, site: Site, layer: nn.Module, rank, factor_rank=None) -> nn.Module:
    """``method`` at ``rank`` on ``layer``, from factors decomposed at ``factor_rank``."""
    fac = get(method)
    factors = fac.decompose(layer.weight.detach(), site, factor_rank or rank)
    return fac.build(site, rank, factors, None if layer.bias is None else layer.bias.detach())


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


def assert_reloads(method: str, site: Site, layer: nn.Module, x: torch.Tensor, rank) -> None:
    """A bare build of ``method`` at ``rank`` loads the state dict of a decomposed one and then
    computes exactly what it does."""
    source = built(method, site, layer, rank)
    target = get(method).build(site, rank)
    target.load_state_dict(source.state_dict())
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def stored(out) -> int:
    """Finished trials in the SQLite store of folder ``out`` (claims, which are RUNNING
    trials, left out), read without touching its schema."""
    db = out / "ranksearch.db"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM trials WHERE state != 'RUNNING'"
                                ).fetchone()[0]
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0


def search_arguments(monkeypatch, model, task) -> dict:
    """Make the CLI's `search` record its keyword arguments (into the dict returned) and stop
    at once, on ``model`` and ``task``, so a test sees what the command line passed."""
    from ranksearch import cli
    from ranksearch.errors import RankSearchError

    seen: dict = {}

    def fake_search(model, task, **kwargs):
        seen.update(kwargs)
        raise RankSearchError("stopped by the test")

    monkeypatch.setattr(cli, "search", fake_search)
    monkeypatch.setattr(cli, "model_and_task", lambda *a, **k: (model, task))
    return seen
