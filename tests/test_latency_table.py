"""Latency tables: per-layer times measured once, kept in the store and reused, priced as a
sum; latency-constrained searches that never propose a config over budget by the table; the
front timed end to end; backends and their errors."""

import json
import os
import pickle
import sys
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import ranksearch
from ranksearch.config import DENSE, Choice, Config
from ranksearch.constraints import parse_constraints
from ranksearch.cost import CostModel
from ranksearch.errors import ConfigError, OptionError, RankSearchError
from ranksearch.evaluate import ProxySettings
from ranksearch.export import scored_model
from ranksearch.latency import LatencyTable, MemoryBook, site_signature, snap_space
from ranksearch.ledger import read_latency
from ranksearch.pareto import Objective
from ranksearch.population import site_choices
from ranksearch.report import front_table, prediction_line
from ranksearch.space import RankSpace, SpaceSpec
from ranksearch.store import latency_book, open_storage, read_study, space_signature
from ranksearch.strategy import Proposal, SearchContext, load_strategy
from ranksearch.task import Task
from ranksearch.timing import Timing

BATCH = 32
#: What a search with `PROXY` times with (on the one thread tests run on, see conftest).
FAST = Timing(batch_size=BATCH, repeats=3, threads=1)
SPEC = SpaceSpec(max_choices=6)


class Net(nn.Module):
    """Two wide layers of one shape (low rank beats them at batch 32), a tiny one (nothing
    beats it), and activations outside every layer (the rest of the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.wide1 = nn.Linear(512, 512)
        self.wide2 = nn.Linear(512, 512)
        self.tiny = nn.Linear(512, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.wide2(torch.relu(self.wide1(x))))
        return self.tiny(h * torch.sigmoid(h))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture(scope="module")
def task():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 512, generator=g)
    y = torch.randint(0, 4, (96,), generator=g)
    return Task("toy", TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:]),
                input_shape=(512,), num_classes=4)


@pytest.fixture(scope="module")
def space(net, task):
    return SPEC.discover(net, task.example_input())


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """A store every test of this module shares, so its latency table is measured once."""
    out = tmp_path_factory.mktemp("store")
    return f"sqlite:///{out / 'ranksearch.db'}"


def table(net, space, timing=FAST, book=None):
    return LatencyTable(net, space, torch.zeros(timing.batch_size, 512), timing, book)


def every_entry(space):
    """Each distinct site shape's choices, and the whole model."""
    shapes = {site_signature(s): len(space.choices(s.name)) for s in space.decomposable}
    return sum(shapes.values()) + 1


# -- the table --------------------------------------------------------------------------------
def test_the_table_is_kept_in_the_store_and_never_measured_again(net, space, db):
    first = table(net, space, book=latency_book(db))
    assert first.build() == first.measured == every_entry(space)  # wide1, wide2 share theirs
    again = table(net, space, book=latency_book(db))  # another process, another search
    assert again.build() == 0 and again.measured == 0
    configs = [Config(), space.uniform(0.3), space.uniform(0.05),
               Config({"wide2": Choice("svd", space.ranks("wide2", "svd")[0])})]
    assert [again.price(c) for c in configs] == [first.price(c) for c in configs]
    assert again.measured == 0


def test_a_table_measures_lazily_only_what_it_prices(net, space):
    lazy = table(net, space)
    rank = space.ranks("wide1", "svd")[1]
    lazy.price(Config({"wide1": Choice("svd", rank)}))
    # the dense layer of each shape (wide, tiny), svd on wide1, and the whole model
    assert lazy.measured == 4
    lazy.price(Config({"wide2": Choice("svd", rank)}))  # wide2 has wide1's shape: no timing
    assert lazy.measured == 4


