"""The store: every evaluation of a search, kept in a database as an Optuna study.

Each evaluation is one Optuna trial: its values are the objectives, its params the index of
each site's choice in the space, and its user attributes the whole `Result`. So
``optuna-dashboard sqlite:///out/ranksearch.db`` and Optuna's plots work on a search, and a
search resumes from whatever the study holds.

Several processes (or cluster nodes) may run one search on one database: each claims a config
before evaluating it (`Store.claim`, see `ranksearch.ledger`), so no config is evaluated
twice, and sees the others' results and claims at each ask (`Store.refresh`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from . import schema
from .config import Config
from .errors import StoreError
from .fingerprint import Fingerprint
from .latency import Entries, MemoryBook
from .ledger import (
    Claim,
    Finished,
    Heartbeat,
    Leases,
    Ledger,
    create_tables,
    read_latency,
    write_latency,
)
from .pareto import Objective
from .result import Result, result_key
from .space import RankSpace

log = logging.getLogger(__name__)

_STATES = {"ok": TrialState.COMPLETE, "failed": TrialState.FAIL, "pruned": TrialState.PRUNED}
#: The study attribute holding end-to-end latency measurements of configs, by result key.
CHECKS = "latency_checks"


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's own log at WARNING or quieter inside the block (it logs every study created
    and trial told at INFO), restored after: importing ranksearch changes no global setting.
    Also a decorator."""
    before = optuna.logging.get_verbosity()
    if before >= optuna.logging.WARNING:  # setting a level clears every logger's cache
        yield
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def default_url(out: str | os.PathLike) -> str:
    """The SQLite database of an output folder (created if missing; must be writable)."""
    folder = Path(out).resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(
            f"cannot create the output folder {folder}: {e}. Choose another --out."
        ) from e
    if not os.access(folder, os.W_OK):
        raise StoreError(f"the output folder {folder} is not writable; choose another --out")
    return f"sqlite:///{folder / 'ranksearch.db'}"


#: The store URL of an in-memory store (`open_storage`): nothing is written to disk.
MEMORY = "memory"

_DRIVERS = {
    "postgresql": (("psycopg2", "psycopg2"), ("psycopg", "psycopg")),
    "mysql": (("MySQLdb", "mysqldb"), ("pymysql", "pymysql")),
}
_INSTALL = {"postgresql": "pip install 'ranksearch[postgres]'", "mysql": "pip install pymysql"}


