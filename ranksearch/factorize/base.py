"""The interface every factorization implements, and the cost record of one built stage."""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from ..errors import InvalidRankError, NotAdmittedError

if TYPE_CHECKING:
    from ..calibration import Whitening
    from ..site import Rank, Site

Factors = dict[str, torch.Tensor]
#: How matrix spectra decide a rank (see `Factorization.spectral`).
Spectral = Literal["single", "per_matrix", "shared"]
GROUPED_METHODS = ("svd", "tucker2")  # the factorizations that admit grouped convs


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

    ``sliceable`` factorizations (SVD, HOSVD) define their factors at every rank as a slice of
    those at `max_rank`: ``decompose(w, site, r)`` is exactly (bit for bit)
    ``slice(decompose(w, site, max_rank(site)), site, r)``, so `ranksearch.FactorCache`
    decomposes once and slices. ``rank_dims`` names the dims `slice` cuts. The others (CP,
    TT, TR) decompose per rank: their fit at a rank is not a slice of a larger one.

    ``exact_at_max`` is True when the module built at `max_rank` reproduces the layer up to
    rounding (SVD, spatial SVD, Tucker-2, TT, TR); False when `max_rank` is only the largest
    rank offered (CP: a capped bound on the CP rank, fitted approximately).

    ``nested`` is True when the components of the fit at rank r are the first r of the fit at
    any larger rank: every sliceable method, and the greedy CP fits (tensor power method),
    which are nested but still decomposed per rank (a rank costs only its own components).

    ``spectral`` says how the spectra of `spectral_matrices` decide the rank, for the
    data-free rank selection of `ranksearch.vbmf` (VBMF, error bound, PCA energy):
    ``"single"`` the rank of one matrix (SVD); ``"per_matrix"`` one rank component per matrix
    (Tucker-2: ``(r_in, r_out)``); ``"shared"`` one rank for all the matrices (CP, read off the
    Tucker unfoldings as a proxy); None when the rank is not a matrix rank (TT, TR). A new
    factorization that sets it is used by those strategies as it is.

    ``weighs_outputs`` is True when one factor holds the output index, so that data-aware
    factors can weigh the outputs too (`ranksearch.calibration`: by the BatchNorm that takes
    the layer's output) and `unwhiten` divides that factor by the weights.
    """

    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]
    sliceable: ClassVar[bool] = True
    exact_at_max: ClassVar[bool] = True
    # (factor, dim, i) for each dim `slice` cuts to rank component i; negative dims count
    # from the end (factors may carry leading dims, e.g. one per group)
    rank_dims: ClassVar[tuple[tuple[str, int, int], ...]] = ()
    description: ClassVar[str] = ""
    nested: ClassVar[bool] = False
    spectral: ClassVar[Spectral | None] = None
    weighs_outputs: ClassVar[bool] = False

    # -- what a site admits -------------------------------------------------------------------
    def admits(self, site: Site) -> str | None:
        """None when ``site`` admits this factorization, else the reason it does not."""
        if site.kind not in self.kinds:
            return f"{self.name} applies to {'/'.join(self.kinds)} layers, not {site.kind}"
        if site.groups != 1:
            return self.admits_groups(site)
        return None

    def admits_groups(self, site: Site) -> str | None:
        """`admits` for a convolution with groups > 1; overridden by the methods that
        decompose each group separately."""
        return (
            f"{self.name} does not decompose grouped convolutions (groups={site.groups}); "
            f"{' and '.join(GROUPED_METHODS)} do, group by group"
        )

    def check(self, site: Site) -> None:
        """Raise `NotAdmittedError` (naming the methods that do admit it) unless ``site``
        admits this factorization."""
        reason = self.admits(site)
        if reason is not None:
            raise NotAdmittedError(
                f"layer {site.name!r} does not admit {self.name!r}: {reason}. "
                f"{admitting(site)}"
            )

    @abstractmethod
    def max_rank(self, site: Site) -> Rank:
        """The largest rank offered for ``site``.

        When ``exact_at_max`` is True the module built at it reproduces the layer exactly (up
        to rounding); otherwise it is only an upper bound of the ranks worth trying.
        """

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

    # -- spectra --------------------------------------------------------------------------------
    def spectral_matrices(self, site: Site, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The matrices whose spectra decide the rank on ``site`` (one group's ``weight``), in
        the order of the rank's components: for ``spectral="single"`` the weight as
        out × in·kh·kw (O × I for a linear layer); otherwise the in-channel (mode-1) and
        out-channel (mode-0) unfoldings. Raises `NotAdmittedError` when ``spectral`` is None.
        """
        if self.spectral is None:
            raise NotAdmittedError(
                f"{self.name!r} ranks are not read off a matrix spectrum; VBMF, error-bound "
                "and PCA energy rank selection need a factorization with matrix ranks"
            )
        if self.spectral == "single":
            return (weight.reshape(weight.shape[0], -1),)
        return channel_unfoldings(weight)

    # -- numerics -------------------------------------------------------------------------------
    @abstractmethod
    def decompose(self, weight: torch.Tensor, site: Site, rank: Rank, **options: Any) -> Factors:
        """Factor ``weight`` (the layer's weight) at ``rank``.

        For sliceable methods this is the `slice` at ``rank`` of the factors at `max_rank`
        (computed at `max_rank`, then cut), so the factors at a rank hold every smaller rank.
        """

    # -- data-aware factors ---------------------------------------------------------------------
    def input_modes(self, site: Site) -> tuple[int, ...]:
        """The modes the input index of one group's weight splits into for data-aware factors
        (sizes, row-major; their product is in/groups·kh·kw for a convolution, in for a linear
        layer): each mode is whitened by its own root (`ranksearch.calibration`) and held by
        one factor, which `unwhiten` multiplies by the mode's inverse root. Raises
        `NotAdmittedError` for a factorization that has no data-aware factors."""
        raise NotAdmittedError(
            f"{self.name!r} has no data-aware factors (it defines no input_modes); use "
            "weight-only factors (data_aware=False)"
        )

    def unwhiten(self, factors: Factors, site: Site, whitening: Whitening) -> Factors:
        """The factors of the whitened weight (`Whitening.apply`) made factors of the layer:
        the factor holding each input mode multiplied by that mode's inverse root, and for a
        family that `weighs_outputs`, the factor holding the outputs divided by their weights
        (`Whitening.unweight`)."""
        raise NotAdmittedError(f"{self.name!r} has no data-aware factors")

    def decompose_aware(
        self, weight: torch.Tensor, site: Site, rank: Rank, whitening: Whitening, **options: Any
    ) -> Factors:
        """Data-aware factors of ``weight`` at ``rank``: `decompose` of the whitened weight,
        un-whitened (`unwhiten`), in the weight's dtype and on its device. Where `decompose`
        minimises the weight error, these minimise it in the metric of the calibration
        statistics, the layer's output error on the calibration rows (exactly so when the
        input index is one mode, as for svd; in the Kronecker-factored metric otherwise).

        Sliceable methods define them, as `decompose` does, from the slice at ``rank`` of the
        factors at `max_rank` (`fit_core` of it); the others decompose at ``rank``.
        """
        if not self.sliceable:
            return self.decompose_whitened(weight, site, rank, whitening, **options)
        top = self.decompose_whitened(weight, site, self.max_rank(site), whitening, **options)
        return self.fit_core(self.slice(top, site, rank), site, weight, whitening)

    def decompose_whitened(
        self, weight: torch.Tensor, site: Site, rank: Rank, whitening: Whitening, **options: Any
    ) -> Factors:
        """`decompose` of the whitened weight at ``rank``, un-whitened (`unwhiten`), in the
        weight's dtype and on its device: `decompose_aware` before any `fit_core`."""
        whitened = self.decompose(whitening.apply(weight), site, rank, **options)
        return {key: f.to(device=weight.device, dtype=weight.dtype)
                for key, f in self.unwhiten(whitened, site, whitening).items()}

    def fit_core(self, factors: Factors, site: Site, weight: torch.Tensor,
                 whitening: Whitening) -> Factors:
        """Data-aware factors at a rank from the slice at that rank of those at `max_rank`:
        the slice itself, unless the family refits part of it in the metric of the whole
        input moment (`Whitening.metric`), as Tucker-2 refits its core."""
        return factors

    def slice(self, factors: Factors, site: Site, rank: Rank) -> Factors:
        """The factors at ``rank`` cut from the factors of a sliceable method at a larger rank.

        For each ``(f, d, i)`` of ``rank_dims``, dim ``d`` of factor ``f`` keeps its first
        ``rank[i]`` entries; the other dims and factors are kept whole. The result is a copy.
        Raises `InvalidRankError` for a method that is not sliceable, or factors that hold
        less than ``rank``.
        """
        rank = self.normalize_rank(site, rank)
        if not self.sliceable:
            raise InvalidRankError(
                f"{self.name} is not sliceable: its factors at one rank do not hold another; "
                f"decompose at rank {rank!r} itself"
            )
        ranks = (rank,) if isinstance(rank, int) else rank
        out = dict(factors)
        for key, dim, component in self.rank_dims:
            out[key] = cut(out[key], dim, ranks[component], key)
        return {key: f.clone(memory_format=torch.contiguous_format) for key, f in out.items()}

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


def cut(factor: torch.Tensor, dim: int, length: int, name: str) -> torch.Tensor:
    """The first ``length`` entries of ``factor`` along ``dim`` (a view)."""
    if factor.shape[dim] < length:
        raise InvalidRankError(
            f"factor {name!r} of shape {tuple(factor.shape)} holds {factor.shape[dim]} along "
            f"dim {dim}, fewer than the requested {length}; decompose at a rank at least as large"
        )
    return factor.narrow(dim, 0, length)


def channel_unfoldings(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-channel (S × T·kh·kw) and out-channel (T × S·kh·kw) unfoldings of a kernel."""
    return (weight.movedim(1, 0).reshape(weight.shape[1], -1),
            weight.reshape(weight.shape[0], -1))


def admitting(site: Site) -> str:
    """A sentence naming the registered factorizations that admit ``site``."""
    from . import REGISTRY  # the registry imports this module

    names = [name for name, fac in REGISTRY.items() if fac.admits(site) is None]
    if not names:
        return "No registered factorization admits it."
    return f"The methods that admit it are {', '.join(names)}."


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
