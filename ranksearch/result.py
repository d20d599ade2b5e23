"""The record of one evaluated configuration."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .config import Config

Status = Literal["ok", "failed", "pruned"]


@dataclass(frozen=True)
class Result:
    """One evaluation: the config, its metrics (the task's metric under its own name, such as
    ``accuracy`` or ``perplexity``, then loss, params, flops, energy, ...),
    ``status`` ("ok", "failed" with ``reason``, or "pruned" by early stopping), the wall time in
    seconds, ``proxy``, a description of how it was evaluated, and ``fingerprint``, the digest
    of everything that decided the score (`ranksearch.fingerprint.Fingerprint.digest`).

    ``partial`` is None for a proxy score; for a partial score (a strategy's cheap
    measurement: zero-shot accuracy on the first ``partial`` validation batches, nothing
    trained) it is that number of batches. Partial results are stored and count against the
    evaluation budget, but are never candidates: fronts, ``best`` and reports leave them out.
    ``weights`` is the file of the candidate's fine-tuned weights when the search kept them
    (``keep_weights=True``).
    """

    config: Config
    metrics: Mapping[str, float] = field(default_factory=dict)
    status: Status = "ok"
    reason: str | None = None
    wall_time: float = 0.0
    proxy: str = ""
    fingerprint: str = ""
    partial: int | None = None
    weights: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def key(self) -> str:
        """The store key of this measurement: the config's, marked for a partial score."""
        return result_key(self.config, self.partial)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_json(),
            "metrics": dict(self.metrics),
            "status": self.status,
            "reason": self.reason,
            "wall_time": self.wall_time,
            "proxy": self.proxy,
            "fingerprint": self.fingerprint,
            "partial": self.partial,
            **({"weights": self.weights} if self.weights is not None else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Result:
        return cls(
            config=Config.from_json(data["config"]),
            metrics=dict(data.get("metrics", {})),
            status=data.get("status", "ok"),
            reason=data.get("reason"),
            wall_time=float(data.get("wall_time", 0.0)),
            proxy=data.get("proxy", ""),
            fingerprint=data.get("fingerprint", ""),
            partial=data.get("partial"),
            weights=data.get("weights"),
        )


def result_key(config: Config, partial: int | None = None) -> str:
    """The store key of a measurement of ``config`` (a partial score has its own)."""
    return config.key if partial is None else f"{config.key}#partial={partial}"
