"""The model-wide policy's decisions for ESPnet's own attention: ``decide()`` (the rule, and the contenders of a
measured ``auto``) and ``ModelAttentionPolicy``, the decisions of one model's attention sites.

A site is the attention modules of one role and kind ("encoder selfattn", "decoder source selfattn"): the roles are
the encoder's self-attention, the decoder's self-attention and the decoder's source attention, the kinds
``selfattn`` and ``rel_selfattn`` (ESPnet's names).
flash-attn runs only where it really imports, on CUDA sm_80+ and in fp16/bf16 (``policy.flash_rejection``, shared
with the frontend's policy), and only for ``selfattn`` (relative-position attention has no flash path); SDPA
everywhere else; eager when asked for. An explicit request is honoured when it passes, else downgraded along
flash_attention_2, sdpa, eager (one warning), or refused under ``strict``; a call without a mask (beam search's
source attention) never takes ESPnet's flash path, which cannot run it (``MASKLESS``). ``auto`` off CUDA is the
rule: the first that passes. ``auto`` on CUDA is measured, as the frontend's: every backend that passes contends
(SDPA as torch chooses its kernel, and its kernels one by one where more than one may run, ``sdpa_kernels``: a
pinned kernel pays for its pin, which a decode step's launch-bound calls notice; relative-position attention runs
SDPA through ``relpos_sdpa``, whose memory-efficient kernel is called directly), and a ``tuner.Tuner`` per site
times them on the site's real calls, per shape bucket (``model_calibration``), keeps the fastest within the memory
cap (at the bucket's second batch against the step's peak: ``attention.step_memory``), keeps it in the calibration
store and, under DDP, agrees on it across ranks. A flash-attn failure at run time moves that device and dtype to
SDPA for every site, with one warning.
"""

import logging
import sys
import weakref
from dataclasses import replace
from typing import Callable, Dict, Optional, Tuple

import torch

from espnet_flashcompat.attention import policy as frontend_policy
from espnet_flashcompat.attention import ranks, sdpa_kernels, tuner
from espnet_flashcompat.attention.policy import (AUTO, EAGER, FLASH, SDPA, AttentionUnavailableError, AttnDecision,
                                                 Rejection)
from espnet_flashcompat.espnet import espnet_compat, model_calibration
from espnet_flashcompat.espnet.request import Request, origin

logger = logging.getLogger(__name__)

SELF, REL = "selfattn", "rel_selfattn"  # the kinds, by ESPnet's names for them (selfattention_layer_type)
ENCODER, DECODER, SOURCE = "encoder", "decoder", "decoder source"  # the roles; a site is named "<role> <kind>"
_ORDER = (FLASH, SDPA, EAGER)
FIX = ("flash-attn runs on CUDA sm_80+ in fp16/bf16 (ESPnet: use_amp: true); set model_attn_implementation: sdpa "
       "to skip it; see `espnet-flashcompat doctor`")
PREFIX = "espnet-flashcompat: model attention"
# ESPnet's flash path reads the keys' padding off the mask's last row (``mask[:, -1, :]``): a call without a mask (the
# source attention of beam search's decode steps) fails there with a TypeError, which is no fault of flash-attn's
MASKLESS = "ESPnet's flash path reads the keys' padding from the mask, and this call passes none"


def describe(decision: AttnDecision) -> str:
    """``AttnDecision.summary()``, naming where the request came from."""
    text = replace(decision, source="config").summary()
    return text.replace(f"(requested {decision.requested}", f"(requested {decision.requested} by "
                                                             f"{origin(decision.source)}", 1)


def rejection(backend: str, kind: str, device=None, dtype=None) -> Optional[str]:
    """Why ``backend`` cannot run ESPnet attention of ``kind`` here, or None (unknown device/dtype pass)."""
    if backend == EAGER:
        return None
    if backend == SDPA:
        sdpa = hasattr(torch.nn.functional, "scaled_dot_product_attention")
        return None if sdpa else f"torch {torch.__version__} has no scaled_dot_product_attention"
    if kind == REL:
        return "ESPnet's relative-position attention has no flash-attn path (its positional term is a per-query bias)"
    reason = frontend_policy.flash_rejection(device, dtype)
    if reason is None and not any(hasattr(sys.modules.get(c.__module__), "flash_attn_varlen_func")
                                  for c in espnet_compat.attention_classes()):
        return "ESPnet's attention module was imported while flash-attn could not be (restart the process)"
    return reason


