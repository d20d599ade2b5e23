"""Tensor-train (tt) and tensor-ring (tr): exactness, costs, per-rank fits, errors."""

from __future__ import annotations

import math
from itertools import pairwise
from math import prod

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ranksearch.errors import InvalidRankError, NotAdmittedError
from ranksearch.factorize import available, get
from ranksearch.factorize.tr import TR, TRLinear
from ranksearch.factorize.tt import TT, TTLinear, factor_dims, matrix_tensor
from ranksearch.site import Site

BATCH = 2


# -- helpers -------------------------------------------------------------------------------------
def linear_case(i: int, o: int, lead: tuple[int, ...] = (), bias: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    layer = nn.Linear(i, o, bias=bias)
    x = torch.randn(BATCH, *lead, i)
    return layer, Site.from_module("fc", layer, lead, lead), x


def conv_case(conv: nn.Conv2d, size: tuple[int, int] = (11, 13), seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(BATCH, conv.in_channels, *size)
    out = conv(x).shape[-2:]
    return Site.from_module("conv", conv, size, tuple(out)), x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def sweep(top: tuple[int, ...], points: int = 10) -> list[tuple[int, ...]]:
    """Up to ``points`` ranks from 1 to ``top``, every component scaled by the same fraction."""
    steps = max(top)
    ts = sorted({1 + round(j * (steps - 1) / (points - 1)) for j in range(points)})
    return [tuple(max(1, math.ceil(t * m / steps)) for m in top) for t in ts]


def built_weight(module: nn.Module, site: Site) -> torch.Tensor:
    """The dense weight a built module applies (bias removed); plain convolutions only."""
    if site.kind == "linear":
        probe = torch.eye(site.in_features, dtype=torch.float64)
    else:
        s, (kh, kw) = site.in_features, site.kernel_size
        probe = torch.eye(s * kh * kw, dtype=torch.float64).reshape(-1, s, kh, kw)
    with torch.no_grad():
        out = module.double()(probe).reshape(probe.shape[0], site.out_features)
    bias = [p for n, p in module.named_parameters() if n.endswith("bias")]
    out = out - bias[0] if bias else out
    return out.T.reshape(site.weight_shape)


def dense_conv(conv: nn.Conv2d, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``conv`` with its weight replaced by ``weight``."""
    copy = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )
    copy.load_state_dict({**conv.state_dict(), "weight": weight.float()})
    return copy(x)


def count(module: nn.Module, x: torch.Tensor) -> tuple[int, int, list[tuple[int, int]]]:
    """Parameters, MACs per sample (FlopCounterMode), and per-layer activation elements."""
    sizes: list[tuple[int, int]] = []
    hooks = [
        m.register_forward_hook(
            lambda m, a, y: sizes.append((a[0].numel() // BATCH, y.numel() // BATCH))
        )
        for m in module.modules()
        if isinstance(m, nn.Linear | nn.Conv2d)
    ]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    for h in hooks:
        h.remove()
    flops = counter.get_total_flops()
    assert flops % (2 * BATCH) == 0
    return sum(p.numel() for p in module.parameters()), flops // 2 // BATCH, sizes


def tt_linear_weight(cores: list[torch.Tensor], ins, outs) -> torch.Tensor:
    """Contract TT-matrix cores ``(r, I_k, O_k, r')`` into an ``O×I`` weight."""
    full = cores[0]
    for core in cores[1:]:
        full = torch.tensordot(full, core, dims=([-1], [0]))
    d = len(cores)
    full = full.squeeze(0).squeeze(-1)  # (I1, O1, I2, O2, …)
    return full.permute([*range(1, 2 * d, 2), *range(0, 2 * d, 2)]).reshape(
        prod(outs), prod(ins)
    )


CONVS = {
    "3x5-stride21-pad": lambda: nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2)),
    "same-dilation-nobias": lambda: nn.Conv2d(3, 5, 3, padding="same", dilation=2, bias=False),
    "valid": lambda: nn.Conv2d(4, 6, (3, 5), padding="valid"),
    "reflect-dilated": lambda: nn.Conv2d(
        4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), padding_mode="reflect"
    ),
    "even-same-circular": lambda: nn.Conv2d(5, 4, (2, 4), padding="same", padding_mode="circular"),
    "1x1-stride2": lambda: nn.Conv2d(8, 6, 1, stride=2),
}
LINEARS = [  # (in, out, leading dims, bias, modes)
    (24, 30, (), True, 3),
    (20, 12, (5,), False, 3),
    (7, 12, (3,), True, 3),
    (16, 18, (), True, 2),
    (36, 32, (2, 3), True, 4),
]


# -- mode factorization --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "d", "modes"),
    [(64, 3, (4, 4, 4)), (12, 2, (4, 3)), (7, 3, (7, 1, 1)), (1, 2, (1, 1)),
     (1000, 3, (10, 10, 10)), (30, 3, (5, 3, 2)), (784, 2, (28, 28))],
)
def test_factor_dims(n, d, modes):
    assert factor_dims(n, d) == modes


