import itertools
import math

import numpy as np
import pytest
import torch
from helpers import proposals
from ranksearch_strategies.vbmf import VBMF
from torch import nn

import ranksearch
from ranksearch.cache import FactorCache
from ranksearch.config import Choice, Config
from ranksearch.constraints import parse_constraints
from ranksearch.cost import CostModel
from ranksearch.errors import NotAdmittedError, RankSearchError
from ranksearch.evaluate import ProxySettings
from ranksearch.factorize import get
from ranksearch.pareto import parse_objectives
from ranksearch.space import RankSpace
from ranksearch.strategy import SearchContext, load_strategy
from ranksearch.vbmf import evbmf, site_matrices, site_vbmf_rank, snap, tau_bar, unfold

ZERO_SHOT = ProxySettings(steps=0, eval_batches=2)


def planted(rng, rows, cols, rank, sigma):
    """Orthonormal rank-``rank`` signal with singular values 3..6·σ·√max + Gaussian noise."""
    u = np.linalg.qr(rng.standard_normal((rows, rank)))[0]
    v = np.linalg.qr(rng.standard_normal((cols, rank)))[0]
    strength = np.linspace(6, 3, rank) * sigma * math.sqrt(max(rows, cols))
    return u @ np.diag(strength) @ v.T + sigma * rng.standard_normal((rows, cols))


# -- numerics -------------------------------------------------------------------------------
def test_tau_bar_solves_its_equation():
    def phi(z):
        return math.log1p(z) / z - 0.5

    assert tau_bar(1.0) == pytest.approx(2.5129, abs=1e-4)
    for alpha in (0.01, 0.1, 0.37, 1.0):
        t = tau_bar(alpha)
        assert abs(phi(t) + phi(t / alpha)) < 1e-10
        assert t == pytest.approx(2.5129 * math.sqrt(alpha), rel=0.15)  # the known approximation


@pytest.mark.parametrize(("rows", "cols", "rank", "sigma"), [
    (40, 100, 3, 1.0), (100, 40, 3, 1.0), (60, 150, 8, 0.1), (150, 60, 1, 2.0),
    (70, 70, 5, 1.0), (64, 1024, 12, 0.01),
])
def test_recovers_planted_rank_and_noise(rows, cols, rank, sigma):
    y = planted(np.random.default_rng(rows + cols), rows, cols, rank, sigma)
    r = evbmf(y)
    assert r.rank == rank
    assert r.sigma2 == pytest.approx(sigma**2, rel=0.1)
    s = np.linalg.svd(y, compute_uv=False)
    small, large = sorted(y.shape)
    alpha, t = small / large, tau_bar(small / large)
    assert r.threshold == pytest.approx(math.sqrt(large * r.sigma2 * (1 + t) * (1 + alpha / t)))
    assert r.rank == int(np.sum(s > r.threshold))
    assert len(r.shrunk) == rank and all(0 < a < b for a, b in zip(r.shrunk, s, strict=False))
    flipped = evbmf(torch.from_numpy(y.T.copy()))
    assert flipped.rank == r.rank and flipped.sigma2 == pytest.approx(r.sigma2, rel=1e-6)
    tiny = evbmf(y * 1e-6)
    assert tiny.rank == rank and tiny.sigma2 == pytest.approx(r.sigma2 * 1e-12, rel=1e-6)


def free_energy(sigma2, s, rows, cols):
    """The EVB free energy as a function of σ² (NeurIPS 2012 form, written independently)."""
    alpha, t = rows / cols, tau_bar(rows / cols)
    x = s**2 / (cols * sigma2)
    big = x[x > (1 + t) * (1 + alpha / t)]
    tau = 0.5 * (big - (1 + alpha) + np.sqrt((big - (1 + alpha)) ** 2 - 4 * alpha))
    psi1 = np.log(tau + 1) + alpha * np.log(tau / alpha + 1) - tau
    return float(np.sum(x - np.log(x)) + np.sum(psi1))


