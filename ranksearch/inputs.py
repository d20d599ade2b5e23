"""Model inputs of any kind, handled one way everywhere (discovery, costs, latency, training).

An input is a tensor (``model(x)``), a tuple or list of positional arguments
(``model(*x)``), or a mapping of keyword arguments (``model(**x)``, as Hugging Face models
take ``{"input_ids": ..., "attention_mask": ...}``). Token ids stay integer tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

#: What a model is called with: a tensor, positional arguments or keyword arguments.
Inputs = Tensor | Sequence[Any] | Mapping[str, Any]


def call(model: nn.Module, inputs: Inputs) -> Any:
    """``model`` applied to ``inputs``: ``model(**inputs)`` for a mapping, ``model(*inputs)``
    for a tuple or list, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def move(inputs: Any, device: str | torch.device) -> Any:
    """``inputs`` with every tensor in it moved to ``device`` (structure kept)."""
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: move(v, device) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(move(v, device) for v in inputs)
    return inputs


def tensors(inputs: Any) -> list[Tensor]:
    """Every tensor in ``inputs``, in order."""
    if isinstance(inputs, Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return [t for v in inputs.values() for t in tensors(v)]
    if isinstance(inputs, tuple | list):
        return [t for v in inputs for t in tensors(v)]
    return []


def batch_size(inputs: Any) -> int:
    """The batch size of ``inputs``: the leading dimension of its first tensor."""
    found = tensors(inputs)
    if not found or found[0].dim() == 0:
        raise ValueError(f"cannot tell the batch size of an input of type {type(inputs).__name__}"
                         "; an input must hold at least one batched tensor")
    return int(found[0].shape[0])


def rows(inputs: Any, n: int) -> Any:
    """The first ``n`` rows (samples) of every batched tensor in ``inputs``."""
    if isinstance(inputs, Tensor):
        return inputs[:n] if inputs.dim() else inputs
    if isinstance(inputs, Mapping):
        return {k: rows(v, n) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(rows(v, n) for v in inputs)
    return inputs
