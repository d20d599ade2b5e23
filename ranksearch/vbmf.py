"""Empirical variational Bayesian matrix factorization (EVBMF) and the unfoldings it reads.

`evbmf` is the global analytic solution of Nakajima, Sugiyama, Babacan & Tomioka, "Global
analytic solution of fully-observed variational Bayesian matrix factorization", JMLR 14,
2013 (with the noise-variance bounds of Nakajima, Tomioka, Sugiyama & Babacan, "Perfect
dimensionality recovery by variational Bayesian PCA", NeurIPS 2012). For an L×M observation
(L ≤ M, α = L/M) with singular values γ_h, EVB keeps the components with
γ_h > γ̄ = sqrt(M·σ²·(1+τ̄)(1+α/τ̄)), τ̄ the zero of Φ(τ) + Φ(τ/α), Φ(z) = log(1+z)/z − 1/2
(τ̄ ≈ 2.5129·√α), and σ² the minimizer of the free energy over its known bounded interval.

Kim et al. ("Compression of deep convolutional neural networks for fast and low power mobile
applications", ICLR 2016) read Tucker-2 ranks off the channel unfoldings this way;
`site_matrices` and `site_vbmf_rank` do that for every matrix-rank factorization: those whose
`Factorization.spectral` is set (`spectral_methods`), with the matrices of their
`Factorization.spectral_matrices`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.optimize import brentq, minimize_scalar

from . import factorize
from .errors import NotAdmittedError, RankSearchError
from .factorize.base import GROUPED_METHODS
from .site import Rank, Site
from .space import RankSpace, method_for

log = logging.getLogger(__name__)

_GRID = 64  # log-spaced probes of the free energy before the bounded Brent refinement
_FLOOR = 1e-12  # smallest σ² considered, relative to the upper bound (exactly low-rank input)


@dataclass(frozen=True)
class VBMFResult:
    """EVBMF of one matrix: the number of kept components, the estimated noise variance, the
    singular-value threshold and the shrunk singular values of the kept components."""

    rank: int
    sigma2: float
    threshold: float
    shrunk: tuple[float, ...]


def tau_bar(alpha: float) -> float:
    """τ̄(α): the zero of Φ(τ) + Φ(τ/α), Φ(z) = log(1+z)/z − 1/2, for 0 < α ≤ 1."""
    if not 0 < alpha <= 1:
        raise RankSearchError(f"alpha must be in (0, 1], got {alpha}")

    def phi(z: float) -> float:
        return math.log1p(z) / z - 0.5

    # Ξ falls from 1 (τ → 0) to −1; at τ = 3 both terms are already negative.
    return float(brentq(lambda t: phi(t) + phi(t / alpha), alpha * 1e-9, 3.0, xtol=1e-14))


def evbmf(y: torch.Tensor | np.ndarray) -> VBMFResult:
    """Empirical VBMF of the matrix ``y`` (Nakajima et al., JMLR 2013).

    The answer does not depend on orientation (``y`` and its transpose agree). Degenerate
    input has a defined answer: an empty or all-zero matrix gives rank 0 and σ² = 0; a single
    row or column, or a 2×2 matrix, gives rank 0 (EVB keeps at most ⌈L/(1+α)⌉ − 1
    components); an exactly low-rank matrix gives its rank with σ² near 0; pure noise gives
    rank 0 (or rarely 1). Non-finite entries are a `RankSearchError`.
    """
    a = y.detach().cpu().double().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if a.ndim != 2:
        raise RankSearchError(f"evbmf takes a matrix, got an array of shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or not np.all(np.isfinite(a)):
        raise RankSearchError("evbmf needs a matrix of finite numbers")
    small, large = sorted(a.shape)
    if small == 0:
        return VBMFResult(0, 0.0, 0.0, ())
    return _evbmf(np.linalg.svd(a.astype(np.float64), compute_uv=False), small, large)


def _evbmf(s: np.ndarray, big_l: int, big_m: int) -> VBMFResult:
    """EVBMF from the L singular values ``s`` (descending) of an L×M matrix, L ≤ M."""
    scale = float(s[0])
    if scale == 0.0:
        return VBMFResult(0, 0.0, 0.0, ())
    s = s / scale  # solved at σ_1 = 1, so no magnitude overflows; σ² scales by σ_1²
    upper = float(np.sum(s**2)) / (big_l * big_m)
    alpha = big_l / big_m
    tb = tau_bar(alpha)
    x_bar = (1 + tb) * (1 + alpha / tb)
    # the largest rank EVB can return, and the σ² bounds it implies (NeurIPS 2012, Thm. 2)
    h_bar = math.ceil(big_l / (1 + alpha)) - 1  # < L, as L/(1+α) < L
    tail = s[h_bar:] ** 2
    lower = max(float(tail[0]) / (big_m * x_bar), float(tail.mean()) / big_m)
    g = (s / math.sqrt(upper)) ** 2 / big_m  # γ_h²/(M·σ²_upper): σ² is searched as a fraction

    def free_energy(t: float) -> float:  # t = log(σ²/σ²_upper), constants dropped
        x = g * math.exp(-t)
        big = x[x > x_bar]
        root = big - (1 + alpha)
        tau = 0.5 * (root + np.sqrt(np.maximum(root**2 - 4 * alpha, 0.0)))
        psi1 = np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau
        return float(np.sum(x) + big_l * t + np.sum(psi1))

    lo = math.log(max(min(lower / upper, 1.0), _FLOOR))
    if lo >= 0.0:
        t_best = 0.0
    else:
        probes = np.linspace(lo, 0.0, _GRID)
        values = [free_energy(t) for t in probes]
        i = int(np.argmin(values))
        left, right = probes[max(i - 1, 0)], probes[min(i + 1, _GRID - 1)]
        fit = minimize_scalar(free_energy, bounds=(left, right), method="bounded",
                              options={"xatol": 1e-10})
        t_best = float(fit.x) if fit.fun <= values[i] else float(probes[i])
    sigma2 = upper * math.exp(t_best)
    threshold = math.sqrt(big_m * sigma2 * x_bar)
    kept = s[s > threshold]
    q = 1 - (big_l + big_m) * sigma2 / kept**2
    shrunk = kept / 2 * (q + np.sqrt(np.maximum(q**2 - 4 * big_l * big_m * sigma2**2 / kept**4,
                                                0.0)))
    return VBMFResult(len(kept), sigma2 * scale**2, threshold * scale,
                      tuple(float(v) * scale for v in shrunk))


def unfold(weight: torch.Tensor, mode: int) -> torch.Tensor:
    """The mode-``mode`` unfolding: ``weight.shape[mode]`` rows, the other modes as columns
    (mode 0 of a conv kernel T×S×kh×kw: T × S·kh·kw; mode 1: S × T·kh·kw)."""
    if not -weight.dim() <= mode < weight.dim():
        raise RankSearchError(f"mode {mode} out of range for a tensor of shape "
                              f"{tuple(weight.shape)}")
    return weight.movedim(mode, 0).reshape(weight.shape[mode], -1)


def spectral_methods() -> list[str]:
    """The registered factorizations whose ranks are read off matrix spectra (those whose
    `Factorization.spectral` is set), in registry order."""
    return [name for name, fac in factorize.REGISTRY.items() if fac.spectral is not None]


def per_matrix(method: str) -> bool:
    """Whether ``method``'s rank has one component per matrix of `site_matrices` (tucker2);
    else it is one rank for all of them."""
    return factorize.get(method).spectral == "per_matrix"


def site_matrices(site: Site, weight: torch.Tensor, method: str) -> tuple[torch.Tensor, ...]:
    """The matrices (float64) whose spectra decide the rank of ``method`` on ``site``: its
    `Factorization.spectral_matrices`.

    svd: the weight as out × in·kh·kw (O × I for a linear layer); svd_spatial: the
    (S·kh) × (T·kw) matrix of Jaderberg et al.; tucker2: the in-channel (mode-1) and
    out-channel (mode-0) unfoldings, in the order of its rank (r_in, r_out); CP methods: the
    same two unfoldings, as a proxy (a CP rank has no matrix of its own). TT and TR ranks are
    not matrix ranks: `NotAdmittedError`.
    """
    fac = factorize.get(method)
    if fac.spectral is None:
        raise NotAdmittedError(
            f"{method!r} ranks are not read off a matrix spectrum; VBMF, error-bound and PCA "
            f"energy rank selection support {spectral_methods()}"
        )
    return fac.spectral_matrices(site, weight.detach().double())


def snap(grid: tuple[Rank, ...], rank: float | tuple[float, ...]) -> Rank:
    """The rank nearest ``rank`` from above that ``grid`` allows, component by component
    (``rank`` may be fractional).

    Each component becomes the smallest value that component takes in the grid at or above
    it (the grid's largest if none is), so it is at least the grid minimum. A tuple grid
    moves along one line, but a factorization accepts any tuple up to its maximum: the
    snapped components need not lie on that line.
    """
    if isinstance(grid[0], int):
        return _up(sorted(grid), float(rank))  # type: ignore[arg-type]
    wanted = rank if isinstance(rank, tuple) else (rank,) * len(grid[0])
    return tuple(
        _up(sorted({g[i] for g in grid}), float(r))  # type: ignore[index]
        for i, r in enumerate(wanted)  # type: ignore[arg-type]
    )


def _up(values: list[int], target: float) -> int:
    return next((v for v in values if v >= target - 1e-9), values[-1])


def site_vbmf_rank(
    site: Site, weight: torch.Tensor, method: str, grid: tuple[Rank, ...] | None = None
) -> Rank:
    """The EVBMF rank of ``method`` on ``site``: svd and svd_spatial from their matrix,
    tucker2 as (r_in, r_out) from the in- and out-channel unfoldings, CP methods the larger
    of those two. With ``grid`` (``space.ranks(site.name, method)``) it is snapped to the grid
    (see `snap`; at least the grid minimum). TT/TR: `NotAdmittedError`."""
    per_group = [tuple(evbmf(m).rank for m in matrices)
                 for matrices in group_matrices(site, weight, method)]
    ranks = tuple(max(r) for r in zip(*per_group, strict=True))  # every group must fit
    rank: Rank = ranks if per_matrix(method) else max(ranks)
    return rank if grid is None else snap(grid, rank)


def group_matrices(site: Site, weight: torch.Tensor, method: str
                   ) -> list[tuple[torch.Tensor, ...]]:
    """`site_matrices` of each group of a grouped convolution (one entry when groups is 1):
    a grouped site is factorized group by group, at one rank for every group."""
    g = site.groups
    if g == 1:
        return [site_matrices(site, weight, method)]
    if method not in GROUPED_METHODS:
        raise NotAdmittedError(f"{method!r} does not decompose grouped convolutions")
    one = replace(site, in_features=site.in_features // g, out_features=site.out_features // g,
                  groups=1)
    return [site_matrices(one, w, method) for w in weight.detach().chunk(g, dim=0)]


def site_spectra(site: Site, weight: torch.Tensor, method: str) -> tuple[torch.Tensor, ...]:
    """The singular values (descending, float64) of each matrix of `site_matrices`. For a
    grouped convolution, the root mean square over groups of each group's i-th singular
    value: truncating every group at rank r drops ``groups · Σ_{i>r} s_i²`` of energy, as a
    single matrix with spectrum ``s`` would."""
    spectra = [tuple(torch.linalg.svdvals(m) for m in matrices)
               for matrices in group_matrices(site, weight, method)]
    return tuple(torch.stack(per).pow(2).mean(0).sqrt() for per in zip(*spectra, strict=True))


def spectral_sites(space: RankSpace, method: str | None, who: str) -> dict[str, str]:
    """Site name → factorization for the sites whose rank a spectrum can decide: ``method``
    where a site admits it (each site's first method for None). The others stay dense; sites
    whose method has no matrix rank (TT/TR) are logged. Raises `RankSearchError` when no site
    is left."""
    sites = {}
    for site in space.decomposable:
        m = method_for(site, method)
        if m is None:
            continue
        if factorize.get(m).spectral is None:
            log.info("%s: %s stays dense (%s ranks are not matrix ranks)", who, site.name, m)
            continue
        sites[site.name] = m
    if not sites:
        raise RankSearchError(
            f"{who}: no layer can be ranked from its spectrum with method {method!r}; "
            f"use one of {spectral_methods()}"
        )
    return sites
