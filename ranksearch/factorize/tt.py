"""Tensor-train (TT) factorization of Linear and Conv2d layers.

Linear layers become TT-matrices (Novikov et al., "Tensorizing Neural Networks", NeurIPS 2015):
``I = ∏ I_k`` and ``O = ∏ O_k`` are split into ``d`` modes and the weight, reshaped to
``(I_1·O_1) × … × (I_d·O_d)``, is factored by TT-SVD (Oseledets, SIAM J. Sci. Comput. 2011)
into cores ``G_k`` of shape ``(r_{k-1}, I_k, O_k, r_k)``, ``r_0 = r_d = 1``. Convolutions
factor the kernel ordered (in, height, width, out) into four cores run as
1×1 → kh×1 → 1×kw → 1×1 convolutions (the TT convolution whose costs Su et al. give; Garipov et
al., "Ultimate tensorization", 2016, tensorize the channels instead).

TT is decomposed per rank (not sliceable): TT-SVD at a smaller rank truncates the first
unfolding and then factors what is left, so its later cores are not slices of the cores at a
larger rank (slicing those fits worse).

`TTLinear` (and `TRLinear` in `tr`) reshape with the batch inferred, so they script with
`torch.jit.script` and export with a dynamic batch (`torch.export`, ONNX).
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import InvalidRankError
from . import register
from .base import Factorization, Factors, Stage, axis_kwargs, mid_size, pixels

if TYPE_CHECKING:
    from ..calibration import Whitening
    from ..site import Rank, Site


# -- helpers shared with tr ------------------------------------------------------------------------
def factor_dims(n: int, d: int) -> tuple[int, ...]:
    """Split ``n`` into ``d`` balanced factors, largest first, padded with 1s.

    The prime factors are dealt, largest first, to the mode with the smallest product:
    ``factor_dims(64, 3) == (4, 4, 4)``, ``factor_dims(12, 2) == (4, 3)``,
    ``factor_dims(7, 3) == (7, 1, 1)``.
    """
    if n < 1 or d < 1:
        raise ValueError(f"factor_dims needs n >= 1 and d >= 1, got n={n}, d={d}")
    primes, rest, p = [], n, 2
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    modes = [1] * d
    for q in sorted(primes, reverse=True):
        modes[modes.index(min(modes))] *= q
    return tuple(sorted(modes, reverse=True))


def split(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``U_r`` (m×r, orthonormal columns) and ``S_r V_rᵀ`` (r×n) of the truncated SVD.

    When the matrix has fewer than ``rank`` singular values, both are padded with zeros, so
    every requested core shape can be built (the padded slices contribute nothing).
    """
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = min(rank, s.numel())
    left = matrix.new_zeros(matrix.shape[0], rank)
    right = matrix.new_zeros(rank, matrix.shape[1])
    left[:, :k] = u[:, :k]
    right[:k] = s[:k, None] * vh[:k]
    return left, right


def tt_sweep(tensor: torch.Tensor, bonds: Sequence[int]) -> list[torch.Tensor]:
    """TT-SVD (Oseledets 2011) of ``tensor`` of shape ``(bonds[0], n_1, …, n_m, bonds[-1])``.

    Returns cores ``(bonds[k], n_{k+1}, bonds[k+1])``, all but the last left-orthogonal.
    ``bonds[0]`` and ``bonds[-1]`` are the outer sizes (1 for a plain TT).
    """
    modes = tensor.shape[1:-1]
    cores, rest = [], tensor
    for k, n in enumerate(modes[:-1]):
        left, rest = split(rest.reshape(bonds[k] * n, -1), bonds[k + 1])
        cores.append(left.reshape(bonds[k], n, bonds[k + 1]))
    cores.append(rest.reshape(bonds[-2], modes[-1], bonds[-1]))
    return cores


