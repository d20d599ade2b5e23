"""How a latency is taken: the settings of a timing (`Timing`), a module run on a backend
(`prepare`: eager, channels_last, ``torch.compile`` or onnxruntime), and samples of runs,
alone or interleaved (`time_alone`, `time_paired`), as `ranksearch.latency` tables take them.
"""

from __future__ import annotations

import io
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import options as check
from .errors import OptionError, RankSearchError
from .inputs import Inputs, call, move, tensors

BACKENDS = ("eager", "channels_last", "compile", "onnx")
ONNX_INSTALL = "pip install 'ranksearch[onnx]'"
#: The most calls one timed sample repeats (a sample of a very short call).
MAX_NUMBER = 10_000

#: One call of a prepared module on its input.
Run = Callable[[], object]


def check_backend(name: str) -> str:
    """``name`` if it is one of `BACKENDS` that can run here, else an `OptionError` naming
    the fix (the onnx extra for a missing onnxruntime)."""
    if name not in BACKENDS:
        raise OptionError(f"unknown latency backend {name!r}; choose one of "
                          f"{', '.join(BACKENDS)} (onnx needs the onnx extra: {ONNX_INSTALL})")
    if name == "onnx":
        missing = [m for m in ("onnx", "onnxruntime") if not _importable(m)]
        if missing:
            raise OptionError(f"the onnx backend times layers in onnxruntime, and "
                              f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                              f"not installed; install the onnx extra ({ONNX_INSTALL}) or "
                              "choose another backend (eager, channels_last, compile)")
    return name


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Timing:
    """How a latency table times: on ``backend`` (one of `BACKENDS`), calls of
    ``batch_size`` samples on ``device``, with ``threads`` intra-op threads (torch's, and
    onnxruntime's; None: torch's count when made), ``warmup`` untimed calls, then ``repeats``
    timed samples of at least ``min_time`` seconds each (short calls repeated within one)."""

    backend: str = "eager"
    batch_size: int = 1
    device: str = "cpu"
    threads: int | None = None
    warmup: int = 3
    repeats: int = 10
    min_time: float = 1e-3

    def __post_init__(self) -> None:
        who = "Timing"
        check.integer(self.batch_size, "batch_size", who, 1)
        check.integer(self.threads, "threads", who, 1, optional=True)
        check.integer(self.warmup, "warmup", who, 0)
        check.integer(self.repeats, "repeats", who, 1)
        check.number_in(self.min_time, "min_time", who, 0.0, 1.0)
        check_backend(self.backend)
        device = str(torch.device(self.device))
        if self.backend == "onnx" and torch.device(device).type != "cpu":
            raise OptionError(f"the onnx backend times on the CPU (onnxruntime's CPU provider), "
                              f"not on {device}; use device 'cpu' or another backend")
        object.__setattr__(self, "device", device)
        if self.threads is None:
            object.__setattr__(self, "threads", torch.get_num_threads())

    def key(self, dtype: torch.dtype) -> dict[str, Any]:
        """Everything that decides a time of this timing for weights of ``dtype``."""
        key = {"device": device_label(self.device), "backend": self.backend,
               "batch": self.batch_size, "threads": self.threads, "torch": torch.__version__,
               "dtype": str(dtype), "warmup": self.warmup, "repeats": self.repeats,
               "min_time": self.min_time}
        if self.backend == "onnx":
            import onnxruntime

            key["onnxruntime"] = onnxruntime.__version__
        return key


