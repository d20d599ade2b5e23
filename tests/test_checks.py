"""The checks made before a search: the task against the dense model, and the device."""

import math
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import ranksearch
from ranksearch.checks import check_device, check_task
from ranksearch.cli import main
from ranksearch.errors import RankSearchError, TaskError
from ranksearch.evaluate import Evaluator, ProxySettings
from ranksearch.task import Task

ZERO = ProxySettings(steps=0, eval_batch_size=16)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def tiny_model(outputs: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, outputs))


def tiny_task(x=None, y=None, **kw) -> Task:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, 4, generator=gen) if x is None else x
    y = torch.arange(48) % 3 if y is None else y
    return Task("tiny", train=TensorDataset(x, y), val=TensorDataset(x, y), **kw)


def run(model, task, out, **kw):
    kw.setdefault("proxy", ZERO)
    return ranksearch.search(model, task, out=str(out), evaluations=2,
                             strategy="uniform", strategy_options={"points": [0.5, 0.3]}, **kw)


def refused(model, task, tmp_path, match, **kw):
    """Search, expecting a `RankSearchError` matching ``match`` and nothing written."""
    out = tmp_path / "out"
    with pytest.raises(RankSearchError, match=match) as info:
        run(model, task, out, **kw)
    assert not out.exists()
    return info.value


def with_val(task: Task, x=None, y=None) -> Task:
    """``task`` with other validation inputs or labels (the training split untouched)."""
    vx, vy = task.val.tensors
    return Task(task.name, train=task.train, val=TensorDataset(
        vx if x is None else x, vy if y is None else y))


# -- the task check, through search() ---------------------------------------------------------
def test_labels_out_of_range_are_refused_before_anything_is_written(tmp_path):
    task = tiny_task(num_classes=3)
    y = task.val.tensors[1].clone()
    y[5] = 12
    error = refused(tiny_model(), with_val(task, y=y), tmp_path,
                    r"label 12 is out of range for a model with 3 outputs")
    assert isinstance(error, TaskError) and "[0, 3)" in str(error)


def test_a_label_past_the_first_batch_is_still_a_task_error(tmp_path):
    task = tiny_task(num_classes=3)
    y = task.val.tensors[1].clone()
    y[-1] = 7  # in the third validation batch of 16
    refused(tiny_model(), with_val(task, y=y), tmp_path,
            r"dense model fails on the validation split.*class index")


def test_float64_data_names_both_dtypes_and_the_fix(tmp_path):
    task = tiny_task()
    double = tiny_task(x=task.train.tensors[0].double())
    refused(tiny_model(), double, tmp_path,
            r"inputs are torch\.float64 .* weights are torch\.float32; .*x\.float\(\)")


def test_nan_weights_are_refused(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model[1].weight[0, 0] = math.nan
    error = refused(model, tiny_task(), tmp_path,
                    r"the dense model's output is not finite .*: check its weights")
    assert "1.weight holds NaN or inf" in str(error)


def test_an_output_narrower_than_the_labels_is_refused(tmp_path):
    refused(tiny_model(outputs=2), tiny_task(), tmp_path,
            r"label 2 is out of range for a model with 2 outputs")
    # labels in range on the batches, but the task declares more classes than outputs
    refused(tiny_model(outputs=3), tiny_task(num_classes=5), tmp_path,
            r"the task has 5 classes .* dense model has 3 outputs")


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (torch.arange(48).float() % 3, r"labels are torch\.float32 .*y\.long\(\)"),
        (nn.functional.one_hot(torch.arange(48) % 3), r"shape 16×3; .*one class index per sample"),
    ],
)
def test_labels_must_be_class_indices(tmp_path, labels, match):
    task = tiny_task(num_classes=3)
    refused(tiny_model(), with_val(task, y=labels), tmp_path, match)


def test_a_model_that_does_not_return_logits_is_refused(tmp_path):
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_model()

        def forward(self, x):
            return self.net(x), x

    refused(Pair(), tiny_task(), tmp_path, r"returns a tuple .*tensor of N×C logits")


def test_a_loss_that_is_not_finite_is_refused(tmp_path):
    def nan_loss(out, y):
        return out.sum() * math.nan

    task = Task("tiny", train=tiny_task().train, val=tiny_task().val, loss=nan_loss)
    refused(tiny_model(), task, tmp_path, r"the task's loss is nan .*not finite")


def test_search_keeps_the_dense_metrics(tmp_path):
    model, task = tiny_model(), tiny_task()
    result = run(model, task, tmp_path)
    expected = Evaluator(model, task, ZERO).validate(model)
    assert result.meta["dense"] == expected
    x, y = task.val.tensors
    with torch.no_grad():
        out = model.eval()(x)
    assert set(expected) == {"accuracy", "loss"}
    assert expected["accuracy"] == pytest.approx(float((out.argmax(1) == y).float().mean()))
    assert expected["loss"] == pytest.approx(float(nn.functional.cross_entropy(out, y)))