def test_factor_dims_product_and_order():
    for n in range(1, 200):
        for d in (2, 3, 4):
            modes = factor_dims(n, d)
            assert len(modes) == d and prod(modes) == n and list(modes) == sorted(modes)[::-1]


def test_registry():
    assert isinstance(get("tt"), TT) and get("tt").modes == 3
    assert isinstance(get("tr"), TR) and get("tr").modes == 3
    assert "tt" in available("conv2d") and "tr" not in available("conv2d")
    assert {"tt", "tr"} <= set(available("linear"))
    assert not get("tt").sliceable and not get("tr").sliceable
    assert get("tt").exact_at_max and get("tr").exact_at_max


# -- exactness at the maximum rank ---------------------------------------------------------------
@pytest.mark.parametrize(("i", "o", "lead", "bias", "modes"), LINEARS)
@pytest.mark.parametrize("cls", [TT, TR])
def test_linear_exact_at_max_rank(cls, i, o, lead, bias, modes):
    layer, site, x = linear_case(i, o, lead, bias)
    fac = cls(modes)
    top = fac.max_rank(site)
    assert len(top) == (modes - 1 if cls is TT else modes)
    module = fac.build(site, top, fac.decompose(layer.weight, site, top), layer.bias)
    assert isinstance(module, TTLinear if cls is TT else TRLinear)
    y = module(x)
    assert y.shape == (BATCH, *lead, o)
    assert rel_err(y, layer(x)) < 1e-4


@pytest.mark.parametrize("conv", CONVS.values(), ids=CONVS.keys())
def test_tt_conv_exact_at_max_rank(conv):
    conv = conv()
    site, x = conv_case(conv)
    tt = get("tt")
    top = tt.max_rank(site)
    module = tt.build(site, top, tt.decompose(conv.weight, site, top), conv.bias)
    assert isinstance(module, nn.Sequential) and len(module) == 4
    assert all(type(m) is nn.Conv2d for m in module)
    y = module(x)
    assert y.shape == conv(x).shape
    assert rel_err(y, conv(x)) < 1e-4


def test_tt_conv_max_rank_formula():
    site, _ = conv_case(nn.Conv2d(4, 6, (3, 5)))
    assert get("tt").max_rank(site) == (min(4, 90), min(12, 30), min(60, 6))


def test_tr_max_rank_choice():
    # 64×64, 3 modes: dims (16, 16, 16); R = 16 = 4·4; r2 = min(4·16, 4·16)
    assert get("tr").max_rank(linear_case(64, 64)[1]) == (4, 4, 64)
    # a prime first unfolding rank gives a trivial ring (TR = TT)
    site = linear_case(7, 1)[1]  # dims (7, 1, 1): R = 1
    assert get("tr").max_rank(site) == (1, 1, 1)
    assert TR(2).max_rank(linear_case(49, 1)[1]) == (1, 7)  # dims (7, 7): R = 7 is prime
    assert TR(2).max_rank(linear_case(24, 30)[1]) == (4, 5)  # dims (6·6, 4·5): R = 20


def test_float64_is_kept():
    layer, site, x = linear_case(12, 8)
    layer = layer.double()
    tt = get("tt")
    factors = tt.decompose(layer.weight, site, tt.max_rank(site))
    assert all(f.dtype == torch.float64 for f in factors.values())
    module = tt.build(site, tt.max_rank(site), factors, layer.bias)
    assert next(module.parameters()).dtype == torch.float64
    assert rel_err(module(x.double()), layer(x.double())) < 1e-12


