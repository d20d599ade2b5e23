"""The rank space of a model: the discovery of its decomposable layers (`Site`, in
`ranksearch.site`) and the rank grid each factorization allows.

`SpaceSpec` holds the options that decide which layers a search may factorize and how; a
`RankSpace` holds the sites and their grids, and makes `Config`s (`ranksearch.config`) from them.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from math import prod
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import factorize
from .config import DENSE, Choice, Config
from .errors import (
    ConfigError,
    InputShapeError,
    NoDecomposableLayersError,
    NotAdmittedError,
    RankSearchError,
    UnknownLayerError,
)
from .inputs import Inputs, batch_size, call, tensors
from .site import Layer, Rank, Site, find_layers

#: Input and output shapes (batch included) of each call of a site, by site name.
Shapes = dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]]

DEFAULT_METHODS: dict[str, tuple[str, ...]] = {"conv2d": ("tucker2",), "linear": ("svd",)}


@dataclass(frozen=True)
class SpaceSpec:
    """Every option that decides which layers a search may factorize and how.

    One frozen record carries them from the CLI or the API to discovery, the study name and
    the fingerprint of a search, so that two searches share results only when their spaces
    were made alike.

    ``methods``: factorization names for every site (each site keeps those it admits), or
    ``(kind, names)`` pairs such as ``(("conv2d", ("tucker2",)), ("linear", ("svd",)))``;
    None: tucker2 for convolutions, svd for linear layers. ``include``/``exclude``: glob
    patterns on dotted layer names. Layers with fewer than ``min_params`` weights stay dense.
    Ranks are rounded to ``multiple_of``, at least ``min_rank``, at most ``max_choices`` per
    site and method. ``dearer``: also offer ranks that cost as much as the dense layer or more
    in both parameters and MACs (off by default: such a choice is never worth building).
    ``rank_multiples``: ``(site, method, multiple)`` triples that round that site's ranks of
    that method to ``multiple`` instead of ``multiple_of`` (`ranksearch.latency.snap_space`
    reads them off a latency table).
    """

    methods: tuple[str, ...] | tuple[tuple[str, tuple[str, ...]], ...] | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    min_params: int = 0
    multiple_of: int = 1
    min_rank: int = 1
    max_choices: int = 64
    dearer: bool = False
    rank_multiples: tuple[tuple[str, str, int], ...] = ()

    def __post_init__(self) -> None:
        methods = self.methods
        if isinstance(methods, str):
            methods = (methods,)
        if isinstance(methods, Mapping):
            methods = tuple((k, tuple(v)) for k, v in sorted(methods.items()))
        elif methods is not None:
            methods = tuple(m if isinstance(m, str) else (m[0], tuple(m[1])) for m in methods)
        object.__setattr__(self, "methods", methods)
        for key in ("include", "exclude"):
            value = getattr(self, key)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, key, None if value is None else tuple(value))
        for key, low in (("min_params", 0), ("multiple_of", 1), ("min_rank", 1),
                         ("max_choices", 2)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"space option {key} must be an integer ≥ {low}, got {value!r}")
        _methods_by_kind(self.method_map())  # unknown names raise here
        multiples = tuple(tuple(t) for t in self.rank_multiples)
        for t in multiples:
            if (len(t) != 3 or not all(isinstance(v, str) for v in t[:2])
                    or isinstance(t[2], bool) or not isinstance(t[2], int) or t[2] < 1):
                raise ConfigError(f"space option rank_multiples takes (site, method, multiple) "
                                  f"triples with an integer multiple ≥ 1, got {t!r}")
        object.__setattr__(self, "rank_multiples", multiples)

    def multiple(self, name: str, method: str) -> int:
        """The multiple that ranks of ``method`` on site ``name`` are rounded to."""
        found = (m for site, meth, m in self.rank_multiples if (site, meth) == (name, method))
        return next(found, self.multiple_of)

    def method_map(self) -> Mapping[str, Sequence[str]] | Sequence[str] | None:
        """``methods`` in the form `RankSpace.discover` reads."""
        if self.methods and not isinstance(self.methods[0], str):
            return dict(self.methods)  # type: ignore[arg-type]
        return self.methods  # type: ignore[return-value]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.methods and not isinstance(self.methods[0], str):
            data["methods"] = {k: list(v) for k, v in self.methods}  # type: ignore[misc]
        if not self.rank_multiples:  # left out, so spaces without them keep their signature
            del data["rank_multiples"]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SpaceSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown space option(s) {unknown}; valid: {sorted(known)}")
        return cls(**data)

    def discover(self, model: nn.Module, example_input: Inputs) -> RankSpace:
        """`RankSpace.discover` with these options."""
        return RankSpace.discover(model, example_input, spec=self)

@dataclass(frozen=True)
class RankSpace:
    """The decomposable sites of a model and the ranks each factorization may take.

    The rank grid of a site and method holds ranks rounded to ``multiple_of`` (the maximum is
    kept even when it is not a multiple), at least ``min_rank``, and at most ``max_choices``
    values spread evenly. Tuple ranks (tucker2, tt, tr) move along one line: every component
    scales with the same fraction of its maximum. Unless ``spec.dearer``, a grid leaves out
    the ranks that cost at least as much as the dense layer in both parameters and MACs.
    ``spec`` records the options the space was discovered with. ``other_macs`` counts the
    multiply-accumulates per sample of the traced forward pass outside the sites (attention
    scores and other matrix products, as `FlopCounterMode` counts them): no choice changes
    them.
    """

    sites: tuple[Site, ...]
    model_params: int
    spec: SpaceSpec = field(default_factory=lambda: SpaceSpec())
    other_macs: int = 0
    _grids: dict[tuple[str, str], tuple[Rank, ...]] = field(
        default_factory=dict, repr=False, compare=False, hash=False
    )

    @property
    def multiple_of(self) -> int:
        return self.spec.multiple_of

    @property
    def min_rank(self) -> int:
        return self.spec.min_rank

    @property
    def max_choices(self) -> int:
        return self.spec.max_choices

    # -- discovery ------------------------------------------------------------------------------
    @classmethod
    def discover(
        cls,
        model: nn.Module,
        example_input: Inputs,
        methods: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        min_params: int = 0,
        multiple_of: int = 1,
        min_rank: int = 1,
        max_choices: int = 64,
        dearer: bool = False,
        spec: SpaceSpec | None = None,
    ) -> RankSpace:
        """Trace one forward pass of ``model`` on ``example_input`` and list its sites.

        ``example_input`` is what the model is called with: a tensor (``model(x)``; token ids
        as an integer tensor), a tuple or list of positional arguments, or a dict of keyword
        arguments (``model(**x)``, e.g. ``{"input_ids": ..., "attention_mask": ...}``); see
        `ranksearch.inputs`. Sizes and costs are per sample: per entry of the leading
        dimension of the input's first tensor. The sites are the `Layer`s of
        `ranksearch.site.find_layers`.

        The options are those of `SpaceSpec` (pass them one by one, or as ``spec``, not both).
        Layers with fewer than ``min_params`` weights, layers whose weight is tied to another
        module's (factorizing one would untie them) and layers a forward pass calls more than
        once are listed but not decomposable, each with its reason.
        """
        given = SpaceSpec(methods, include, exclude, min_params, multiple_of, min_rank,
                          max_choices, dearer)
        if spec is None:
            spec = given
        elif given != SpaceSpec():
            raise ConfigError("pass the space options either one by one or as spec=, not both")
        wanted = _methods_by_kind(spec.method_map())
        layers = find_layers(model)
        shapes, batch, flops = _trace(model, example_input, layers)
        tied = _tied(model, layers)
        sites = []
        for layer in layers:
            name = layer.name
            calls = shapes.get(name, [])
            if calls:
                in_shape, out_shape = calls[0]
                if isinstance(layer.module, nn.Conv2d):
                    in_size, out_size = tuple(in_shape[-2:]), tuple(out_shape[-2:])
                else:
                    in_size = out_size = _positions(in_shape, batch)
            else:
                in_size = out_size = ()
            site = replace(layer.site(in_size, out_size), calls=len(calls))
            reason = _exclusion(site, len(calls), spec, tied.get(name))
            admitted: tuple[str, ...] = ()
            if reason is None:
                candidates = wanted.get(site.kind, ())
                reasons = {m: factorize.get(m).admits(site) for m in candidates}
                if not spec.dearer:
                    reasons = {m: r or _dearer(site, m, spec) for m, r in reasons.items()}
                admitted = tuple(m for m, r in reasons.items() if r is None)
                if not admitted:
                    reason = "; ".join(
                        f"{m}: {r}" for m, r in reasons.items()
                    ) or f"no factorization requested for {site.kind} layers"
            sites.append(_replace(site, methods=admitted, reason=reason))
        site_macs = sum(s.calls * factorize.dense_stage(s).macs for s in sites)
        space = cls(
            tuple(sites),
            model_params=sum(p.numel() for p in model.parameters()),
            spec=spec,
            other_macs=max(0, round(flops / (2 * batch)) - site_macs),
        )
        if not space.names:
            listing = "; ".join(f"{s.name}: {s.reason}" for s in sites) or "none found"
            raise NoDecomposableLayersError(
                f"the model has no decomposable layer ({listing}). Check "
                "include/exclude/min_params, or pass a model with such layers."
            )
        return space

    # -- lookup ---------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """Names of the decomposable sites, in model order."""
        return tuple(s.name for s in self.sites if s.decomposable)

    @property
    def decomposable(self) -> tuple[Site, ...]:
        return tuple(s for s in self.sites if s.decomposable)

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise UnknownLayerError(
            f"no layer named {name!r} in the space; its layers are {[s.name for s in self.sites]}"
        )

    def decomposable_site(self, name: str) -> Site:
        site = self.site(name)
        if not site.decomposable:
            raise NotAdmittedError(f"layer {name!r} is not decomposable: {site.reason}")
        return site

    # -- ranks ----------------------------------------------------------------------------------
    def ranks(self, name: str, method: str) -> tuple[Rank, ...]:
        """The allowed ranks of ``method`` on site ``name``, from smallest to largest."""
        key = (name, method)
        if key not in self._grids:
            site = self.decomposable_site(name)
            fac = factorize.get(method)
            if method not in site.methods:
                raise NotAdmittedError(
                    f"method {method!r} is not in the space for layer {name!r}; "
                    f"its methods are {list(site.methods)}"
                )
            grid = _grid(fac.max_rank(site), self.spec.multiple(name, method), self.min_rank,
                         self.max_choices)
            if not self.spec.dearer:
                grid = tuple(r for r in grid if cheaper(site, method, r)) or grid[:1]
            self._grids[key] = grid
        return self._grids[key]

    def choices(self, name: str) -> tuple[Choice, ...]:
        """Every choice for a site: each method's rank grid, then ``dense``."""
        site = self.decomposable_site(name)
        return (*(Choice(m, r) for m in site.methods for r in self.ranks(name, m)), DENSE)

    def validate(self, config: Config) -> Config:
        """Check every entry of ``config`` against the space; return it with ranks normalized."""
        out = {}
        for name, choice in config.items():
            site = self.decomposable_site(name)
            fac = factorize.get(choice.method)
            if choice.method not in site.methods:
                raise NotAdmittedError(
                    f"method {choice.method!r} is not in the space for layer {name!r}; "
                    f"its methods are {list(site.methods)}"
                )
            out[name] = Choice(choice.method, fac.normalize_rank(site, choice.rank))
        return Config(out)

    def full(self, method: str | None = None) -> Config:
        """Every site at the maximum rank of ``method`` (each site's first exact method for
        None), where that rank reproduces the dense layer exactly: sites whose factorization
        is not exact at its maximal rank (CP) stay dense, so the model equals the dense one."""
        choices = {}
        for s in self.decomposable:
            if method is None:
                m = next((m for m in s.methods if factorize.get(m).exact_at_max), None)
            else:
                m = method_for(s, method)
            if m is not None and factorize.get(m).exact_at_max:
                choices[s.name] = Choice(m, factorize.get(m).max_rank(s))
        return Config(choices)

    def uniform(self, fraction: float, method: str | None = None) -> Config:
        """The same fraction of parameters in every layer (the tensorly-torch ``rank=0.5``).

        Each site takes the largest grid rank whose parameters are at most ``fraction`` of its
        dense parameters (the smallest rank if none is). Sites that do not admit ``method``
        stay dense; ``method=None`` uses each site's first method.
        """
        if fraction <= 0:
            raise RankSearchError(f"fraction must be positive, got {fraction}")
        choices = {}
        for s in self.decomposable:
            m = method_for(s, method)
            if m is None:
                continue
            fac = factorize.get(m)
            grid = self.ranks(s.name, m)
            fits = [r for r in grid if fac.params(s, r) <= fraction * s.dense_params]
            choices[s.name] = Choice(m, fits[-1] if fits else grid[0])
        if not choices:
            raise NotAdmittedError(f"no layer of the space admits {method!r}")
        return Config(choices)

    # -- serialization --------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        data = {
            "sites": [s.to_dict() for s in self.sites],
            "model_params": self.model_params,
            "spec": self.spec.to_json(),
        }
        if self.other_macs:  # left out when 0, so spaces without it keep their signature
            data["other_macs"] = self.other_macs
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RankSpace:
        return cls(
            tuple(Site.from_dict(s) for s in data["sites"]),
            model_params=data["model_params"],
            spec=SpaceSpec.from_json(data.get("spec", {})),
            other_macs=data.get("other_macs", 0),
        )