def test_check_task_measures_the_evaluator_batches_and_leaves_the_model_as_it_was():
    model, task = tiny_model(), tiny_task()
    model.train()
    settings = ProxySettings(eval_batches=1, eval_batch_size=8)
    evaluator = Evaluator(model, task, settings)
    model.train()
    dense = check_task(model, task, settings, evaluator)
    assert dense == evaluator.validate(model)
    first = task.val.tensors
    with torch.no_grad():
        out = model.eval()(first[0][:8])
    assert dense["accuracy"] == pytest.approx(float((out.argmax(1) == first[1][:8]).float()
                                                    .mean()))
    model.train()
    assert check_task(model, task, settings) == dense  # without an evaluator too
    assert model.training and next(model.parameters()).device.type == "cpu"


def user_task(folder, labels: str = "[0, 1, 2, 0, 1, 2]"):
    """A user task file whose ``make`` gives a tiny model of 10 outputs and its task."""
    path = folder / "user_task.py"
    path.write_text(textwrap.dedent(f"""
        import torch
        from torch import nn
        from torch.utils.data import TensorDataset
        from ranksearch.task import Task

        def make():
            model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 10))
            data = TensorDataset(torch.randn(6, 3, 4), torch.tensor({labels}))
            return model, Task("mine", train=data, val=data, num_classes=10)
    """))
    return path


def test_a_bad_user_task_file_is_refused_by_the_cli(tmp_path, capsys):
    out = tmp_path / "out"
    factory = user_task(tmp_path, labels="[0, 1, 12, 0, 1, 2]")
    assert main(["search", "--task", f"{factory}:make", "--out", str(out), "--evaluations", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "label 12 is out of range for a model with 10 outputs" in err
    assert "Traceback" not in err
    assert not (out / "ranksearch.db").exists()


# -- devices ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("device", "match"),
    [
        ("gpu", r"unknown device 'gpu'; use 'cuda' \(or 'cuda:0'\)"),
        ("tpu", r"unknown device 'tpu'; use one of 'cpu', 'cuda', 'cuda:N'"),
        ("cuda:x", r"unknown device 'cuda:x'"),
        (0, r"unknown device 0"),
    ],
)
def test_unknown_devices_are_refused_at_once(device, match):
    with pytest.raises(RankSearchError, match=match):
        ProxySettings(device=device)


def test_device_names_are_normalized():
    assert ProxySettings(device="CUDA:1").device == "cuda:1"
    assert ProxySettings(device=torch.device("cuda", 0)).device == "cuda:0"
    assert ProxySettings(device="meta").device == "meta"  # a valid name; refused by a search
    with pytest.raises(RankSearchError, match="'meta' holds no data"):
        check_device("meta")
    assert check_device("cpu") == torch.device("cpu")


@NO_CUDA
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_a_clear_error_when_the_search_starts(tmp_path, device):
    settings = ProxySettings(steps=0, device=device)  # accepted: it may run elsewhere
    refused(tiny_model(), tiny_task(), tmp_path,
            rf"device '{device}' was asked for, but this is a torch .*use device='cpu'",
            proxy=settings)


@pytest.mark.parametrize(
    ("device", "fragment"),
    [
        pytest.param("cuda", "device 'cuda' was asked for", marks=NO_CUDA),
        ("gpu", "unknown device 'gpu'; use 'cuda' (or 'cuda:0')"),
    ],
)
def test_a_device_this_machine_lacks_is_refused_by_the_cli(tmp_path, capsys, device, fragment):
    out = tmp_path / "out"
    assert main(["search", "--task", f"{user_task(tmp_path)}:make", "--out", str(out),
                 "--evaluations", "1", "--no-progress", "--device", device]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not (out / "ranksearch.db").exists()


def test_a_ray_worker_uses_the_gpu_ray_assigned(monkeypatch):
    ray_executor = pytest.importorskip("ranksearch.executors.ray.worker")
    ray = ray_executor.ray
    pinned = ProxySettings(device="cuda:1")
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [3])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert ray_executor._worker_settings(pinned).device == "cuda:0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert ray_executor._worker_settings(pinned).device == "cuda:1"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert ray_executor._worker_settings(pinned).device == "cuda:3"
    cpu = ProxySettings(device="cpu")
    assert ray_executor._worker_settings(cpu) is cpu
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    assert ray_executor._worker_settings(pinned) is pinned
