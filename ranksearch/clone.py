"""A fast structural copy of a module tree (what `copy.deepcopy` does, without its overhead)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

_TREE = ("_parameters", "_buffers", "_modules")


def clone_module(module: nn.Module, replace: Mapping[int, nn.Module] | None = None) -> nn.Module:
    """A copy of ``module`` with its own parameters, buffers and submodules.

    ``replace`` maps ``id(submodule)`` to the module that takes its place in the copy (used
    as is, not copied). Shared submodules and tied parameters stay shared in the copy;
    tensors held as plain attributes are cloned; other attributes are shallow copies, and
    dictionaries of hooks are copied so the copy's hooks are its own.
    """
    memo: dict[int, object] = dict(replace or {})
    return _clone(module, memo)


def _clone(module: nn.Module, memo: dict[int, object]) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]  # type: ignore[return-value]
    new = module.__class__.__new__(module.__class__)
    memo[id(module)] = new
    state = module.__dict__.copy()
    for key, value in state.items():
        if key in _TREE:
            continue
        if isinstance(value, torch.Tensor):
            state[key] = _tensor(value, memo)
        elif isinstance(value, dict):
            state[key] = value.copy()
    state["_parameters"] = {k: _tensor(p, memo) for k, p in module._parameters.items()}
    state["_buffers"] = {k: _tensor(b, memo) for k, b in module._buffers.items()}
    state["_modules"] = {
        k: None if m is None else _clone(m, memo) for k, m in module._modules.items()
    }
    new.__dict__ = state
    return new


def _tensor(t: torch.Tensor | None, memo: dict[int, object]) -> torch.Tensor | None:
    if t is None:
        return None
    if id(t) not in memo:
        copy = t.detach().clone()
        if isinstance(t, nn.Parameter):
            copy = nn.Parameter(copy, requires_grad=t.requires_grad)
        memo[id(t)] = copy
    return memo[id(t)]  # type: ignore[return-value]
