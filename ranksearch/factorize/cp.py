"""CP (CANDECOMP/PARAFAC) factorizations of Conv2d layers.

Two tensor views of a ``T×S×kh×kw`` kernel, each fitted by two algorithms:

* ``cp3`` / ``cp3_tpm`` (Astrid & Lee, "Deep compression of convolutional neural networks with
  low-rank approximation", ETRI Journal 2018): a 3-way CP of ``T × S × (kh·kw)``, built as a
  1×1 conv S→R, a depthwise kh×kw conv (the layer's stride, padding and dilation) and a
  1×1 conv R→T.
* ``cp4`` / ``cp4_tpm`` (Lebedev et al., "Speeding-up convolutional neural networks using
  fine-tuned CP-decomposition", ICLR 2015): a 4-way CP of ``T × S × kh × kw``, built as a
  1×1 conv S→R, a depthwise kh×1 conv, a depthwise 1×kw conv and a 1×1 conv R→T.

The plain names fit by alternating least squares (tensorly's ``parafac``); the ``_tpm`` names
by the greedy tensor power method of Astrid & Lee (Algorithm 1, after Allen, "Sparse
higher-order principal components analysis", AISTATS 2012). Factors are mode matrices with one
column per component (``out`` T×R, ``in`` S×R, and ``spatial`` (kh·kw)×R or ``height`` kh×R
and ``width`` kw×R); the component weights are absorbed and every component has the same
column norm in every mode, so no factor grows while another shrinks.

ALS fits are not nested across ranks, so these factorizations are not sliceable: each rank is
decomposed on its own (TPM components are nested, and a rank costs only its own components).

None is exact at its maximal rank (``exact_at_max`` is False): `max_rank` caps the generic
bound on the CP rank, which need not reach the kernel's CP rank, and neither fit is
guaranteed to find an exact CP at that rank (ALS is a local method stopped after ``n_iter``
sweeps; the greedy power method deflates one rank-one term at a time, which is exact only for
orthogonally decomposable kernels). On eight random 3×3 and 3×5 kernels with 3 to 10
channels, the output error relative to the dense layer at the maximal rank was 4e-7 to 0.015
for cp3, 2e-6 to 0.21 for cp4, 0.07 to 0.27 for cp3_tpm and 0.10 to 0.40 for cp4_tpm.
"""

from __future__ import annotations

from abc import abstractmethod
from math import prod
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..errors import DecompositionError, InvalidRankError, NotAdmittedError
from . import register
from .base import (
    Factorization,
    Factors,
    Spectral,
    Stage,
    axis_kwargs,
    conv_kwargs,
    mid_size,
    pixels,
)

if TYPE_CHECKING:
    from ..calibration import Whitening
    from ..site import Site


