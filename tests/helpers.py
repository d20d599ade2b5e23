"""Helpers shared by the strategy tests."""

from ranksearch.strategy import StopSearch


def proposals(strategy):
    """Every config a strategy proposes until it stops (asking with nothing told)."""
    out = []
    while True:
        try:
            out += strategy.ask()
        except StopSearch:
            return out
