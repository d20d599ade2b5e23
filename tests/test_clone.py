import copy

import torch
from torch import nn

from ranksearch.clone import clone_module
from ranksearch.models import resnet20


def test_clone_is_independent_and_equal():
    torch.manual_seed(0)
    model = resnet20(3, 10).train()
    x = torch.randn(2, 3, 32, 32)
    copy_ = clone_module(model)
    assert copy_.training and type(copy_) is type(model)
    assert torch.equal(copy_.eval()(x), model.eval()(x))
    for (name, a), (_, b) in zip(model.state_dict().items(), copy_.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    with torch.no_grad():
        next(copy_.parameters()).add_(1.0)
    assert not torch.equal(copy_(x), model(x))
    copy_.train()
    assert not model.training  # modes are per copy


def test_clone_keeps_sharing_and_replaces():
    lin = nn.Linear(4, 4)
    tied = nn.Linear(4, 4)
    tied.weight = lin.weight
    model = nn.Sequential(lin, nn.ReLU(), lin, tied)
    model.register_buffer("scale", torch.ones(1))
    model.extra = torch.zeros(2)  # a plain tensor attribute
    copy_ = clone_module(model)
    assert copy_[0] is copy_[2] and copy_[0] is not lin
    assert copy_[3].weight is copy_[0].weight and copy_[3].weight is not lin.weight
    assert copy_.extra is not model.extra and torch.equal(copy_.extra, model.extra)
    calls = []
    copy_.register_forward_hook(lambda *a: calls.append(1))
    model(torch.zeros(1, 4))
    assert calls == []  # the original has no hook
    new = nn.Identity()
    replaced = clone_module(model, {id(tied): new})
    assert replaced[3] is new
    x = torch.randn(3, 4)
    assert torch.equal(clone_module(model)(x), copy.deepcopy(model)(x))
