"""The cost of a configuration without building it: parameters, MACs, FLOPs, energy and
latency.

`CostModel` prices any `Config` of a `RankSpace` from the closed-form stage costs of each
factorization (`Factorization.stages`), so a search can price thousands of candidates in
milliseconds. `EnergyTable` holds the energy per operation and memory access; the default is
the 45 nm table of Horowitz (ISSCC 2014) as tabulated by Han et al. (2015). Latency cannot be
derived from MACs: it is priced from a `ranksearch.latency.LatencyTable` of measured
per-layer times when the cost model is given one. `measure_latency` times a real forward pass.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, fields
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import factorize
from .config import DENSE, Choice, Config
from .errors import RankSearchError
from .factorize.base import Stage, dense_stage, is_int
from .inputs import Inputs, call, move, tensors
from .site import Site
from .space import RankSpace

if TYPE_CHECKING:
    from .latency import LatencyTable

PJ = 1e-12  # joules per picojoule
#: The cost metrics priced from closed forms, for every cost model.
COUNTS = ("params", "macs", "flops", "energy")
#: Every cost metric a cost model can price before a candidate is built (latency with a
#: latency table).
METRICS = (*COUNTS, "latency")


@dataclass(frozen=True)
class EnergyTable:
    """Energy per operation and per memory access, in picojoules (pJ).

    The defaults are Horowitz, "Computing's energy problem (and what we can do about it)",
    ISSCC 2014, for 45 nm and 32-bit floats, as tabulated by Han et al., "Learning both weights
    and connections for efficient neural networks", NeurIPS 2015: multiply 3.7 pJ, add 0.9 pJ,
    32-bit SRAM access 5 pJ, 32-bit DRAM access 640 pJ. The access prices are per word of
    ``word_bytes`` bytes.

    ``onchip_bytes`` is the on-chip (SRAM) capacity in bytes: a stage whose activations,
    (inputs + outputs) · ``word_bytes``, exceed it reads and writes them at the DRAM price.
    ``None`` (the default) treats every activation as on chip.
    """

    mult_pj: float = 3.7
    add_pj: float = 0.9
    sram_pj: float = 5.0
    dram_pj: float = 640.0
    word_bytes: int = 4
    onchip_bytes: int | None = None

    def __post_init__(self) -> None:
        for key in ("mult_pj", "add_pj", "sram_pj", "dram_pj"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise RankSearchError(
                    f"energy table entry {key} must be a non-negative number of picojoules, "
                    f"got {value!r}"
                )
        if not is_int(self.word_bytes) or self.word_bytes < 1:
            raise RankSearchError(
                f"energy table entry word_bytes must be a positive integer, got "
                f"{self.word_bytes!r}"
            )
        if self.onchip_bytes is not None and (
            not is_int(self.onchip_bytes) or self.onchip_bytes < 0
        ):
            raise RankSearchError(
                "energy table entry onchip_bytes must be a non-negative integer number of "
                f"bytes or null, got {self.onchip_bytes!r}"
            )

    @property
    def mac_pj(self) -> float:
        """Energy of one multiply-accumulate (a multiply and an add), in pJ."""
        return self.mult_pj + self.add_pj

    def activation_pj(self, stage: Stage) -> float:
        """Price of one activation word of ``stage`` in pJ: SRAM, or DRAM when the stage's
        activations do not fit in ``onchip_bytes``."""
        size = (stage.inputs + stage.outputs) * self.word_bytes
        if self.onchip_bytes is not None and size > self.onchip_bytes:
            return self.dram_pj
        return self.sram_pj

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> EnergyTable:
        """Read a table from a JSON object; keys it leaves out keep their defaults.

        Example: ``{"dram_pj": 320.0, "onchip_bytes": 1048576}``.
        """
        valid = [f.name for f in fields(cls)]
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise RankSearchError(
                f"energy table file {os.fspath(path)!r} does not exist; pass the path of a JSON "
                f"object with some of the keys {valid}"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RankSearchError(
                f"cannot read the energy table {os.fspath(path)!r}: {e}"
            ) from e
        if not isinstance(data, dict):
            raise RankSearchError(
                f"the energy table {os.fspath(path)!r} must be a JSON object with some of the "
                f"keys {valid}, got {type(data).__name__}"
            )
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise RankSearchError(
                f"unknown key(s) {unknown} in the energy table {os.fspath(path)!r}; "
                f"the valid keys are {valid}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The table as a JSON-ready dict (the form `from_file` reads)."""
        return asdict(self)


@dataclass(frozen=True)
class _SiteCost:
    """Cost of one site under one choice: params counted once, MACs over every call."""

    params: int
    macs: int
    energy: float  # joules per inference