def driver_url(url: str) -> str:
    """``url`` with a database driver that is installed: ``postgresql://`` and
    ``postgres://`` become ``postgresql+psycopg2://`` (or ``+psycopg``), ``mysql://``
    ``mysql+mysqldb://`` (or ``+pymysql``); a `StoreError` says what to install when none
    is. URLs that name their driver, and other databases, are left as they are."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    kind = "postgresql" if scheme in ("postgres", "postgresql") else scheme
    if kind not in _DRIVERS:
        return url
    for module, driver in _DRIVERS[kind]:
        if importlib.util.find_spec(module) is not None:
            return f"{kind}+{driver}://{rest}"
    raise StoreError(f"the store {_safe(url)} is a {kind} database, but no driver for it is "
                     f"installed; run `{_INSTALL[kind]}`")


def _safe(url: str) -> str:
    """``url`` without its password."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (None for other URLs and in-memory SQLite)."""
    if not url.startswith("sqlite:///") or url in ("sqlite:///", "sqlite:///:memory:"):
        return None
    return Path(url[len("sqlite:///"):].split("?", 1)[0])


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``, with a clear error when it cannot be reached.

    ``url="memory"`` (`MEMORY`) is a fresh `optuna.storages.InMemoryStorage` on each call:
    nothing is written to disk, and two calls (two `Store` objects) do not share studies.
    Processes opening a new database at the same moment all get it (its tables are made
    once); an existing SQLite file that is empty is refused rather than taken for a new store.
    """
    if url == MEMORY:
        return optuna.storages.InMemoryStorage()
    real = driver_url(url)
    path = sqlite_path(real)
    if path is not None:
        if not path.parent.is_dir():
            raise StoreError(f"the store's folder {path.parent} does not exist (store URL "
                             f"{url})")
        if not os.access(path.parent, os.W_OK):
            raise StoreError(f"the store's folder {path.parent} is not writable (store URL "
                             f"{url})")
        _refuse_empty(path)
    for attempt in range(10):
        # A new file is a copy of the schema template (`ranksearch.schema`), or gets this
        # Optuna's schema from Optuna: either way checking it, like checking a file at the
        # template's revision, would read Optuna's migration scripts (0.1-0.4 s) for nothing.
        fresh = path is not None and not path.exists()
        current = path is not None and (schema.seed(path) if fresh else schema.current(path))
        try:
            with quiet_optuna():
                storage = optuna.storages.RDBStorage(real, engine_kwargs=_engine_kwargs(real),
                                                     skip_compatibility_check=fresh or current,
                                                     skip_table_creation=current)
            if path is not None:
                # Write-ahead log: readers (optuna-dashboard, `ranksearch report`) work while
                # a search writes, and a killed process never leaves a half-written commit.
                sqlalchemy.event.listen(storage.engine, "connect", _sqlite_pragmas)
                storage.engine.dispose()
            create_tables(storage.engine)
            if path is not None and not fresh:
                _check_pages(storage.engine)
            return storage
        except Exception as e:  # SQLAlchemy and driver errors vary by backend
            if attempt < 9 and _creating(e):  # another process makes the tables right now
                time.sleep(random.uniform(0.05, 0.2) * (attempt + 1))
                continue
            raise store_error(e, url, "opening the store") from e
    raise AssertionError("unreachable")


def _check_pages(engine: sqlalchemy.engine.Engine) -> None:
    """Raise ``DatabaseError`` (which `store_error` names as damage) unless SQLite's
    ``quick_check`` finds every page of an existing store sound: a damaged file is named when
    it is opened, not in the middle of a search. It reads the file once (milliseconds for
    a store of thousands of results)."""
    with engine.connect() as conn:
        found = [row[0] for row in conn.exec_driver_sql("PRAGMA quick_check(1)")]
    if found != ["ok"]:
        raise sqlite3.DatabaseError(f"database disk image is malformed: {found[0]}")


def _creating(e: BaseException) -> bool:
    """Whether ``e`` is a race with another process creating the same tables."""
    text = " ".join(str(x) for x in _chain(e)).lower()
    return any(s in text for s in ("already exists", "duplicate key", "uniqueviolation",
                                   "pg_type_typname_nsp_index", "unique constraint failed"))


def _refuse_empty(path: Path) -> None:
    """An existing store file of 0 bytes is a truncated store (or not one): refuse it. A file
    another process is creating this instant grows within milliseconds, so wait a moment."""
    deadline = time.monotonic() + 1.5
    while True:
        try:
            if path.stat().st_size > 0:
                return
        except FileNotFoundError:
            return
        if time.monotonic() >= deadline:
            raise StoreError(
                f"the store file {path} is empty (0 bytes): it was truncated, or is not a "
                "ranksearch store, and opening it would silently start a new one. Restore it "
                "from a backup, or delete it to start a new store"
            )
        time.sleep(0.05)


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        yield x
        x = x.__cause__ or x.__context__


def store_error(e: BaseException, url: str, doing: str) -> StoreError:
    """A `StoreError` for a database error ``e`` met while ``doing``, naming its real cause
    (disk full, damaged or read-only file, a locked or unreachable database)."""
    chain = list(_chain(e))
    root = chain[-1]
    detail = (str(getattr(root, "orig", None) or root).strip().splitlines() or [""])[0]
    text = " ".join(str(x) for x in chain).lower()
    path = sqlite_path(url)
    where = str(path) if path is not None else _safe(url)
    kept = "the results committed before are kept"
    if "database or disk is full" in text or "no space left" in text:
        why = f"the disk holding the store {where} is full ({detail}); free space and run " \
              f"again: {kept}"
    elif "file is not a database" in text or "malformed" in text:
        why = (f"the store file {where} is damaged ({detail}). Restore it from a backup, or "
               "move it aside and start a new store; `sqlite3 FILE .recover` may salvage its "
               "results")
    elif "readonly database" in text or "read-only file system" in text:
        why = f"the store {where} is read-only ({detail}); make the file and its folder " \
              "writable, or choose another --out/--store"
    elif "unable to open database file" in text:
        why = f"cannot open the store file {where} ({detail}): its folder is missing, not " \
              "writable or on a read-only disk"
    elif "database is locked" in text:
        why = f"the store {where} stayed locked by another process ({detail}); run again " \
              "once the other writer is done, or use a database server (--store postgresql://...)"
    elif "no such table" in text:
        why = f"the store file {where} was deleted, emptied or replaced while in use " \
              f"({detail})"
    elif isinstance(root, ImportError):
        why = f"the database driver for {where} is not installed ({detail})"
    elif any(s in text for s in ("could not connect", "connection refused", "could not "
                                 "translate host", "password authentication", "timeout expired",
                                 "server closed the connection")):
        why = f"cannot open the store {where}: its database server cannot be reached " \
              f"({detail}); check that it runs and that the URL's host, port, user and " \
              "password are right"
    else:
        why = f"the store {where} failed ({type(root).__name__}: {detail})"
    return StoreError(f"{why} [while {doing}]")


def list_studies(url: str) -> list[str]:
    """Names of the searches held by the store at ``url``."""
    storage = open_storage(url)
    try:
        return [s.study_name for s in optuna.get_all_study_summaries(storage)]
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
        raise store_error(e, url, "listing its searches") from e


class DatabaseBook:
    """The latency entries (`ranksearch.latency.Book`) of the store at ``url``, in its
    ``ranksearch_latency`` table: every search on the store shares them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine = open_storage(url).engine

    def load(self, table: str) -> Entries:
        try:
            return read_latency(self._engine, table)
        except (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error) as e:
            raise store_error(e, self.url, "reading a latency table") from e

    def save(self, table: str, entries: Entries) -> Entries:
        try:
            return write_latency(self._engine, table, entries)
        except (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error) as e:
            raise store_error(e, self.url, "storing latency entries") from e