# -- helpers ------------------------------------------------------------------------------------
def _replace(site: Site, **changes: Any) -> Site:
    return replace(site, **changes)


def _methods_by_kind(
    methods: Sequence[str] | Mapping[str, Sequence[str]] | None,
) -> dict[str, tuple[str, ...]]:
    if methods is None:
        return dict(DEFAULT_METHODS)
    if isinstance(methods, str):
        methods = [methods]
    if isinstance(methods, Mapping):
        by_kind = {k: tuple(v) for k, v in methods.items()}
    else:
        by_kind = {
            kind: tuple(m for m in methods if kind in factorize.get(m).kinds)
            for kind in ("conv2d", "linear")
        }
    for names in by_kind.values():
        for m in names:
            factorize.get(m)  # raises UnknownMethodError
    return by_kind


def nearest_rank(grid: Sequence[Rank], target: float | Sequence[float]) -> int:
    """Index of the rank in ``grid`` nearest ``target`` (distance summed over the rank's
    components; the first of equals)."""
    point = np.atleast_1d(np.asarray(target, dtype=float))
    return int(np.argmin([np.abs(np.atleast_1d(r) - point).sum() for r in grid]))


def method_for(site: Site, method: str | None) -> str | None:
    """``method`` if the site admits it (None if not); the site's first method for None."""
    if method is None:
        return site.methods[0]
    factorize.get(method)
    return method if method in site.methods else None


