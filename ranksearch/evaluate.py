"""The evaluator: build a candidate from the factor cache, fine-tune it briefly, validate it."""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import cycle, islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .cache import FactorCache
from .config import Config
from .cost import CostModel, measure_latency
from .errors import CandidateFailed, RankSearchError
from .fingerprint import Fingerprint, fingerprint
from .result import Result, Status
from .space import RankSpace
from .surgery import compress
from .task import Task

log = logging.getLogger(__name__)

#: Called with (step, accuracy) at each intermediate validation; return False to stop early.
Reporter = Callable[[int, float], bool]

#: Device names a proxy accepts: a kind, optionally with an index ("cuda:1").
DEVICE_KINDS = ("cpu", "cuda", "mps", "xpu", "meta")
_DEVICE = re.compile(rf"^(?:{'|'.join(DEVICE_KINDS)})(?::\d+)?$")
_DEVICE_HINTS = {"gpu": "'cuda' (or 'cuda:0')", "nvidia": "'cuda'", "cuda0": "'cuda:0'",
                 "metal": "'mps'", "apple": "'mps'", "": "'cpu'"}


@dataclass(frozen=True)
class ProxySettings:
    """How a candidate is scored.

    ``steps=0`` is the zero-shot proxy: validation of the decomposed model on
    ``eval_batches`` batches (all of the validation set when None). Otherwise ``steps``
    fine-tuning steps with ``optimizer`` ("adam" or "sgd"), and with knowledge distillation from
    the dense model when ``distill`` > 0 (the weight of the KD term, temperature
    ``temperature``). Accuracy is reported every ``report_every`` steps. A loss that is not
    finite, or that exceeds ``diverge_factor`` times the first loss, fails the candidate.
    ``latency=True`` measures each candidate's median latency (batch 1, ``latency_repeats``
    runs) on the device; the search turns it on when a constraint or objective names latency.
    ``device`` is "cpu", "cuda", "cuda:N", "mps" or "xpu" (a `torch.device` is taken too);
    whether it is there is checked when a search starts (`ranksearch.checks.check_device`).
    """

    steps: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    distill: float = 0.0
    temperature: float = 4.0
    eval_batches: int | None = None
    eval_batch_size: int = 256
    report_every: int = 50
    diverge_factor: float = 100.0
    seed: int = 0
    device: str = "cpu"
    latency: bool = False
    latency_repeats: int = 10

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0 or self.report_every < 1:
            raise RankSearchError(
                "proxy settings need steps >= 0, batch_size >= 1, lr > 0 and report_every >= 1"
            )
        if self.optimizer not in ("adam", "sgd"):
            raise RankSearchError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not 0 <= self.distill <= 1:
            raise RankSearchError(f"distill must be in [0, 1], got {self.distill}")
        object.__setattr__(self, "device", device_name(self.device))

    def describe(self) -> str:
        if self.steps == 0:
            return "zero-shot"
        kd = f", kd {self.distill}" if self.distill else ""
        return f"{self.steps} steps {self.optimizer} lr {self.lr:g} bs {self.batch_size}{kd}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def device_name(device: str | torch.device) -> str:
    """``device`` as the name a proxy stores ("cpu", "cuda", "cuda:1", ...); an unknown name
    raises, naming the one meant."""
    text = str(device) if isinstance(device, torch.device) else device
    if isinstance(text, str) and _DEVICE.match(text.strip().lower()):
        return text.strip().lower()
    hint = _DEVICE_HINTS.get(text.strip().lower()) if isinstance(text, str) else None
    hint = hint or "one of 'cpu', 'cuda', 'cuda:N' (a GPU by index), 'mps' or 'xpu'"
    raise RankSearchError(f"unknown device {device!r}; use {hint}")


