"""Calibration statistics: the second moment of each site's inputs on a few training batches,
and the whitening that turns a factorization of the weight into one of the layer's output.

The rows x of a site are its input vectors (a linear layer, an attention projection) or its
unfolded input patches (a convolution: ``in/groups · kh · kw`` entries in the order of the
weight's input index, one matrix per group). On n rows with second moment C = mean x xᵀ, an
approximation Ŵ of the weight W has the output error Σ‖(W − Ŵ) x‖² = n·‖(W − Ŵ) S‖²_F, S the
symmetric square root of C. So factoring W S instead of W, then multiplying the input side of
the factors by S⁻¹, makes truncation minimise the output error on the calibration data
(SVD-LLM: Wang et al., "SVD-LLM: Truncation-aware singular value decomposition for large
language model compression", ICLR 2025).

A factorization whose input index splits into modes held by different factors (Tucker-2 and
CP: input channels and the kernel; CP4 and TT: channels, kernel rows, kernel columns; a
TT-matrix or tensor ring: the tensorized input) whitens each mode k by the root of its own
moment C_k, the partial trace of C over the other modes (the Kronecker factoring
C ≈ C_1 ⊗ C_2 ⊗ … of K-FAC), as each factor can then absorb its mode's S_k⁻¹ exactly.

Where a BatchNorm takes a site's output directly (a convolution then its BatchNorm), what the
rest of the network sees of an output error is that error scaled per channel by the
BatchNorm's |γ|/√(var + ε): an error in a channel the BatchNorm divides by a small deviation
counts for more. Its output weights d (normalised to mean 1, floored at `DAMP`) then weigh
the output index too: factoring diag(d) W S and dividing the output side of the factors by d
minimises the output error after the BatchNorm (the BatchNorm folded into the layer, without
folding it). Families whose output index is held by one factor do this (svd, svd_spatial,
Tucker-2, CP); TT and TR, whose output modes are split over cores, weigh the inputs only.

Each moment is regularised to C + damp · mean(diag C) · I (``damp`` = `DAMP`) and scaled to unit
mean diagonal before its eigendecomposition, with eigenvalues clamped below: rank-deficient
statistics (rank-1 inputs, channels that are always zero) give finite roots, and statistics
that are a multiple of the identity give the identity (weight-only factors). A site whose
inputs are all zero has no direction to prefer: its whitening is the identity too.

`recalibrate_batchnorm` re-estimates the running statistics of a compressed model's BatchNorm
layers on a few training batches, which the layers' new inputs no longer match.
"""

from __future__ import annotations

import logging
import string
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from math import prod
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .clone import clone_module
from .errors import RankSearchError, TaskError
from .factorize.attention import FactorizedAttention
from .inputs import Inputs, call, move
from .site import find_layers, is_conv1d

if TYPE_CHECKING:
    from .space import RankSpace
    from .task import Task

log = logging.getLogger(__name__)

#: Ridge added to each moment, relative to its mean diagonal.
DAMP = 1e-2
#: What data-aware factors weigh, in the fingerprint of their results: a change of it is a
#: change of every data-aware score.
WHITENING = "inputs by their second moment, outputs by the BatchNorm that takes them"
#: Rows of unfolded patches multiplied at once (bounds the memory of a large feature map).
_CHUNK = 2**24


@dataclass(frozen=True)
class InputStats:
    """The input statistics of one site: ``moment`` (groups × n × n, float64) the mean of
    x xᵀ over ``rows`` rows x (see the module docstring for what a row is), and ``output``
    (out, float64) the output weights from the BatchNorm that takes the site's output, None
    where there is none (every output counts alike)."""

    moment: Tensor
    rows: int
    output: Tensor | None = None

    def whitening(self, modes: Sequence[int], damp: float = DAMP,
                  outputs: bool = True) -> Whitening:
        """The whitening of the input index split into ``modes`` (sizes whose product is n,
        row-major): one mode, the moment itself; several, each mode's partial trace. With
        ``outputs`` (for a family whose output index one factor holds), the output weights
        too."""
        g, n = self.moment.shape[0], self.moment.shape[-1]
        modes = tuple(int(m) for m in modes)
        if prod(modes) != n:
            raise RankSearchError(f"input modes {modes} do not split rows of {n} entries")
        moments = [self.moment] if len(modes) == 1 else [
            partial_trace(self.moment, modes, k) for k in range(len(modes))]
        roots = [_root(m, damp) for m in moments]
        return Whitening(modes, g, tuple(r for r, _ in roots), tuple(i for _, i in roots),
                         self.moment, self.output if outputs else None, damp)


