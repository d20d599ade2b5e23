"""Choices and configurations: a `Choice` is the factorization and rank for one site, a
`Config` maps site names to choices (sites it does not name stay dense).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .site import Rank


@dataclass(frozen=True)
class Choice:
    """The factorization of one site: ``method`` and ``rank`` (an int, or a tuple for tucker2
    (in, out) and tt/tr (inner ranks)). ``Choice("dense")`` keeps the layer as it is."""

    method: str
    rank: Rank | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rank, list):
            object.__setattr__(self, "rank", tuple(self.rank))
        if (self.method == "dense") != (self.rank is None):
            raise ConfigError(
                f"Choice({self.method!r}, {self.rank!r}): 'dense' takes no rank and every "
                "factorization needs one"
            )

    @property
    def is_dense(self) -> bool:
        return self.method == "dense"

    def to_json(self) -> dict[str, Any]:
        rank = list(self.rank) if isinstance(self.rank, tuple) else self.rank
        return {"method": self.method, "rank": rank}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Choice:
        try:
            return cls(data["method"], data.get("rank"))
        except (KeyError, TypeError) as e:
            raise ConfigError(
                f"a choice must be {{'method': ..., 'rank': ...}}, got {data!r}"
            ) from e

    def __str__(self) -> str:
        if self.is_dense:
            return "dense"
        rank = "x".join(map(str, self.rank)) if isinstance(self.rank, tuple) else self.rank
        return f"{self.method}:{rank}"


DENSE = Choice("dense")


class Config(Mapping[str, Choice]):
    """An immutable, hashable mapping from site name to `Choice`; unnamed sites stay dense.

    Dense entries are dropped, so two configs that build the same model are equal.
    """

    __slots__ = ("_items", "_key")
    _items: tuple[tuple[str, Choice], ...]
    _key: str | None

    def __init__(self, choices: Mapping[str, Choice] | Iterable[tuple[str, Choice]] = ()) -> None:
        pairs = choices.items() if isinstance(choices, Mapping) else choices
        items = {}
        for name, choice in pairs:
            if not isinstance(choice, Choice):
                raise ConfigError(f"config entry {name!r} must be a Choice, got {choice!r}")
            if not choice.is_dense:
                items[name] = choice
        object.__setattr__(self, "_items", tuple(sorted(items.items())))
        object.__setattr__(self, "_key", None)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Config is immutable")

    def __reduce__(self) -> tuple[type[Config], tuple[tuple[tuple[str, Choice], ...]]]:
        return Config, (self._items,)

    def __getitem__(self, name: str) -> Choice:
        for key, choice in self._items:
            if key == name:
                return choice
        raise KeyError(name)

    def get(self, name: str, default: Any = DENSE) -> Any:  # type: ignore[override]
        return super().get(name, default)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self._items == other._items

    def __repr__(self) -> str:
        return f"Config({{{', '.join(f'{k!r}: {v}' for k, v in self._items)}}})"

    def with_choices(self, changes: Mapping[str, Choice]) -> Config:
        """A copy with the choices of some sites replaced."""
        return Config({**dict(self._items), **changes})

    def to_json(self) -> dict[str, Any]:
        return {name: choice.to_json() for name, choice in self._items}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> Config:
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as e:
                raise ConfigError(f"config is not valid JSON: {e}") from e
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a JSON object of site → choice, got {data!r}")
        return cls({name: Choice.from_json(c) for name, c in data.items()})

    @property
    def key(self) -> str:
        """A stable string identifying the config (equal configs have equal keys)."""
        if self._key is None:
            object.__setattr__(self, "_key", json.dumps(self.to_json(), sort_keys=True,
                                                        separators=(",", ":")))
        return self._key  # type: ignore[return-value]