def _exclusion(site: Site, calls: int, spec: SpaceSpec, tied_to: str | None) -> str | None:
    include, exclude, min_params = spec.include, spec.exclude, spec.min_params
    if tied_to is not None:
        return (f"its weight is tied to {tied_to}: factorizing it would untie them and add "
                "parameters; untie the weights first to compress this layer")
    if calls == 0:
        return "not called in the traced forward pass"
    if calls > 1:
        return f"called {calls} times in one forward pass (shared module)"
    if include is not None and not any(fnmatch.fnmatchcase(site.name, p) for p in include):
        return "not matched by include"
    if exclude is not None and (p := next(
        (p for p in exclude if fnmatch.fnmatchcase(site.name, p)), None
    )):
        return f"excluded by pattern {p!r}"
    if prod(site.weight_shape) < min_params:
        return f"fewer than min_params={min_params} weights"
    return None


def _tied(model: nn.Module, layers: Sequence[Layer]) -> dict[str, str]:
    """Layers whose weight or bias another module also holds, each with the name of one
    other holder (e.g. a language model's head tied to its embedding). A module reused under
    two names is not tied to itself (discovery reports it as shared)."""
    holders: dict[int, dict[int, str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for key, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), {}).setdefault(id(module), f"{name}.{key}")
    tied = {}
    for layer in layers:
        own = layer.module.out_proj if layer.role == "out_proj" else layer.module
        for param in layer.parameters:
            others = [n for m, n in holders.get(id(param), {}).items() if m != id(own)]
            if others:
                tied[layer.name] = others[0]
                break
    return tied


