"""A cache-built candidate is the fresh build, bit for bit; maximal ranks are exact when claimed.

`FactorCache` decomposes sliceable factorizations once at their maximal rank and slices; a
fresh build (``ranksearch.compress`` without a cache, as export uses) decomposes at the rank
itself. Both must give identical modules for every registered factorization.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ranksearch import factorize
from ranksearch.cache import FactorCache
from ranksearch.config import Choice
from ranksearch.factorize import REGISTRY, available
from ranksearch.space import RankSpace


def make_model(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 5, 3, padding=1),
        nn.Conv2d(5, 6, (3, 5), stride=(2, 1), padding=(1, 2), bias=False),
        nn.Conv2d(12, 10, 1),  # reached through the reshape below
        nn.Flatten(),
        nn.Linear(10 * 2 * 3, 24),
        nn.Linear(24, 30, bias=False),
    ).to(dtype)


class Net(nn.Module):
    """The layers of `make_model` in a forward pass that reaches all of them."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.layers = make_model(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c, flat, d, e = self.layers
        y = b(a(x))  # (N, 6, 2, 6)
        y = c(y.reshape(y.shape[0], 12, 2, 3))
        return e(d(flat(y)))


def same_module(built: nn.Module, fresh: nn.Module) -> bool:
    """Equal types, and torch.equal on every parameter and buffer."""
    a, b = built.state_dict(), fresh.state_dict()
    same = type(built) is type(fresh) and a.keys() == b.keys()
    return same and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def fresh_build(model: nn.Module, name: str, site, method: str, rank) -> nn.Module:
    fac = factorize.get(method)
    layer = model.get_submodule(name)
    bias = None if layer.bias is None else layer.bias.detach()
    return fac.build(site, rank, fac.decompose(layer.weight.detach(), site, rank), bias)


def probe_ranks(grid: tuple, method: str) -> list:
    """Ranks in the order a search might ask: the largest first, then smaller ones, then one
    larger again. CP fits (ALS) stay in the lower part of the grid, to keep the test fast."""
    if not factorize.get(method).sliceable and method.startswith("cp"):
        grid = grid[: max(3, len(grid) // 3)]
    return list(dict.fromkeys([grid[-1], grid[len(grid) // 2], grid[0], grid[1], grid[-2]]))


@pytest.fixture(scope="module", params=[torch.float32, torch.float64], ids=["f32", "f64"])
def setup(request):
    model = Net(request.param).eval()
    x = torch.randn(1, 4, 3, 6, dtype=request.param)
    return model, RankSpace.discover(model, x, methods=available())


def test_every_registered_method_is_probed(setup):
    _, space = setup
    probed = {m for site in space.decomposable for m in site.methods}
    assert probed == set(REGISTRY)


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_cache_build_equals_fresh_build(setup, method):
    model, space = setup
    cache = FactorCache(model, space)
    sites = [s for s in space.decomposable if method in s.methods]
    assert sites
    for site in sites:
        for rank in probe_ranks(space.ranks(site.name, method), method):
            cached = cache.build(site.name, Choice(method, rank))
            fresh = fresh_build(model, site.name, site, method, rank)
            assert same_module(cached, fresh), (site.name, method, rank)
            fac = factorize.get(method)
            layer = model.get_submodule(site.name)
            factors = fac.decompose(layer.weight.detach(), site, rank)
            held = cache.factors(site.name, method, rank)
            assert held.keys() == factors.keys()
            assert all(torch.equal(held[k], factors[k]) for k in factors), (site.name, rank)
    runs = set(cache.decompositions[(s.name, method)] for s in sites)
    if factorize.get(method).sliceable:
        assert runs == {1}  # one decomposition per site, every rank sliced from it


@pytest.mark.parametrize("method", [m for m, f in REGISTRY.items() if f.sliceable])
def test_slice_of_the_maximal_factors_is_the_decomposition(setup, method):
    model, space = setup
    fac = factorize.get(method)
    for site in (s for s in space.decomposable if method in s.methods):
        weight = model.get_submodule(site.name).weight.detach()
        top = fac.decompose(weight, site, fac.max_rank(site))
        for rank in space.ranks(site.name, method)[::3]:
            cut, direct = fac.slice(top, site, rank), fac.decompose(weight, site, rank)
            assert all(torch.equal(cut[k], direct[k]) for k in direct), (site.name, rank)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_grouped_conv_cache_build_equals_fresh_build(dtype):
    # grouped factors carry a leading group dim; slicing cuts the rank dims from the end
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 12, 3, groups=2, padding=1)).to(dtype)
    space = RankSpace.discover(model, torch.zeros(1, 8, 5, 5, dtype=dtype), methods=available())
    methods = space.site("0").methods
    if not methods:
        pytest.skip(f"grouped convolutions are not decomposable: {space.site('0').reason}")
    cache = FactorCache(model, space)
    for method in methods:
        for rank in probe_ranks(space.ranks("0", method), method):
            fresh = fresh_build(model, "0", space.site("0"), method, rank)
            assert same_module(cache.build("0", Choice(method, rank)), fresh), (method, rank)


def test_tt_cache_fits_like_a_fresh_tt_svd():
    # the reported case: a 10×64 linear at tt rank (1, 1), after the cache built the largest
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64, bias=False))
    x = torch.randn(256, 10)
    space = RankSpace.discover(model, x[:1], methods=["tt"])
    cache = FactorCache(model, space)
    cache.build("0", Choice("tt", space.ranks("0", "tt")[-1]))
    site = space.site("0")
    with torch.no_grad():
        cached = cache.build("0", Choice("tt", (1, 1)))(x)
        fresh = fresh_build(model, "0", site, "tt", (1, 1))(x)
    assert torch.equal(cached, fresh)


@pytest.mark.slow
def test_large_svd_is_the_same_with_and_without_the_cache():
    # both sides above 2048: a decomposition at a small rank alone could take the randomized
    # SVD, the cache's at the maximal rank the full one
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2080, 2050))
    space = RankSpace.discover(model, torch.zeros(1, 2080), methods=["svd"])
    cache = FactorCache(model, space)
    site = space.site("0")
    for rank in (8, 100):
        fresh = fresh_build(model, "0", site, "svd", rank)
        assert same_module(cache.build("0", Choice("svd", rank)), fresh), rank


