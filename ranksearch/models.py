"""Reference models: plain ``nn.Module`` networks whose Conv2d and Linear layers are worth
compressing.

- `DigitsCNN`: a small CNN for the scikit-learn digits (input N×1×8×8).
- `resnet20`: the CIFAR ResNet-20 of He et al. (2016) with option-A shortcuts (input N×C×H×W,
  e.g. 1×28×28 or 3×32×32).
- `resnet56`: the CIFAR ResNet-56 of the same paper (same inputs).
- `vgg_small`: a small VGG with batch norm (same inputs as `resnet20`).
- `VGG16` / `vgg16`: the CIFAR-style VGG-16 with batch norm (same inputs).
- `PatchEncoder` / `encoder512`: a transformer encoder classifier of width 512 on 7×7 image
  patches (input N×C×28×28 or N×C×32×32).
- `GPT` / `gpt_tiny`: a small decoder-only byte-level language model (input B×T token ids,
  output B×T×vocab logits).

`MODELS` maps a name to its constructor and `build_model` builds one by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UnknownModelError

__all__ = [
    "GPT",
    "MODELS",
    "VGG16",
    "BasicBlock",
    "DigitsCNN",
    "GPTBlock",
    "PatchEncoder",
    "ResNet",
    "VGGSmall",
    "build_model",
    "encoder512",
    "gpt_tiny",
    "resnet20",
    "resnet56",
    "vgg16",
    "vgg_small",
]


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """3×3 convolution (padding 1, no bias), batch norm, ReLU: N×C_in×H×W → N×C_out×H×W."""
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class DigitsCNN(nn.Module):
    """A small CNN for the 8×8 scikit-learn digits.

    Three 3×3 convolutions (16, 32, 64 channels, each with batch norm and ReLU; a 2×2 max pool
    after the second), an adaptive average pool to 4×4, then Linear 1024 → 64 → classes.
    Input N×C×H×W with H, W ≥ 2 (8×8 for digits, where the adaptive pool is the identity);
    output N×num_classes logits.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, 16),
            *_conv_bn_relu(16, 32),
            nn.MaxPool2d(2),
            *_conv_bn_relu(32, 64),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """N×C×H×W → N×num_classes."""
        return self.classifier(self.features(x))


