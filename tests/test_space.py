import itertools
import json

import pytest
import torch
from torch import nn

from ranksearch import factorize
from ranksearch.config import DENSE, Choice, Config
from ranksearch.errors import (
    ConfigError,
    InputShapeError,
    InvalidRankError,
    NoDecomposableLayersError,
    NotAdmittedError,
    UnknownLayerError,
    UnknownMethodError,
)
from ranksearch.site import Site
from ranksearch.space import RankSpace


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=(2, 1), padding="valid")
        self.body = nn.Sequential(
            nn.Conv2d(16, 32, (3, 5), padding="same", dilation=(1, 2), bias=False),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=32),  # depthwise
        )
        self.unused = nn.Linear(4, 4)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.body(self.stem(x))
        return self.head(x.mean((2, 3)))


@pytest.fixture
def space():
    return RankSpace.discover(Net(), torch.zeros(2, 3, 17, 12))


def test_discover_records_geometry(space):
    stem = space.site("stem")
    assert stem.kind == "conv2d"
    assert stem.weight_shape == (16, 3, 3, 3)
    assert stem.stride == (2, 1) and stem.padding == "valid"
    assert stem.in_size == (17, 12) and stem.out_size == (8, 10)
    body = space.site("body.0")
    assert body.padding == "same" and body.dilation == (1, 2) and not body.bias
    assert body.kernel_size == (3, 5) and body.in_size == body.out_size == (8, 10)
    head = space.site("head")
    assert head.kind == "linear" and head.in_size == () and head.weight_shape == (10, 32)
    assert space.model_params == sum(p.numel() for p in Net().parameters())


def test_non_decomposable_sites_have_reasons(space):
    depthwise = space.site("body.2")
    assert not depthwise.decomposable and "groups=32" in depthwise.reason
    assert "not called" in space.site("unused").reason
    assert space.names == ("stem", "body.0", "head")
    assert space.site("stem").methods == ("tucker2",)
    assert space.site("head").methods == ("svd",)


def test_discover_filters_and_methods():
    net = Net()
    x = torch.zeros(1, 3, 17, 12)
    space = RankSpace.discover(net, x, methods=["svd", "cp3"], exclude=["stem"], min_params=400)
    assert space.names == ("body.0",)
    assert space.site("body.0").methods == ("svd", "cp3")
    assert "excluded" in space.site("stem").reason
    assert "min_params" in space.site("head").reason
    only = RankSpace.discover(net, x, include=["body.*"])
    assert only.names == ("body.0",)


def test_discover_errors():
    with pytest.raises(InputShapeError, match="does not fit"):
        RankSpace.discover(Net(), torch.zeros(1, 5, 17, 12))
    with pytest.raises(NoDecomposableLayersError, match="depthwise"):
        RankSpace.discover(nn.Conv2d(4, 4, 3, groups=4), torch.zeros(1, 4, 8, 8))
    with pytest.raises(NoDecomposableLayersError):
        RankSpace.discover(nn.ReLU(), torch.zeros(1, 4))
    with pytest.raises(UnknownMethodError, match="unknown factorization 'nope'"):
        RankSpace.discover(Net(), torch.zeros(1, 3, 17, 12), methods=["nope"])


def test_shared_module_is_not_decomposable():
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.ReLU(), lin, nn.Linear(8, 3))
    space = RankSpace.discover(model, torch.zeros(1, 8))
    assert space.site("0").calls == 2 and "shared" in space.site("0").reason
    assert space.names == ("3",)


def test_site_and_space_json_round_trip(space):
    for site in space.sites:
        assert Site.from_dict(json.loads(json.dumps(site.to_dict()))) == site
    again = RankSpace.from_json(json.loads(json.dumps(space.to_json())))
    assert again.sites == space.sites and again.model_params == space.model_params