# -- maximal ranks -------------------------------------------------------------------------------
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def layer_inputs(model: nn.Module, x: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """The input each named layer sees in ``model(x)``."""
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            inputs[name] = args[0]
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return inputs


@pytest.mark.parametrize("method", [m for m, f in REGISTRY.items() if f.exact_at_max])
def test_exact_methods_reproduce_the_layer_at_max_rank(method):
    model = Net(torch.float32).eval()
    x = torch.randn(3, 4, 3, 6)
    space = RankSpace.discover(model, x[:1], methods=[method])
    fac = factorize.get(method)
    inputs = layer_inputs(model, x, space.names)
    assert space.names
    for name in space.names:
        site, layer = space.site(name), model.get_submodule(name)
        module = fresh_build(model, name, site, method, fac.max_rank(site))
        with torch.no_grad():
            assert rel_err(module(inputs[name]), layer(inputs[name])) < 1e-5, name


def test_exactness_flags():
    flags = {m: f.exact_at_max for m, f in REGISTRY.items()}
    assert all(isinstance(v, bool) for v in flags.values())
    assert {m for m, v in flags.items() if not v} == {"cp3", "cp4", "cp3_tpm", "cp4_tpm"}
    assert not any(f.sliceable for f in REGISTRY.values() if not f.exact_at_max)


@pytest.mark.parametrize("method", ["cp4", "cp3_tpm", "cp4_tpm"])
def test_cp_is_not_exact_at_its_maximal_rank(method):
    # why exact_at_max is False for CP: the fit at the maximal rank leaves a visible error
    torch.manual_seed(6)
    conv = nn.Conv2d(6, 6, (3, 5), padding=1)
    x = torch.randn(2, 6, 8, 8)
    space = RankSpace.discover(conv, x[:1], methods=[method])
    site = space.site("")
    module = fresh_build(conv, "", site, method, factorize.get(method).max_rank(site))
    with torch.no_grad():
        assert rel_err(module(x), conv(x)) > 1e-2
