"""Bayesian TT ranks: MAP training with a low-rank prior on the TT rank slices.

Hawkins & Zhang, "Bayesian tensorized neural networks with automatic rank selection",
Neurocomputing 2021, and Hawkins, Liu & Zhang, "Towards compact neural networks via end-to-end
training: a Bayesian tensor approach with automatic rank determination", SIMODS 2022. Every
site that admits ``tt`` becomes a TT layer at its largest TT rank, initialized by TT-SVD of the
trained weights. Rank slice k of bond b (the k-th output slice of core b and the k-th input
slice of core b+1) has a Gaussian prior N(0, λ_{b,k}) on its entries, and its scale
s = √λ a sparsity prior: half-Cauchy(0, η) or log-uniform (p(s) ∝ 1/s). The network is
trained to the MAP estimate of cores and scales: the loss is the task's loss plus
``strength / N`` times the prior's negative log density (N training samples). For fixed cores
the scales have a closed-form optimum (Hawkins & Zhang's EM update of the rank parameters with
step 1), so they are profiled out at every step. Slices whose λ collapses below ``threshold``
times the largest λ their bond started with are pruned; the counts left are the ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice, pairwise

import torch
from torch import Tensor, nn

from ranksearch import factorize, options
from ranksearch.config import Choice, Config
from ranksearch.errors import RankSearchError
from ranksearch.site import Site
from ranksearch.space import RankSpace
from ranksearch.strategy import SearchContext, StopSearch, Strategy, Training

PRIORS = ("half_cauchy", "log_uniform")
TT = "tt"
WHO = "bayes_tt"  # the strategy named in option errors, also those of its settings
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prior:
    """The sparsity prior on the scale s = √λ of one rank slice: ``half_cauchy`` with scale
    ``eta``, or ``log_uniform``. A slice group holds ``d`` entries of squared norm ``m``."""

    kind: str = "half_cauchy"
    eta: float = 1.0

    def __post_init__(self) -> None:
        options.choice(self.kind, "prior", WHO, PRIORS)
        options.positive(self.eta, "eta", WHO)

    def variance(self, m: Tensor, d: int) -> Tensor:
        """The λ that minimizes `nll` for squared norms ``m`` (the MAP of the scale)."""
        if self.kind == "log_uniform":
            return m / (d + 1)
        # the positive root of (d+2)λ² + (dη² − m)λ − mη² = 0, without cancellation
        e2 = self.eta**2
        b = m - d * e2
        root = torch.sqrt(b * b + 4 * (d + 2) * m * e2)
        return torch.where(b > 0, (b + root) / (2 * (d + 2)), 2 * m * e2 / (root - b))

    def nll(self, m: Tensor, lam: Tensor, d: int) -> Tensor:
        """−log p(slice entries | λ) − log p(s), summed over the slices (constants dropped)."""
        lam = lam.clamp_min(torch.finfo(lam.dtype).tiny)
        gauss = 0.5 * d * torch.log(lam) + m / (2 * lam)
        scale = torch.log(self.eta**2 + lam) if self.kind == "half_cauchy" else 0.5 * lam.log()
        return (gauss + scale).sum()


def bonds(module: nn.Module, site: Site) -> list[tuple[Tensor, Tensor]]:
    """Views ``(left, right)`` of each bond's rank slices in a built TT module, both of shape
    (·, r_b, ·): slice k of the bond is ``left[:, k]`` and ``right[:, k]``."""
    if site.kind == "linear":  # TTLinear: core k is Linear(r_{k-1}·I_k → O_k·r_k)
        cores = [layer.weight for layer in module.cores]
        return [
            (a.view(a.shape[0] // r, r, -1), b.view(b.shape[0], r, -1))
            for a, b, r in zip(cores[:-1], cores[1:], module.ranks, strict=True)
        ]
    convs = [layer.weight for layer in module]  # Conv2d(r_{k-1} → r_k) ×4
    return [
        (a.view(1, a.shape[0], -1), b.view(b.shape[0], a.shape[0], -1)) for a, b in pairwise(convs)
    ]


def slice_norms(left: Tensor, right: Tensor) -> tuple[Tensor, int]:
    """Squared norm of each rank slice of a bond, and the entries per slice."""
    m = left.pow(2).sum((0, 2)) + right.pow(2).sum((0, 2))
    return m, left.shape[0] * left.shape[2] + right.shape[0] * right.shape[2]


def balance(module: nn.Module, site: Site) -> None:
    """Move each slice's scale so that its halves in both cores have equal norms (the gauge
    freedom of a TT bond); TT-SVD leaves all the weight in the last core."""
    with torch.no_grad():
        for left, right in bonds(module, site):
            a = left.pow(2).sum((0, 2)).sqrt()
            b = right.pow(2).sum((0, 2)).sqrt()
            ok = (a > 0) & (b > 0)
            c = torch.where(ok, (b / a.where(ok, 1)).sqrt(), 1)
            left.mul_(c[None, :, None])
            right.div_(c[None, :, None])


def top_ranks(space: RankSpace, max_rank: int | None = None) -> dict[str, tuple[int, ...]]:
    """The largest TT rank of every site that admits tt, each bond capped at ``max_rank``."""
    fac = factorize.get(TT)
    out = {}
    for site in space.decomposable:
        if TT in site.methods:
            top = fac.max_rank(site)
            out[site.name] = tuple(min(r, max_rank or r) for r in top)
    if not out:
        raise RankSearchError(
            "bayes_tt needs sites that admit 'tt', and the space offers none: discover the "
            "space with methods including 'tt' (e.g. methods=['svd', 'tt'], or --methods svd,tt)"
        )
    return out


@dataclass(frozen=True)
class MapSettings:
    """How `infer_ranks` trains: the ``prior``, ``steps`` Adam steps at ``lr`` on batches of
    ``batch_size``; slices whose λ falls below ``threshold`` times the largest λ their bond
    started with are pruned; every bond starts at its largest rank, or ``max_rank``."""

    prior: Prior = Prior()
    steps: int = 100
    lr: float = 1e-2
    batch_size: int = 64
    threshold: float = 1e-3
    max_rank: int | None = None

    def __post_init__(self) -> None:
        options.positive_int(self.steps, "steps", WHO)
        options.positive_int(self.batch_size, "batch_size", WHO)
        options.positive(self.lr, "lr", WHO)
        options.number_in(self.threshold, "threshold", WHO, 0.0, 1.0, open_low=True,
                          open_high=True)
        options.positive_int(self.max_rank, "max_rank", WHO, optional=True)


def infer_ranks(
    training: Training,
    space: RankSpace,
    strength: float,
    settings: MapSettings = MapSettings(),
    seed: int = 0,
) -> dict[str, tuple[int, ...]]:
    """The TT ranks the MAP estimate under the low-rank prior keeps, per site that admits tt.

    A compressed copy of the model (``training.build``) with every such site a TT layer at its
    largest rank (TT-SVD of its weight) is trained on the training batches with
    ``strength / N ·`` the prior's negative log density added to the task's loss, as
    ``settings`` say; the model itself is not modified. Each bond keeps the slices whose λ is still
    at least ``settings.threshold`` times the largest λ of the bond at the start (at least 1).
    Raises `RankSearchError` when the loss becomes non-finite.
    """
    s = settings
    tops = top_ranks(space, s.max_rank)
    device = training.device
    net = training.build(Config({n: Choice(TT, r) for n, r in tops.items()}))
    net.to(device).train()
    layers = [(net.get_submodule(name), space.site(name)) for name in tops]
    for module, site in layers:
        balance(module, site)
    start = [v.max() for v in bond_variances(layers, s.prior)]
    scale = strength / training.size
    optimizer = torch.optim.Adam(net.parameters(), lr=s.lr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for x, y in islice(training.batches(s.batch_size, seed), s.steps):
            loss = training.loss(net(x.to(device)), y.to(device))
            if scale:
                loss = loss + scale * prior_nll(layers, s.prior)
            if not torch.isfinite(loss):
                raise RankSearchError(
                    f"bayes_tt training diverged (loss {float(loss)}) at strength {strength}; "
                    "lower lr or the prior strength"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    kept = iter(
        [
            int((v >= s.threshold * top).sum())
            for v, top in zip(bond_variances(layers, s.prior), start, strict=True)
        ]
    )
    return {name: tuple(max(1, next(kept)) for _ in top) for name, top in tops.items()}


def bond_variances(layers: Sequence[tuple[nn.Module, Site]], prior: Prior) -> list[Tensor]:
    """The MAP variance λ of every rank slice, one tensor per bond, in site and bond order."""
    with torch.no_grad():
        return [
            prior.variance(*slice_norms(left, right))
            for module, site in layers
            for left, right in bonds(module, site)
        ]


def prior_nll(layers: Sequence[tuple[nn.Module, Site]], prior: Prior) -> Tensor:
    """The prior's negative log density over every bond of the TT ``layers``, at the profiled
    scales: λ is set to its closed-form optimum for the current cores and held fixed, so the
    gradient is that of the joint MAP objective (the envelope theorem)."""
    terms = []
    for module, site in layers:
        for left, right in bonds(module, site):
            m, d = slice_norms(left, right)
            with torch.no_grad():
                lam = prior.variance(m, d)
            terms.append(prior.nll(m, lam, d))
    return torch.stack(terms).sum()


def grid_rank(space: RankSpace, name: str, ranks: Sequence[int]) -> tuple[int, ...]:
    """The smallest rank of the site's tt grid that is at least ``ranks`` in every bond."""
    for rank in space.ranks(name, TT):
        if all(g >= r for g, r in zip(rank, ranks, strict=True)):
            return rank
    return space.ranks(name, TT)[-1]