def test_priced_latency_is_rest_plus_the_stored_site_entries(net, space, db):
    kept = table(net, space, book=latency_book(db))
    kept.build()
    stored = read_latency(open_storage(db).engine, kept.digest)
    costs = CostModel(space, latency=kept)

    def entry(name, choice):
        return stored[f"site/{site_signature(space.site(name))}/{choice}"]

    dense = sum(entry(n, DENSE)["seconds"] for n in space.names)
    whole = next(v["seconds"] for k, v in stored.items() if k.startswith("model/"))
    assert kept.whole == whole and kept.rest == max(0.0, whole - dense)
    rng = torch.Generator().manual_seed(1)
    for _ in range(6):
        config = Config({n: space.choices(n)[torch.randint(len(space.choices(n)), (1,),
                                                           generator=rng).item()]
                         for n in space.names})
        expected = kept.rest + sum(entry(n, config.get(n))["seconds"] for n in space.names)
        metrics = costs.metrics(config)
        assert metrics["latency"] == pytest.approx(expected, rel=1e-12)
        assert metrics["latency_ratio"] == pytest.approx(expected / kept.dense, rel=1e-12)
    for name in space.names:  # a choice is kept as its paired ratio times the dense layer
        for choice in space.choices(name)[:-1]:
            got = entry(name, choice)
            assert got["seconds"] == pytest.approx(got["ratio"] * entry(name, DENSE)["seconds"])


class Rigged(MemoryBook):
    """A book where another writer kept ``whole`` seconds as the dense model's time."""

    def __init__(self, whole):
        super().__init__()
        self.whole = whole

    def save(self, table, entries):
        entries = {k: {"seconds": self.whole} if k.startswith("model/") else v
                   for k, v in entries.items()}
        return super().save(table, entries)


def test_the_dense_config_prices_to_the_measured_dense_latency(net, space, db):
    kept = table(net, space, book=latency_book(db))
    costs = CostModel(space, latency=kept)
    dense = costs.metrics(Config())
    assert dense["latency"] == kept.dense and dense["latency_ratio"] == 1.0
    if not kept.clamped:
        assert kept.dense == pytest.approx(kept.whole, rel=1e-12)
    rigged = table(net, space, book=Rigged(whole=0.25))  # a dense model timed at 0.25 s
    assert not rigged.clamped and rigged.rest > 0
    assert CostModel(space, latency=rigged).metrics(Config())["latency"] == pytest.approx(
        0.25, rel=1e-12)


def test_a_rest_below_zero_is_clamped_and_the_dense_price_is_the_sum(net, space):
    clamped = table(net, space, book=Rigged(whole=1e-9))
    dense = sum(clamped.seconds(n, DENSE) for n in space.names)
    assert clamped.whole == 1e-9 and clamped.clamped and clamped.rest == 0.0
    assert clamped.dense == pytest.approx(dense, rel=1e-12)


def test_a_pickled_table_prices_what_it_holds_and_times_nothing(net, space):
    lazy = table(net, space)
    wide = Config({"wide1": Choice("svd", space.ranks("wide1", "svd")[0])})
    price = lazy.price(wide)
    copy = pickle.loads(pickle.dumps(lazy))
    assert copy.price(wide) == price
    with pytest.raises(RankSearchError, match=r"copied to another process.*build it"):
        copy.price(Config({"wide1": Choice("svd", space.ranks("wide1", "svd")[-1])}))


def test_a_forked_copy_of_a_table_prices_but_never_times(net, space):
    """An isolated evaluation is a fork of the search's process: it prices from the entries
    the parent timed and refuses to time more (its thread count is not the table's)."""
    lazy = table(net, space)
    wide = Config({"wide1": Choice("svd", space.ranks("wide1", "svd")[0])})
    price = lazy.price(wide)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it could do, and leave without pytest's teardown
        code = 1
        try:
            if lazy.price(wide) == price:
                try:
                    lazy.price(Config({"wide1": Choice("svd", space.ranks("wide1", "svd")[-1])}))
                    code = 2
                except RankSearchError as e:
                    code = 0 if "copied to another process" in str(e) else 3
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == bytes([0])
    assert lazy.measured == 4  # the parent itself still times what it lacks
    lazy.price(Config({"wide1": Choice("svd", space.ranks("wide1", "svd")[-1])}))
    assert lazy.measured == 5