def latency_book(url: str) -> DatabaseBook | MemoryBook:
    """Where the latency tables of the store at ``url`` are kept: its database, or this
    process for ``"memory"``."""
    return MemoryBook() if url == MEMORY else DatabaseBook(url)


def with_checks(results: Sequence[Result], checks: Mapping[str, Mapping[str, float]]
                ) -> list[Result]:
    """``results`` with the end-to-end latency measured for some of them (by result key)
    added to their metrics."""
    return [replace(r, metrics={**r.metrics, **checks[r.key]}) if r.key in checks else r
            for r in results]


class Store:
    """The evaluations of one search, persisted as an Optuna study named ``study``.

    Opening a study that exists resumes it. Its space and objectives must be the same, and so
    must its ``fingerprint`` (the weights, data, loss, proxy settings and space that decide a
    score): a mismatch is a `StoreError` that names what differs. With ``share``, a config
    this study has not evaluated is taken from another study of the store whose fingerprint
    is exactly the same (and copied into this one).

    Trial params are the choices as text (``"tucker2:23x46"``), so optuna-dashboard shows the
    ranks, and the objectives carry their metric names.

    In a database, several processes may write one study: a config is claimed (`claim`)
    before it is evaluated, the claim is renewed while this process lives (``leases``), and
    `refresh` reads what the others stored and claimed since. A store that fails (deleted,
    full, damaged, read-only) raises a `StoreError` that names the cause.

    ``url="memory"`` keeps the study in this process only (for tests): nothing is written,
    and the study lives as long as this object; another `Store` on ``"memory"`` starts empty.
    """

    @quiet_optuna()
    def __init__(
        self,
        url: str,
        study: str,
        space: RankSpace,
        objectives: Sequence[Objective],
        meta: Mapping[str, Any] | None = None,
        fingerprint: Fingerprint | None = None,
        share: bool = False,
        leases: Leases | None = None,
    ) -> None:
        self.url = url
        self.space = space
        self.objectives = tuple(objectives)
        self.fingerprint = fingerprint
        self.share = share
        self.leases = leases or Leases()
        self._path = sqlite_path(url)
        self._file: tuple[int, int] | None = None
        storage = open_storage(url)
        self._storage = storage
        rdb = isinstance(storage, optuna.storages.RDBStorage)
        self._file = _file_id(self._path) if rdb else None
        self._results: dict[str, Result] = {}
        self._mine: dict[str, int] = {}  # our claims: key → trial id (0 in memory)
        self._others: dict[str, int] = {}  # other writers' live claims: key → trial id
        self._running: dict[int, str] = {}  # other writers' running trials we watch
        self._last = -1
        self._seen: int | None = None  # the store's data version at the last read (SQLite)
        self._lock = threading.Lock()
        self._heart: Heartbeat | None = None
        with self._guard("opening the study"):
            self.study = self._open_study(study, meta)
            self._db = Ledger(storage.engine, self.study._study_id, self.leases) if rdb \
                else None
            if self._db is None:
                self._results = _trial_results(self.study)
            else:
                latest = self._read()
                self._db.backfill(latest)
        self._params = {
            name: tuple(str(c) for c in space.choices(name)) for name in space.names
        }
        self._shared: dict[str, Result] | None = None

    def _open_study(self, study: str, meta: Mapping[str, Any] | None) -> optuna.Study:
        directions = ["maximize" if o.direction == "max" else "minimize"
                      for o in self.objectives]
        try:
            opened = optuna.create_study(storage=self._storage, study_name=study,
                                         directions=directions, load_if_exists=True)
        except optuna.exceptions.DuplicatedStudyError:  # made by another process just now
            opened = optuna.load_study(study_name=study, storage=self._storage)
        signature = space_signature(self.space)
        attrs = opened.user_attrs
        if "space" not in attrs:
            # "space" last: a process that sees it sees the rest
            if self.fingerprint is not None:
                opened.set_user_attr("fingerprint", self.fingerprint.to_json())
            opened.set_user_attr("objectives", [str(o) for o in self.objectives])
            opened.set_user_attr("meta", dict(meta or {}))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                opened.set_metric_names([o.metric for o in self.objectives])
            opened.set_user_attr("space", signature)
        else:
            self._check(opened, attrs, signature)
        return opened

    def _check(self, study: optuna.Study, attrs: Mapping[str, Any], signature: str) -> None:
        """Raise unless the stored study was made for this space, objectives and fingerprint."""
        name, hint = study.study_name, ("pass another study name (--study) or output "
                                        "folder to start a new search")
        stored = attrs.get("fingerprint")
        if self.fingerprint is not None and stored is None:
            raise StoreError(f"study {name!r} in {self.url} was stored without a fingerprint "
                             f"of what it measured, so it cannot be resumed safely; {hint}")
        if self.fingerprint is not None:
            differences = self.fingerprint.differences(Fingerprint.from_json(stored))
            if differences:
                raise StoreError(f"study {name!r} in {self.url} measured something else: "
                                 f"{'; '.join(differences)}. Its results do not apply; {hint}")
        if attrs["space"] != signature:
            raise StoreError(f"study {name!r} in {self.url} was made for another model or "
                             f"space; {hint}")
        if attrs.get("objectives") != [str(o) for o in self.objectives]:
            raise StoreError(
                f"study {name!r} was made with objectives {attrs.get('objectives')}, not "
                f"{[str(o) for o in self.objectives]}; pass another study name"
            )

    @contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        """Check that the store file is still the one opened, then turn database errors
        into a `StoreError` with their real cause."""
        self._check_file(doing)
        try:
            yield
        except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError,
                sqlite3.Error, OSError) as e:
            self._check_file(doing)
            raise store_error(e, self.url, doing) from e

    def _check_file(self, doing: str) -> None:
        if self._file is None or self._path is None:
            return
        now = _file_id(self._path)
        if now == self._file:
            return
        what = "deleted" if now is None else "emptied" if now == (0, 0) else "replaced"
        raise StoreError(
            f"the store file {self._path} was {what} while the search ran [while {doing}]: "
            f"the {len(self._results)} results it held are not in it any more and nothing "
            "more is written there. Restore the file from a backup and run again to resume, "
            "or run again to start a new store"
        )

    @property
    def name(self) -> str:
        return self.study.study_name

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.study.user_attrs.get("meta", {}))

    def __len__(self) -> int:
        """Every stored measurement, partial scores included (they count against a budget)."""
        return len(self._results)

    def __contains__(self, config: object) -> bool:
        return isinstance(config, Config) and config.key in self._results

    def __iter__(self) -> Iterator[Result]:
        return iter(list(self._results.values()))

    @property
    def claimed(self) -> int:
        """Configs other writers are evaluating now (live claims, as of the last `refresh`)."""
        return len(self._others)

    def busy(self, key: str) -> bool:
        """Whether another writer holds a live claim on ``key`` (as of the last `refresh`)."""
        return key in self._others

    def get(self, config: Config, partial: int | None = None) -> Result | None:
        """The stored result of ``config`` (its partial score on ``partial`` batches, when
        given) in this search; with ``share``, else one measured with exactly this fingerprint
        by another search in the store (copied into this one, so a config is never evaluated
        twice for the same measurement)."""
        key = result_key(config, partial)
        found = self._results.get(key)
        if found is not None or not self.share or self.fingerprint is None:
            return found
        if self._shared is None:
            self._shared = {}
            digest = self.fingerprint.digest
            with self._guard("reading the other searches of the store"):
                for summary in optuna.get_all_study_summaries(self._storage):
                    if summary.study_name == self.name:
                        continue
                    theirs = summary.user_attrs.get("fingerprint")
                    if theirs is None or Fingerprint.from_json(theirs).digest != digest:
                        continue
                    other = optuna.load_study(study_name=summary.study_name,
                                              storage=self._storage)
                    for r in _trial_results(other).values():
                        if r.fingerprint == digest and r.status != "failed":
                            self._shared.setdefault(r.key, r)
        found = self._shared.get(key)
        if found is not None:
            self.save(found)
        return found

    def results(self) -> list[Result]:
        """Every stored candidate result (partial scores left out), in the order saved."""
        return [r for r in self._results.values() if r.partial is None]

    def checks(self) -> dict[str, dict[str, float]]:
        """The end-to-end latency measurements recorded with the study, by result key."""
        with self._guard("reading latency checks"):
            return dict(self.study.user_attrs.get(CHECKS, {}))

    def save_checks(self, checks: Mapping[str, Mapping[str, float]]) -> None:
        """Record end-to-end latency measurements of configs (by result key) with the
        study; `read_study` adds them to the results' metrics."""
        merged = {**self.checks(), **{k: dict(v) for k, v in checks.items()}}
        with self._guard("recording latency checks"):
            self.study.set_user_attr(CHECKS, merged)

    # -- many writers ---------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read what other writers stored and claimed since the last read (only trials newer
        than the last seen, and the running ones seen before); on SQLite, nothing when no
        other connection committed since and no claim of theirs is watched."""
        if self._db is not None:
            with self._guard("reading the store"):
                version = self._db.version()  # before the read: a later commit shows next time
                if version is not None and version == self._seen and not self._running:
                    return  # nobody else committed, and no claim of theirs can expire
                self._read()
                self._seen = version

    def _read(self) -> dict[str, int]:
        assert self._db is not None
        latest: dict[str, int] = {}
        for row in self._db.read(self._last, list(self._running)):
            self._last = max(self._last, row.trial_id)
            self._running.pop(row.trial_id, None)
            latest[row.key] = row.trial_id
            if row.state == TrialState.RUNNING:
                if self._mine.get(row.key) == row.trial_id:
                    continue
                self._running[row.trial_id] = row.key
                if row.expired:
                    if self._others.get(row.key) == row.trial_id:
                        del self._others[row.key]
                else:
                    self._others[row.key] = row.trial_id
                continue
            if self._others.get(row.key) == row.trial_id:
                del self._others[row.key]
            if row.result is not None:
                self._results[row.key] = Result.from_json(row.result)
        return latest

    def claim(self, config: Config, partial: int | None = None, retry: bool = False,
              budget: int | None = None) -> Claim:
        """Claim ``config`` (its partial score on ``partial`` batches) for this process to
        evaluate, unless it is stored (a stored failure is claimed again with ``retry``), or
        another writer is evaluating it, or (``budget``) the study's stored results and live
        claims already number ``budget`` ("full"). A claim is held until `save` stores its
        result or `release` gives it up."""
        key = result_key(config, partial)
        if key in self._mine:
            return Claim("ours")
        if self._db is None:
            held = self._results.get(key)
            if held is not None and not (retry and held.status == "failed"):
                return Claim("stored")
            self._mine[key] = 0
            return Claim("ours")
        with self._guard("claiming a config"):
            answer, tid, found = self._db.claim(key, retry, budget)
        if answer.status == "ours":
            assert tid is not None
            with self._lock:
                self._mine[key] = tid
            self._others.pop(key, None)
            self._running.pop(tid, None)
            if self._heart is None or not self._heart.alive:
                self._heart = Heartbeat(self, _held, _beat, self.leases.interval)
        elif answer.status == "stored":
            assert found is not None and found.result is not None
            self._results[key] = Result.from_json(found.result)
            self._others.pop(key, None)
        elif answer.status == "busy" and found is not None:
            self._others[key] = found.trial_id
            self._running[found.trial_id] = key
        return answer

    def release(self) -> None:
        """Give up the claims not stored (another writer, or a re-run, takes them at once)
        and stop renewing claims."""
        if self._heart is not None:
            self._heart.stop()
            self._heart = None
        with self._lock:
            held, self._mine = dict(self._mine), {}
        if self._db is not None and held:
            try:
                with self._guard("releasing claims"):
                    self._db.release(held.values())
            except StoreError as e:  # they expire on their own; the first error is the news
                log.warning("could not release %d claims: %s", len(held), e)

    def save(self, result: Result) -> None:
        """Commit ``result`` as a finished trial (the trial of its claim). A config is stored
        once, except that a new result replaces a failed one (a retry); the failed trial stays
        in the study's history. When another writer stored the config first, theirs is kept."""
        key = result.key
        held = self._results.get(key)
        if held is not None and held.status != "failed":
            self._mine.pop(key, None)
            return
        done = self._finished(result)
        if self._db is None:
            with quiet_optuna():  # in a database, saving goes past Optuna (and its log)
                self.study.add_trial(optuna.trial.create_trial(
                    state=done.state, values=done.values,
                    params={n: text for n, (text, _) in done.params.items()},
                    distributions={n: dist for n, (_, dist) in done.params.items()},
                    user_attrs={"result": json.dumps(done.result), "key": key},
                    intermediate_values=dict(done.intermediate)))
            self._results[key] = result
            self._mine.pop(key, None)
            return
        with self._guard(f"storing the result of {result.config}"):
            theirs = self._db.save(key, done, self._mine.get(key))
        with self._lock:
            self._mine.pop(key, None)
        self._others.pop(key, None)
        self._results[key] = result if theirs is None else Result.from_json(theirs)

    def _finished(self, result: Result) -> Finished:
        values = None
        state = _STATES[result.status]
        if state == TrialState.COMPLETE:
            values = [result.metrics.get(o.metric, math.nan) for o in self.objectives]
            if not all(math.isfinite(v) for v in values):
                state = TrialState.FAIL
                values = None
        params = {}
        for name in self.space.names:
            text = str(result.config.get(name))
            if text in self._params[name]:
                params[name] = (text, CategoricalDistribution(self._params[name]))
        intermediate = {}
        reached = self.objectives[0].metric  # the quality a pruned trial reached
        if result.status == "pruned" and reached in result.metrics:
            intermediate[0] = float(result.metrics[reached])
        return Finished(state, values, params, intermediate, result.to_json())

    def __del__(self) -> None:
        heart = getattr(self, "_heart", None)
        if heart is not None:
            heart.stop()


