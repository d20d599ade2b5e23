"""svd and tucker2 on grouped and depthwise convolutions: decomposed group by group.

Checked against references computed here: per-group truncated SVD / HOSVD of the weight run
through ``F.conv2d(..., groups=g)``, parameter counts of the built modules, and MACs from
`FlopCounterMode`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_reloads, built, rank_sweep, rel_error
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ranksearch.cache import FactorCache
from ranksearch.config import Choice, Config
from ranksearch.cost import CostModel
from ranksearch.errors import DecompositionError, InvalidRankError, NotAdmittedError
from ranksearch.factorize import dense_stage, get
from ranksearch.site import Site
from ranksearch.space import RankSpace
from ranksearch.surgery import compress


def ranks3(top):
    return rank_sweep(top, steps=3)


# name -> (layer factory, input shape without batch)
LAYERS = {
    "groups4": (lambda: nn.Conv2d(8, 12, 3, padding=1, groups=4), (8, 7, 7)),
    "groups2_stride_dil_nobias": (
        lambda: nn.Conv2d(6, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                          groups=2, bias=False),
        (6, 9, 10),
    ),
    "groups3_reflect": (
        lambda: nn.Conv2d(6, 9, 3, padding=1, padding_mode="reflect", groups=3), (6, 6, 6)
    ),
    "groups2_1x1": (lambda: nn.Conv2d(8, 6, 1, groups=2), (8, 5, 5)),
    "depthwise_x3": (lambda: nn.Conv2d(4, 12, 3, padding=1, groups=4), (4, 6, 6)),
}
CASES = [(m, n) for m in ("svd", "tucker2") for n in LAYERS]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only cost time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def setup(case: str, batch: int = 2) -> tuple[nn.Conv2d, torch.Tensor, Site]:
    torch.manual_seed(0)
    make, shape = LAYERS[case]
    layer = make()
    x = torch.randn(batch, *shape)
    with torch.no_grad():
        y = layer(x)
    return layer, x, Site.from_module(case, layer, tuple(x.shape[-2:]), tuple(y.shape[-2:]))


# -- independent references ---------------------------------------------------------------------
def leading(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The leading ``rank`` left singular vectors of ``matrix``."""
    return torch.linalg.svd(matrix, full_matrices=False)[0][:, :rank]


