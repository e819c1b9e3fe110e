"""One attention policy for ESPnet's own attention modules, model-wide; ``optin`` and ``request`` say when it applies.

Job: ``apply()`` puts every ``MultiHeadedAttention``, ``RelPositionMultiHeadedAttention`` and
``LegacyRelPositionMultiHeadedAttention`` of a built ESPnet model (Transformer, Conformer, (E-)Branchformer
encoders, Transformer decoder; our S3PRL frontend has its own policy) under one ``ModelAttentionPolicy``: each
attends with the backend ``decide()`` picks for its kind, device and dtype in effect (autocast included):
flash-attn only where it really imports, on CUDA sm_80+ and in fp16/bf16 (``attention.policy.flash_rejection``, shared
with the frontend's policy), and only for ``selfattn`` (relative-position attention has no flash path); else SDPA;
eager only when asked for. ``auto`` takes the first that passes; an explicit request is downgraded (one warning),
or refused under ``strict``.

Each module's class is swapped for a subclass of ours (``module.__class__``; parameters, buffers and hooks are
untouched) whose ``forward`` looks the decision up, sets ESPnet's own flags (``use_flash_attn``, ``use_sdpa``) and
calls ESPnet's own forward; relative-position modules on SDPA run ``relpos_sdpa`` (leaner than ESPnet 202611's
own ``use_sdpa`` path, which 202511 lacks). Attention dropout becomes a real ``nn.Dropout(p=dropout_rate)`` (ESPnet
builds ``nn.Identity`` when flash is on at build time, and keeps it after falling back). A flash failure at run time,
which ESPnet catches, logs once per module and answers with eager attention without dropout, is caught here with
its real exception (``_EspnetFallbackCatcher``): that (device, dtype) moves to SDPA for every module of the model,
one warning names the exception, and the call is re-run on SDPA. One log line per decision. While ESPnet's
attention plots (``calculate_all_attentions``, after each epoch) hook a module, that module runs eager: the plots
read ``module.attn``, the weights only eager attention materialises (ESPnet's own SDPA and flash paths leave it None).
"""

import logging
import os
import sys
import threading
from dataclasses import replace
from typing import Dict, Optional, Tuple

import torch

from espnet_flashcompat.attention import policy as frontend_policy
from espnet_flashcompat.espnet import espnet_compat
from espnet_flashcompat.attention import relpos_sdpa
from espnet_flashcompat.attention.policy import AUTO, EAGER, FLASH, SDPA, AttentionUnavailableError, AttnDecision, Rejection
from espnet_flashcompat.s3prl.errors import one_line
from espnet_flashcompat.espnet.request import ENV_VAR as MODEL_ENV_VAR, OPTION, Request, STRICT_ENV, origin, requested

logger = logging.getLogger(__name__)