def matrix_modes(site: Site, d: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The input and output modes ``(I_1…I_d), (O_1…O_d)`` of a linear site."""
    return factor_dims(site.in_features, d), factor_dims(site.out_features, d)


def matrix_tensor(weight: torch.Tensor, ins: Sequence[int], outs: Sequence[int]) -> torch.Tensor:
    """An ``O×I`` weight as the tensor ``(I_1·O_1) × … × (I_d·O_d)`` (index ``i_k·O_k + o_k``)."""
    d = len(ins)
    order = [j for k in range(d) for j in (d + k, k)]
    dims = [i * o for i, o in zip(ins, outs, strict=True)]
    return weight.reshape(*outs, *ins).permute(order).reshape(dims)


def core_weight(core: torch.Tensor, rows: int) -> torch.Tensor:
    """The `nn.Linear` weight of a core ``(r_a, I, O, r_b)`` reading ``(r_a, I)`` last.

    Its output features are ``(O, r_b)`` split into ``rows`` rows: ``rows = O·r_b`` for a
    chain core, ``rows = O`` when ``r_b`` is folded into the input (a ring closed by reshape).
    """
    return core.permute(2, 3, 0, 1).reshape(rows, -1)


def core_rows(z: torch.Tensor) -> torch.Tensor:
    """State ``(B, I_k, ∏I_{>k}, ∏O_{<k}, r_{k-1})`` as the rows ``(B, ∏I_{>k}, ∏O_{<k},
    r_{k-1}·I_k)`` that core k reads."""
    return z.permute(0, 2, 3, 4, 1).flatten(3)


def next_state(y: torch.Tensor, out_mode: int, next_in: int) -> torch.Tensor:
    """Core k's output ``(B, ∏I_{>k}, ∏O_{<k}, O_k·r_k)`` as the state of core k+1,
    ``(B, I_{k+1}, ∏I_{>k+1}, ∏O_{≤k}, r_k)`` (``next_in = 1`` after the last core).

    The batch is inferred (-1), so scripted and exported modules keep it dynamic.
    """
    rest, done, width = y.shape[1], y.shape[2], y.shape[3]
    return y.reshape(-1, next_in, rest // next_in, done * out_mode, width // out_mode)


def leading(y: torch.Tensor, x: torch.Tensor, features: int) -> torch.Tensor:
    """``y`` reshaped to the leading dims of the input ``x`` and ``features`` outputs."""
    return y.reshape(list(x.shape[:-1]) + [features])  # noqa: RUF005 (TorchScript: no *list)


def load(layer: nn.Module, weight: torch.Tensor) -> None:
    """Copy ``weight`` (reshaped to the layer's weight) into ``layer``."""
    with torch.no_grad():
        layer.weight.copy_(weight.reshape(layer.weight.shape))


def exact_core(
    factors: Factors, k: int, expected: tuple[int, ...], method: str, rank: Rank
) -> torch.Tensor:
    """Core ``k`` of ``factors``, which must have the shape rank ``rank`` needs."""
    core = factors[f"core{k}"]
    if tuple(core.shape) != expected:
        raise InvalidRankError(
            f"{method} is not sliceable: factor 'core{k}' has shape {tuple(core.shape)}, "
            f"rank {rank!r} needs {expected}; decompose at this rank"
        )
    return core


def check_weight(weight: torch.Tensor, site: Site) -> None:
    if tuple(weight.shape) != site.weight_shape:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} does not fit layer {site.name!r} "
            f"(expected {site.weight_shape})"
        )


def set_bias(param: torch.Tensor, bias: torch.Tensor | None, site: Site) -> None:
    """Fill the built bias with the dense one (zeros when none is given)."""
    with torch.no_grad():
        if bias is None:
            param.zero_()
        else:
            param.copy_(bias.reshape(site.out_features))


def check_bias(site: Site, bias: torch.Tensor | None) -> None:
    if bias is not None and not site.bias:
        raise ValueError(f"layer {site.name!r} has no bias, but a bias was given")


def factory(factors: Factors | None) -> dict[str, Any]:
    """Device and dtype of the built layers: those of the factors, else torch's defaults."""
    if not factors:
        return {}
    first = next(iter(factors.values()))
    return {"device": first.device, "dtype": first.dtype}