def svd_reference(weight: torch.Tensor, groups: int, rank: int) -> torch.Tensor:
    """Each group's (T/g) × (S/g·kh·kw) matrix replaced by its rank-``rank`` truncated SVD."""
    parts = []
    for w in weight.double().chunk(groups):
        u, s, vh = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
        parts.append(((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(w.shape))
    return torch.cat(parts)


def tucker_reference(weight: torch.Tensor, groups: int, rank: tuple[int, int]) -> torch.Tensor:
    """Each group's kernel projected on its leading mode-0 and mode-1 subspaces (HOSVD)."""
    r_in, r_out = rank
    parts = []
    for w in weight.double().chunk(groups):
        u_out = leading(w.reshape(w.shape[0], -1), r_out)
        u_in = leading(w.transpose(0, 1).reshape(w.shape[1], -1), r_in)
        parts.append(torch.einsum("tsij,ta,ua,sb,vb->uvij", w, u_out, u_out, u_in, u_in))
    return torch.cat(parts)


def reference_output(layer: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``layer`` run with ``weight`` instead of its own: F.conv2d with the layer's groups,
    stride, padding (and padding mode) and dilation."""
    double = copy.deepcopy(layer).double()
    return double._conv_forward(x.double(), weight, double.bias)


# -- numerics -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "case"), CASES)
def test_exact_at_max_rank(method, case):
    layer, x, site = setup(case)
    fac = get(method)
    with torch.no_grad():
        assert rel_error(built(method, site, layer, fac.max_rank(site))(x), layer(x)) < 1e-5
        double = layer.double()
        top = fac.max_rank(site)
        factors = fac.decompose(double.weight.detach(), site, top)
        module = fac.build(site, top, factors, None if layer.bias is None else double.bias)
        assert {p.dtype for p in module.parameters()} == {torch.float64}
        assert rel_error(module(x.double()), double(x.double())) < 1e-12


@pytest.mark.parametrize(("method", "case"), CASES)
def test_output_equals_per_group_truncation(method, case):
    layer, x, site = setup(case)
    fac = get(method)
    reference = svd_reference if method == "svd" else tucker_reference
    for rank in ranks3(fac.max_rank(site)):
        weight = reference(layer.weight.detach(), site.groups, rank)
        with torch.no_grad():
            ref = reference_output(layer, x, weight)
            y = built(method, site, layer, rank)(x)
        assert rel_error(y.double(), ref) < 1e-5, rank


@pytest.mark.parametrize(("method", "case"), CASES)
def test_sliced_factors_equal_direct_decomposition(method, case):
    layer, x, site = setup(case)
    fac = get(method)
    top = fac.max_rank(site)
    for rank in ranks3(top)[:-1]:
        with torch.no_grad():
            sliced = built(method, site, layer, rank, factor_rank=top)(x)
            direct = built(method, site, layer, rank)(x)
        assert torch.equal(sliced, direct), rank


@pytest.mark.parametrize(("method", "case"), CASES)
def test_factors_have_a_leading_group_dimension(method, case):
    layer, _, site = setup(case)
    fac = get(method)
    rank = fac.max_rank(site)
    factors = fac.decompose(layer.weight.detach(), site, rank)
    g, s_g, t_g = site.groups, site.in_features // site.groups, site.out_features // site.groups
    if method == "svd":
        n = s_g * site.kernel_size[0] * site.kernel_size[1]
        assert factors["left"].shape == (g, t_g, rank)
        assert factors["right"].shape == (g, rank, n)
    else:
        (r_in, r_out), (kh, kw) = rank, site.kernel_size
        assert factors["in"].shape == (g, s_g, r_in)
        assert factors["core"].shape == (g, r_out, r_in, kh, kw)
        assert factors["out"].shape == (g, t_g, r_out)


@pytest.mark.parametrize(("method", "case"), CASES)
def test_state_dict_reloads_into_bare_build(method, case):
    layer, x, site = setup(case)
    assert_reloads(method, site, layer, x, ranks3(get(method).max_rank(site))[0])


def test_factors_of_another_grouping_are_refused():
    layer, _, site = setup("groups4")
    ungrouped = Site.from_module("plain", nn.Conv2d(8, 12, 3, padding=1))
    factors = get("svd").decompose(torch.randn(12, 8, 3, 3), ungrouped, 3)
    with pytest.raises(DecompositionError, match="groups=4"):
        get("svd").build(site, 3, factors)
    grouped = get("tucker2").decompose(layer.weight.detach(), site, (2, 3))
    with pytest.raises(DecompositionError, match="groups=1"):
        get("tucker2").build(ungrouped, (2, 3), grouped)


# -- exact costs --------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "case"), CASES)
def test_stage_costs_match_built_layers(method, case):
    _, x, site = setup(case)
    fac = get(method)
    batch = x.shape[0]
    for rank in ranks3(fac.max_rank(site)):
        module = fac.build(site, rank)
        layers = list(module)
        stages = fac.stages(site, rank)
        assert len(layers) == len(stages)
        assert all(m.groups == site.groups for m in layers)
        h = x
        for m, stage in zip(layers, stages, strict=True):
            with FlopCounterMode(display=False) as fc, torch.no_grad():
                out = m(h)
            assert stage.params == sum(p.numel() for p in m.parameters())
            assert stage.bias == (0 if m.bias is None else m.bias.numel())
            assert stage.macs * 2 * batch == fc.get_total_flops()
            assert (stage.inputs * batch, stage.outputs * batch) == (h.numel(), out.numel())
            h = out
        assert fac.params(site, rank) == sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "module", [nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(6, 12, 3, stride=2, groups=6),
               nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=False)],
    ids=["depthwise", "depthwise_x2_stride2", "groups4"],
)
def test_dense_stage_prices_grouped_convs(module):
    x = torch.randn(2, module.in_channels, 7, 7)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        y = module(x)
    site = Site.from_module("c", module, tuple(x.shape[-2:]), tuple(y.shape[-2:]))
    dense = dense_stage(site)
    assert dense.params == sum(p.numel() for p in module.parameters()) == site.dense_params
    assert dense.macs * 2 * 2 == fc.get_total_flops()
    assert (dense.inputs * 2, dense.outputs * 2) == (x.numel(), y.numel())


class GroupNet(nn.Module):
    """A plain conv, a groups=4 conv, a depthwise conv, a depthwise conv with channel
    multiplier 2 and a linear head (only Conv2d and Linear do multiply-accumulates)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 24, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24)
        self.multiplier = nn.Conv2d(24, 48, 3, padding=1, groups=24, bias=False)
        self.head = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.grouped(torch.relu(self.stem(x))))
        x = self.multiplier(torch.relu(self.depthwise(x)))
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def groupnet() -> tuple[GroupNet, torch.Tensor, RankSpace]:
    torch.manual_seed(0)
    model = GroupNet().eval()
    x = torch.randn(2, 3, 12, 12)
    return model, x, RankSpace.discover(model, x[:1], methods=["svd", "tucker2"])


GROUPNET_CONFIGS = {
    "dense": {},
    **{f"svd{r}": {"grouped": Choice("svd", r), "multiplier": Choice("svd", 1)}
       for r in (1, 3, 6)},
    **{f"tucker2_{r[0]}x{r[1]}": {"grouped": Choice("tucker2", r),
                                    "multiplier": Choice("svd", 2)}
       for r in ((1, 1), (2, 3), (4, 6))},
    "all": {"stem": Choice("tucker2", (2, 4)), "grouped": Choice("svd", 2),
            "head": Choice("svd", 5)},
}


def test_groupnet_space(groupnet):
    _, _, space = groupnet
    assert space.names == ("stem", "grouped", "multiplier", "head")
    assert space.site("grouped").methods == ("svd", "tucker2")
    grouped, multiplier = space.site("grouped"), space.site("multiplier")
    assert get("svd").max_rank(grouped) == 6  # per group: min(24/4, 16/4·9)
    assert get("tucker2").max_rank(grouped) == (4, 6)
    assert set(space.ranks("grouped", "svd")) <= set(range(1, 7))
    assert space.ranks("grouped", "tucker2")[0] == (1, 1)
    assert multiplier.methods == ("svd", "tucker2")
    assert get("tucker2").max_rank(multiplier) == (1, 2)  # one input channel per group
    assert get("svd").max_rank(multiplier) == 2  # min(48/24, 1·3·3)
    assert space.ranks("multiplier", "svd")[0] == 1
    depthwise = space.site("depthwise")
    assert not depthwise.decomposable and "depthwise" in depthwise.reason


@pytest.mark.parametrize("key", GROUPNET_CONFIGS)
def test_cost_model_equals_built_module(groupnet, key):
    model, x, space = groupnet
    config = Config(GROUPNET_CONFIGS[key])
    metrics = CostModel(space).metrics(config)
    compressed = compress(model, config)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        y = compressed(x)
    assert metrics["params"] == sum(p.numel() for p in compressed.parameters())
    assert metrics["macs"] * 2 * x.shape[0] == fc.get_total_flops()
    assert metrics["flops"] * x.shape[0] == fc.get_total_flops()
    assert y.shape == model(x).shape


def test_full_rank_groupnet_reproduces_the_model(groupnet):
    model, x, space = groupnet
    with torch.no_grad():
        ref = model(x)
        for method in ("svd", "tucker2"):
            fac = get(method)
            config = Config({s.name: Choice(method, fac.max_rank(s))
                             for s in space.decomposable if method in s.methods})
            assert "grouped" in config
            assert rel_error(compress(model, config)(x), ref) < 1e-5


def test_cache_builds_equal_fresh_builds(groupnet):
    """The cache decomposes at the largest grid rank and slices each group's factors."""
    model, _, space = groupnet
    cache = FactorCache(model, space)
    for name, choice in (("grouped", Choice("svd", 2)), ("grouped", Choice("tucker2", (2, 3))),
                         ("multiplier", Choice("svd", 1))):
        layer, site = model.get_submodule(name), space.site(name)
        fresh = built(choice.method, site, layer, choice.rank)
        h = torch.randn(2, site.in_features, 6, 6)
        with torch.no_grad():
            assert torch.equal(cache.build(name, choice)(h), fresh(h)), (name, choice)
        held = cache.factors(name, choice.method, choice.rank)
        assert all(f.shape[0] == site.groups for f in held.values())


# -- what grouped convs admit -------------------------------------------------------------------
def conv_site(module: nn.Conv2d) -> Site:
    return Site.from_module("layer", module)


@pytest.mark.parametrize("method", ["svd", "tucker2"])
@pytest.mark.parametrize("module", [nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 1, groups=8)],
                         ids=["3x3", "1x1"])
