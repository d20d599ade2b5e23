"""The evaluator: build a candidate from the factor cache, fine-tune it briefly, validate it."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import options as check
from .cache import FactorCache
from .calibration import (
    InputStats,
    batchnorms,
    calibration_inputs,
    collect,
    recalibrate_batchnorm,
)
from .config import Config
from .cost import CostModel
from .errors import CandidateFailed, RankSearchError
from .fingerprint import Fingerprint, fingerprint
from .inputs import call, move
from .latency import LatencyTable
from .metrics import METRICS, Metric, prediction
from .result import Result, Status
from .space import RankSpace
from .surgery import compress
from .task import Task
from .timing import BACKENDS
from .training import evaluate_batches

log = logging.getLogger(__name__)

#: Called with (step, value of the task's metric) at each intermediate validation; return False
#: to stop early.
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
    ``temperature``). The task's metric is reported every ``report_every`` steps. A loss that
    is not finite, or that exceeds ``diverge_factor`` times the first loss, fails the candidate.
    ``latency=True`` prices each candidate's latency from a table of per-layer times
    (`ranksearch.latency.LatencyTable`) measured once on ``device`` under ``backend`` (one of
    eager, channels_last, compile, onnx) at batches of ``latency_batch`` samples, each time
    the median of ``latency_repeats`` samples; the search turns it on when a constraint or
    objective names latency, and times its front end to end.
    ``device`` is "cpu", "cuda", "cuda:N", "mps" or "xpu" (a `torch.device` is taken too);
    whether it is there is checked when a search starts (`ranksearch.checks.check_device`).
    ``data_aware=True`` builds candidates from data-aware factors (`ranksearch.calibration`):
    fitted to the layer inputs of ``calibration_batches`` training batches of ``batch_size``
    (shuffled with ``seed``), collected once per evaluator on ``device``, so that truncation
    minimises each layer's output error rather than its weight error; the costs are the same.
    ``bn_recalibrate=N`` (default 8; 0: off) re-estimates the running statistics of every
    BatchNorm layer of each candidate, as built and before any fine-tuning, on N training
    batches of ``batch_size`` (shuffled with ``seed``, the same batches for every candidate;
    `ranksearch.calibration.recalibrate_batchnorm`); a model without BatchNorm is unchanged
    and needs no training data for it.
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
    backend: str = "eager"
    latency_batch: int = 1
    data_aware: bool = False
    calibration_batches: int = 8
    bn_recalibrate: int = 8

    def __post_init__(self) -> None:
        """Check every field (an `OptionError` naming it), and canonicalize ``device``."""
        who = "ProxySettings"
        for name, low in (("steps", 0), ("batch_size", 1), ("eval_batch_size", 1),
                          ("report_every", 1), ("seed", 0), ("latency_repeats", 1),
                          ("latency_batch", 1),
                          ("calibration_batches", 1), ("bn_recalibrate", 0)):
            check.integer(getattr(self, name), name, who, low)
        check.integer(self.eval_batches, "eval_batches", who, 1, optional=True)
        for name in ("lr", "temperature"):
            check.positive(getattr(self, name), name, who)
        check.number_in(self.weight_decay, "weight_decay", who, 0.0)
        check.number_in(self.momentum, "momentum", who, 0.0, 1.0)
        check.number_in(self.distill, "distill", who, 0.0, 1.0)
        check.number_in(self.diverge_factor, "diverge_factor", who, 1.0, open_low=True)
        check.choice(self.optimizer, "optimizer", who, ("adam", "sgd"))
        check.boolean(self.latency, "latency", who)
        check.choice(self.backend, "backend", who, BACKENDS)
        check.boolean(self.data_aware, "data_aware", who)
        object.__setattr__(self, "device", device_name(self.device))

    def describe(self) -> str:
        aware = f", data-aware ({self.calibration_batches} batches)" if self.data_aware else ""
        if self.bn_recalibrate:
            aware += f", BN recalibrated ({self.bn_recalibrate} batches)"
        if self.steps == 0:
            return f"zero-shot{aware}"
        kd = f", kd {self.distill}" if self.distill else ""
        return (f"{self.steps} steps {self.optimizer} lr {self.lr:g} bs {self.batch_size}{kd}"
                f"{aware}")

    def to_json(self) -> dict[str, Any]:
        """Every setting that decides a score: the latency table's settings only when
        latency is priced, the calibration's only when data-aware, BatchNorm recalibration only
        when on (so settings stored before those options existed, measured without them,
        still match settings that turn them off; the default recalibrates, so it does not)."""
        data = asdict(self)
        if not self.latency:
            del data["backend"], data["latency_batch"]
        if not self.data_aware:
            del data["data_aware"], data["calibration_batches"]
        if not self.bn_recalibrate:
            del data["bn_recalibrate"]
        return data


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
    stop gives a ``pruned`` one with the metric reached.

    The task's own ``train_step``, ``finetune`` and ``evaluate`` (see `Task`) replace the
    proxy's loop and validation. With ``keep`` (a folder), the state dict of every candidate
    scored ``ok`` is written there (`weights_path`) and its path recorded in the result, so
    `scored` gives it back without fine-tuning again. With ``settings.data_aware`` the factor
    cache it makes holds calibration statistics (collected here, with a progress bar when
    ``progress``); a ``cache`` given must agree with the setting.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        settings: ProxySettings = ProxySettings(),
        space: RankSpace | None = None,
        cache: FactorCache | None = None,
        fingerprint: Fingerprint | None = None,
        keep: str | os.PathLike | None = None,
        progress: bool = False,
    ) -> None:
        if settings.distill and (task.train_step is not None or task.finetune is not None):
            raise RankSearchError(
                "distill applies to the proxy's own training loop, and this task brings its "
                "own (train_step or finetune); set distill=0 and distil in your own step"
            )
        self.model = model.eval()
        self.task = task
        self.settings = settings
        self.space = space or RankSpace.discover(model, task.example_input())
        if cache is not None and cache.data_aware != settings.data_aware:
            raise RankSearchError(
                f"the factor cache given is {'data-aware' if cache.data_aware else 'weight-only'}"
                f" but the proxy settings have data_aware={settings.data_aware}; make the cache "
                "with the statistics the settings ask for, or leave it to the evaluator")
        self.cache = cache or FactorCache(model, self.space, self._calibrate(progress))
        self._bn_inputs = calibration_inputs(
            task, settings.bn_recalibrate, settings.batch_size, settings.seed
        ) if settings.bn_recalibrate and batchnorms(model) else []
        self.costs = CostModel(self.space)
        self._val = [] if task.val is None else task.batches(
            "val", settings.eval_batch_size, settings.eval_batches, shuffle=False)
        self._fingerprint = fingerprint
        self.keep = None if keep is None else Path(keep)

    def _calibrate(self, progress: bool) -> dict[str, InputStats] | None:
        """The input statistics of data-aware factors (None for weight-only ones)."""
        s = self.settings
        if not s.data_aware:
            return None
        inputs = calibration_inputs(self.task, s.calibration_batches, s.batch_size, s.seed)
        return collect(self.model, self.space, inputs, s.device, progress)

    @property
    def fingerprint(self) -> Fingerprint:
        """The fingerprint of this evaluator's measurements (weights, data, loss, metric,
        proxy settings, space), computed once."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.model, self.task, self.settings, self.space)
        return self._fingerprint

    @property
    def metric(self) -> Metric:
        """The task's metric, which the evaluator reports and a reporter is given."""
        return self.task.metric  # type: ignore[return-value]

    def result(self, config: Config, metrics: dict[str, float], status: Status = "ok",
               reason: str | None = None, wall_time: float = 0.0,
               partial: int | None = None, weights: str | None = None) -> Result:
        """A `Result` of ``config`` stamped with this evaluator's proxy and fingerprint."""
        proxy = self.settings.describe() if partial is None else \
            f"zero-shot on {partial} validation batch{'es' if partial > 1 else ''}"
        return Result(config=config, metrics=metrics, status=status, reason=reason,
                      wall_time=wall_time, proxy=proxy, fingerprint=self.fingerprint.digest,
                      partial=partial, weights=weights)

    def candidate(self, config: Config, report: Reporter | None = None
                  ) -> tuple[nn.Module, bool]:
        """The model this evaluator scores for ``config``: built from the factor cache and
        fine-tuned by the proxy (seeded, so the same every time on the same device), and
        whether ``report`` stopped the fine-tuning early. Export builds through here too."""
        candidate = self.build(config)
        return candidate, self._tune(candidate, report)

    def scored(self, result: Result) -> nn.Module:
        """The candidate scored for ``result``, in eval mode: its kept weights when the result
        has them (and they were kept under this fingerprint, for this config), else built and
        fine-tuned again by `candidate`."""
        if result.weights is not None:
            kept = self.load_weights(result)
            if kept is not None:
                return kept.eval()
        return self.candidate(result.config)[0].eval()

    def build(self, config: Config) -> nn.Module:
        """``config`` built from the factor cache, on the proxy's device, with its BatchNorm
        statistics re-estimated when the settings ask (``bn_recalibrate``), nothing trained."""
        built = compress(self.model, config, cache=self.cache).to(self.settings.device)
        recalibrate_batchnorm(built, self._bn_inputs, self.settings.device)
        return built

    def weights_path(self, config: Config) -> Path:
        """Where the kept weights of ``config`` are written (``keep`` must be set)."""
        if self.keep is None:
            raise RankSearchError("this evaluator keeps no weights; pass keep=folder")
        return self.keep / f"{hashlib.sha256(config.key.encode()).hexdigest()[:20]}.pt"

    def save_weights(self, config: Config, model: nn.Module) -> str:
        """Write ``model``'s state dict for ``config`` atomically (`weights_path`), with this
        evaluator's fingerprint and the config's key; returns the path."""
        path = self.weights_path(config)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"fingerprint": self.fingerprint.digest, "key": config.key, "state": state},
                   tmp)
        os.replace(tmp, path)
        return str(path)

    def load_weights(self, result: Result) -> nn.Module | None:
        """The candidate of ``result`` with its kept weights loaded; None (with a warning)
        when the file is gone or was kept under another fingerprint or config."""
        path = Path(result.weights or "")
        if not path.is_file():
            log.warning("the kept weights %s of %s are gone; fine-tuning it again", path,
                        result.config)
            return None
        kept = torch.load(path, map_location="cpu", weights_only=True)
        if kept.get("fingerprint") != self.fingerprint.digest or \
                kept.get("key") != result.config.key:
            log.warning("the kept weights %s were not measured by this search (fingerprint or "
                        "config differ); fine-tuning %s again", path, result.config)
            return None
        model = self.build(result.config)
        model.load_state_dict(kept["state"])
        return model

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
        metric and loss on the first ``partial`` validation batches (nothing trained)."""
        start = time.perf_counter()
        metrics: dict[str, float] = dict(self.costs.metrics(config))
        status, reason, weights = "ok", None, None
        try:
            candidate = self.build(config)  # built once: timed, then fine-tuned in place
            if partial is not None:
                if not self._val:
                    raise CandidateFailed("a partial score needs the task's val data, and "
                                          "this task has none (it brings its own evaluate)")
                metrics.update(self.validate(candidate, self._val[:partial]))
                _check_finite(metrics)
                return self.result(config, metrics, wall_time=time.perf_counter() - start,
                                   partial=partial)
            stopped = self._tune(candidate, report)
            metrics.update(self.validate(candidate))
            if stopped:
                status = "pruned"
            _check_finite(metrics)
            if self.keep is not None and status == "ok":
                weights = self.save_weights(config, candidate)
        except CandidateFailed as e:
            status, reason = "failed", str(e)
        except Exception as e:  # any fault inside one candidate fails that candidate only
            log.warning("candidate %s failed: %s: %s", config, type(e).__name__, e)
            status, reason = "failed", f"{type(e).__name__}: {e}"
        return self.result(config, metrics, status, reason, time.perf_counter() - start,
                           partial=partial, weights=weights)

    def price_latency(self, table: LatencyTable) -> None:
        """Price the latency of every candidate from ``table`` (a table of this space)."""
        self.costs = CostModel(self.space, latency=table)

    def validate(self, model: nn.Module, batches: list[tuple] | None = None) -> dict[str, float]:
        """The task's metric and the mean loss on the validation batches (or on ``batches``);
        the task's own ``evaluate`` when it has one (and no ``batches`` are given)."""
        if batches is None and self.task.evaluate is not None:
            return self._own_evaluate(model)
        return evaluate_batches(model, self._val if batches is None else batches,
                                self.task.loss, (self.metric, METRICS["loss"]), self.task.output)

    def _own_evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        with torch.inference_mode():
            got = self.task.evaluate(model)  # type: ignore[misc]
        if not isinstance(got, Mapping) or self.metric.name not in got:
            have = sorted(got) if isinstance(got, Mapping) else type(got).__name__
            raise CandidateFailed(
                f"the task's evaluate(model) returned {have}; it must return a dict with the "
                f"task's metric {self.metric.name!r} (e.g. {{{self.metric.name!r}: 0.9}})")
        try:
            return {str(k): float(v) for k, v in got.items()}
        except (TypeError, ValueError) as e:
            raise CandidateFailed(f"the task's evaluate(model) returned a value that is not a "
                                  f"number: {e}") from e

    def _finetune(self, model: nn.Module, report: Reporter | None) -> bool:
        """Fine-tune in place; True when the reporter stopped it early."""
        s, task = self.settings, self.task
        if task.finetune is not None:
            model.train()
            task.finetune(model, s.steps)
            return False
        params = [p for p in model.parameters() if p.requires_grad]
        if s.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum,
                                  weight_decay=s.weight_decay)
        teacher = self.model.to(s.device) if s.distill else None
        batches = islice(_repeat(task.loader("train", s.batch_size, shuffle=True, seed=s.seed)),
                         s.steps)
        first = None
        model.train()
        for step, batch in enumerate(batches, start=1):
            if task.train_step is not None:
                loss = task.train_step(model, move(batch, s.device), opt)
            else:
                x, y = move(batch[0], s.device), move(batch[1], s.device)
                out = prediction(call(model, x), task.output)
                loss = task.loss(out, y)
                if teacher is not None:
                    with torch.no_grad():
                        soft = prediction(call(teacher, x), task.output) / s.temperature
                        target = F.log_softmax(soft, -1)
                    kd = F.kl_div(F.log_softmax(out / s.temperature, -1), target,
                                  log_target=True, reduction="batchmean") * s.temperature**2
                    loss = (1 - s.distill) * loss + s.distill * kd
            value = _loss_value(loss, step)
            first = first if first is not None else value
            if value > s.diverge_factor * max(first, 1e-3):
                raise CandidateFailed(
                    f"loss diverged at step {step}: {value:.3g} > {s.diverge_factor:g} × the "
                    f"first loss {first:.3g}; try a lower learning rate"
                )
            if task.train_step is None:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if report is not None and (step % s.report_every == 0 or step == s.steps):
                score = self.validate(model)[self.metric.name]
                model.train()
                if not report(step, score) and step < s.steps:
                    return True
        return False


def _loss_value(loss: Any, step: int) -> float:
    """The loss of one step as a float; fails the candidate when it is not finite."""
    try:
        value = float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CandidateFailed(f"the training step returned {type(loss).__name__}, not a loss "
                              "(a number or a scalar tensor)") from e
    if not math.isfinite(value):
        raise CandidateFailed(f"loss became {value} at fine-tuning step {step}")
    return value


def _repeat(batches: Iterable[Any]) -> Iterator[Any]:
    """The batches read again and again (each pass a new epoch), without end."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise CandidateFailed("the training data gave no batches")


def _check_finite(metrics: dict[str, float]) -> None:
    """Fail a candidate whose validation gave a metric or loss that is not a finite number."""
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise CandidateFailed("validation gave non-finite " + ", ".join(
            f"{k} {v}" for k, v in sorted(bad.items())))