# -- error against rank --------------------------------------------------------------------------
@pytest.mark.parametrize(("i", "o", "modes"), [(64, 64, 3), (24, 30, 3), (24, 30, 4), (48, 20, 2)])
def test_tt_linear_error_decreases_with_rank(i, o, modes):
    layer, site, _ = linear_case(i, o)
    tt = TT(modes)
    errs = [rel_err(built_weight(tt.build(site, r, tt.decompose(layer.weight, site, r)), site),
                    layer.weight.double()) for r in sweep(tt.max_rank(site))]
    assert errs[0] > 0.5 and errs[-1] < 1e-6
    assert all(b <= a + 1e-9 for a, b in pairwise(errs))


def test_tt_conv_error_decreases_with_rank():
    conv = nn.Conv2d(6, 8, (3, 5))
    site, _ = conv_case(conv)
    tt = get("tt")
    errs = [rel_err(built_weight(tt.build(site, r, tt.decompose(conv.weight, site, r), conv.bias),
                                 site), conv.weight.double())
            for r in sweep(tt.max_rank(site))]
    assert errs[0] > 0.5 and errs[-1] < 1e-6
    assert all(b <= a + 1e-9 for a, b in pairwise(errs))


@pytest.mark.parametrize(("i", "o", "modes"), [(64, 64, 3), (24, 30, 3), (60, 36, 3), (64, 48, 2)])
def test_tr_error_decreases_with_rank(i, o, modes):
    # TR-SVD is decomposed per rank; on these sweeps every component grows together, the first
    # split keeps more singular vectors and each later unfolding more, so no slack is needed.
    layer, site, _ = linear_case(i, o)
    tr = TR(modes)
    ranks = sweep(tr.max_rank(site))
    errs = [rel_err(built_weight(tr.build(site, r, tr.decompose(layer.weight, site, r)), site),
                    layer.weight.double()) for r in ranks]
    assert len(errs) > 3 and errs[0] > 0.5 and errs[-1] < 1e-6
    assert all(b <= a + 1e-9 for a, b in pairwise(errs))


# -- closed-form costs ---------------------------------------------------------------------------
def check_costs(fac, site, rank, module, x):
    params, macs, sizes = count(module, x)
    stages = fac.stages(site, rank)
    assert fac.params(site, rank) == params
    assert fac.macs(site, rank) == macs
    assert [(s.inputs, s.outputs) for s in stages] == sizes
    bias = site.out_features if site.bias else 0
    assert stages[-1].bias == bias and all(s.bias == 0 for s in stages[:-1])


@pytest.mark.parametrize(("i", "o", "lead", "bias", "modes"), [
    *LINEARS, (7, 5, (), True, 3), (13, 11, (4,), False, 2), (60, 36, (), True, 3),
])
@pytest.mark.parametrize("cls", [TT, TR])
def test_linear_costs_match_flop_counter(cls, i, o, lead, bias, modes):
    _, site, x = linear_case(i, o, lead, bias)
    fac = cls(modes)
    top = fac.max_rank(site)
    for rank in {top, sweep(top)[len(sweep(top)) // 2], sweep(top)[0]}:
        check_costs(fac, site, rank, fac.build(site, rank), x)


@pytest.mark.parametrize("conv", CONVS.values(), ids=CONVS.keys())
def test_tt_conv_costs_match_flop_counter(conv):
    conv = conv()
    site, x = conv_case(conv)
    tt = get("tt")
    top = tt.max_rank(site)
    for rank in {top, (1, 1, 1), sweep(top)[len(sweep(top)) // 2]}:
        check_costs(tt, site, rank, tt.build(site, rank), x)


def test_conv_stage_resolutions():
    site, _ = conv_case(nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2)), (11, 13))
    assert site.out_size == (6, 13)
    first, height, width, last = get("tt").stages(site, (2, 3, 5))
    assert first.macs == 4 * 2 * 11 * 13
    assert height.macs == 2 * 3 * 3 * 6 * 13
    assert width.macs == 3 * 5 * 5 * 6 * 13
    assert last.macs == 5 * 6 * 6 * 13 and last.params == 5 * 6 + 6


# -- per-rank fits (tt) ---------------------------------------------------------------------------
def test_tt_linear_module_applies_its_cores():
    layer, site, x = linear_case(24, 30, (3,))
    tt = get("tt")
    ins, outs = factor_dims(24, 3), factor_dims(30, 3)
    for rank in [(1, 1), (3, 2), (7, 4), (20, 1)]:
        factors = tt.decompose(layer.weight, site, rank)
        cores = [factors[f"core{k}"] for k in range(3)]
        expected = F.linear(x, tt_linear_weight(cores, ins, outs), layer.bias)
        assert rel_err(tt.build(site, rank, factors, layer.bias)(x), expected) < 1e-5


def test_tt_conv_module_applies_its_cores():
    conv = nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), padding_mode="reflect")
    site, x = conv_case(conv)
    tt = get("tt")
    for rank in [(1, 1, 1), (2, 5, 3), (4, 3, 6)]:
        f = tt.decompose(conv.weight, site, rank)
        weight = torch.einsum("sa,ahb,bwc,ct->tshw", f["core0"][0], f["core1"], f["core2"],
                              f["core3"][:, :, 0])
        module = tt.build(site, rank, f, conv.bias)
        assert rel_err(module(x), dense_conv(conv, weight, x)) < 1e-5


