"""CP factorizations of convolutions: cp3/cp4 by ALS and by the tensor power method."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import tensorly as tl
import tensorly.decomposition
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ranksearch.errors import DecompositionError, InvalidRankError, NotAdmittedError
from ranksearch.factorize import REGISTRY, cp, get
from ranksearch.site import Site

METHODS = ["cp3", "cp4", "cp3_tpm", "cp4_tpm"]
ALS = ["cp3", "cp4"]
TPM = ["cp3_tpm", "cp4_tpm"]

# (nn.Conv2d arguments, input H×W): non-square kernels, asymmetric stride, integer, 'same'
# (also with an even kernel, padded asymmetrically) and 'valid' padding, dilation, non-zero
# padding modes, with and without bias.
CONVS = [
    (dict(in_channels=5, out_channels=6, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2)),
     (9, 11)),
    (dict(in_channels=5, out_channels=6, kernel_size=3, padding="same", dilation=2,
          padding_mode="reflect", bias=False), (10, 10)),
    (dict(in_channels=4, out_channels=7, kernel_size=(5, 3), padding="valid"), (9, 8)),
    (dict(in_channels=6, out_channels=5, kernel_size=3, stride=2, padding=1, dilation=(1, 2),
          padding_mode="circular"), (11, 12)),
    (dict(in_channels=5, out_channels=6, kernel_size=(2, 4), padding="same", bias=False),
     (8, 7)),
    (dict(in_channels=3, out_channels=8, kernel_size=3, stride=(1, 2), padding=2,
          padding_mode="replicate"), (7, 9)),
]
CONV_IDS = ["3x5-stride21", "same-dil-reflect", "valid-5x3", "circular-dil12", "same-even",
            "replicate-stride12"]


def _conv(kwargs: dict, size: tuple[int, int], dtype=torch.float64) -> tuple[nn.Conv2d, Site]:
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs, dtype=dtype)
    out = conv(torch.zeros(1, conv.in_channels, *size, dtype=dtype))
    return conv, Site.from_module("block.conv", conv, size, tuple(out.shape[-2:]))


def _planted(shape: tuple[int, ...], rank: int, seed: int, orthogonal: bool = False):
    """A tensor of CP rank ``rank`` from random (or orthonormal-column) factors."""
    g = torch.Generator().manual_seed(seed)
    factors = [torch.randn(n, rank, generator=g, dtype=torch.float64) for n in shape]
    if orthogonal:  # orthonormal columns, distinct weights: orthogonally decomposable
        factors = [torch.linalg.qr(f)[0] for f in factors]
        factors[0] = factors[0] * torch.arange(rank + 1, 1, -1, dtype=torch.float64)
    letters = "abcd"[: len(shape)]
    return torch.einsum(",".join(f"{c}r" for c in letters) + f"->{letters}", *factors)


def _kernel(method: str, factors: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """The kernel the factors stand for (independent of the library's reconstruction)."""
    if method.startswith("cp3"):
        k = torch.einsum("tr,sr,kr->tsk", factors["out"], factors["in"], factors["spatial"])
    else:
        k = torch.einsum("tr,sr,hr,wr->tshw", factors["out"], factors["in"],
                         factors["height"], factors["width"])
    return k.reshape(shape)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _plant_conv(method: str, kwargs: dict, size, rank: int, orthogonal: bool, seed: int = 1):
    conv, site = _conv(kwargs, size)
    weight = _planted(get(method).tensor_shape(site), rank, seed, orthogonal)
    with torch.no_grad():
        conv.weight.copy_(weight.reshape(conv.weight.shape))
    return conv, site


def _output_error(method: str, conv: nn.Conv2d, site: Site, rank: int) -> float:
    fac = get(method)
    factors = fac.decompose(conv.weight.detach(), site, rank)
    module = fac.build(site, rank, factors, bias=conv.bias)
    x = torch.randn(2, site.in_features, *site.in_size, dtype=torch.float64)
    with torch.no_grad():
        return _rel(module(x), conv(x))


# -- 1. planted kernels ---------------------------------------------------------------------------
@pytest.mark.parametrize("method, kernel", [("cp3", (3, 3)), ("cp4", (3, 5))])
def test_als_reproduces_a_planted_cp_kernel(method, kernel):
    kwargs = dict(in_channels=5, out_channels=6, kernel_size=kernel, padding=1)
    conv, site = _plant_conv(method, kwargs, (7, 8), rank=4, orthogonal=False)
    assert _output_error(method, conv, site, 4) < 1e-4


@pytest.mark.parametrize("method, kernel", [("cp3_tpm", (3, 3)), ("cp4_tpm", (5, 5))])
def test_tpm_is_exact_on_orthogonally_decomposable_kernels(method, kernel):
    kwargs = dict(in_channels=5, out_channels=6, kernel_size=kernel, padding=1)
    conv, site = _plant_conv(method, kwargs, (7, 8), rank=4, orthogonal=True)
    assert _output_error(method, conv, site, 4) < 1e-4


@pytest.mark.parametrize("method", TPM)
def test_tpm_on_generic_planted_kernels_improves_with_rank_and_is_nested(method):
    kwargs = dict(in_channels=5, out_channels=6, kernel_size=3)
    conv, site = _plant_conv(method, kwargs, (6, 6), rank=4, orthogonal=False)
    weight, fac = conv.weight.detach(), get(method)
    errors = [_rel(_kernel(method, fac.decompose(weight, site, r), weight.shape), weight)
              for r in range(1, 7)]
    assert all(np.isfinite(errors))
    assert all(b <= a + 1e-12 for a, b in pairwise(errors))
    assert errors[-1] < 0.5 * errors[0]
    # greedy deflation: the components at rank 3 are the first three at rank 6
    small, large = fac.decompose(weight, site, 3), fac.decompose(weight, site, 6)
    for mode in fac.modes:
        torch.testing.assert_close(small[mode], large[mode][:, :3])


# -- 2. error against rank ----------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_error_does_not_grow_with_rank(method):
    # ALS fits every rank from its own SVD start, so a local minimum could in principle cost a
    # larger rank a little; allow 1e-3. TPM's components are nested, so its error cannot grow.
    slack = 1e-3 if method in ALS else 1e-12
    site = Site.from_module("c", nn.Conv2d(6, 8, 3))
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(8, 6, 3, 3, generator=g, dtype=torch.float64)
    fac = get(method)
    errors = [_rel(_kernel(method, fac.decompose(weight, site, r), weight.shape), weight)
              for r in (1, 2, 4, 8, 16)]
    assert all(b <= a + slack for a, b in pairwise(errors)), errors
    assert errors[-1] < 0.6 * errors[0], errors


# -- 3. closed-form costs and layer semantics ------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("kwargs", "size"), CONVS, ids=CONV_IDS)
def test_closed_form_costs_match_the_built_module(method, kwargs, size):
    _, site = _conv(kwargs, size, dtype=torch.float32)
    fac = get(method)
    rank, batch = 3, 2
    stages = fac.stages(site, rank)
    module = fac.build(site, rank)
    assert len(stages) == len(module)
    assert fac.params(site, rank) == sum(p.numel() for p in module.parameters())
    for stage, layer in zip(stages, module, strict=True):
        assert stage.params == sum(p.numel() for p in layer.parameters())
        assert stage.bias == (site.out_features if site.bias and layer is module[-1] else 0)
    seen = []
    hooks = [layer.register_forward_hook(
        lambda m, args, out: seen.append((args[0][0].numel(), out[0].numel()))) for layer in module]
    x = torch.randn(batch, site.in_features, *size)
    with FlopCounterMode(display=False) as counter:
        y = module(x)
    for h in hooks:
        h.remove()
    assert tuple(y.shape[-2:]) == site.out_size
    assert fac.macs(site, rank) == counter.get_total_flops() // 2 // batch
    assert [(s.inputs, s.outputs) for s in stages] == seen


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("kwargs", "size"), CONVS, ids=CONV_IDS)
def test_outputs_match_the_dense_layer_on_planted_kernels(method, kwargs, size):
    # ALS on a generic rank-3 kernel; TPM on an orthogonally decomposable rank-2 kernel
    rank = 3 if method in ALS else 2
    conv, site = _plant_conv(method, kwargs, size, rank, orthogonal=method in TPM)
    assert _output_error(method, conv, site, rank) < 1e-4


