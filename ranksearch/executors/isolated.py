"""Evaluations in a child process, so that a crash, an ``os._exit`` or a hang of one candidate
becomes a failed result instead of the end of the search.

One child process, forked from the search's, holds the evaluator and scores one config at a
time; the search's process keeps the store (only it writes to the database). A child that dies
or runs past its time is killed and replaced by a new fork at the next evaluation. Forking
shares the evaluator without pickling it and starts in a fraction of a second, so the overhead
per evaluation is small (see `IsolatedEvaluator`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import torch

from ..config import Config
from ..errors import RankSearchError
from ..result import Result
from . import Evaluate, Work, failed_result

log = logging.getLogger(__name__)

#: Seconds a child has to exit once asked before it is killed.
_GRACE = 1.0


class Overtime(Exception):
    """The search's deadline passed while an evaluation ran; it was stopped, with no result."""


def can_fork(device: str = "cpu") -> bool:
    """Whether evaluations can run isolated here: a platform that forks (Linux), a proxy on
    the CPU (a CUDA context does not survive a fork)."""
    return sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods() \
        and device.split(":")[0] in ("cpu", "meta")


class IsolatedEvaluator:
    """``evaluate`` run in a persistent forked child process, ``timeout`` seconds at most
    (None: no limit).

    ``isolated(config, partial=None, deadline=None) -> Result``: the child's result; a failed
    one when the child dies ("the evaluation process died with exit code N") or runs past
    ``timeout``; `Overtime` when it runs past ``deadline`` (a `time.monotonic` time) first.

    Measured on digits zero-shot (``benchmarks/bench_isolation.py``, 2 busy cores): 45–60 ms
    per evaluation in process, 6–8 ms (13%) more isolated, and about 0.13 s to fork a new
    child when it starts or restarts; a proxy that fine-tunes costs the same few ms on a much
    longer evaluation. The child runs
    torch on one thread: after the parent has used torch's OpenMP threads, a forked child that
    uses them again deadlocks. Isolation is `LocalExecutor`'s default wherever it can fork.
    """

    def __init__(self, evaluate: Evaluate, timeout: float | None = None) -> None:
        if timeout is not None and timeout <= 0:
            raise RankSearchError(f"trial_timeout must be positive seconds, got {timeout}")
        device = str(getattr(getattr(evaluate, "settings", None), "device", "cpu"))
        if not can_fork(device):
            raise RankSearchError(
                f"evaluations cannot run isolated here (proxy on {device}, platform "
                f"{sys.platform}): isolation forks the process on Linux with a CPU proxy. Turn "
                "isolation off (isolate=False, --no-isolate) and drop trial_timeout, or use "
                "the ray executor, whose trials run in worker processes"
            )
        if torch.get_num_threads() > 1:
            log.warning("isolated evaluations run torch on one thread (the search's process "
                        "uses %d); pass isolate=False (--no-isolate) to use them all, at the "
                        "cost of a crash or a hang of one candidate ending the search",
                        torch.get_num_threads())
        self.evaluate = evaluate
        self.timeout = timeout
        self.started = 0  # child processes started
        self._child: BaseProcess | None = None
        self._conn: Connection | None = None

    def __call__(self, config: Config, report: Any = None, partial: int | None = None,
                 deadline: float | None = None) -> Result:
        if report is not None:
            raise RankSearchError("an isolated evaluation cannot report to this process")
        conn = self._connection()
        start = time.monotonic()
        conn.send((config.key, partial))  # a Config travels as its JSON key
        limits = [t for t in (self.timeout and start + self.timeout, deadline) if t]
        try:
            while not conn.poll(max(0.0, min(limits) - time.monotonic()) if limits else None):
                if deadline is not None and time.monotonic() >= deadline:
                    self.close(kill=True)
                    raise Overtime
                if self.timeout is not None and time.monotonic() >= start + self.timeout:
                    self.close(kill=True)
                    return failed_result(
                        self.evaluate, Work(config, partial),
                        f"timed out after {self.timeout:g} s; raise trial_timeout "
                        "(--trial-timeout) if the candidate needs longer")
            reply = conn.recv()
        except (EOFError, OSError):
            return failed_result(self.evaluate, Work(config, partial), self._died())
        except BaseException:  # Ctrl-C or SIGTERM while it ran: nothing to keep of it
            self.close(kill=True)
            raise
        if isinstance(reply, str):  # the evaluation raised in the child
            return failed_result(self.evaluate, Work(config, partial), reply)
        return Result.from_json(reply)

    def close(self, kill: bool = False) -> None:
        """End the child: asked to exit, or ``kill``-ed (SIGKILL)."""
        child, conn = self._child, self._conn
        self._child = self._conn = None
        if conn is not None:
            conn.close()  # an idle child reads EOF and exits
        if child is None:
            return
        if kill:
            child.kill()
        child.join(_GRACE)
        if child.exitcode is None:
            child.kill()
            child.join()

    def _connection(self) -> Connection:
        if self._child is not None and self._child.is_alive() and self._conn is not None:
            return self._conn
        self.close(kill=True)
        fork = mp.get_context("fork")
        ours, theirs = fork.Pipe()
        main = threading.current_thread() is threading.main_thread()
        child = fork.Process(target=_serve, args=(theirs, ours, self.evaluate, main),
                             name="ranksearch-evaluation")
        child.start()
        theirs.close()
        self._child, self._conn = child, ours
        self.started += 1
        return ours

    def _died(self) -> str:
        child = self._child
        code = None
        if child is not None:
            child.join(_GRACE)
            code = child.exitcode
        self.close(kill=True)
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"the evaluation process died of {signal.Signals(-code).name}"
        return f"the evaluation process died with exit code {code}"

    def __del__(self) -> None:
        try:  # noqa: SIM105  (at interpreter exit, contextlib may be gone already)
            self.close(kill=True)
        except Exception:
            pass


def _serve(conn: Connection, parent: Connection, evaluate: Evaluate, main: bool) -> None:
    """The child: score each (config, partial) received until the pipe closes. Forked from
    the main thread, it dies with its parent (Linux ties it to the forking thread, and a Ray
    trial's thread ends with the trial)."""
    parent.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the search's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if main:
        _die_with_parent()
    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive the fork
    while True:
        try:
            key, partial = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply: dict[str, Any] | str = evaluate(Config.from_json(key),
                                                   partial=partial).to_json()
        except Exception as e:
            reply = f"{type(e).__name__}: {e}"
        conn.send(reply)


def _die_with_parent() -> None:
    """Have Linux kill this process when the search's process dies (SIGKILL included)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the call
            os._exit(1)


__all__ = ["IsolatedEvaluator", "Overtime", "can_fork"]
