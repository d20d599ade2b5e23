"""Bad numbers are refused at the boundary with a clear message: on the command line (exit
status 2, before anything runs), in `ProxySettings`, and bad model files in `ranksearch.load`."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch import nn

import ranksearch
from ranksearch.cli import main
from ranksearch.config import Choice, Config
from ranksearch.errors import ModelFileError, OptionError
from ranksearch.evaluate import ProxySettings

BAD_FLAGS = [
    ("search", "--seed", "-1"), ("search", "--seed", "1.5"),
    ("search", "--eval-batches", "-1"), ("search", "--eval-batches", "0"),
    ("search", "--time-limit", "-5"), ("search", "--time-limit", "0"),
    ("search", "--time-limit", "nan"), ("search", "--time-limit", "inf"),
    ("search", "--lr", "nan"), ("search", "--lr", "inf"), ("search", "--lr", "0"),
    ("search", "--evaluations", "0"), ("search", "--steps", "-1"),
    ("search", "--batch-size", "0"), ("search", "--distill", "1.5"),
    ("search", "--distill", "nan"), ("search", "--cpus-per-trial", "0"),
    ("search", "--gpus-per-trial", "-1"), ("search", "--max-concurrent", "0"),
    ("search", "--trial-timeout", "0"), ("search", "--trial-timeout", "nan"),
    ("search", "--min-params", "-1"), ("search", "--multiple-of", "0"),
    ("export", "--lr", "nan"), ("export", "--finetune-epochs", "-1"),
    ("demo", "--evaluations", "0"), ("inspect", "--multiple-of", "-2"),
]


@pytest.mark.parametrize(("command", "flag", "value"), BAD_FLAGS)
def test_bad_numbers_on_the_command_line_exit_2_with_a_message(command, flag, value, capsys,
                                                              tmp_path):
    out = tmp_path / "out"
    args = [command, f"{flag}={value}"] + ([] if command == "inspect" else ["--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and value in err
    assert "must be" in err or "expected" in err
    assert "Traceback" not in err and not out.exists()


def test_numbers_at_the_bounds_are_accepted():
    from ranksearch.cli import _parser

    args = _parser().parse_args(["search", "--seed", "0", "--eval-batches", "1", "--steps", "0",
                                 "--time-limit", "0.5", "--lr", "1e-9", "--distill", "1"])
    assert (args.seed, args.eval_batches, args.steps) == (0, 1, 0)
    assert (args.time_limit, args.lr, args.distill) == (0.5, 1e-9, 1.0)
    assert args.eval_batches is not None  # 1 is one batch, never "all of them"


BAD_PROXY = [
    ("lr", math.nan), ("lr", math.inf), ("lr", 0.0), ("lr", -1e-3), ("lr", "1e-3"),
    ("eval_batches", 0), ("eval_batches", -1), ("eval_batches", 1.5),
    ("seed", -1), ("seed", 0.5), ("steps", -1), ("steps", True), ("batch_size", 0),
    ("eval_batch_size", 0), ("report_every", 0), ("distill", 1.5), ("distill", math.nan),
    ("temperature", 0.0), ("temperature", math.inf), ("momentum", 1.5),
    ("weight_decay", -1.0), ("weight_decay", math.nan), ("diverge_factor", 1.0),
    ("latency", "yes"), ("latency_repeats", 0), ("optimizer", "adamw"),
]


@pytest.mark.parametrize(("field", "value"), BAD_PROXY)
def test_proxy_settings_refuse_bad_values_naming_the_field(field, value):
    with pytest.raises(OptionError, match=rf"^ProxySettings: (unknown )?{field}\b"):
        ProxySettings(**{field: value})


def test_proxy_settings_keep_good_values():
    proxy = ProxySettings(steps=5, lr=0.1, eval_batches=1, seed=0, distill=1.0, momentum=0.0,
                          weight_decay=0.0, optimizer="sgd", latency=True)
    assert (proxy.eval_batches, proxy.seed, proxy.lr, proxy.optimizer) == (1, 0, 0.1, "sgd")
    assert ProxySettings().eval_batches is None  # the whole split only when left unset


# -- ranksearch.load on bad files --------------------------------------------------------------
def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))


CONFIG = Config({"0": Choice("svd", 3)})


@pytest.fixture
def saved(tmp_path):
    compressed = ranksearch.compress(make_model(), CONFIG)
    return ranksearch.save(tmp_path / "model.pt", compressed, CONFIG), compressed


def test_load_round_trip_of_a_good_file(saved):
    path, compressed = saved
    loaded, config = ranksearch.load(path, make_model())
    x = torch.randn(5, 12)
    assert config == CONFIG
    assert torch.equal(loaded.eval()(x), compressed.eval()(x))
    dense = make_model()
    # a rank-3 SVD of the first layer: close to, not equal to, the dense layer
    assert 0 < (loaded(x) - dense(x)).abs().max() < (dense(x).abs().max())


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (self.marker.write_text, ("the pickle ran",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_load_of_bad_files_names_the_file_and_the_problem(saved, tmp_path):
    path, _ = saved
    good = path.read_bytes()
    marker = tmp_path / "ran"
    cases = {
        "missing.pt": (None, "no compressed model at"),
        "empty.pt": (b"", "is empty"),
        "truncated.pt": (good[: len(good) // 2], "truncated or corrupt"),
        "tail.pt": (good[len(good) // 2:], "not a ranksearch model file"),
        "garbage.pt": (b"\x00\xffnot a model at all" * 20, "not a ranksearch model file"),
        "code.pt": (pickle.dumps(_RunsCode(marker)), "objects other than tensors"),
        "legacy.pt": (pickle.dumps({"format": "ranksearch.compressed"}), "objects other than"),
    }
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    torch.save(_RunsCode(marker), tmp_path / "torch-code.pt")
    for name, (data, _) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    for name, problem in [*((n, p) for n, (_, p) in cases.items()),
                          ("foreign.pt", "not a ranksearch compressed model"),
                          ("torch-code.pt", "objects other than tensors")]:
        with pytest.raises(ModelFileError) as info:
            ranksearch.load(tmp_path / name, make_model())
        message = str(info.value)
        assert str(tmp_path / name) in message and problem in message, message
        assert "weights_only" not in message
    assert not marker.exists()  # no pickled object was built, so no code ran
    with pytest.raises(ModelFileError, match="no compressed model"):
        ranksearch.load(tmp_path, make_model())  # a folder


def test_load_on_another_base_model_says_so(saved):
    path, _ = saved
    other = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 5))
    with pytest.raises(ModelFileError, match="do not fit the base model"):
        ranksearch.load(path, other)


@pytest.mark.parametrize("option, value", [("seed", -1), ("time_limit", -5),
                                           ("time_limit", math.nan), ("evaluations", 0)])
def test_search_refuses_bad_numbers_before_anything_runs(option, value, digits, tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(OptionError, match=option):
        ranksearch.search(model, digits, store="memory", out=str(tmp_path / "out"),
                          **{option: value})
    assert not (tmp_path / "out").exists()