def cheaper(site: Site, method: str, rank: Rank) -> bool:
    """Whether ``method`` at ``rank`` costs less than the dense layer in parameters or MACs."""
    fac = factorize.get(method)
    dense = factorize.dense_stage(site)
    return fac.params(site, rank) < dense.params or fac.macs(site, rank) < dense.macs


def _dearer(site: Site, method: str, spec: SpaceSpec) -> str | None:
    """The reason ``method`` is of no use on ``site``: even its smallest rank costs as much as
    the dense layer (None when some rank is cheaper)."""
    top = factorize.get(method).max_rank(site)
    smallest = _grid(top, spec.multiple_of, spec.min_rank, spec.max_choices)[0]
    if cheaper(site, method, smallest):
        return None
    return ("even its smallest rank costs as much as the dense layer (pass dearer=True to "
            "allow it)")


def _trace(model: nn.Module, example_input: Inputs,
           layers: Sequence[Layer]) -> tuple[Shapes, int, int]:
    """The shapes of every call of each layer in one forward pass in eval mode, the batch
    size of ``example_input`` and the FLOPs `FlopCounterMode` counts in that pass.

    The fast paths of torch's transformer layers are turned off meanwhile: they compute
    attention and feed-forward layers without calling them as modules.
    """
    try:
        batch = batch_size(example_input)
    except ValueError as e:
        raise InputShapeError(f"{e}. {_INPUT_HINT}") from None
    shapes: Shapes = {}
    handles = []
    for layer in layers:
        if layer.role is None:
            hook = partial(_record, shapes, layer.name)
        elif layer.role == "q_proj":
            hook = partial(_record_attention, shapes, layer.name.removesuffix("q_proj"))
        else:
            continue
        handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))
    training = model.training
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call(model, example_input)
    except Exception as e:  # the model's own error names the mismatch
        raise InputShapeError(
            f"the example input ({_describe(example_input)}) does not fit the model "
            f"({type(e).__name__}: {e}). {_hint(model, example_input)}"
        ) from e
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(training)
        for h in handles:
            h.remove()
    return shapes, batch, counter.get_total_flops()


