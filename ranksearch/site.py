"""The decomposable layer as discovery sees it: a `Site` is one Conv2d or Linear layer of a
traced forward pass, with the shapes and sizes the cost model and the factorizations read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from math import prod
from typing import Any, Literal

from torch import nn

from .errors import UnknownLayerError

Rank = int | tuple[int, ...]


@dataclass(frozen=True)
class Site:
    """One Conv2d or Linear layer of a model.

    ``in_size`` and ``out_size`` are the spatial sizes (H, W) a convolution sees in the traced
    forward pass, or for a linear layer the leading dimensions between batch and features
    (``()`` for an input of shape (N, I)); ``calls`` is how often the forward pass ran it
    (sizes are those of its first call). ``methods`` lists the factorizations it admits;
    when empty, ``reason`` says why it is not decomposable.
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
        """The site of ``module`` (sizes unknown unless given; costs need traced sizes)."""
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
        raise UnknownLayerError(
            f"layer {name!r} is a {type(module).__name__}; only nn.Conv2d and nn.Linear "
            "layers can be factorized"
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