def test_cost_of_a_known_shape():
    site = Site.from_module("c", nn.Conv2d(16, 32, 3, padding=1), (10, 10), (10, 10))
    r = 8
    assert get("cp3").params(site, r) == r * (16 + 9 + 32) + 32
    assert get("cp3").macs(site, r) == r * 16 * 100 + r * 9 * 100 + r * 32 * 100
    assert get("cp4_tpm").params(site, r) == r * (16 + 3 + 3 + 32) + 32


# -- 4. failures --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_weight_raises(method, bad):
    site = Site.from_module("block.conv", nn.Conv2d(5, 6, 3))
    weight = torch.randn(6, 5, 3, 3)
    weight[1, 2, 0, 1] = bad
    with pytest.raises(DecompositionError, match=r"block\.conv"):
        get(method).decompose(weight, site, 3)


@pytest.mark.parametrize("method", ALS)
def test_nan_factors_from_als_raise(method, monkeypatch):
    def nan_parafac(tensor, rank, **kwargs):
        return np.ones(rank), [np.full((n, rank), np.nan) for n in tensor.shape]

    monkeypatch.setattr(tensorly.decomposition, "parafac", nan_parafac)
    site = Site.from_module("block.conv", nn.Conv2d(5, 6, 3))
    with pytest.raises(DecompositionError, match=r"block\.conv.*rank 3.*not finite.*_tpm"):
        get(method).decompose(torch.randn(6, 5, 3, 3), site, 3)


