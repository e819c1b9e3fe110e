"""WavLM's gated relative-position attention in Triton kernels (``wavlm_fused_kernels``): the bias is computed inside
the kernels from the gate and the distance table, never written out, and dropout is drawn inside them too. This
module launches them and differentiates (``attend``).

``attend(q, k, v, gate, rel, pad, dropout_p)`` computes what ``wavlm_kernel.attend`` computes (its doc gives the
function): softmax(q k^T / sqrt(head_dim) + gate[b, h, i] * rel[h, j - i + time - 1], -inf at padded keys), dropout,
times V. Each program holds a block of queries (forward; backward for q and the gate) or of keys (backward for k, v
and the table) and walks the other axis tile by tile, as flash attention does; key blocks past an utterance's last
unpadded key are skipped (their probabilities are 0). The bias of a tile is read from the (head, 2 time - 1) table,
which stays in the cache: no (.., time, time) tensor of scores or probabilities exists, forward or backward. The
table's gradient is summed along each tile's diagonals in registers (``tl.gather`` turns each key row of the tile by
its index, so that a column holds a diagonal) and added once per diagonal and tile; a tile all of whose distances
read one table entry (WavLM's far distances: ``prepare``'s ``flat``) adds its whole sum at once. The gate's gradient
is a row sum. Kept for the backward: q, k, v, the gate, the table, the output, the log-sum-exp per query and the
dropout mask, a bit per probability. ``prepare`` derives from the table and the padding mask what the kernels read;
WavLM's layers share one table and one mask, so ``wavlm`` prepares once per forward.

Dropout, a stated equivalent of SDPA's: each probability is kept independently with probability 1 - p (p rounded
to a multiple of 2^-16) and scaled by the inverse of that (``dropout_threshold``), from Triton's Philox stream
(10 rounds) keyed by a seed that the call draws from torch's generator on the queries' device, so that
``torch.manual_seed`` repeats it; one Philox call gives 16 random bits to each of 8 neighbouring keys of a query. The
forward stores the mask for the backward (``STORE_KEEP_MASK``; without it the backward draws it again from the
seed); ``keep_mask`` writes it out, for tests. For one seed it is another draw than stock S3PRL's, as between any two
of SDPA's kernels.

Takes fp16 and bf16 queries on CUDA with a head size of 16 to 256 that is a power of two (WavLM's: 64): ``takes``.
fp32 stays with ``wavlm_kernel``'s paths. ``available()`` says whether Triton can be imported, and why not.
"""

from typing import NamedTuple, Optional, Tuple

import torch

from espnet_flashcompat.attention.wavlm_fused_kernels import MISSING as _MISSING
from espnet_flashcompat.attention.wavlm_fused_kernels import triton

if triton is not None:
    from espnet_flashcompat.attention.wavlm_fused_kernels import (attention_forward, backward_kv, backward_q,
                                                                  write_keep_mask)

# Tile sizes (queries x keys) and warps, per kernel: the fastest of a sweep on an H200 (docs/benchmarks.md).
FORWARD = dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2)
BACKWARD_KV = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
BACKWARD_Q = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
# The backward's variants, each tested and timed against the others by `kernels --variants`
# (benchmarks/wavlm_kernels.py, docs/benchmarks.md). STORE_KEEP_MASK: the forward stores the dropout mask, a bit per
# probability (batch x head x time x time / 8 bytes kept for the backward: 36 MiB per WavLM large layer at 8 x 30 s),
# and the backward kernels read it instead of drawing it again. ROTATE_TILES: the diagonal sums of the table's
# gradient from a tile turned row by row (as wide as the tile) instead of one sheared twice as wide.
# FLAT_TILES: a tile whose distances all read one table entry adds one sum.
STORE_KEEP_MASK = True
ROTATE_TILES = True
FLAT_TILES = True
_MASK_ROW_ALIGN = 256  # the stored mask's rows cover whole key tiles of up to this many keys


def available() -> Optional[str]:
    """None where the kernels can run, else why not (Triton missing)."""
    return _MISSING


