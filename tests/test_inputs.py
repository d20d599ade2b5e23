"""Tests of ranksearch.inputs: calling a model on a tensor, positional or keyword inputs, and
moving, listing and slicing the tensors they hold."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ranksearch.inputs import batch_size, call, move, rows, tensors


class Three(nn.Module):
    def forward(self, a, b=None, *, scale=1.0):
        return (a if b is None else a + b) * scale


def test_call_by_kind() -> None:
    a, b = torch.ones(2, 3), torch.full((2, 3), 2.0)
    model = Three()
    assert torch.equal(call(model, a), a)
    assert torch.equal(call(model, (a, b)), a + b)
    assert torch.equal(call(model, [a, b]), a + b)
    assert torch.equal(call(model, {"a": a, "b": b, "scale": 3.0}), (a + b) * 3)


def test_move_tensors_rows_and_batch_size() -> None:
    ids = torch.arange(12).reshape(3, 4)
    inputs = {"input_ids": ids, "extra": (torch.zeros(3, 2), 5), "flag": True}
    moved = move(inputs, "meta")
    assert moved["input_ids"].device.type == "meta" and moved["input_ids"].dtype == torch.long
    assert moved["extra"][1] == 5 and moved["flag"] is True
    assert [t.shape for t in tensors(inputs)] == [(3, 4), (3, 2)]
    assert batch_size(inputs) == 3
    head = rows(inputs, 2)
    assert torch.equal(head["input_ids"], ids[:2]) and head["extra"][0].shape == (2, 2)
    assert rows(torch.tensor(7.0), 1).item() == 7.0  # a scalar has no rows
    with pytest.raises(ValueError, match="batched tensor"):
        batch_size({"n": 3})
    with pytest.raises(ValueError, match="batched tensor"):
        batch_size(torch.tensor(1.0))
