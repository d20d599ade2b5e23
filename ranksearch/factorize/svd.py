"""Matrix SVD factorizations: channel-wise (Conv2d and Linear) and spatial (Jaderberg).

Truncating one SVD at rank r gives the best rank-r approximation of the matrix
(Eckart & Young, "The approximation of one matrix by another of lower rank", Psychometrika
1936), so the factors at one rank hold every smaller rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import DecompositionError, InvalidRankError
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
    from ..calibration import Whitening
    from ..site import Site

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


def split_svd_groups(matrices: torch.Tensor, rank: int) -> Factors:
    """`split_svd` of each matrix of the stack ``matrices`` (groups × rows × columns).

    One group gives the 2-D factors of `split_svd`; more give them stacked on a leading group
    dimension: ``left`` groups × rows × rank, ``right`` groups × rank × columns.
    """
    if matrices.shape[0] == 1:
        return split_svd(matrices[0], rank)
    parts = [split_svd(m, rank) for m in matrices]
    return {key: torch.stack([p[key] for p in parts]) for key in ("left", "right")}


def group_shape(site: Site) -> tuple[int, int, int]:
    """(groups, input channels per group, output channels per group) of a layer."""
    g = site.groups
    return g, site.in_features // g, site.out_features // g


def grouped_reason(site: Site, method: str, smallest: int) -> str | None:
    """Why the grouped convolution ``site`` admits no ``method``, or None when it does.

    ``smallest`` is the weights per group of ``method`` at its smallest rank: a grouped
    factorization is meaningful only when that is fewer than one group's dense kernel.
    """
    g, s_g, t_g = group_shape(site)
    kh, kw = site.kernel_size
    dense = t_g * s_g * kh * kw
    if smallest < dense:
        return None
    if s_g == 1 and t_g == 1:
        return (
            f"depthwise convolution (groups={g}): each group's kernel has one input and one "
            "output channel, so no factorization is smaller"
        )
    return (
        f"grouped convolution (groups={g}): per group, {method} at its smallest rank has "
        f"{smallest} weights, no fewer than the {dense} of the {t_g}×{s_g}×{kh}×{kw} kernel, "
        "so it saves nothing"
    )


def check_groups(factors: Factors, site: Site, dims: Mapping[str, int]) -> None:
    """Raise unless ``factors`` are laid out for the site's groups: for one group each factor
    as it is (``dims[key]`` dimensions), for several stacked on a leading group dimension."""
    for key, factor in factors.items():
        extra = factor.dim() - dims[key]
        held = 1 if extra == 0 else factor.shape[0] if extra == 1 else None
        if held != site.groups:
            raise DecompositionError(
                f"factor {key!r} of shape {tuple(factor.shape)} does not fit layer "
                f"{site.name!r} with groups={site.groups} (grouped factors have a leading "
                "group dimension); decompose the layer's weight with its own site"
            )


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

    A grouped conv (groups g) is decomposed per group: each group's (T/g) × (S/g·kh·kw) matrix
    at rank R (the rank is per group), built as ``Conv2d(S, g·R, kh×kw, groups=g)`` then
    ``Conv2d(g·R, T, 1, groups=g)``. Its factors carry a leading group dimension.
    """

    name = "svd"
    kinds = ("conv2d", "linear")
    rank_dims = (("left", -1, 0), ("right", -2, 0))  # (g ×) T × r and (g ×) r × n
    description = "truncated SVD over channels: k×k conv S→R, 1×1 conv R→T (or two Linears)"
    nested = True
    spectral = "single"  # the rank of the out × in·kh·kw matrix
    weighs_outputs = True

    def admits_groups(self, site: Site) -> str | None:
        _, _, t_g = group_shape(site)
        return grouped_reason(site, self.name, self._fan_in(site) + t_g)

    def max_rank(self, site: Site) -> int:
        _, _, t_g = group_shape(site)
        return min(t_g, self._fan_in(site))

    def _fan_in(self, site: Site) -> int:
        """Columns of one group's matrix: S/g·kh·kw for a convolution, I for a linear layer."""
        kh, kw = site.kernel_size if site.kind == "conv2d" else (1, 1)
        return site.in_features // site.groups * kh * kw

    def stages(self, site: Site, rank: int) -> list[Stage]:
        r = self.normalize_rank(site, rank)
        g, n, t = site.groups, self._fan_in(site), site.out_features
        p_in, p_out = pixels(site.in_size), pixels(site.out_size)
        bias = t if site.bias else 0
        mid = g * r  # channels between the stages
        return [
            Stage("project", mid * n, mid * n * p_out, site.in_features * p_in, mid * p_out),
            Stage("expand", r * t + bias, r * t * p_out, mid * p_out, t * p_out, bias),
        ]

    def input_modes(self, site: Site) -> tuple[int, ...]:
        return (self._fan_in(site),)  # one mode: whitened by the whole moment, as SVD-LLM

    def unwhiten(self, factors: Factors, site: Site, whitening: Whitening) -> Factors:
        return {"left": whitening.unweight(factors["left"], -2),
                "right": whitening.undo(factors["right"], -1, 0)}

    def decompose(self, weight: torch.Tensor, site: Site, rank: int, **options: Any) -> Factors:
        r = self.normalize_rank(site, rank)
        g, _, t_g = group_shape(site)
        top = split_svd_groups(weight.reshape(g, t_g, -1), self.max_rank(site))
        return self.slice(top, site, r)  # sliceable: the factors at r are those at max, cut

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
            g = site.groups
            layers = [
                nn.Conv2d(s, g * r, **conv_kwargs(site), groups=g, bias=False, **where),
                nn.Conv2d(g * r, t, 1, groups=g, bias=site.bias, **where),
            ]
        weights = None
        if factors is not None:
            check_groups(factors, site, {"left": 2, "right": 2})
            # right (g ×) r × n → (g·r) × S/g × kh × kw; left (g ×) T/g × r → T × r × 1 × 1
            weights = [take(factors["right"], -2, r), take(factors["left"], -1, r)]
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
    rank_dims = (("left", -1, 0), ("right", -2, 0))  # (S·kh) × r and r × (T·kw)
    description = "spatial SVD (Jaderberg): kh×1 conv S→R, 1×kw conv R→T"
    nested = True
    spectral = "single"
    weighs_outputs = True

    def admits(self, site: Site) -> str | None:
        reason = super().admits(site)
        if reason is None and site.kernel_size == (1, 1):
            reason = "a 1×1 convolution has no spatial extent to split"
        return reason

    def max_rank(self, site: Site) -> int:
        kh, kw = site.kernel_size
        return min(site.in_features * kh, site.out_features * kw)

    def spectral_matrices(self, site: Site, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The (S·kh) × (T·kw) matrix of Jaderberg et al. that the rank truncates."""
        (kh, kw), s, t = site.kernel_size, site.in_features, site.out_features
        return (weight.permute(1, 2, 0, 3).reshape(s * kh, t * kw),)

    def stages(self, site: Site, rank: int) -> list[Stage]:
        r = self.normalize_rank(site, rank)
        (kh, kw), s, t = site.kernel_size, site.in_features, site.out_features
        p_in, p_mid, p_out = pixels(site.in_size), pixels(mid_size(site)), pixels(site.out_size)
        bias = t if site.bias else 0
        return [
            Stage("vertical", r * s * kh, r * s * kh * p_mid, s * p_in, r * p_mid),
            Stage("horizontal", r * t * kw + bias, r * t * kw * p_out, r * p_mid, t * p_out, bias),
        ]

    def input_modes(self, site: Site) -> tuple[int, ...]:
        kh, kw = site.kernel_size
        return (site.in_features * kh, kw)  # the rows (s, i) of the matrix, and j

    def unwhiten(self, factors: Factors, site: Site, whitening: Whitening) -> Factors:
        right = factors["right"]  # r × (T·kw): its T holds the outputs, its kw input mode j
        j = whitening.undo(right.reshape(right.shape[0], site.out_features, -1), -1, 1)
        j = whitening.unweight(j, 1)
        return {"left": whitening.undo(factors["left"], 0, 0), "right": j.reshape(right.shape)}

    def decompose(self, weight: torch.Tensor, site: Site, rank: int, **options: Any) -> Factors:
        r = self.normalize_rank(site, rank)
        (kh, kw), s, t = site.kernel_size, site.in_features, site.out_features
        top = split_svd(weight.permute(1, 2, 0, 3).reshape(s * kh, t * kw), self.max_rank(site))
        return self.slice(top, site, r)  # sliceable: the factors at r are those at max, cut

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
