"""Tests of ranksearch.cost: exact params/MACs against references and built models, energy by
hand, ratios and latency measurement."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ranksearch import factorize
from ranksearch.config import Choice, Config
from ranksearch.cost import CostModel, EnergyTable, measure_latency
from ranksearch.errors import InvalidRankError, NotAdmittedError, RankSearchError
from ranksearch.site import Site
from ranksearch.space import RankSpace

META = torch.device("meta")


# -- helpers ------------------------------------------------------------------------------------
def alexnet() -> nn.Sequential:
    """The original grouped Caffe AlexNet (227×227 input), without biases, on the meta device."""
    with META:
        return nn.Sequential(
            nn.Conv2d(3, 96, 11, stride=4, bias=False),  # 0: 55×55
            nn.ReLU(),
            nn.MaxPool2d(3, 2),  # 27×27
            nn.Conv2d(96, 256, 5, padding=2, groups=2, bias=False),  # 3
            nn.ReLU(),
            nn.MaxPool2d(3, 2),  # 13×13
            nn.Conv2d(256, 384, 3, padding=1, bias=False),  # 6
            nn.ReLU(),
            nn.Conv2d(384, 384, 3, padding=1, groups=2, bias=False),  # 8
            nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1, groups=2, bias=False),  # 10
            nn.ReLU(),
            nn.MaxPool2d(3, 2),  # 6×6
            nn.Flatten(),
            nn.Linear(9216, 4096, bias=False),
            nn.ReLU(),
            nn.Linear(4096, 4096, bias=False),
            nn.ReLU(),
            nn.Linear(4096, 1000, bias=False),
        )


def vgg16() -> nn.Sequential:
    """VGG16 (configuration D, 224×224 input), without biases, on the meta device."""
    layers: list[nn.Module] = []
    channels = 3
    with META:
        for width, convs in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
            for _ in range(convs):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.ReLU()]
                channels = width
            layers.append(nn.MaxPool2d(2, 2))
        layers += [
            nn.Flatten(),
            nn.Linear(25088, 4096, bias=False),
            nn.ReLU(),
            nn.Linear(4096, 4096, bias=False),
            nn.ReLU(),
            nn.Linear(4096, 1000, bias=False),
        ]
        return nn.Sequential(*layers)


class SmallNet(nn.Module):
    """conv-BN-ReLU-conv-pool-linear, with biases."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