def decide(requested: str, kind: str, device=None, dtype=None, source: str = "config",
           strict: bool = False) -> AttnDecision:
    """The backend for ESPnet attention of ``kind`` on ``device`` with ``dtype`` in effect (None: not known yet):
    the first of flash_attention_2, sdpa, eager that passes (from the requested one on; with ``strict``, an explicit
    request that does not pass is refused). ``auto`` on CUDA names every backend that passes as contenders (SDPA as
    torch's own choice and as each of its kernels where more than one may run; ``selfattn`` only: ``relpos_sdpa``
    calls its kernel directly)."""
    context = f"{device} {str(dtype).replace('torch.', '')}" if device is not None else ""
    rejected, passing = [], []
    for backend in (_ORDER if requested == AUTO else _ORDER[_ORDER.index(requested):]):
        reason = rejection(backend, kind, device, dtype)
        if reason is None:
            passing.append(backend)
        elif not passing:
            rejected.append(Rejection(backend, reason))
    contenders = ()
    if requested == AUTO and device is not None and torch.device(device).type == "cuda" and dtype is not None:
        kernels = sdpa_kernels.candidates(torch.device(device), dtype) if kind == SELF else ()
        sdpa = (SDPA,) + kernels if len(kernels) > 1 else (SDPA,)
        contenders = tuple(k for b in passing for k in (sdpa if b == SDPA else (b,)))
    decision = AttnDecision(requested, passing[0], tuple(rejected), source, context,
                            contenders if len(contenders) > 1 else ())
    if strict and rejected and requested != AUTO:
        raise AttentionUnavailableError(f"strict: {kind} {describe(decision)}")
    return decision


