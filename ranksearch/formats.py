"""Files that stand alone: a model written as TorchScript, a ``torch.export`` program or ONNX,
with a dynamic batch, loaded back and checked against the model before it is kept.

``torchscript`` and ``torch.export`` load with plain torch, ``onnx`` with onnxruntime (the
``onnx`` extra); ``ranksearch`` files (`ranksearch.save`) load with `ranksearch.load`.
"""

from __future__ import annotations

import importlib
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .clone import clone_module
from .errors import ExportError

FORMATS = ("ranksearch", "torchscript", "torch.export", "onnx")
SUFFIXES = {"ranksearch": ".pt", "torchscript": ".pt", "torch.export": ".pt2", "onnx": ".onnx"}
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
ONNX_INSTALL = "pip install 'ranksearch[onnx]'"
RTOL, ATOL = 1e-4, 1e-5  # a written file must match the model to atol + rtol·max|output|

Run = Callable[[torch.Tensor], Any]


# -- writers ------------------------------------------------------------------------------------
def check_format(fmt: str) -> str:
    """``fmt`` if it is one of `FORMATS`, else an `ExportError` naming them."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def target_path(path: str | os.PathLike, fmt: str) -> Path:
    """``path`` with the suffix of ``fmt`` when it has none or that of another format."""
    path = Path(path)
    if path.suffix in ("", *SUFFIXES.values()):
        return path.with_suffix(SUFFIXES[fmt])
    return path


def write_standalone(
    model: nn.Module,
    path: str | os.PathLike,
    fmt: str,
    example_input: torch.Tensor | None,
) -> dict[str, Any]:
    """Write a CPU copy of ``model`` (in eval mode) to ``path`` as ``torchscript``,
    ``torch.export`` or ``onnx``, with a dynamic batch (dim 0 of ``example_input``).

    The file is loaded back and run on ``example_input`` and on a batch of another size; it is
    moved into place only when its outputs match the model's. Returns the record of what was
    written (format, file names, how to load it, the input, the check).
    """
    if check_format(fmt) == "ranksearch":
        raise ExportError("write_standalone writes torchscript, torch.export or onnx; "
                          "write the ranksearch format with ranksearch.save")
    if example_input is None:
        raise ExportError(f"writing {fmt} needs an example input (one batch the model takes), "
                          "e.g. example_input=task.example_input()")
    if fmt == "onnx":
        require_onnx()
    model = clone_module(model).cpu().eval()
    x = _checked_input(model, example_input)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        staged = Path(tmp) / path.name
        made = WRITERS[fmt](model, trace_input(x), staged)
        check = verify(READERS[fmt](staged), model, x, fmt)
        files = sorted(p.name for p in Path(tmp).iterdir())
        extras = _onnx_io(staged) if fmt == "onnx" else {}
        for name in files:
            os.replace(Path(tmp) / name, path.parent / name)
    return {"format": fmt, "file": path.name, "files": files, "bytes": _size(path, files),
            "load": load_hint(fmt, path.name), "input": input_record(x), **extras, **made,
            "verified": check, "torch": torch.__version__}


def ranksearch_record(path: Path, example_input: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"format": "ranksearch", "file": path.name,
                              "bytes": path.stat().st_size,
                              "load": load_hint("ranksearch", path.name)}
    if example_input is not None:
        record["input"] = input_record(example_input)
    return record


def load_hint(fmt: str, name: str) -> dict[str, Any]:
    """Which packages load the file ``name`` written as ``fmt``, and how."""
    return {
        "ranksearch": {"packages": ["ranksearch", "torch"],
                       "code": f"ranksearch.load({name!r}, base_model)  # on the dense model"},
        "torchscript": {"packages": ["torch"], "code": f"torch.jit.load({name!r})"},
        "torch.export": {"packages": ["torch"], "code": f"torch.export.load({name!r}).module()"},
        "onnx": {"packages": ["onnxruntime"],
                 "code": f"onnxruntime.InferenceSession({name!r}).run(None, {{'input': x}})"},
    }[fmt]


def input_record(x: Any) -> Any:
    """The input's shape (dim 0, the batch, is dynamic: ``"batch"``) and dtype; for a dict or
    tuple of inputs (`ranksearch.inputs`), that of each tensor in it, in the same structure."""
    if isinstance(x, Mapping):
        return {str(k): input_record(v) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return [input_record(v) for v in x]
    if not isinstance(x, torch.Tensor):
        return {"value": repr(x)}
    return {"shape": ["batch", *x.shape[1:]], "dtype": str(x.dtype).removeprefix("torch."),
            "batch_dim": 0}


def _size(path: Path, files: Sequence[str]) -> int:
    return sum((path.parent / name).stat().st_size for name in files)


def _checked_input(model: nn.Module, example_input: torch.Tensor) -> torch.Tensor:
    """``example_input`` on the CPU, once the model is seen to take it."""
    if not isinstance(example_input, torch.Tensor) or example_input.dim() == 0:
        raise ExportError("the example input must be one batch, a tensor whose dim 0 is the "
                          f"batch; got {type(example_input).__name__}")
    x = example_input.detach().cpu()
    try:
        with torch.no_grad():
            model(x)
    except Exception as e:
        raise ExportError(f"the model does not take the example input of shape "
                          f"{tuple(x.shape)}: {brief(e)}; pass one batch it takes") from e
    return x


def brief(error: BaseException, limit: int = 300) -> str:
    """An error's message on one line, cut to ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- inputs for tracing and checking -----------------------------------------------------------