class _PadShortcut(nn.Module):
    """Option-A shortcut of He et al. (2016): subsample by ``stride`` and zero-pad channels.

    N×C_in×H×W → N×C_out×⌈H/stride⌉×⌈W/stride⌉, parameter-free; the new channels (split
    evenly before and after the old ones) are zero.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with batch norm and a residual connection.

    N×C_in×H×W → N×C_out×⌈H/stride⌉×⌈W/stride⌉. Where the shape changes the shortcut is option A
    (`_PadShortcut`, no parameters), otherwise the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = (
            _PadShortcut(in_channels, out_channels, stride)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, section 4.2): a 3×3 stem convolution, three stages of
    ``blocks_per_stage`` basic blocks with ``widths`` channels (stride 2 at the start of stages
    2 and 3), global average pooling and a linear classifier.

    Input N×in_channels×H×W (any H, W ≥ 4: 32×32 gives 8×8 maps in the last stage, 28×28 gives
    7×7); output N×num_classes logits. Depth is 6·blocks_per_stage + 2.
    """

    def __init__(
        self,
        blocks_per_stage: int,
        in_channels: int = 3,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages: list[nn.Sequential] = []
        channels = widths[0]
        for index, width in enumerate(widths):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """N×C×H×W → N×num_classes."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def resnet20(in_channels: int = 3, num_classes: int = 10) -> ResNet:
    """ResNet-20 for CIFAR-10 / Fashion-MNIST: 19 convolutions + 1 linear layer, option-A
    (parameter-free) shortcuts, 16/32/64 channels; 269,722 parameters for 3 input channels and
    10 classes. Input N×in_channels×H×W (28×28 or 32×32), output N×num_classes."""
    return ResNet(3, in_channels=in_channels, num_classes=num_classes)


def resnet56(in_channels: int = 3, num_classes: int = 10) -> ResNet:
    """ResNet-56 for CIFAR-10 / Fashion-MNIST: 3 stages × 9 basic blocks, 55 convolutions + 1
    linear layer, option-A shortcuts, 16/32/64 channels; 853,018 parameters for 3 input
    channels and 10 classes (the published 0.85M). Input N×in_channels×H×W, output
    N×num_classes."""
    return ResNet(9, in_channels=in_channels, num_classes=num_classes)


class VGGSmall(nn.Module):
    """A small VGG: 64-64-M-128-128-M-256-256-M (3×3 convolutions with batch norm and ReLU, 2×2
    max pools), global average pooling, then Linear 256 → 256 → num_classes.

    Input N×in_channels×H×W with H, W ≥ 8 (28×28 ends in 3×3 maps, 32×32 in 4×4);
    output N×num_classes logits.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in (64, 128, 256):
            layers += [*_conv_bn_relu(channels, width), *_conv_bn_relu(width, width)]
            layers.append(nn.MaxPool2d(2))
            channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """N×C×H×W → N×num_classes."""
        return self.classifier(self.features(x))


def vgg_small(in_channels: int = 3, num_classes: int = 10) -> VGGSmall:
    """`VGGSmall` with ``in_channels`` input channels and ``num_classes`` outputs."""
    return VGGSmall(in_channels=in_channels, num_classes=num_classes)


#: VGG-16's convolution widths, "M" a 2×2 max pool (Simonyan & Zisserman 2015, configuration D)
VGG16_LAYERS: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                       512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    """CIFAR-style VGG-16 with batch norm: the 13 3×3 convolutions of configuration D (64–512
    channels, each with batch norm and ReLU), five 2×2 max pools, then the usual CIFAR head, a
    single Linear 512 → num_classes; the convolutions have no bias (batch norm follows):
    14,724,042 parameters for 3 channels and 10 classes (the published 14.7M).

    The pools round up (``ceil_mode``), so that 28×28 inputs (Fashion-MNIST) go
    28 → 14 → 7 → 4 → 2 → 1 as 32×32 ones go 32 → 16 → 8 → 4 → 2 → 1; an adaptive average
    pool to 1×1 then takes larger inputs too. Input N×in_channels×H×W with H, W ≥ 1; output
    N×num_classes logits.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in VGG16_LAYERS:
            if width == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += _conv_bn_relu(channels, int(width))
                channels = int(width)
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(channels, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """N×C×H×W → N×num_classes."""
        return self.classifier(self.features(x))


def vgg16(in_channels: int = 3, num_classes: int = 10) -> VGG16:
    """`VGG16` with ``in_channels`` input channels and ``num_classes`` outputs."""
    return VGG16(in_channels=in_channels, num_classes=num_classes)


class PatchEncoder(nn.Module):
    """A transformer encoder classifier on image patches (ViT-style, without a class token):
    a ``patch``×``patch`` convolution of stride ``patch`` embeds the image as tokens of width
    ``dim`` (28×28 or 32×32 images with patch 7: 4×4 = 16 tokens), plus a learned position
    embedding of ``tokens`` positions; ``layers`` post-norm `nn.TransformerEncoderLayer`s
    (``heads`` heads, MLP ``dim`` → ``mlp`` → ``dim``, GELU, batch first); a layer norm, the
    mean over tokens and a linear head.

    Input N×in_channels×H×W with (H // patch)·(W // patch) ≤ ``tokens``; output N×num_classes.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, dim: int = 512,
                 layers: int = 2, heads: int = 8, mlp: int = 2048, patch: int = 7,
                 tokens: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp, dropout=dropout, activation="gelu",
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """N×C×H×W → N×num_classes."""
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # N × T × dim
        if tokens.shape[1] > self.pos.shape[1]:
            raise ValueError(f"{tuple(x.shape[-2:])} images make {tokens.shape[1]} patches, "
                             f"more than the {self.pos.shape[1]} positions of the encoder")
        h = self.encoder(tokens + self.pos[:, : tokens.shape[1]])
        return self.head(self.norm(h).mean(dim=1))


def encoder512(in_channels: int = 1, num_classes: int = 10) -> PatchEncoder:
    """A 2-layer `PatchEncoder` of width 512: 8 heads, MLP 512 → 2048 → 512, 7×7 patches (16
    tokens of a 28×28 or 32×32 image); 6,344,714 parameters for 1 channel and 10 classes."""
    return PatchEncoder(in_channels=in_channels, num_classes=num_classes)


class GPTBlock(nn.Module):
    """A pre-norm transformer decoder block: ``x + attn(ln1(x))`` with causal
    `nn.MultiheadAttention`, then ``x + fc2(gelu(fc1(ln2(x))))``. B×T×dim → B×T×dim."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """B×T×dim → B×T×dim; position t attends to positions ≤ t only."""
        t = x.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False, is_causal=True)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """A decoder-only language model in the style of GPT-2: token and learned position
    embeddings, ``layers`` `GPTBlock`s, a final layer norm and an untied linear head (so that
    the head is a decomposable layer too).

    Input B×T int64 token ids in [0, vocab_size) with T ≤ ``context``; output B×T×vocab_size
    logits of the next token at every position. Weights start as in GPT-2 (normal, std 0.02).
    """

    def __init__(self, vocab_size: int = 256, context: int = 64, dim: int = 128,
                 layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.context = context
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*(GPTBlock(dim, heads) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """B×T token ids → B×T×vocab_size logits."""
        if tokens.dim() != 2 or tokens.shape[1] > self.context:
            raise ValueError(f"expected B×T token ids with T ≤ {self.context}, got shape "
                             f"{tuple(tokens.shape)}")
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.blocks(self.tok(tokens) + self.pos(positions))
        return self.head(self.ln_f(x))


def gpt_tiny(context: int = 64, vocab_size: int = 256) -> GPT:
    """A 2-layer GPT for byte-level text: 128 dimensions, 4 heads, MLP 128 → 512 → 128,
    ``context`` positions (default 64) and ``vocab_size`` tokens (default 256 bytes);
    470,528 parameters at the defaults. Input B×T token ids, output B×T×vocab_size logits."""
    return GPT(vocab_size=vocab_size, context=context, dim=128, layers=2, heads=4)


def _digits_cnn(in_channels: int = 1, num_classes: int = 10) -> DigitsCNN:
    return DigitsCNN(num_classes=num_classes, in_channels=in_channels)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits-cnn": _digits_cnn,
    "encoder512": encoder512,
    "gpt-tiny": gpt_tiny,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "vgg-small": vgg_small,
    "vgg16": vgg16,
}


def build_model(name: str, **kwargs: int) -> nn.Module:
    """Build the reference model ``name`` (a key of `MODELS`); ``kwargs`` go to its constructor
    (``in_channels`` and ``num_classes`` for the image models, ``context`` and ``vocab_size``
    for ``gpt-tiny``). Raises `UnknownModelError` for an unknown name."""
    try:
        factory = MODELS[name]
    except KeyError:
        valid = ", ".join(sorted(MODELS))
        raise UnknownModelError(f"unknown model {name!r}; choose one of: {valid}") from None
    return factory(**kwargs)
