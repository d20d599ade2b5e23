"""Matrix SVD factorizations: channel-wise (Conv2d and Linear) and spatial (Jaderberg).

Truncating one SVD at rank r gives the best rank-r approximation of the matrix
(Eckart & Young, "The approximation of one matrix by another of lower rank", Psychometrika
1936), so the factors at one rank hold every smaller rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import InvalidRankError
from . import register
from .base import (
    Factorization,
    Factors,
    Stage,
    axis_kwargs,
    conv_kwargs,
    mid_size,
    pixels,
)

if TYPE_CHECKING:
    from ..space import Site

LOWRANK_MIN_DIM = 2048  # randomized SVD when both matrix dims exceed this ...
LOWRANK_OVERSAMPLE = 16  # ... and the rank plus this oversampling is below half the smaller


def truncated_svd(
    matrix: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U[:, :rank], S[:rank], Vh[:rank]`` of ``matrix``, computed in float64.

    Very large matrices at a rank well below full use `torch.svd_lowrank` (Halko et al. 2011)
    with a fixed seed, which bounds memory and keeps the result reproducible.
    """
    a = matrix.detach().to(torch.float64)
    small = min(a.shape)
    q = rank + LOWRANK_OVERSAMPLE
    if small > LOWRANK_MIN_DIM and 2 * q < small:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(a, q=q, niter=4)
        return u[:, :rank], s[:rank], v[:, :rank].mT
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def split_svd(matrix: torch.Tensor, rank: int) -> Factors:
    """``left @ right`` ≈ ``matrix`` at ``rank``, with √S on both sides, in matrix's dtype."""
    u, s, vh = truncated_svd(matrix, rank)
    root = s.sqrt()
    return {
        "left": (u * root).to(matrix.dtype),
        "right": (root[:, None] * vh).to(matrix.dtype),
    }


