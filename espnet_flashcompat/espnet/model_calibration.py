"""What one calibration of ESPnet attention times, and on what: ``Call``, a call of an attention module as met.

A site is the attention modules of one role and kind in a model (``model_policy``: the encoder's self-attention, the
decoder's self-attention, its source attention); they share one decision per device, dtype and shape bucket
(``bucket()``: train or eval, batch size and both lengths to the next power of two, whether the keys are padded,
whether a mask is passed). ``Call.measure`` times each contender (``calibrate.measure``) on the call that met the
bucket first: the module run as many times as the site has modules, on that call's own inputs (detached), forward
and, when training, the backward into the module's parameters, as a step runs the site's layers; the peak memory
thus counts what those layers keep for the backward, on top of what the step holds when the call arrives (its
parameters, optimizer state and the activations kept so far). At the first layer's call the step holds a small
part of its peak, so the tuner counts the step's own peak once a step has run (``attention.step_memory``: at the
bucket's second batch, and at its second look). ``Call.reshaped(k)`` is the same call 2k frames shorter on both
time axes, for ``calibrate``'s cost of a new shape (cuDNN's attention builds a graph per length).
``site_fields`` is what the calibration store keys a site on (``calibration_key.site_of``).
"""

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from espnet_flashcompat.attention import calibrate

# A batch this many frames shorter has another shape in the attention (frontend_buckets.NEW_SHAPE_CUT, in frames)
NEW_SHAPE_FRAMES = 2
_SIGNATURES: Dict[type, inspect.Signature] = {}


def _pow2(n: int) -> int:
    return 2 ** math.ceil(math.log2(max(n, 1)))


def describe(bucket: Tuple) -> str:
    grad, batch, time1, time2, ragged, masked = bucket
    mask = ", padded keys" if ragged else "" if masked else ", no mask"
    return f"{'train' if grad else 'eval'}, batch <= {batch}, {time1} x {time2} frames at most{mask}"


def ragged(mask: Optional[torch.Tensor]) -> bool:
    """Whether some keys are padded, by ESPnet's own test (the mask's last query row; a host sync). A mask of one
    row for the whole batch pads no utterance's keys (a decode step's causal mask): no sync."""
    return mask is not None and mask.shape[0] > 1 and not bool(mask[:, -1, :].all())


def bucket(query: torch.Tensor, key: torch.Tensor, mask: Optional[torch.Tensor]) -> Tuple:
    """A call's shape bucket (see the module doc)."""
    return (torch.is_grad_enabled(), _pow2(query.shape[0]), _pow2(query.shape[1]), _pow2(key.shape[1]),
            ragged(mask), mask is not None)


def site_fields(module: torch.nn.Module, role: str, kind: str, layers: int) -> Dict[str, object]:
    """A site's attention configuration for the calibration store's key: ESPnet's class, the role and kind, heads,
    head size, how many modules, attention dropout, and the flags its flash path reads."""
    return {"role": role, "kind": kind, "heads": module.h, "head_dim": module.d_k, "layers": layers,
            "attention_dropout": float(module.dropout_rate), "causal": bool(getattr(module, "causal", False)),
            "cross_attn": bool(getattr(module, "cross_attn", False)),
            "qk_norm": not isinstance(getattr(module, "q_norm", None), (type(None), torch.nn.Identity))}


@dataclass
class Call:
    """One call of an ESPnet attention module: its arguments by ESPnet's names (query, key, value, mask, and
    pos_emb for relative-position attention), and ``run(backend, arguments, strict)``, which runs the module on a
    backend (``model_attention``)."""

    module: torch.nn.Module
    arguments: Dict[str, object]
    run: Callable[[str, Dict[str, object], bool], torch.Tensor]

    @classmethod
    def of(cls, module, espnet_class: type, query, args, kwargs, run) -> "Call":
        signature = _SIGNATURES.get(espnet_class)
        if signature is None:
            signature = _SIGNATURES[espnet_class] = inspect.signature(espnet_class.forward)
        bound = signature.bind(module, query, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop(next(iter(signature.parameters)))  # self
        return cls(module, arguments, run)

    @property
    def query(self) -> torch.Tensor:
        return self.arguments["query"]

    @property
    def key(self) -> torch.Tensor:
        return self.arguments["key"]

    @property
    def exact(self) -> Tuple[int, int, int]:
        """(batch, query length, key length)."""
        return self.query.shape[0], self.query.shape[1], self.key.shape[1]

    def detached(self) -> Dict[str, object]:
        """The arguments with every tensor detached: a calibration run builds no graph into the model's."""
        return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in self.arguments.items()}

    def reshaped(self, k: int) -> Optional[Dict[str, object]]:
        """The detached arguments ``k * NEW_SHAPE_FRAMES`` frames shorter on each time axis longer than that, or None
        where a relative position embedding has no known layout."""
        cut = k * NEW_SHAPE_FRAMES
        out = self.detached()
        time1, time2 = self.query.shape[1], self.key.shape[1]
        new1 = time1 - cut if time1 > cut else time1
        new2 = time2 - cut if time2 > cut else time2
        out["query"] = out["query"][:, :new1]
        for name in ("key", "value"):
            out[name] = out[name][:, :new2]
        mask = out.get("mask")
        if mask is not None:
            out["mask"] = mask[:, :new1 if mask.shape[1] == time1 else None, :new2]
        pos = out.get("pos_emb")
        if pos is not None:
            if pos.shape[1] == 2 * time2 - 1:  # relative positions -(time - 1) .. time - 1, centred
                out["pos_emb"] = pos[:, time2 - new2:time2 + new2 - 1]
            elif pos.shape[1] == time2:  # the legacy layout, one per position
                out["pos_emb"] = pos[:, :new2]
            else:
                return None
        return out

    def measure(self, contenders: Sequence[str], layers: int) -> Dict[str, object]:
        """Each contender's ``choice.Timing`` (or failure) on ``layers`` runs of this call per timed run."""
        current = [contenders[0]]
        arguments = self.detached()

        def switch(backend: str) -> None:
            current[0] = backend

        def forward(args=arguments):
            return [self.run(current[0], args, True) for _ in range(layers)]

        shorter = [self.reshaped(k) for k in range(1, len(contenders) + 1)]
        # the keys' axis long enough for every contender's cut (a decode step's one query is left as it is)
        room = self.exact[2] > (len(contenders) + 1) * NEW_SHAPE_FRAMES and all(s is not None for s in shorter)
        reshaped = (lambda k: forward(shorter[k - 1])) if room else None
        device = self.query.device
        held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        return calibrate.measure(forward, tuple(contenders), switch, self.module, device, reshaped, held)
