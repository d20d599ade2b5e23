"""Many writers on one store: processes sharing a study never evaluate a config twice, and
claims left by a killed process expire."""

import json
import multiprocessing
import time
from collections import Counter

import optuna
import pg
import pytest
import sqlalchemy
import torch

import ranksearch
from ranksearch.config import Config
from ranksearch.evaluate import Evaluator, ProxySettings
from ranksearch.ledger import Leases
from ranksearch.models import build_model
from ranksearch.pareto import parse_objectives
from ranksearch.result import Result
from ranksearch.store import Store, driver_url, open_storage, read_study

BUDGET = 10
OBJECTIVES = parse_objectives(("accuracy", "flops"))

PROXY = ProxySettings(steps=0, eval_batches=2)


def worker(url, seed, barrier, model, task, out, answers):
    """One search on the shared study, started when every worker is at the barrier."""
    barrier.wait()
    r = ranksearch.search(model, task, strategy="random", evaluations=BUDGET, seed=seed,
                          store=url, study="shared", out=out, proxy=PROXY)
    answers.put(r.evaluated)


@pytest.fixture(scope="session")
def postgres():
    """The URL of a PostgreSQL server started for the tests (skips when none can be)."""
    try:
        with pg.server() as url:
            yield url
    except pg.Unavailable as e:
        pytest.skip(f"no PostgreSQL server for the test: {e}")


def run_together(url: str, seeds, digits, tmp_path) -> list[int]:
    """Fork one worker per seed (imports and data are the test's), released at the same
    instant on a fresh store; return what each evaluated."""
    torch.manual_seed(0)
    model = build_model("digits-cnn")
    Evaluator(model, digits, PROXY)  # discovery's first trace imports what it needs here
    fork = multiprocessing.get_context("fork")
    barrier, answers = fork.Barrier(len(seeds)), fork.Queue()
    procs = [fork.Process(target=worker, args=(url, seed, barrier, model, digits,
                                               str(tmp_path / "out"), answers))
             for seed in seeds]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0] * len(seeds)
    return [answers.get(timeout=5) for _ in seeds]


def check_no_duplicates(url: str) -> None:
    """Exactly the budget of distinct results, one trial each, none left running, and the
    report reads each once."""
    study = optuna.load_study(study_name="shared", storage=open_storage(url))
    trials = study.get_trials()
    keys = Counter(t.user_attrs["key"] for t in trials)
    assert len(trials) == BUDGET and len(keys) == BUDGET, keys
    assert all(t.state.is_finished() and "result" in t.user_attrs for t in trials)
    results, _ = read_study(url, "shared")
    assert len(results) == BUDGET == len({r.config.key for r in results})


def test_three_processes_on_one_fresh_sqlite_store(digits, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    # two copies of one search (same seed: they propose the same configs) and a third
    evaluated = run_together(url, [1, 1, 2], digits, tmp_path)
    assert sum(evaluated) == BUDGET
    check_no_duplicates(url)


def test_three_processes_on_one_fresh_postgres_database(postgres, digits, tmp_path):
    url = pg.fresh_database(postgres)
    assert url.startswith("postgresql://")  # the URL users write, driver mapped
    evaluated = run_together(url, [1, 1, 2], digits, tmp_path)
    assert sum(evaluated) == BUDGET
    check_no_duplicates(url)


def test_postgres_urls_are_mapped_to_an_installed_driver():
    assert driver_url("postgresql://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert driver_url("postgres://u@h:5/db") == "postgresql+psycopg2://u@h:5/db"
    assert driver_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert driver_url("sqlite:///x.db") == "sqlite:///x.db"


# -- claims, in one process with two stores ----------------------------------------------------
@pytest.fixture(scope="module")
def scored(digits):
    torch.manual_seed(0)
    evaluator = Evaluator(build_model("digits-cnn"), digits, ProxySettings(steps=0,
                                                                           eval_batches=1))
    return evaluator


def configs(space, n):
    names = space.names
    out = []
    for i in range(n):
        out.append(Config({names[i % len(names)]: space.choices(names[i % len(names)])[i // len(
            names)]}))
    return out


def test_a_claim_is_seen_by_another_writer_and_saving_it_finishes_one_trial(scored, tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    space = scored.space
    a = Store(url, "s", space, OBJECTIVES)
    b = Store(url, "s", space, OBJECTIVES)
    config = space.uniform(0.5)
    assert a.claim(config).status == "ours"
    assert b.claim(config).status == "busy"
    b.refresh()
    assert b.busy(config.key) and b.claimed == 1 and len(b) == 0
    result = scored(config)
    a.save(result)
    b.refresh()
    assert not b.busy(config.key) and b.get(config) == result
    assert b.claim(config).status == "stored"
    trials = optuna.load_study(study_name="s", storage=url).get_trials()
    assert len(trials) == 1 and trials[0].state == optuna.trial.TrialState.COMPLETE
    assert trials[0].values == [result.metrics["accuracy"], result.metrics["flops"]]
    assert Result.from_json(json.loads(trials[0].user_attrs["result"])) == result


def test_an_expired_claim_is_taken_over_then_recorded_failed_after_max_attempts(scored,
                                                                                tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    space = scored.space
    leases = Leases(interval=0.2, grace=1.0, attempts=2)
    config = space.uniform(0.25)
    dead = Store(url, "s", space, OBJECTIVES, leases=leases)
    assert dead.claim(config).status == "ours"
    dead._heart.stop()  # its process stops beating, as if killed
    other = Store(url, "s", space, OBJECTIVES, leases=leases)
    assert other.claim(config).status == "busy"
    time.sleep(2.1)  # past the grace period, at SQLite's one-second clock
    assert other.claim(config).status == "ours"  # expired: taken over (attempt 2)
    other._heart.stop()
    third = Store(url, "s", space, OBJECTIVES, leases=leases)
    time.sleep(2.1)  # past the grace period, at SQLite's one-second clock
    answer = third.claim(config)
    assert answer.status == "abandoned" and "started 2 times" in answer.reason
    # a live claim is renewed and never expires
    live = Store(url, "s", space, OBJECTIVES, leases=leases)
    kept = space.uniform(0.75)
    assert live.claim(kept).status == "ours"
    time.sleep(2.1)  # past the grace period, at SQLite's one-second clock
    assert third.claim(kept).status == "busy"
    live.release()  # released: taken at once
    assert third.claim(kept).status == "ours"
    trials = optuna.load_study(study_name="s", storage=url).get_trials()
    assert len(trials) == 2  # one trial per config through every takeover


def test_reopening_reads_only_new_trials_and_old_stores_get_key_rows(scored, tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    space = scored.space
    a = Store(url, "s", space, OBJECTIVES)
    results = [scored(c) for c in configs(space, 4)]
    for r in results:
        a.save(r)
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:  # as a store written before the keys table existed
        conn.execute(sqlalchemy.text("DELETE FROM ranksearch_keys"))
    b = Store(url, "s", space, OBJECTIVES)
    assert b.results() == results
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SELECT COUNT(*) FROM ranksearch_keys")).scalar() == 4
    assert b.claim(results[0].config).status == "stored"
    engine.dispose()
