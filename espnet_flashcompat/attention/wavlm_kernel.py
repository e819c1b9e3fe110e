"""The attention of S3PRL's WavLM with its gated relative-position bias, without keeping a (.., time, time) tensor:
the kernel half of ``attention.wavlm`` (which patches the modules and calls ``attend``), choosing among three paths.

``attend(q, k, v, gate, rel, pad, dropout_p)`` is softmax(q k^T / sqrt(head_dim) + bias) V with
bias[b, h, i, j] = gate[b, h, i] * rel[h, j - i + time - 1], -inf at padded keys. q, k, v: (batch, head, time,
head_dim); gate: (batch, head, time), the per-query factor of WavLM's ``gru_rel_pos`` (ones without it); rel: (head,
2 time - 1), the bias table's value for each distance j - i, from -(time - 1) to time - 1; pad: (batch, 1, 1, time),
True at padded keys, or None. Stock S3PRL builds the same bias in float32 as (batch x head, time, time) tensors, one
per layer, and autograd keeps each (plus its bf16 copy under autocast).

In fp16 and bf16 on CUDA (as under autocast) the fused Triton kernels serve (``wavlm_fused``: the bias and dropout
computed inside them; with gradients 0.53x the memory-efficient path's attention time on WavLM large's 30 s layers,
on an H200, docs/benchmarks.md); should they fail to build or launch, one warning and the path below serves the
process. Otherwise on CUDA (fp32), ``_GatedBias`` writes the bias once per layer in the query's dtype (``bias``),
calls the memory-efficient kernel's ops directly (as ``relpos_sdpa._LeanBias`` does; they take an additive bias and
return its gradient), keeps q, k, v, gate, rel, out and the logsumexp, rebuilds the bias in the backward and reduces
its gradient to gate's (a sum over keys) and rel's (sums along the diagonals of the gate-weighted sum over the
batch). No (.., time, time) tensor outlives a layer's forward. Without gradients only a forward runs: cuDNN's where
it takes the bias (fp16, bf16), else the memory-efficient kernel's. Elsewhere (CPU, deterministic algorithms, a
shape the kernel refuses) the bias is built with autograd and goes to ``scaled_dot_product_attention`` whole: the
call stock S3PRL makes through ``F.multi_head_attention_forward``, with the same inputs.

Dropout: SDPA's ``dropout_p`` on the attention probabilities, as stock passes it (the fused path: its own stated
equivalent, ``wavlm_fused``). On the plain path it is the same SDPA call on the same RNG stream as stock (the same
masks on CPU). With gradients, the kernel path draws its mask from the CUDA generator's philox state as the
memory-efficient kernel does when stock's SDPA call runs it (which it does for a bias that needs a gradient: the
same masks, tested), and replays it in the backward from the seed and offset it returned. Without gradients cuDNN
draws its own mask: the same distribution (Bernoulli(1 - p), scaled by 1 / (1 - p)), another stream.
"""

import logging
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from espnet_flashcompat.attention import wavlm_fused
from espnet_flashcompat.s3prl.errors import one_line

logger = logging.getLogger(__name__)

_ALIGN = 16  # the memory-efficient kernel wants the bias's rows to start on 16-element boundaries
_said = set()

FUSED = "fused-kernel"  # the bias computed inside Triton kernels (wavlm_fused)
KERNEL = "efficient-kernel"  # the bias rebuilt in the backward
PLAIN = "sdpa-with-bias"  # the bias materialised and kept by autograd


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, rel: torch.Tensor,
           pad: Optional[torch.Tensor], dropout_p: float, memo: Optional[dict] = None,
           flat: Optional[Tuple[int, int]] = None):
    """(output (batch, head, time, head_dim), FUSED, KERNEL or PLAIN): the path that served the call. ``memo``: where
    the layers of one forward keep what they share; ``flat``: the runs of distances that read one table entry
    (``wavlm_fused.prepare``)."""
    if kernel_possible(q, k, v):
        key = (q.dtype, q.size(-1), q.device.index)
        if USE_FUSED and key not in _FUSED_REFUSED and wavlm_fused.takes(q):
            try:
                prepared = _prepared(memo, rel, pad, q, flat)
                return wavlm_fused.attend(q, k, v, gate, rel, pad, dropout_p, prepared), FUSED
            except Exception as exc:  # noqa: BLE001 - a Triton build or launch failure: the kernels below serve
                if "out of memory" in str(exc):
                    raise
                _FUSED_REFUSED.add(key)
                logger.warning("espnet-flashcompat: WavLM attention: the fused Triton kernel failed on %s %s (%s); "
                               "SDPA's memory-efficient kernel serves it, slower. Fix: check that Triton matches "
                               "torch (pip show triton)", tuple(q.shape), q.dtype, one_line(exc))
        try:
            if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, gate, rel)):
                return _GatedBias.apply(q, k, v, gate, rel, pad, dropout_p), KERNEL
            with torch.autocast(q.device.type, enabled=False):
                return _forward_only(q, k, v, bias(gate, rel, pad, q.dtype), dropout_p), KERNEL
        except RuntimeError as exc:  # the kernel refuses this shape or dtype: the plain path serves it
            if "out of memory" in str(exc):
                raise
            _say_once(f"the memory-efficient kernel refused {tuple(q.shape)} {q.dtype} ({one_line(exc)})")
    b = gate.unsqueeze(-1) * toeplitz(rel, q.size(2))
    if pad is not None:
        b = b.masked_fill(pad, float("-inf"))
    if not torch.is_autocast_enabled(q.device.type):
        b = b.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, b, dropout_p=dropout_p), PLAIN


