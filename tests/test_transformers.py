"""Transformer layers: nn.MultiheadAttention projections as sites, FactorizedAttention against
the dense attention, torch's encoder/decoder layers on and off their fast paths, exact costs,
and example inputs of every kind."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_error
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import ranksearch as rs
from ranksearch.config import Choice, Config
from ranksearch.errors import InputShapeError, UnknownLayerError
from ranksearch.factorize.attention import FactorizedAttention
from ranksearch.inputs import call

E, HEADS, L = 16, 4, 6


class Attend(nn.Module):
    """One attention call on (query, key, value); cross-attention when ``source`` is given."""

    def __init__(self, need_weights: bool = False, **options) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, **options)
        self.need_weights = need_weights

    def forward(self, x, source=None, **masks):
        source = x if source is None else source
        out, weights = self.attn(x, source, source, need_weights=self.need_weights, **masks)
        return out if weights is None else (out, weights)


class ViT(nn.Module):
    """Patch embedding, a 2-layer nn.TransformerEncoder, mean pooling and a head."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Conv2d(3, E, 4, stride=4)
        layer = nn.TransformerEncoderLayer(E, HEADS, 32, dropout=0.1, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first)
        self.head = nn.Linear(E, 5)

    def forward(self, x, mask=None):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x if self.batch_first else x.transpose(0, 1)
        x = self.encoder(x, src_key_padding_mask=mask)
        x = x if self.batch_first else x.transpose(0, 1)
        return self.head(x.mean(1))