SELF, REL = "selfattn", "rel_selfattn"  # the kinds, by ESPnet's names for them (selfattention_layer_type)
_ORDER = (FLASH, SDPA, EAGER)
_ESPNET_FALLBACK_LOG = "Flash Attention failed, falling back to default attention"  # ESPnet's, once per module
_WEIGHT_READERS = ("espnet2.main_funcs.calculate_all_attentions",)  # modules whose forward hooks read module.attn
FIX = ("flash-attn runs on CUDA sm_80+ in fp16/bf16 (ESPnet: use_amp: true); set model_attn_implementation: sdpa "
       "to skip it; see `espnet-flashcompat doctor`")


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
    ``auto`` takes the first of flash_attention_2, sdpa, eager that passes; an explicit request is honoured when it
    passes, else downgraded along that order (or, with ``strict``, refused)."""
    context = f"{device} {str(dtype).replace('torch.', '')}" if device is not None else ""
    rejected = []
    for backend in (_ORDER if requested == AUTO else _ORDER[_ORDER.index(requested):]):
        reason = rejection(backend, kind, device, dtype)
        if reason is None:
            break
        rejected.append(Rejection(backend, reason))
    decision = AttnDecision(requested, backend, tuple(rejected), source, context)
    if strict and rejected and requested != AUTO:
        raise AttentionUnavailableError(f"strict: {kind} {describe(decision)}")
    return decision


class ModelAttentionPolicy:
    """The decisions of one model, shared by its attention modules: one per (kind, device, dtype in effect)."""

    def __init__(self, request: Request):
        self.request = request
        self.decisions: Dict[Tuple[str, str, str], AttnDecision] = {}
        self.modules: Dict[str, int] = {}  # kind -> how many modules follow this policy
        self._warned = set()

    def decide(self, kind: str, device=None, dtype=None) -> AttnDecision:
        return decide(self.request.backend, kind, device, dtype, self.request.source, self.request.strict)

    def decision_for(self, kind: str, device, dtype) -> AttnDecision:
        key = (kind, str(device), str(dtype))
        decision = self.decisions.get(key)
        if decision is None:
            decision = self.decisions[key] = self.decide(kind, device, dtype)
            self._report(kind, decision)
        return decision

    def fall_back(self, kind: str, device, dtype, failure: str, exc: Optional[BaseException] = None) -> AttnDecision:
        """flash-attn failed at run time on (device, dtype): SDPA for every module of ``kind`` there, one warning."""
        key = (kind, str(device), str(dtype))
        failed = self.decisions.get(key) or self.decide(kind, device, dtype)
        if self.request.strict:
            raise AttentionUnavailableError(f"strict: flash_attention_2 failed at run time on {failed.context}: "
                                            f"{failure}") from exc
        decision = AttnDecision(failed.requested, SDPA, failed.rejected + (Rejection(FLASH, failure),),
                                failed.source, failed.context)
        self.decisions[key] = decision
        self._warned.add(decision.rejected)
        logger.warning("espnet-flashcompat: model attention: flash-attn failed at run time; re-running the call. "
                       "%s %s. Fix: %s", kind, describe(decision), FIX)
        return decision

    def _report(self, kind: str, decision: AttnDecision) -> None:
        if decision.downgraded and decision.rejected not in self._warned:
            self._warned.add(decision.rejected)
            logger.warning("espnet-flashcompat: model attention: %s %s. Fix: %s", kind, describe(decision), FIX)
        else:
            logger.info("espnet-flashcompat: model attention: %s %s", kind, describe(decision))


# --------------------------------------------------------------------------------------------- the modules


class _PolicyAttention:
    """Put before an ESPnet attention class by ``apply()``: decides per call, then runs ESPnet's own code paths."""

    def forward(self, query, *args, **kwargs):
        if self._forward_hooks and _weights_wanted(self):  # ESPnet's attention plots read module.attn: eager
            _set_backend(self, EAGER)
            return super().forward(query, *args, **kwargs)
        if self.attn is not None:  # weights an eager call left behind: (batch, head, time1, time2) held for nothing
            self.attn = None
        policy, kind = self._flashcompat_policy, self._flashcompat_kind
        device = query.device
        dtype = frontend_policy.effective_dtype(device, query.dtype)
        backend = policy.decision_for(kind, device, dtype).implementation
        if backend == FLASH:
            _set_backend(self, FLASH)
            # flash-attn applies dropout itself; self.dropout is read only by the eager fallback ESPnet runs after a
            # failure, whose output is thrown away: it must not draw from the RNG that the re-run will use
            dropout, self._modules["dropout"] = self._modules["dropout"], _IDENTITY
            try:
                out, failure, exc = _catching_espnet_fallback(super().forward, query, *args, **kwargs)
            finally:
                self._modules["dropout"] = dropout
            if self.use_flash_attn:
                return out
            self.attn = None  # the attention matrix of ESPnet's eager fallback, which is thrown away
            backend = policy.fall_back(kind, device, dtype, failure, exc).implementation
        _set_backend(self, backend)
        if kind == REL and backend == SDPA:
            return relpos_sdpa.forward(self, query, *args, **kwargs)
        return super().forward(query, *args, **kwargs)


def _weights_wanted(module) -> bool:
    """True while a forward hook that reads the attention weights is on ``module`` (ESPnet's attention plots,
    ``calculate_all_attentions``, run after each epoch with ``num_att_plot`` > 0): only eager attention makes them."""
    return any(getattr(hook, "__module__", None) in _WEIGHT_READERS for hook in module._forward_hooks.values())


def _set_backend(module, backend: str) -> None:
    flash, sdpa = backend == FLASH, backend == SDPA
    if module.use_flash_attn != flash:
        module.use_flash_attn = flash
    if getattr(module, "use_sdpa", None) != sdpa:
        module.use_sdpa = sdpa


_local = threading.local()
_IDENTITY = torch.nn.Identity()


class _EspnetFallbackCatcher(logging.Filter):
    """On the root logger: while one of our modules runs ESPnet's flash path, ESPnet's own "Flash Attention failed"
    warning is taken with the exception it is logged from (``sys.exc_info()`` inside ESPnet's ``except`` block) and
    dropped: the policy gives one warning per decision instead of ESPnet's one per module."""

    _espnet_flashcompat = True

    def filter(self, record: logging.LogRecord) -> bool:
        caught = getattr(_local, "caught", None)
        if caught is None or not str(record.msg).startswith(_ESPNET_FALLBACK_LOG):
            return True
        caught.append((sys.exc_info()[1], record.getMessage()))
        return False


