"""Tucker-2 factorization of a convolution over its output and input channels."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import register
from .base import Factorization, Factors, Stage, conv_kwargs, pixels
from .svd import assemble, factory, take, truncated_svd

if TYPE_CHECKING:
    from ..space import Site


@register
class Tucker2(Factorization):
    """Tucker-2 by truncated HOSVD (Kim et al., "Compression of Deep Convolutional Neural
    Networks for Fast and Low Power Mobile Applications", ICLR 2016; De Lathauwer et al. 2000).

    W ≈ core ×0 U_out ×1 U_in, with U_out (T × r_out) and U_in (S × r_in) the leading left
    singular vectors of the mode-0 and mode-1 unfoldings. Layers: ``Conv2d(S, r_in, 1)`` at
    input resolution, ``Conv2d(r_in, r_out, kh×kw)`` with the layer's stride, padding and
    dilation, ``Conv2d(r_out, T, 1)`` with the bias. The rank is ``(r_in, r_out)``.
    """

    name = "tucker2"
    kinds = ("conv2d",)
    description = "Tucker-2 (Kim): 1×1 conv S→r_in, k×k conv r_in→r_out, 1×1 conv r_out→T"

    def max_rank(self, site: Site) -> tuple[int, int]:
        k = site.kernel_size[0] * site.kernel_size[1]
        s, t = site.in_features, site.out_features
        return (min(s, t * k), min(t, s * k))

    def stages(self, site: Site, rank: tuple[int, int]) -> list[Stage]:
        r_in, r_out = self.normalize_rank(site, rank)
        k = site.kernel_size[0] * site.kernel_size[1]
        s, t = site.in_features, site.out_features
        p_in, p_out = pixels(site.in_size), pixels(site.out_size)
        bias = t if site.bias else 0
        core = r_in * r_out * k
        return [
            Stage("in", s * r_in, s * r_in * p_in, s * p_in, r_in * p_in),
            Stage("core", core, core * p_out, r_in * p_in, r_out * p_out),
            Stage("out", r_out * t + bias, r_out * t * p_out, r_out * p_out, t * p_out, bias),
        ]

    def decompose(
        self, weight: torch.Tensor, site: Site, rank: tuple[int, int], **options: Any
    ) -> Factors:
        r_in, r_out = self.normalize_rank(site, rank)
        w = weight.detach().to(torch.float64)
        u_out = truncated_svd(w.reshape(w.shape[0], -1), r_out)[0]
        u_in = truncated_svd(w.transpose(0, 1).reshape(w.shape[1], -1), r_in)[0]
        core = torch.einsum("tsij,ta,sb->abij", w, u_out, u_in)
        return {
            "in": u_in.to(weight.dtype),
            "core": core.to(weight.dtype),
            "out": u_out.to(weight.dtype),
        }

    def build(
        self,
        site: Site,
        rank: tuple[int, int],
        factors: Factors | None = None,
        bias: torch.Tensor | None = None,
    ) -> nn.Module:
        r_in, r_out = self.normalize_rank(site, rank)
        where = factory(factors, bias)
        s, t = site.in_features, site.out_features
        layers = [
            nn.Conv2d(s, r_in, 1, bias=False, **where),
            nn.Conv2d(r_in, r_out, **conv_kwargs(site), bias=False, **where),
            nn.Conv2d(r_out, t, 1, bias=site.bias, **where),
        ]
        weights = None
        if factors is not None:
            core = take(take(factors["core"], 0, r_out), 1, r_in)
            weights = [take(factors["in"], 1, r_in).mT, core, take(factors["out"], 1, r_out)]
        return assemble(layers, weights, bias)
