"""The lean attention for S3PRL's own WavLM (``wavlm_*``, ``wavlm_local``, ``wavlm_url``): patches its
``MultiheadAttention`` modules in place and undoes it; ``wavlm_kernel`` does the attention itself.

Stock S3PRL: layer 0 (``has_relative_attention_bias``) turns its bucketed bias table into a (batch x head, time,
time) float32 ``position_bias`` that every later layer reuses; each layer scales it per query and head by the gate
of ``gru_rel_pos`` (``grep_linear`` on the layer's input, ``grep_a``) and hands it to
``F.multi_head_attention_forward`` as a float mask beside the key padding mask; autograd keeps one per layer.

``install(model)`` swaps each such module's class for a subclass of ours (``module.__class__``: parameters,
buffers, hooks and ``state_dict`` keys untouched; ``uninstall`` swaps it back). Its ``forward`` computes the same
function on the module's own parameters: layer 0 looks its table up once per distance j - i with S3PRL's own
``_relative_positions_bucket`` (on the CPU, as ``compute_bias`` does), which gives a (head, 2 time - 1) ``rel``; it
passes on a ``RelativePosition`` holding it instead of the (batch x head, time, time) tensor, and each layer attends
through ``wavlm_kernel.attend`` with its gate, (batch, head, time). Layer drop stays S3PRL's (its encoder loop draws
it, outside attention); attention dropout is the module's ``dropout_module.p``, in training only, as stock passes
it (see ``wavlm_kernel``). What the lean path does not cover runs S3PRL's own forward, with the stock bias: attention
weights asked for (``need_weights``), incremental decoding, an ``attn_mask``, distinct key or value tensors, a
``position_bias`` tensor made by a stock module.
"""

import logging
import sys
from typing import Dict, Optional, Tuple

import torch

from espnet_flashcompat.attention import wavlm_kernel

logger = logging.getLogger(__name__)

LEAN = "wavlm-lean"
STOCK = "stock"
IMPLEMENTATIONS = (LEAN, STOCK)
_MODULE = "s3prl.upstream.wavlm.modules"  # S3PRL's WavLM MultiheadAttention lives here, in both distributions


class RelativePosition:
    """What our layer 0 passes on to the later layers as ``position_bias``: ``rel`` (head, 2 time - 1), float32,
    with autograd to the bias table; ``flat``: (below, above), the distances at or below, and at or above, which
    share one bucket (``_flat_ends``); ``memo``: what the layers of this forward derive from it once (the fused
    kernel's inputs)."""

    __slots__ = ("rel", "flat", "memo")

    def __init__(self, rel: torch.Tensor, flat: Optional[Tuple[int, int]] = None):
        self.rel = rel
        self.flat = flat
        self.memo = {}

    def stock(self, batch: int) -> torch.Tensor:
        """The (batch x head, time, time) tensor a stock layer 0 returns."""
        h, t = self.rel.size(0), (self.rel.size(1) + 1) // 2
        return wavlm_kernel.toeplitz(self.rel, t).unsqueeze(0).expand(batch, -1, -1, -1).reshape(batch * h, t, t)


