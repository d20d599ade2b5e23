"""The store: every evaluation of a search, kept in a database as an Optuna study.

Each evaluation is one Optuna trial: its values are the objectives, its params the index of
each site's choice in the space, and its user attributes the whole `Result`. So
``optuna-dashboard sqlite:///out/ranksearch.db`` and Optuna's plots work on a search, and a
search resumes from whatever the study holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from .config import Config
from .errors import StoreError
from .fingerprint import Fingerprint
from .pareto import Objective
from .result import Result, result_key
from .space import RankSpace

log = logging.getLogger(__name__)

_STATES = {"ok": TrialState.COMPLETE, "failed": TrialState.FAIL, "pruned": TrialState.PRUNED}


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's own log at WARNING or quieter inside the block (it logs every study created
    and trial told at INFO), restored after: importing ranksearch changes no global setting.
    Also a decorator."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(before, optuna.logging.WARNING))
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


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``, with a clear error when it cannot be reached.

    ``url="memory"`` (`MEMORY`) is a fresh `optuna.storages.InMemoryStorage` on each call:
    nothing is written to disk, and two calls (two `Store` objects) do not share studies.
    """
    if url == MEMORY:
        return optuna.storages.InMemoryStorage()
    if url.startswith("sqlite:///"):
        parent = Path(url[len("sqlite:///"):]).parent
        if not parent.is_dir():
            raise StoreError(f"the store's folder {parent} does not exist (store URL {url})")
        if not os.access(parent, os.W_OK):
            raise StoreError(f"the store's folder {parent} is not writable (store URL {url})")
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
    except Exception as e:  # SQLAlchemy and driver errors vary by backend
        raise StoreError(
            f"cannot open the store at {url!r} ({type(e).__name__}: {e}). Check the URL, that "
            "the database server is reachable and its driver installed, or use the default "
            "SQLite store in the output folder."
        ) from e
    if url.startswith("sqlite"):
        # Write-ahead log: readers (optuna-dashboard, `ranksearch report`) work while a search
        # writes, and a killed process never leaves a half-written commit behind.
        sqlalchemy.event.listen(storage.engine, "connect", _sqlite_pragmas)
        storage.engine.dispose()
    return storage


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def list_studies(url: str) -> list[str]:
    """Names of the searches held by the store at ``url``."""
    return [s.study_name for s in optuna.get_all_study_summaries(open_storage(url))]