def take(factor: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    """The first ``rank`` slices of ``factor`` along ``dim`` (factors may be of higher rank)."""
    if factor.shape[dim] < rank:
        raise InvalidRankError(
            f"factors hold rank {factor.shape[dim]}, fewer than the requested {rank}; "
            "decompose at a rank at least as large"
        )
    return factor.narrow(dim, 0, rank)


def factory(factors: Factors | None, bias: torch.Tensor | None) -> dict[str, Any]:
    """``dtype``/``device`` keywords that put new layers where the factors (or bias) are."""
    like = next(iter(factors.values())) if factors else bias
    return {} if like is None else {"dtype": like.dtype, "device": like.device}


def assemble(
    layers: Sequence[nn.Conv2d | nn.Linear],
    weights: Sequence[torch.Tensor] | None,
    bias: torch.Tensor | None,
) -> nn.Sequential:
    """``layers`` in sequence, their weights set from ``weights`` and ``bias`` on the last."""
    with torch.no_grad():
        if weights is not None:
            for layer, weight in zip(layers, weights, strict=True):
                layer.weight.copy_(weight.reshape(layer.weight.shape))
        if bias is not None:
            if layers[-1].bias is None:
                raise ValueError("a bias was given for a layer built without one")
            layers[-1].bias.copy_(bias)
    return nn.Sequential(*layers)


@register
class SVD(Factorization):
    """Channel-wise truncated SVD (Eckart–Young; Denton et al., NeurIPS 2014).

    Linear O×I: ``Linear(I, R)`` then ``Linear(R, O)``. Conv T×S×kh×kw, seen as the matrix
    T × (S·kh·kw): ``Conv2d(S, R, kh×kw)`` with the layer's stride, padding and dilation, then
    ``Conv2d(R, T, 1)``. The bias goes on the last layer.
    """

    name = "svd"
    kinds = ("conv2d", "linear")
    description = "truncated SVD over channels: k×k conv S→R, 1×1 conv R→T (or two Linears)"

    def max_rank(self, site: Site) -> int:
        return min(site.out_features, self._fan_in(site))

    def _fan_in(self, site: Site) -> int:
        """Columns of the matrix: S·kh·kw for a convolution, I for a linear layer."""
        kh, kw = site.kernel_size if site.kind == "conv2d" else (1, 1)
        return site.in_features * kh * kw

    def stages(self, site: Site, rank: int) -> list[Stage]:
        r = self.normalize_rank(site, rank)
        n, t = self._fan_in(site), site.out_features
        p_in, p_out = pixels(site.in_size), pixels(site.out_size)
        bias = t if site.bias else 0
        return [
            Stage("project", r * n, r * n * p_out, site.in_features * p_in, r * p_out),
            Stage("expand", r * t + bias, r * t * p_out, r * p_out, t * p_out, bias),
        ]

    def decompose(self, weight: torch.Tensor, site: Site, rank: int, **options: Any) -> Factors:
        r = self.normalize_rank(site, rank)
        return split_svd(weight.reshape(site.out_features, -1), r)

    def build(
        self,
        site: Site,
        rank: int,
        factors: Factors | None = None,
        bias: torch.Tensor | None = None,
    ) -> nn.Module:
        r = self.normalize_rank(site, rank)
        where = factory(factors, bias)
        s, t = site.in_features, site.out_features
        layers: list[nn.Conv2d | nn.Linear]
        if site.kind == "linear":
            layers = [
                nn.Linear(s, r, bias=False, **where),
                nn.Linear(r, t, bias=site.bias, **where),
            ]
        else:
            layers = [
                nn.Conv2d(s, r, **conv_kwargs(site), bias=False, **where),
                nn.Conv2d(r, t, 1, bias=site.bias, **where),
            ]
        weights = None
        if factors is not None:
            weights = [take(factors["right"], 0, r), take(factors["left"], 1, r)]
        return assemble(layers, weights, bias)


@register
class SpatialSVD(Factorization):
    """Spatial SVD of a convolution into a kh×1 then a 1×kw convolution.

    Scheme 2 of Jaderberg, Vedaldi & Zisserman, "Speeding up Convolutional Neural Networks with
    Low Rank Expansions", BMVC 2014: the matrix M[(s,i),(t,j)] = W[t,s,i,j] of shape
    (S·kh) × (T·kw), truncated by SVD. The kh×1 stage runs at (H_out, W_in).
    """

    name = "svd_spatial"
    kinds = ("conv2d",)
    description = "spatial SVD (Jaderberg): kh×1 conv S→R, 1×kw conv R→T"

    def admits(self, site: Site) -> str | None:
        reason = super().admits(site)
        if reason is None and site.kernel_size == (1, 1):
            reason = "a 1×1 convolution has no spatial extent to split"
        return reason

    def max_rank(self, site: Site) -> int:
        kh, kw = site.kernel_size
        return min(site.in_features * kh, site.out_features * kw)

    def stages(self, site: Site, rank: int) -> list[Stage]:
        r = self.normalize_rank(site, rank)
        (kh, kw), s, t = site.kernel_size, site.in_features, site.out_features
        p_in, p_mid, p_out = pixels(site.in_size), pixels(mid_size(site)), pixels(site.out_size)
        bias = t if site.bias else 0
        return [
            Stage("vertical", r * s * kh, r * s * kh * p_mid, s * p_in, r * p_mid),
            Stage("horizontal", r * t * kw + bias, r * t * kw * p_out, r * p_mid, t * p_out, bias),
        ]

    def decompose(self, weight: torch.Tensor, site: Site, rank: int, **options: Any) -> Factors:
        r = self.normalize_rank(site, rank)
        (kh, kw), s, t = site.kernel_size, site.in_features, site.out_features
        return split_svd(weight.permute(1, 2, 0, 3).reshape(s * kh, t * kw), r)

    def build(
        self,
        site: Site,
        rank: int,
        factors: Factors | None = None,
        bias: torch.Tensor | None = None,
    ) -> nn.Module:
        r = self.normalize_rank(site, rank)
        where = factory(factors, bias)
        kwidth, s, t = site.kernel_size[1], site.in_features, site.out_features
        layers = [
            nn.Conv2d(s, r, **axis_kwargs(site, 0), bias=False, **where),
            nn.Conv2d(r, t, **axis_kwargs(site, 1), bias=site.bias, **where),
        ]
        weights = None
        if factors is not None:
            left = take(factors["left"], 1, r)  # (S·kh) × r → r × S × kh × 1
            right = take(factors["right"], 0, r)  # r × (T·kw) → T × r × 1 × kw
            weights = [left.mT, right.reshape(r, t, kwidth).transpose(0, 1)]
        return assemble(layers, weights, bias)