class _LeanWavLMAttention:
    """Put before S3PRL's WavLM ``MultiheadAttention`` by ``install()``; its forward's signature, lean where it can."""

    def forward(self, query, key, value, key_padding_mask=None, incremental_state=None, need_weights=True,
                static_kv=False, attn_mask=None, before_softmax=False, need_head_weights=False, position_bias=None):
        stock_args = (query, key, value, key_padding_mask, incremental_state, need_weights, static_kv, attn_mask,
                      before_softmax, need_head_weights)
        ours = isinstance(position_bias, RelativePosition)
        if not (ours or position_bias is None and self.has_relative_attention_bias) \
                or not self._flashcompat_lean_applies(*stock_args):
            # no bias (a padding mask only: stock's call is already the lean one), or a case the lean path leaves
            self._flashcompat_path = STOCK
            x, attn, made = super().forward(*stock_args, position_bias=position_bias.stock(query.size(1)) if ours
                                            else position_bias)
            return x, attn, position_bias if ours else made
        time, batch, dim = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        if position_bias is None:
            position_bias = RelativePosition(*self._flashcompat_rel(time, query.device))
        rel = position_bias.rel
        if self.gru_rel_pos:
            gate = self._flashcompat_gate(query)
        else:
            gate = rel.new_ones(batch, heads, time)

        def split(x):  # (time, batch, dim) -> (batch, head, time, head_dim), as F.multi_head_attention_forward views it
            return x.view(time, batch, heads, head_dim).permute(1, 2, 0, 3)

        q, k, v = split(self.q_proj(query)), split(self.k_proj(key)), split(self.v_proj(value))
        pad = None if key_padding_mask is None else key_padding_mask.view(batch, 1, 1, time).to(torch.bool)
        dropout_p = self.dropout_module.p if self.training else 0.0
        out, self._flashcompat_path = wavlm_kernel.attend(q, k, v, gate, rel, pad, dropout_p, position_bias.memo,
                                                          position_bias.flat)
        out = out.permute(2, 0, 1, 3).reshape(time, batch, dim)
        return self.out_proj(out), None, position_bias

    def _flashcompat_lean_applies(self, query, key, value, key_padding_mask, incremental_state, need_weights,
                                  static_kv, attn_mask, before_softmax, need_head_weights) -> bool:
        if need_weights or need_head_weights or before_softmax or incremental_state is not None or static_kv:
            return False
        if attn_mask is not None or key is not query or value is not query or query.device.type == "xla":
            return False
        return self.bias_k is None and not self.add_zero_attn and self.q_head_dim == self.head_dim

    def _flashcompat_rel(self, time: int, device: torch.device) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """(head, 2 time - 1): the table's value for each distance j - i, -(time - 1) .. time - 1; and the runs of
        distances at both ends that share one bucket (``_flat_ends``)."""
        key = (time, str(device), self.num_buckets, self.max_distance)
        if key not in _BUCKETS:
            distances = torch.arange(-(time - 1), time, dtype=torch.long)  # on the CPU, as compute_bias computes them
            buckets = self._relative_positions_bucket(distances, bidirectional=True)
            if len(_BUCKETS) >= 64:
                _BUCKETS.clear()
            _BUCKETS[key] = buckets.to(device), _flat_ends(buckets)
        buckets, flat = _BUCKETS[key]
        return self.relative_attention_bias(buckets).t(), flat

    def _flashcompat_gate(self, query: torch.Tensor) -> torch.Tensor:
        """(batch, head, time): the factor ``gru_rel_pos`` puts on each query's row of the bias, as stock computes it
        (``grep_linear`` on the layer's input split into heads, eight outputs summed in two groups of four)."""
        time, batch, _ = query.shape
        x = query.transpose(0, 1).view(batch, time, self.num_heads, -1).permute(0, 2, 1, 3)
        sums = self.grep_linear(x).view(batch, self.num_heads, time, 2, 4).sum(-1)
        gate_a, gate_b = torch.sigmoid(sums).chunk(2, dim=-1)
        return (gate_a * (gate_b * self.grep_a - 1.0) + 2.0).squeeze(-1)


def _flat_ends(buckets: torch.Tensor) -> Tuple[int, int]:
    """(below, above) for the buckets of distances -(time - 1) .. time - 1: every distance at or below ``below`` has
    the first distance's bucket, every one at or above ``above`` the last one's (WavLM's buckets stop growing at
    ``max_distance``: far tiles of the fused kernel's backward then add one sum each)."""
    time = (buckets.numel() + 1) // 2
    differs = (buckets != buckets[-1]).nonzero()
    above = (int(differs[-1]) + 1 if len(differs) else 0) - (time - 1)
    differs = (buckets != buckets[0]).nonzero()
    below = (int(differs[0]) - 1 if len(differs) else buckets.numel() - 1) - (time - 1)
    return below, above


