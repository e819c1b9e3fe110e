"""Relative-position attention through SDPA's kernels, for ESPnet's ``RelPositionMultiHeadedAttention`` and
``LegacyRelPositionMultiHeadedAttention`` (``rel_selfattn``, the Conformer and E-Branchformer default).

``forward(module, query, key, value, pos_emb, mask)`` computes what the module's own forward computes, on the
module's own parameters and through its own ``forward_qkv``, ``linear_pos``, ``rel_shift`` and ``linear_out``:
softmax((q + u) k^T / sqrt(d_k) + rel_shift((q + v) p^T) / sqrt(d_k)) V. The first term is SDPA's own score; the
positional one depends on the query, not only on the two indices, so it enters as SDPA's additive float bias, with
the padding folded in as the dtype's minimum (the design of ESPnet 202611's own ``use_sdpa`` path, which 202511
lacks; this one serves both, and skips the (q + u) k^T product that 202611's computes and throws away).

Memory: the bias is (batch, head, time, time), the size of the attention matrix, and SDPA keeps its input for the
backward: 72 MiB per layer in fp32 at batch 8 x 30 s, 4 heads. On CUDA, where the memory-efficient kernel runs,
``_LeanBias`` keeps (q + v) and p instead and rebuilds the bias in the backward, so no time x time tensor outlives
its layer's forward. It builds the bias in one pass: for ``RelPositionMultiHeadedAttention`` (``rel_pos_type:
latest``, without ``zero_triu``) ``rel_shift`` of a (time, 2 time - 1) matrix is the strided view ``x[i, j + time - 1
- i]`` (checked against the module's own ``rel_shift`` once per class), and its backward is the same view of the
gradient; it calls the kernel's forward and backward ops directly (their schema has been stable since torch 2.1).
Where it cannot run (CPU, the legacy variant, ``zero_triu``, deterministic algorithms, a shape the kernel refuses)
the bias goes to ``scaled_dot_product_attention`` whole: one log line says so, once per reason.

Numerics: the same sums in another order (a fused softmax; the positional term added after the scaling), so fp32
outputs and gradients agree with the stock module to ~1e-6 relative; fp64 to ~1e-15. Attention dropout is SDPA's
``dropout_p`` at the module's ``dropout_rate``, in training only; ``_LeanBias`` replays the kernel's own dropout
in the backward (its philox seed and offset). As on ESPnet's SDPA paths, ``module.attn`` (the weights, for plots)
is not materialised.
"""

import logging
import math
from typing import Optional

import torch

from espnet_flashcompat.s3prl.errors import one_line

logger = logging.getLogger(__name__)

_ALIGN = 16  # the memory-efficient kernel wants the bias's rows to start on 16-element boundaries (as torch pads it)
_said = set()


def forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pos_emb: torch.Tensor,
            mask) -> torch.Tensor:
    """The relative-position attention of ``module`` (an ESPnet rel-pos attention) on SDPA; shapes as its forward."""
    q, k, v = module.forward_qkv(query, key, value)  # (batch, head, time1, d_k), (batch, head, time2, d_k) x2
    q = q.transpose(1, 2)  # (batch, time1, head, d_k): the per-head biases broadcast over the last two dims
    p = module.linear_pos(pos_emb).view(pos_emb.size(0), -1, module.h, module.d_k).transpose(1, 2)
    q_u = (q + module.pos_bias_u).transpose(1, 2)  # (batch, head, time1, d_k)
    q_v = (q + module.pos_bias_v).transpose(1, 2)
    # One dtype for the kernels: under autocast, q + an fp32 bias is fp32 while k and v are not
    dtype = _compute_dtype(q_u, k, v)
    q_u, k, v, q_v, p = (t.to(dtype) for t in (q_u, k, v, q_v, p))
    pad = None if mask is None else mask.unsqueeze(1).eq(0)  # (batch, 1, 1 or time1, time2), True = padding
    dropout_p = module.dropout_rate if module.training else 0.0
    out = None
    if _lean_possible(module, q_u, k, p):
        try:
            out = _LeanBias.apply(q_u, k, v, q_v, p, pad, dropout_p)
        except RuntimeError as exc:  # the kernel refuses this shape or dtype: the plain path below serves it
            if "out of memory" in str(exc):
                raise
            _say_once(f"the memory-efficient kernel refused {tuple(q_u.shape)} {q_u.dtype} ({one_line(exc)})")
    if out is None:
        with torch.autocast(q_u.device.type, enabled=False):
            bias = module.rel_shift(torch.matmul(q_v, p.transpose(-2, -1))) / math.sqrt(module.d_k)
            if pad is not None:
                bias = bias.masked_fill(pad, torch.finfo(bias.dtype).min)
            out = torch.nn.functional.scaled_dot_product_attention(q_u, k, v, bias, dropout_p=dropout_p)
    out = out.transpose(1, 2).reshape(out.size(0), out.size(2), -1)  # (batch, time1, d_model)
    return module.linear_out(out)


