"""Standalone exports: TorchScript, torch.export and ONNX files of compressed models run, with
a dynamic batch, in a Python that cannot import ranksearch (nor the models' classes).

Two models are compressed with svd, tucker2, cp3, tt and tr and written (each write loads its
file back and checks it): the digits CNN in every format, the MLP, whose class only this file
defines, as TorchScript and torch.export (ONNX export takes seconds a model). Each file is then
loaded in a subprocess and run at batch sizes 1 and 5 against outputs the test computed.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import warnings
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from torch import nn

import ranksearch
from ranksearch import Choice, Config, RankSearchError, Result
from ranksearch.errors import ExportError
from ranksearch.export import Exported
from ranksearch.factorize import get
from ranksearch.factorize.tr import TRLinear
from ranksearch.factorize.tt import TTLinear
from ranksearch.formats import target_path
from ranksearch.models import build_model
from ranksearch.site import Site

FORMATS = ("torchscript", "torch.export", "onnx")
BATCHES = (1, 5)


class MLP(nn.Module):
    """A small MLP, defined here: the loading process cannot import it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(24, 36), nn.Linear(36, 30), nn.Linear(30, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _half(method: str, layer: nn.Module) -> Choice:
    """``method`` at half its maximum rank on ``layer``."""
    top = get(method).max_rank(Site.from_module("layer", layer))
    return Choice(method, max(1, top // 2) if isinstance(top, int) else
                  tuple(max(1, r // 2) for r in top))


def _digits() -> tuple[nn.Module, Config, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("digits-cnn", in_channels=1).eval()
    config = Config({"features.0": Choice("svd", 4), "features.3": Choice("tucker2", (8, 8)),
                     "features.7": Choice("cp3", 8), "classifier.1": Choice("tt", (4, 4)),
                     "classifier.3": Choice("tr", (2, 2, 4))})
    return model, config, torch.zeros(1, 1, 8, 8)  # like Task.example_input()


def _mlp() -> tuple[nn.Module, Config, torch.Tensor]:
    torch.manual_seed(0)
    model = MLP().eval()
    config = Config({"fc1": _half("tt", model.fc1), "fc2": _half("tr", model.fc2),
                     "fc3": _half("svd", model.fc3)})
    return model, config, torch.randn(3, 24)


MODELS = {"digits": _digits, "mlp": _mlp}
WRITTEN = {"digits": FORMATS, "mlp": ("torchscript", "torch.export")}


def _exported(model: nn.Module, config: Config) -> Exported:
    small = ranksearch.compress(model, config).eval()
    return Exported(small, config, Result(config, {"accuracy": 0.5}), {"accuracy": 0.5})


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Per model: the files written in each format, their records, and the inputs and
    outputs of the eager compressed model at batch sizes 1 and 5 (``<model>.npz``)."""
    root = tmp_path_factory.mktemp("standalone")
    out = {}
    for name, make in MODELS.items():
        model, config, example = make()
        exported = _exported(model, config)
        torch.manual_seed(1)
        xs = [torch.randn(b, *example.shape[1:]) for b in BATCHES]
        with torch.no_grad():
            arrays = {f"x{b}": x.numpy() for b, x in zip(BATCHES, xs, strict=True)}
            arrays |= {f"y{b}": exported.model(x).numpy() for b, x in zip(BATCHES, xs,
                                                                        strict=True)}
        np.savez(root / f"{name}.npz", **arrays)
        for fmt in (f for f in WRITTEN[name] if f != "onnx" or find_spec("onnxruntime")):
            path = exported.write(root / fmt.replace(".", "_") / f"{name}.pt", fmt=fmt,
                                  example_input=example, study="s")
            out[name, fmt] = path, json.loads(path.with_suffix(".json").read_text())
    return root, out


LOADER = textwrap.dedent("""
    import sys
    sys.modules["ranksearch"] = None  # the files must not need ranksearch
    try:
        import ranksearch
    except ImportError:
        pass
    else:
        raise SystemExit("ranksearch is still importable")
    from pathlib import Path

    import numpy as np

    fmt, data, out, *paths = sys.argv[1:]
    if fmt == "onnx":
        import onnxruntime

        def load(path):
            session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            return lambda x: session.run(None, {name: x})[0]
    else:
        import torch

        def load(path):
            if fmt == "torchscript":
                model = torch.jit.load(path)
            else:
                model = torch.export.load(path).module()
            return lambda x: model(torch.from_numpy(x)).detach().numpy()
    outputs = {}
    for path in paths:  # inputs and outputs of <dir>/<model>.pt are in <data>/<model>.npz
        run, inputs = load(path), np.load(Path(data) / f"{Path(path).stem}.npz")
        for batch in sorted(k[1:] for k in inputs.files if k.startswith("x")):
            outputs[f"{Path(path).stem} {batch}"] = run(inputs["x" + batch])
    np.savez(out, **{str(i): y for i, y in enumerate(outputs.values())})
    print("\\n".join(outputs))
""")


@pytest.mark.parametrize("fmt", FORMATS)
def test_files_run_without_ranksearch(written, fmt, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    root, files = written
    paths = [str(path) for (_, f), (path, _) in files.items() if f == fmt]
    got = tmp_path / "got.npz"
    done = subprocess.run([sys.executable, "-I", "-c", LOADER, fmt, str(root), str(got), *paths],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    keys, outputs = done.stdout.splitlines(), np.load(got)
    assert len(keys) == len(paths) * len(BATCHES)
    for i, key in enumerate(keys):
        name, batch = key.split()
        expected = np.load(root / f"{name}.npz")[f"y{batch}"]
        assert outputs[str(i)].shape == expected.shape == (int(batch), 10)
        np.testing.assert_allclose(outputs[str(i)], expected, rtol=1e-4, atol=1e-5)


def test_records_say_what_was_written_and_how_to_load_it(written):
    _, files = written
    suffixes = {"torchscript": ".pt", "torch.export": ".pt2", "onnx": ".onnx"}
    for (name, fmt), (path, record) in files.items():
        assert path.suffix == suffixes[fmt] and record["file"] == path.name
        assert record["files"] == [path.name] and record["bytes"] == path.stat().st_size
        assert record["format"] == fmt and record["study"] == "s"
        assert record["load"]["packages"] == (["onnxruntime"] if fmt == "onnx" else ["torch"])
        assert record["input"]["shape"][0] == "batch" and record["input"]["dtype"] == "float32"
        assert record["verified"]["batch_sizes"][0] == (1 if name == "digits" else 3)
        assert record["config"] == MODELS[name]()[1].to_json()
        assert str(path.parent) not in json.dumps(record)  # no absolute paths
        if fmt == "torchscript":
            assert record["compiled"] in ("script", "trace")
            assert (record["compiled"] == "trace") == ("script_error" in record)
        if fmt == "onnx":
            assert isinstance(record["onnx_inputs"][0]["shape"][0], str)  # a dynamic batch
            assert [o["name"] for o in record["onnx_outputs"]] == ["output"]


def test_the_ranksearch_format_still_loads_on_the_dense_model(tmp_path):
    model, config, example = _digits()
    exported = _exported(model, config)
    path = exported.write(tmp_path / "small", example_input=example)
    record = json.loads(path.with_suffix(".json").read_text())
    assert path.suffix == ".pt" and record["format"] == "ranksearch"
    assert "ranksearch" in record["load"]["packages"]
    loaded, again = ranksearch.load(path, _digits()[0])
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert again == config and torch.equal(loaded.eval()(x), exported.model(x))


def _plain() -> Exported:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    return Exported(model, Config(), Result(Config()), {})


class Varargs(nn.Module):
    """Does not script (``*xs``); traces."""

    def __init__(self, scale_by_batch: bool = False) -> None:
        super().__init__()
        self.fc, self.scale_by_batch = nn.Linear(6, 3), scale_by_batch

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        y = self.fc(xs[0])
        return y * int(xs[0].shape[0]) if self.scale_by_batch else y


def test_torchscript_scripts_what_scripts_and_traces_the_rest(tmp_path):
    path = _plain().write(tmp_path / "plain", fmt="torchscript", example_input=torch.ones(2, 6))
    assert json.loads(path.with_suffix(".json").read_text())["compiled"] == "script"
    traced = Exported(Varargs().eval(), Config(), Result(Config()), {})
    path = traced.write(tmp_path / "varargs", fmt="torchscript", example_input=torch.ones(2, 6))
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["compiled"] == "trace" and record["script_error"]
    x = torch.randn(7, 6)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.testing.assert_close(torch.jit.load(path)(x), traced.model(x))


def test_a_file_that_does_not_reproduce_the_model_is_not_written(tmp_path):
    model = Exported(Varargs(scale_by_batch=True).eval(), Config(), Result(Config()), {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ExportError, match="does not reproduce the model at batch 5"):
            model.write(tmp_path / "m", fmt="torchscript", example_input=torch.ones(2, 6))
    assert list(tmp_path.iterdir()) == []


def test_errors_say_what_is_missing(tmp_path, monkeypatch):
    exported = _plain()
    with pytest.raises(ExportError, match="unknown export format 'tflite'; choose one of"):
        exported.write(tmp_path / "m", fmt="tflite")
    with pytest.raises(ExportError, match=r"needs an example input.*task.example_input\(\)"):
        exported.write(tmp_path / "m", fmt="torchscript")
    with pytest.raises(ExportError, match="does not take the example input of shape"):
        exported.write(tmp_path / "m", fmt="torchscript", example_input=torch.ones(2, 5))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(RankSearchError, match=r"onnxruntime.*pip install 'ranksearch\[onnx\]'"):
        exported.write(tmp_path / "m", fmt="onnx", example_input=torch.ones(2, 6))
    assert list(tmp_path.iterdir()) == []


def test_onnx_falls_back_to_the_torchscript_based_exporter(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    export = torch.onnx.export

    def no_dynamo(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("no dynamo here")
        return export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    path = _plain().write(tmp_path / "m", fmt="onnx", example_input=torch.ones(1, 6))
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["exporter"].startswith("TorchScript-based")
    assert record["dynamo_error"] == "no dynamo here"
    assert record["onnx_inputs"] == [{"name": "input", "shape": ["batch", 6]}]
    assert record["verified"]["batch_sizes"] == [1, 4]


def test_the_suffix_follows_the_format():
    assert target_path("m.pt", "onnx").name == "m.onnx"
    assert target_path("m", "torch.export").name == "m.pt2"
    assert target_path("m.pt2", "torchscript").name == "m.pt"
    assert target_path("m.bin", "onnx").name == "m.bin"


@pytest.mark.parametrize("cls", [TTLinear, TRLinear])
def test_scripted_tt_and_tr_layers_load_back(cls):
    module = cls((4, 3, 2), (2, 3, 4), (2, 2) if cls is TTLinear else (2, 2, 2)).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated
        torch.jit.save(torch.jit.script(module), buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    x = torch.randn(3, 24)
    torch.testing.assert_close(loaded(x), module(x))