def path_on(device: str) -> str:
    """The path ``attend`` takes on ``device`` ("cuda:0", "cpu") for fp16 or bf16 queries, as ``doctor`` reports it:
    FUSED, KERNEL or PLAIN (fp32 queries on CUDA take KERNEL where this says FUSED)."""
    if not device.startswith("cuda") or torch.are_deterministic_algorithms_enabled():
        return PLAIN
    if USE_FUSED and wavlm_fused.available() is None:
        return FUSED
    return KERNEL if hasattr(torch.ops.aten, "_scaled_dot_product_efficient_attention") else PLAIN


def _prepared(memo: Optional[dict], rel, pad, q, flat):
    """``wavlm_fused.prepare``'s inputs, made once per ``memo`` (one forward's layers) and padding mask."""
    if memo is None:
        return wavlm_fused.prepare(rel, pad, q.size(0), flat)
    key = ("fused", None if pad is None else (pad.data_ptr(), tuple(pad.shape)))
    if key not in memo:
        memo[key] = wavlm_fused.prepare(rel, pad, q.size(0), flat)
    return memo[key]


_CUDNN_REFUSED = set()
_FUSED_REFUSED = set()
USE_FUSED = True  # False: SDPA's kernels only (benchmarks compare the two)


def _forward_only(q, k, v, b, dropout_p):
    """No gradients wanted: cuDNN's attention (faster on Hopper) where it takes this bias, else the memory-efficient
    kernel's forward."""
    cudnn = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
    key = (q.dtype, q.size(-1), q.device.index)
    if cudnn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and key not in _CUDNN_REFUSED:
        try:
            return cudnn(q, k, v, b, False, dropout_p)[0]
        except RuntimeError as exc:
            if "out of memory" in str(exc):
                raise
            _CUDNN_REFUSED.add(key)
            logger.info("espnet-flashcompat: WavLM attention: cuDNN refused %s %s (%s); the memory-efficient kernel "
                        "serves it", tuple(q.shape), q.dtype, one_line(exc))
    return _GatedBias.forward_op(q, k, v, b, False, dropout_p)[0]


def kernel_possible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    if q.device.type != "cuda":
        return False
    if torch.are_deterministic_algorithms_enabled():
        _say_once("deterministic algorithms are on; the memory-efficient kernel's backward is not deterministic")
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k.dtype == v.dtype:
        _say_once(f"the kernel takes fp16, bf16 or fp32 queries, keys and values of one dtype, not {q.dtype}, "
                  f"{k.dtype}, {v.dtype}")
        return False
    return q.size(2) == k.size(2)


def _say_once(why: str) -> None:
    if why not in _said:
        _said.add(why)
        logger.info("espnet-flashcompat: WavLM attention keeps its relative-position bias for the backward: %s", why)


def toeplitz(rel: torch.Tensor, time: int, width: Optional[int] = None) -> torch.Tensor:
    """(head, 2 time - 1) -> (head, time, width), [h, i, j] = rel[h, j - i + time - 1], 0 for j >= time (a copy;
    autograd follows). ``width`` (default ``time``) >= time: full rows of an aligned buffer."""
    width = width or time
    if width > time:
        rel = F.pad(rel, (0, width - time))
    return rel.unfold(-1, width, 1).flip(-2)


def _aligned(time: int) -> int:
    return time + -time % _ALIGN


