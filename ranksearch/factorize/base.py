"""The interface every factorization implements, and the cost record of one built stage."""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..errors import InvalidRankError, NotAdmittedError

if TYPE_CHECKING:
    from ..space import Rank, Site

Factors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Stage:
    """One layer of a built factorization, with its exact cost per sample.

    ``params`` counts weights and biases of the stage; ``macs`` its multiply-accumulates for one
    input sample; ``inputs`` and ``outputs`` the activation elements it reads and writes.
    """

    name: str
    params: int
    macs: int
    inputs: int
    outputs: int
    bias: int = 0


def conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one axis (the formula of ``nn.Conv2d``)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class Factorization(ABC):
    """A way to replace a dense layer by a sequence of smaller standard layers.

    Subclasses register by name in `ranksearch.factorize.REGISTRY`. All cost methods are closed
    forms over the `Site` and the rank: nothing is built to price a candidate.

    ``sliceable`` factorizations decompose once at the largest needed rank; every smaller rank
    is a slice of those factors (SVD, HOSVD, TT-SVD). The others (CP, TR) decompose per rank.
    """

    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]
    sliceable: ClassVar[bool] = True
    description: ClassVar[str] = ""

    # -- what a site admits -------------------------------------------------------------------
    def admits(self, site: Site) -> str | None:
        """None when ``site`` admits this factorization, else the reason it does not."""
        if site.kind not in self.kinds:
            return f"{self.name} applies to {'/'.join(self.kinds)} layers, not {site.kind}"
        if site.groups != 1:
            return f"grouped convolution (groups={site.groups}) is not decomposable"
        return None

    def check(self, site: Site) -> None:
        reason = self.admits(site)
        if reason is not None:
            raise NotAdmittedError(
                f"layer {site.name!r} does not admit {self.name!r}: {reason}. "
                f"Its admitted methods are {list(site.methods) or 'none'}."
            )

    @abstractmethod
    def max_rank(self, site: Site) -> Rank:
        """The largest meaningful rank: at it the factorization reproduces the layer exactly."""

    def normalize_rank(self, site: Site, rank: Rank) -> Rank:
        """Validate ``rank`` against the site and return it in canonical form.

        Integer ranks for int-ranked methods; tuples of the same length as `max_rank` for
        tuple-ranked ones (an int is broadcast). Raises `InvalidRankError`.
        """
        self.check(site)
        top = self.max_rank(site)
        if isinstance(top, int):
            if isinstance(rank, tuple) or not is_int(rank):
                raise InvalidRankError(
                    f"{self.name} on {site.name!r} takes an integer rank, got {rank!r}"
                )
            ranks, tops = (int(rank),), (top,)
        else:
            if is_int(rank):
                rank = (int(rank),) * len(top)
            if not isinstance(rank, tuple | list) or len(rank) != len(top):
                raise InvalidRankError(
                    f"{self.name} on {site.name!r} takes {len(top)} ranks "
                    f"(maximum {top}), got {rank!r}"
                )
            if not all(is_int(r) for r in rank):
                raise InvalidRankError(f"ranks must be integers, got {rank!r}")
            ranks, tops = tuple(int(r) for r in rank), top
        for r, t in zip(ranks, tops, strict=True):
            if r < 1:
                raise InvalidRankError(
                    f"rank {rank!r} for {self.name} on {site.name!r} must be at least 1"
                )
            if r > t:
                raise InvalidRankError(
                    f"rank {rank!r} for {self.name} on {site.name!r} exceeds the maximum {top!r}"
                )
        return ranks[0] if isinstance(top, int) else ranks

    # -- exact costs ----------------------------------------------------------------------------
    @abstractmethod
    def stages(self, site: Site, rank: Rank) -> list[Stage]:
        """The stages of the built module with their exact per-sample costs."""

    def params(self, site: Site, rank: Rank) -> int:
        return sum(s.params for s in self.stages(site, rank))

    def macs(self, site: Site, rank: Rank) -> int:
        return sum(s.macs for s in self.stages(site, rank))

    # -- numerics -------------------------------------------------------------------------------
    @abstractmethod
    def decompose(self, weight: torch.Tensor, site: Site, rank: Rank, **options: Any) -> Factors:
        """Factor ``weight`` (the layer's weight) at ``rank``.

        For sliceable methods the factors at a rank hold every smaller rank.
        """

    @abstractmethod
    def build(
        self,
        site: Site,
        rank: Rank,
        factors: Factors | None = None,
        bias: torch.Tensor | None = None,
    ) -> nn.Module:
        """A module of standard torch layers at ``rank``.

        With ``factors`` (at this rank or, for sliceable methods, any larger one) its weights
        are set from them; without, the weights are left at their default initialization (used
        to rebuild the architecture before loading a state dict). ``bias`` is the dense layer's
        bias, placed on the last stage.
        """


def is_int(x: object) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def pixels(size: tuple[int, ...]) -> int:
    """Number of positions in a spatial size (1 for an empty size)."""
    return prod(size) if size else 1


def dense_stage(site: Site) -> Stage:
    """The cost of the layer as it is (convolutions with groups included)."""
    weight = prod(site.weight_shape)
    bias = site.out_features if site.bias else 0
    return Stage(
        name="dense",
        params=weight + bias,
        macs=weight * pixels(site.out_size),
        inputs=site.in_features * pixels(site.in_size),
        outputs=site.out_features * pixels(site.out_size),
        bias=bias,
    )


def conv_kwargs(site: Site) -> dict[str, Any]:
    """Keyword arguments of `nn.Conv2d` for a stage with the site's full spatial kernel."""
    return {
        "kernel_size": site.kernel_size,
        "stride": site.stride,
        "padding": site.padding,
        "dilation": site.dilation,
        "padding_mode": site.padding_mode,
    }


def axis_kwargs(site: Site, axis: int) -> dict[str, Any]:
    """`nn.Conv2d` arguments of a stage that convolves along one axis only (0: height, 1: width).

    A kh×1 stage followed by a 1×kw stage reproduces the site's padding, stride and dilation.
    """
    def pick(pair: tuple[int, int], other: int) -> tuple[int, int]:
        return (pair[0], other) if axis == 0 else (other, pair[1])

    padding = site.padding if isinstance(site.padding, str) else pick(site.padding, 0)
    return {
        "kernel_size": pick(site.kernel_size, 1),
        "stride": pick(site.stride, 1),
        "padding": padding,
        "dilation": pick(site.dilation, 1),
        "padding_mode": site.padding_mode,
    }


def mid_size(site: Site) -> tuple[int, int]:
    """Spatial size after the height stage of a kh×1 then 1×kw pair: (H_out, W_in)."""
    if not site.in_size:
        return ()  # type: ignore[return-value]
    return (site.out_size[0], site.in_size[1])
