"""Hugging Face models from tiny configs (random weights, nothing downloaded): GPT-2's Conv1D
layers as linear sites, BERT and GPT-2 discovered from dict inputs, exact costs of the built
models, and the save round trip (save_pretrained refuses; ranksearch.save/load work)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import ranksearch as rs
from ranksearch.config import Choice, Config
from ranksearch.errors import ExportError
from ranksearch.site import Site

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

TINY = {"vocab_size": 64, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, **TINY)
    return transformers.GPT2LMHeadModel(config).eval()


def bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, **TINY)
    return transformers.BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": torch.randint(1, 64, (2, 8)), "attention_mask": mask}


def first(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v[:1] for k, v in batch.items()}


def counted(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**batch)
    return counter.get_total_flops() // (2 * batch["input_ids"].shape[0])


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def mixed(space: rs.RankSpace) -> Config:
    return Config({n: Choice("svd", space.ranks(n, "svd")[len(space.ranks(n, "svd")) // 3])
                   for n in space.names[::2]})


def test_conv1d_site_is_a_transposed_linear() -> None:
    torch.manual_seed(0)
    layer = Conv1D(24, 10)  # nf=24 outputs, nx=10 inputs: weight 10 × 24
    nn.init.normal_(layer.bias)
    site = Site.from_module("fc", layer)
    assert (site.kind, site.in_features, site.out_features, site.bias) == ("linear", 10, 24, True)
    model = nn.Sequential(layer)
    x = torch.randn(3, 5, 10)
    space = rs.RankSpace.discover(model, x)
    assert space.site("0").in_size == (5,)
    full = rs.compress(model, Config({"0": Choice("svd", 10)}))
    low = rs.compress(model, Config({"0": Choice("svd", 4)}))
    with torch.no_grad():
        assert torch.allclose(full(x), layer(x), atol=1e-5)
        first, second = low[0]
        product = second.weight @ first.weight
        u, s, vh = torch.linalg.svd(layer.weight.T.double())
        best = (u[:, :4] * s[:4]) @ vh[:4]
        assert ((product.double() - best).norm() / best.norm()).item() < 1e-5
        assert torch.equal(second.bias, layer.bias)


def test_gpt2_sites_costs_and_outputs(batch) -> None:
    model = gpt2()
    space = rs.RankSpace.discover(model, first(batch))
    block = "transformer.h.0"
    assert {f"{block}.attn.c_attn", f"{block}.attn.c_proj", f"{block}.mlp.c_fc",
            f"{block}.mlp.c_proj"} <= set(space.names)
    assert (space.site(f"{block}.attn.c_attn").in_features,
            space.site(f"{block}.attn.c_attn").out_features) == (32, 96)
    assert "tied to transformer.wte.weight" in space.site("lm_head").reason
    cost = rs.CostModel(space)
    config = mixed(space)
    compressed = rs.compress(model, config, cache=rs.FactorCache(model, space))
    assert cost.params(config) == n_params(compressed)
    assert cost.macs(config) == counted(compressed, batch)
    assert cost.macs(Config()) == counted(model, batch)
    with torch.no_grad():
        out = compressed(**batch)
        full = rs.compress(model, space.full())(**batch)
        ref = model(**batch)
    assert isinstance(out, transformers.modeling_outputs.CausalLMOutputWithCrossAttentions)
    assert out.logits.shape == (2, 8, 64)
    assert torch.allclose(full.logits, ref.logits, atol=1e-4)


def test_bert_sites_costs_and_outputs(batch) -> None:
    model = bert()
    space = rs.RankSpace.discover(model, first(batch))
    attention = "bert.encoder.layer.0.attention"
    assert {f"{attention}.self.query", f"{attention}.self.key", f"{attention}.self.value",
            f"{attention}.output.dense", "bert.encoder.layer.1.intermediate.dense",
            "classifier"} <= set(space.names)
    cost = rs.CostModel(space)
    config = mixed(space)
    compressed = rs.compress(model, config)
    assert cost.params(config) == n_params(compressed)
    assert cost.macs(config) == counted(compressed, batch)
    with torch.no_grad():
        out = compressed(**batch)
        full = rs.compress(model, space.full())(**batch)
        ref = model(**batch)
    assert isinstance(out, transformers.modeling_outputs.SequenceClassifierOutput)
    assert torch.allclose(full.logits, ref.logits, atol=1e-5)


def test_save_pretrained_refuses_and_ranksearch_save_round_trips(batch, tmp_path) -> None:
    model = gpt2()
    space = rs.RankSpace.discover(model, first(batch))
    config = mixed(space)
    compressed = rs.compress(model, config)
    with pytest.raises(ExportError, match=r"ranksearch\.save\(path, model, config\)"):
        compressed.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    model.save_pretrained(tmp_path / "dense")  # the dense model is untouched
    rs.save(tmp_path / "gpt2.pt", compressed, config)
    loaded, read = rs.load(tmp_path / "gpt2.pt", gpt2())
    assert read == config
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**batch).logits, compressed(**batch).logits)