def _compute_dtype(*tensors) -> torch.dtype:
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _shifted(x: torch.Tensor) -> torch.Tensor:
    """``rel_shift`` of x (batch, head, time, 2 time - 1), contiguous, as a view: x[..., i, j + time - 1 - i]."""
    b, h, t, w = x.shape
    return x.as_strided((b, h, t, t), (h * t * w, t * w, w - 1, 1), x.storage_offset() + t - 1)


_SHIFT_IS_VIEW: dict = {}


def _shift_is_view(module) -> bool:
    """Whether ``module.rel_shift`` is ``_shifted``, tried once per class on a small matrix."""
    key = (type(module), bool(getattr(module, "zero_triu", False)))
    if key not in _SHIFT_IS_VIEW:
        x = torch.randn(2, 3, 5, 9)
        try:
            _SHIFT_IS_VIEW[key] = torch.equal(module.rel_shift(x), _shifted(x))
        except RuntimeError:  # another shape convention (the legacy variant)
            _SHIFT_IS_VIEW[key] = False
    return _SHIFT_IS_VIEW[key]


def _lean_possible(module, q: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> bool:
    if q.device.type != "cuda":
        return False
    if not _shift_is_view(module):
        _say_once(f"{type(module).__name__}'s rel_shift{' with zero_triu' if module.zero_triu else ''} is not "
                  f"a view of its input")
        return False
    if torch.are_deterministic_algorithms_enabled():
        _say_once("deterministic algorithms are on; the memory-efficient kernel's backward is not deterministic")
        return False
    return q.size(2) == k.size(2) and p.size(2) == 2 * k.size(2) - 1 and p.size(0) in (1, q.size(0))


def _say_once(why: str) -> None:
    if why not in _said:
        _said.add(why)
        logger.info("espnet-flashcompat: relative-position attention keeps its bias for the backward: %s", why)


def _bias(q_v: torch.Tensor, p: torch.Tensor, pad: Optional[torch.Tensor]) -> torch.Tensor:
    """rel_shift((q + v) p^T) / sqrt(d_k), padding at the dtype's minimum, written once into rows aligned for the
    kernel (no autograd: ``_LeanBias`` differentiates it by hand)."""
    b, h, t = q_v.shape[:3]
    shifted = _shifted(torch.matmul(q_v, p.transpose(-2, -1)).contiguous())  # (batch, head, time, time)
    bias = q_v.new_empty(b, h, t, t + -t % _ALIGN)[..., :t]
    torch.mul(shifted, 1 / math.sqrt(q_v.size(-1)), out=bias)
    if pad is not None:
        bias.masked_fill_(pad, torch.finfo(bias.dtype).min)
    return bias


class _LeanBias(torch.autograd.Function):
    """SDPA (memory-efficient kernel) with the relative-position bias rebuilt in the backward instead of kept."""

    forward_op = torch.ops.aten._scaled_dot_product_efficient_attention
    backward_op = torch.ops.aten._scaled_dot_product_efficient_attention_backward

    @staticmethod
    def forward(ctx, q_u, k, v, q_v, p, pad, dropout_p):
        with torch.autocast(q_u.device.type, enabled=False):
            out, lse, seed, offset = _LeanBias.forward_op(q_u, k, v, _bias(q_v, p, pad), True, dropout_p)
        ctx.save_for_backward(q_u, k, v, q_v, p, pad, out, lse, seed, offset)
        ctx.dropout_p = dropout_p
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q_u, k, v, q_v, p, pad, out, lse, seed, offset = ctx.saved_tensors
        with torch.autocast(q_u.device.type, enabled=False):
            grad_q, grad_k, grad_v, grad_bias = _LeanBias.backward_op(
                grad_out, q_u, k, v, _bias(q_v, p, pad), out, lse, seed, offset, ctx.dropout_p, [True] * 4)
            if pad is not None:
                grad_bias = grad_bias.masked_fill(pad, 0)
            b, h, t, w = q_v.shape[:3] + p.shape[2:3]
            grad_x = grad_bias.new_zeros(b, h, t, w)  # the gradient of (q + v) p^T: rel_shift's view, scattered back
            _shifted(grad_x).copy_(grad_bias).mul_(1 / math.sqrt(q_v.size(-1)))
            grad_q_v = torch.matmul(grad_x, p)
            grad_p = torch.matmul(grad_x.transpose(-2, -1), q_v)
            if p.size(0) == 1 < grad_p.size(0):
                grad_p = grad_p.sum(0, keepdim=True)
        return grad_q, grad_k, grad_v, grad_q_v, grad_p, None, None