@pytest.mark.parametrize("method", ALS)
def test_diverged_als_factors_raise(method, monkeypatch):
    def huge_parafac(tensor, rank, **kwargs):
        rng = np.random.default_rng(0)
        return np.full(rank, 1e6), [rng.standard_normal((n, rank)) for n in tensor.shape]

    monkeypatch.setattr(tensorly.decomposition, "parafac", huge_parafac)
    site = Site.from_module("block.conv", nn.Conv2d(5, 6, 3))
    with pytest.raises(DecompositionError, match="relative error"):
        get(method).decompose(torch.randn(6, 5, 3, 3), site, 3)


@pytest.mark.parametrize("method", ALS)
def test_a_singular_als_system_raises(method, monkeypatch):
    def singular(tensor, rank, **kwargs):
        raise np.linalg.LinAlgError("Singular matrix")

    monkeypatch.setattr(tensorly.decomposition, "parafac", singular)
    site = Site.from_module("block.conv", nn.Conv2d(5, 6, 3))
    with pytest.raises(DecompositionError, match=r"block\.conv.*Singular matrix"):
        get(method).decompose(torch.randn(6, 5, 3, 3), site, 3)


@pytest.mark.parametrize("method", ALS)
def test_als_refuses_a_khatri_rao_product_over_its_memory_limit(method):
    site = Site.from_module("block.conv", nn.Conv2d(5, 6, 3))
    weight = torch.randn(6, 5, 3, 3)
    # the largest product is (270 / 3) × 4 entries for cp4, (270 / 5) × 4 for cp3
    limit = 8 * 4 * (90 if method == "cp4" else 54)
    get(method).decompose(weight, site, 4, memory_max=limit)
    with pytest.raises(DecompositionError, match=r"block\.conv.*rank 4.*GiB.*_tpm"):
        get(method).decompose(weight, site, 4, memory_max=limit - 1)