def bias(gate: torch.Tensor, rel: torch.Tensor, pad: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """gate x toeplitz(rel) + (0 or -inf at padded keys, as stock adds its key padding mask), in ``dtype``: a (..,
    time, time) view of a contiguous (.., time, aligned time) buffer, as the kernel wants its rows aligned (no
    autograd: ``_GatedBias`` differentiates it by hand). One multiply-add over whole rows, its inputs in
    ``dtype``: in fp32 the same numbers as stock's mask; in bf16 or fp16 the factors are rounded to it first, where
    stock rounds the float32 product (one more rounding of the bias, 2^-9 relative in bf16)."""
    b, h, t = gate.shape
    width = _aligned(t)
    table = toeplitz(rel.to(dtype), t, width).contiguous()  # read once per batch item: a dense copy streams faster
    rows = torch.zeros(b, 1, 1, width, dtype=dtype, device=gate.device)
    if pad is not None:
        rows[..., :t].masked_fill_(pad, float("-inf"))
    out = torch.empty(b, h, t, width, dtype=dtype, device=gate.device)
    torch.addcmul(rows, table, gate.unsqueeze(-1).to(dtype), out=out)
    return out[..., :t]


def _whole_rows(grad_bias: torch.Tensor) -> torch.Tensor:
    """The kernel's bias gradient, (.., time, time) in a buffer of aligned rows, as those whole rows, the extra
    columns zeroed (the kernel leaves them unwritten); a contiguous copy if the layout is another."""
    b, h, t, _ = grad_bias.shape
    width = _aligned(t)
    if grad_bias.stride() == (h * t * width, t * width, width, 1):
        whole = grad_bias.as_strided((b, h, t, width), grad_bias.stride(), grad_bias.storage_offset())
        whole[..., t:].zero_()
        return whole
    return F.pad(grad_bias, (0, width - t))


def reduce_bias_grad(grad_bias: torch.Tensor, gate: torch.Tensor, rel: torch.Tensor):
    """The gradients of gate and rel from the bias's (batch, head, time, time), on whole aligned rows: grad_gate =
    grad_bias . table (a sum over keys) and weighted = gate . grad_bias (a sum over the batch), whose sums along the
    diagonals give rel's. In fp16/bf16 two small matrix products per (head, query) (float32 accumulation); in fp32
    or fp64 products and sums in that dtype, one batch item at a time (a matrix product could run in TF32). Padded
    keys need no masking: their probability is exactly 0, so is their gradient."""
    b, h, t = gate.shape
    rows = _whole_rows(grad_bias)  # (batch, head, time, width), contiguous
    width, dtype = rows.size(-1), rows.dtype
    table = toeplitz(rel.to(dtype), t, width).contiguous()
    if dtype in (torch.float16, torch.bfloat16):
        per_query = rows.permute(1, 2, 0, 3).reshape(h * t, b, width)  # a view: (head x time) of (batch, width)
        grad_gate = torch.bmm(per_query, table.reshape(h * t, width, 1)).view(h, t, b).permute(2, 0, 1)
        weighted = torch.bmm(gate.permute(1, 2, 0).reshape(h * t, 1, b).to(dtype), per_query).view(h, t, width)
    else:
        grad_gate = torch.empty(b, h, t, dtype=dtype, device=rows.device)
        weighted = torch.zeros(h, t, width, dtype=dtype, device=rows.device)
        for i in range(b):
            weighted.addcmul_(rows[i], gate[i].unsqueeze(-1).to(dtype))
            torch.sum(rows[i].mul_(table), -1, out=grad_gate[i])  # rows is the kernel's output, ours to overwrite
    wide = torch.promote_types(rel.dtype, torch.float32)
    w = t + width - 1  # distances j - i from -(time - 1) to width - 1
    diagonals = torch.zeros(h, t, w, dtype=wide, device=gate.device)
    diagonals.as_strided((h, t, width), (t * w, w - 1, 1), t - 1).copy_(weighted)  # [h, i, j] -> [h, i, j - i + t - 1]
    return grad_gate.to(gate.dtype), diagonals.sum(1)[:, :2 * t - 1].to(rel.dtype)


class _GatedBias(torch.autograd.Function):
    """SDPA's memory-efficient kernel with WavLM's gated relative-position bias rebuilt in the backward."""

    forward_op = torch.ops.aten._scaled_dot_product_efficient_attention
    backward_op = torch.ops.aten._scaled_dot_product_efficient_attention_backward

    @staticmethod
    def forward(ctx, q, k, v, gate, rel, pad, dropout_p):
        with torch.autocast(q.device.type, enabled=False):
            out, lse, seed, offset = _GatedBias.forward_op(q, k, v, bias(gate, rel, pad, q.dtype), True, dropout_p)
        ctx.save_for_backward(q, k, v, gate, rel, pad, out, lse, seed, offset)
        ctx.dropout_p = dropout_p
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, gate, rel, pad, out, lse, seed, offset = ctx.saved_tensors
        want_bias = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        grad_gate = grad_rel = None
        with torch.autocast(q.device.type, enabled=False):
            grad_q, grad_k, grad_v, grad_bias = _GatedBias.backward_op(
                grad_out.contiguous(), q, k, v, bias(gate, rel, pad, q.dtype), out, lse, seed, offset,
                ctx.dropout_p, [True, True, True, want_bias])
            if want_bias:
                grad_gate, grad_rel = reduce_bias_grad(grad_bias, gate, rel)
        return grad_q, grad_k, grad_v, grad_gate, grad_rel, None, None