def test_tt_at_a_rank_is_tt_svd_not_a_slice_of_the_largest():
    # TT-SVD at a small rank re-factors what the first truncation leaves; slicing the cores
    # of the maximal rank does not, and fits worse (why tt is decomposed per rank)
    torch.manual_seed(0)
    layer, site, _ = linear_case(10, 64, bias=False)
    w, tt = layer.weight.double(), get("tt")
    full = tt.decompose(layer.weight, site, tt.max_rank(site))
    for rank in [(1, 1), (2, 2)]:
        f = tt.decompose(layer.weight, site, rank)
        assert tuple(f["core0"].shape[-1:]) + tuple(f["core1"].shape[-1:]) == rank
        fresh = rel_err(built_weight(tt.build(site, rank, f), site), w)
        cut = {"core0": full["core0"][..., : rank[0]],
               "core1": full["core1"][: rank[0], ..., : rank[1]],
               "core2": full["core2"][: rank[1]]}
        sliced = rel_err(built_weight(tt.build(site, rank, cut), site), w)
        assert fresh < sliced - 1e-3


def test_tt_two_modes_is_eckart_young():
    layer, site, _ = linear_case(48, 20)
    tt = TT(2)
    w = layer.weight.double()
    sv = torch.linalg.svdvals(matrix_tensor(w, factor_dims(48, 2), factor_dims(20, 2)))
    for r in (1, 5, 17):
        module = tt.build(site, (r,), tt.decompose(layer.weight, site, (r,)))
        err = (built_weight(module, site) - w).norm()
        assert err.item() == pytest.approx(sv[r:].norm().item(), rel=1e-5)


@pytest.mark.parametrize("method", ["tt", "tr"])
def test_factors_of_another_rank_are_refused(method):
    layer, site, _ = linear_case(24, 30)
    fac = get(method)
    factors = fac.decompose(layer.weight, site, (2, 2) if method == "tt" else (2, 2, 4))
    for other in ([(1, 2), (4, 2)] if method == "tt" else [(1, 2, 4), (2, 2, 5)]):
        with pytest.raises(InvalidRankError, match=r"not sliceable.*decompose at this rank"):
            fac.build(site, other, factors)
    with pytest.raises(InvalidRankError, match="not sliceable"):
        fac.slice(factors, site, other)


def test_zero_padded_bonds_add_nothing():
    # 64×64 in 3 modes: dims (16, 16, 16). At r = (1, 1, 64) the second unfolding is 16×16,
    # so 48 of the 64 bonds are padding; the function is that of (1, 1, 16).
    layer, site, x = linear_case(64, 64)
    tr = get("tr")
    padded = tr.build(site, (1, 1, 64), tr.decompose(layer.weight, site, (1, 1, 64)), layer.bias)
    plain = tr.build(site, (1, 1, 16), tr.decompose(layer.weight, site, (1, 1, 16)), layer.bias)
    assert rel_err(padded(x), plain(x)) < 1e-6
    conv = nn.Conv2d(3, 8, 3)  # modes (3, 3, 3, 8): r2 ≤ r1·3
    site, x = conv_case(conv)
    tt = get("tt")
    a = tt.build(site, (1, 9, 8), tt.decompose(conv.weight, site, (1, 9, 8)), conv.bias)
    b = tt.build(site, (1, 3, 8), tt.decompose(conv.weight, site, (1, 3, 8)), conv.bias)
    assert rel_err(a(x), b(x)) < 1e-6


