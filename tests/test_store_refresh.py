"""The store's refresh on SQLite reads only when another connection committed."""

from __future__ import annotations

import torch

from ranksearch.config import Config
from ranksearch.models import build_model
from ranksearch.pareto import parse_objectives
from ranksearch.result import Result
from ranksearch.space import RankSpace
from ranksearch.store import Store

OBJECTIVES = parse_objectives(("accuracy", "flops"))


def _space() -> RankSpace:
    torch.manual_seed(0)
    return RankSpace.discover(build_model("digits-cnn"), torch.zeros(1, 1, 8, 8), max_choices=3)


def _result(space: RankSpace, i: int) -> Result:
    name = space.names[i % len(space.names)]
    config = Config({name: space.choices(name)[i // len(space.names)]})
    return Result(config, {"accuracy": 0.5 + i / 100, "flops": 1e6 - i, "flops_ratio": 0.5},
                  proxy="zero-shot", fingerprint="0" * 16)


def test_refresh_skips_reads_until_another_writer_commits(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    space = _space()
    mine, theirs = Store(url, "s", space, OBJECTIVES), Store(url, "s", space, OBJECTIVES)
    reads = []
    read = mine._db.read
    mine._db.read = lambda *a, **k: reads.append(1) or read(*a, **k)
    mine.refresh()
    first = len(reads)
    assert first == 1
    for i in range(3):  # our own claims and saves are no news
        r = _result(space, i)
        assert mine.claim(r.config).status == "ours"
        mine.save(r)
        mine.refresh()
    assert len(reads) == first
    other = _result(space, 3)
    assert theirs.claim(other.config).status == "ours"  # their claim is news: read, and seen
    mine.refresh()
    assert len(reads) == first + 1 and mine.busy(other.config.key) and mine.claimed == 1
    assert mine.claim(other.config).status == "busy"
    theirs.save(other)  # their running claim is watched: every refresh reads until it ends
    mine.refresh()
    assert other.config in mine and not mine.busy(other.config.key)
    assert mine.get(other.config).metrics["accuracy"] == other.metrics["accuracy"]
    settled = len(reads)
    mine.refresh()
    assert len(reads) == settled
    theirs.release()
    mine.release()
    assert [r.config.key for r in Store(url, "s", space, OBJECTIVES).results()] == \
        [_result(space, i).config.key for i in range(4)]
