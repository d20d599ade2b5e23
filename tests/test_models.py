"""Reference models: output shapes, layer counts, parameter counts, the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ranksearch.errors import RankSearchError, UnknownModelError
from ranksearch.models import MODELS, DigitsCNN, build_model, resnet20, vgg_small
from ranksearch.space import RankSpace


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_names() -> None:
    assert set(MODELS) == {"digits-cnn", "gpt-tiny", "resnet20", "vgg-small"}


IMAGE_MODELS = sorted(set(MODELS) - {"gpt-tiny"})  # gpt-tiny: tests/test_lm.py


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_output_shapes(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(name, in_channels=shape[0], num_classes=7).eval()
    assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_digits_cnn_on_digits_input() -> None:
    model = DigitsCNN().eval()
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    assert _count(model, nn.Conv2d) == 3
    assert _count(model, nn.Linear) == 2


def _resnet20_params(in_channels: int, num_classes: int) -> int:
    """Count from the architecture: 3×3 convolutions without bias, batch norm (weight and
    bias), option-A shortcuts (no parameters), a linear classifier with bias."""

    def conv(c_in: int, c_out: int) -> int:
        return c_in * c_out * 9 + 2 * c_out  # + its batch norm

    total = conv(in_channels, 16)
    channels = 16
    for width in (16, 32, 64):
        for _ in range(3):
            total += conv(channels, width) + conv(width, width)
            channels = width
    return total + 64 * num_classes + num_classes


def test_resnet20_layers_and_parameters() -> None:
    model = resnet20()
    assert _count(model, nn.Conv2d) == 19  # option-A shortcuts: no shortcut convolutions
    assert _count(model, nn.Linear) == 1
    assert _params(model) == _resnet20_params(3, 10) == 269_722  # the known ~0.27M
    assert _params(resnet20(in_channels=1, num_classes=5)) == _resnet20_params(1, 5)


def test_resnet20_option_a_shortcut() -> None:
    """The first block of stage 2 subsamples its input and pads zero channels around it."""
    block = resnet20().layer2[0]
    assert _params(block.shortcut) == 0
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


def test_resnet20_stage_sizes() -> None:
    model = resnet20(in_channels=1).eval()
    x = torch.randn(1, 1, 28, 28)
    out1 = model.layer1(torch.relu(model.bn1(model.conv1(x))))
    out2 = model.layer2(out1)
    assert (out1.shape, out2.shape, model.layer3(out2).shape) == (
        (1, 16, 28, 28),
        (1, 32, 14, 14),
        (1, 64, 7, 7),
    )


def test_vgg_small_layers() -> None:
    model = vgg_small(in_channels=1)
    assert _count(model, nn.Conv2d) == 6
    assert _count(model, nn.BatchNorm2d) == 6
    assert _count(model, nn.Linear) == 2
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [
        64,
        64,
        128,
        128,
        256,
        256,
    ]


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(UnknownModelError) as info:
        build_model("resnet21")
    assert isinstance(info.value, RankSearchError)
    message = str(info.value)
    assert "resnet21" in message
    assert all(name in message for name in MODELS)


@pytest.mark.parametrize(
    ("name", "shape", "sites"),
    [("digits-cnn", (1, 8, 8), 5), ("resnet20", (3, 32, 32), 20), ("vgg-small", (1, 28, 28), 8)],
)
def test_every_layer_is_a_site(name: str, shape: tuple[int, ...], sites: int) -> None:
    """Each model's convolutions and linear layers are found by the rank space."""
    model = build_model(name, in_channels=shape[0])
    space = RankSpace.discover(model, torch.zeros(1, *shape))
    assert len(space.sites) == sites
    assert all(site.calls == 1 for site in space.sites)