@pytest.mark.parametrize("method", TPM)
def test_nan_factors_from_tpm_raise(method, monkeypatch):
    def nan_fit(self, tensor, rank, **options):
        return tensor.new_ones(rank), [tensor.new_full((n, rank), float("nan"))
                                       for n in tensor.shape]

    monkeypatch.setattr(cp._TPM, "fit", nan_fit)
    site = Site.from_module("block.conv", nn.Conv2d(5, 6, 3))
    with pytest.raises(DecompositionError, match=r"block\.conv.*not finite.*'cp\d'"):
        get(method).decompose(torch.randn(6, 5, 3, 3), site, 3)


@pytest.mark.parametrize("method", METHODS)
def test_zero_and_extreme_weights(method):
    conv, site = _conv(dict(in_channels=5, out_channels=6, kernel_size=3, bias=False), (6, 6))
    fac = get(method)
    zero = fac.decompose(torch.zeros(6, 5, 3, 3, dtype=torch.float64), site, 4)
    assert all(torch.count_nonzero(f) == 0 for f in zero.values())
    module = fac.build(site, 4, zero)
    assert torch.count_nonzero(module(torch.randn(1, 5, 6, 6, dtype=torch.float64))) == 0
    # the fit is scale-invariant: weights near the float64 limits neither overflow nor vanish
    weight = conv.weight.detach()
    error = _rel(_kernel(method, fac.decompose(weight, site, 4), weight.shape), weight)
    for scale in (1e200, 1e-200):
        factors = fac.decompose(weight * scale, site, 4)
        scaled = _rel(_kernel(method, factors, weight.shape) / scale, weight)
        assert scaled == pytest.approx(error, rel=1e-6)


def test_a_weight_of_the_wrong_shape_raises():
    site = Site.from_module("block.conv", nn.Conv2d(5, 6, 3))
    with pytest.raises(DecompositionError, match=r"\(6, 5, 3, 3\)"):
        get("cp3").decompose(torch.randn(6, 5, 5, 5), site, 2)


# -- 5. state dicts, dtypes, factor shapes ---------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_an_empty_build_loads_the_state_of_a_factored_one(method):
    conv, site = _conv(CONVS[0][0], CONVS[0][1], dtype=torch.float32)
    fac = get(method)
    factors = fac.decompose(conv.weight.detach(), site, 5)
    assert all(f.dtype == torch.float32 for f in factors.values())
    built = fac.build(site, 5, factors, bias=conv.bias)
    empty = fac.build(site, 5)
    x = torch.randn(2, 5, *CONVS[0][1])
    assert not torch.equal(empty(x), built(x))
    empty.load_state_dict(built.state_dict())
    assert torch.equal(empty(x), built(x))
    assert all(p.dtype == torch.float32 for p in built.parameters())
    assert torch.equal(built[-1].bias, conv.bias)


@pytest.mark.parametrize("method", ALS)
def test_component_norms_are_balanced_across_modes(method):
    _, site = _conv(dict(in_channels=5, out_channels=6, kernel_size=3), (6, 6))
    weight = torch.randn(6, 5, 3, 3, dtype=torch.float64) * 50
    factors = get(method).decompose(weight, site, 6)
    norms = torch.stack([f.norm(dim=0) for f in factors.values()])
    torch.testing.assert_close(norms, norms[:1].expand_as(norms))


def test_balanced_tpm_components_too():
    _, site = _conv(dict(in_channels=5, out_channels=6, kernel_size=3), (6, 6))
    factors = get("cp4_tpm").decompose(torch.randn(6, 5, 3, 3, dtype=torch.float64), site, 6)
    norms = torch.stack([f.norm(dim=0) for f in factors.values()])
    torch.testing.assert_close(norms, norms[:1].expand_as(norms))


def test_factors_of_another_rank_are_refused():
    conv, site = _conv(dict(in_channels=5, out_channels=6, kernel_size=3), (6, 6))
    factors = get("cp3").decompose(conv.weight.detach(), site, 4)
    with pytest.raises(InvalidRankError, match="'out'"):
        get("cp3").build(site, 3, factors)