class Evaluator:
    """Scores configurations of one model on one task.

    ``evaluator(config) -> Result`` never raises for a bad candidate: a failed decomposition
    or a diverging loss gives a ``failed`` result with the reason, and a reporter asking to
    stop gives a ``pruned`` one with the accuracy reached.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        settings: ProxySettings = ProxySettings(),
        space: RankSpace | None = None,
        cache: FactorCache | None = None,
        fingerprint: Fingerprint | None = None,
    ) -> None:
        self.model = model.eval()
        self.task = task
        self.settings = settings
        self.space = space or RankSpace.discover(model, task.example_input())
        self.cache = cache or FactorCache(model, self.space)
        self.costs = CostModel(self.space)
        self._val = _batches(task, "val", settings.eval_batch_size, settings.eval_batches)
        self._dense_latency: float | None = None
        self._fingerprint = fingerprint

    @property
    def fingerprint(self) -> Fingerprint:
        """The fingerprint of this evaluator's measurements (weights, data, loss, proxy
        settings, space), computed once."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.model, self.task, self.settings, self.space)
        return self._fingerprint

    def result(self, config: Config, metrics: dict[str, float], status: Status = "ok",
               reason: str | None = None, wall_time: float = 0.0,
               partial: int | None = None) -> Result:
        """A `Result` of ``config`` stamped with this evaluator's proxy and fingerprint."""
        proxy = self.settings.describe() if partial is None else \
            f"zero-shot on {partial} validation batch{'es' if partial > 1 else ''}"
        return Result(config=config, metrics=metrics, status=status, reason=reason,
                      wall_time=wall_time, proxy=proxy, fingerprint=self.fingerprint.digest,
                      partial=partial)

    def candidate(self, config: Config, report: Reporter | None = None
                  ) -> tuple[nn.Module, bool]:
        """The model this evaluator scores for ``config``: built from the factor cache and
        fine-tuned by the proxy (seeded, so the same every time on the same device), and
        whether ``report`` stopped the fine-tuning early. Export builds through here too."""
        candidate = self.build(config)
        return candidate, self._tune(candidate, report)

    def build(self, config: Config) -> nn.Module:
        """``config`` built from the factor cache, on the proxy's device, nothing trained."""
        return compress(self.model, config, cache=self.cache).to(self.settings.device)

    def _tune(self, candidate: nn.Module, report: Reporter | None) -> bool:
        """The proxy's seeded fine-tuning of ``candidate`` in place; True when ``report``
        stopped it early."""
        if not self.settings.steps:
            return False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.settings.seed)
            return self._finetune(candidate, report)

    def __call__(self, config: Config, report: Reporter | None = None,
                 partial: int | None = None) -> Result:
        """The proxy score of ``config``; with ``partial``, its partial score instead: zero-shot
        accuracy and loss on the first ``partial`` validation batches (nothing trained)."""
        start = time.perf_counter()
        metrics: dict[str, float] = dict(self.costs.metrics(config))
        status, reason = "ok", None
        try:
            candidate = self.build(config)  # built once: timed, then fine-tuned in place
            if partial is not None:
                metrics.update(self.validate(candidate, self._val[:partial]))
                _check_finite(metrics)
                return self.result(config, metrics, wall_time=time.perf_counter() - start,
                                   partial=partial)
            if self.settings.latency:
                metrics.update(self.latency(candidate))
            stopped = self._tune(candidate, report)
            metrics.update(self.validate(candidate))
            if stopped:
                status = "pruned"
            _check_finite(metrics)
        except CandidateFailed as e:
            status, reason = "failed", str(e)
        except Exception as e:  # any fault inside one candidate fails that candidate only
            log.warning("candidate %s failed: %s: %s", config, type(e).__name__, e)
            status, reason = "failed", f"{type(e).__name__}: {e}"
        return self.result(config, metrics, status, reason, time.perf_counter() - start,
                           partial=partial)

    def latency(self, model: nn.Module) -> dict[str, float]:
        """Median latency (seconds, batch 1) of ``model`` and its ratio to the dense model's."""
        example = self.task.example_input().to(self.settings.device)
        repeats = self.settings.latency_repeats
        if self._dense_latency is None:
            self._dense_latency = measure_latency(self.model.to(self.settings.device), example,
                                                  warmup=3, repeats=repeats)
        seconds = measure_latency(model, example, warmup=3, repeats=repeats)
        return {"latency": seconds, "latency_ratio": seconds / self._dense_latency}

    def validate(self, model: nn.Module, batches: list[tuple] | None = None) -> dict[str, float]:
        """Accuracy and mean loss on the validation batches (or on ``batches``)."""
        device = self.settings.device
        model.eval()
        correct = total = 0
        loss = 0.0
        with torch.inference_mode():
            for x, y in self._val if batches is None else batches:
                x, y = x.to(device), y.to(device)
                out = model(x)
                loss += float(self.task.loss(out, y)) * len(y)
                correct += int((out.argmax(1) == y).sum())
                total += len(y)
        return {"accuracy": correct / total, "loss": loss / total}

    def _finetune(self, model: nn.Module, report: Reporter | None) -> bool:
        """Fine-tune in place; True when the reporter stopped it early."""
        s = self.settings
        loader = self.task.loader("train", s.batch_size, shuffle=True, seed=s.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        if s.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum,
                                  weight_decay=s.weight_decay)
        teacher = self.model.to(s.device) if s.distill else None
        first = None
        model.train()
        for step, (x, y) in enumerate(islice(cycle(loader), s.steps), start=1):
            x, y = x.to(s.device), y.to(s.device)
            out = model(x)
            loss = self.task.loss(out, y)
            if teacher is not None:
                with torch.no_grad():
                    target = F.log_softmax(teacher(x) / s.temperature, 1)
                kd = F.kl_div(F.log_softmax(out / s.temperature, 1), target, log_target=True,
                              reduction="batchmean") * s.temperature**2
                loss = (1 - s.distill) * loss + s.distill * kd
            value = float(loss.detach())
            if not math.isfinite(value):
                raise CandidateFailed(f"loss became {value} at fine-tuning step {step}")
            first = first if first is not None else value
            if value > s.diverge_factor * max(first, 1e-3):
                raise CandidateFailed(
                    f"loss diverged at step {step}: {value:.3g} > {s.diverge_factor:g} × the "
                    f"first loss {first:.3g}; try a lower learning rate"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if report is not None and (step % s.report_every == 0 or step == s.steps):
                accuracy = self.validate(model)["accuracy"]
                model.train()
                if not report(step, accuracy) and step < s.steps:
                    return True
        return False


def _check_finite(metrics: dict[str, float]) -> None:
    """Fail a candidate whose validation gave a metric or loss that is not a finite number."""
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise CandidateFailed("validation gave non-finite " + ", ".join(
            f"{k} {v}" for k, v in sorted(bad.items())))


def _batches(task: Task, split: str, batch_size: int, limit: int | None) -> list[tuple]:
    """The first ``limit`` batches of a split, kept in memory (the same for every candidate)."""
    loader = task.loader(split, batch_size, shuffle=False, seed=0)
    return list(islice(loader, limit)) if limit else list(loader)