def probe(x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` rows of ``x`` (cycled), with seeded noise of ``x``'s spread for float inputs, so
    the rows differ and the values are not all zeros."""
    rows = x[torch.arange(n) % x.shape[0]]
    if not rows.is_floating_point():
        return rows
    spread = float(x.float().std()) if x.numel() > 1 else 0.0
    scale = spread if spread > 0 and math.isfinite(spread) else 1.0
    noise = torch.randn(rows.shape, generator=torch.Generator().manual_seed(0))
    return rows + (scale * noise).to(rows.dtype)


def trace_input(x: torch.Tensor) -> torch.Tensor:
    """The batch to trace or export on: ``x``, or two rows when ``x`` has one (torch.export
    takes a batch of 1 for a constant)."""
    return x if x.shape[0] >= 2 else probe(x, 2)


# -- writers: (model, input, path) → what the record says of how it was made --------------------
def _torchscript(model: nn.Module, x: torch.Tensor, path: Path) -> dict[str, Any]:
    """`torch.jit.script` the model, or `torch.jit.trace` it on ``x`` when it does not
    script or its saved code does not load back; `torch.jit.save` it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.script(model), str(path))
            torch.jit.load(str(path), map_location="cpu")  # the loader checks the code again
        return {"compiled": "script"}
    except Exception as e:
        traced, made = _trace(model, x, brief(e))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(traced, str(path))
    return made


def _trace(model: nn.Module, x: torch.Tensor, reason: str) -> tuple[Any, dict[str, Any]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("always", torch.jit.TracerWarning)
        try:
            with torch.no_grad():
                traced = torch.jit.trace(model, (x,), check_trace=False)  # `verify` checks
        except Exception as e:
            raise ExportError(f"TorchScript: the model neither scripts ({reason}) nor traces "
                              f"({brief(e)}); write it as 'torch.export' or 'onnx'") from e
    notes = sorted({brief(w.message) for w in caught
                    if issubclass(w.category, torch.jit.TracerWarning)})
    return traced, {"compiled": "trace", "script_error": reason, "trace_warnings": notes}


def _torch_export(model: nn.Module, x: torch.Tensor, path: Path) -> dict[str, Any]:
    """`torch.export.export` with a dynamic batch; `torch.export.save`."""
    try:
        program = torch.export.export(model, (x,), dynamic_shapes=({0: _batch_dim()},))
    except Exception as e:
        raise ExportError(f"torch.export cannot export the model with a dynamic batch: "
                          f"{brief(e)}. Write it as 'torchscript', or keep the forward pass "
                          "free of batch-dependent Python values") from e
    torch.export.save(program, str(path))
    return {}


def _batch_dim() -> Any:
    return torch.export.Dim("batch")


def require_onnx() -> None:
    """Raise `ExportError` naming the onnx extra unless onnx, onnxruntime and onnxscript
    import."""
    missing = [name for name in ONNX_PACKAGES if not _importable(name)]
    if missing:
        raise ExportError(f"writing ONNX needs {', '.join(missing)}, which "
                          f"{'is' if len(missing) == 1 else 'are'} not installed; install "
                          f"the onnx extra: {ONNX_INSTALL}")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _onnx(model: nn.Module, x: torch.Tensor, path: Path) -> dict[str, Any]:
    """The torch.export-based ONNX exporter (``dynamo=True``) with a dynamic batch; the
    TorchScript-based one (``dynamic_axes``) when that fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                                        input_names=["input"],
                                        output_names=output_names(model, x),
                                        dynamic_shapes=({0: _batch_dim()},))
        program.save(str(path))
        return {"exporter": "torch.export-based (dynamo=True)"}
    except Exception as e:
        reason = brief(e)
    try:
        _legacy_onnx(model, x, path)
    except Exception as e:
        raise ExportError(f"ONNX: neither exporter takes the model with a dynamic batch: "
                          f"dynamo=True: {reason}; dynamo=False: {brief(e)}. Write it as "
                          "'torchscript'") from e
    return {"exporter": "TorchScript-based (dynamo=False)", "dynamo_error": reason}


def output_names(model: nn.Module, x: torch.Tensor) -> list[str]:
    """``output``, or ``output0…`` when the model returns several tensors."""
    with torch.no_grad():
        n = len(leaves(model(x)))
    return ["output"] if n == 1 else [f"output{i}" for i in range(n)]


def _legacy_onnx(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    """The TorchScript-based exporter, dim 0 of the input and of each output dynamic."""
    names = output_names(model, x)
    with torch.no_grad():
        ranks = [y.dim() for y in leaves(model(x))]
    axes = {"input": {0: "batch"}, **{n: {0: "batch"} for n, d in zip(names, ranks,
                                                                       strict=True) if d}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input"],
                          output_names=names, dynamic_axes=axes)


def _onnx_io(path: Path) -> dict[str, Any]:
    """The graph's inputs and outputs (names and shapes, symbolic dims as names)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    io = {"inputs": session.get_inputs(), "outputs": session.get_outputs()}
    return {"onnx_" + k: [{"name": a.name, "shape": list(a.shape)} for a in v]
            for k, v in io.items()}


WRITERS: dict[str, Callable[[nn.Module, torch.Tensor, Path], dict[str, Any]]] = {
    "torchscript": _torchscript,
    "torch.export": _torch_export,
    "onnx": _onnx,
}


# -- readers: path → a function running the written model ----------------------------------------
def _read_torchscript(path: Path) -> Run:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # recent torch deprecates TorchScript
        return torch.jit.load(str(path), map_location="cpu")


def _read_torch_export(path: Path) -> Run:
    return torch.export.load(str(path)).module()


def _read_onnx(path: Path) -> Run:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(y) for y in session.run(None, {name: x.numpy()})]

    return run


READERS: dict[str, Callable[[Path], Run]] = {
    "torchscript": _read_torchscript,
    "torch.export": _read_torch_export,
    "onnx": _read_onnx,
}


# -- the check ------------------------------------------------------------------------------------
def leaves(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in leaves(item)]
    return []


def verify(run: Run, model: nn.Module, x: torch.Tensor, fmt: str) -> dict[str, Any]:
    """Check ``run`` (the written file) against ``model`` on ``x`` and on a batch of another
    size; raise `ExportError` where an output differs by more than ``ATOL + RTOL·max|y|``."""
    other = probe(x, x.shape[0] + 3)
    worst = 0.0
    for batch in (x, other):
        expected = _outputs(model, batch, "the model", "a dynamic batch needs a forward pass "
                            "that takes any batch size")
        got = _outputs(run, batch, f"the written {fmt} file", "so it was not written; try "
                       "another format")
        worst = max(worst, _mismatch(expected, got, fmt, len(batch)))
    return {"batch_sizes": [len(x), len(other)], "max_abs_error": worst,
            "rtol": RTOL, "atol": ATOL}


def _outputs(run: Run, batch: torch.Tensor, what: str, hint: str) -> list[torch.Tensor]:
    """The output tensors of ``run`` on ``batch``; `ExportError` (naming ``what``, with
    ``hint``) when it fails."""
    try:
        with torch.no_grad():
            return leaves(run(batch))
    except Exception as e:
        raise ExportError(f"{what} fails at batch {len(batch)}: {brief(e)}; {hint}") from e


def _mismatch(expected: list[torch.Tensor], got: list[torch.Tensor], fmt: str, n: int) -> float:
    """The largest difference of ``got`` from ``expected``; `ExportError` beyond tolerance."""
    where = f"the written {fmt} file does not reproduce the model at batch {n}"
    if len(got) != len(expected):
        raise ExportError(f"{where}: it returns {len(got)} outputs, the model {len(expected)}")
    worst = 0.0
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        if tuple(have.shape) != tuple(want.shape):
            raise ExportError(f"{where}: output {i} has shape {tuple(have.shape)}, the model's "
                              f"{tuple(want.shape)} (a size fixed at export), so it was not "
                              "written; try another format")
        want, have = want.double(), have.double()
        error = float((have - want).abs().max()) if want.numel() else 0.0
        allowed = ATOL + RTOL * (float(want.abs().max()) if want.numel() else 0.0)
        if not error <= allowed:
            raise ExportError(f"{where}: output {i} differs by up to {error:.3g} (allowed "
                              f"{allowed:.3g}), so it was not written; try another format")
        worst = max(worst, error)
    return worst


# -- rebuilding the scored model ----------------------------------------------------------------
