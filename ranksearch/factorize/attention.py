"""Multi-head attention with its projections as modules, so that each can be factorized.

`nn.MultiheadAttention` holds its query, key and value projections as one packed weight
(``in_proj_weight``, 3E × E) or three (``q_proj_weight``, ``k_proj_weight``,
``v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``), and reads
``out_proj.weight`` directly, so no projection can be replaced on its own. Discovery lists them
as four linear sites (``attn.q_proj``, ``attn.k_proj``, ``attn.v_proj``, ``attn.out_proj``);
surgery replaces the attention module by a `FactorizedAttention` that calls the four
projections as modules and computes the rest exactly as `nn.MultiheadAttention` does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..clone import clone_module

#: The projections of an attention module, in the order discovery lists them.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def projection(mha: nn.MultiheadAttention, name: str) -> tuple[Tensor, Tensor | None]:
    """The weight (out × in) and bias of projection ``name`` (one of `PROJECTIONS`) of ``mha``:
    views of its packed or separate parameters."""
    if name == "out_proj":
        return mha.out_proj.weight, mha.out_proj.bias
    i, e = PROJECTIONS.index(name), mha.embed_dim
    if mha._qkv_same_embed_dim:
        weight = mha.in_proj_weight[i * e:(i + 1) * e]
    else:
        weight = getattr(mha, f"{name}_weight")
    bias = None if mha.in_proj_bias is None else mha.in_proj_bias[i * e:(i + 1) * e]
    return weight, bias


def dense_projection(mha: nn.MultiheadAttention, name: str) -> nn.Module:
    """Projection ``name`` of ``mha`` as a layer of its own, with copies of its weights."""
    if name == "out_proj":
        return clone_module(mha.out_proj)
    weight, bias = projection(mha, name)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                      device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.train(mha.training)


class FactorizedAttention(nn.Module):
    """`nn.MultiheadAttention` with ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` as
    modules (each a factorization or a dense `nn.Linear`).

    It takes the arguments of `nn.MultiheadAttention.forward` and returns what it returns:
    the same masks (boolean or float, ``is_causal``), ``need_weights`` and
    ``average_attn_weights``, ``batch_first``, ``add_bias_kv``/``add_zero_attn``, unbatched
    inputs, and dropout on the attention weights in training. With dense projections it
    computes exactly what the attention module it was made from computes (up to rounding).
    ``in_proj_weight`` and ``in_proj_bias`` are None: the packed projection is gone, so the
    fast paths of torch's transformer layers, which read them, are not taken.
    """

    in_proj_weight: Tensor | None = None
    in_proj_bias: Tensor | None = None

    def __init__(self, mha: nn.MultiheadAttention, projections: Mapping[str, nn.Module]) -> None:
        super().__init__()
        unknown = sorted(set(projections) - set(PROJECTIONS))
        if unknown:
            raise ValueError(f"unknown attention projection(s) {unknown}; "
                             f"the projections are {list(PROJECTIONS)}")
        self.embed_dim, self.kdim, self.vdim = mha.embed_dim, mha.kdim, mha.vdim
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim
        self.dropout, self.batch_first = mha.dropout, mha.batch_first
        self.add_zero_attn = mha.add_zero_attn
        for name in PROJECTIONS:
            module = projections.get(name)
            setattr(self, name, dense_projection(mha, name) if module is None else module)
        if mha.bias_k is not None:
            self.bias_k = nn.Parameter(mha.bias_k.detach().clone())
            self.bias_v = nn.Parameter(mha.bias_v.detach().clone())
        else:
            self.bias_k = self.bias_v = None
        self.train(mha.training)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        # the steps of nn.MultiheadAttention.forward and F.multi_head_attention_forward (slow
        # path), with the projections called as modules
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask,
                                        self.num_heads)
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
            target_type=query.dtype, check_other=False,
        )
        if self.batch_first and is_batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        if not is_batched:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        elif key_padding_mask is not None:
            is_causal = False
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        src_len = key.shape[0]
        if attn_mask is not None:
            expected = (tgt_len, src_len) if attn_mask.dim() == 2 else (
                bsz * heads, tgt_len, src_len)
            if attn_mask.dim() not in (2, 3) or attn_mask.shape != expected:
                raise RuntimeError(f"the attn_mask has shape {tuple(attn_mask.shape)}; it should "
                                   f"be {expected}")
            if attn_mask.dim() == 2:
                attn_mask = attn_mask.unsqueeze(0)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask, key_padding_mask = _pad(attn_mask), _pad(key_padding_mask)
        q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask, key_padding_mask = _pad(attn_mask), _pad(key_padding_mask)
        src_len = k.size(1)
        if key_padding_mask is not None:
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len)
                                .expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
            if attn_mask is not None:
                scores = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                scores = torch.bmm(q_scaled, k.transpose(-2, -1))
            scores = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                scores = F.dropout(scores, p=dropout_p)
            out = torch.bmm(scores, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            weights = scores.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            if attn_mask is not None:
                if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(bsz, heads, -1, src_len)
            out = F.scaled_dot_product_attention(
                q.view(bsz, heads, tgt_len, head_dim), k.view(bsz, heads, src_len, head_dim),
                v.view(bsz, heads, src_len, head_dim), attn_mask, dropout_p, is_causal,
            )
            out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = self.out_proj(out)
        out = out.view(tgt_len, bsz, out.size(1))
        if not is_batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(1, 0)
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"batch_first={self.batch_first}")


def _pad(mask: Tensor | None) -> Tensor | None:
    """``mask`` with one more (unmasked) key position, as for ``bias_k`` or a zero key."""
    return None if mask is None else F.pad(mask, (0, 1))