class BayesTT(Strategy):
    """Bayesian TT rank determination (Hawkins & Zhang 2021), swept over the prior strength.

    For each strength in ``strengths`` (weakest first) the ranks inferred by `infer_ranks`,
    each rounded up to the site's rank grid, are proposed once; the search's evaluator scores
    them like any other config. A config that breaks a cost constraint is scaled down rather
    than skipped: every inferred rank times one factor, the largest that fits (bisection), so
    the prior's allocation across sites and bonds is kept. A strength whose training diverges,
    or whose config cannot fit even at rank 1, is skipped with a warning. Options: ``prior``
    (``half_cauchy`` or ``log_uniform``), ``eta`` (the half-Cauchy scale), and the
    `MapSettings` ``steps``, ``lr``, ``batch_size``, ``threshold`` and ``max_rank``. Training
    is seeded from the search's generator, so a re-run proposes the same configs and resumes
    (retraining to get there).
    """

    name = "bayes_tt"
    description = "Bayesian TT ranks: MAP training with a sparsity prior, swept over its strength"

    def __init__(
        self,
        strengths: Sequence[float] = (0.003, 0.01, 0.03, 0.1),
        prior: str = "half_cauchy",
        eta: float = 1.0,
        steps: int = 100,
        lr: float = 1e-2,
        batch_size: int = 64,
        threshold: float = 1e-3,
        max_rank: int | None = None,
    ) -> None:
        self.strengths = sorted(options.values_in(strengths, "strengths", self.name, 0.0,
                                                  optional=False))  # type: ignore[arg-type]
        self.settings = MapSettings(Prior(prior, eta), steps, lr, batch_size, threshold, max_rank)

    def setup(self, ctx: SearchContext) -> None:
        super().setup(ctx)
        top_ranks(ctx.space, self.settings.max_rank)  # fail early without tt sites
        if ctx.training is None:
            raise RankSearchError(
                "bayes_tt trains on the task's data (SearchContext.training); run it through "
                "ranksearch.search"
            )
        seeds = ctx.rng.integers(2**31, size=len(self.strengths))
        self._queue = [(s, int(seed)) for s, seed in zip(self.strengths, seeds, strict=True)]
        self._seen: set[Config] = set()

    def ask(self) -> list[Config]:
        while self._queue:
            strength, seed = self._queue.pop(0)
            try:
                config = self.propose(strength, seed)
            except RankSearchError as e:
                log.warning("bayes_tt: strength %g skipped: %s", strength, e)
                continue
            if config not in self._seen:
                self._seen.add(config)
                return [config]
        raise StopSearch

    def propose(self, strength: float, seed: int) -> Config:
        """The inferred config at ``strength`` (each rank rounded up to its grid), brought
        within the budget by `SearchContext.repair` if it breaks it."""
        space = self.ctx.space
        ranks = infer_ranks(self.ctx.training, space, strength, self.settings, seed=seed)
        config = self.ctx.repair(Config({name: Choice(TT, grid_rank(space, name, r))
                                         for name, r in ranks.items()}))
        if not self.ctx.feasible(config):
            raise RankSearchError("even rank 1 in every tt bond breaks the budget")
        return config
