"""Constraints on the metrics of a result, such as ``"flops<=0.5"`` or ``"accuracy>=0.9"``.

A `Constraint` bounds one metric from above (``<=``) or below (``>=``); the strict forms
``<`` and ``>`` are accepted and read the same. Cost metrics (params, macs, flops, energy,
latency) can be bounded absolutely or relative to the dense model, in which case the constraint
reads the ``<metric>_ratio`` entry of the metrics. How the value is read:

================================  ============================================================
``flops<=0.5``                    a bare number ≤ 1 on params/macs/flops: a ratio of the dense
                                  model
``params<=2e6``                   a bare number > 1 on params/macs/flops: absolute
``flops<=50%``, ``params<=0.3x``  ``%`` or ``x`` force the ratio reading
``params<=2M``, ``macs<=300k``    ``k``/``K``, ``M``, ``G`` (params, macs, flops): absolute
``energy<=5mJ``                   ``J``, ``mJ``, ``uJ`` (or ``µJ``): absolute joules
``latency<=10ms``                 ``s``, ``ms``, ``us`` (or ``µs``): absolute seconds
``energy<=2e-5``                  refused: a bare number on energy or latency is ambiguous;
                                  write a unit (``2e-5J``) or ``x`` (``0.5x``)
``flops_ratio<=0.5``              a ``_ratio`` name: a ratio, whatever the number
``accuracy>=0.9``                 accuracy is a fraction in [0, 1]; ``accuracy>=90%`` is the
                                  same
``loss<=0.5``                     loss: absolute (so are ``perplexity``, ``mse``, ``mae``)
``top5>=0.95``                    top5 is a fraction, as accuracy is
================================  ============================================================

``str(c)`` writes a canonical form that parses back to an equal constraint and says which
reading is used: ratios with an ``x`` suffix (``flops<=0.5x``), absolute energy and latency with
their base unit (``energy<=0.005J``), absolute counts as plain numbers (``params<=2000000``).
`Constraint.format_value` writes a value of the metric the same way, for messages.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from .errors import ConstraintError
from .metrics import METRICS as QUALITY

COST_METRICS = ("params", "macs", "flops", "energy", "latency")
COUNT_METRICS = ("params", "macs", "flops")
METRICS = (*QUALITY, *COST_METRICS)
#: Metrics that are fractions in [0, 1], which a constraint may give in percent.
FRACTIONS = tuple(m.name for m in QUALITY.values() if m.fraction)

_UNITS: dict[str, dict[str, Decimal]] = {
    "params": {"k": Decimal(10**3), "K": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9)},
    "energy": {
        "J": Decimal(1),
        "mJ": Decimal("1e-3"),
        "uJ": Decimal("1e-6"),
        "µJ": Decimal("1e-6"),
        "μJ": Decimal("1e-6"),
    },
    "latency": {
        "s": Decimal(1),
        "ms": Decimal("1e-3"),
        "us": Decimal("1e-6"),
        "µs": Decimal("1e-6"),
        "μs": Decimal("1e-6"),
    },
}
_UNITS["macs"] = _UNITS["flops"] = _UNITS["params"]
_BASE_UNIT = {"energy": "J", "latency": "s"}
_UNIT_WORD = {"energy": "joules", "latency": "seconds"}

_OPS = {"<=": "<=", "<": "<=", "≤": "<=", ">=": ">=", ">": ">=", "≥": ">="}

_SYNTAX = re.compile(
    r"""^\s*(?P<metric>[A-Za-z_][A-Za-z0-9_]*)
    \s*(?P<op>[<>=≤≥!]+)
    \s*(?P<number>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)?
    \s*(?P<suffix>\S*?)\s*$""",
    re.VERBOSE,
)

HELP = (
    "a constraint is METRIC OP VALUE with METRIC one of "
    f"{', '.join(METRICS)} (or params_ratio, flops_ratio, ...), OP one of <=, >= (< and > read "
    "the same), and VALUE a number with an optional suffix: a %/x suffix is a ratio of the dense "
    "model; for params/macs/flops a bare number ≤ 1 is a ratio too, a bare number > 1 or k/M/G "
    "is absolute; energy and latency need a unit (J/mJ/uJ, s/ms/us) or %/x, never a bare "
    "number; accuracy and top5 are fractions or percentages. Examples: 'flops<=0.5', 'flops<=50%', "
    "'params<=0.3x', 'params<=2M', 'params<=2e6', 'energy<=5mJ', 'energy<=0.5x', "
    "'latency<=10ms', 'accuracy>=0.9', 'accuracy>=90%'"
)


def _number(value: float) -> str:
    """The shortest text that reads back as exactly ``value``."""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _ambiguous(metric: str, op: str, amount: Decimal) -> str:
    """The message for a bare number on energy or latency, naming both readings."""
    number = _number(float(amount))
    unit = _BASE_UNIT[metric]
    others = ", ".join(u for u in dict.fromkeys(_UNITS[metric]) if u != unit and u.isascii())
    return (
        f"{metric}{op}{number} is ambiguous: write {metric}{op}{number}{unit} for "
        f"{_UNIT_WORD[metric]} or {metric}{op}{number}x for a ratio of the dense model "
        f"(other units: {others})"
    )


def metric_value(metrics: Mapping[str, Any], key: str) -> float:
    """``metrics[key]`` as a float; NaN when missing or not a number."""
    value = metrics.get(key)
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass(frozen=True)
class Constraint:
    """A bound on one metric: ``metric op value``, read from ``metrics[self.key]``.

    ``relative`` bounds the ratio against the dense model (``<metric>_ratio``) and is only
    allowed for cost metrics. ``op`` is stored as ``"<="`` or ``">="`` (``"<"`` and ``">"`` are
    accepted and read the same). A metric named ``flops_ratio`` is stored as ``flops`` with
    ``relative=True``.
    """

    metric: str
    op: Literal["<=", ">="]
    value: float
    relative: bool = False

    def __post_init__(self) -> None:
        metric = self.metric
        relative = bool(self.relative)
        if isinstance(metric, str) and metric.endswith("_ratio"):
            base = metric[: -len("_ratio")]
            if base in COST_METRICS:
                metric, relative = base, True
        if metric not in METRICS:
            raise ConstraintError(f"unknown metric {self.metric!r} in a constraint; {HELP}")
        if self.op not in _OPS:
            raise ConstraintError(f"unknown operator {self.op!r} in a constraint; {HELP}")
        if isinstance(self.value, bool):
            raise ConstraintError(f"constraint value must be a number, got {self.value!r}")
        try:
            value = float(self.value)
        except (TypeError, ValueError) as e:
            raise ConstraintError(
                f"constraint value must be a number, got {self.value!r}; {HELP}"
            ) from e
        if not math.isfinite(value):
            raise ConstraintError(f"constraint value must be finite, got {self.value!r}")
        if relative and metric not in COST_METRICS:
            raise ConstraintError(
                f"{metric} cannot be bounded relative to the dense model; only "
                f"{', '.join(COST_METRICS)} can (e.g. 'flops<=0.5x')"
            )
        if metric in COST_METRICS and value < 0:
            raise ConstraintError(f"a bound on {metric} cannot be negative, got {value!r}")
        if metric in FRACTIONS and not 0 <= value <= 1:
            raise ConstraintError(
                f"{metric} is a fraction in [0, 1], got {value!r}; write e.g. '{metric}>=0.9' "
                f"or '{metric}>=90%'"
            )
        if metric in COUNT_METRICS and not relative and value <= 1:
            raise ConstraintError(
                f"an absolute bound on {metric} must be above 1, got {value!r}; for a ratio of "
                f"the dense model write e.g. '{metric}<=0.5' or pass relative=True"
            )
        object.__setattr__(self, "metric", metric)
        object.__setattr__(self, "op", _OPS[self.op])
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "relative", relative)

    # -- parsing --------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> Constraint:
        """Read a constraint such as ``"flops<=0.5"``, ``"params<=2M"`` or ``"accuracy>=90%"``
        (see the module docstring for the rules)."""
        if isinstance(text, Constraint):
            return text
        if not isinstance(text, str):
            raise ConstraintError(f"a constraint must be a string, got {text!r}; {HELP}")
        m = _SYNTAX.match(text)
        if m is None:
            raise ConstraintError(f"cannot read constraint {text!r}; {HELP}")
        name, op, number, suffix = m["metric"], m["op"], m["number"], m["suffix"]
        metric = name.lower()
        forced_ratio = False
        if metric.endswith("_ratio") and metric[: -len("_ratio")] in COST_METRICS:
            metric, forced_ratio = metric[: -len("_ratio")], True
        if metric not in METRICS:
            raise ConstraintError(f"unknown metric {name!r} in constraint {text!r}; {HELP}")
        if op not in _OPS:
            raise ConstraintError(f"bad operator {op!r} in constraint {text!r}; {HELP}")
        if number is None:
            raise ConstraintError(f"constraint {text!r} has no number to compare with; {HELP}")
        amount = Decimal(number)
        if not math.isfinite(float(amount)):
            raise ConstraintError(f"constraint value must be finite, got {number!r} in {text!r}")

        if suffix == "":
            if forced_ratio:
                relative = True
            elif metric in _BASE_UNIT:
                raise ConstraintError(_ambiguous(metric, _OPS[op], amount))
            elif metric in COST_METRICS:
                relative = amount <= 1
            else:
                relative = False
        elif suffix == "%":
            if metric in QUALITY and metric not in FRACTIONS:
                raise ConstraintError(f"{metric} cannot be given in percent: {text!r}; {HELP}")
            amount /= 100
            relative = metric in COST_METRICS
        elif suffix in ("x", "X"):
            if metric not in COST_METRICS:
                raise ConstraintError(
                    f"{metric} cannot be bounded relative to the dense model ({text!r}); only "
                    f"{', '.join(COST_METRICS)} take an 'x' suffix"
                )
            relative = True
        elif suffix in _UNITS.get(metric, {}) and not forced_ratio:
            amount *= _UNITS[metric][suffix]
            relative = False
        else:
            units = ", ".join(dict.fromkeys(_UNITS.get(metric, {})))
            accepted = "%, x" + (f", {units}" if units and not forced_ratio else "")
            if metric in FRACTIONS:
                accepted = "%"
            elif metric in QUALITY:
                accepted = "none"
            raise ConstraintError(
                f"unknown suffix {suffix!r} in constraint {text!r}; {metric}"
                f"{'_ratio' if forced_ratio else ''} accepts: {accepted}. {HELP}"
            )
        return cls(metric, _OPS[op], float(amount), relative)  # type: ignore[arg-type]

    # -- evaluation -----------------------------------------------------------------------------
    @property
    def key(self) -> str:
        """The metrics entry this constraint reads: ``"flops_ratio"`` or ``"flops"``."""
        return f"{self.metric}_ratio" if self.relative else self.metric

    def _read(self, metrics: Mapping[str, float]) -> float:
        return metric_value(metrics, self.key)

    def satisfied(self, metrics: Mapping[str, float]) -> bool:
        """Whether ``metrics`` meet the bound; a missing or NaN entry never does."""
        x = self._read(metrics)
        return x <= self.value if self.op == "<=" else x >= self.value

    def violation(self, metrics: Mapping[str, float]) -> float:
        """How far ``metrics`` are from meeting the bound, relative to the bound's size: ≤ 0
        when satisfied (pymoo's ``G <= 0`` convention), positive otherwise, e.g.
        ``(flops_ratio - 0.5) / 0.5`` for ``flops<=0.5``. A bound of 0 is scaled by 1.
        A missing or NaN entry gives ``inf``."""
        x = self._read(metrics)
        if math.isnan(x):
            return math.inf
        raw = (x - self.value) if self.op == "<=" else (self.value - x)
        g = raw / (abs(self.value) or 1.0)
        if self.satisfied(metrics):
            return min(g, 0.0)
        return max(g, math.ulp(0.0))  # positive even when the quotient underflows

    @property
    def suffix(self) -> str:
        """The suffix that says how the value is read: ``x`` for a ratio of the dense model,
        ``J`` or ``s`` for absolute energy or latency, none otherwise."""
        if self.relative:
            return "x"
        return _BASE_UNIT.get(self.metric, "")

    def format_value(self, value: float, digits: int | None = None) -> str:
        """``value`` of the metric this constraint reads, written with its reading (``0.7x``,
        ``0.003s``, ``1500000``): exactly, or to ``digits`` significant digits."""
        number = _number(float(value)) if digits is None else f"{value:.{digits}g}"
        return f"{number}{self.suffix}"

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.format_value(self.value)}"


def parse_constraints(
    items: Iterable[str | Constraint] | str | Constraint | None,
) -> tuple[Constraint, ...]:
    """Constraints from strings or `Constraint` objects. A single string or constraint is
    accepted too, and a string may hold several constraints separated by commas
    (``"flops<=0.5, accuracy>=0.9"``). ``None`` gives no constraints."""
    if items is None:
        return ()
    if isinstance(items, str | Constraint):
        items = (items,)
    out: list[Constraint] = []
    for item in items:
        if isinstance(item, Constraint):
            out.append(item)
        elif isinstance(item, str):
            parts = [p for p in item.split(",") if p.strip()]
            if not parts:
                raise ConstraintError(f"empty constraint {item!r}; {HELP}")
            out.extend(Constraint.parse(p) for p in parts)
        else:
            raise ConstraintError(
                f"a constraint must be a string or a Constraint, got {item!r}; {HELP}"
            )
    return tuple(out)


def satisfies(metrics: Mapping[str, float], constraints: Iterable[Constraint]) -> bool:
    """Whether ``metrics`` meet every constraint."""
    return all(c.satisfied(metrics) for c in constraints)
