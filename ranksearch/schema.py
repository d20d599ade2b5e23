"""A template of the store's SQLite schema, made once per Optuna and SQLAlchemy version.

Setting up Optuna's schema in a new database reads Optuna's migration scripts (0.3-0.5 s),
and so does checking an existing database against it: more than the rest of a short search.
A new SQLite store is instead a copy of a template database made once by these library
versions (in `default_cache_dir` ``/store-schema``), and an existing one whose schema
revision equals the template's is opened without the check. Wherever the template cannot be
made (an unwritable cache folder), stores are set up by Optuna as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import tempfile
import uuid
from functools import cache
from pathlib import Path

import optuna
import sqlalchemy

from .ledger import create_tables
from .training import default_cache_dir

log = logging.getLogger(__name__)


def template_path() -> Path:
    """Where the template of these library versions lives."""
    name = f"optuna-{optuna.__version__}-sqlalchemy-{sqlalchemy.__version__}.db"
    return default_cache_dir() / "store-schema" / name


@cache
def template() -> Path | None:
    """The template database, made on first use (None when it cannot be made)."""
    path = template_path()
    if path.is_file() and revision(path) is not None:
        return path
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)  # Optuna makes the file itself
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp}")
        create_tables(storage.engine)
        storage.engine.dispose()
        if revision(Path(tmp)) is None:
            raise OSError("the new schema has no revision")
        os.replace(tmp, path)
        return path
    except (OSError, sqlalchemy.exc.SQLAlchemyError) as e:
        log.debug("no store schema template (%s): stores are set up by Optuna", e)
        return None
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def head() -> str | None:
    """The schema revision of this Optuna (the template's), or None without a template."""
    path = template()
    return None if path is None else revision(path)


def revision(path: Path) -> str | None:
    """The Optuna schema revision recorded in the SQLite database ``path`` (None when it has
    none, or cannot be read)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return None
    return None if row is None else str(row[0])


def current(path: Path) -> bool:
    """Whether the existing SQLite database ``path`` has the template's schema revision."""
    revision_now = head()
    return revision_now is not None and revision(path) == revision_now


def seed(path: Path) -> bool:
    """Make the new store ``path`` a copy of the template; False when there is no template
    or another process made ``path`` first (never overwrites)."""
    source = template()
    if source is None:
        return False
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        # opened as Optuna's own file would be: with the permissions the umask gives
        with open(source, "rb") as src, open(tmp, "xb") as dst:
            shutil.copyfileobj(src, dst)
        os.link(tmp, path)  # atomic, and fails when the file exists
        return True
    except FileExistsError:
        return False
    except OSError as e:  # e.g. a file system without hard links
        log.debug("store not seeded from the schema template (%s)", e)
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
