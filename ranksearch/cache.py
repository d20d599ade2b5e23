"""The factor cache: every layer is decomposed once, and candidates are built from slices."""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from . import factorize
from .clone import clone_module
from .factorize import Factors
from .space import Choice, Rank, RankSpace, Site

log = logging.getLogger(__name__)


class FactorCache:
    """Decompositions of a model's decomposable layers, computed on first use and kept.

    Sliceable factorizations (svd, svd_spatial, tucker2, tt) are decomposed once per site at
    the largest rank the space allows for them, and every smaller rank is sliced from those
    factors. The others (CP, TR) are decomposed once per rank. The cache keeps its own copy of
    the weights, so fine-tuning a built candidate never changes what later candidates start
    from.

    ``decompositions`` counts the decompositions run, per (site, method).
    """

    def __init__(self, model: nn.Module, space: RankSpace) -> None:
        self.space = space
        self._weights: dict[str, torch.Tensor] = {}
        self._biases: dict[str, torch.Tensor | None] = {}
        for name in space.names:
            module = model.get_submodule(name)
            self._weights[name] = module.weight.detach().clone()
            bias = getattr(module, "bias", None)
            self._biases[name] = None if bias is None else bias.detach().clone()
        self._sliced: dict[tuple[str, str], tuple[Rank, Factors]] = {}
        self._per_rank: dict[tuple[str, str, Rank], Factors] = {}
        self._spectra: dict[str, torch.Tensor] = {}
        self._built: dict[tuple[str, Choice], nn.Module] = {}
        self.decompositions: Counter[tuple[str, str]] = Counter()

    def factors(self, name: str, method: str, rank: Rank) -> Factors:
        """Factors of site ``name`` that build ``method`` at ``rank`` (computed at most once)."""
        site = self.space.decomposable_site(name)
        fac = factorize.get(method)
        rank = fac.normalize_rank(site, rank)
        if not fac.sliceable:
            key = (name, method, rank)
            if key not in self._per_rank:
                self._per_rank[key] = self._decompose(site, method, rank)
            return self._per_rank[key]
        held = self._sliced.get((name, method))
        if held is not None and _covers(held[0], rank):
            return held[1]
        top = _largest(self.space.ranks(name, method)[-1], rank)
        if held is not None:
            top = _largest(top, held[0])
        factors = self._decompose(site, method, top)
        self._sliced[(name, method)] = (top, factors)
        return factors

    def build(self, name: str, choice: Choice) -> nn.Module:
        """The factorized module for ``choice`` on site ``name``, weights set from the cache.

        Each (site, choice) is built once; later calls return a copy of that module.
        """
        key = (name, choice)
        if key not in self._built:
            site = self.space.decomposable_site(name)
            fac = factorize.get(choice.method)
            factors = self.factors(name, choice.method, choice.rank)
            self._built[key] = fac.build(site, choice.rank, factors, self._biases[name])
        return clone_module(self._built[key])

    def weight(self, name: str) -> torch.Tensor:
        """The dense weight of site ``name`` as it was when the cache was made (do not modify)."""
        self.space.decomposable_site(name)
        return self._weights[name]

    def singular_values(self, name: str) -> torch.Tensor:
        """Singular values (descending) of the site's weight as an out × (in·kh·kw) matrix."""
        if name not in self._spectra:
            self.space.decomposable_site(name)
            w = self._weights[name]
            self._spectra[name] = torch.linalg.svdvals(w.reshape(w.shape[0], -1).double())
        return self._spectra[name]

    def _decompose(self, site: Site, method: str, rank: Rank) -> Factors:
        log.debug("decomposing %s with %s at rank %s", site.name, method, rank)
        self.decompositions[(site.name, method)] += 1
        return factorize.get(method).decompose(self._weights[site.name], site, rank)


def effective_rank(singular_values: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank ``exp(-Σ p_i log p_i)`` with ``p_i = σ_i / Σσ``."""
    s = singular_values.double()
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def _covers(held: Rank, wanted: Rank) -> bool:
    if isinstance(held, int):
        return held >= wanted  # type: ignore[operator]
    return all(h >= w for h, w in zip(held, wanted, strict=True))  # type: ignore[arg-type]


def _largest(a: Rank, b: Rank) -> Rank:
    if isinstance(a, int):
        return max(a, b)  # type: ignore[type-var]
    return tuple(max(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