# -- the built linear module ---------------------------------------------------------------------
class TTLinear(nn.Module):
    """A TT-matrix layer (Novikov et al. 2015): input ``(N, *, I)`` → output ``(N, *, O)``.

    Core k is ``cores[k]``, a bias-free ``Linear(r_{k-1}·I_k → O_k·r_k)``; the forward pass
    contracts the tensorized input with the cores in turn, reshaping in between. Scriptable,
    and exportable with a dynamic batch.
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
        bonds = (1, *self.ranks, 1)
        self.cores = nn.ModuleList(
            nn.Linear(bonds[k] * i, o * bonds[k + 1], bias=False, **factory)
            for k, (i, o) in enumerate(zip(self.in_modes, self.out_modes, strict=True))
        )
        self.bias = nn.Parameter(torch.zeros(self.out_features, **factory)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ins, outs = self.in_modes, self.out_modes
        z = x.reshape(-1, ins[0], self.in_features // ins[0], 1, 1)  # (B, I_1, ∏I_{>1}, 1, 1)
        for k, layer in enumerate(self.cores):
            z = next_state(layer(core_rows(z)), outs[k], self.next_ins[k])
        y = leading(z, x, self.out_features)
        bias = self.bias
        if bias is not None:
            y = y + bias
        return y

    def extra_repr(self) -> str:
        return f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.ranks}"


# -- the factorization ---------------------------------------------------------------------------
@register
class TT(Factorization):
    """Tensor train: TT-matrix for Linear (``modes`` modes per side), 4-core TT for Conv2d.

    Rank: the inner TT ranks, ``d-1`` of them for a linear layer, ``(r1, r2, r3)`` for a
    convolution. The maximum: each bond at the rank of its unfolding,
    ``r_k = min(∏_{j≤k} n_j, ∏_{j>k} n_j)``, where TT-SVD is exact. Decomposed per rank.
    """

    name = "tt"
    kinds = ("conv2d", "linear")
    sliceable = False
    exact_at_max = True
    description = "tensor train (TT-SVD): TT-matrix for linear, in-h-w-out cores for conv"

    def __init__(self, modes: int = 3) -> None:
        if modes < 2:
            raise ValueError(f"a TT-matrix needs at least 2 modes, got {modes}")
        self.modes = modes

    def max_rank(self, site: Site) -> Rank:
        if site.kind == "linear":
            ins, outs = matrix_modes(site, self.modes)
            dims = [i * o for i, o in zip(ins, outs, strict=True)]
        else:
            dims = [site.in_features, *site.kernel_size, site.out_features]
        return tuple(min(prod(dims[:k]), prod(dims[k:])) for k in range(1, len(dims)))

    def stages(self, site: Site, rank: Rank) -> list[Stage]:
        rank = self.normalize_rank(site, rank)
        bias = site.out_features if site.bias else 0
        if site.kind == "conv2d":
            return self._conv_stages(site, rank, bias)
        ins, outs = matrix_modes(site, self.modes)
        bonds, pix, d = (1, *rank, 1), pixels(site.in_size), self.modes
        stages = []
        for k in range(d):
            rows = pix * prod(outs[:k]) * prod(ins[k + 1 :])
            weights = bonds[k] * ins[k] * outs[k] * bonds[k + 1]
            last = bias if k == d - 1 else 0
            stages.append(Stage(
                name=f"cores.{k}",
                params=weights + last,
                macs=rows * weights,
                inputs=rows * bonds[k] * ins[k],
                outputs=rows * outs[k] * bonds[k + 1],
                bias=last,
            ))
        return stages

    @staticmethod
    def _conv_stages(site: Site, rank: tuple[int, ...], bias: int) -> list[Stage]:
        r1, r2, r3 = rank
        kh, kw = site.kernel_size
        s, t = site.in_features, site.out_features
        pin, pmid, pout = pixels(site.in_size), pixels(mid_size(site)), pixels(site.out_size)
        return [
            Stage("0", s * r1, s * r1 * pin, s * pin, r1 * pin),
            Stage("1", r1 * kh * r2, r1 * kh * r2 * pmid, r1 * pin, r2 * pmid),
            Stage("2", r2 * kw * r3, r2 * kw * r3 * pout, r2 * pmid, r3 * pout),
            Stage("3", r3 * t + bias, r3 * t * pout, r3 * pout, t * pout, bias=bias),
        ]

    def input_modes(self, site: Site) -> tuple[int, ...]:
        if site.kind == "linear":
            return matrix_modes(site, self.modes)[0]  # core k holds input mode I_k
        return (site.in_features, *site.kernel_size)  # cores 0, 1, 2

    def unwhiten(self, factors: Factors, site: Site, whitening: Whitening) -> Factors:
        out = dict(factors)
        for k in range(len(whitening.modes)):  # every core's dim 1 is its input mode
            out[f"core{k}"] = whitening.undo(factors[f"core{k}"], 1, k)
        return out

    def decompose(self, weight: torch.Tensor, site: Site, rank: Rank, **options: Any) -> Factors:
        """TT-SVD of the weight truncated at ``rank``; cores ``core0…``.

        Linear cores have shape ``(r_{k-1}, I_k, O_k, r_k)``, conv cores ``(r_{k-1}, n_k, r_k)``
        over the modes (in, kh, kw, out). No ``options`` are used.
        """
        rank = self.normalize_rank(site, rank)
        check_weight(weight, site)
        w = weight.detach().to(torch.float64)
        if site.kind == "linear":
            ins, outs = matrix_modes(site, self.modes)
            tensor = matrix_tensor(w, ins, outs)
        else:
            tensor = w.permute(1, 2, 3, 0)
        cores = tt_sweep(tensor.reshape(1, *tensor.shape, 1), (1, *rank, 1))
        if site.kind == "linear":
            cores = [
                c.reshape(c.shape[0], i, o, c.shape[-1])
                for c, i, o in zip(cores, ins, outs, strict=True)
            ]
        return {f"core{k}": c.to(weight.dtype) for k, c in enumerate(cores)}

    def build(
        self,
        site: Site,
        rank: Rank,
        factors: Factors | None = None,
        bias: torch.Tensor | None = None,
    ) -> nn.Module:
        rank = self.normalize_rank(site, rank)
        check_bias(site, bias)
        bonds, kw = (1, *rank, 1), factory(factors)
        if site.kind == "linear":
            ins, outs = matrix_modes(site, self.modes)
            module: nn.Module = TTLinear(ins, outs, rank, bias=site.bias, **kw)
            layers, bias_param = list(module.cores), module.bias
        else:
            r1, r2, r3 = rank
            module = nn.Sequential(
                nn.Conv2d(site.in_features, r1, 1, bias=False, **kw),
                nn.Conv2d(r1, r2, **axis_kwargs(site, 0), bias=False, **kw),
                nn.Conv2d(r2, r3, **axis_kwargs(site, 1), bias=False, **kw),
                nn.Conv2d(r3, site.out_features, 1, bias=site.bias, **kw),
            )
            layers, bias_param = list(module), module[3].bias
        if factors is None:
            return module
        for k, layer in enumerate(layers):
            core = exact_core(factors, k, self._core_shape(site, bonds, k), self.name, rank)
            if site.kind == "linear":
                load(layer, core_weight(core, layer.out_features))
            elif k < 3:  # (r_{k-1}, n_k, r_k) → (r_k, r_{k-1}, ·, ·); core0 reads S as input
                load(layer, core.permute(2, 0, 1))
            else:  # (r3, T, 1) → (T, r3, 1, 1)
                load(layer, core.permute(1, 0, 2))
        if bias_param is not None:
            set_bias(bias_param, bias, site)
        return module

    def _core_shape(self, site: Site, bonds: Sequence[int], k: int) -> tuple[int, ...]:
        """The shape of factor ``core{k}`` at the bonds ``(1, *rank, 1)``."""
        if site.kind == "linear":
            ins, outs = matrix_modes(site, self.modes)
            return (bonds[k], ins[k], outs[k], bonds[k + 1])
        modes = (site.in_features, *site.kernel_size, site.out_features)
        return (bonds[k], modes[k], bonds[k + 1])