def _held(store: object) -> list[int]:
    assert isinstance(store, Store)
    with store._lock:
        return list(store._mine.values())


def _beat(store: object, trials: Sequence[int]) -> None:
    assert isinstance(store, Store) and store._db is not None
    store._check_file("renewing claims")
    store._db.beat(trials)


def _file_id(path: Path | None) -> tuple[int, int] | None:
    """The device and inode of ``path`` ((0, 0) once emptied; None when it is gone)."""
    if path is None:
        return None
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (0, 0) if st.st_size == 0 else (st.st_dev, st.st_ino)


def _trial_results(study: optuna.Study) -> dict[str, Result]:
    """The study's results by key, in the order first stored; a later trial of the same key
    (a retry of a failure) replaces the earlier one."""
    results: dict[str, Result] = {}
    for t in study.get_trials(deepcopy=False):
        if "result" in t.user_attrs:
            r = Result.from_json(json.loads(t.user_attrs["result"]))
            results[r.key] = r
    return results


def space_signature(space: RankSpace) -> str:
    """A short hash of the space (its sites and rank options)."""
    text = json.dumps(space.to_json(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _engine_kwargs(url: str) -> dict[str, Any]:
    # SQLite: wait on a lock held by another process rather than failing at once.
    return {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}


def _load(url: str, study: str) -> tuple[optuna.storages.BaseStorage, optuna.Study]:
    storage = open_storage(url)
    try:
        with quiet_optuna():
            return storage, optuna.load_study(study_name=study, storage=storage)
    except KeyError:
        raise StoreError(
            f"no study {study!r} in {url}; it holds {list_studies(url) or 'no studies'}"
        ) from None
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
        raise store_error(e, url, f"reading study {study!r}") from e


def read_study(url: str, study: str) -> tuple[list[Result], dict[str, Any]]:
    """The results and the run description of a stored search, without its model: one per
    config (a retry's result replaces the failure it retried), with the end-to-end latency
    checks recorded with it (`Store.save_checks`) in their metrics."""
    storage, loaded = _load(url, study)
    if isinstance(storage, optuna.storages.RDBStorage):
        try:
            rows = Ledger(storage.engine, loaded._study_id, Leases()).read(-1)
        except (sqlalchemy.exc.SQLAlchemyError, sqlite3.Error) as e:
            raise store_error(e, url, f"reading study {study!r}") from e
        results = {r.key: Result.from_json(r.result) for r in rows if r.result is not None}
    else:
        results = _trial_results(loaded)
    candidates = [r for r in results.values() if r.partial is None]
    return (with_checks(candidates, loaded.user_attrs.get(CHECKS, {})),
            dict(loaded.user_attrs.get("meta", {})))


def read_fingerprint(url: str, study: str) -> Fingerprint | None:
    """The fingerprint a stored search measured with (None for a study stored without)."""
    data = _load(url, study)[1].user_attrs.get("fingerprint")
    return None if data is None else Fingerprint.from_json(data)


def read_objectives(url: str, study: str) -> list[str]:
    """The objectives a stored search used (accuracy, flops for a study stored without)."""
    return list(_load(url, study)[1].user_attrs.get("objectives") or ["accuracy", "flops"])