def counted(model: nn.Module, inputs, batch: int) -> int:
    """MACs per sample of one call of ``model`` by `FlopCounterMode`, off the fast paths of
    torch's transformer layers (their fused kernels are invisible to it; a compressed model
    does not take them anyway)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call(model, inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    flops = counter.get_total_flops()
    assert flops % (2 * batch) == 0
    return flops // (2 * batch)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def mixed(space: rs.RankSpace) -> Config:
    """Every other site at a third of its largest rank."""
    choices = {}
    for name in space.names[::2]:
        method = space.site(name).methods[0]
        grid = space.ranks(name, method)
        choices[name] = Choice(method, grid[len(grid) // 3])
    return Config(choices)


# -- MultiheadAttention -------------------------------------------------------------------------
def test_attention_projections_are_sites() -> None:
    torch.manual_seed(0)
    model = Attend(batch_first=True)
    x = torch.randn(1, L, E)
    space = rs.RankSpace.discover(model, (x, torch.randn(1, 9, E)))
    names = [s.name for s in space.sites]
    assert names == ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"]
    q, k, v, out = space.sites
    assert (q.in_features, q.out_features, q.in_size) == (E, E, (L,))
    assert (k.in_size, v.in_size, out.in_size) == ((9,), (9,), (L,))  # cross-attention lengths
    assert all(s.decomposable and s.calls == 1 for s in space.sites)
    assert sum(s.dense_params for s in space.sites) == n_params(model) == space.model_params


CASES = {
    "self": ({}, {}),
    "batch_first": ({"batch_first": True}, {}),
    "bool_masks": ({"batch_first": True}, {"attn_mask": True, "key_padding_mask": True}),
    "float_mask": ({}, {"attn_mask": "float"}),
    "causal": ({"batch_first": True}, {"attn_mask": True, "is_causal": True}),
    "bias_kv_zero_attn": ({"add_bias_kv": True, "add_zero_attn": True},
                          {"key_padding_mask": True}),
    "kdim_vdim": ({"kdim": 8, "vdim": 12}, {}),
    "no_bias": ({"bias": False, "batch_first": True}, {"key_padding_mask": True}),
}


def masks(spec: dict, batch: int, tgt: int, src: int) -> dict:
    out = {}
    if spec.get("attn_mask") is True:
        out["attn_mask"] = torch.ones(tgt, src, dtype=torch.bool).triu(1)
    elif spec.get("attn_mask") == "float":
        out["attn_mask"] = torch.randn(tgt, src)
    if spec.get("key_padding_mask"):
        pad = torch.zeros(batch, src, dtype=torch.bool)
        pad[1, src - 2:] = True
        out["key_padding_mask"] = pad
    if spec.get("is_causal"):
        out["is_causal"] = True
    return out


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_full_rank_attention_equals_dense(case: str, need_weights: bool) -> None:
    torch.manual_seed(0)
    options, mask_spec = CASES[case]
    model = Attend(need_weights, **options).eval()
    if options.get("bias", True):
        with torch.no_grad():  # non-zero biases, so that misplaced ones show
            model.attn.in_proj_bias.normal_()
            model.attn.out_proj.bias.normal_()
    bf = options.get("batch_first", False)
    kdim, vdim = options.get("kdim", E), options.get("vdim", E)
    shape = (lambda n, d: (2, n, d)) if bf else (lambda n, d: (n, 2, d))
    x = torch.randn(*shape(L, E))
    if kdim == E == vdim:
        source = x
        call = (x,)
    else:  # separate key and value inputs
        source = (torch.randn(*shape(7, kdim)), torch.randn(*shape(7, vdim)))
        model.forward = lambda x, k, v, **m: model.attn(x, k, v, need_weights=need_weights, **m)
        call = (x, *source)
    src = L if source is x else 7
    given = masks(mask_spec, 2, L, src)
    space = rs.RankSpace.discover(model, call)
    compressed = rs.compress(model, space.full())
    attn = compressed.get_submodule("attn")
    assert isinstance(attn, FactorizedAttention)
    assert isinstance(attn.q_proj, nn.Sequential)  # factorized, at full rank
    with torch.no_grad():
        ref, got = model(*call, **given), compressed(*call, **given)
    refs = ref if isinstance(ref, tuple) else (ref,)
    gots = got if isinstance(got, tuple) else (got,)
    assert len(refs) == len(gots)
    for r, g in zip(refs, gots, strict=True):
        if r is None:
            assert g is None
            continue
        assert g.shape == r.shape
        assert torch.allclose(g, r, atol=1e-5, rtol=1e-5)


def test_unbatched_and_per_head_weights() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS).eval()
    fact = FactorizedAttention(mha, {})
    x = torch.randn(L, E)
    with torch.no_grad():
        for kw in ({"need_weights": False}, {"average_attn_weights": False}):
            ref, got = mha(x, x, x, **kw), fact(x, x, x, **kw)
            assert torch.allclose(got[0], ref[0], atol=1e-6)
            assert (got[1] is None) == (ref[1] is None)
            if ref[1] is not None:
                assert got[1].shape == ref[1].shape == (HEADS, L, L)
                assert torch.allclose(got[1], ref[1], atol=1e-6)
    with pytest.raises(ValueError, match="unknown attention projection"):
        FactorizedAttention(mha, {"query": nn.Identity()})


@pytest.mark.parametrize("need_weights", [False, True])
def test_dropout_in_training_matches_dense(need_weights: bool) -> None:
    torch.manual_seed(0)
    model = Attend(need_weights, dropout=0.3, batch_first=True).train()
    x = torch.randn(2, L, E)
    compressed = rs.compress(model, rs.RankSpace.discover(model, x).full())
    torch.manual_seed(1)
    ref = model(x)
    torch.manual_seed(1)
    got = compressed(x)
    for r, g in zip(ref if need_weights else (ref,), got if need_weights else (got,),
                    strict=True):
        assert torch.allclose(g, r, atol=1e-5)
    torch.manual_seed(2)
    assert not torch.allclose(compressed(x)[0], got[0])  # dropout is active


def test_low_rank_projections_are_truncated_svds() -> None:
    torch.manual_seed(0)
    model = Attend(batch_first=True).eval()
    x = torch.randn(2, L, E)
    space = rs.RankSpace.discover(model, x)
    config = Config({"attn.q_proj": Choice("svd", 3), "attn.k_proj": Choice("svd", 5),
                     "attn.v_proj": Choice("svd", 9), "attn.out_proj": Choice("svd", 4)})
    compressed = rs.compress(model, config, cache=rs.FactorCache(model, space))
    attn, e = compressed.attn, E
    packed = model.attn.in_proj_weight.detach().double()
    dense = {"q_proj": packed[:e], "k_proj": packed[e:2 * e], "v_proj": packed[2 * e:],
             "out_proj": model.attn.out_proj.weight.detach().double()}
    for name, weight in dense.items():
        rank = config[f"attn.{name}"].rank
        first, second = getattr(attn, name)
        product = (second.weight @ first.weight).double()
        u, s, vh = torch.linalg.svd(weight)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert rel_error(product, best) < 1e-5
        # the Eckart–Young error: the norm of the discarded singular values
        expected = (s[rank:].norm() / s.norm()).item()
        assert rel_error(product, weight) == pytest.approx(expected, rel=1e-4)
        assert torch.equal(second.bias, _bias(model.attn, name))


def _bias(mha: nn.MultiheadAttention, name: str) -> torch.Tensor:
    if name == "out_proj":
        return mha.out_proj.bias
    i = ("q_proj", "k_proj", "v_proj").index(name)
    return mha.in_proj_bias[i * E:(i + 1) * E]


# -- torch's transformer layers -----------------------------------------------------------------
@pytest.fixture(scope="module", params=[True, False], ids=["batch_first", "seq_first"])
def vit(request) -> tuple[ViT, torch.Tensor, rs.RankSpace]:
    torch.manual_seed(0)
    model = ViT(request.param).eval()
    x = torch.randn(2, 3, 16, 16)
    return model, x, rs.RankSpace.discover(model, x[:1])


def test_encoder_sites_are_found(vit) -> None:
    model, _, space = vit
    layer = "encoder.layers.0"
    expected = {f"{layer}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    assert expected | {f"{layer}.linear1", f"{layer}.linear2", "head"} <= set(space.names)
    assert space.site(f"{layer}.linear1").in_size == (16,)  # 16 tokens per sample
    assert space.site(f"{layer}.self_attn.out_proj").in_size == (16,)
    # every parameter outside the layer norms is in reach
    sited = sum(s.dense_params for s in space.decomposable)
    norms = sum(p.numel() for m in model.modules() if isinstance(m, nn.LayerNorm)
                for p in m.parameters())
    assert sited + norms == n_params(model)


def test_compressed_encoder_runs_in_every_mode(vit) -> None:
    model, x, space = vit
    compressed = rs.compress(model, mixed(space), cache=rs.FactorCache(model, space))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[1, 11:] = True
    for training in (True, False):
        compressed.train(training)
        compressed(x, mask).sum().backward()
        with torch.no_grad():
            assert compressed(x).shape == (2, 5)
            assert torch.isfinite(compressed(x, mask)).all()
        with torch.inference_mode():
            assert torch.isfinite(compressed(x, mask)).all()


def test_full_rank_encoder_equals_dense(vit) -> None:
    model, x, space = vit
    compressed = rs.compress(model, space.full()).eval()
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[1, 11:] = True
    keep = ~mask.unsqueeze(-1)
    with torch.inference_mode():  # the dense encoder takes its fast (nested) path here
        assert torch.allclose(compressed(x), model(x), atol=1e-5)
        tokens = model.embed(x).flatten(2).transpose(1, 2)
        if not model.batch_first:
            tokens = tokens.transpose(0, 1)
        ref = model.encoder(tokens, src_key_padding_mask=mask)
        got = compressed.encoder(tokens, src_key_padding_mask=mask)
        if not model.batch_first:
            ref, got = ref.transpose(0, 1), got.transpose(0, 1)
        # padded positions: zeros on the nested path, computed on the slow one
        assert torch.allclose(got * keep, ref * keep, atol=1e-5)


def test_only_feed_forward_factorized_takes_the_slow_path(vit) -> None:
    model, x, _ = vit
    config = Config({"encoder.layers.1.linear1": Choice("svd", 4)})
    compressed = rs.compress(model, config).eval()
    assert isinstance(compressed.encoder.layers[1].self_attn, nn.MultiheadAttention)
    assert model.encoder.layers[1].activation_relu_or_gelu  # the original is untouched
    with torch.inference_mode():
        assert compressed(x, torch.zeros(2, 16, dtype=torch.bool)).shape == (2, 5)


def test_decoder_layer_full_rank_equals_dense() -> None:
    torch.manual_seed(0)
    model = nn.TransformerDecoderLayer(E, HEADS, 32, batch_first=True).eval()
    tgt, memory = torch.randn(2, L, E), torch.randn(2, 9, E)
    space = rs.RankSpace.discover(model, (tgt, memory))
    assert {"self_attn.q_proj", "multihead_attn.k_proj", "linear2"} <= set(space.names)
    assert space.site("multihead_attn.k_proj").in_size == (9,)
    compressed = rs.compress(model, space.full())
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    with torch.no_grad():
        ref = model(tgt, memory, tgt_mask=causal, tgt_is_causal=True)
        assert torch.allclose(compressed(tgt, memory, tgt_mask=causal, tgt_is_causal=True), ref,
                              atol=1e-5)


# -- costs --------------------------------------------------------------------------------------
def test_costs_equal_the_built_vit(vit) -> None:
    model, x, space = vit
    cost = rs.CostModel(space)
    for config in (Config(), mixed(space), space.uniform(0.3)):
        compressed = rs.compress(model, config).eval()
        assert cost.params(config) == n_params(compressed)
        assert cost.macs(config) == counted(compressed, x, 2)


def test_attention_products_are_priced() -> None:
    """With need_weights the scores are bmm products FlopCounterMode counts: the space holds
    them as other_macs, so the whole forward pass is priced exactly."""
    torch.manual_seed(0)
    model = Attend(need_weights=True, batch_first=True).eval()
    x = torch.randn(3, L, E)
    space = rs.RankSpace.discover(model, x[:1])
    assert space.other_macs == 2 * L * L * E  # q·kᵀ and weights·v
    cost = rs.CostModel(space)
    config = Config({"attn.v_proj": Choice("svd", 2), "attn.out_proj": Choice("svd", 3)})
    assert cost.macs(config) == counted(rs.compress(model, config), x, 3)
    assert sum(r["macs"] for r in cost.table(config)) == cost.macs(config) - space.other_macs
    assert rs.RankSpace.from_json(space.to_json()).other_macs == space.other_macs


def test_save_and_load_round_trip(vit, tmp_path) -> None:
    model, x, space = vit
    config = mixed(space)
    compressed = rs.compress(model, config).eval()
    rs.save(tmp_path / "vit.pt", compressed, config)
    loaded, read = rs.load(tmp_path / "vit.pt", ViT(model.batch_first))
    assert read == config
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), compressed(x))


# -- inputs of every kind -----------------------------------------------------------------------
class TinyLM(nn.Module):
    """Token ids → embedding → causal encoder layer → tied head; takes a padding mask."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, E)
        self.block = nn.TransformerEncoderLayer(E, HEADS, 32, batch_first=True, dropout=0.0)
        self.lm_head = nn.Linear(E, 50, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, input_ids, attention_mask=None):
        pad = None if attention_mask is None else attention_mask == 0
        causal = nn.Transformer.generate_square_subsequent_mask(input_ids.shape[1])
        h = self.block(self.embed(input_ids), src_mask=causal, src_key_padding_mask=pad,
                       is_causal=True)
        return self.lm_head(h)


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict"])
def test_token_ids_as_tensor_tuple_or_dict(kind: str) -> None:
    torch.manual_seed(0)
    model = TinyLM().eval()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    example = {"tensor": ids, "tuple": (ids, mask),
               "dict": {"input_ids": ids, "attention_mask": mask}}[kind]
    space = rs.RankSpace.discover(model, example)
    assert space.site("block.self_attn.q_proj").in_size == (7,)
    assert "lm_head" not in space.names
    assert "tied to embed.weight" in space.site("lm_head").reason
    config = mixed(space)
    compressed = rs.compress(model, config)
    assert rs.CostModel(space).macs(config) == counted(compressed, example, 2)
    with torch.no_grad():
        assert call(compressed, example).shape == (2, 7, 50)
    assert rs.measure_latency(compressed, example, warmup=0, repeats=1) > 0


def test_float_input_to_a_token_model_names_the_fix() -> None:
    with pytest.raises(InputShapeError, match="integer tensor") as info:
        rs.RankSpace.discover(TinyLM(), torch.zeros(1, 7))
    assert "tensor (1, 7) float32" in str(info.value)
    with pytest.raises(InputShapeError, match="dict input_ids: \\(1, 7\\) int64"):
        rs.RankSpace.discover(TinyLM(), {"input_ids": torch.zeros(1, 7, dtype=torch.long),
                                         "bogus": 1})
    with pytest.raises(InputShapeError, match="batched tensor"):
        rs.RankSpace.discover(TinyLM(), {"input_ids": 3})


def test_unknown_projection_name_is_refused() -> None:
    model = Attend()
    with pytest.raises(UnknownLayerError, match=r"attn\.q_proj"):
        rs.compress(model, Config({"attn.query": Choice("svd", 2)}))
