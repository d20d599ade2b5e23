"""Latency tables: each site's choices timed alone on the target backend, so that the latency
of any config is priced as a sum, like its FLOPs, without building the model.

A `LatencyTable` holds, for every decomposable site and each of its choices (dense included),
the time of that layer alone at its traced input shape and the table's batch size, and the
time of the rest of the model: the dense model timed whole, less the sum of its dense sites,
clamped at 0 (`LatencyTable.clamped` says when the clamp applied). A config then costs
``rest + Σ site entries``, and the dense model exactly its measured time.

Every time is the median of ``repeats`` samples after ``warmup`` calls (the whole model's of
three times as many); a call shorter than ``min_time`` is repeated within a sample to fill
it. A choice is timed interleaved with its dense layer (dense, choice, dense, choice, ...)
and kept as the median of the paired ratios times the dense layer's time (the median of all
its samples), so that slow drift of the machine (clock, heat, other load) cancels (the
timing itself is `ranksearch.timing`'s). Per-layer sums miss what fuses across layers
(nn-Meter, MobiSys 2021), so a search times its front end to end (`LatencyTable.check`).

Entries are kept in a `Book` (the store's ``ranksearch_latency`` table, see
`ranksearch.store.latency_book`) under a digest of everything that decides a time
(`Timing.key`: device, backend, batch size, threads, torch version, dtype, repeats) and of
the site's shape, not its name: identical layers, and later searches, share entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import factorize
from .clone import clone_module
from .config import DENSE, Choice, Config
from .errors import InputShapeError, RankSearchError
from .fingerprint import callable_digest
from .inputs import Inputs, batch_size, tensors
from .site import Site
from .space import RankSpace
from .timing import Timing, measuring, paired_ratio, prepare, time_alone, time_paired

#: Entries of a table by name: ``site/<shape>/<choice>`` and ``model/<model>`` (each
#: ``{"seconds": ...}``, a choice's with its ``ratio`` to the dense layer), and ``key``.
Entries = dict[str, dict[str, Any]]


# -- what is timed ------------------------------------------------------------------------------
def dense_module(site: Site) -> nn.Module:
    """A fresh layer of the site's shape (default weights: a time does not depend on them)."""
    if site.kind == "linear":
        return nn.Linear(site.in_features, site.out_features, bias=site.bias)
    return nn.Conv2d(site.in_features, site.out_features, site.kernel_size, site.stride,
                     site.padding, site.dilation, site.groups, site.bias, site.padding_mode)


def choice_module(site: Site, choice: Choice) -> nn.Module:
    """The module ``choice`` builds on ``site``, with default weights."""
    if choice.is_dense:
        return dense_module(site)
    return factorize.get(choice.method).build(site, choice.rank)