@dataclass(frozen=True)
class Whitening:
    """Per input mode, the symmetric root of its regularised moment and the root's inverse,
    each (groups × m × m, float64); ``moment`` the whole moment it was made from (groups × n ×
    n), ``output`` the output weights (out, float64) or None, ``damp`` the regularisation."""

    modes: tuple[int, ...]
    groups: int
    roots: tuple[Tensor, ...]
    inverses: tuple[Tensor, ...]
    moment: Tensor
    output: Tensor | None = None
    damp: float = DAMP

    @cached_property
    def metric(self) -> Tensor:
        """The site's whole input moment, regularised as each mode's is (groups × n × n,
        float64; computed once): the metric of the output error on the calibration rows, which
        a family that whitens mode by mode can refit a factor in (`Factorization.fit_core`)."""
        return torch.stack([_regularised(c, self.damp) for c in self.moment.to(torch.float64)])

    def apply(self, weight: Tensor) -> Tensor:
        """``weight`` (out × its input index; groups stacked along out) with each input mode
        multiplied by its root and each output by its weight: the weight whose plain factors
        are the data-aware ones, in float64, of the same shape."""
        g, shape = self.groups, weight.shape
        w = weight.detach().to(torch.float64).reshape(g, shape[0] // g, *self.modes)
        for k, root in enumerate(self.roots):
            w = _times(w.movedim(2 + k, -1), root, grouped=True).movedim(-1, 2 + k)
        if self.output is not None:
            w = w * self.output.to(w.device).reshape(g, -1, *([1] * len(self.modes)))
        return w.reshape(shape)

    def unweight(self, factor: Tensor, dim: int) -> Tensor:
        """``factor`` (float64) with its dim ``dim``, which holds the outputs (of one group,
        after the factor's leading group dimension when grouped), divided by their weights;
        ``factor`` itself without output weights."""
        if self.output is None:
            return factor
        f = factor.to(torch.float64)
        shape = [1] * f.dim()
        d = self.output.to(f.device)
        if self.groups > 1:
            d = d.reshape(self.groups, -1)
            shape[0] = self.groups
        shape[dim] = d.shape[-1]
        return f / d.reshape(shape)

    def undo(self, factor: Tensor, dim: int, mode: int) -> Tensor:
        """``factor`` (float64) with its dim ``dim``, which holds input mode ``mode``,
        multiplied by that mode's inverse root. A grouped site's factors lead with the group
        dimension."""
        moved = factor.to(torch.float64).movedim(dim, -1)
        return _times(moved, self.inverses[mode], grouped=self.groups > 1).movedim(-1, dim)


def _times(x: Tensor, matrices: Tensor, grouped: bool) -> Tensor:
    """``x @ matrices`` along x's last dim: per group (x's dim 0) when ``grouped``, else the
    one matrix of ``matrices``."""
    matrices = matrices.to(x.device)
    if not grouped:
        return x @ matrices[0]
    g, m = matrices.shape[0], matrices.shape[-1]
    return x @ matrices.reshape(g, *([1] * (x.dim() - 3)), m, m)


def partial_trace(moment: Tensor, modes: Sequence[int], k: int) -> Tensor:
    """The moment of mode ``k`` (groups × m_k × m_k): ``moment`` (groups × n × n, n the
    product of ``modes``, row-major) traced over the other modes, over their size."""
    d = len(modes)
    rows, cols = string.ascii_lowercase[:d], string.ascii_uppercase[:d]
    cols = "".join(c if i == k else rows[i] for i, c in enumerate(cols))
    spec = f"z{rows}{cols}->z{rows[k]}{cols[k]}"
    traced = torch.einsum(spec, moment.reshape(moment.shape[0], *modes, *modes))
    return traced / (prod(modes) // modes[k])


def _root(moment: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """The symmetric square root of each regularised moment (see the module docstring) and
    its inverse."""
    eye = torch.eye(moment.shape[-1], dtype=torch.float64)
    roots, inverses = [], []
    for c in moment.to(torch.float64):
        if not float(torch.diagonal(c).mean()) > 0:  # inputs all zero: no direction to prefer
            roots.append(eye)
            inverses.append(eye)
            continue
        values, vectors = torch.linalg.eigh(_regularised(c, damp))
        values = values.clamp(min=damp / (1 + damp))
        roots.append((vectors * values.sqrt()) @ vectors.mT)
        inverses.append((vectors * values.rsqrt()) @ vectors.mT)
    return torch.stack(roots), torch.stack(inverses)


def _regularised(c: Tensor, damp: float) -> Tensor:
    """One moment symmetrised, with ``damp`` of its mean diagonal added, scaled to unit mean
    diagonal (the identity when the moment is zero)."""
    scale = float(torch.diagonal(c).mean())
    if not scale > 0:
        return torch.eye(c.shape[-1], dtype=torch.float64)
    out = (c + c.mT).mul_(1 / (2 * scale))
    out.diagonal().add_(damp)
    return out.div_(1 + damp)


# -- collection -------------------------------------------------------------------------------
def calibration_inputs(task: Task, batches: int, batch_size: int, seed: int = 0) -> list[Any]:
    """The model inputs of the first ``batches`` training batches of ``task`` (shuffled with
    ``seed``). Raises `TaskError` when the task has no training data or its batches are not
    ``(inputs, targets)`` pairs."""
    if task.train is None:
        raise TaskError(f"task {task.name!r} has no training data: data-aware factors and "
                        "BatchNorm recalibration read the inputs of a few training batches; "
                        "pass train=... or turn data_aware and bn_recalibrate off")
    found = task.batches("train", batch_size, batches, shuffle=True, seed=seed)
    return [b[0] for b in found]


def collect(
    model: nn.Module,
    space: RankSpace,
    inputs: Iterable[Inputs],
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, InputStats]:
    """The `InputStats` of every decomposable site of ``space``, from ``model`` (in eval mode,
    no gradients, on a copy moved to ``device``) run on ``inputs`` (batches of model inputs).
    ``model`` itself is untouched. Sites the batches never reach get no entry."""
    copy = _hookable(model).to(device).eval()
    sites = {site.name: site for site in space.decomposable}
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    follows = _Follows()
    for layer in find_layers(copy):
        if layer.name in sites:
            hook = _Recorder(layer.name, sites[layer.name].groups, sums, counts)
            handles.append(layer.module.register_forward_pre_hook(hook, with_kwargs=True))
            handles.append(layer.module.register_forward_hook(follows.produced(layer.name)))
    for bn in batchnorms(copy):
        handles.append(bn.register_forward_pre_hook(follows.consumed))
    fastpath = torch.backends.mha.get_fastpath_enabled()  # its kernels call no projection
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad():
            for x in tqdm(list(inputs), desc="calibrate", unit="batch", disable=not progress):
                call(copy, move(x, device))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in handles:
            h.remove()
    stats = {name: InputStats((sums[name] / counts[name]).cpu(), counts[name],
                              follows.weights(name, sites[name].out_features))
             for name in sums if counts[name] > 0}
    log.info("calibration: input statistics of %d of %d sites", len(stats), len(sites))
    return stats


class _Recorder:
    """A forward pre-hook adding the rows of each call of one layer to its moment sum."""

    def __init__(self, name: str, groups: int, sums: dict[str, Tensor],
                 counts: dict[str, int]) -> None:
        self.name, self.groups, self.sums, self.counts = name, groups, sums, counts

    def __call__(self, module: nn.Module, args: tuple[Any, ...],
                 kwargs: Mapping[str, Any]) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        rows = _rows(module, x)
        g = self.groups
        n = rows.shape[1] // g
        acc = rows.device if rows.device.type != "mps" else torch.device("cpu")  # no float64
        total = torch.zeros(g, n, n, dtype=torch.float64, device=acc)
        step = max(1, _CHUNK // max(rows.shape[1], 1))
        for start in range(0, rows.shape[0], step):
            chunk = rows[start:start + step].to(device=acc, dtype=torch.float64)
            chunk = chunk.reshape(chunk.shape[0], g, n).transpose(0, 1)  # groups × rows × n
            total += chunk.mT @ chunk
        self.sums[self.name] = self.sums.get(self.name, 0) + total
        self.counts[self.name] = self.counts.get(self.name, 0) + rows.shape[0]


class _Follows:
    """Which BatchNorm takes each site's output: forward hooks on the sites note their output
    tensors (by weak reference, so that a freed tensor's id is never mistaken for it), and
    pre-hooks on the BatchNorm layers look their input up. A site counts as followed by a
    BatchNorm only when every call's output went to that one BatchNorm."""

    def __init__(self) -> None:
        self._out: dict[int, tuple[str, weakref.ref[Tensor]]] = {}
        self._calls: dict[str, int] = {}
        self._taken: dict[str, list[nn.Module]] = {}

    def produced(self, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            self._calls[name] = self._calls.get(name, 0) + 1
            if isinstance(output, Tensor):
                self._out[id(output)] = (name, weakref.ref(output))
        return hook

    def consumed(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        found = self._out.get(id(x)) if isinstance(x, Tensor) else None
        if found is not None and found[1]() is x:
            self._taken.setdefault(found[0], []).append(module)

    def weights(self, name: str, out: int) -> Tensor | None:
        """The output weights of site ``name`` (see the module docstring), or None."""
        taken = self._taken.get(name, [])
        if len(taken) != self._calls.get(name) or len({id(m) for m in taken}) != 1:
            return None
        bn = taken[0]
        if bn.num_features != out or bn.running_var is None:
            return None
        d = (bn.running_var.detach().to(torch.float64) + bn.eps).rsqrt()
        if bn.weight is not None:
            d = d * bn.weight.detach().to(torch.float64).abs()
        if not (torch.isfinite(d).all() and d.mean() > 0):
            return None
        return (d / d.mean()).clamp(min=DAMP).cpu()


def _rows(module: nn.Module, x: Tensor) -> Tensor:
    """The input rows of one call: the unfolded patches of a convolution's input (zero or the
    layer's own padding), the feature vectors of a linear layer's."""
    if isinstance(module, nn.Conv2d):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        padded = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        patches = F.unfold(padded, module.kernel_size, dilation=module.dilation,
                           stride=module.stride)  # N × (in·kh·kw) × positions
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    features = module.weight.shape[0] if is_conv1d(module) else module.in_features
    return x.reshape(-1, features)


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def recalibrate_batchnorm(model: nn.Module, inputs: Iterable[Inputs],
                          device: str | torch.device = "cpu") -> int:
    """Re-estimate the running statistics of every BatchNorm layer of ``model`` (in place,
    on ``device``) on ``inputs`` (batches of model inputs): each layer's statistics are reset
    and set to the plain average over the batches of its batch mean and (unbiased) batch
    variance (``momentum=None``), computed with the BatchNorm layers in train mode, every other
    module in eval mode (no dropout), and no gradients. Each module's mode and momentum are
    restored after. Returns the number of layers recalibrated (0, the model untouched, when it
    has none or ``inputs`` is empty)."""
    layers, inputs = batchnorms(model), list(inputs)
    if not layers or not inputs:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in layers]
    try:
        model.eval()
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for x in inputs:
                call(model, move(x, device))
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        for m, training in modes.items():
            m.train(training)
    return len(layers)


def _hookable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which each attention module calls its projections as modules
    (a `FactorizedAttention` with dense projections: the same computation), so that every
    site has a module whose input a hook sees."""
    attention = {id(m): FactorizedAttention(m, {}) for m in model.modules()
                 if isinstance(m, nn.MultiheadAttention)}
    return clone_module(model, attention)


__all__ = ["DAMP", "WHITENING", "InputStats", "Whitening", "batchnorms", "calibration_inputs",
           "collect", "partial_trace", "recalibrate_batchnorm"]
