"""Checks of strategy options at the boundary, as scikit-learn validates its parameters.

A strategy checks every option in ``__init__`` with these, so a bad value fails at once, as
an `OptionError` (a `RankSearchError` and a `ValueError`) that names the strategy (``who``),
the option (``name``), the value and what would be valid, never later as a numpy traceback.
Each check returns the value in canonical form (``int``, ``float``, ``list``). With
``optional=True``, None passes through (the option's default is decided later).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from . import factorize
from .errors import OptionError
from .factorize.base import is_int


def integer(value: Any, name: str, who: str, low: int = 1, *,
            optional: bool = False) -> int | None:
    """``value`` as an int if it is an integer (not a bool) of at least ``low``."""
    if value is None and optional:
        return None
    if not is_int(value) or value < low:
        raise OptionError(f"{who}: {name} must be an integer ≥ {low}{_or_none(optional)}, "
                          f"got {value!r}")
    return int(value)


def positive_int(value: Any, name: str, who: str, *, optional: bool = False) -> int | None:
    """``value`` as an int if it is an integer ≥ 1."""
    return integer(value, name, who, 1, optional=optional)


def number_in(value: Any, name: str, who: str, low: float = -math.inf, high: float = math.inf,
              *, open_low: bool = False, open_high: bool = False,
              optional: bool = False) -> float | None:
    """``value`` as a float if it is a finite number in the interval from ``low`` to
    ``high`` (closed at each end unless ``open_low``/``open_high``)."""
    if value is None and optional:
        return None
    if not _is_number(value) or not _within(value, low, high, open_low, open_high):
        raise OptionError(f"{who}: {name} must be a number "
                          f"{interval(low, high, open_low, open_high)}{_or_none(optional)}, "
                          f"got {value!r}")
    return float(value)


def fraction(value: Any, name: str, who: str, *, optional: bool = False) -> float | None:
    """``value`` as a float if it is a number in (0, 1]."""
    return number_in(value, name, who, 0.0, 1.0, open_low=True, optional=optional)


def positive(value: Any, name: str, who: str) -> float:
    """``value`` as a float if it is a finite number > 0."""
    return number_in(value, name, who, 0.0, open_low=True)  # type: ignore[return-value]


def boolean(value: Any, name: str, who: str) -> bool:
    """``value`` if it is True or False (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise OptionError(f"{who}: {name} must be true or false, got {value!r}")
    return value


def choice(value: Any, name: str, who: str, choices: Collection[str], *,
           optional: bool = False) -> str | None:
    """``value`` if it is one of ``choices``."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or value not in choices:
        raise OptionError(f"{who}: unknown {name} {value!r}; it must be one of "
                          f"{list(choices)}{_or_none(optional)}")
    return value


def method_name(value: Any, name: str, who: str, *, spectral: bool = False) -> str | None:
    """``value`` if it is None or a registered factorization; with ``spectral``, one whose
    rank is read off matrix spectra (`ranksearch.factorize.Factorization.spectral`)."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in factorize.REGISTRY:
        raise OptionError(f"{who}: unknown factorization {value!r} for {name}; it must be one "
                          f"of {sorted(factorize.REGISTRY)} or None")
    if spectral and factorize.get(value).spectral is None:
        valid = sorted(n for n, f in factorize.REGISTRY.items() if f.spectral is not None)
        raise OptionError(f"{who}: {name}={value!r} ranks are not matrix ranks; it must be "
                          f"one of {valid} or None")
    return value


def values_in(values: Any, name: str, who: str, low: float = -math.inf,
              high: float = math.inf, *, open_low: bool = False, open_high: bool = False,
              optional: bool = True) -> list[float] | None:
    """``values`` as a list of floats if it is a non-empty list of finite numbers in the
    interval (as for `number_in`)."""
    if values is None and optional:
        return None
    if (not _is_list(values) or not (out := list(values))
            or not all(_is_number(v) and _within(v, low, high, open_low, open_high)
                       for v in out)):
        raise OptionError(f"{who}: {name} must be a non-empty list of numbers "
                          f"{interval(low, high, open_low, open_high)}{_or_none(optional)}, "
                          f"got {values!r}")
    return [float(v) for v in out]


def integers(values: Any, name: str, who: str, low: int = 1) -> list[int]:
    """``values`` as a list of ints if it is an integer ≥ ``low`` or a non-empty list of
    them."""
    out = [values] if is_int(values) else list(values) if _is_list(values) else []
    if not out or not all(is_int(v) and v >= low for v in out):
        raise OptionError(f"{who}: {name} must be an integer ≥ {low} or a non-empty list of "
                          f"them, got {values!r}")
    return [int(v) for v in out]


def names(values: Any, name: str, who: str) -> list[str]:
    """``values`` as a list of non-empty names if it is a comma-separated string or a list of
    strings (empty entries dropped)."""
    parts = values.split(",") if isinstance(values, str) else values
    if not _is_list(parts) or not all(isinstance(p, str) for p in parts):
        raise OptionError(f"{who}: {name} must be a comma-separated string or a list of "
                          f"names, got {values!r}")
    return [p.strip() for p in parts if p.strip()]


def mapping(value: Any, name: str, who: str) -> dict[str, Any]:
    """``value`` as a dict if it is None (empty) or a mapping with string keys."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise OptionError(f"{who}: {name} must be a mapping of names to values (a JSON "
                          f"object), got {value!r}")
    return dict(value)


def interval(low: float, high: float, open_low: bool = False, open_high: bool = False) -> str:
    """The interval in words: ``"in (0, 1]"``, ``"≥ 0"``, ``"> 0"``, ``"≤ 1"``."""
    if math.isinf(high) and math.isinf(low):
        return "(any finite value)"
    if math.isinf(high):
        return f"{'>' if open_low else '≥'} {low:g}"
    if math.isinf(low):
        return f"{'<' if open_high else '≤'} {high:g}"
    return f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"


def _within(x: float, low: float, high: float, open_low: bool, open_high: bool) -> bool:
    above = x > low if open_low else x >= low
    below = x < high if open_high else x <= high
    return above and below


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _is_list(x: object) -> bool:
    """A list-like of values: iterable, but not a string, bytes or mapping."""
    return isinstance(x, Iterable) and not isinstance(x, str | bytes | Mapping)


def _or_none(optional: bool) -> str:
    return " or None" if optional else ""


__all__ = ["boolean", "choice", "fraction", "integer", "integers", "interval", "mapping",
           "method_name", "names", "number_in", "positive", "positive_int", "values_in"]