@pytest.mark.parametrize(("draw", "rank", "sigma2"), [(7, 0, 1.1233), (13, 8, 1.0962)])
def test_finds_the_global_minimum_of_the_free_energy(draw, rank, sigma2):
    """Cases where a bounded Brent search alone (the usual reference code) stops in a local
    minimum (σ² ≈ 1.094, rank 1 and σ² ≈ 1.175, rank 7)."""
    rng = np.random.default_rng(1)
    for _ in range(draw + 1):
        rows = int(rng.integers(5, 80))
        cols, k = int(rng.integers(rows, 200)), int(rng.integers(1, max(2, rows // 3)))
        y = (rng.standard_normal((rows, k)) @ rng.standard_normal((k, cols))
             * rng.uniform(0.05, 0.6) + rng.standard_normal((rows, cols)))
    r = evbmf(y)
    assert r.rank == rank and r.sigma2 == pytest.approx(sigma2, rel=1e-3)
    s = np.linalg.svd(y, compute_uv=False)
    grid = np.linspace(0.5, np.sum(s**2) / y.size, 2000)
    best = min(free_energy(g, s, *y.shape) for g in grid)
    assert free_energy(r.sigma2, s, *y.shape) <= best + 1e-9


@pytest.mark.parametrize(("matrix", "rank"), [
    (np.zeros((5, 7)), 0),
    (np.zeros((0, 4)), 0),
    (np.ones((1, 1)), 0),
    (np.random.default_rng(0).standard_normal((1, 30)), 0),
    (np.random.default_rng(0).standard_normal((30, 1)), 0),
    (np.full((6, 9), 3.0), 1),
    (np.outer(np.arange(1.0, 21), np.arange(1.0, 31)), 1),
])
def test_degenerate_inputs_have_defined_answers(matrix, rank):
    r = evbmf(matrix)
    assert r.rank == rank and len(r.shrunk) == rank
    assert math.isfinite(r.sigma2) and r.sigma2 >= 0
    if not matrix.any():
        assert r.sigma2 == 0.0
    if rank:  # exactly low rank: the noise estimate collapses towards 0
        assert r.sigma2 < 1e-9 * np.sum(matrix**2) / matrix.size


@pytest.mark.parametrize("shape", [(50, 100), (100, 100), (120, 40)])
def test_pure_noise_gives_rank_at_most_one(shape):
    r = evbmf(np.random.default_rng(7).standard_normal(shape))
    assert r.rank <= 1 and r.sigma2 == pytest.approx(1.0, rel=0.1)


def test_bad_input_is_a_clear_error():
    with pytest.raises(RankSearchError, match="finite"):
        evbmf(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(RankSearchError, match="matrix"):
        evbmf(np.zeros((2, 3, 4)))
    with pytest.raises(RankSearchError, match="mode"):
        unfold(torch.zeros(2, 3), 2)


def test_unfold_and_snap():
    w = torch.arange(2 * 3 * 4 * 5, dtype=torch.float64).reshape(2, 3, 4, 5)
    m1 = unfold(w, 1)
    assert m1.shape == (3, 40) and torch.equal(m1[1], w[:, 1].reshape(-1))
    assert torch.equal(unfold(w, 0), w.reshape(2, -1))
    assert [snap((1, 5, 9), r) for r in (0, 1, 4, 5.5, 9, 40)] == [1, 1, 5, 9, 9, 9]
    grid = ((1, 2), (2, 4), (3, 6))
    assert snap(grid, (0, 5)) == (1, 6) and snap(grid, 2.5) == (3, 4)


# -- the strategy on the digits model ------------------------------------------------------
@pytest.fixture(scope="module")
def parts(digits_model, digits):
    space = RankSpace.discover(digits_model, digits.example_input())
    return space, CostModel(space), FactorCache(digits_model, space)


def context(parts, constraints=()):
    space, costs, cache = parts
    return SearchContext(space=space, costs=costs, cache=cache,
                         constraints=parse_constraints(constraints),
                         objectives=parse_objectives(("accuracy", "flops")),
                         rng=np.random.default_rng(0), evaluations=12)


def vbmf_config(strategy, space):
    return Config({n: Choice(space.site(n).methods[0], r) for n, r in strategy.ranks.items()})


def test_one_shot_ranks_are_evbmf_of_the_unfoldings(parts, digits_model):
    space = parts[0]
    strategy = VBMF(one_shot=True)
    strategy.setup(context(parts))
    (config,) = proposals(strategy)
    raw = {}
    for site in space.decomposable:
        w = digits_model.get_submodule(site.name).weight.detach()
        if site.kind == "linear":
            ranks = evbmf(w).rank
            expected = min(max(ranks, 1), min(w.shape))
        else:
            ranks = (evbmf(unfold(w, 1)).rank, evbmf(unfold(w, 0)).rank)
            top = space.ranks(site.name, "tucker2")[-1]
            expected = tuple(min(max(r, 1), t) for r, t in zip(ranks, top, strict=True))
        raw[site.name] = ranks
        assert config[site.name].rank == expected, site.name
    assert raw["classifier.1"] > 1 and raw["features.7"][0] > 1  # not just the grid minimum
    assert strategy.ranks == {name: config[name].rank for name in config}


def test_site_vbmf_rank_methods(parts, digits_model):
    space = parts[0]
    conv = space.site("features.7")
    w = digits_model.get_submodule("features.7").weight.detach()
    t2 = site_vbmf_rank(conv, w, "tucker2")
    assert site_vbmf_rank(conv, w, "cp3") == max(t2)
    assert site_vbmf_rank(conv, w, "svd") == evbmf(w.reshape(64, -1)).rank == t2[1]
    spatial = evbmf(w.permute(1, 2, 0, 3).reshape(32 * 3, 64 * 3)).rank
    assert site_vbmf_rank(conv, w, "svd_spatial") == spatial
    assert [m.shape for m in site_matrices(conv, w, "cp4")] == [(32, 576), (64, 288)]
    with pytest.raises(NotAdmittedError, match="tt"):
        site_vbmf_rank(conv, w, "tt")


def test_weakening_sweep_is_monotone_from_below_vbmf_to_full(parts):
    space, costs, _ = parts
    strategy = VBMF()
    strategy.setup(context(parts))
    configs = [strategy.make(w) for w in np.linspace(-1, 1, 41)]
    flops = [costs.metrics(c)["flops"] for c in configs]
    params = [costs.metrics(c)["params"] for c in configs]
    assert flops == sorted(flops) and params == sorted(params) and flops[0] < flops[-1]
    # w = 1 puts every site at the top of its grid: its full rank, or short of it where full
    # rank would cost as much as the dense layer (here it does: the full ranks cost more than
    # the dense model)
    top = Config({n: Choice(m, space.ranks(n, m)[-1])
                  for n in space.names for m in space.site(n).methods[:1]})
    assert configs[-1] == top
    dense = costs.metrics(Config())["flops"]
    assert flops[-1] < dense < costs.metrics(space.full())["flops"]
    assert configs[20] == vbmf_config(strategy, space)
    assert all(c.rank == space.ranks(n, c.method)[0] for n, c in configs[0].items())
    swept = proposals(strategy)
    assert len(swept) == 12 and swept[0] == top and swept[-1] == configs[20]
    cost = [costs.metrics(c)["flops"] for c in swept]
    assert all(a > b for a, b in itertools.pairwise(cost))


@pytest.mark.parametrize("budget", ["flops<=0.3", "params<=0.4", "flops<=0.02"])
def test_budget_is_met(parts, budget):
    costs = parts[1]
    (con,) = parse_constraints([budget])
    ctx = context(parts, [budget])
    sweep, shot = VBMF(), VBMF(one_shot=True)
    sweep.setup(ctx)
    shot.setup(ctx)
    configs, (single,) = proposals(sweep), proposals(shot)
    assert configs and all(con.satisfied(costs.metrics(c)) for c in configs)
    assert con.satisfied(costs.metrics(single))
    vbmf = vbmf_config(sweep, parts[0])

    def best_on(knobs):  # the largest cost of a config on a grid of knobs that meets the budget
        return max(m[con.key] for w in knobs
                   if con.satisfied(m := costs.metrics(sweep.make(float(w)))))

    if budget == "flops<=0.02":  # below the VBMF ranks' 0.034: the knob goes below VBMF
        assert not con.satisfied(costs.metrics(vbmf)) and single != vbmf
        assert all(np.all(np.array(single[n].rank) <= np.array(r)) for n, r in sweep.ranks.items())
        assert costs.metrics(single)[con.key] >= best_on(np.linspace(-1, 0, 101))
    else:  # the VBMF ranks fit: one-shot proposes them
        assert single == vbmf
    assert costs.metrics(configs[0])[con.key] >= best_on(np.linspace(-1, 1, 201))


def test_bad_options_are_clear_errors():
    for options, match in [({"one_shot": "yes"}, "one_shot"), ({"method": "tt"}, "matrix"),
                           ({"method": "nope"}, "unknown factorization"),
                           ({"points": [2.0]}, "weakening"), ({"points": 0.5}, "weakening"),
                           ({"points": []}, "weakening"), ({"count": 0}, "count")]:
        with pytest.raises(RankSearchError, match=match):
            load_strategy("vbmf", options)


def test_end_to_end_search(digits_model, digits, tmp_path):
    result = ranksearch.search(digits_model, digits, strategy="vbmf", evaluations=4,
                               proxy=ZERO_SHOT, out=str(tmp_path), constraints=["flops<=0.5"])
    assert len(result.results) == 4 and all(r.ok for r in result.results)
    assert all(r.metrics["flops_ratio"] <= 0.5 for r in result.results)
    assert result.front()
    shot = ranksearch.search(digits_model, digits, strategy="vbmf", evaluations=4,
                             strategy_options={"one_shot": True, "refine": False}, proxy=ZERO_SHOT,
                             out=str(tmp_path / "shot"))
    assert len(shot.results) == 1 and shot.stopped == "strategy finished" and shot.front()


def test_grouped_spectra_pool_the_groups_and_rank_per_group():
    from ranksearch.vbmf import group_matrices, site_spectra

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, groups=4)
    space = RankSpace.discover(nn.Sequential(conv), torch.zeros(1, 8, 6, 6),
                               methods=["svd", "tucker2"])
    site = space.site("0")
    per_group = [torch.linalg.svdvals(m[0]) for m in group_matrices(site, conv.weight, "svd")]
    (pooled,) = site_spectra(site, conv.weight, "svd")
    assert len(pooled) == get("svd").max_rank(site) == 3
    for r in range(len(pooled)):  # truncating every group at r drops groups × the pooled tail
        dropped = sum(float((s[r:] ** 2).sum()) for s in per_group)
        assert 4 * float((pooled[r:] ** 2).sum()) == pytest.approx(dropped, rel=1e-12)
    rank = site_vbmf_rank(site, conv.weight, "tucker2", space.ranks("0", "tucker2"))
    assert all(1 <= r <= t for r, t in zip(rank, get("tucker2").max_rank(site), strict=True))


# -- capabilities read from the registry ----------------------------------------------------
@pytest.fixture
def throwaway():
    """Three factorizations registered for one test only: copies of svd and tucker2 under
    other names (their `spectral` inherited), and an svd copy without a spectral view."""
    from ranksearch import factorize
    from ranksearch.factorize.svd import SVD
    from ranksearch.factorize.tucker import Tucker2

    class SVDCopy(SVD):
        name = "svd_copy"

    class Tucker2Copy(Tucker2):
        name = "tucker2_copy"

    class NoSpectrum(SVD):
        name = "svd_no_spectrum"
        spectral = None

    added = [SVDCopy, Tucker2Copy, NoSpectrum]
    assert not {c.name for c in added} & set(factorize.REGISTRY)
    for cls in added:
        factorize.register(cls)
    try:
        yield {"svd": "svd_copy", "tucker2": "tucker2_copy"}
    finally:
        for cls in added:
            factorize.REGISTRY.pop(cls.name, None)


def test_spectral_capabilities_are_declared_by_the_factorizations():
    from ranksearch import factorize
    from ranksearch.vbmf import per_matrix, spectral_methods

    declared = {name: fac.spectral for name, fac in factorize.REGISTRY.items()}
    assert declared == {"svd": "single", "svd_spatial": "single", "tucker2": "per_matrix",
                        "cp3": "shared", "cp4": "shared", "cp3_tpm": "shared",
                        "cp4_tpm": "shared", "tt": None, "tr": None}
    assert set(spectral_methods()) == {n for n, s in declared.items() if s is not None}
    assert per_matrix("tucker2") and not per_matrix("svd") and not per_matrix("cp3")
    nested = {name for name, fac in factorize.REGISTRY.items() if fac.nested}
    assert nested == {"svd", "svd_spatial", "tucker2", "cp3_tpm", "cp4_tpm"}
    assert all(fac.nested for fac in factorize.REGISTRY.values() if fac.sliceable)


def test_tpm_components_are_nested():
    """The first r components of a rank-R tensor-power-method fit are the rank-r fit."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, 3)
    space = RankSpace.discover(nn.Sequential(conv), torch.zeros(1, 4, 6, 6),
                               methods=["cp3_tpm", "cp4_tpm"])
    for method in ("cp3_tpm", "cp4_tpm"):
        fac, site = get(method), space.site("0")
        small = fac.decompose(conv.weight.detach(), site, 3)
        large = fac.decompose(conv.weight.detach(), site, 6)
        for key, factor in small.items():
            torch.testing.assert_close(large[key][:, :3], factor, rtol=1e-6, atol=1e-7)


def test_a_registered_factorization_is_used_without_edits(throwaway):
    """VBMF, error bound and PCA energy read ranks for any factorization that declares a
    spectral view, and refuse one that does not, with nothing edited but the registry."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 10))
    x = torch.zeros(1, 3, 6, 6)

    def run(strategy, methods):
        space = RankSpace.discover(model, x, methods=methods)
        strategy.setup(context((space, CostModel(space), FactorCache(model, space)),
                               ["flops<=0.5"]))
        return proposals(strategy)

    def renamed(config):
        return Config({n: Choice(throwaway.get(c.method, c.method), c.rank)
                       for n, c in config.items()})

    for name in ("vbmf", "errorbound", "pca_energy"):
        ours = run(load_strategy(name), ["tucker2_copy", "svd_copy"])
        theirs = run(load_strategy(name), ["tucker2", "svd"])
        assert ours and ours == [renamed(c) for c in theirs], name
        assert {c.method for config in ours for c in config.values()} == {"tucker2_copy",
                                                                          "svd_copy"}
        assert load_strategy(name, {"method": "svd_copy"}).method == "svd_copy"
        with pytest.raises(ranksearch.OptionError, match="matrix"):
            load_strategy(name, {"method": "svd_no_spectrum"})
        with pytest.raises(RankSearchError, match="spectrum"):
            run(load_strategy(name), ["svd_no_spectrum"])
    site = RankSpace.discover(model, x, methods=["tucker2_copy"]).site("0")
    w = model[0].weight.detach()
    assert site_vbmf_rank(site, w, "tucker2_copy") == site_vbmf_rank(site, w, "tucker2")
    with pytest.raises(NotAdmittedError, match="svd_no_spectrum"):
        site_matrices(site, w, "svd_no_spectrum")
