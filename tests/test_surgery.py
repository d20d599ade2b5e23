import itertools

import pytest
import torch
from torch import nn

import ranksearch
from ranksearch.cache import FactorCache, effective_rank
from ranksearch.config import Choice, Config
from ranksearch.errors import InvalidRankError, NotAdmittedError, UnknownLayerError
from ranksearch.space import RankSpace


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Conv2d(12, 16, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 3 * 3, 20),
        nn.ReLU(),
        nn.Linear(20, 5),
    ).eval()


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def setup():
    model = make_model()
    space = RankSpace.discover(model, X[:1], methods=["svd", "tucker2", "cp3"])
    return model, space, FactorCache(model, space)


def rel(a, b):
    return float((a - b).norm().detach() / b.norm().detach())


def test_full_rank_reproduces_dense_model(setup):
    model, space, cache = setup
    for method in ("svd", "tucker2"):
        compressed = ranksearch.compress(model, space.full(method), cache=cache)
        assert rel(compressed(X), model(X)) < 1e-4


def test_compress_leaves_original_untouched(setup):
    model, space, cache = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compressed = ranksearch.compress(model, space.uniform(0.3), cache=cache)
    compressed.train()
    opt = torch.optim.SGD(compressed.parameters(), lr=0.1)
    compressed(X).square().mean().backward()
    opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert isinstance(model[0], nn.Conv2d) and not isinstance(compressed[0], nn.Conv2d)
    # the cache's factors were not trained either: a fresh build equals the first one
    fresh = ranksearch.compress(model, space.uniform(0.3), cache=cache).eval()
    again = ranksearch.compress(model, space.uniform(0.3), cache=cache).eval()
    assert torch.equal(fresh(X), again(X))
    assert not torch.equal(compressed.eval()(X), fresh(X))


def test_cache_decomposes_each_site_once(setup):
    model, space, cache = setup
    for fraction in (0.2, 0.4, 0.6, 0.9):
        ranksearch.compress(model, space.uniform(fraction, "svd"), cache=cache)
        ranksearch.compress(model, space.uniform(fraction, "tucker2"), cache=cache)
    assert set(cache.decompositions.values()) == {1}
    assert len(cache.decompositions) == 4 + 2  # svd on 4 sites, tucker2 on 2 convs
    # CP is cached per rank
    cfg = Config({"3": Choice("cp3", 4)})
    a = ranksearch.compress(model, cfg, cache=cache)
    b = ranksearch.compress(model, cfg, cache=cache)
    assert cache.decompositions[("3", "cp3")] == 1
    assert torch.equal(a(X), b(X))


def test_cached_build_equals_direct_decomposition(setup):
    model, space, cache = setup
    cfg = space.uniform(0.4)
    via_cache = ranksearch.compress(model, cfg, cache=cache)
    direct = ranksearch.compress(model, cfg)
    assert rel(via_cache(X), direct(X)) < 1e-5


def test_error_decreases_with_rank():
    # one linear operator: channel SVD error falls with rank (Eckart–Young); a deep nonlinear
    # model carries no such guarantee end to end
    conv = nn.Conv2d(6, 10, 3, padding=1).eval()
    x = torch.randn(3, 6, 8, 8, generator=torch.Generator().manual_seed(1))
    space = RankSpace.discover(conv, x[:1], methods=["svd"], dearer=True)  # up to full rank
    cache = FactorCache(conv, space)
    errors = [
        rel(ranksearch.compress(conv, Config({"": Choice("svd", r)}), cache=cache)(x), conv(x))
        for r in space.ranks("", "svd")
    ]
    assert all(a >= b - 1e-6 for a, b in itertools.pairwise(errors))
    assert errors[0] > 1e-2 and errors[-1] < 1e-5


def test_save_load_round_trip(setup, tmp_path):
    model, _space, cache = setup
    cfg = Config({"0": Choice("tucker2", (2, 5)), "6": Choice("svd", 7), "3": Choice("cp3", 3)})
    compressed = ranksearch.compress(model, cfg, cache=cache)
    with torch.no_grad():  # change weights so the file must carry them
        for p in compressed.parameters():
            p.add_(0.01)
    path = ranksearch.save(tmp_path / "m.pt", compressed, cfg)
    loaded, loaded_cfg = ranksearch.load(path, make_model())
    assert loaded_cfg == cfg
    assert torch.equal(loaded.eval()(X), compressed.eval()(X))


def test_compress_errors(setup, tmp_path):
    model, _space, cache = setup
    with pytest.raises(UnknownLayerError):
        ranksearch.compress(model, Config({"nope": Choice("svd", 2)}))
    with pytest.raises(UnknownLayerError, match="BatchNorm2d"):
        ranksearch.compress(model, Config({"1": Choice("svd", 2)}))
    with pytest.raises(InvalidRankError):
        ranksearch.compress(model, Config({"6": Choice("svd", 0)}), cache=cache)
    with pytest.raises(NotAdmittedError):
        ranksearch.compress(model, Config({"6": Choice("tucker2", 2)}))
    with pytest.raises(ranksearch.RankSearchError, match="no compressed model"):
        ranksearch.load(tmp_path / "missing.pt", model)


def test_singular_values_and_effective_rank(setup):
    model, _space, cache = setup
    s = cache.singular_values("6")
    w = model[6].weight.detach().double()
    assert torch.allclose(s, torch.linalg.svdvals(w))
    assert effective_rank(torch.ones(5)) == pytest.approx(5.0)
    assert effective_rank(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert 1.0 < effective_rank(s) <= len(s)
