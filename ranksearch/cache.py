"""The factor cache: each decomposition runs once, and candidates are built from its factors."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping

import torch
from torch import nn

from . import factorize
from .calibration import InputStats, Whitening
from .clone import clone_module
from .config import Choice
from .errors import UnknownLayerError
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
    factors at a rank; data-aware, then `Factorization.fit_core` of the slice, once per rank).
    The others (CP, TT, TR) are decomposed once per rank. The cache keeps
    its own copy of the weights, so fine-tuning a built candidate never changes what later
    candidates start from.

    With ``stats`` (`ranksearch.calibration.collect`: input statistics by site name) the
    factors of the sites it covers are data-aware, exactly those of
    ``decompose_aware(weight, site, rank, whitening)``, and so are the spectra
    (`spectral_weight`, `singular_values`); the other sites keep weight-only factors.

    ``decompositions`` counts the decompositions run, per (site, method).
    """

    def __init__(self, model: nn.Module, space: RankSpace,
                 stats: Mapping[str, InputStats] | None = None) -> None:
        self.space = space
        self.stats = dict(stats or {})
        unknown = sorted(set(self.stats) - {site.name for site in space.decomposable})
        if unknown:
            raise UnknownLayerError(f"input statistics for {unknown}, which are not "
                                    "decomposable sites of the space; collect them for this "
                                    "space (ranksearch.calibration.collect)")
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
        self._whitenings: dict[tuple[str, tuple[int, ...], bool], Whitening] = {}
        self._whitened: dict[tuple[str, str], torch.Tensor] = {}
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
        key = (name, method, rank)
        if key in self._per_rank:  # refitted before
            return self._per_rank[key]
        if (name, method) not in self._top:
            self._top[(name, method)] = self._decompose(site, method, fac.max_rank(site))
        sliced = fac.slice(self._top[(name, method)], site, rank)
        if name not in self.stats:
            return sliced
        fitted = fac.fit_core(sliced, site, self._weights[name], self.whitening(site, method))
        if fitted is not sliced:  # kept only where the family refits (a slice is cheap)
            self._per_rank[key] = fitted
        return fitted

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

    @property
    def data_aware(self) -> bool:
        """Whether the cache holds input statistics (its factors are data-aware)."""
        return bool(self.stats)

    def spectral_weight(self, name: str, method: str) -> torch.Tensor:
        """The weight whose spectra decide ``method``'s rank on site ``name`` (for
        `ranksearch.vbmf.site_spectra` and the strategies that read spectra): the dense weight,
        or for a data-aware site its whitening for ``method`` (`Whitening.apply`, float64),
        whose spectra measure output error on the calibration data rather than weight error."""
        site = self.space.decomposable_site(name)
        if name not in self.stats:
            return self._weights[name]
        key = (name, method)
        if key not in self._whitened:
            self._whitened[key] = self.whitening(site, method).apply(self._weights[name])
        return self._whitened[key]

    def whitening(self, site: Site, method: str) -> Whitening:
        """The whitening of ``method`` on a data-aware site, from its statistics."""
        fac = factorize.get(method)
        modes = fac.input_modes(site)
        key = (site.name, modes, fac.weighs_outputs)
        if key not in self._whitenings:
            self._whitenings[key] = self.stats[site.name].whitening(
                modes, outputs=fac.weighs_outputs)
        return self._whitenings[key]

    def singular_values(self, name: str) -> torch.Tensor:
        """Singular values (descending, float64) of the site's weight as an out × (in·kh·kw)
        matrix (of the whitened weight when the site is data-aware, see `spectral_weight`);
        for a grouped convolution, the per-group spectra pooled as in
        `ranksearch.vbmf.site_spectra`."""
        if name not in self._spectra:
            site = self.space.decomposable_site(name)
            self._spectra[name] = site_spectra(site, self.spectral_weight(name, "svd"), "svd")[0]
        return self._spectra[name]

    def _decompose(self, site: Site, method: str, rank: Rank) -> Factors:
        log.debug("decomposing %s with %s at rank %s", site.name, method, rank)
        self.decompositions[(site.name, method)] += 1
        fac, weight = factorize.get(method), self._weights[site.name]
        if site.name in self.stats:  # sliceable: sliced, then `fit_core`, in `factors`
            decompose = fac.decompose_whitened if fac.sliceable else fac.decompose_aware
            return decompose(weight, site, rank, self.whitening(site, method))
        return fac.decompose(weight, site, rank)


def effective_rank(singular_values: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank ``exp(-Σ p_i log p_i)`` with ``p_i = σ_i / Σσ``."""
    s = singular_values.double()
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))
