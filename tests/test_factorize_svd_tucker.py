"""svd, svd_spatial and tucker2: exactness, monotone error, exact costs, slicing, reloading."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from helpers import assert_reloads, built, rank_sweep, rel_error
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ranksearch.errors import InvalidRankError, NotAdmittedError
from ranksearch.factorize import dense_stage, get
from ranksearch.factorize.svd import truncated_svd
from ranksearch.site import Site

# name -> (layer factory, input shape without batch)
LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv3x3": (lambda: nn.Conv2d(6, 8, 3, padding=1), (6, 9, 9)),
    "conv3x5_stride21_nobias": (
        lambda: nn.Conv2d(5, 7, (3, 5), stride=(2, 1), padding=(1, 2), bias=False),
        (5, 10, 11),
    ),
    "conv_same_dil21": (lambda: nn.Conv2d(4, 6, 3, padding="same", dilation=(2, 1)), (4, 8, 7)),
    "conv_same_even_reflect": (
        lambda: nn.Conv2d(3, 5, (2, 4), padding="same", padding_mode="reflect"),
        (3, 7, 8),
    ),
    "conv_valid": (lambda: nn.Conv2d(4, 9, (3, 5), padding="valid"), (4, 9, 10)),
    "conv_reflect_stride21": (
        lambda: nn.Conv2d(4, 6, 3, stride=(2, 1), padding=1, padding_mode="reflect"),
        (4, 9, 8),
    ),
    "conv_circular_dil21": (
        lambda: nn.Conv2d(5, 6, (3, 5), padding=(2, 1), dilation=(2, 1),
                          padding_mode="circular", bias=False),
        (5, 8, 9),
    ),
    "conv1x1": (lambda: nn.Conv2d(8, 6, 1), (8, 5, 5)),
    "conv1x1_stride2": (lambda: nn.Conv2d(5, 9, 1, stride=2, bias=False), (5, 7, 6)),
    "linear2d": (lambda: nn.Linear(12, 9), (12,)),
    "linear3d_nobias": (lambda: nn.Linear(10, 14, bias=False), (5, 10)),
}
CONVS = [n for n in LAYERS if n.startswith("conv")]
CASES = (
    [("svd", n) for n in LAYERS]
    + [("svd_spatial", n) for n in CONVS if not n.startswith("conv1x1")]
    + [("tucker2", n) for n in CONVS]
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only cost time (a lot on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def traced_site(name: str, layer: nn.Module, x: torch.Tensor) -> Site:
    """The site of ``layer`` with the sizes seen on input ``x``."""
    with torch.no_grad():
        y = layer(x)
    if isinstance(layer, nn.Conv2d):
        return Site.from_module(name, layer, tuple(x.shape[-2:]), tuple(y.shape[-2:]))
    return Site.from_module(name, layer, tuple(x.shape[1:-1]), tuple(y.shape[1:-1]))


def setup(case: str, batch: int = 3):
    torch.manual_seed(0)
    make, shape = LAYERS[case]
    layer = make()
    x = torch.randn(batch, *shape)
    return layer, x, traced_site(case, layer, x)


@pytest.mark.parametrize(("method", "case"), CASES)
def test_exact_at_max_rank_and_error_falls_with_rank(method, case):
    layer, x, site = setup(case)
    fac = get(method)
    with torch.no_grad():
        ref = layer(x)
        errors = [rel_error(built(method, site, layer, r)(x), ref)
                  for r in rank_sweep(fac.max_rank(site))]
    assert errors[-1] < 1e-4
    assert errors[0] > 1e-2  # the smallest rank truncates something
    # Exact for channel SVD (orthogonal left vectors); for spatial SVD and Tucker-2 the output
    # error is not monotone for every input, but is by wide margins at these spaced ranks.
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(errors)), errors


@pytest.mark.parametrize(("method", "case"), CASES)
def test_closed_form_costs_match_built_module(method, case):
    _, x, site = setup(case, batch=2)
    fac = get(method)
    for rank in rank_sweep(fac.max_rank(site), steps=2):
        module = fac.build(site, rank)
        stages = fac.stages(site, rank)
        layers = list(module)
        assert all(isinstance(m, nn.Conv2d | nn.Linear) for m in layers)
        assert len(layers) == len(stages)
        h = x
        for m, stage in zip(layers, stages, strict=True):
            with FlopCounterMode(display=False) as fc, torch.no_grad():
                out = m(h)
            assert stage.params == sum(p.numel() for p in m.parameters())
            assert stage.bias == (0 if m.bias is None else m.bias.numel())
            assert stage.macs * 2 * 2 == fc.get_total_flops()
            assert (stage.inputs * 2, stage.outputs * 2) == (h.numel(), out.numel())
            h = out
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            module(x)
        assert fac.params(site, rank) == sum(p.numel() for p in module.parameters())
        assert fac.macs(site, rank) * 2 * 2 == fc.get_total_flops()


@pytest.mark.parametrize("case", list(LAYERS))
def test_dense_stage_matches_layer(case):
    layer, x, site = setup(case, batch=2)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        y = layer(x)
    dense = dense_stage(site)
    assert dense.params == sum(p.numel() for p in layer.parameters())
    assert dense.macs * 2 * 2 == fc.get_total_flops()
    assert (dense.inputs * 2, dense.outputs * 2) == (x.numel(), y.numel())


@pytest.mark.parametrize(("method", "case"), CASES)
def test_sliced_factors_equal_direct_decomposition(method, case):
    layer, x, site = setup(case)
    fac = get(method)
    top = fac.max_rank(site)
    rank = rank_sweep(top)[0]
    with torch.no_grad():
        sliced = built(method, site, layer, rank, factor_rank=top)(x)
        direct = built(method, site, layer, rank)(x)
    assert torch.equal(sliced, direct)


@pytest.mark.parametrize(("method", "case"), CASES)
def test_state_dict_reloads_into_bare_build(method, case):
    layer, x, site = setup(case)
    assert_reloads(method, site, layer, x, rank_sweep(get(method).max_rank(site))[1])


@pytest.mark.parametrize("method", ["svd", "svd_spatial", "tucker2"])
def test_module_follows_factor_dtype(method):
    layer, x, site = setup("conv3x5_stride21_nobias")
    fac = get(method)
    weight = layer.weight.detach().double()
    module = fac.build(site, fac.max_rank(site), fac.decompose(weight, site, fac.max_rank(site)))
    assert {p.dtype for p in module.parameters()} == {torch.float64}
    with torch.no_grad():
        assert rel_error(module(x.double()), layer.double()(x.double())) < 1e-10


def test_build_rejects_factors_of_lower_rank():
    layer, _, site = setup("conv3x3")
    fac = get("svd")
    with pytest.raises(InvalidRankError, match="fewer than"):
        fac.build(site, 4, fac.decompose(layer.weight.detach(), site, 2))


@pytest.mark.parametrize(
    ("method", "case", "rank"),
    [
        ("svd", "conv3x3", 0),
        ("svd", "linear2d", 10),  # max is 9
        ("svd", "linear2d", (2, 2)),
        ("svd_spatial", "conv3x3", 19),  # max is min(6·3, 8·3) = 18
        ("svd_spatial", "conv3x3", -1),
        ("tucker2", "conv3x3", (0, 2)),
        ("tucker2", "conv3x3", (7, 2)),  # r_in max is 6
        ("tucker2", "conv3x3", (2, 2, 2)),
        ("tucker2", "conv3x3", (2,)),
    ],
)
def test_invalid_ranks(method, case, rank):
    layer, _, site = setup(case)
    fac = get(method)
    for call in (
        lambda: fac.normalize_rank(site, rank),
        lambda: fac.stages(site, rank),
        lambda: fac.decompose(layer.weight.detach(), site, rank),
        lambda: fac.build(site, rank),
    ):
        with pytest.raises(InvalidRankError):
            call()


def test_max_ranks():
    sites = {case: setup(case)[2] for case in ("conv3x3", "conv3x5_stride21_nobias", "linear2d")}
    assert get("svd").max_rank(sites["conv3x3"]) == 8
    assert get("svd").max_rank(sites["linear2d"]) == 9
    assert get("svd_spatial").max_rank(sites["conv3x5_stride21_nobias"]) == 15  # min(5·3, 7·5)
    assert get("tucker2").max_rank(sites["conv3x3"]) == (6, 8)
    assert get("tucker2").normalize_rank(sites["conv3x3"], 3) == (3, 3)


@pytest.mark.parametrize(
    ("method", "module", "why"),
    [
        ("svd_spatial", nn.Conv2d(4, 4, 1), "1×1 convolution"),
        ("tucker2", nn.Linear(4, 4), "not linear"),
        ("svd", nn.Conv2d(4, 4, 3, groups=4), "depthwise"),  # nothing smaller exists
        ("svd_spatial", nn.Conv2d(4, 6, 3, groups=2), "grouped convolutions (groups=2)"),
        ("tucker2", nn.Conv2d(4, 4, 3, groups=4), "depthwise"),
    ],
)
def test_not_admitted(method, module, why):
    site = Site.from_module("layer", module)
    fac = get(method)
    assert why in fac.admits(site)
    with pytest.raises(NotAdmittedError):
        fac.check(site)
    with pytest.raises(NotAdmittedError):
        fac.normalize_rank(site, 1)


def test_admitted_sites():
    conv, linear = Site.from_module("c", nn.Conv2d(4, 6, 3)), Site.from_module("l", nn.Linear(4, 6))
    assert get("svd").admits(conv) is None and get("svd").admits(linear) is None
    assert get("svd_spatial").admits(conv) is None and get("tucker2").admits(conv) is None


def test_large_matrix_uses_seeded_lowrank_svd():
    torch.manual_seed(1)
    m, n, r = 2050, 2060, 12
    u = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64)).Q
    s = torch.linspace(10.0, 1.0, r, dtype=torch.float64)
    matrix = ((u * s) @ v.mT).float()
    state = torch.get_rng_state()
    first = truncated_svd(matrix, 8)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is kept
    torch.manual_seed(2)  # and does not change the result
    second = truncated_svd(matrix, 8)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    uu, ss, vh = first
    assert uu.shape == (m, 8) and ss.shape == (8,) and vh.shape == (8, n)
    assert torch.allclose(ss, s[:8], rtol=1e-5)
    assert torch.allclose(uu.mT @ uu, torch.eye(8, dtype=torch.float64), atol=1e-8)


def test_build_rejects_bias_for_site_without_one():
    layer, _, site = setup("linear3d_nobias")
    fac = get("svd")
    with pytest.raises(ValueError, match="bias"):
        fac.build(site, 2, fac.decompose(layer.weight.detach(), site, 2), torch.zeros(14))
