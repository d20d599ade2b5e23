"""Tensor-ring (TR) factorization of Linear layers.

The weight is tensorized as for a TT-matrix (Novikov et al. 2015): ``I = ∏ I_k``,
``O = ∏ O_k``, the tensor ``(I_1·O_1) × … × (I_d·O_d)``, and factored by TR-SVD (Zhao et al.,
"Tensor Ring Decomposition", arXiv 1606.05535, 2016) into cores ``G_k`` of shape
``(r_k, I_k, O_k, r_{k+1})`` with ``r_d = r_0``: a closed ring, as in the TRN layers of Wang et
al., "Wide Compression: Tensor Ring Nets", CVPR 2018. TR-SVD fixes the ranks up front, so TR is
decomposed per rank (not sliceable).
"""

from __future__ import annotations

from collections.abc import Sequence
from math import isqrt, prod
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import register
from .base import Factorization, Factors, Stage, pixels
from .tt import (
    check_bias,
    check_weight,
    core_rows,
    core_weight,
    exact_core,
    factory,
    leading,
    load,
    matrix_modes,
    matrix_tensor,
    next_state,
    set_bias,
    split,
    tt_sweep,
)

if TYPE_CHECKING:
    from ..calibration import Whitening
    from ..site import Rank, Site


class TRLinear(nn.Module):
    """A tensor-ring layer (Wang et al. 2018): input ``(N, *, I)`` → output ``(N, *, O)``.

    ``cores[0]`` is ``Linear(I_1 → r_0·O_1·r_1)``; the ring index ``r_0`` then rides along as a
    batch dimension through the middle cores ``Linear(r_k·I_k → O_k·r_{k+1})``, and the last
    core ``Linear(r_0·r_{d-1}·I_d → O_d)`` closes the ring by contracting it. Scriptable, and
    exportable with a dynamic batch.
    """

    def __init__(
        self,
        in_modes: Sequence[int],
        out_modes: Sequence[int],
        ranks: Sequence[int],
        bias: bool = True,
        **factory: Any,
    ) -> None:
        super().__init__()
        self.in_modes, self.out_modes = tuple(in_modes), tuple(out_modes)
        # the in-mode after each core (1 after the last): a tuple read at index k only, so a
        # saved TorchScript file never holds an out-of-range constant index
        self.next_ins = (*self.in_modes[1:], 1)
        self.ranks = tuple(ranks)
        self.in_features, self.out_features = prod(self.in_modes), prod(self.out_modes)
        ring, d = self.ranks[0], len(self.in_modes)
        bonds = (*self.ranks, ring)
        self.cores = nn.ModuleList(
            nn.Linear(
                i if k == 0 else bonds[k] * i * (ring if k == d - 1 else 1),
                o if k == d - 1 else o * bonds[k + 1] * (ring if k == 0 else 1),
                bias=False,
                **factory,
            )
            for k, (i, o) in enumerate(zip(self.in_modes, self.out_modes, strict=True))
        )
        self.bias = nn.Parameter(torch.zeros(self.out_features, **factory)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ins, outs, ring, d = self.in_modes, self.out_modes, self.ranks[0], len(self.in_modes)
        z = x.reshape(-1, ins[0], self.in_features // ins[0])  # (B, I_1, ∏I_{>1})
        for k, layer in enumerate(self.cores):
            if k == 0:  # → (B·r_0, I_2, ∏I_{>2}, O_1, r_1): the ring index rides as batch
                y = layer(z.transpose(1, 2)).unflatten(2, [ring, -1]).transpose(1, 2)
                z = next_state(y.flatten(0, 1).unsqueeze(2), outs[0], self.next_ins[0])
            elif k < d - 1:
                z = next_state(layer(core_rows(z)), outs[k], self.next_ins[k])
            else:  # (B·r_0, I_d, 1, ∏O_{<d}, r_{d-1}) → rows (B, ∏O_{<d}, r_0·r_{d-1}·I_d)
                z = z.reshape(-1, ring, ins[k], z.shape[3], z.shape[4]).permute(0, 3, 1, 4, 2)
                z = layer(z.flatten(2))
        y = leading(z, x, self.out_features)
        bias = self.bias
        if bias is not None:
            y = y + bias
        return y

    def extra_repr(self) -> str:
        return f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.ranks}"


@register
class TR(Factorization):
    """Tensor ring over ``modes`` tensorized modes of a Linear layer.

    Rank: ``(r_0, r_1, …, r_{d-1})`` with ``r_0`` the ring rank. The maximum: TR-SVD's first
    split keeps ``r_0·r_1`` singular vectors of the ``(I_1·O_1) × rest`` unfolding, so
    ``r_0·r_1 = R = min(I_1·O_1, rest)``, split as evenly as R's divisors allow (``r_0`` the
    largest divisor ≤ √R); then the TT bounds carrying the ring index,
    ``r_{k+1} = min(r_k·I_k·O_k, r_0·∏_{j>k} I_j·O_j)``. At that rank TR-SVD is exact. Smaller
    ranks whose bond exceeds what an unfolding holds get zero-padded cores.
    """

    name = "tr"
    kinds = ("linear",)
    sliceable = False
    exact_at_max = True
    description = "tensor ring (TR-SVD) of the TT-matrix tensorization of a linear layer"

    def __init__(self, modes: int = 3) -> None:
        if modes < 2:
            raise ValueError(f"a tensor ring needs at least 2 modes, got {modes}")
        self.modes = modes

    def _dims(self, site: Site) -> tuple[tuple[int, ...], tuple[int, ...], list[int]]:
        ins, outs = matrix_modes(site, self.modes)
        return ins, outs, [i * o for i, o in zip(ins, outs, strict=True)]

    def max_rank(self, site: Site) -> Rank:
        dims = self._dims(site)[2]
        first = min(dims[0], prod(dims[1:]))
        ring = max(r for r in range(1, isqrt(first) + 1) if first % r == 0)
        ranks = [ring, first // ring]
        for k in range(1, len(dims) - 1):
            ranks.append(min(ranks[k] * dims[k], ring * prod(dims[k + 1 :])))
        return tuple(ranks)

    def stages(self, site: Site, rank: Rank) -> list[Stage]:
        rank = self.normalize_rank(site, rank)
        ins, outs, _ = self._dims(site)
        ring, d, pix = rank[0], self.modes, pixels(site.in_size)
        cyclic, chain = (*rank, ring), (1, *rank[1:], 1)
        bias = site.out_features if site.bias else 0
        stages = []
        for k in range(d):
            rows = pix * prod(outs[:k]) * prod(ins[k + 1 :])
            last = bias if k == d - 1 else 0
            stages.append(Stage(
                name=f"cores.{k}",
                params=cyclic[k] * ins[k] * outs[k] * cyclic[k + 1] + last,
                macs=rows * ring * chain[k] * ins[k] * outs[k] * chain[k + 1],
                inputs=rows * (ring if k > 0 else 1) * chain[k] * ins[k],
                outputs=rows * (ring if k < d - 1 else 1) * outs[k] * chain[k + 1],
                bias=last,
            ))
        return stages

    def input_modes(self, site: Site) -> tuple[int, ...]:
        return matrix_modes(site, self.modes)[0]  # core k holds input mode I_k

    def unwhiten(self, factors: Factors, site: Site, whitening: Whitening) -> Factors:
        out = dict(factors)
        for k in range(len(whitening.modes)):  # every core's dim 1 is its input mode
            out[f"core{k}"] = whitening.undo(factors[f"core{k}"], 1, k)
        return out

    def decompose(self, weight: torch.Tensor, site: Site, rank: Rank, **options: Any) -> Factors:
        """TR-SVD (Zhao et al. 2016) at ``rank``: cores ``core0…`` of shape
        ``(r_k, I_k, O_k, r_{k+1})``. No ``options`` are used."""
        rank = self.normalize_rank(site, rank)
        check_weight(weight, site)
        ins, outs, dims = self._dims(site)
        tensor = matrix_tensor(weight.detach().to(torch.float64), ins, outs)
        ring = rank[0]
        left, rest = split(tensor.reshape(dims[0], -1), ring * rank[1])
        first = left.reshape(dims[0], ring, rank[1]).permute(1, 0, 2)
        rest = rest.reshape(ring, rank[1], *dims[1:]).movedim(0, -1)
        cores = [first, *tt_sweep(rest, (*rank[1:], ring))]
        return {
            f"core{k}": c.reshape(c.shape[0], i, o, c.shape[-1]).to(weight.dtype)
            for k, (c, i, o) in enumerate(zip(cores, ins, outs, strict=True))
        }

    def build(
        self,
        site: Site,
        rank: Rank,
        factors: Factors | None = None,
        bias: torch.Tensor | None = None,
    ) -> nn.Module:
        rank = self.normalize_rank(site, rank)
        check_bias(site, bias)
        ins, outs, _ = self._dims(site)
        module = TRLinear(ins, outs, rank, bias=site.bias, **factory(factors))
        if factors is None:
            return module
        cyclic = (*rank, rank[0])
        for k, layer in enumerate(module.cores):
            expected = (cyclic[k], ins[k], outs[k], cyclic[k + 1])
            core = exact_core(factors, k, expected, self.name, rank)
            if k == 0:  # (r_0, I, O, r_1) → rows (r_0, O, r_1)
                load(layer, core.permute(0, 2, 3, 1))
            else:
                load(layer, core_weight(core, layer.out_features))
        if module.bias is not None:
            set_bias(module.bias, bias, site)
        return module
