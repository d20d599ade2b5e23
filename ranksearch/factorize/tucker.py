"""Tucker-2 factorization of a convolution over its output and input channels."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import register
from .base import Factorization, Factors, Stage, conv_kwargs, pixels
from .svd import assemble, check_groups, factory, group_shape, grouped_reason, take, truncated_svd

if TYPE_CHECKING:
    from ..calibration import Whitening
    from ..site import Site


@register
class Tucker2(Factorization):
    """Tucker-2 by truncated HOSVD (Kim et al., "Compression of Deep Convolutional Neural
    Networks for Fast and Low Power Mobile Applications", ICLR 2016; De Lathauwer et al. 2000).

    W ≈ core ×0 U_out ×1 U_in, with U_out (T × r_out) and U_in (S × r_in) the leading left
    singular vectors of the mode-0 and mode-1 unfoldings. Layers: ``Conv2d(S, r_in, 1)`` at
    input resolution, ``Conv2d(r_in, r_out, kh×kw)`` with the layer's stride, padding and
    dilation, ``Conv2d(r_out, T, 1)`` with the bias. The rank is ``(r_in, r_out)``.

    A grouped conv (groups g) takes one HOSVD per group at per-group ranks ``(r_in, r_out)``:
    ``Conv2d(S, g·r_in, 1)``, ``Conv2d(g·r_in, g·r_out, kh×kw)``, ``Conv2d(g·r_out, T, 1)``,
    all with groups=g. Its factors carry a leading group dimension.

    Data-aware (`decompose_aware`): the HOSVD of the whitened weight gives the factors, and
    `fit_core` refits the core at each rank in the metric of the whole input moment, so the
    factors at a rank are no longer a slice of those at the maximum (the cache slices, then
    refits once per rank).
    """

    name = "tucker2"
    kinds = ("conv2d",)
    # (g ×) S × r_in, (g ×) T × r_out, (g ×) r_out × r_in × kh × kw
    rank_dims = (("in", -1, 0), ("out", -1, 1), ("core", -4, 1), ("core", -3, 0))
    description = "Tucker-2 (Kim): 1×1 conv S→r_in, k×k conv r_in→r_out, 1×1 conv r_out→T"
    nested = True
    spectral = "per_matrix"  # r_in, r_out from the in- and out-channel unfoldings
    weighs_outputs = True

    def admits_groups(self, site: Site) -> str | None:
        _, s_g, t_g = group_shape(site)
        k = site.kernel_size[0] * site.kernel_size[1]
        return grouped_reason(site, self.name, s_g + k + t_g)

    def max_rank(self, site: Site) -> tuple[int, int]:
        k = site.kernel_size[0] * site.kernel_size[1]
        _, s, t = group_shape(site)
        return (min(s, t * k), min(t, s * k))

    def stages(self, site: Site, rank: tuple[int, int]) -> list[Stage]:
        r_in, r_out = self.normalize_rank(site, rank)
        k = site.kernel_size[0] * site.kernel_size[1]
        g, s, t = site.groups, site.in_features, site.out_features
        p_in, p_out = pixels(site.in_size), pixels(site.out_size)
        bias = t if site.bias else 0
        mid_in, mid_out = g * r_in, g * r_out  # channels between the stages
        core = mid_in * r_out * k
        return [
            Stage("in", s * r_in, s * r_in * p_in, s * p_in, mid_in * p_in),
            Stage("core", core, core * p_out, mid_in * p_in, mid_out * p_out),
            Stage("out", r_out * t + bias, r_out * t * p_out, mid_out * p_out, t * p_out, bias),
        ]

    def input_modes(self, site: Site) -> tuple[int, ...]:
        _, s, _ = group_shape(site)
        return (s, site.kernel_size[0] * site.kernel_size[1])  # in: channels; core: kernel

    def unwhiten(self, factors: Factors, site: Site, whitening: Whitening) -> Factors:
        core = factors["core"]  # (g ×) r_out × r_in × kh × kw
        kernel = whitening.undo(core.flatten(-2), -1, 1).reshape(core.shape)
        return {"in": whitening.undo(factors["in"], -2, 0), "core": kernel,
                "out": whitening.unweight(factors["out"], -2)}

    def fit_core(self, factors: Factors, site: Site, weight: torch.Tensor,
                 whitening: Whitening) -> Factors:
        """The core refitted by least squares in the metric of the whole input moment C and
        the output weights D, given the in and out factors: whitening channels and kernel
        by separate roots (the Kronecker factoring of C) fits the factors' subspaces, and the
        core that minimises ‖D (W − out·core·(in ⊗ I)ᵀ) C^½‖ given them is closed-form,
        core = (AᵀD²A)⁻¹AᵀD²W · C B (BᵀCB)⁻¹ with A the out factor and B = in ⊗ I_{kh·kw}.
        Exact at full rank, as the HOSVD core is."""
        g, s_g, t_g = group_shape(site)
        kh, kw = site.kernel_size
        k = kh * kw
        metric = whitening.metric.to(weight.device).reshape(g, s_g, k, s_g, k)
        w = weight.detach().to(torch.float64).reshape(g, t_g, s_g * k)
        d2 = (torch.ones(g * t_g, dtype=torch.float64, device=weight.device)
              if whitening.output is None else whitening.output.to(weight.device) ** 2)
        d2 = d2.reshape(g, t_g, 1)
        outs = factors["out"].to(torch.float64).reshape(g, t_g, -1)
        ins = factors["in"].to(torch.float64).reshape(g, s_g, -1)
        cores = []
        for c, a, u, wg, dg in zip(metric, outs, ins, w, d2, strict=True):
            r_out, r_in = a.shape[1], u.shape[1]
            left = torch.linalg.solve(a.mT @ (dg * a), a.mT @ (dg * wg))  # r_out × S·k
            cb = torch.einsum("sitj,tb->sibj", c, u).reshape(s_g * k, r_in * k)
            gram = u.mT @ cb.reshape(s_g, k * r_in * k)  # Bᵀ C B, (r_in·k)²
            gram = gram.reshape(r_in, k, r_in, k).reshape(r_in * k, r_in * k)
            core = torch.linalg.solve(gram, (left @ cb).mT).mT
            cores.append(core.reshape(r_out, r_in, kh, kw))
        core = torch.stack(cores) if g > 1 else cores[0]
        if not torch.isfinite(core).all():
            return factors
        return {**factors, "core": core.to(device=factors["core"].device,
                                           dtype=factors["core"].dtype)}

    def decompose(
        self, weight: torch.Tensor, site: Site, rank: tuple[int, int], **options: Any
    ) -> Factors:
        r_in, r_out = self.normalize_rank(site, rank)
        g, _, t_g = group_shape(site)
        top = self.max_rank(site)  # sliceable: the factors at a rank are those at max, cut
        parts = [hosvd(w, *top) for w in weight.reshape(g, t_g, *weight.shape[1:])]
        if g == 1:
            return self.slice(parts[0], site, (r_in, r_out))
        stacked = {key: torch.stack([p[key] for p in parts]) for key in ("in", "core", "out")}
        return self.slice(stacked, site, (r_in, r_out))

    def build(
        self,
        site: Site,
        rank: tuple[int, int],
        factors: Factors | None = None,
        bias: torch.Tensor | None = None,
    ) -> nn.Module:
        r_in, r_out = self.normalize_rank(site, rank)
        where = factory(factors, bias)
        g, s, t = site.groups, site.in_features, site.out_features
        layers = [
            nn.Conv2d(s, g * r_in, 1, groups=g, bias=False, **where),
            nn.Conv2d(g * r_in, g * r_out, **conv_kwargs(site), groups=g, bias=False, **where),
            nn.Conv2d(g * r_out, t, 1, groups=g, bias=site.bias, **where),
        ]
        weights = None
        if factors is not None:
            check_groups(factors, site, {"in": 2, "core": 4, "out": 2})
            # in (g ×) S/g × r_in, core (g ×) r_out × r_in × kh × kw, out (g ×) T/g × r_out
            core = take(take(factors["core"], -4, r_out), -3, r_in)
            weights = [take(factors["in"], -1, r_in).mT, core, take(factors["out"], -1, r_out)]
        return assemble(layers, weights, bias)


def hosvd(weight: torch.Tensor, r_in: int, r_out: int) -> Factors:
    """Truncated Tucker-2 HOSVD of one T × S × kh × kw kernel, in float64, returned in the
    kernel's dtype: ``in`` S × r_in, ``core`` r_out × r_in × kh × kw, ``out`` T × r_out."""
    w = weight.detach().to(torch.float64)
    u_out = truncated_svd(w.reshape(w.shape[0], -1), r_out)[0]
    u_in = truncated_svd(w.transpose(0, 1).reshape(w.shape[1], -1), r_in)[0]
    core = torch.einsum("tsij,ta,sb->abij", w, u_out, u_in)
    return {
        "in": u_in.to(weight.dtype),
        "core": core.to(weight.dtype),
        "out": u_out.to(weight.dtype),
    }