def _catching_espnet_fallback(forward, *args, **kwargs):
    """(output, failure text, exception or None) of ESPnet's forward, with its flash-failure warning caught."""
    outer, _local.caught = getattr(_local, "caught", None), []
    try:
        out = forward(*args, **kwargs)
        caught = _local.caught
    finally:
        _local.caught = outer
    if not caught:  # ESPnet's warning was not emitted (root logger above WARNING): only its message is lost
        return out, "ESPnet's flash path failed (its warning, which holds the error, is below the log level)", None
    exc, message = caught[0]
    if exc is None:
        return out, message, None
    return out, one_line(exc), exc


def _install_catcher() -> None:
    root = logging.getLogger()
    if not any(getattr(f, "_espnet_flashcompat", False) for f in root.filters):
        root.addFilter(_EspnetFallbackCatcher())


_SUBCLASSES: Dict[type, type] = {}


def _policy_class(cls: type) -> type:
    """``FlashCompat<ESPnet class>``, a module-level name here, so that a pickled model finds it again."""
    if cls not in _SUBCLASSES:
        name = f"FlashCompat{cls.__name__}"
        if name in globals():  # the same class name from another ESPnet module
            name = f"{name}_{len(_SUBCLASSES)}"
        sub = type(name, (_PolicyAttention, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = _SUBCLASSES[cls] = sub
    return _SUBCLASSES[cls]


def apply(model: torch.nn.Module, request: Request,
          policy: Optional[ModelAttentionPolicy] = None) -> Optional[ModelAttentionPolicy]:
    """Put ESPnet's attention modules of ``model`` under one policy (``policy``, else a new one for ``request``),
    in place. Idempotent: modules already under a policy move to this one. None when the model has none."""
    known = set(espnet_compat.attention_classes())
    targets = [m for m in model.modules() if type(m) in known or isinstance(m, _PolicyAttention)]
    if not targets:
        logger.info("espnet-flashcompat: model attention: %s has no ESPnet attention module; nothing to do",
                    type(model).__name__)
        return None
    policy = policy or ModelAttentionPolicy(request)
    request = policy.request
    _install_catcher()
    for module in targets:
        if not isinstance(module, _PolicyAttention):
            cls = type(module)
            module._flashcompat_kind = REL if hasattr(cls, "rel_shift") else SELF
            module.__class__ = _policy_class(cls)
        module._flashcompat_policy = policy
        if not isinstance(module.dropout, torch.nn.Dropout) or module.dropout.p != module.dropout_rate:
            module.dropout = torch.nn.Dropout(p=module.dropout_rate).train(module.training)
    policy.modules = {}
    for module in targets:
        policy.modules[module._flashcompat_kind] = policy.modules.get(module._flashcompat_kind, 0) + 1
    logger.info("espnet-flashcompat: model attention policy (requested %s by %s%s) on %s modules; the backend is "
                "decided per device and dtype at the first forward", request.backend, origin(request.source),
                ", strict" if request.strict else "", ", ".join(f"{n} {k}" for k, n in sorted(policy.modules.items())))
    for kind in sorted(policy.modules):  # what is known before the device: strict, a broken flash-attn, ...
        decision = policy.decide(kind)
        if decision.downgraded:
            policy._report(kind, decision)
        for module in targets:
            if module._flashcompat_kind == kind:
                _set_backend(module, decision.implementation)
    return policy


def policy_of(model: torch.nn.Module) -> Optional[ModelAttentionPolicy]:
    """The policy ``apply()`` put on ``model``'s attention modules, or None (stock)."""
    return next((m._flashcompat_policy for m in model.modules() if isinstance(m, _PolicyAttention)), None)


def doctor_state(devices=("cpu",)) -> dict:
    """The opt-in as this process sees it and what it decides on each device, for ``espnet-flashcompat doctor``."""
    state = {"env": os.environ.get(MODEL_ENV_VAR) or None, "env_error": None, "option": OPTION,
             "strict_env": bool(os.environ.get(STRICT_ENV)), "opted_in_by_env": False,
             "requested": None, "decisions": []}
    try:
        request = requested(None)
    except ValueError as exc:
        state["env_error"] = str(exc)
        return state
    state["opted_in_by_env"] = request is not None
    backend = request.backend if request is not None else AUTO
    state["requested"] = backend
    for device in devices:
        for dtype in (torch.float32, torch.bfloat16):
            row = {"device": str(device), "dtype": str(dtype).replace("torch.", "")}
            for kind in (SELF, REL):
                d = decide(backend, kind, torch.device(device), dtype)
                row[kind] = {"implementation": d.implementation, "rejected": {r.backend: r.reason for r in d.rejected}}
            state["decisions"].append(row)
    return state
