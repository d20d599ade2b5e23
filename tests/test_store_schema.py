"""New SQLite stores are copies of a schema template; they match what Optuna sets up."""

import contextlib
import pickle
import sqlite3

import optuna
import pytest
import torch

from ranksearch import schema
from ranksearch.config import Choice, Config
from ranksearch.evaluate import Evaluator, ProxySettings
from ranksearch.models import build_model
from ranksearch.pareto import parse_objectives
from ranksearch.store import Store, open_storage, read_study

OBJECTIVES = parse_objectives(("accuracy", "flops"))


@pytest.fixture(scope="module")
def evaluator(digits):
    torch.manual_seed(0)
    return Evaluator(build_model("digits-cnn"), digits, ProxySettings(eval_batches=1))


def tables(path):
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return {name: sql for name, sql in conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type IN ('table', 'index')")}


def test_a_new_store_has_the_schema_optuna_makes(tmp_path):
    open_storage(f"sqlite:///{tmp_path / 'seeded.db'}").engine.dispose()
    plain = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'plain.db'}")
    from ranksearch.ledger import create_tables
    create_tables(plain.engine)
    plain.engine.dispose()
    assert schema.template() is not None
    assert tables(tmp_path / "seeded.db") == tables(tmp_path / "plain.db")
    assert schema.revision(tmp_path / "seeded.db") == schema.revision(tmp_path / "plain.db")
    assert schema.revision(tmp_path / "seeded.db") is not None


def test_seeding_never_overwrites(tmp_path, evaluator):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = Store(url, "s", evaluator.space, OBJECTIVES)
    store.save(evaluator(evaluator.space.uniform(0.5)))
    store.release()
    assert not schema.seed(tmp_path / "r.db")
    assert len(read_study(url, "s")[0]) == 1
    reopened = Store(url, "s", evaluator.space, OBJECTIVES)  # the current revision: no check
    assert len(reopened) == 1
    reopened.release()


def test_an_old_schema_revision_is_checked_by_optuna(tmp_path, evaluator):
    path = tmp_path / "old.db"
    Store(f"sqlite:///{path}", "s", evaluator.space, OBJECTIVES).release()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE alembic_version SET version_num = 'v3.0.0.a'")
    assert not schema.current(path)
    with pytest.raises(Exception, match="upgrade"):
        open_storage(f"sqlite:///{path}")


def test_without_a_template_optuna_sets_the_store_up(tmp_path, monkeypatch, evaluator):
    monkeypatch.setattr(schema, "template", lambda: None)
    assert not schema.seed(tmp_path / "x.db")
    url = f"sqlite:///{tmp_path / 'x.db'}"
    store = Store(url, "s", evaluator.space, OBJECTIVES)
    store.save(evaluator(evaluator.space.uniform(0.5)))
    store.release()
    assert len(read_study(url, "s")[0]) == 1


def test_an_unwritable_cache_gives_no_template(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setattr(schema, "template_path", lambda: blocked / "t.db")
    schema.template.cache_clear()
    try:
        assert schema.template() is None
    finally:
        schema.template.cache_clear()


def test_configs_pickle_and_keep_their_key():
    config = Config({"a": Choice("svd", 3), "b": Choice("tucker2", (2, 4))})
    key = config.key
    again = pickle.loads(pickle.dumps(config))
    assert again == config and hash(again) == hash(config) and again.key == key
    assert Config.from_json(key) == config
