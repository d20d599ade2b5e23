"""TT and TR layers script with TorchScript and export (torch.export, ONNX) with a dynamic batch.

Each format is traced or compiled once, at batch 3, and then run at batch sizes 1, 3 and 7.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from ranksearch.factorize import get
from ranksearch.factorize.tr import TR
from ranksearch.factorize.tt import TT
from ranksearch.site import Site

BATCHES = (1, 3, 7)


def _linear(fac, i: int, o: int, lead: tuple[int, ...] = (), bias: bool = True):
    torch.manual_seed(0)
    layer = nn.Linear(i, o, bias=bias)
    site = Site.from_module("fc", layer, lead, lead)
    rank = tuple(max(1, r // 2) for r in fac.max_rank(site))
    module = fac.build(site, rank, fac.decompose(layer.weight, site, rank), layer.bias)
    return module.eval(), lambda b: torch.randn(b, *lead, i)


def _conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2))
    site = Site.from_module("conv", conv, (9, 11), tuple(conv(torch.zeros(1, 4, 9, 11)).shape[-2:]))
    tt = get("tt")
    rank = (2, 5, 3)
    module = tt.build(site, rank, tt.decompose(conv.weight, site, rank), conv.bias)
    return module.eval(), lambda b: torch.randn(b, 4, 9, 11)


CASES: dict[str, Callable[[], tuple[nn.Module, Callable[[int], torch.Tensor]]]] = {
    "tt-linear": lambda: _linear(TT(3), 24, 30),
    "tt-linear-4modes-nobias-lead": lambda: _linear(TT(4), 36, 32, (5,), bias=False),
    "tr-linear": lambda: _linear(TR(3), 24, 30),
    "tr-linear-2modes-lead": lambda: _linear(TR(2), 16, 18, (2, 3)),
    "tt-conv": _conv,
}


def _inputs(make: Callable[[int], torch.Tensor]) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [make(b) for b in BATCHES]


def _check(run: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, xs) -> None:
    for x in xs:
        with torch.no_grad():
            expected, got = module(x), run(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_torchscript_matches_eager(case):
    module, make = CASES[case]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(module)
    _check(scripted, module, _inputs(make))


@pytest.mark.parametrize("case", CASES)
def test_torch_export_keeps_the_batch_dynamic(case):
    module, make = CASES[case]()
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, (make(3),), dynamic_shapes=({0: batch},))
    _check(program.module(), module, _inputs(make))


def _onnx(module: nn.Module, x: torch.Tensor, exporter: str) -> bytes:
    """``module`` as an ONNX model with a dynamic batch, by the torch.export-based exporter
    (``dynamic_shapes``) or the TorchScript-based one (``dynamic_axes``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            program = torch.onnx.export(
                module, (x,), dynamo=True, verbose=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
            )
            return program.model_proto.SerializeToString()
        buffer = io.BytesIO()
        torch.onnx.export(
            module, (x,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
        return buffer.getvalue()


# the torch.export-based exporter takes seconds per model: one TT and one TR case
ONNX_CASES = [
    *(pytest.param(case, "torchscript", id=f"{case}-torchscript") for case in CASES),
    *(pytest.param(case, "dynamo", id=f"{case}-dynamo")
      for case in ("tt-linear", "tr-linear-2modes-lead")),
]


@pytest.mark.parametrize(("case", "exporter"), ONNX_CASES)
def test_onnx_keeps_the_batch_dynamic(case, exporter):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    module, make = CASES[case]()
    session = ort.InferenceSession(_onnx(module, make(3), exporter),
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    _check(run, module, _inputs(make))


@pytest.mark.parametrize("method", ["tt", "tr"])
def test_scripted_linear_keeps_empty_and_unbatched_inputs(method):
    module, _ = _linear(get(method), 24, 30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(module)
    with torch.no_grad():
        assert scripted(torch.zeros(0, 24)).shape == (0, 30)
        x = torch.randn(24)
        torch.testing.assert_close(scripted(x), module(x))