class Store:
    """The evaluations of one search, persisted as an Optuna study named ``study``.

    Opening a study that exists resumes it. Its space and objectives must be the same, and so
    must its ``fingerprint`` (the weights, data, loss, proxy settings and space that decide a
    score): a mismatch is a `StoreError` that names what differs. With ``share``, a config
    this study has not evaluated is taken from another study of the store whose fingerprint
    is exactly the same (and copied into this one).

    Trial params are the choices as text (``"tucker2:23x46"``), so optuna-dashboard shows the
    ranks, and the objectives carry their metric names.

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
    ) -> None:
        self.url = url
        self.space = space
        self.objectives = tuple(objectives)
        self.fingerprint = fingerprint
        self.share = share
        storage = open_storage(url)
        directions = ["maximize" if o.direction == "max" else "minimize" for o in objectives]
        try:
            self.study = optuna.create_study(
                storage=storage, study_name=study, directions=directions, load_if_exists=True
            )
        except Exception as e:
            raise StoreError(f"cannot create study {study!r} in {url!r}: {e}") from e
        signature = space_signature(space)
        attrs = self.study.user_attrs
        if "space" not in attrs:
            self.study.set_user_attr("space", signature)
            self.study.set_user_attr("objectives", [str(o) for o in self.objectives])
            self.study.set_user_attr("meta", dict(meta or {}))
            if fingerprint is not None:
                self.study.set_user_attr("fingerprint", fingerprint.to_json())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.study.set_metric_names([o.metric for o in self.objectives])
        else:
            self._check(attrs, signature)
        self._params = {
            name: tuple(str(c) for c in space.choices(name)) for name in space.names
        }
        self._results = _trial_results(self.study)
        self._shared: dict[str, Result] | None = None
        self._storage = storage

    def _check(self, attrs: Mapping[str, Any], signature: str) -> None:
        """Raise unless the stored study was made for this space, objectives and fingerprint."""
        study, hint = self.study.study_name, ("pass another study name (--study) or output "
                                              "folder to start a new search")
        stored = attrs.get("fingerprint")
        if self.fingerprint is not None and stored is None:
            raise StoreError(f"study {study!r} in {self.url} was stored without a fingerprint "
                             f"of what it measured, so it cannot be resumed safely; {hint}")
        if self.fingerprint is not None:
            differences = self.fingerprint.differences(Fingerprint.from_json(stored))
            if differences:
                raise StoreError(f"study {study!r} in {self.url} measured something else: "
                                 f"{'; '.join(differences)}. Its results do not apply; {hint}")
        if attrs["space"] != signature:
            raise StoreError(f"study {study!r} in {self.url} was made for another model or "
                             f"space; {hint}")
        if attrs.get("objectives") != [str(o) for o in self.objectives]:
            raise StoreError(
                f"study {study!r} was made with objectives {attrs.get('objectives')}, not "
                f"{[str(o) for o in self.objectives]}; pass another study name"
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
        return iter(self._results.values())

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
            for summary in optuna.get_all_study_summaries(self._storage):
                if summary.study_name == self.name:
                    continue
                other = optuna.load_study(study_name=summary.study_name, storage=self._storage)
                theirs = other.user_attrs.get("fingerprint")
                if theirs is None or Fingerprint.from_json(theirs).digest != digest:
                    continue
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

    @quiet_optuna()
    def save(self, result: Result) -> None:
        """Commit ``result`` as a finished trial. A config is stored once, except that a new
        result replaces a failed one (a retry); the failed trial stays in the study's history."""
        key = result.key
        held = self._results.get(key)
        if held is not None and held.status != "failed":
            return
        values = None
        state = _STATES[result.status]
        if state == TrialState.COMPLETE:
            values = [result.metrics.get(o.metric, math.nan) for o in self.objectives]
            if not all(math.isfinite(v) for v in values):
                state = TrialState.FAIL
                values = None
        params, dists = {}, {}
        for name in self.space.names:
            text = str(result.config.get(name))
            if text in self._params[name]:
                params[name] = text
                dists[name] = CategoricalDistribution(self._params[name])
        intermediate = {}
        if result.status == "pruned" and "accuracy" in result.metrics:
            intermediate[0] = float(result.metrics["accuracy"])
        trial = optuna.trial.create_trial(
            state=state,
            values=values,
            params=params,
            distributions=dists,
            user_attrs={"result": json.dumps(result.to_json()), "key": key},
            intermediate_values=intermediate,
        )
        self.study.add_trial(trial)
        self._results[key] = result


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


def read_study(url: str, study: str) -> tuple[list[Result], dict[str, Any]]:
    """The results and the run description of a stored search, without its model."""
    storage = open_storage(url)
    try:
        loaded = optuna.load_study(study_name=study, storage=storage)
    except KeyError:
        raise StoreError(
            f"no study {study!r} in {url}; it holds {list_studies(url) or 'no studies'}"
        ) from None
    candidates = [r for r in _trial_results(loaded).values() if r.partial is None]
    return candidates, dict(loaded.user_attrs.get("meta", {}))


def read_fingerprint(url: str, study: str) -> Fingerprint | None:
    """The fingerprint a stored search measured with (None for a study stored without)."""
    loaded = optuna.load_study(study_name=study, storage=open_storage(url))
    data = loaded.user_attrs.get("fingerprint")
    return None if data is None else Fingerprint.from_json(data)


def read_objectives(url: str, study: str) -> list[str]:
    """The objectives a stored search used (accuracy, flops for a study stored without)."""
    loaded = optuna.load_study(study_name=study, storage=open_storage(url))
    return list(loaded.user_attrs.get("objectives") or ["accuracy", "flops"])