def takes(q: torch.Tensor) -> bool:
    """Whether the kernels take queries like ``q`` (batch, head, time, head_dim)."""
    d = q.size(-1)
    return _MISSING is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and 16 <= d <= 256 \
        and d & (d - 1) == 0


def dropout_threshold(dropout_p: float):
    """(threshold, rescale): a probability is kept where its 16 random bits reach ``threshold``, i.e. with
    probability 1 - p rounded to a multiple of 2^-16, and scaled by the inverse of that, so that it stays unbiased."""
    threshold = min(round(dropout_p * 65536), 65535)
    return threshold, 65536.0 / (65536 - threshold)


def _time_major_like(x: torch.Tensor) -> torch.Tensor:
    """An empty (batch, head, time, head_dim) view of a (time, batch, head, head_dim) buffer: the layout the module's
    output projection reads without a copy."""
    b, h, t, d = x.shape
    return x.new_empty(t, b, h, d).permute(1, 2, 0, 3)


def _strides(x: torch.Tensor):
    assert x.stride(-1) == 1, "the head dimension must be contiguous"
    return x.stride(0), x.stride(1), x.stride(2)


_TABLE_PAD = 256  # >= any tile side


class Prepared(NamedTuple):
    """What every layer of one forward shares: the table, float32 times log2(e) (scores run in base 2), padded by
    _TABLE_PAD on both sides (the kernels read it at j - i for whole tiles, past the ends too); the key bias (batch
    or 1, time): 0, or -inf at padded keys, and its batch stride; end (batch,): one past the last unpadded key;
    flat: ``prepare``'s."""
    table: torch.Tensor
    key_bias: torch.Tensor
    key_bias_stride: int
    end: torch.Tensor
    flat: Tuple[int, int]


def prepare(rel: torch.Tensor, pad: Optional[torch.Tensor], batch: int,
            flat: Optional[Tuple[int, int]] = None) -> Prepared:
    """``attend``'s inputs derived from ``rel`` (head, 2 time - 1) and ``pad`` (batch, 1, 1, time) or None: the same
    for every layer of a forward, so WavLM's layers compute them once (``wavlm``). ``flat`` = (below, above): the
    distances j - i at or below ``below`` are one table entry, as are those at or above ``above`` (``rel`` looked up
    from a table whose buckets end so); the backward then gives ``rel`` the gradient of each such run at one distance
    of it, 0 at the others (the table's own gradient is the same). None: no such runs."""
    time = (rel.size(1) + 1) // 2
    flat = flat if flat is not None and FLAT_TILES else (-time, time)
    table = torch.nn.functional.pad(rel.detach().float() * 1.4426950408889634, (_TABLE_PAD, _TABLE_PAD))
    if pad is None:
        return Prepared(table, rel.new_zeros(1, time, dtype=torch.float32), 0,
                        torch.full((batch,), time, dtype=torch.int32, device=rel.device), flat)
    pad = pad.reshape(batch, time)
    bias = torch.zeros(batch, time, dtype=torch.float32, device=rel.device).masked_fill_(pad, float("-inf"))
    end = time - (~pad).flip(-1).to(torch.int32).argmax(-1)  # a key past the end: none (an all-padded row: time)
    return Prepared(table, bias, time, end.to(torch.int32), flat)