class CostModel:
    """Exact parameters, MACs and modelled energy of any configuration of a `RankSpace`, and
    its latency priced from ``latency`` (a `ranksearch.latency.LatencyTable` of the space)
    when given.

    Every site the traced forward pass called is priced, the non-decomposable ones (depthwise
    convolutions, shared layers, …) at their dense cost. MACs and activation traffic count once
    per call of a site; parameters once. MACs also hold the space's ``other_macs`` (attention
    scores and other products outside the sites, which no choice changes), so they are those
    `FlopCounterMode` counts for the whole forward pass. All figures are per input sample.
    ``energy`` defaults to `EnergyTable()`. Latency (seconds per call at the table's batch
    size, not per sample) is the table's `LatencyTable.total`.
    """

    def __init__(self, space: RankSpace, energy: EnergyTable | None = None,
                 latency: LatencyTable | None = None) -> None:
        self.space = space
        self.energy_table = EnergyTable() if energy is None else energy
        if latency is not None and latency.space != space:
            raise RankSearchError("the latency table was made for another space; make it "
                                  "with LatencyTable(model, space, ...) for this space")
        self.latency_table = latency
        self._called: tuple[Site, ...] = tuple(s for s in space.sites if s.calls > 0)
        if not self._called:
            raise RankSearchError(
                "no layer of the space was called in the traced forward pass, so it has no "
                "cost; build the space with RankSpace.discover(model, example_input)"
            )
        self._stages: dict[tuple[str, Choice], list[Stage]] = {}
        self._costs: dict[tuple[str, Choice], _SiteCost] = {}
        self._dense: dict[str, float] | None = None

    # -- per site -------------------------------------------------------------------------------
    def _site_stages(self, site: Site, choice: Choice) -> list[Stage]:
        """Stages of one call of ``site`` under a validated ``choice`` (cached)."""
        key = (site.name, choice)
        if key not in self._stages:
            if choice.is_dense:
                self._stages[key] = [dense_stage(site)]
            else:
                self._stages[key] = factorize.get(choice.method).stages(site, choice.rank)
        return self._stages[key]

    def _site_cost(self, site: Site, choice: Choice) -> _SiteCost:
        key = (site.name, choice)
        if key not in self._costs:
            table = self.energy_table
            stages = self._site_stages(site, choice)
            params = sum(s.params for s in stages)
            macs = site.calls * sum(s.macs for s in stages)
            pj = sum(
                site.calls * s.macs * table.mac_pj
                + s.params * table.dram_pj
                + site.calls * (s.inputs + s.outputs) * table.activation_pj(s)
                for s in stages
            )
            self._costs[key] = _SiteCost(params, macs, pj * PJ)
        return self._costs[key]

    @property
    def priced(self) -> tuple[str, ...]:
        """The cost metrics this model prices: `COUNTS`, and latency with a latency table."""
        return METRICS if self.latency_table is not None else COUNTS

    def _check_metric(self, metric: str) -> None:
        if metric == "latency" and self.latency_table is None:
            raise RankSearchError(
                "latency is priced from a table of measured layer times, and this cost model "
                "has none: pass CostModel(space, latency=LatencyTable(model, space, "
                "example_input)); a search makes one when a constraint or objective names "
                "latency")
        if metric not in self.priced:
            raise RankSearchError(f"unknown cost metric {metric!r}; choose one of {list(METRICS)}")

    def site_cost(self, name: str, choice: Choice, metric: str) -> float:
        """``metric`` (params, macs, flops, energy or latency) of site ``name`` alone under
        ``choice``: per sample over all its calls; latency in seconds per call of the
        table's batch."""
        self._check_metric(metric)
        choice = self.space.validate(Config({name: choice})).get(name, DENSE)
        if metric == "latency":
            return self.latency_table.seconds(name, choice)  # type: ignore[union-attr]
        cost = self._site_cost(self.space.site(name), choice)
        return float(2 * cost.macs if metric == "flops" else getattr(cost, metric))

    def _site_costs(self, config: Config) -> list[tuple[Site, Choice, _SiteCost]]:
        """Validate ``config`` once and price every called site under it, in model order."""
        config = self.space.validate(config)
        rows = []
        for site in self._called:
            choice = config.get(site.name, DENSE)
            rows.append((site, choice, self._site_cost(site, choice)))
        return rows

    # -- totals ---------------------------------------------------------------------------------
    def stages(self, config: Config) -> dict[str, list[Stage]]:
        """The stages of every called site under ``config``, in model order.

        Each list describes one call of the site (a site called k times costs k times its
        stages' MACs and activations, and its parameters once).
        """
        config = self.space.validate(config)
        return {s.name: list(self._site_stages(s, config.get(s.name, DENSE))) for s in self._called}

    def _totals(self, config: Config) -> dict[str, float]:
        rows = self._site_costs(config)
        params = self.space.model_params + sum(
            cost.params - site.dense_params for site, choice, cost in rows if not choice.is_dense
        )
        other = self.space.other_macs
        macs = other + sum(cost.macs for _, _, cost in rows)
        energy = other * self.energy_table.mac_pj * PJ + sum(cost.energy for _, _, cost in rows)
        totals = {"params": params, "macs": macs, "flops": 2 * macs, "energy": energy}
        if self.latency_table is not None:
            totals["latency"] = self.latency_table.total({s.name: c for s, c, _ in rows})
        return totals

    def params(self, config: Config) -> int:
        """Parameters of the whole compressed model (BatchNorm and other layers included)."""
        return int(self._totals(config)["params"])

    def macs(self, config: Config) -> int:
        """Multiply-accumulates of one forward pass per input sample: every site under
        ``config`` and the space's fixed ``other_macs``."""
        return int(self._totals(config)["macs"])

    def flops(self, config: Config) -> int:
        """Floating-point operations of one forward pass per sample (2 · `macs`)."""
        return 2 * self.macs(config)

    def energy(self, config: Config) -> float:
        """Modelled energy of one inference (one sample) in joules.

        Σ over stages of MACs · (mult + add) + weight words · DRAM + activation words
        (inputs + outputs) · SRAM (DRAM when they exceed ``onchip_bytes``), plus the
        space's ``other_macs`` · (mult + add). Weights are
        fetched from DRAM once per inference (a batch of one sample, as in Han et al. 2015).
        """
        return float(self._totals(config)["energy"])

    def dense(self) -> dict[str, float]:
        """`metrics` of the dense model (every ratio 1.0)."""
        if self._dense is None:
            totals = self._totals(Config())
            self._dense = {**totals, **{f"{m}_ratio": 1.0 for m in self.priced}}
        return dict(self._dense)

    def metrics(self, config: Config) -> dict[str, float]:
        """params, macs, flops (per sample), energy (joules per sample), latency (seconds, with
        a latency table), and each as a ratio to the dense model (``params_ratio`` = params /
        dense params; 0.25 means 4× smaller)."""
        totals = self._totals(config)
        dense = self.dense()
        return {**totals, **{f"{m}_ratio": totals[m] / dense[m] for m in self.priced}}

    def ratio(self, metric: str, config: Config) -> float:
        """``metric`` of ``config`` divided by that of the dense model (one of `priced`)."""
        self._check_metric(metric)
        return self._totals(config)[metric] / self.dense()[metric]

    def table(self, config: Config) -> list[dict[str, Any]]:
        """One row per called site for reports: name, choice (e.g. ``"svd:8"``), params, macs
        (per sample, all calls), energy (joules per sample) and, with a latency table, the
        latency of a decomposable site (seconds). The space's ``other_macs`` are in no row."""
        rows = []
        for site, choice, cost in self._site_costs(config):
            row: dict[str, Any] = {"name": site.name, "choice": str(choice),
                                   "params": cost.params, "macs": cost.macs,
                                   "energy": cost.energy}
            if self.latency_table is not None and site.decomposable:
                row["latency"] = self.latency_table.seconds(site.name, choice)
            rows.append(row)
        return rows