def test_keys_differ_by_backend_batch_and_threads(net, space):
    timings = [FAST, replace(FAST, backend="channels_last"), replace(FAST, threads=2),
               replace(FAST, repeats=4)]
    digests = [table(net, space, t, MemoryBook()).digest for t in timings]
    assert len(set(digests)) == len(timings)
    key = FAST.key(torch.float32)
    assert (key["backend"], key["batch"], key["threads"], key["torch"]) == (
        "eager", BATCH, 1, torch.__version__)
    assert key["device"].startswith("cpu:")
    other_batch = replace(FAST, batch_size=8)
    assert table(net, space, other_batch, MemoryBook()).digest not in digests


def test_a_cost_model_without_a_table_says_how_to_price_latency(space):
    costs = CostModel(space)
    assert "latency" not in costs.metrics(Config()) and costs.priced == (
        "params", "macs", "flops", "energy")
    with pytest.raises(RankSearchError, match="LatencyTable"):
        costs.ratio("latency", Config())


def test_the_table_must_be_given_a_batch_of_its_size(net, space):
    with pytest.raises(RankSearchError, match=r"holds 2 samples.*example_input\(32\)"):
        LatencyTable(net, space, torch.zeros(2, 512), FAST)


class Planted(MemoryBook):
    """A book whose factorized entries take 1 s at ranks that are multiples of ``fast``, 2 s
    at the others (as another writer measured them)."""

    def __init__(self, fast):
        super().__init__()
        self.fast = fast

    def save(self, table, entries):
        def planted(name, value):
            choice = name.rsplit("/", 1)[-1]
            if not name.startswith("site/") or ":" not in choice:
                return value
            return {"seconds": 1.0 if int(choice.split(":")[1]) % self.fast == 0 else 2.0}

        return super().save(table, {k: planted(k, v) for k, v in entries.items()})


@pytest.mark.parametrize(("fast", "expected"), [(8, 8), (4, 4), (1, 1)])
def test_the_fast_rank_multiple_is_read_off_the_table(fast, expected):
    model = nn.Sequential(nn.Linear(64, 64)).eval()
    space = RankSpace.discover(model, torch.zeros(1, 64))
    assert space.ranks("0", "svd") == tuple(range(1, 32))
    kept = LatencyTable(model, space, torch.zeros(1, 64), replace(FAST, batch_size=1),
                        Planted(fast))
    assert kept.fast_multiple("0", "svd") == expected


@pytest.mark.parametrize("fast", [8, 4])
def test_snap_space_rounds_the_grid_to_the_planted_fast_multiple(fast):
    model = nn.Sequential(nn.Linear(64, 64)).eval()
    space = RankSpace.discover(model, torch.zeros(1, 64))
    kept = LatencyTable(model, space, torch.zeros(1, 64), replace(FAST, batch_size=1),
                        Planted(fast))
    snapped = snap_space(kept)
    assert snapped.spec.rank_multiples == (("0", "svd", fast),)
    ranks = snapped.ranks("0", "svd")
    assert ranks == tuple(range(fast, 32, fast))  # rank 32 costs the dense layer: left out
    assert space.ranks("0", "svd") == tuple(range(1, 32))  # the given space is unchanged
    assert space_signature(snapped) != space_signature(space)  # so is its fingerprint
    assert RankSpace.from_json(snapped.to_json()).ranks("0", "svd") == ranks


def test_snap_space_keeps_the_grid_where_no_multiple_is_faster():
    model = nn.Sequential(nn.Linear(64, 64)).eval()
    space = RankSpace.discover(model, torch.zeros(1, 64))
    kept = LatencyTable(model, space, torch.zeros(1, 64), replace(FAST, batch_size=1),
                        Planted(1))  # every factorized entry 1 s
    snapped = snap_space(kept)
    assert snapped.spec.rank_multiples == ()
    assert snapped.ranks("0", "svd") == space.ranks("0", "svd")
    assert space_signature(snapped) == space_signature(space)