_BUCKETS: Dict[tuple, Tuple[torch.Tensor, Tuple[int, int]]] = {}
_SUBCLASSES: Dict[type, type] = {}


def _is_wavlm_attention_class(cls: type) -> bool:
    return cls.__name__ == "MultiheadAttention" and cls.__module__ == _MODULE


def _attention_modules(model: torch.nn.Module):
    if _MODULE not in sys.modules:  # no WavLM was ever built in this process: nothing to look for
        return []
    return [m for m in model.modules() if any(_is_wavlm_attention_class(c) for c in type(m).__mro__)]


def _lean_class(cls: type) -> type:
    """``LeanWavLMMultiheadAttention``, a module-level name here, so that a pickled model finds it again."""
    if cls not in _SUBCLASSES:
        name = "LeanWavLMMultiheadAttention" + (f"_{len(_SUBCLASSES)}" if _SUBCLASSES else "")
        sub = type(name, (_LeanWavLMAttention, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = _SUBCLASSES[cls] = sub
    return _SUBCLASSES[cls]


def is_wavlm(upstream_model: torch.nn.Module) -> bool:
    """Whether ``upstream_model`` (an S3PRL upstream, a ``WavLM``, a frontend) holds S3PRL WavLM attention modules
    with the relative-position bias: those ``install`` makes lean."""
    return any(m.has_relative_attention_bias for m in _attention_modules(upstream_model))


def install(model: torch.nn.Module, implementation: str = LEAN) -> int:
    """Put ``implementation`` (``LEAN`` or ``STOCK``) on every WavLM attention module of ``model``, in place.
    Returns the number of modules that run the lean path now (0 for ``STOCK``, or when ``model`` has none)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"WavLM attention implementation {implementation!r}: expected one of {IMPLEMENTATIONS}")
    if implementation == STOCK:
        uninstall(model)
        return 0
    modules, patched = _attention_modules(model), 0
    for module in modules:
        if not isinstance(module, _LeanWavLMAttention):
            module.__class__ = _lean_class(type(module))
            module._flashcompat_path = None
            patched += 1
    if patched:
        logger.info("espnet-flashcompat: WavLM attention: %s on %d modules of %s (on CUDA the relative-position "
                    "bias inside fused Triton kernels in fp16/bf16, rebuilt for the backward in fp32; never kept)",
                    LEAN, len(modules), type(model).__name__)
    return len(modules)


def uninstall(model: torch.nn.Module) -> int:
    """Give every WavLM attention module of ``model`` its S3PRL class back; returns how many were patched."""
    patched = [m for m in _attention_modules(model) if isinstance(m, _LeanWavLMAttention)]
    for module in patched:
        module.__class__ = next(c for c in type(module).__mro__ if _is_wavlm_attention_class(c))
        module.__dict__.pop("_flashcompat_path", None)
    return len(patched)


def implementation_of(model: torch.nn.Module) -> Optional[str]:
    """``LEAN`` or ``STOCK`` for a model with WavLM attention modules, None for one without."""
    modules = _attention_modules(model)
    if not modules:
        return None
    return LEAN if any(isinstance(m, _LeanWavLMAttention) for m in modules) else STOCK


def paths_of(model: torch.nn.Module) -> Dict[str, int]:
    """How many lean modules took each path at their last call (``wavlm_kernel.KERNEL``, ``wavlm_kernel.PLAIN``, or
    ``STOCK``: S3PRL's own forward, e.g. for layers without a bias), for logs and ``doctor``; modules not called yet
    are left out."""
    counts: Dict[str, int] = {}
    for m in _attention_modules(model):
        path = getattr(m, "_flashcompat_path", None) if isinstance(m, _LeanWavLMAttention) else None
        if path:
            counts[path] = counts.get(path, 0) + 1
    return counts
