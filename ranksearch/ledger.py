"""The store's SQL side: claims, heartbeats and incremental reads on Optuna's RDB schema.

Several processes may write one study. Before a process evaluates a config it *claims* it: a
RUNNING Optuna trial holding the result key, created in one transaction together with a row
of the ``ranksearch_keys`` table (study, key digest → trial), whose primary key makes a claim
atomic on every database. A claim carries its owner (host, process, attempt) and a heartbeat
(Optuna's ``trial_heartbeats``) that a thread of the owning process renews; one whose
heartbeat stopped, whose process is gone (same host), or that its owner released has expired
and is taken over by the next claimer (the same trial, so one trial per config). Saving a
result finishes the claimed trial. Readers see other writers' work by reading only trials
newer than the last seen and the running ones they know (`Ledger.read`). The
``ranksearch_latency`` table keeps latency tables (`read_latency`, `write_latency`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import uuid
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, NamedTuple

import sqlalchemy
from optuna.distributions import CategoricalDistribution, distribution_to_json
from optuna.storages._rdb import models
from optuna.trial import TrialState
from sqlalchemy import and_, bindparam, func, insert, select, update

log = logging.getLogger(__name__)

#: The trial system attribute that holds a claim's owner.
CLAIM = "ranksearch:claim"

_TRIALS = models.TrialModel.__table__
_STUDIES = models.StudyModel.__table__
_USER = models.TrialUserAttributeModel.__table__
_SYSTEM = models.TrialSystemAttributeModel.__table__
_BEATS = models.TrialHeartbeatModel.__table__
_VALUES = models.TrialValueModel.__table__
_PARAMS = models.TrialParamModel.__table__
_STEPS = models.TrialIntermediateValueModel.__table__

_META = sqlalchemy.MetaData()
#: One row per stored or claimed key of a study: the trial that holds it now.
KEYS = sqlalchemy.Table(
    "ranksearch_keys", _META,
    sqlalchemy.Column("study_id", sqlalchemy.Integer, primary_key=True, autoincrement=False),
    sqlalchemy.Column("key_hash", sqlalchemy.String(64), primary_key=True),
    sqlalchemy.Column("trial_id", sqlalchemy.Integer, nullable=False),
)
#: Latency entries (`ranksearch.latency`): one row per table (the digest of what decides its
#: times) and entry, its value as JSON.
LATENCY = sqlalchemy.Table(
    "ranksearch_latency", _META,
    sqlalchemy.Column("table_key", sqlalchemy.String(64), primary_key=True),
    sqlalchemy.Column("entry", sqlalchemy.String(200), primary_key=True),
    sqlalchemy.Column("value_json", sqlalchemy.Text, nullable=False),
)


# The statements of claiming and saving, built once: executed with parameters, SQLAlchemy
# compiles each once per dialect and caches it, instead of building and keying it each time.
_HOLDER = select(KEYS.c.trial_id).where(KEYS.c.study_id == bindparam("sid"),
                                        KEYS.c.key_hash == bindparam("kh"))
_KEY_COUNT = select(func.count()).select_from(KEYS).where(KEYS.c.study_id == bindparam("sid"))
_ADD_KEY = insert(KEYS)
_POINT = (update(KEYS).where(KEYS.c.study_id == bindparam("sid"),
                             KEYS.c.key_hash == bindparam("kh"),
                             KEYS.c.trial_id == bindparam("old"))
          .values(trial_id=bindparam("new")))
_ADD_TRIAL = insert(_TRIALS)
_NUMBER_BEFORE = (select(_TRIALS.c.number)
                  .where(_TRIALS.c.study_id == bindparam("sid"),
                         _TRIALS.c.trial_id < bindparam("tid"))
                  .order_by(_TRIALS.c.trial_id.desc()).limit(1))
_SET_NUMBER = (update(_TRIALS).where(_TRIALS.c.trial_id == bindparam("tid"))
               .values(number=bindparam("number")))
_END_TRIAL = (update(_TRIALS).where(_TRIALS.c.trial_id == bindparam("tid"),
                                    _TRIALS.c.state == TrialState.RUNNING)
              .values(state=bindparam("state"), datetime_complete=bindparam("complete")))
_ADD_USER, _ADD_SYSTEM, _ADD_BEAT = insert(_USER), insert(_SYSTEM), insert(_BEATS)
_ADD_VALUES, _ADD_PARAMS, _ADD_STEPS = insert(_VALUES), insert(_PARAMS), insert(_STEPS)


def create_tables(engine: sqlalchemy.engine.Engine) -> None:
    """Create the ``ranksearch_keys`` and ``ranksearch_latency`` tables if they are
    missing."""
    _META.create_all(engine)


def read_latency(engine: sqlalchemy.engine.Engine, table: str) -> dict[str, dict[str, Any]]:
    """Every latency entry stored for ``table``."""
    with engine.connect() as conn:
        rows = conn.execute(select(LATENCY.c.entry, LATENCY.c.value_json)
                            .where(LATENCY.c.table_key == table))
        return {entry: json.loads(value) for entry, value in rows}


def write_latency(engine: sqlalchemy.engine.Engine, table: str,
                  entries: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Store ``entries`` of ``table``; an entry another writer stored first keeps its value.
    Returns the entries as stored."""
    rows = [{"table_key": table, "entry": name, "value_json": json.dumps(dict(value))}
            for name, value in entries.items()]
    try:
        with engine.begin() as conn:
            if rows:
                conn.execute(insert(LATENCY), rows)
    except sqlalchemy.exc.IntegrityError:  # some are stored already: the others one by one
        for row in rows:
            try:
                with engine.begin() as conn:
                    conn.execute(insert(LATENCY).values(**row))
            except sqlalchemy.exc.IntegrityError:
                continue
    stored = read_latency(engine, table)
    return {name: stored[name] for name in entries}


