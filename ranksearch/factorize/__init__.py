"""Factorizations of Conv2d and Linear layers, registered by name.

>>> from ranksearch.factorize import get
>>> get("svd").max_rank(site)  # doctest: +SKIP
"""

from __future__ import annotations

from ..errors import UnknownMethodError
from .base import Factorization, Factors, Stage, dense_stage

REGISTRY: dict[str, Factorization] = {}


def register(cls: type[Factorization]) -> type[Factorization]:
    """Class decorator: make a factorization available under ``cls.name``."""
    REGISTRY[cls.name] = cls()
    return cls


def get(name: str) -> Factorization:
    """The registered factorization called ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown factorization {name!r}; choose one of {sorted(REGISTRY)}"
        ) from None


def available(kind: str | None = None) -> list[str]:
    """Names of the registered factorizations, optionally only those for a layer kind."""
    return [n for n, f in REGISTRY.items() if kind is None or kind in f.kinds]


from . import cp, svd, tr, tt, tucker  # noqa: E402  (modules register themselves)

__all__ = [
    "REGISTRY",
    "Factorization",
    "Factors",
    "Stage",
    "available",
    "cp",
    "dense_stage",
    "get",
    "register",
    "svd",
    "tr",
    "tt",
    "tucker",
]
