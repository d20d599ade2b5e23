"""Store cost against its size: opening a study, and what each evaluation adds (a claim, the
save that finishes it, and the read of other writers' news at each ask), at 100, 1,000 and
10,000 stored trials, on SQLite and PostgreSQL. Optuna's own full read of the study
(``get_trials``, what opening cost before) is shown beside.

    python benchmarks/bench_store.py [--postgres URL] [--sizes 100,1000,10000]

Without ``--postgres`` a throwaway server is started when PostgreSQL is installed (as the
tests do); PostgreSQL is skipped, with a message, when none can be had.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import optuna
import torch

from ranksearch.config import Config
from ranksearch.models import build_model
from ranksearch.pareto import parse_objectives
from ranksearch.result import Result
from ranksearch.space import RankSpace
from ranksearch.store import Store, quiet_optuna

OBJECTIVES = parse_objectives(("accuracy", "flops"))
PROBES = 40  # evaluations timed at each size


def results(space: RankSpace, n: int, seed: int) -> list[Result]:
    """``n`` distinct random configs of ``space`` with made-up metrics."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        config = Config({s: rng.choice(space.choices(s)) for s in space.names})
        if config.key in seen:
            continue
        seen.add(config.key)
        out.append(Result(config, {"accuracy": rng.random(), "flops": rng.uniform(1e6, 4e7),
                                   "flops_ratio": rng.random(), "params": 2e5},
                          wall_time=1.0, proxy="zero-shot", fingerprint="0" * 16))
    return out


def grow(url: str, space: RankSpace, to: int, have: int, pool: list[Result]) -> None:
    """Store ``pool[have:to]`` (claim and save, as a search does)."""
    store = Store(url, "bench", space, OBJECTIVES)
    for r in pool[have:to]:
        store.claim(r.config)
        store.save(r)
    store.release()


def measure(url: str, space: RankSpace, probes: list[Result]) -> dict[str, float]:
    t = time.perf_counter()
    store = Store(url, "bench", space, OBJECTIVES)
    opened = time.perf_counter() - t
    t = time.perf_counter()
    with quiet_optuna():
        optuna.load_study(study_name="bench", storage=store._storage).get_trials()
    optuna_read = time.perf_counter() - t
    claims, saves, refreshes = [], [], []
    for r in probes:
        t = time.perf_counter()
        store.refresh()
        refreshes.append(time.perf_counter() - t)
        t = time.perf_counter()
        store.claim(r.config)
        claims.append(time.perf_counter() - t)
        t = time.perf_counter()
        store.save(r)
        saves.append(time.perf_counter() - t)
    store.release()
    ms = 1000.0
    return {"open s": opened, "optuna get_trials s": optuna_read,
            "refresh ms": statistics.median(refreshes) * ms,
            "claim ms": statistics.median(claims) * ms, "save ms": statistics.median(saves) * ms,
            "per evaluation ms": (statistics.median(refreshes) + statistics.median(claims)
                                  + statistics.median(saves)) * ms}


def postgres(stack: ExitStack, given: str | None) -> str | None:
    if given:
        return given
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import pg  # the tests' throwaway server

    try:
        return pg.fresh_database(stack.enter_context(pg.server()))
    except pg.Unavailable as e:
        print(f"PostgreSQL skipped: {e}")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", help="a PostgreSQL URL whose database may be written")
    parser.add_argument("--sizes", default="100,1000,10000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.manual_seed(0)
    space = RankSpace.discover(build_model("resnet20"), torch.zeros(1, 3, 32, 32))
    pool = results(space, max(sizes) + PROBES, seed=0)
    rows = []
    with ExitStack() as stack, tempfile.TemporaryDirectory() as folder:
        backends = {"sqlite": f"sqlite:///{folder}/bench.db"}
        pg_url = postgres(stack, args.postgres)
        if pg_url is not None:
            backends["postgresql"] = pg_url
        for backend, url in backends.items():
            have = 0
            for size in sizes:
                grow(url, space, size, have, pool)  # `size` trials stored, then timed probes
                rows.append((backend, size, measure(url, space, pool[size:size + PROBES])))
                have = size + PROBES
                print(f"{backend} {size} done", file=sys.stderr)
    header = ["store", "trials", *rows[0][2]]
    print(f"resnet20 space ({len(space.names)} sites), {PROBES} evaluations timed per size")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for backend, size, m in rows:
        print(" | ".join([backend, f"{size:,}", *(f"{v:.3g}" for v in m.values())]))


if __name__ == "__main__":
    main()