@dataclass(frozen=True)
class Leases:
    """How claims expire: the owner renews its heartbeat every ``interval`` seconds; a claim
    not renewed for ``grace`` seconds (or whose process on this host is gone) is taken over;
    a config whose claim expired ``attempts`` times is recorded failed."""

    interval: float = 10.0
    grace: float = 60.0
    attempts: int = 3


@dataclass(frozen=True)
class Claim:
    """What `Store.claim` found: ``"ours"`` (evaluate it), ``"busy"`` (another writer is
    evaluating it), ``"stored"`` (a result is stored; `Store.get` has it), ``"abandoned"``
    (its evaluations died ``Leases.attempts`` times; ``reason`` says so: record it failed) or
    ``"full"`` (the study's stored results and live claims already fill the budget)."""

    status: Literal["ours", "busy", "stored", "abandoned", "full"]
    reason: str | None = None


class Row(NamedTuple):
    """One trial of the study, as `Ledger.read` returns it."""

    trial_id: int
    state: TrialState
    key: str
    result: dict[str, Any] | None
    claim: dict[str, Any] | None
    expired: bool


class Finished(NamedTuple):
    """A finished trial's content: Optuna state, objective values, params, intermediate."""

    state: TrialState
    values: list[float] | None
    params: Mapping[str, tuple[str, CategoricalDistribution]]
    intermediate: Mapping[int, float]
    result: dict[str, Any]


class _Full(Exception):
    """The budget is full: the claim's transaction is rolled back."""


class _Raced(Exception):
    """Another writer changed the key between our read and our write: look again."""


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _host() -> str:
    """This host, and its process namespace (a pid means one process only within it)."""
    name = socket.gethostname()
    try:
        return f"{name}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return name


HOST = _host()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie does not)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _result(value_json: str | None) -> dict[str, Any] | None:
    """A stored ``result`` user attribute (JSON text kept as a JSON string)."""
    return None if value_json is None else json.loads(json.loads(value_json))


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)  # Optuna stores naive UTC