class _Fused(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, gate, rel, prepared, dropout_p):
        b, h, t, dim = q.shape
        gate = gate.contiguous()
        table, kb, skb_b, end, flat = prepared
        dropout = dropout_p > 0.0
        seed = torch.randint(2 ** 62, (1,), device=q.device, dtype=torch.int64) if dropout \
            else q.new_zeros(1, dtype=torch.int64)
        out = _time_major_like(q)
        lse = q.new_empty(b * h, t, dtype=torch.float32)
        store = dropout and STORE_KEEP_MASK and any(ctx.needs_input_grad[:5])
        row_bytes = triton.cdiv(t, _MASK_ROW_ALIGN) * _MASK_ROW_ALIGN // 8
        mask = q.new_empty((b * h, t, row_bytes) if store else (1,), dtype=torch.uint8)
        cfg = dict(FORWARD)
        attention_forward[(triton.cdiv(t, cfg["BLOCK_M"]), b * h)](
            q, k, v, gate, table[:, _TABLE_PAD + t - 1:], kb, end, out, lse, seed, mask, *_strides(q), *_strides(k),
            *_strides(v), *_strides(out), gate.stride(0), gate.stride(1), table.stride(0), skb_b, h, t, dim ** -0.5,
            *dropout_threshold(dropout_p), row_bytes, HEAD_D=dim, DROPOUT=dropout, STORE_MASK=store, **cfg)
        ctx.save_for_backward(q, k, v, gate, table, kb, end, out, lse, seed, mask)
        ctx.stored_mask, ctx.row_bytes, ctx.flat = store, row_bytes, flat
        ctx.dropout_p, ctx.skb_b, ctx.rel_dtype = float(dropout_p), skb_b, rel.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, gate, table, kb, end, out, lse, seed, mask = ctx.saved_tensors
        b, h, t, dim = q.shape
        delta = (grad_out.float() * out.float()).sum(-1).reshape(b * h, t)
        do = _time_major_like(q).copy_(grad_out)
        # the kernels read q, k, v and dO and write their gradients in one layout: dO's, the output's
        q, k, v = (x if x.stride() == do.stride() else _time_major_like(x).copy_(x) for x in (q, k, v))
        dq, dk, dv = _time_major_like(q), _time_major_like(k), _time_major_like(v)
        dgate = torch.empty(gate.shape, device=q.device, dtype=torch.float32)
        drel = torch.zeros(h, 2 * t - 1, device=q.device, dtype=torch.float32)
        r = table[:, _TABLE_PAD + t - 1:]
        common = dict(HEAD_D=dim, DROPOUT=ctx.dropout_p > 0.0, STORED_MASK=ctx.stored_mask)
        strides = (*_strides(do), *_strides(k), *_strides(v), gate.stride(0), gate.stride(1), table.stride(0),
                   ctx.skb_b)
        threshold, rescale = dropout_threshold(ctx.dropout_p)
        cfg = dict(BACKWARD_KV)
        grid = (triton.cdiv(t, cfg["BLOCK_N"]), b * h)
        backward_kv[grid](
            q, k, v, gate, r, kb, end, do, lse, delta, seed, mask, dk, dv, drel, *strides, drel.stride(0),
            h, t, dim ** -0.5, threshold, rescale, ctx.row_bytes, *ctx.flat,
            E=triton.next_power_of_2(cfg["BLOCK_M"] + cfg["BLOCK_N"]),
            ROTATE=ROTATE_TILES and cfg["BLOCK_N"] <= cfg["BLOCK_M"], **common, **cfg)
        cfg = dict(BACKWARD_Q)
        backward_q[(triton.cdiv(t, cfg["BLOCK_M"]), b * h)](
            q, k, v, gate, r, kb, end, do, lse, delta, seed, mask, dq, dgate, *strides,
            h, t, dim ** -0.5, threshold, rescale, ctx.row_bytes, **common, **cfg)
        return dq, dk, dv, dgate.to(gate.dtype), drel.to(ctx.rel_dtype), None, None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, rel: torch.Tensor,
           pad: Optional[torch.Tensor], dropout_p: float, prepared: Optional[Prepared] = None) -> torch.Tensor:
    """The attention's output, (batch, head, time, head_dim), a view of a (time, batch, head, head_dim) buffer.
    ``prepared``: ``prepare(rel, pad, batch, flat)``, made once for the layers that share it."""
    with torch.autocast(q.device.type, enabled=False):
        return _Fused.apply(q, k, v, gate, rel, prepared or prepare(rel, pad, q.size(0)), dropout_p)


def keep_mask(seed: torch.Tensor, batch_heads: int, time: int, dropout_p: float) -> torch.Tensor:
    """(batch x head, time, time) bool: which probabilities the kernels keep for ``seed`` (an int64 tensor of one
    element, as ``_Fused`` draws it): the mask a reference computation needs to reproduce them."""
    out = torch.empty(batch_heads, time, time, dtype=torch.int8, device=seed.device)
    write_keep_mask[(triton.cdiv(time, 32), batch_heads)](seed, out, time, dropout_threshold(dropout_p)[0],
                                                          BLOCK=32)
    return out.bool()