# -- rebuilding the architecture -----------------------------------------------------------------
@pytest.mark.parametrize("case", ["tt-linear", "tr-linear", "tt-conv", "tt-conv-nobias"])
def test_state_dict_round_trip(case):
    method = case[:2]
    if "conv" in case:
        conv = nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), bias="nobias" not in case)
        site, x = conv_case(conv)
        weight, bias = conv.weight, conv.bias
    else:
        layer, site, x = linear_case(24, 30, (3,))
        weight, bias = layer.weight, layer.bias
    fac = get(method)
    rank = sweep(fac.max_rank(site))[2]
    built = fac.build(site, rank, fac.decompose(weight, site, rank), bias)
    fresh = fac.build(site, rank)
    assert not torch.equal(fresh(x), built(x))
    fresh.load_state_dict(built.state_dict())
    assert torch.equal(fresh(x), built(x))


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["tt-linear", "tr-linear", "tt-conv"])
def test_invalid_ranks(case):
    method = case[:2]
    if "conv" in case:
        layer: nn.Module = nn.Conv2d(4, 6, 3)
        site = Site.from_module("l", layer, (8, 8), (6, 6))
    else:
        layer, site, _ = linear_case(24, 30)
    fac = get(method)
    top = fac.max_rank(site)
    fac.normalize_rank(site, top)
    too_big = (*top[:-1], top[-1] + 1)
    for bad in (0, (*top[:-1], 0), too_big, top[:-1], (*top, 1), 10**6):
        for call in (fac.stages, fac.build, lambda s, r: fac.decompose(layer.weight, s, r)):
            with pytest.raises(InvalidRankError):
                call(site, bad)


def test_not_admitted():
    site, _ = conv_case(nn.Conv2d(4, 6, 3))
    with pytest.raises(NotAdmittedError):
        get("tr").stages(site, 1)
    with pytest.raises(NotAdmittedError):
        get("tr").build(site, 1)
    grouped, _ = conv_case(nn.Conv2d(4, 6, 3, groups=2))
    tt = get("tt")
    for call in (
        lambda s: tt.stages(s, 1),
        lambda s: tt.build(s, 1),
        lambda s: tt.decompose(torch.zeros(s.weight_shape), s, 1),
    ):
        with pytest.raises(NotAdmittedError):
            call(grouped)
    assert "grouped convolutions (groups=2)" in tt.admits(grouped)
    assert "not conv2d" in get("tr").admits(site)


def test_not_admitted_names_the_methods_that_admit_the_conv():
    site = Site.from_module("conv", nn.Conv2d(4, 6, 3))  # not discovered: no methods listed
    with pytest.raises(NotAdmittedError) as info:
        get("tr").check(site)
    message = str(info.value)
    assert "tr applies to linear layers, not conv2d" in message
    listed = message.split("The methods that admit it are ")[1].rstrip(".").split(", ")
    conv_methods = {"svd", "svd_spatial", "tucker2", "tt", "cp3", "cp4", "cp3_tpm", "cp4_tpm"}
    assert conv_methods <= set(listed) and "tr" not in listed
    assert listed == [m for m in available() if get(m).admits(site) is None]


def test_bad_weight_and_bias():
    layer, site, _ = linear_case(24, 30, bias=False)
    tt = get("tt")
    with pytest.raises(ValueError, match="does not fit"):
        tt.decompose(layer.weight.T, site, 1)
    with pytest.raises(ValueError, match="no bias"):
        tt.build(site, 1, bias=torch.zeros(30))


@pytest.mark.parametrize("method", ["tt", "tr"])
def test_empty_and_unbatched_inputs(method):
    layer, site, _ = linear_case(24, 30)
    fac = get(method)
    rank = fac.max_rank(site)
    module = fac.build(site, rank, fac.decompose(layer.weight, site, rank), layer.bias)
    assert module(torch.zeros(0, 24)).shape == (0, 30)
    x = torch.randn(24)
    assert rel_err(module(x), layer(x)) < 1e-4