def test_config_is_immutable_hashable_and_round_trips():
    a = Config({"x": Choice("svd", 3), "y": Choice("tucker2", [2, 4]), "z": DENSE})
    b = Config([("y", Choice("tucker2", (2, 4))), ("x", Choice("svd", 3))])
    assert a == b and hash(a) == hash(b) and a.key == b.key
    assert "z" not in a and a.get("z") == DENSE and len(a) == 2
    assert Config.from_json(json.dumps(a.to_json())) == a
    assert Config.from_json(a.key) == a
    with pytest.raises(AttributeError):
        a.foo = 1
    assert a.with_choices({"x": Choice("svd", 5)})["x"].rank == 5 and a["x"].rank == 3
    assert {a: 1}[b] == 1


def test_config_errors():
    with pytest.raises(ConfigError):
        Choice("svd")
    with pytest.raises(ConfigError):
        Choice("dense", 3)
    with pytest.raises(ConfigError):
        Config.from_json("{not json")
    with pytest.raises(ConfigError):
        Config({"x": 3})


def test_rank_grid_multiple_of_and_bounds():
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4))
    x = torch.zeros(1, 20)
    space = RankSpace.discover(model, x, multiple_of=8)
    assert space.ranks("0", "svd") == (8,)  # svd:16 and svd:20 cost more than the dense layer
    # rank 4 is the only multiple-of-8 rank of a 30 -> 4 layer, and it saves nothing
    assert space.names == ("0",) and "costs as much as the dense layer" in space.site("2").reason
    dearer = RankSpace.discover(model, x, multiple_of=8, dearer=True)
    assert dearer.ranks("0", "svd") == (8, 16, 20) and dearer.ranks("2", "svd") == (4,)
    space = RankSpace.discover(model, x, min_rank=5, max_choices=4, dearer=True)
    grid = space.ranks("0", "svd")
    assert len(grid) == 4 and grid[0] == 5 and grid[-1] == 20
    conv, x = nn.Conv2d(8, 16, 3), torch.zeros(1, 8, 6, 6)
    tucker = RankSpace.discover(conv, x, dearer=True)
    grid = tucker.ranks("", "tucker2")
    assert grid[-1] == (8, 16) and all(a <= b for a, b in itertools.pairwise(grid))
    assert tucker.choices("")[-1] == DENSE
    # by default the grid stops where a rank saves neither parameters nor MACs
    site, fac = tucker.site(""), factorize.get("tucker2")
    dense = factorize.dense_stage(site)
    cheap = RankSpace.discover(conv, x).ranks("", "tucker2")
    assert cheap == tuple(r for r in grid if fac.params(site, r) < dense.params
                          or fac.macs(site, r) < dense.macs)
    assert len(cheap) < len(grid)


def test_validate_full_and_uniform(space):
    cfg = space.validate(Config({"stem": Choice("tucker2", 2), "head": Choice("svd", 4)}))
    assert cfg["stem"].rank == (2, 2)
    with pytest.raises(InvalidRankError):
        space.validate(Config({"head": Choice("svd", 0)}))
    with pytest.raises(InvalidRankError, match="exceeds"):
        space.validate(Config({"head": Choice("svd", 11)}))
    with pytest.raises(UnknownLayerError):
        space.validate(Config({"nope": Choice("svd", 1)}))
    with pytest.raises(NotAdmittedError):
        space.validate(Config({"body.2": Choice("svd", 1)}))
    with pytest.raises(NotAdmittedError):
        space.validate(Config({"head": Choice("tucker2", 1)}))
    full = space.full()
    assert full["head"] == Choice("svd", 10) and full["stem"].rank == (3, 16)
    for fraction in (0.2, 0.5):
        cfg = space.uniform(fraction)
        for name, choice in cfg.items():
            site = space.site(name)
            fac = factorize.get(choice.method)
            params = fac.params(site, choice.rank)
            grid = space.ranks(name, choice.method)
            assert params <= fraction * site.dense_params or choice.rank == grid[0]
            bigger = grid[grid.index(choice.rank) + 1:]
            assert all(fac.params(site, r) > fraction * site.dense_params for r in bigger)
    svd_only = space.uniform(0.5, "svd")
    assert list(svd_only) == ["head"]
