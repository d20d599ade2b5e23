"""Reference models: output shapes, layer counts, parameter counts, the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ranksearch.errors import RankSearchError, UnknownModelError
from ranksearch.models import (
    MODELS,
    VGG16_LAYERS,
    DigitsCNN,
    build_model,
    encoder512,
    resnet20,
    resnet56,
    vgg16,
    vgg_small,
)
from ranksearch.space import RankSpace


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_names() -> None:
    assert set(MODELS) == {"digits-cnn", "encoder512", "gpt-tiny", "resnet20", "resnet56",
                           "vgg-small", "vgg16"}


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


def _resnet_params(in_channels: int, num_classes: int, blocks: int = 3) -> int:
    """Count from the architecture: 3×3 convolutions without bias, batch norm (weight and
    bias), option-A shortcuts (no parameters), a linear classifier with bias."""

    def conv(c_in: int, c_out: int) -> int:
        return c_in * c_out * 9 + 2 * c_out  # + its batch norm

    total = conv(in_channels, 16)
    channels = 16
    for width in (16, 32, 64):
        for _ in range(blocks):
            total += conv(channels, width) + conv(width, width)
            channels = width
    return total + 64 * num_classes + num_classes


def test_resnet20_layers_and_parameters() -> None:
    model = resnet20()
    assert _count(model, nn.Conv2d) == 19  # option-A shortcuts: no shortcut convolutions
    assert _count(model, nn.Linear) == 1
    assert _params(model) == _resnet_params(3, 10) == 269_722  # the known ~0.27M
    assert _params(resnet20(in_channels=1, num_classes=5)) == _resnet_params(1, 5)


def test_resnet56_layers_and_parameters() -> None:
    model = resnet56()
    assert _count(model, nn.Conv2d) == 55 and _count(model, nn.Linear) == 1
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [9, 9, 9]
    assert _params(model) == _resnet_params(3, 10, blocks=9) == 853_018  # the known ~0.85M
    assert _params(resnet56(in_channels=1)) == _resnet_params(1, 10, blocks=9)


def test_vgg16_layers_and_parameters() -> None:
    """13 convolutions of widths 64–512 (no bias: batch norm follows), one 512 → classes head:
    14,724,042 parameters (the published 14.7M, less the 4,224 conv biases of versions that
    keep them)."""
    model = vgg16()
    widths = [w for w in VGG16_LAYERS if w != "M"]
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == widths
    assert len(widths) == 13 and _count(model, nn.BatchNorm2d) == 13
    head = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in head] == [(512, 10)]
    counted, channels = 0, 3
    for width in widths:
        counted += channels * width * 9 + 2 * width
        channels = width
    assert _params(model) == counted + 512 * 10 + 10 == 14_724_042


@pytest.mark.parametrize(("size", "maps"), [(28, [14, 7, 4, 2, 1]), (32, [16, 8, 4, 2, 1])])
def test_vgg16_pools_reach_one_pixel_on_28_and_32(size: int, maps: list[int]) -> None:
    """The pools round up, so Fashion-MNIST's 28×28 pools five times like CIFAR's 32×32."""
    model = vgg16(in_channels=1).eval()
    x, seen = torch.randn(1, 1, size, size), []
    with torch.no_grad():
        for layer in model.features:
            x = layer(x)
            if isinstance(layer, nn.MaxPool2d):
                seen.append(x.shape[-1])
    assert seen == maps and x.shape == (1, 512, 1, 1)


def test_encoder512_sites_and_parameters() -> None:
    """Patch embedding, two d=512 encoder layers whose attention projections and MLP linears
    are all sites, and the head."""
    model = encoder512().eval()
    space = RankSpace.discover(model, torch.zeros(1, 1, 28, 28))
    layer = [f"encoder.layers.{i}.{n}" for i in range(2) for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
        "linear1", "linear2")]
    assert [s.name for s in space.decomposable] == ["embed", *layer, "head"]
    sites = {s.name: s for s in space.decomposable}
    assert (sites["encoder.layers.0.linear1"].in_features,
            sites["encoder.layers.0.linear1"].out_features) == (512, 2048)
    assert sites["encoder.layers.1.self_attn.q_proj"].in_size == (16,)  # 16 tokens
    d, mlp = 512, 2048
    per_layer = 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d) + 2 * 2 * d  # + 2 norms
    expected = (49 * d + d) + 16 * d + 2 * per_layer + 2 * d + (d * 10 + 10)
    assert _params(model) == expected == 6_344_714


def test_encoder512_tokens_beyond_its_positions_are_refused() -> None:
    with pytest.raises(ValueError, match="25 patches, more than the 16 positions"):
        encoder512()(torch.zeros(1, 1, 35, 35))


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
    [("digits-cnn", (1, 8, 8), 5), ("resnet20", (3, 32, 32), 20), ("vgg-small", (1, 28, 28), 8),
     ("resnet56", (1, 28, 28), 56), ("vgg16", (1, 28, 28), 14), ("encoder512", (1, 28, 28), 14)],
)
def test_every_layer_is_a_site(name: str, shape: tuple[int, ...], sites: int) -> None:
    """Each model's convolutions and linear layers are found by the rank space."""
    model = build_model(name, in_channels=shape[0])
    space = RankSpace.discover(model, torch.zeros(1, *shape))
    assert len(space.sites) == sites
    assert all(site.calls == 1 for site in space.sites)