_INPUT_HINT = (
    "Pass a batch like the model's training input: a tensor (e.g. torch.zeros(1, 3, 32, 32) "
    "for CIFAR images, or integer token ids such as torch.zeros(1, 16, dtype=torch.long)), a "
    "tuple of positional arguments, or a dict of keyword arguments (e.g. {'input_ids': ids, "
    "'attention_mask': mask} for a Hugging Face model)."
)


def _hint(model: nn.Module, example_input: Inputs) -> str:
    """`_INPUT_HINT`, first naming token ids when a model with embeddings got floats."""
    embeds = any(isinstance(m, nn.Embedding) for m in model.modules())
    if embeds and any(t.is_floating_point() for t in tensors(example_input)):
        return ("The model has an embedding layer: it takes token ids, which must be an "
                "integer tensor (torch.long), not floats. " + _INPUT_HINT)
    return _INPUT_HINT


def _describe(example_input: Inputs) -> str:
    """A short description of an input: its tensors' shapes and dtypes, and its structure."""
    def one(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
        return type(x).__name__

    if isinstance(example_input, Mapping):
        return "dict " + ", ".join(f"{k}: {one(v)}" for k, v in example_input.items())
    if isinstance(example_input, tuple | list):
        return f"{type(example_input).__name__} of " + ", ".join(one(v) for v in example_input)
    return f"tensor {one(example_input)}" if isinstance(example_input, torch.Tensor) else one(
        example_input)


def _record(shapes: Shapes, name: str, module: nn.Module, args: tuple[Any, ...],
            kwargs: dict[str, Any], output: torch.Tensor) -> None:
    x = args[0] if args else next(iter(kwargs.values()))
    shapes.setdefault(name, []).append((tuple(x.shape), tuple(output.shape)))


def _record_attention(shapes: Shapes, prefix: str, module: nn.MultiheadAttention,
                      args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
    """The shapes of the four projections of one call of an attention module."""
    given = [*args[:3], *(kwargs[k] for k in ("query", "key", "value")[len(args[:3]):])]
    e = module.embed_dim
    for proj, x in zip(("q_proj", "k_proj", "v_proj"), given, strict=True):
        shapes.setdefault(prefix + proj, []).append((tuple(x.shape), (*x.shape[:-1], e)))
    out = tuple(output[0].shape)
    shapes.setdefault(prefix + "out_proj", []).append((out, out))


def _positions(shape: tuple[int, ...], batch: int) -> tuple[int, ...]:
    """The leading dimensions of a linear layer's input, without the batch dimension: the
    first of them equal to the example's batch size (dim 0 for (N, L, E), dim 1 for the
    (L, N, E) of a sequence-first transformer)."""
    lead = list(shape[:-1])
    if batch in lead:
        lead.remove(batch)
    return tuple(lead)


def _grid(top: Rank, multiple_of: int, min_rank: int, max_choices: int) -> tuple[Rank, ...]:
    """Allowed ranks up to ``top``; tuples scale all components with one fraction."""
    tops = (top,) if isinstance(top, int) else top
    steps = max(tops)
    points = set()
    for t in range(1, steps + 1):
        ranks = []
        for m in tops:
            r = max(min_rank, math.ceil(t * m / steps))
            r = multiple_of * math.ceil(r / multiple_of)
            ranks.append(min(r, m))
        points.add(tuple(ranks))
    ordered = sorted(points, key=lambda p: (sum(p), p))
    if len(ordered) > max_choices:
        last = len(ordered) - 1
        idx = sorted({round(i * last / (max_choices - 1)) for i in range(max_choices)})
        ordered = [ordered[i] for i in idx]
    return tuple(p[0] for p in ordered) if isinstance(top, int) else tuple(ordered)