class OddNet(nn.Module):
    """A depthwise conv (not decomposable), a linear called twice (shared), an unused linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)
        self.unused = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.depthwise(self.conv(x)).mean((2, 3))
        return self.head(self.shared(torch.relu(self.shared(x))))


def compress(model: nn.Module, space: RankSpace, config: Config) -> nn.Module:
    """A copy of ``model`` with each configured layer replaced by its built factorization."""
    model = copy.deepcopy(model)
    for name, choice in config.items():
        old = model.get_submodule(name)
        new = factorize.get(choice.method).build(
            space.site(name), choice.rank, factors=None, bias=old.bias
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


def counted_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs per sample of ``model(x)`` by `FlopCounterMode`."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    flops = counter.get_total_flops()
    assert flops % (2 * x.shape[0]) == 0
    return flops // (2 * x.shape[0])


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


PJ = 1e-12
HOROWITZ_MAC = 3.7 + 0.9


# -- 1. reference totals ------------------------------------------------------------------------
def test_alexnet_reference_counts() -> None:
    space = RankSpace.discover(alexnet(), torch.zeros(1, 3, 227, 227, device=META))
    cost = CostModel(space)
    dense = cost.dense()
    assert dense["params"] == 60_954_656
    assert dense["macs"] == 724_406_816
    assert dense["flops"] == 2 * 724_406_816
    conv1 = cost.table(Config())[0]
    assert conv1["name"] == "0"
    assert (conv1["params"], conv1["macs"]) == (34_848, 105_415_200)
    # the grouped convs (conv2/4/5, groups=2) are decomposed per group and priced exactly
    assert {"3", "8", "10"} <= set(space.names)
    assert {space.site(n).groups for n in ("3", "8", "10")} == {2}
    assert {"3", "8", "10"} <= set(cost.stages(Config()))


def test_vgg16_reference_counts() -> None:
    space = RankSpace.discover(vgg16(), torch.zeros(1, 3, 224, 224, device=META))
    dense = CostModel(space).dense()
    assert dense["params"] == 138_344_128
    assert dense["macs"] == 15_470_264_320


# -- 2. exactness against the built model -------------------------------------------------------
@pytest.fixture(scope="module")
def small() -> tuple[SmallNet, torch.Tensor, RankSpace, CostModel]:
    torch.manual_seed(0)
    model = SmallNet()
    x = torch.randn(3, 3, 16, 16)
    methods = {"conv2d": ("tucker2", "svd"), "linear": ("svd",)}
    space = RankSpace.discover(model, x[:1], methods=methods)
    return model, x, space, CostModel(space)


SMALL_CONFIGS = {
    "dense": Config(),
    "svd": Config({
        "conv1": Choice("svd", 3), "conv2": Choice("svd", 5), "fc": Choice("svd", 4),
    }),
    "tucker2": Config({
        "conv1": Choice("tucker2", (2, 6)), "conv2": Choice("tucker2", (4, 7)),
        "fc": Choice("svd", 9),
    }),
    "partial": Config({"conv2": Choice("tucker2", (8, 16))}),
}


@pytest.mark.parametrize("key", SMALL_CONFIGS)
def test_params_and_macs_match_the_built_model(small, key: str) -> None:
    model, x, space, cost = small
    config = SMALL_CONFIGS[key]
    built = compress(model, space, config)
    assert cost.params(config) == n_params(built)
    assert cost.macs(config) == counted_macs(built, x)
    assert cost.flops(config) == 2 * counted_macs(built, x)
    assert built(x).shape == model(x).shape


def test_shared_grouped_and_unused_layers() -> None:
    torch.manual_seed(0)
    model = OddNet()
    x = torch.randn(2, 4, 6, 6)
    space = RankSpace.discover(model, x[:1], methods=["svd"])
    assert set(space.names) == {"conv", "head"}
    cost = CostModel(space)
    stages = cost.stages(Config())
    assert "unused" not in stages and "shared" in stages and "depthwise" in stages
    # the shared linear counts twice for MACs, its params (and the unused layer's) once
    for config in (Config(), Config({"conv": Choice("svd", 2), "head": Choice("svd", 1)})):
        built = compress(model, space, config)
        assert cost.params(config) == n_params(built)
        assert cost.macs(config) == counted_macs(built, x)
    with pytest.raises(NotAdmittedError, match="depthwise"):
        cost.macs(Config({"depthwise": Choice("svd", 1)}))


def test_config_is_validated_and_normalized(small) -> None:
    _, _, _, cost = small
    broadcast = Config({"conv2": Choice("tucker2", 4)})
    explicit = Config({"conv2": Choice("tucker2", (4, 4))})
    assert cost.metrics(broadcast) == cost.metrics(explicit)
    assert cost.table(broadcast)[1]["choice"] == "tucker2:4x4"
    with pytest.raises(InvalidRankError):
        cost.params(Config({"fc": Choice("svd", 11)}))
    with pytest.raises(NotAdmittedError):
        cost.params(Config({"fc": Choice("tucker2", (1, 1))}))


def test_stages_and_table(small) -> None:
    _, _, space, cost = small
    config = SMALL_CONFIGS["tucker2"]
    stages = cost.stages(config)
    assert list(stages) == ["conv1", "conv2", "fc"]
    assert stages["conv2"] == factorize.get("tucker2").stages(space.site("conv2"), (4, 7))
    stages["conv2"].clear()  # the caller's copy, not the cache
    assert len(cost.stages(config)["conv2"]) == 3
    rows = cost.table(config)
    assert [r["name"] for r in rows] == ["conv1", "conv2", "fc"]
    assert [r["choice"] for r in rows] == ["tucker2:2x6", "tucker2:4x7", "svd:9"]
    assert sum(r["macs"] for r in rows) == cost.macs(config)
    assert sum(r["energy"] for r in rows) == pytest.approx(cost.energy(config))


def test_space_without_called_layers_is_rejected() -> None:
    site = Site("fc", "linear", 4, 2, calls=0, reason="not called")
    with pytest.raises(RankSearchError, match="called"):
        CostModel(RankSpace((site,), model_params=10))


# -- 3. energy ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_layer() -> RankSpace:
    """Linear(8, 4) with bias: 32 MACs, 36 params, 8 + 4 activation words."""
    model = nn.Linear(8, 4)
    return RankSpace.discover(nn.Sequential(model), torch.zeros(1, 8))


SVD2 = Config({"0": Choice("svd", 2)})  # project: 16 params/MACs, 8+2 words; expand: 12, 8, 2+4


def test_energy_by_hand(one_layer: RankSpace) -> None:
    cost = CostModel(one_layer)
    dense_pj = 32 * HOROWITZ_MAC + 36 * 640 + (8 + 4) * 5
    assert cost.energy(Config()) == pytest.approx(dense_pj * PJ, rel=1e-12)
    svd_pj = (16 + 8) * HOROWITZ_MAC + (16 + 12) * 640 + (8 + 2 + 2 + 4) * 5
    assert cost.energy(SVD2) == pytest.approx(svd_pj * PJ, rel=1e-12)
    assert cost.ratio("energy", SVD2) == pytest.approx(svd_pj / dense_pj)


def test_shared_layer_energy_counts_every_call() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.shared(self.shared(x)))

    cost = CostModel(RankSpace.discover(Twice(), torch.zeros(1, 4)))
    row = next(r for r in cost.table(Config()) if r["name"] == "shared")
    assert row["macs"] == 2 * 16 and row["params"] == 20
    assert row["energy"] == pytest.approx((2 * 16 * HOROWITZ_MAC + 20 * 640 + 2 * 8 * 5) * PJ)


def test_energy_table_from_file(one_layer: RankSpace, tmp_path) -> None:
    path = tmp_path / "energy.json"
    path.write_text(json.dumps({"mult_pj": 1.0, "add_pj": 1.0, "sram_pj": 2.0, "dram_pj": 100}))
    table = EnergyTable.from_file(path)
    assert table == EnergyTable(1.0, 1.0, 2.0, 100)
    cost = CostModel(one_layer, table)
    assert cost.energy(Config()) == pytest.approx((32 * 2 + 36 * 100 + 12 * 2) * PJ)
    path.write_text(json.dumps(EnergyTable(onchip_bytes=64).to_dict()))
    assert EnergyTable.from_file(path) == EnergyTable(onchip_bytes=64)


def test_onchip_bytes_switches_activations_to_dram(one_layer: RankSpace) -> None:
    # dense: 12 words = 48 bytes of activations
    fits = CostModel(one_layer, EnergyTable(onchip_bytes=48))
    spills = CostModel(one_layer, EnergyTable(onchip_bytes=47))
    assert fits.energy(Config()) == pytest.approx((32 * HOROWITZ_MAC + 36 * 640 + 12 * 5) * PJ)
    assert spills.energy(Config()) == pytest.approx((32 * HOROWITZ_MAC + 36 * 640 + 12 * 640) * PJ)
    # svd: per stage, project's 10 words (40 bytes) spill, expand's 6 words (24 bytes) fit
    mixed = CostModel(one_layer, EnergyTable(onchip_bytes=30))
    expected = 24 * HOROWITZ_MAC + 28 * 640 + 10 * 640 + 6 * 5
    assert mixed.energy(SVD2) == pytest.approx(expected * PJ)


def test_energy_table_errors(tmp_path) -> None:
    path = tmp_path / "energy.json"
    path.write_text(json.dumps({"mult_pj": 1.0, "dram_nj": 2.0}))
    with pytest.raises(RankSearchError, match=r"dram_nj.*valid keys.*dram_pj.*onchip_bytes"):
        EnergyTable.from_file(path)
    with pytest.raises(RankSearchError, match="does not exist"):
        EnergyTable.from_file(tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(RankSearchError, match="cannot read"):
        EnergyTable.from_file(path)
    path.write_text("[1, 2]")
    with pytest.raises(RankSearchError, match="JSON object"):
        EnergyTable.from_file(path)
    path.write_text(json.dumps({"sram_pj": -1}))
    with pytest.raises(RankSearchError, match="sram_pj"):
        EnergyTable.from_file(path)
    with pytest.raises(RankSearchError, match="word_bytes"):
        EnergyTable(word_bytes=0)
    with pytest.raises(RankSearchError, match="onchip_bytes"):
        EnergyTable(onchip_bytes=1.5)  # type: ignore[arg-type]


# -- 4. ratios ----------------------------------------------------------------------------------
def test_ratios(small) -> None:
    model, x, space, cost = small
    dense = cost.metrics(Config())
    assert dense == cost.dense()
    assert all(dense[f"{m}_ratio"] == 1.0 for m in ("params", "macs", "flops", "energy"))
    assert dense["params"] == n_params(model)
    config = SMALL_CONFIGS["svd"]
    built = compress(model, space, config)
    metrics = cost.metrics(config)
    assert metrics["params_ratio"] == pytest.approx(n_params(built) / n_params(model))
    assert metrics["macs_ratio"] == pytest.approx(counted_macs(built, x) / counted_macs(model, x))
    assert metrics["flops_ratio"] == pytest.approx(metrics["macs_ratio"])
    assert metrics["energy_ratio"] == pytest.approx(metrics["energy"] / dense["energy"])
    assert 0 < metrics["params_ratio"] < 1
    assert cost.ratio("params", config) == metrics["params_ratio"]
    assert cost.ratio("energy", Config()) == 1.0
    with pytest.raises(RankSearchError, match="latency"):
        cost.ratio("latency", config)


# -- 5. latency ---------------------------------------------------------------------------------
class Recorder(nn.Module):
    """Records the training flag and inference mode it ran under."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, torch.is_inference_mode_enabled()))
        return self.fc(x)


def test_measure_latency() -> None:
    model = Recorder()
    model.train()
    model.fc.eval()  # a mixed state must come back as it was
    before = torch.get_num_threads()
    threads = 1 if before != 1 else 2
    seconds = measure_latency(model, torch.zeros(4, 16), warmup=2, repeats=3, threads=threads)
    assert isinstance(seconds, float) and seconds > 0
    assert model.seen == [(False, True)] * 5
    assert model.training and not model.fc.training
    assert torch.get_num_threads() == before


def test_measure_latency_restores_after_an_error() -> None:
    model = nn.Linear(3, 3).train()
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        measure_latency(model, torch.zeros(2, 5), threads=1 if before != 1 else 2)
    assert model.training
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(("warmup", "repeats", "match"), [
    (5, 0, "repeats"), (-1, 3, "warmup"), (5, 2.5, "repeats"),
])
def test_measure_latency_rejects_bad_counts(warmup, repeats, match: str) -> None:
    with pytest.raises(RankSearchError, match=match):
        measure_latency(nn.Linear(2, 2), torch.zeros(1, 2), warmup=warmup, repeats=repeats)
