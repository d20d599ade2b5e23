"""The factor cache: each decomposition runs once, and candidates are built from its factors."""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from . import factorize
from .clone import clone_module
from .config import Choice
from .factorize import Factors
from .site import Rank, Site, find_layers
from .space import RankSpace
from .vbmf import site_spectra

log = logging.getLogger(__name__)


class FactorCache:
    """Decompositions of a model's decomposable layers, computed on first use and kept.

    Every factor set equals what ``decompose(weight, site, rank)`` gives, bit for bit, so a
    candidate built from the cache is the one `ranksearch.compress` builds without it.
    Sliceable factorizations (svd, svd_spatial, tucker2) are decomposed once per site at their
    maximum rank, and every rank is sliced from those factors (which is how they define their
    factors at a rank). The others (CP, TT, TR) are decomposed once per rank. The cache keeps
    its own copy of the weights, so fine-tuning a built candidate never changes what later
    candidates start from.

    ``decompositions`` counts the decompositions run, per (site, method).
    """

    def __init__(self, model: nn.Module, space: RankSpace) -> None:
        self.space = space
        self._weights: dict[str, torch.Tensor] = {}
        self._biases: dict[str, torch.Tensor | None] = {}
        layers = {layer.name: layer for layer in find_layers(model)}
        for name in space.names:
            layer = layers[name]
            self._weights[name] = layer.weight.detach().clone()
            bias = layer.bias
            self._biases[name] = None if bias is None else bias.detach().clone()
        self._top: dict[tuple[str, str], Factors] = {}  # sliceable, at max rank
        self._per_rank: dict[tuple[str, str, Rank], Factors] = {}
        self._spectra: dict[str, torch.Tensor] = {}
        self._built: dict[tuple[str, Choice], nn.Module] = {}
        self.decompositions: Counter[tuple[str, str]] = Counter()

    def factors(self, name: str, method: str, rank: Rank) -> Factors:
        """Factors of site ``name`` that build ``method`` at ``rank``: exactly those of
        ``decompose`` at ``rank`` (each decomposition runs at most once)."""
        site = self.space.decomposable_site(name)
        self.space.ranks(name, method)  # raises unless the space offers the method there
        fac = factorize.get(method)
        rank = fac.normalize_rank(site, rank)
        if not fac.sliceable:
            key = (name, method, rank)
            if key not in self._per_rank:
                self._per_rank[key] = self._decompose(site, method, rank)
            return self._per_rank[key]
        if (name, method) not in self._top:
            self._top[(name, method)] = self._decompose(site, method, fac.max_rank(site))
        return fac.slice(self._top[(name, method)], site, rank)

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
        """Singular values (descending, float64) of the site's weight as an out × (in·kh·kw)
        matrix; for a grouped convolution, the per-group spectra pooled as in
        `ranksearch.vbmf.site_spectra`."""
        if name not in self._spectra:
            site = self.space.decomposable_site(name)
            self._spectra[name] = site_spectra(site, self._weights[name], "svd")[0]
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
