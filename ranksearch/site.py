"""The decomposable layer as discovery sees it: a `Site` is one Conv2d or Linear layer of a
traced forward pass, with the shapes and sizes the cost model and the factorizations read.

`find_layers` lists the weights of a model that can be sites (`Layer`): `nn.Linear`,
`nn.Conv2d`, Hugging Face's `Conv1D` (GPT-2's transposed linear layer) and the four
projections of each `nn.MultiheadAttention` (``attn.q_proj``, ``attn.k_proj``,
``attn.v_proj``, ``attn.out_proj``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from math import prod
from typing import Any, Literal

import torch
from torch import nn

from .errors import UnknownLayerError
from .factorize.attention import PROJECTIONS, projection

Rank = int | tuple[int, ...]


@dataclass(frozen=True)
class Site:
    """One Conv2d or linear layer of a model (`nn.Linear`, `Conv1D`, an attention projection).

    ``in_size`` and ``out_size`` are the spatial sizes (H, W) a convolution sees in the traced
    forward pass, or for a linear layer its input's leading dimensions without the batch
    dimension (``()`` for an input of shape (N, I), ``(L,)`` for (N, L, I) or (L, N, I));
    ``calls`` is how often the forward pass ran it (sizes are those of its first call).
    ``methods`` lists the factorizations it admits; when empty, ``reason`` says why it is not
    decomposable.
    """

    name: str
    kind: Literal["conv2d", "linear"]
    in_features: int
    out_features: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    padding_mode: str = "zeros"
    bias: bool = True
    in_size: tuple[int, ...] = ()
    out_size: tuple[int, ...] = ()
    calls: int = 1
    methods: tuple[str, ...] = ()
    reason: str | None = None

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.out_features, self.in_features)
        return (self.out_features, self.in_features // self.groups, *self.kernel_size)

    @property
    def dense_params(self) -> int:
        return prod(self.weight_shape) + (self.out_features if self.bias else 0)

    @property
    def decomposable(self) -> bool:
        return bool(self.methods)

    @classmethod
    def from_module(
        cls,
        name: str,
        module: nn.Module,
        in_size: tuple[int, ...] = (),
        out_size: tuple[int, ...] = (),
    ) -> Site:
        """The site of ``module`` (an `nn.Conv2d`, an `nn.Linear` or a Hugging Face
        `Conv1D`; sizes unknown unless given; costs need traced sizes)."""
        bias = getattr(module, "bias", None) is not None
        if isinstance(module, nn.Conv2d):
            padding = module.padding
            return cls(
                name=name,
                kind="conv2d",
                in_features=module.in_channels,
                out_features=module.out_channels,
                kernel_size=tuple(module.kernel_size),
                stride=tuple(module.stride),
                padding=padding if isinstance(padding, str) else tuple(padding),
                dilation=tuple(module.dilation),
                groups=module.groups,
                padding_mode=module.padding_mode,
                bias=bias,
                in_size=in_size,
                out_size=out_size,
            )
        if isinstance(module, nn.Linear):
            return cls(
                name=name,
                kind="linear",
                in_features=module.in_features,
                out_features=module.out_features,
                bias=bias,
                in_size=in_size,
                out_size=out_size,
            )
        if is_conv1d(module):  # weight in × out
            return cls(
                name=name,
                kind="linear",
                in_features=module.weight.shape[0],
                out_features=module.weight.shape[1],
                bias=bias,
                in_size=in_size,
                out_size=out_size,
            )
        raise UnknownLayerError(
            f"layer {name!r} is a {type(module).__name__}; only nn.Conv2d, nn.Linear, Hugging "
            "Face Conv1D layers and the projections of nn.MultiheadAttention can be factorized"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Site:
        data = dict(data)
        for key in ("kernel_size", "stride", "dilation", "in_size", "out_size", "methods"):
            data[key] = tuple(data[key])
        if not isinstance(data["padding"], str):
            data["padding"] = tuple(data["padding"])
        return cls(**data)


@dataclass(frozen=True)
class Layer:
    """A weight of a model that can be a site, and where it lives.

    ``module`` computes it: the `nn.Linear`, `nn.Conv2d` or `Conv1D` itself, or for a
    projection (``role``, one of ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``) the
    `nn.MultiheadAttention` that holds it. ``owner`` is the dotted name of ``module``: what
    surgery replaces.
    """

    name: str
    owner: str
    module: nn.Module
    role: str | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight in the site's layout (out × in for linear sites)."""
        if self.role is not None:
            return projection(self.module, self.role)[0]  # type: ignore[arg-type]
        weight = self.module.weight
        return weight.mT if is_conv1d(self.module) else weight

    @property
    def bias(self) -> torch.Tensor | None:
        if self.role is not None:
            return projection(self.module, self.role)[1]  # type: ignore[arg-type]
        return self.module.bias

    @property
    def parameters(self) -> tuple[nn.Parameter, ...]:
        """The parameters the weight and bias are read from (packed ones included)."""
        module = self.module
        if self.role == "out_proj":
            module = module.out_proj
        elif self.role is not None:
            keys = ("in_proj_weight", f"{self.role}_weight", "in_proj_bias")
            return tuple(p for k in keys if (p := getattr(module, k, None)) is not None)
        return tuple(p for k in ("weight", "bias") if (p := getattr(module, k, None)) is not None)

    def site(self, in_size: tuple[int, ...] = (), out_size: tuple[int, ...] = ()) -> Site:
        """The site of this layer (sizes unknown unless given)."""
        if self.role is None:
            return Site.from_module(self.name, self.module, in_size, out_size)
        out, inp = self.weight.shape
        return Site(self.name, "linear", inp, out, bias=self.bias is not None,
                    in_size=in_size, out_size=out_size)


def find_layers(model: nn.Module) -> list[Layer]:
    """Every weight of ``model`` that can be a site, in model order (see the module doc)."""
    layers: list[Layer] = []
    attention: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{a}.") or not a for a in attention):
            continue  # out_proj, listed with its attention module
        if isinstance(module, nn.MultiheadAttention):
            attention.append(name)
            layers += [Layer(dotted(name, p), name, module, p) for p in PROJECTIONS]
        elif isinstance(module, nn.Conv2d | nn.Linear) or is_conv1d(module):
            layers.append(Layer(name, name, module))
    return layers


def dotted(prefix: str, name: str) -> str:
    """``prefix.name``, or ``name`` for the root module (prefix ``""``)."""
    return f"{prefix}.{name}" if prefix else name


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``transformers.pytorch_utils.Conv1D`` (checked
    without importing transformers: a model holding one has imported it)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)