def device_label(device: str) -> str:
    """What a time was taken on: the GPU's name, or the CPU's model and core count."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    if dev.type == "cpu":
        return f"cpu:{_cpu_name()} x{os.cpu_count()}"
    return dev.type


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- running a module on a backend --------------------------------------------------------------
def prepare(module: nn.Module, inputs: Inputs, timing: Timing) -> Run:
    """One call of ``module`` on ``inputs`` under ``timing.backend``, on its device, in eval
    mode (the module is moved and changed in place: pass one of your own). Call it inside
    `measuring`, which turns autograd off."""
    module = module.to(timing.device).eval()
    x = move(inputs, timing.device)
    if timing.backend == "channels_last":
        module = module.to(memory_format=torch.channels_last)
        x = _channels_last(x)
    elif timing.backend == "onnx":
        return _onnx_run(module, x, timing.threads or 1)
    elif timing.backend == "compile":
        torch._dynamo.reset()  # no recompile limit reached, no dynamic shapes carried over
        module = torch.compile(module, dynamic=False)
    return lambda: call(module, x)


def _channels_last(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    if isinstance(x, Mapping):
        return {k: _channels_last(v) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(_channels_last(v) for v in x)
    return x


def _onnx_run(module: nn.Module, x: Any, threads: int) -> Run:
    """``module`` exported to ONNX at the shape of ``x`` and run by onnxruntime."""
    import onnxruntime

    if isinstance(x, Mapping):
        args, kwargs, names = (), dict(x), [str(k) for k in x]
    else:
        args = tuple(x) if isinstance(x, tuple | list) else (x,)
        kwargs, names = None, [f"input{i}" for i in range(len(args))]
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.cpu(), args, buffer, kwargs=kwargs, dynamo=False,
                              input_names=names)
    except Exception as e:
        raise RankSearchError(f"the onnx backend cannot export {type(module).__name__} to "
                              f"ONNX ({type(e).__name__}: {e}); choose another backend") from e
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(buffer.getvalue(), options,
                                           providers=["CPUExecutionProvider"])
    given = dict(zip(names, (t.cpu().numpy() for t in tensors(x)), strict=False))
    feed = {i.name: given[i.name] for i in session.get_inputs()}
    return lambda: session.run(None, feed)


# -- timing -------------------------------------------------------------------------------------
@contextmanager
def measuring(timing: Timing) -> Iterator[None]:
    """No autograd, and torch on ``timing.threads`` threads (restored after)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(timing.threads or before)
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(before)


def _sync(device: str) -> Callable[[], None]:
    dev = torch.device(device)
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def _sample(run: Run, number: int, sync: Callable[[], None]) -> float:
    """Seconds per call of ``number`` calls of ``run`` in a row."""
    sync()
    start = time.perf_counter()
    for _ in range(number):
        run()
    sync()
    return (time.perf_counter() - start) / number


def _ready(run: Run, timing: Timing, sync: Callable[[], None]) -> int:
    """Warm ``run`` up; the calls per sample that fill ``timing.min_time``."""
    for _ in range(timing.warmup):
        run()
    once = _sample(run, 1, sync)
    if once <= 0:
        return MAX_NUMBER
    return max(1, min(MAX_NUMBER, math.ceil(timing.min_time / once)))


def time_alone(run: Run, timing: Timing) -> list[float]:
    """``timing.repeats`` samples of ``run`` (seconds per call), after its warm-up."""
    sync = _sync(timing.device)
    number = _ready(run, timing, sync)
    return [_sample(run, number, sync) for _ in range(timing.repeats)]


def time_paired(reference: Run, other: Run, timing: Timing) -> tuple[list[float], list[float]]:
    """``timing.repeats`` samples of each of ``reference`` and ``other``, interleaved
    (reference, other, reference, other, ...) so that drift affects both alike."""
    sync = _sync(timing.device)
    numbers = _ready(reference, timing, sync), _ready(other, timing, sync)
    first, second = [], []
    for _ in range(timing.repeats):
        first.append(_sample(reference, numbers[0], sync))
        second.append(_sample(other, numbers[1], sync))
    return first, second


def paired_ratio(reference: list[float], other: list[float]) -> float:
    """The median of ``other[i] / reference[i]``."""
    return statistics.median(b / a for a, b in zip(reference, other, strict=True))


__all__ = [
    "BACKENDS",
    "Timing",
    "check_backend",
    "device_label",
    "measuring",
    "paired_ratio",
    "prepare",
    "time_alone",
    "time_paired",
]