def test_a_search_with_multiple_of_auto_searches_the_snapped_grid(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 64, generator=g), torch.randint(0, 4, (64,), generator=g)
    small = Task("small", TensorDataset(x[:48], y[:48]), TensorDataset(x[48:], y[48:]),
                 input_shape=(64,), num_classes=4)
    book = Planted(8)
    monkeypatch.setattr(sys.modules["ranksearch.search"], "latency_book", lambda url: book)
    sr = ranksearch.search(model, small, strategy="uniform", objectives=["accuracy", "latency"],
                           strategy_options={"points": [0.5, 0.25]}, evaluations=2,
                           store="memory", proxy=replace(PROXY, latency_batch=1),
                           multiple_of="auto", include=["0"])
    assert sr.space.spec.rank_multiples == (("0", "svd", 8),)
    grid = sr.space.ranks("0", "svd")
    assert grid == (8, 16, 24)
    ranks = [r.config["0"].rank for r in sr.results if "0" in r.config]
    assert ranks and all(r in grid for r in ranks)
    assert [tuple(t) for t in sr.meta["space"]["rank_multiples"]] == [("0", "svd", 8)]


def test_multiple_of_auto_needs_latency_priced(net, task):
    with pytest.raises(ConfigError, match=r"multiple_of='auto'.*latency"):
        ranksearch.search(net, task, strategy="uniform", constraints=["flops<=0.5"],
                          evaluations=1, store="memory", multiple_of="auto")


# -- backends ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["channels_last", "onnx"])
def test_other_backends_time_layers_and_models(backend):
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.zeros(2, 8, 6, 6)
    space = RankSpace.discover(model, x[:1], max_choices=3)
    timing = Timing(backend=backend, batch_size=2, warmup=1, repeats=3, min_time=1e-4)
    kept = LatencyTable(model, space, x, timing)
    assert kept.build() == every_entry(space) and kept.key["backend"] == backend
    assert all(kept.seconds(n, c) > 0 for n in space.names for c in space.choices(n))
    config = space.uniform(0.3)
    checked = kept.check([config], lambda c: ranksearch.compress(model, c))[config.key]
    assert checked["latency_measured"] > 0 and checked["latency_measured_ratio"] > 0
    if backend == "onnx":
        assert "onnxruntime" in kept.key


@pytest.mark.slow
def test_the_compile_backend_times_compiled_layers():
    model = ConvNet().eval()
    x = torch.zeros(1, 8, 6, 6)
    space = RankSpace.discover(model, x, max_choices=2)
    kept = LatencyTable(model, space, x, Timing(backend="compile", warmup=1, repeats=3))
    assert kept.build() == every_entry(space)
    assert kept.dense > 0


def test_an_unknown_backend_is_refused_naming_the_backends():
    with pytest.raises(OptionError, match=r"backend.*eager.*channels_last.*compile.*onnx"):
        ProxySettings(backend="tensorrt")
    with pytest.raises(OptionError, match="unknown latency backend 'tvm'; choose one of eager"):
        Timing(backend="tvm")


def test_the_command_line_takes_a_backend_and_a_latency_batch(capsys):
    from ranksearch.cli import _parser

    args = _parser().parse_args(["search", "--backend", "onnx", "--latency-batch", "8"])
    assert (args.backend, args.latency_batch) == ("onnx", 8)
    assert _parser().parse_args(["search"]).backend == "eager"
    with pytest.raises(SystemExit) as stop:
        _parser().parse_args(["search", "--backend", "tvm"])
    assert stop.value.code == 2 and "channels_last" in capsys.readouterr().err


def test_the_command_line_takes_multiple_of_auto(capsys):
    from ranksearch.cli import _parser, space_spec

    args = _parser().parse_args(["search", "--multiple-of", "auto"])
    assert args.multiple_of == "auto" and space_spec(args).multiple_of == 1
    assert space_spec(_parser().parse_args(["search", "--multiple-of", "8"])).multiple_of == 8
    with pytest.raises(SystemExit) as stop:
        _parser().parse_args(["search", "--multiple-of", "0"])
    assert stop.value.code == 2 and "integer ≥ 1" in capsys.readouterr().err