class ModelAttentionPolicy:
    """The decisions of one model's attention sites: the rule's per (site, device, dtype in effect), refined under
    ``auto`` on CUDA per shape bucket by a ``tuner.Tuner`` per site. ``modules``: site -> how many modules."""

    def __init__(self, request: Request):
        self.request = request
        self.decisions: Dict[Tuple[str, str, str], AttnDecision] = {}  # (site, device, dtype) -> the latest
        self.modules: Dict[str, int] = {}
        self.fields: Dict[str, dict] = {}  # site -> model_calibration.site_fields, for the calibration store
        self._static: Dict[Tuple[str, str, str], AttnDecision] = {}
        self._failed: Dict[Tuple[str, str], Rejection] = {}  # (device, dtype) -> flash-attn's run-time failure
        self._tuners: Dict[str, tuner.Tuner] = {}
        self._last: Dict[str, tuple] = {}  # site -> (mask or key, shapes, decision) of its latest call
        self._maskless_decisions: Dict[Tuple[str, str], AttnDecision] = {}  # (site, context) -> without flash
        self._warned = set()

    def rule(self, kind: str, device=None, dtype=None) -> AttnDecision:
        """``decide()`` for this policy's request."""
        return decide(self.request.backend, kind, device, dtype, self.request.source, self.request.strict)

    def decide(self, kind: str, device=None, dtype=None) -> AttnDecision:
        """The rule's decision, without flash-attn where it failed at run time on this device and dtype."""
        decision = self.rule(kind, device, dtype)
        failed = self._failed.get((str(device), str(dtype)))
        if failed is not None and (decision.implementation == FLASH or FLASH in decision.contenders):
            contenders = tuple(b for b in decision.contenders if b != FLASH)
            decision = replace(decision, implementation=SDPA, contenders=contenders if len(contenders) > 1 else (),
                               rejected=decision.rejected + (failed,))
        return decision

    def static(self, site: str, kind: str, device, dtype) -> AttnDecision:
        """The rule's decision for ``site`` on (``device``, ``dtype``), reported once."""
        key = (site, str(device), str(dtype))
        decision = self._static.get(key)
        if decision is None:
            decision = self._static[key] = self.decisions[key] = self.decide(kind, device, dtype)
            self.report(site, decision)
        return decision

    def decision(self, site: str, kind: str, module, query, key, mask,
                 call: Callable[[], model_calibration.Call]) -> AttnDecision:
        """The decision for a call of ``module`` (one of ``site``'s) on ``query``, ``key`` and ``mask``: the
        rule's for the call's device and dtype in effect, or under ``auto`` on CUDA the one measured for the
        call's bucket. ``call()`` gives the call, for a calibration. The site's next layer in the same step
        takes the site's latest decision at the cost of a comparison: its mask (else its keys; a view stands for
        the tensor it views: beam search hands each decoder layer its own slice of one mask) and every shape and
        mode the decision depends on are those of the latest call."""
        anchor = mask if mask is not None else key
        anchor = anchor if anchor._base is None else anchor._base
        state = (query.dtype, torch.is_grad_enabled(), torch._C._is_any_autocast_enabled(), query.shape, key.shape)
        last = self._last.get(site)
        if last is not None and last[0]() is anchor and last[1] == state:
            return last[2]
        device = query.device
        dtype = frontend_policy.effective_dtype(device, query.dtype)
        decision = self.static(site, kind, device, dtype)
        if mask is None and (decision.implementation == FLASH or FLASH in decision.contenders):
            decision = self._maskless(site, decision)
        together = self.request.backend == AUTO and ranks.world_size() > 1 and device.type == "cuda"
        if decision.contenders or together:
            site_tuner = self._tuners.get(site)
            if site_tuner is None:
                step_peak = (lambda: torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
                site_tuner = self._tuners[site] = tuner.Tuner(f"{PREFIX}: {site}", model_calibration.describe,
                                                              self.fields.get(site), step_peak)
            layers = self.modules.get(site, 1)
            decision = site_tuner.decision(
                (str(device), str(dtype)), decision, model_calibration.bucket(query, key, mask), together, module,
                device, lambda contenders: call().measure(contenders, layers),
                exact=(query.shape[0], query.shape[1], key.shape[1]))
            self.decisions[(site, str(device), str(dtype))] = decision
        self._last[site] = (weakref.ref(anchor), state, decision)
        return decision

    def _maskless(self, site: str, decision: AttnDecision) -> AttnDecision:
        """``decision`` for a call without a mask: flash-attn's path left out (``MASKLESS``), reported once;
        refused under ``strict``."""
        key = (site, decision.context)
        maskless = self._maskless_decisions.get(key)
        if maskless is None:
            if self.request.strict and decision.requested == FLASH:
                raise AttentionUnavailableError(f"strict: {site} flash_attention_2: {MASKLESS}")
            contenders = tuple(b for b in decision.contenders if b != FLASH)
            implementation = SDPA if decision.implementation == FLASH else decision.implementation
            maskless = self._maskless_decisions[key] = replace(
                decision, implementation=implementation, contenders=contenders if len(contenders) > 1 else (),
                rejected=decision.rejected + (Rejection(FLASH, MASKLESS),))
            logger.info("%s: %s, calls without a mask: %s", PREFIX, site, describe(maskless))
        return maskless

    def fall_back(self, site: str, kind: str, query, failure: str,
                  exc: Optional[BaseException] = None) -> AttnDecision:
        """flash-attn failed at run time on ``query``'s device and dtype in effect: no site runs or times it there
        again; one warning."""
        device = query.device
        dtype = frontend_policy.effective_dtype(device, query.dtype)
        if self.request.strict:
            raise AttentionUnavailableError(f"strict: flash_attention_2 failed at run time on {device} "
                                            f"{str(dtype).replace('torch.', '')}: {failure}") from exc
        self._failed[(str(device), str(dtype))] = Rejection(FLASH, failure)
        for key in [k for k in self._static if k[1:] == (str(device), str(dtype))]:
            del self._static[key]
        self._maskless_decisions.clear()
        for site_tuner in self._tuners.values():
            site_tuner.forget((str(device), str(dtype)))
        self._last.clear()
        decision = self._static[(site, str(device), str(dtype))] = self.decide(kind, device, dtype)
        self.decisions[(site, str(device), str(dtype))] = decision
        self._warned.add(decision.rejected)
        logger.warning("%s: flash-attn failed at run time; re-running the call. %s %s. Fix: %s", PREFIX, site,
                       describe(decision), FIX)
        return decision

    def report(self, site: str, decision: AttnDecision) -> None:
        if decision.downgraded and decision.rejected not in self._warned:
            self._warned.add(decision.rejected)
            logger.warning("%s: %s %s. Fix: %s", PREFIX, site, describe(decision), FIX)
        else:
            logger.info("%s: %s %s", PREFIX, site, describe(decision))