def measure_latency(
    model: nn.Module,
    example_input: Inputs,
    warmup: int = 5,
    repeats: int = 20,
    threads: int | None = None,
) -> float:
    """The median wall time, in seconds, of one call of ``model`` on ``example_input`` (a
    tensor, a tuple of positional arguments or a dict of keyword arguments: see
    `ranksearch.inputs.call`).

    Runs ``warmup`` untimed calls, then ``repeats`` timed ones, in eval mode under
    `torch.inference_mode` on the model's device (the input is moved there); on CUDA the device
    is synchronized around each timed call. Only the median is reported: it is robust to the
    occasional slow run. ``threads`` sets `torch.set_num_threads` for the measurement. The
    model's training flag and the thread count are restored afterwards.
    """
    if not is_int(warmup) or warmup < 0:
        raise RankSearchError(f"warmup must be an integer ≥ 0, got {warmup!r}")
    if not is_int(repeats) or repeats < 1:
        raise RankSearchError(f"repeats must be an integer ≥ 1, got {repeats!r}")
    if threads is not None and (not is_int(threads) or threads < 1):
        raise RankSearchError(f"threads must be a positive integer or None, got {threads!r}")
    held = chain(model.parameters(), model.buffers(), tensors(example_input))
    device = next((t.device for t in held), torch.device("cpu"))
    inputs = move(example_input, device)
    cuda = device.type == "cuda"
    modes = [(m, m.training) for m in model.modules()]
    old_threads = torch.get_num_threads()
    times = []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        model.eval()
        with torch.inference_mode():
            for _ in range(warmup):
                call(model, inputs)
            for _ in range(repeats):
                if cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                call(model, inputs)
                if cuda:
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
    finally:
        for m, training in modes:
            m.training = training
        if threads is not None:
            torch.set_num_threads(old_threads)
    return statistics.median(times)