def test_depthwise_is_refused(method, module):
    site = conv_site(module)
    reason = get(method).admits(site)
    assert reason is not None and "depthwise" in reason and "groups=8" in reason
    with pytest.raises(NotAdmittedError, match="depthwise"):
        get(method).normalize_rank(site, 1)


def test_depthwise_with_channel_multiplier_admits_svd():
    site = conv_site(nn.Conv2d(8, 24, 3, groups=8))
    svd = get("svd")
    assert svd.admits(site) is None
    assert svd.max_rank(site) == 3  # min(24/8, 1·3·3)
    assert svd.params(site, 1) < site.dense_params
    # without a spatial kernel each group's matrix is 3×1: nothing to truncate
    assert "saves nothing" in svd.admits(conv_site(nn.Conv2d(8, 24, 1, groups=8)))


@pytest.mark.parametrize("method", ["svd_spatial", "cp3", "cp4", "tt"])
def test_other_methods_refuse_grouped_convs(method):
    site = conv_site(nn.Conv2d(8, 12, 3, groups=4))
    reason = get(method).admits(site)
    assert reason is not None and "groups=4" in reason and "svd and tucker2" in reason
    with pytest.raises(NotAdmittedError, match="svd and tucker2"):
        get(method).check(site)


def test_grouped_rank_that_saves_nothing_is_refused():
    site = conv_site(nn.Conv2d(8, 4, 1, groups=4))  # each group: a 1×2 matrix
    assert "saves nothing" in get("svd").admits(site)
    assert "saves nothing" in get("tucker2").admits(site)


def test_max_and_normalized_ranks_are_per_group():
    site = conv_site(nn.Conv2d(16, 24, 3, groups=4))  # per group 6 × 4 × 3 × 3
    svd, tucker = get("svd"), get("tucker2")
    assert svd.max_rank(site) == 6
    assert tucker.max_rank(site) == (4, 6)
    assert tucker.normalize_rank(site, 3) == (3, 3)
    with pytest.raises(InvalidRankError, match="maximum"):
        svd.normalize_rank(site, 7)
    with pytest.raises(InvalidRankError, match="maximum"):
        tucker.normalize_rank(site, (5, 2))
