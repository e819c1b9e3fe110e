"""Relative-position attention through ``scaled_dot_product_attention``, for ESPnet releases whose
``RelPositionMultiHeadedAttention`` / ``LegacyRelPositionMultiHeadedAttention`` have no ``use_sdpa`` path (202511).

``forward(module, query, key, value, pos_emb, mask)`` computes what the module's own forward computes, on the
module's own parameters and through its own ``forward_qkv``, ``linear_pos``, ``rel_shift`` and ``linear_out``:
softmax((q + u) k^T / sqrt(d_k) + rel_shift((q + v) p^T) / sqrt(d_k)) V. The first term is SDPA's own score;
the positional one depends on the query, not only on the two indices, so it enters as SDPA's additive float
``attn_mask``, with the padding folded in as the dtype's minimum. That is the design ESPnet 202611 adopted for its
own ``use_sdpa`` path: ``espnet_compat.has_native_rel_sdpa()`` says where that exists, and then this is not used.

Numerics: the same sums in another order (SDPA's fused softmax, the positional term added after rather than before
the scaling), so fp32 outputs and gradients agree with the stock module to ~1e-6 relative; fp64 to ~1e-15.
Attention dropout is SDPA's ``dropout_p``, at the module's ``dropout_rate``, in training only. As on ESPnet's own
SDPA paths, ``module.attn`` (the attention weights, for plots) is not materialised.
"""

import math

import torch


def forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pos_emb: torch.Tensor,
            mask) -> torch.Tensor:
    """The relative-position attention of ``module`` (an ESPnet rel-pos attention) on SDPA; shapes as its forward."""
    q, k, v = module.forward_qkv(query, key, value)  # (batch, head, time1, d_k), (batch, head, time2, d_k) x2
    q = q.transpose(1, 2)  # (batch, time1, head, d_k): the per-head biases broadcast over the last two dims
    p = module.linear_pos(pos_emb).view(pos_emb.size(0), -1, module.h, module.d_k).transpose(1, 2)
    q_u = (q + module.pos_bias_u).transpose(1, 2)  # (batch, head, time1, d_k)
    q_v = (q + module.pos_bias_v).transpose(1, 2)
    positional = module.rel_shift(torch.matmul(q_v, p.transpose(-2, -1))) / math.sqrt(module.d_k)
    if mask is not None:  # (batch, 1, time2) or (batch, time1, time2), nonzero = attend
        positional = positional.masked_fill(mask.unsqueeze(1).eq(0), torch.finfo(positional.dtype).min)
    # SDPA wants one dtype for q, k, v and a float mask: under autocast q_u (q + an fp32 bias) is fp32, k and v are not
    dtype = torch.promote_types(torch.promote_types(q_u.dtype, k.dtype), v.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(
        q_u.to(dtype), k.to(dtype), v.to(dtype), positional.to(dtype),
        dropout_p=module.dropout_rate if module.training else 0.0)  # (batch, head, time1, d_k)
    out = out.transpose(1, 2).reshape(out.size(0), out.size(2), -1)  # (batch, time1, d_model)
    return module.linear_out(out)