class _CP(Factorization):
    """Shared machinery: the kernel as a tensor, ALS fitting, checks and building."""

    kinds: ClassVar[tuple[str, ...]] = ("conv2d",)
    sliceable: ClassVar[bool] = False
    exact_at_max: ClassVar[bool] = False  # see the module docstring
    modes: ClassVar[tuple[str, ...]]  # factor names, in the order of the tensor's modes
    alternative: ClassVar[str]  # the same layers fitted by the other algorithm
    nested: ClassVar[bool] = False  # ALS fits at two ranks share no components
    # one rank for both channel unfoldings: a proxy, as a CP rank has no matrix of its own
    spectral: ClassVar[Spectral | None] = "shared"
    weighs_outputs: ClassVar[bool] = True

    # -- the tensor view ------------------------------------------------------------------------
    @abstractmethod
    def tensor_shape(self, site: Site) -> tuple[int, ...]:
        """The mode sizes of the kernel as the tensor this method factors."""

    def max_rank(self, site: Site) -> int:
        """The largest rank offered: the generic CP rank bound (product of the mode sizes
        over the largest), at most ``4·max(S, T)``.

        The cap sits just below the rank at which a 3×3 layer with S = T costs as much as the
        dense one (about 4.5·S), and keeps ALS away from thousands of components. A fitted CP
        at this rank reproduces the layer only approximately (``exact_at_max`` is False).
        """
        shape = self.tensor_shape(site)
        return min(prod(shape) // max(shape), 4 * max(site.in_features, site.out_features))

    # -- numerics -------------------------------------------------------------------------------
    def input_modes(self, site: Site) -> tuple[int, ...]:
        return self.tensor_shape(site)[1:]  # in, then the kernel's mode(s)

    def unwhiten(self, factors: Factors, site: Site, whitening: Whitening) -> Factors:
        """Each input mode's factor times its inverse root, the output factor divided by the
        output weights, the components balanced again."""
        out = whitening.unweight(factors[self.modes[0]].to(torch.float64), 0)
        mats = [out, *(whitening.undo(factors[m], 0, k) for k, m in enumerate(self.modes[1:]))]
        return dict(zip(self.modes, _balance(out.new_ones(out.shape[1]), mats), strict=True))

    def decompose(self, weight: torch.Tensor, site: Site, rank: int, **options: Any) -> Factors:
        """CP factors of ``weight`` at ``rank``, on its dtype and device.

        Raises `DecompositionError` when the weight or the fitted factors are not finite, or
        the fit is worse than the zero tensor.
        """
        rank = self.normalize_rank(site, rank)
        if tuple(weight.shape) != site.weight_shape:
            raise DecompositionError(
                f"the weight of layer {site.name!r} has shape {tuple(weight.shape)}, "
                f"but the site expects {site.weight_shape}"
            )
        if not torch.isfinite(weight).all():
            raise DecompositionError(
                f"the weight of layer {site.name!r} has NaN or infinite entries; "
                f"{self.name} cannot decompose it"
            )
        tensor = _float64(weight).reshape(self.tensor_shape(site))
        peak = tensor.abs().max()  # fit at unit scale: no overflow, whatever the weight's scale
        if peak == 0:
            factors = [tensor.new_zeros(n, rank) for n in tensor.shape]
        else:
            try:
                weights, factors = self.fit(tensor / peak, rank, **options)
            except DecompositionError as e:
                raise self._failure(site, rank, str(e)) from e
            factors = _balance(weights * peak, factors)
        out = [f.to(dtype=weight.dtype, device=weight.device) for f in factors]
        self._check(site, rank, tensor, [f.to(tensor) for f in out], peak)
        return dict(zip(self.modes, out, strict=True))

    def fit(
        self,
        tensor: torch.Tensor,
        rank: int,
        *,
        n_iter: int = 200,
        tol: float = 1e-8,
        svd_init_max: int = 2**22,
        seed: int = 0,
        memory_max: int = 2**31,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """CP-ALS (tensorly ``parafac`` on the numpy backend, in float64).

        ``n_iter`` sweeps at most, stopping when the relative error changes by less than
        ``tol``. Initialized from the leading singular vectors of the unfoldings, or, for
        tensors of more than ``svd_init_max`` entries (a memory guard), from factors drawn
        with ``seed``. Each sweep forms a Khatri-Rao product of (entries / mode size) × rank
        for every mode; above ``memory_max`` bytes it raises `DecompositionError` instead (the
        process would hold a few times that). Returns the component weights and the
        (unit-column) factors.
        """
        import warnings

        import numpy as np
        import tensorly as tl
        from tensorly.decomposition import parafac

        kr_bytes = 8 * rank * max(tensor.numel() // n for n in tensor.shape)
        if kr_bytes > memory_max:
            raise DecompositionError(
                f"ALS would form a {kr_bytes / 2**30:.1f} GiB Khatri-Rao product, more than "
                f"memory_max={memory_max} bytes"
            )
        array = tensor.cpu().numpy()
        init = "svd" if array.size <= svd_init_max else "random"
        try:
            with tl.backend_context("numpy", local_threadsafe=True), warnings.catch_warnings():
                # a rank above a mode size is expected; tensorly pads that mode's init randomly
                warnings.filterwarnings("ignore", "Trying to compute SVD", UserWarning)
                weights, factors = parafac(
                    array, rank, n_iter_max=n_iter, init=init, tol=tol,
                    normalize_factors=True, random_state=seed,
                )
        except np.linalg.LinAlgError as e:
            raise DecompositionError(f"ALS met a singular system ({e})") from e
        return (
            torch.as_tensor(np.asarray(weights, dtype=np.float64), device=tensor.device),
            [torch.as_tensor(np.asarray(f, dtype=np.float64), device=tensor.device)
             for f in factors],
        )

    def _check(
        self,
        site: Site,
        rank: int,
        tensor: torch.Tensor,
        factors: list[torch.Tensor],
        peak: torch.Tensor,
    ) -> None:
        """Refuse factors that are not finite or fit worse than zeros (a degenerate CP)."""
        finite = all(torch.isfinite(f).all() for f in factors)
        error = float("nan")
        if finite:
            scale = peak if peak > 0 else 1
            residual = ((tensor - _reconstruct(factors)) / scale).norm()
            norm = (tensor / scale).norm()
            error = float(residual / norm) if norm > 0 else float(residual)
        if not finite:
            raise self._failure(site, rank, "the factors are not finite")
        if not error <= 1 + 1e-6:
            raise self._failure(site, rank, f"the relative error is {error:.3g}")

    def _failure(self, site: Site, rank: int, problem: str) -> DecompositionError:
        return DecompositionError(
            f"{self.name} of layer {site.name!r} at rank {rank} failed: {problem}. "
            f"Try a lower rank or {self.alternative!r}."
        )

    # -- building -------------------------------------------------------------------------------
    @abstractmethod
    def layers(self, site: Site, rank: int, **factory: Any) -> list[nn.Conv2d]:
        """The default-initialized convs at ``rank`` (``factory``: dtype and device)."""

    def build(
        self,
        site: Site,
        rank: int,
        factors: Factors | None = None,
        bias: torch.Tensor | None = None,
    ) -> nn.Sequential:
        """The conv sequence at ``rank``, with weights from ``factors`` when given, on their
        dtype and device (else the bias's, else torch's defaults)."""
        rank = self.normalize_rank(site, rank)
        if bias is not None and not site.bias:
            raise NotAdmittedError(f"layer {site.name!r} has no bias, but a bias was given")
        like = factors[self.modes[0]] if factors is not None else bias
        factory = {} if like is None else {"dtype": like.dtype, "device": like.device}
        layers = self.layers(site, rank, **factory)
        with torch.no_grad():
            if factors is not None:
                shape = self.tensor_shape(site)
                for mode, size in zip(self.modes, shape, strict=True):
                    if tuple(factors[mode].shape) != (size, rank):
                        raise InvalidRankError(
                            f"{self.name} factor {mode!r} of layer {site.name!r} has shape "
                            f"{tuple(factors[mode].shape)}, expected {(size, rank)} at rank {rank}"
                        )
                # layers run in, spatial..., out; the tensor's modes are out, in, spatial...
                order = (*self.modes[1:], self.modes[0])
                for layer, mode in zip(layers, order, strict=True):
                    f = factors[mode] if mode == "out" else factors[mode].T
                    layer.weight.copy_(f.reshape(layer.weight.shape))
            if bias is not None:
                layers[-1].bias.copy_(bias)
        return nn.Sequential(*layers)


class _TPM:
    """Fitting by the greedy tensor power method (Astrid & Lee 2018, Algorithm 1).

    Nested (``nested`` is True): each component is fitted to the residual of the ones before
    it, whatever the rank asked, so the components at rank r are the first r at any larger
    rank (and so are the balanced factors, which scale each component on its own). Not
    sliceable all the same: each rank is decomposed on its own.
    """

    nested: ClassVar[bool] = True

    def fit(
        self, tensor: torch.Tensor, rank: int, *, n_iter: int = 50, tol: float = 1e-10
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``rank`` rank-one components, each fitted to the residual of the previous ones.

        Each component starts from the largest-norm fiber of the residual in every mode and
        takes up to ``n_iter`` sweeps of normalized updates ``a ← Ŵ ×₂ b ×₃ c / ‖·‖`` (one mode
        at a time), stopping when its weight changes by less than ``tol`` relatively. Its weight
        ``d = Ŵ ×₁ a ×₂ b ×₃ c`` is then deflated: ``Ŵ ← Ŵ − d·a∘b∘c``. The components are
        nested: those at rank r are the first r at any larger rank.
        """
        residual = tensor.clone()
        scale = tensor.norm()
        weights = tensor.new_zeros(rank)
        factors = [tensor.new_zeros(n, rank) for n in tensor.shape]
        for k in range(rank):
            if residual.norm() <= 1e-14 * scale:
                break  # exact already: the remaining components stay zero
            vecs = [_largest_fiber(residual, m) for m in range(tensor.ndim)]
            previous = None
            for _ in range(n_iter):  # block coordinate ascent of <residual, a∘b∘c>
                for m in range(tensor.ndim):
                    u = _contract(residual, vecs, skip=m)
                    norm = u.norm()
                    if norm > 0:
                        vecs[m] = u / norm
                if previous is not None and abs(norm - previous) <= tol * norm:
                    break
                previous = norm
            d = _contract(residual, vecs)
            residual -= d * _outer(vecs)
            weights[k] = d
            for f, v in zip(factors, vecs, strict=True):
                f[:, k] = v
        return weights, factors


@register
class CP3(_CP):
    """3-way CP of the kernel as ``T × S × (kh·kw)``, fitted by ALS (Astrid & Lee 2018)."""

    name = "cp3"
    description = "3-way CP (1x1, depthwise kh x kw, 1x1), fitted by ALS"
    modes = ("out", "in", "spatial")
    alternative = "cp3_tpm"

    def tensor_shape(self, site: Site) -> tuple[int, ...]:
        return (site.out_features, site.in_features, prod(site.kernel_size))

    def layers(self, site: Site, rank: int, **factory: Any) -> list[nn.Conv2d]:
        return [
            nn.Conv2d(site.in_features, rank, 1, bias=False, **factory),
            nn.Conv2d(rank, rank, groups=rank, bias=False, **conv_kwargs(site), **factory),
            nn.Conv2d(rank, site.out_features, 1, bias=site.bias, **factory),
        ]

    def stages(self, site: Site, rank: int) -> list[Stage]:
        r = self.normalize_rank(site, rank)
        s, t, k = site.in_features, site.out_features, prod(site.kernel_size)
        p_in, p_out = pixels(site.in_size), pixels(site.out_size)
        b = t if site.bias else 0
        return [
            Stage("in", s * r, s * r * p_in, s * p_in, r * p_in),
            Stage("spatial", r * k, r * k * p_out, r * p_in, r * p_out),
            Stage("out", r * t + b, r * t * p_out, r * p_out, t * p_out, bias=b),
        ]


@register
class CP4(_CP):
    """4-way CP of the kernel ``T × S × kh × kw``, fitted by ALS (Lebedev et al. 2015)."""

    name = "cp4"
    description = "4-way CP (1x1, depthwise kh x 1, depthwise 1 x kw, 1x1), fitted by ALS"
    modes = ("out", "in", "height", "width")
    alternative = "cp4_tpm"

    def tensor_shape(self, site: Site) -> tuple[int, ...]:
        return (site.out_features, site.in_features, *site.kernel_size)

    def layers(self, site: Site, rank: int, **factory: Any) -> list[nn.Conv2d]:
        return [
            nn.Conv2d(site.in_features, rank, 1, bias=False, **factory),
            nn.Conv2d(rank, rank, groups=rank, bias=False, **axis_kwargs(site, 0), **factory),
            nn.Conv2d(rank, rank, groups=rank, bias=False, **axis_kwargs(site, 1), **factory),
            nn.Conv2d(rank, site.out_features, 1, bias=site.bias, **factory),
        ]

    def stages(self, site: Site, rank: int) -> list[Stage]:
        r = self.normalize_rank(site, rank)
        s, t = site.in_features, site.out_features
        kh, kw = site.kernel_size
        p_in, p_mid, p_out = pixels(site.in_size), pixels(mid_size(site)), pixels(site.out_size)
        b = t if site.bias else 0
        return [
            Stage("in", s * r, s * r * p_in, s * p_in, r * p_in),
            Stage("height", r * kh, r * kh * p_mid, r * p_in, r * p_mid),
            Stage("width", r * kw, r * kw * p_out, r * p_mid, r * p_out),
            Stage("out", r * t + b, r * t * p_out, r * p_out, t * p_out, bias=b),
        ]


@register
class CP3TPM(_TPM, CP3):
    """The `CP3` layers fitted by the tensor power method (Astrid & Lee 2018)."""

    name = "cp3_tpm"
    description = "3-way CP (1x1, depthwise kh x kw, 1x1), fitted by the tensor power method"
    alternative = "cp3"


@register
class CP4TPM(_TPM, CP4):
    """The `CP4` layers fitted by the tensor power method (Astrid & Lee 2018)."""

    name = "cp4_tpm"
    description = (
        "4-way CP (1x1, depthwise kh x 1, depthwise 1 x kw, 1x1), fitted by the tensor power method"
    )
    alternative = "cp4"


# -- tensor helpers -----------------------------------------------------------------------------
def _float64(weight: torch.Tensor) -> torch.Tensor:
    """A float64 copy of ``weight``, on its device unless that has no float64 (MPS)."""
    device = weight.device if weight.device.type != "mps" else torch.device("cpu")
    return weight.detach().to(device=device, dtype=torch.float64, copy=True)


def _balance(weights: torch.Tensor, factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Absorb the weights into the factors, each mode's column getting the same norm."""
    norms = [f.norm(dim=0) for f in factors]
    magnitude = weights * torch.stack(norms).prod(dim=0)
    share = magnitude.abs() ** (1 / len(factors))
    out = [f / torch.where(n > 0, n, 1) * share for f, n in zip(factors, norms, strict=True)]
    out[0] = out[0] * torch.where(magnitude < 0, -1.0, 1.0).to(out[0])
    return out


def _reconstruct(factors: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor of CP factors (mode 0 times the Khatri-Rao product of the others)."""
    rank = factors[0].shape[1]
    kr = factors[1]
    for f in factors[2:]:
        kr = (kr[:, None, :] * f[None, :, :]).reshape(-1, rank)
    return (factors[0] @ kr.T).reshape([f.shape[0] for f in factors])


def _largest_fiber(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """The unit-norm mode-``mode`` fiber of ``tensor`` with the largest norm."""
    unfolded = tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)
    fiber = unfolded[:, unfolded.norm(dim=0).argmax()]
    return fiber / fiber.norm()


def _contract(
    tensor: torch.Tensor, vecs: list[torch.Tensor], skip: int | None = None
) -> torch.Tensor:
    """``tensor`` contracted with ``vecs`` in every mode but ``skip`` (a vector; a scalar when
    ``skip`` is None), by matrix-vector products on contiguous views: the modes after ``skip``
    from the right, then those before it from the left."""
    if skip is None:
        return _contract(tensor, vecs, skip=0) @ vecs[0]
    out = tensor
    for m in reversed(range(skip + 1, tensor.ndim)):
        out = out @ vecs[m]
    for m in range(skip):
        out = vecs[m] @ out.reshape(tensor.shape[m], -1)
    return out.reshape(-1)


def _outer(vecs: list[torch.Tensor]) -> torch.Tensor:
    """The rank-one tensor ``v₁∘v₂∘…``."""
    out = vecs[0]
    for v in vecs[1:]:
        out = torch.tensordot(out, v, dims=0)
    return out