def test_onnxruntime_missing_is_refused_before_anything_is_written(net, task, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails
    with pytest.raises(OptionError, match=r"onnxruntime is not installed; install the onnx "
                                          r"extra \(pip install 'ranksearch\[onnx\]'\)"):
        Timing(backend="onnx")
    with pytest.raises(OptionError, match="onnx extra"):
        ranksearch.search(net, task, strategy="uniform", constraints=["latency<=0.9x"],
                          evaluations=1, out=str(tmp_path / "out"),
                          proxy=ProxySettings(backend="onnx"))
    assert not (tmp_path / "out").exists()


# -- searches ---------------------------------------------------------------------------------
BUDGET = "latency<=0.7x"
PROXY = ProxySettings(latency_batch=BATCH, latency_repeats=3, eval_batch_size=32)


def spied(name, **options):
    """The strategy ``name``, recording every config it proposes and every result told."""
    strategy = load_strategy(name, options)
    asked, told = [], []
    ask, tell = strategy.ask, strategy.tell

    def asking():
        got = ask()
        asked.extend(p.config if isinstance(p, Proposal) else p for p in got
                     if not (isinstance(p, Proposal) and p.probe))
        return got

    def telling(results):
        told.extend(results)
        return tell(results)

    strategy.ask, strategy.tell = asking, telling
    return strategy, asked, told


# nsga2 proposes whole random generations, as under a FLOPs budget: the search answers the
# configs over budget as infeasible, unevaluated, with their priced violation
@pytest.mark.parametrize(("name", "options", "within"), [
    ("uniform", {}, True), ("random", {}, True), ("auto", {}, True),
    ("nsga2", {"pop_size": 6}, False)])
def test_a_latency_constrained_search_never_proposes_over_budget(net, task, db, name, options,
                                                                 within):
    strategy, asked, told = spied(name, **options)
    sr = ranksearch.search(net, task, strategy=strategy, constraints=[BUDGET], evaluations=6,
                           store=db, proxy=PROXY, space=SPEC, seed=1)
    kept = sr.costs.latency_table
    assert kept.measured == 0  # the store's table, measured by an earlier test
    assert asked and len(sr.results) == 6
    bound = parse_constraints(BUDGET)[0].value
    over = [c for c in asked if kept.price(c) / kept.dense > bound]  # rest + the entries
    assert not over if within else over
    for r in told:
        if r.config in over:
            assert r.status == "failed" and r.reason == f"infeasible: violates {BUDGET}"
            assert r.metrics["latency"] == kept.price(r.config)
    assert all(r.ok and r.metrics["latency_ratio"] <= bound for r in sr.results)
    assert any(r.config for r in sr.results)  # something is factorized to get there


def test_a_layer_slower_factorized_than_dense_is_kept_dense(net, space, db):
    kept = table(net, space, book=latency_book(db))
    slower = all(kept.seconds("tiny", c) > kept.seconds("tiny", DENSE)
                 for c in space.choices("tiny")[:-1])
    ctx = SearchContext(space=space, costs=CostModel(space, latency=kept), cache=None,
                        constraints=parse_constraints([BUDGET]),
                        objectives=(Objective("accuracy", "max"), Objective("latency")),
                        rng=None, evaluations=1)
    faster = [c for c in space.choices("wide1")[:-1]
              if kept.seconds("wide1", c) < kept.seconds("wide1", DENSE)]
    assert faster and site_choices(ctx, "wide1") == (*faster, DENSE)
    if slower:  # a 512 → 4 layer: every factorization adds a kernel and saves nothing
        assert site_choices(ctx, "tiny") == (DENSE,)


def test_repair_under_latency_keeps_dense_the_layers_factorizing_slows(net, space, db):
    kept = table(net, space, book=latency_book(db))
    costs = CostModel(space, latency=kept)
    fastest = Config({n: min(space.choices(n), key=lambda c, n=n: kept.seconds(n, c))
                      for n in space.names})
    tight = costs.metrics(fastest)["latency_ratio"] * 1.001  # only near the fastest config
    slow_tiny = max(space.choices("tiny"), key=lambda c: kept.seconds("tiny", c))
    ctx = SearchContext(space=space, costs=costs, cache=None,
                        constraints=parse_constraints([f"latency<={tight}x"]),
                        objectives=(Objective("accuracy", "max"), Objective("latency")),
                        rng=None, evaluations=1)
    start = Config({"wide1": space.choices("wide1")[-2], "wide2": space.choices("wide2")[-2],
                    "tiny": slow_tiny})
    assert not ctx.feasible(start)
    fixed = ctx.repair(start)
    assert ctx.feasible(fixed)
    assert fixed.get("tiny") == fastest.get("tiny")  # dense, where scaling ranks cannot go


def test_the_front_is_timed_end_to_end_stored_and_reported(net, task, tmp_path, monkeypatch):
    calls = []
    check = LatencyTable.check

    def counted(self, configs, build):
        configs = list(configs)
        calls.append(len(configs))
        return check(self, configs, build)

    monkeypatch.setattr(LatencyTable, "check", counted)
    run = dict(strategy="uniform", strategy_options={"points": [0.5, 0.2, 0.05]},
               objectives=["accuracy", "latency"], evaluations=3, out=str(tmp_path),
               proxy=PROXY, space=SPEC)
    sr = ranksearch.search(net, task, **run)
    front = sr.front()
    assert front and calls == [len(front)]
    for r in front:
        assert r.metrics["latency_measured"] > 0 and r.metrics["latency_measured_ratio"] > 0
        assert r.metrics["latency_dense_measured"] > 0
    line = prediction_line(front)
    assert line.startswith(f"latency priced vs measured end to end on {len(front)} front")
    table_text = front_table(sr.results, sr.objectives, sr.constraints)
    assert "latency_measured_ratio" in table_text and line in table_text
    results, _ = read_study(sr.store_url, sr.study)  # the store holds them too
    stored = {r.key: r.metrics for r in results}
    for r in front:
        assert stored[r.key]["latency_measured"] == r.metrics["latency_measured"]
    again = ranksearch.search(net, task, **run)  # resumed: nothing timed again
    assert calls == [len(front)] and again.costs.latency_table.measured == 0
    assert [r.metrics for r in again.front()] == [r.metrics for r in front]


@pytest.mark.parametrize("backend", ["channels_last", "onnx"])
def test_export_writes_the_model_for_its_backend(tmp_path, backend):
    torch.manual_seed(0)
    model = ConvNet().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 8, 6, 6, generator=g), torch.randint(0, 4, (48,), generator=g)
    task = Task("conv", TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:]),
                input_shape=(8, 6, 6), num_classes=4)
    proxy = ProxySettings(backend=backend, latency_repeats=3)
    sr = ranksearch.search(model, task, strategy="uniform", objectives=["accuracy", "latency"],
                           strategy_options={"points": [0.5]}, evaluations=1,
                           out=str(tmp_path), proxy=proxy, space=SpaceSpec(max_choices=3))
    exported = scored_model(model, task, out=str(tmp_path), study=sr.study)
    assert exported.backend == backend
    path = exported.write(tmp_path / "model", example_input=task.example_input())
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["backend"]["name"] == backend
    if backend == "onnx":
        assert path.suffix == ".onnx" and record["format"] == "onnx"
    else:
        assert record["format"] == "ranksearch" and "channels_last" in record["backend"]["run"]
        state = torch.load(path, weights_only=True)["state_dict"]
        conv = next(v for v in state.values() if v.dim() == 4 and v.shape[-1] == 3)
        assert conv.is_contiguous(memory_format=torch.channels_last)


def test_an_isolated_latency_search_times_in_the_parent_on_its_threads(net, task, tmp_path):
    """Evaluations run in forked children, which price from the table the parent timed on
    its two threads; the front is timed end to end in the parent."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sr = ranksearch.search(net, task, strategy="uniform", objectives=["accuracy", "latency"],
                               strategy_options={"points": [0.5, 0.1]}, evaluations=2,
                               out=str(tmp_path), proxy=PROXY, space=SPEC, isolate=True)
    finally:
        torch.set_num_threads(before)
    kept = sr.costs.latency_table
    assert kept.key["threads"] == 2 and kept.measured == every_entry(sr.space)
    assert len(sr.results) == 2 and all(r.ok for r in sr.results)
    for r in sr.results:
        assert r.metrics["latency"] == pytest.approx(kept.price(r.config))
    assert all(r.metrics["latency_measured"] > 0 for r in sr.front())
