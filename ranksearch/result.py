"""The record of one evaluated configuration."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .space import Config

Status = Literal["ok", "failed", "pruned"]


@dataclass(frozen=True)
class Result:
    """One evaluation: the config, its metrics (accuracy, loss, params, flops, energy, ...),
    ``status`` ("ok", "failed" with ``reason``, or "pruned" by early stopping), the wall time in
    seconds, ``proxy``, a description of how it was evaluated, and ``fingerprint``, the digest
    of everything that decided the score (`ranksearch.fingerprint.Fingerprint.digest`)."""

    config: Config
    metrics: Mapping[str, float] = field(default_factory=dict)
    status: Status = "ok"
    reason: str | None = None
    wall_time: float = 0.0
    proxy: str = ""
    fingerprint: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_json(),
            "metrics": dict(self.metrics),
            "status": self.status,
            "reason": self.reason,
            "wall_time": self.wall_time,
            "proxy": self.proxy,
            "fingerprint": self.fingerprint,
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
        )