def test_the_global_tensorly_backend_is_left_alone():
    site = Site.from_module("c", nn.Conv2d(5, 6, 3))
    tl.set_backend("pytorch")
    try:
        get("cp3").decompose(torch.randn(6, 5, 3, 3), site, 3)
        assert tl.get_backend() == "pytorch"
    finally:
        tl.set_backend("numpy")


# -- 6. ranks and admission -----------------------------------------------------------------------
def test_registered_as_per_rank_conv_factorizations():
    for name in METHODS:
        assert REGISTRY[name].name == name
        assert REGISTRY[name].kinds == ("conv2d",)
        assert REGISTRY[name].sliceable is False
        assert REGISTRY[name].exact_at_max is False  # max_rank is only the largest offered


def test_max_rank():
    small = Site.from_module("c", nn.Conv2d(3, 2, 3))  # 2×3×9, 2×3×3×3
    assert get("cp3").max_rank(small) == 6  # 54 / 9
    assert get("cp4_tpm").max_rank(small) == 12  # 54 / 3 = 18, capped at 4·max(S, T)
    pointwise = Site.from_module("c", nn.Conv2d(5, 7, 1))  # a matrix: its rank bound
    assert get("cp3").max_rank(pointwise) == 5
    assert get("cp4").max_rank(pointwise) == 5


def test_at_max_rank_a_pointwise_conv_is_reproduced():
    conv, site = _conv(dict(in_channels=5, out_channels=7, kernel_size=1), (4, 4))
    assert _output_error("cp3", conv, site, get("cp3").max_rank(site)) < 1e-4


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rank", [0, -1, 25, 2.5, True, (2, 2)])
def test_invalid_ranks_raise(method, rank):
    site = Site.from_module("c", nn.Conv2d(5, 6, 3))  # max rank 24
    fac = get(method)
    assert fac.max_rank(site) == 24
    with pytest.raises(InvalidRankError):
        fac.stages(site, rank)
    with pytest.raises(InvalidRankError):
        fac.build(site, rank)
    with pytest.raises(InvalidRankError):
        fac.decompose(torch.randn(6, 5, 3, 3), site, rank)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("module", [nn.Linear(6, 5), nn.Conv2d(6, 4, 3, groups=2)],
                         ids=["linear", "grouped"])
def test_linear_and_grouped_layers_are_not_admitted(method, module):
    site = Site.from_module("head", module)
    fac = get(method)
    expected = "not linear" if isinstance(module, nn.Linear) else "grouped convolutions (groups=2)"
    assert expected in fac.admits(site)
    with pytest.raises(NotAdmittedError, match="head"):
        fac.stages(site, 2)
    with pytest.raises(NotAdmittedError):
        fac.build(site, 2)
    with pytest.raises(NotAdmittedError):
        fac.decompose(module.weight.detach(), site, 2)


@pytest.mark.parametrize("method", METHODS)
def test_not_admitted_names_the_methods_that_admit_the_layer(method):
    # a site built by Site.from_module lists no methods: the message asks the registry
    site = Site.from_module("head", nn.Linear(6, 5))
    assert site.methods == ()
    with pytest.raises(NotAdmittedError) as info:
        get(method).stages(site, 2)
    message = str(info.value)
    assert "'head'" in message and "linear" in message
    admitting = [m for m, f in REGISTRY.items() if f.admits(site) is None]
    assert {"svd", "tt", "tr"} <= set(admitting) and method not in admitting
    assert f"The methods that admit it are {', '.join(admitting)}." in message
    assert "none" not in message


def test_a_bias_for_a_layer_without_one_is_refused():
    site = Site.from_module("c", nn.Conv2d(5, 6, 3, bias=False))
    with pytest.raises(NotAdmittedError, match="no bias"):
        get("cp3").build(site, 2, bias=torch.zeros(6))