def site_input(site: Site, batch: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A seeded random input of the site at its traced shape: N × C × H × W for a
    convolution, N × (positions) × features for a linear layer."""
    if site.kind == "conv2d":
        shape = (batch, site.in_features, *site.in_size)
    else:
        shape = (batch, *site.in_size, site.in_features)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return x.to(dtype=dtype, device=device)


def site_signature(site: Site) -> str:
    """A digest of what decides the site's times: its shape, not its name."""
    shape = {k: v for k, v in site.to_dict().items()
             if k not in ("name", "calls", "methods", "reason")}
    return _digest(json.dumps(shape, sort_keys=True, default=str))


def model_signature(model: nn.Module, inputs: Inputs) -> str:
    """A digest of what decides the dense model's time: its class and code, its modules
    (``repr``) and the shapes and dtypes of its inputs."""
    shapes = [f"{tuple(t.shape)}:{t.dtype}" for t in tensors(inputs)]
    keys = sorted(map(str, inputs)) if isinstance(inputs, Mapping) else type(inputs).__name__
    text = "\n".join([type(model).__qualname__, callable_digest(type(model)), repr(model),
                      json.dumps([keys, shapes])])
    return _digest(text)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- where entries are kept ---------------------------------------------------------------------
class Book(Protocol):
    """Where a latency table's entries are kept, by table digest."""

    def load(self, table: str) -> Entries:
        """Every entry kept for ``table``."""

    def save(self, table: str, entries: Entries) -> Entries:
        """Keep ``entries``; one kept already (by another writer) stays. Returns the
        entries as kept."""


class MemoryBook:
    """Entries kept in this process only (the book of a ``store="memory"`` search)."""

    def __init__(self) -> None:
        self._tables: dict[str, Entries] = {}

    def load(self, table: str) -> Entries:
        return dict(self._tables.get(table, {}))

    def save(self, table: str, entries: Entries) -> Entries:
        kept = self._tables.setdefault(table, {})
        for name, value in entries.items():
            kept.setdefault(name, value)
        return {name: kept[name] for name in entries}


# -- the table ----------------------------------------------------------------------------------
class LatencyTable:
    """Per-site latencies of the choices of ``space`` (a space of ``model``), timed as
    ``timing`` says on ``example_input`` (a batch of ``timing.batch_size`` model inputs), and
    the time of the rest of the model (see the module doc). ``book`` keeps the entries
    (default: this object only): entries found there are used, never timed again.

    Entries are timed on first use (`seconds`, `rest`) or all at once (`build`, with a
    progress bar); ``measured`` counts the entries this object timed; ``key`` is what decides
    its times (`Timing.key`) and ``digest`` the digest of it the book keeps them under. A
    copy in another process (pickled) prices from the entries it holds and refuses to time
    more: `build` the table before handing it on.
    """

    def __init__(self, model: nn.Module, space: RankSpace, example_input: Inputs,
                 timing: Timing | None = None, book: Book | None = None) -> None:
        timing = timing or Timing()
        try:
            found = batch_size(example_input)
        except ValueError as e:
            raise InputShapeError(f"{e}; pass one batch the model takes") from None
        if found != timing.batch_size:
            raise InputShapeError(
                f"the example input holds {found} samples, but the table times batches of "
                f"{timing.batch_size}; pass task.example_input({timing.batch_size})")
        self.space = space
        self.timing = timing
        self._model = model
        self._inputs = example_input
        self._dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                           torch.float32)
        self.key = timing.key(self._dtype)
        self.digest = _digest(json.dumps(self.key, sort_keys=True))
        self._book: Book | None = book if book is not None else MemoryBook()
        self._entries: Entries = self._book.load(self.digest)
        self._shapes = {s.name: site_signature(s) for s in space.decomposable}
        self._whole = f"model/{model_signature(model, example_input)}"
        self._seconds: dict[tuple[str, Choice], float] = {}
        self._rest: float | None = None
        self._pid = os.getpid()  # a forked child (an isolated evaluation) prices, never times
        self.measured = 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None, "_inputs": None, "_book": None}

    # -- prices ---------------------------------------------------------------------------------
    def seconds(self, name: str, choice: Choice) -> float:
        """The time of site ``name`` alone under ``choice`` (timed now if the table lacks it)."""
        key = (name, choice)
        if key not in self._seconds:
            site = self.space.decomposable_site(name)
            choice = self.space.validate(Config({name: choice})).get(name, DENSE)
            entry = self._entry(name, choice)
            if entry not in self._entries:
                self._measure(site, [choice])
            self._seconds[key] = float(self._entries[entry]["seconds"])
        return self._seconds[key]

    @property
    def whole(self) -> float:
        """The dense model's time, measured whole."""
        if self._whole not in self._entries:
            self._measure_model()
        return float(self._entries[self._whole]["seconds"])

    @property
    def rest(self) -> float:
        """The time of everything but the decomposable sites: `whole` less the sum of the
        dense sites' times, at least 0."""
        if self._rest is None:
            self._rest = max(0.0, self.whole - self._dense_sum())
        return self._rest

    @property
    def clamped(self) -> bool:
        """Whether the dense sites alone took longer than the whole model (then `rest` is
        0 and the dense model prices above its measured time)."""
        return self._dense_sum() > self.whole

    @property
    def dense(self) -> float:
        """The priced time of the dense model: `rest` + the dense sites (`whole` unless
        `clamped`)."""
        return self.total({})

    def total(self, choices: Mapping[str, Choice]) -> float:
        """`rest` + each decomposable site's time under ``choices`` (validated; sites it
        leaves out are dense)."""
        return self.rest + sum(self.seconds(n, choices.get(n, DENSE)) for n in self.space.names)

    def price(self, config: Config) -> float:
        """The priced time of ``config``: `rest` + Σ its sites' entries."""
        return self.total(self.space.validate(config))

    def _dense_sum(self) -> float:
        return sum(self.seconds(n, DENSE) for n in self.space.names)

    # -- measuring ------------------------------------------------------------------------------
    def build(self, progress: bool = False) -> int:
        """Time every entry the table lacks (each choice of each site shape, and the whole
        dense model), with a progress bar when ``progress``; returns how many were timed."""
        todo: dict[str, tuple[Site, list[Choice]]] = {}
        for site in self.space.decomposable:
            shape = self._shapes[site.name]
            missing = [c for c in self.space.choices(site.name)
                       if self._entry(site.name, c) not in self._entries]
            if missing and shape not in todo:
                todo[shape] = (site, missing)
        count = sum(len(m) for _, m in todo.values()) + (self._whole not in self._entries)
        with tqdm(total=count, desc="latency table", unit="entry", disable=not progress,
                  leave=False) as bar:
            for site, missing in todo.values():
                self._measure(site, missing, bar.update)
            if self._whole not in self._entries:
                self._measure_model()
                bar.update()
        return count

    def _entry(self, name: str, choice: Choice) -> str:
        return f"site/{self._shapes[name]}/{choice}"

    def _measure(self, site: Site, choices: Iterable[Choice],
                 done: Callable[[], object] = lambda: None) -> None:
        """Time ``choices`` of ``site``, each interleaved with the dense layer. Unless the
        table has the dense layer's time, it is the median of every dense sample taken here
        (alone first, then in each pair), so that a moment of load does not skew the site."""
        self._check_local()
        timing = self.timing
        x = site_input(site, timing.batch_size, self._dtype, timing.device)
        reference = self._entry(site.name, DENSE)
        ratios: dict[str, float] = {}
        with measuring(timing):
            dense = prepare(dense_module(site).to(self._dtype), x, timing)
            samples = [] if reference in self._entries else time_alone(dense, timing)
            for choice in choices:
                if choice.is_dense:
                    continue
                module = choice_module(site, choice).to(self._dtype)
                first, second = time_paired(dense, prepare(module, x, timing), timing)
                ratios[self._entry(site.name, choice)] = paired_ratio(first, second)
                samples += first
                done()
        new: Entries = {}
        if reference not in self._entries:
            new[reference] = {"seconds": statistics.median(samples)}
            done()
        base = (self._entries.get(reference) or new[reference])["seconds"]
        new.update({k: {"seconds": r * base, "ratio": r} for k, r in ratios.items()})
        self._keep(new)

    def _measure_model(self) -> None:
        """The dense model timed whole: the median of three times the repeats (it is timed
        once per table)."""
        self._check_local()
        timing = replace(self.timing, repeats=3 * self.timing.repeats)
        with measuring(timing):
            run = prepare(clone_module(self._model), self._inputs, timing)
            seconds = statistics.median(time_alone(run, timing))
        self._keep({self._whole: {"seconds": seconds}})

    def _keep(self, new: Entries) -> None:
        assert self._book is not None
        self.measured += len(new)
        if "key" not in self._entries:  # what the table's digest stands for, for people
            new = {"key": self.key, **new}
        self._entries.update(self._book.save(self.digest, new))
        self._rest = None

    def _check_local(self) -> None:
        if self._book is None or os.getpid() != self._pid:
            raise RankSearchError(
                "this latency table was copied to another process, where it cannot time "
                "layers (its times are those of the process that made it, on its threads); "
                "build it (LatencyTable.build) before handing it on")

    # -- fast ranks -----------------------------------------------------------------------------
    def fast_multiple(self, name: str, method: str, multiples: Iterable[int] = (2, 4, 8, 16, 32),
                      gain: float = 0.05) -> int:
        """The rank multiple that runs fast for ``method`` on site ``name``, read off the
        table (its grid timed first where missing), for a ``multiple_of`` that snaps ranks to
        it. A grid rank whose every component is a multiple of m saves ``1 - t(r) / mean(t of
        its two grid neighbours)``; m scores the median saving over such ranks. The smallest
        m scoring within 0.02 of the best score, if that is at least ``gain``; else 1 (no
        multiple is faster than its neighbours)."""
        site = self.space.decomposable_site(name)
        grid = [Choice(method, r) for r in self.space.ranks(name, method)]
        missing = [c for c in grid if self._entry(name, c) not in self._entries]
        if missing:
            self._measure(site, missing)
        times = [self.seconds(name, c) for c in grid]
        scores = {}
        for m in multiples:
            saved = [1 - times[i] / ((times[i - 1] + times[i + 1]) / 2)
                     for i in range(1, len(grid) - 1)
                     if all(r % m == 0 for r in np.atleast_1d(grid[i].rank))]
            if saved:
                scores[m] = statistics.median(saved)
        top = max(scores.values(), default=0.0)
        if top < gain:
            return 1
        return min(m for m, score in scores.items() if score >= top - 0.02)

    # -- checking predictions -------------------------------------------------------------------
    def check(self, configs: Iterable[Config], build: Callable[[Config], nn.Module]
              ) -> dict[str, dict[str, float]]:
        """Each config's model (``build(config)``, weights of no matter) timed whole,
        interleaved with the dense model, by config key: ``latency_measured`` (the median of
        its samples, seconds), ``latency_measured_ratio`` (the median of its paired ratios to
        the dense model) and ``latency_dense_measured`` (the dense model's median)."""
        self._check_local()
        out = {}
        with measuring(self.timing):
            dense = prepare(clone_module(self._model), self._inputs, self.timing)
            for config in configs:
                model = prepare(build(config), self._inputs, self.timing)
                first, second = time_paired(dense, model, self.timing)
                out[config.key] = {"latency_measured": statistics.median(second),
                                   "latency_measured_ratio": paired_ratio(first, second),
                                   "latency_dense_measured": statistics.median(first)}
        return out


#: The rank multiples `snap_space` tries.
MULTIPLES = (2, 4, 8, 16, 32)


def snap_space(table: LatencyTable, multiples: Iterable[int] = MULTIPLES) -> RankSpace:
    """``table.space`` with each site's grid of each method rounded to the multiple that runs
    fast there (`LatencyTable.fast_multiple`, its grid timed first where the table lacks it),
    recorded in the spec's ``rank_multiples`` (so in the fingerprint); sites where no
    multiple is faster keep theirs. Time the snapped space's grids with a table of it."""
    space = table.space
    found = tuple((site.name, method, m) for site in space.decomposable for method in site.methods
                  if (m := table.fast_multiple(site.name, method, tuple(multiples))) > 1)
    return replace(space, spec=replace(space.spec, rank_multiples=found), _grids={})


def needs_latency(names: Iterable[str]) -> bool:
    """Whether any of the metric names (of constraints and objectives) is latency."""
    return any(n.removesuffix("_ratio") == "latency" for n in names)


__all__ = [
    "MULTIPLES",
    "Book",
    "LatencyTable",
    "MemoryBook",
    "model_signature",
    "needs_latency",
    "site_signature",
    "snap_space",
]