class Ledger:
    """Claims and reads of one study in an `optuna.storages.RDBStorage`'s database."""

    def __init__(self, engine: sqlalchemy.engine.Engine, study_id: int, leases: Leases) -> None:
        self.engine = engine
        self.study_id = study_id
        self.leases = leases
        self.token = uuid.uuid4().hex  # this Store's claims
        # SQLite: one connection for this ledger's reads and writes, so that its
        # ``PRAGMA data_version`` changes only when another connection commits (`version`)
        self._own: sqlalchemy.Connection | None = \
            engine.connect() if engine.dialect.name == "sqlite" \
            and engine.url.database not in (None, "", ":memory:") else None
        self._lock = threading.RLock()

    @contextmanager
    def _begin(self) -> Iterator[sqlalchemy.Connection]:
        """A transaction, on this ledger's own connection where it has one."""
        if self._own is None:
            with self.engine.begin() as conn:
                yield conn
            return
        with self._lock, self._own.begin():
            yield self._own

    def version(self) -> int | None:
        """SQLite's ``PRAGMA data_version`` on this ledger's own connection: it changes when
        another connection commits, never for this ledger's own writes. None where unknown
        (other databases): read every time."""
        if self._own is None:
            return None
        with self._lock:
            try:
                return int(self._own.exec_driver_sql("PRAGMA data_version").scalar())
            finally:
                self._own.rollback()  # end the implicit transaction: no snapshot is held

    # -- reading --------------------------------------------------------------------------------
    def read(self, after: int, running: Collection[int] = ()) -> list[Row]:
        """Trials of the study with an id above ``after`` or in ``running``, in id order.
        Past the first read, rows are found by trial id (the primary key), so the cost is
        that of what is new, not of the study's size."""
        t, k, r, c, h = (_TRIALS, _USER.alias("k"), _USER.alias("r"), _SYSTEM.alias("c"),
                         _BEATS)
        base = (
            select(t.c.trial_id, t.c.study_id, t.c.state, k.c.value_json, r.c.value_json,
                   c.c.value_json, h.c.heartbeat, func.current_timestamp())
            .select_from(
                t.join(k, and_(k.c.trial_id == t.c.trial_id, k.c.key == "key"))
                .outerjoin(r, and_(r.c.trial_id == t.c.trial_id, r.c.key == "result"))
                .outerjoin(c, and_(c.c.trial_id == t.c.trial_id, c.c.key == CLAIM))
                .outerjoin(h, h.c.trial_id == t.c.trial_id))
        )
        if after < 0:
            queries = [base.where(t.c.study_id == self.study_id)]
        else:  # the trial id alone, so that the planner walks the primary key
            queries = [base.where(t.c.trial_id > after)]
            if running:
                queries.append(base.where(t.c.trial_id.in_(list(running))))
        found = {}
        with self._begin() as conn:
            for query in queries:
                for row in conn.execute(query):
                    if row[1] == self.study_id:
                        found[row[0]] = row
        out = []
        for tid, _, state, key, result, claim, beat, now in (found[i] for i in sorted(found)):
            owner = None if claim is None else json.loads(claim)
            out.append(Row(tid, state, json.loads(key), _result(result), owner,
                           state == TrialState.RUNNING and self._expired(owner, beat, now)))
        return out

    def _expired(self, owner: Mapping[str, Any] | None, beat: datetime | None,
                 now: datetime | str | None) -> bool:
        if owner is None or owner.get("released") or beat is None or now is None:
            return True
        if owner.get("token") == self.token:
            return False
        if isinstance(now, str):  # SQLite's CURRENT_TIMESTAMP, untyped in a bare select
            now = datetime.fromisoformat(now)
        if now.replace(tzinfo=None) - beat > timedelta(seconds=self.leases.grace):
            return True
        return owner.get("host") == HOST and not _alive(int(owner.get("pid", -1)))

    def backfill(self, latest: Mapping[str, int]) -> None:
        """Key rows for trials stored before the keys table existed (an older store)."""
        with self._begin() as conn:
            have = conn.execute(select(func.count()).select_from(KEYS)
                                .where(KEYS.c.study_id == self.study_id)).scalar()
        if have >= len(latest):
            return
        with self._begin() as conn:
            known = {h for (h,) in conn.execute(select(KEYS.c.key_hash)
                                                .where(KEYS.c.study_id == self.study_id))}
            rows = [{"study_id": self.study_id, "key_hash": key_hash(key), "trial_id": tid}
                    for key, tid in latest.items() if key_hash(key) not in known]
            if rows:
                conn.execute(_ADD_KEY, rows)

    # -- claiming -------------------------------------------------------------------------------
    def claim(self, key: str, replace_failed: bool, budget: int | None = None
              ) -> tuple[Claim, int | None, Row | None]:
        """Claim ``key``: the answer, the trial now ours (for ``"ours"``) and the trial found
        (its result for ``"stored"``, the dead claim for ``"abandoned"``). With ``budget``, a
        config new to the study is claimed only while the study's stored results and claims
        not given up number fewer: counted under the same write lock as the claim, so that
        writers claiming together never overshoot it."""
        for _ in range(20):
            try:
                with self._begin() as conn:
                    return self._claim(conn, key, replace_failed, budget)
            except _Full:
                return Claim("full"), None, None
            except (sqlalchemy.exc.IntegrityError, _Raced):
                continue
        raise RuntimeError(f"could not claim {key}: other writers kept changing it")

    def _claim(self, conn: sqlalchemy.Connection, key: str, replace_failed: bool,
               budget: int | None) -> tuple[Claim, int | None, Row | None]:
        held = self._holder(conn, key)
        if held is None:
            tid = self._new_trial(conn, key, TrialState.RUNNING, self._owner(1))
            if budget is not None and self._counted(conn, budget) >= budget:
                raise _Full
            conn.execute(_ADD_KEY, {"study_id": self.study_id, "key_hash": key_hash(key),
                                    "trial_id": tid})
            return Claim("ours"), tid, None
        found = self._row(conn, held)
        if found.state == TrialState.RUNNING:
            owner = found.claim or {}
            if owner.get("token") == self.token:
                return Claim("ours"), held, found
            if not found.expired:
                return Claim("busy"), None, found
            attempt = int(owner.get("attempt", 0)) + (0 if owner.get("released") else 1)
            if attempt >= self.leases.attempts + 1:
                where = f"{owner.get('host', '?').split('/')[0]} pid {owner.get('pid', '?')}"
                return Claim("abandoned", f"its evaluation was started {attempt - 1} times and "
                             f"each process died before storing a result (last: {where})"
                             ), None, found
            if found.claim is None:
                conn.execute(insert(_SYSTEM).values(trial_id=held, key=CLAIM,
                                                    value_json=json.dumps(self._owner(attempt))))
            else:
                taken = conn.execute(
                    update(_SYSTEM)
                    .where(_SYSTEM.c.trial_id == held, _SYSTEM.c.key == CLAIM,
                           _SYSTEM.c.value_json == json.dumps(found.claim))
                    .values(value_json=json.dumps(self._owner(attempt)))).rowcount
                if taken != 1:
                    raise _Raced
            self._beat(conn, [held])
            return Claim("ours"), held, found
        if found.result is not None and not (replace_failed
                                             and found.result.get("status") == "failed"):
            return Claim("stored"), None, found
        tid = self._new_trial(conn, key, TrialState.RUNNING, self._owner(1))
        self._point(conn, key, held, tid)
        return Claim("ours"), tid, found

    def _counted(self, conn: sqlalchemy.Connection, budget: int) -> int:
        """The study's keys that count toward a budget: stored, or claimed and not given up
        (exactly when there are at least ``budget`` keys, else the keys, an upper bound).
        Called after `_new_trial` took the write lock (SQLite) or the study's row lock."""
        keys = int(conn.execute(_KEY_COUNT, {"sid": self.study_id}).scalar())
        if keys < budget:  # every counted key has a row: no need to look for given-up claims
            return keys
        c = _SYSTEM.alias("c")
        released = and_(_TRIALS.c.state == TrialState.RUNNING,
                        c.c.value_json.like('%"released": true%'))
        return int(conn.execute(
            select(func.count()).select_from(
                KEYS.join(_TRIALS, _TRIALS.c.trial_id == KEYS.c.trial_id)
                .outerjoin(c, and_(c.c.trial_id == KEYS.c.trial_id, c.c.key == CLAIM)))
            .where(KEYS.c.study_id == self.study_id, ~func.coalesce(released, False))
        ).scalar())

    def _owner(self, attempt: int) -> dict[str, Any]:
        return {"host": HOST, "pid": os.getpid(), "token": self.token, "attempt": attempt}

    def _holder(self, conn: sqlalchemy.Connection, key: str) -> int | None:
        return conn.execute(_HOLDER, {"sid": self.study_id, "kh": key_hash(key)}).scalar()

    def _row(self, conn: sqlalchemy.Connection, tid: int) -> Row:
        r, c = _USER.alias("r"), _SYSTEM.alias("c")
        tid_, state, result, claim, beat, now = conn.execute(
            select(_TRIALS.c.trial_id, _TRIALS.c.state, r.c.value_json, c.c.value_json,
                   _BEATS.c.heartbeat, func.current_timestamp())
            .select_from(
                _TRIALS.outerjoin(r, and_(r.c.trial_id == _TRIALS.c.trial_id,
                                          r.c.key == "result"))
                .outerjoin(c, and_(c.c.trial_id == _TRIALS.c.trial_id, c.c.key == CLAIM))
                .outerjoin(_BEATS, _BEATS.c.trial_id == _TRIALS.c.trial_id))
            .where(_TRIALS.c.trial_id == tid)).one()
        owner = None if claim is None else json.loads(claim)
        return Row(tid_, state, "", _result(result), owner,
                   state == TrialState.RUNNING and self._expired(owner, beat, now))

    def _point(self, conn: sqlalchemy.Connection, key: str, old: int, new: int) -> None:
        """Point ``key`` from trial ``old`` to ``new``, unless another writer moved it."""
        moved = conn.execute(_POINT, {"sid": self.study_id, "kh": key_hash(key), "old": old,
                                      "new": new}).rowcount
        if moved != 1:
            raise _Raced

    def _new_trial(self, conn: sqlalchemy.Connection, key: str, state: TrialState,
                   owner: Mapping[str, Any] | None) -> int:
        # the study's row lock (PostgreSQL, MySQL) numbers trials as Optuna does; SQLite holds
        # its write lock from the insert on (it has no row locks)
        if conn.dialect.name != "sqlite":
            conn.execute(select(_STUDIES.c.study_id)
                         .where(_STUDIES.c.study_id == self.study_id).with_for_update())
        now = _utcnow()
        tid = conn.execute(_ADD_TRIAL, {
            "study_id": self.study_id, "number": None, "state": state, "datetime_start": now,
            "datetime_complete": None if state == TrialState.RUNNING else now,
        }).inserted_primary_key[0]
        before = conn.execute(_NUMBER_BEFORE, {"sid": self.study_id, "tid": tid}).scalar()
        conn.execute(_SET_NUMBER, {"tid": tid, "number": 0 if before is None else before + 1})
        conn.execute(_ADD_USER, {"trial_id": tid, "key": "key", "value_json": json.dumps(key)})
        if owner is not None:
            conn.execute(_ADD_SYSTEM, {"trial_id": tid, "key": CLAIM,
                                       "value_json": json.dumps(owner)})
            conn.execute(_ADD_BEAT, {"trial_id": tid})
        return tid

    # -- saving ---------------------------------------------------------------------------------
    def save(self, key: str, done: Finished, mine: int | None) -> dict[str, Any] | None:
        """Store ``done`` as ``key``'s trial: the claimed trial ``mine`` when it still runs,
        else another running claim of the key, else a new trial. Returns the stored result
        found instead when the key holds one that is not a failure (a config is stored once),
        else None."""
        for _ in range(20):
            try:
                with self._begin() as conn:
                    if mine is not None and self._finish(conn, mine, done):
                        return None
                    held = self._holder(conn, key)
                    if held is None:
                        tid = self._new_trial(conn, key, done.state, None)
                        self._fill(conn, tid, done)
                        conn.execute(_ADD_KEY, {"study_id": self.study_id,
                                                "key_hash": key_hash(key), "trial_id": tid})
                        return None
                    found = self._row(conn, held)
                    if found.state == TrialState.RUNNING:
                        if not self._finish(conn, held, done):
                            raise _Raced
                        return None
                    if found.result is not None and found.result.get("status") != "failed":
                        return found.result
                    tid = self._new_trial(conn, key, done.state, None)
                    self._fill(conn, tid, done)
                    self._point(conn, key, held, tid)
                    return None
            except (sqlalchemy.exc.IntegrityError, _Raced):
                mine = None
                continue
        raise RuntimeError(f"could not store {key}: other writers kept changing it")

    def _finish(self, conn: sqlalchemy.Connection, tid: int, done: Finished) -> bool:
        ended = conn.execute(_END_TRIAL, {"tid": tid, "state": done.state,
                                          "complete": _utcnow()}).rowcount
        if ended != 1:
            return False
        self._fill(conn, tid, done)
        return True

    def _fill(self, conn: sqlalchemy.Connection, tid: int, done: Finished) -> None:
        values = [dict(zip(("value", "value_type"), models.TrialValueModel.value_to_stored_repr(v),
                           strict=True), trial_id=tid, objective=i)
                  for i, v in enumerate(done.values or [])]
        params = [{"trial_id": tid, "param_name": name,
                   "param_value": dist.to_internal_repr(text),
                   "distribution_json": distribution_to_json(dist)}
                  for name, (text, dist) in done.params.items()]
        steps = [dict(zip(("intermediate_value", "intermediate_value_type"),
                          models.TrialIntermediateValueModel
                          .intermediate_value_to_stored_repr(v), strict=True),
                      trial_id=tid, step=step) for step, v in done.intermediate.items()]
        for statement, rows in ((_ADD_VALUES, values), (_ADD_PARAMS, params),
                                (_ADD_STEPS, steps)):
            if rows:
                conn.execute(statement, rows)
        # as Optuna's set_user_attr("result", text) writes it: a JSON string of the JSON
        conn.execute(_ADD_USER, {"trial_id": tid, "key": "result",
                                 "value_json": json.dumps(json.dumps(done.result))})

    # -- keeping claims alive -------------------------------------------------------------------
    def beat(self, trials: Iterable[int]) -> None:
        ids = list(trials)
        if ids:
            with self.engine.begin() as conn:
                self._beat(conn, ids)

    @staticmethod
    def _beat(conn: sqlalchemy.Connection, ids: list[int]) -> None:
        conn.execute(update(_BEATS).where(_BEATS.c.trial_id.in_(ids))
                     .values(heartbeat=func.current_timestamp()))

    def release(self, trials: Iterable[int]) -> None:
        """Give up claims of ours not evaluated: the next claimer takes them at once."""
        ids = list(trials)
        if not ids:
            return
        with self._begin() as conn:
            rows = conn.execute(select(_SYSTEM.c.trial_id, _SYSTEM.c.value_json).where(
                _SYSTEM.c.trial_id.in_(ids), _SYSTEM.c.key == CLAIM)).all()
            for tid, text in rows:
                owner = json.loads(text)
                if owner.get("token") != self.token:
                    continue
                conn.execute(update(_SYSTEM).where(
                    _SYSTEM.c.trial_id == tid, _SYSTEM.c.key == CLAIM,
                    _SYSTEM.c.value_json == text,
                ).values(value_json=json.dumps({**owner, "released": True})))


class Heartbeat:
    """A daemon thread that renews the claims ``held()`` lists every ``interval`` seconds
    (also while an evaluation runs, here or in a child process)."""

    def __init__(self, owner: object, held: Callable[[object], Collection[int]],
                 beat: Callable[[object, Collection[int]], None], interval: float) -> None:
        self._stop = threading.Event()
        ref = weakref.ref(owner)

        def run() -> None:
            while not self._stop.wait(interval):
                target = ref()
                if target is None:
                    return
                ids = held(target)
                if ids:
                    try:
                        beat(target, ids)
                    except Exception as e:  # the next save reports a broken store
                        log.warning("could not renew the store's claims: %s", e)
                del target

        self._thread = threading.Thread(target=run, name="ranksearch-heartbeat", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
