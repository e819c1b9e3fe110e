"""ESPnet's own attention modules under the model-wide policy: ``apply()`` puts every ``MultiHeadedAttention``,
``RelPositionMultiHeadedAttention`` and ``LegacyRelPositionMultiHeadedAttention`` of a built ESPnet model
(Transformer, Conformer, (E-)Branchformer encoders, Transformer decoder; our S3PRL frontend has its own policy)
under one ``model_policy.ModelAttentionPolicy``, which decides per call; ``optin`` and ``request`` say when.

Each module's class is swapped for a subclass of ours (``module.__class__``; parameters, buffers and hooks are
untouched) whose ``forward`` asks the policy for its site's decision, sets ESPnet's own flags (``use_flash_attn``,
``use_sdpa``) and calls ESPnet's own forward, on the SDPA kernel the decision names (``sdpa_kernels.pinned``);
relative-position modules on SDPA run ``relpos_sdpa`` (leaner than ESPnet 202611's own ``use_sdpa`` path, which
202511 lacks). Attention dropout becomes a real dropout of ``dropout_rate`` (ESPnet builds ``nn.Identity`` when
flash is on at build time, and keeps it after falling back). A flash failure at run time, which ESPnet catches, logs
once per module and answers with eager attention without dropout, is caught with its real exception
(``espnet_fallback``): that (device, dtype) moves to SDPA for every site, one warning names the exception, and the
call is re-run on SDPA. While ESPnet's attention plots (``calculate_all_attentions``, after each epoch) hook a
module, that module runs eager: the plots read ``module.attn``, the weights only eager attention materialises.
"""

import logging
import os
from typing import Dict, Optional

import torch

from espnet_flashcompat.attention import relpos_sdpa, sdpa_kernels
from espnet_flashcompat.attention.policy import AUTO, EAGER, FLASH, SDPA
from espnet_flashcompat.espnet import espnet_compat, espnet_fallback, model_calibration, model_policy
from espnet_flashcompat.espnet.model_policy import DECODER, ENCODER, REL, SELF, SOURCE, ModelAttentionPolicy
from espnet_flashcompat.espnet.request import ENV_VAR as MODEL_ENV_VAR, OPTION, Request, STRICT_ENV, origin, requested

logger = logging.getLogger(__name__)

_WEIGHT_READERS = ("espnet2.main_funcs.calculate_all_attentions",)  # modules whose forward hooks read module.attn


class _PolicyAttention:
    """Put before an ESPnet attention class by ``apply()``: decides per call, then runs ESPnet's own code paths."""

    _flashcompat_direct = None  # the backend ESPnet's flags are set for, where its own forward runs it unpinned

    def forward(self, query, *args, **kwargs):
        if self._forward_hooks and _weights_wanted(self):  # ESPnet's attention plots read module.attn: eager
            _set_backend(self, EAGER)
            return super().forward(query, *args, **kwargs)
        policy, site, kind = self._flashcompat_policy, self._flashcompat_site, self._flashcompat_kind
        key, mask = _key_and_mask(kind, args, kwargs)
        decision = policy.decision(site, kind, self, query, key, mask, lambda: model_calibration.Call.of(
            self, self._flashcompat_espnet, query, args, kwargs, lambda *a: _run(self, *a)))
        self.__dict__["attn"] = None  # weights an eager call left behind: (batch, head, time1, time2) held for nothing
        backend = decision.implementation
        if backend == self._flashcompat_direct:  # the latest call's backend: nothing to set
            return self._flashcompat_espnet.forward(self, query, *args, **kwargs)
        if backend == FLASH:
            out, failure, exc = _flash(self, lambda: super(_PolicyAttention, self).forward(query, *args, **kwargs))
            if failure is None:
                return out
            backend = policy.fall_back(site, kind, query, failure, exc).implementation
        return _attend(self, backend, False, query, *args, **kwargs)


def _key_and_mask(kind: str, args, kwargs):
    """The key and the mask of a call: ESPnet's ``forward(query, key, value, mask)``, relative-position attention's
    ``forward(query, key, value, pos_emb, mask)``."""
    at = 2 if kind == SELF else 3  # the mask's place after the query
    key = args[0] if args else kwargs["key"]
    return key, args[at] if len(args) > at else kwargs.get("mask")


def _flash(module, forward):
    """(output, None, None) of ESPnet's flash path, or (its eager fallback's output, failure, exception)."""
    _set_backend(module, FLASH)
    # flash-attn applies dropout itself; self.dropout is read only by the eager fallback ESPnet runs after a failure,
    # whose output is thrown away: it must not draw from the RNG that the re-run will use
    dropout, module._modules["dropout"] = module._modules["dropout"], _IDENTITY
    try:
        out, failure, exc = espnet_fallback.catching(forward)
    finally:
        module._modules["dropout"] = dropout
    if module.use_flash_attn:
        return out, None, None
    module.attn = None  # the attention matrix of ESPnet's eager fallback, which is thrown away
    return out, failure, exc


def _attend(module, backend: str, strict: bool, *args, **kwargs):
    """ESPnet's forward on ``backend`` (SDPA, one of its kernels, or eager); relative-position SDPA: ``relpos_sdpa``."""
    plain = sdpa_kernels.backend_of(backend)
    _set_backend(module, plain)
    if module._flashcompat_kind == REL and plain == SDPA:
        forward = relpos_sdpa.forward
    else:
        forward = module._flashcompat_espnet.forward
        if plain == backend:  # no kernel to pin: the next call on it runs ESPnet's forward straight away
            module.__dict__["_flashcompat_direct"] = backend
    if plain == backend:
        return forward(module, *args, **kwargs)
    with sdpa_kernels.pinned(backend, strict):
        return forward(module, *args, **kwargs)


def _run(module, backend: str, arguments: Dict[str, object], strict: bool):
    """One call on ``backend`` for calibration (``model_calibration.Call``): a flash path that falls back raises."""
    if backend == FLASH:
        out, failure, exc = _flash(module, lambda: super(_PolicyAttention, module).forward(**arguments))
        if failure is not None:
            raise RuntimeError(f"ESPnet's flash path failed: {failure}") from exc
        return out
    return _attend(module, backend, strict, **arguments)


def _weights_wanted(module) -> bool:
    """True while a forward hook that reads the attention weights is on ``module`` (ESPnet's attention plots,
    ``calculate_all_attentions``, run after each epoch with ``num_att_plot`` > 0): only eager attention makes them."""
    return any(getattr(hook, "__module__", None) in _WEIGHT_READERS for hook in module._forward_hooks.values())


def _set_backend(module, backend: str) -> None:
    """ESPnet's flags for ``backend`` (``use_flash_attn``, ``use_sdpa``)."""
    module.__dict__["_flashcompat_direct"] = None
    flash, sdpa = backend == FLASH, backend == SDPA
    if module.use_flash_attn != flash:
        module.use_flash_attn = flash
    if getattr(module, "use_sdpa", None) != sdpa:
        module.use_sdpa = sdpa


class _AttentionDropout(torch.nn.Dropout):
    """``nn.Dropout`` that, outside training, hands its input back without calling into torch (a decode step calls
    it in every attention module: nn.Dropout's eval call costs 3.5 us, this one 1.1 us, on a 2-core x86-64 CPU with
    torch 2.14, 2026-12-05)."""

    def forward(self, x):
        return torch.nn.functional.dropout(x, self.p, True, self.inplace) if self.training else x


_IDENTITY = torch.nn.Identity()
_SUBCLASSES: Dict[type, type] = {}


def _policy_class(cls: type) -> type:
    """``FlashCompat<ESPnet class>``, a module-level name here, so that a pickled model finds it again."""
    if cls not in _SUBCLASSES:
        name = f"FlashCompat{cls.__name__}"
        if name in globals():  # the same class name from another ESPnet module
            name = f"{name}_{len(_SUBCLASSES)}"
        sub = type(name, (_PolicyAttention, cls), {"__module__": __name__, "__qualname__": name,
                                                   "_flashcompat_espnet": cls})
        globals()[name] = _SUBCLASSES[cls] = sub
    return _SUBCLASSES[cls]


def _role(name: str, module) -> str:
    """Encoder self-attention, decoder self-attention or decoder source attention, by the flags ESPnet's
    ``TransformerDecoder`` gives its modules (``cross_attn``, ``causal``) or their names in the model."""
    parts = name.split(".")
    if getattr(module, "cross_attn", False) or parts[-1] == "src_attn":
        return SOURCE
    if getattr(module, "causal", False) or any(p.endswith("decoder") for p in parts):
        return DECODER
    return ENCODER


def apply(model: torch.nn.Module, request: Request,
          policy: Optional[ModelAttentionPolicy] = None) -> Optional[ModelAttentionPolicy]:
    """Put ESPnet's attention modules of ``model`` under one policy (``policy``, else a new one for ``request``),
    in place. Idempotent: modules already under a policy move to this one. None when the model has none."""
    known = set(espnet_compat.attention_classes())
    targets = [(n, m) for n, m in model.named_modules() if type(m) in known or isinstance(m, _PolicyAttention)]
    if not targets:
        logger.info("%s: %s has no ESPnet attention module; nothing to do", model_policy.PREFIX, type(model).__name__)
        return None
    policy = policy or ModelAttentionPolicy(request)
    request = policy.request
    espnet_fallback.install()
    policy.modules = {}
    for name, module in targets:
        if not isinstance(module, _PolicyAttention):
            cls = type(module)
            module._flashcompat_kind = REL if hasattr(cls, "rel_shift") else SELF
            module._flashcompat_site = f"{_role(name, module)} {module._flashcompat_kind}"
            module.__class__ = _policy_class(cls)
        module._flashcompat_policy = policy
        if type(module.dropout) is not _AttentionDropout or module.dropout.p != module.dropout_rate:
            module.dropout = _AttentionDropout(p=module.dropout_rate).train(module.training)
        policy.modules[module._flashcompat_site] = policy.modules.get(module._flashcompat_site, 0) + 1
    for name, module in targets:
        site = module._flashcompat_site
        if site not in policy.fields:
            role = site[:-len(module._flashcompat_kind) - 1]
            policy.fields[site] = model_calibration.site_fields(module, role, module._flashcompat_kind,
                                                                policy.modules[site])
    logger.info("%s policy (requested %s by %s%s) on %s modules; the backend is decided per device and dtype at the "
                "first forward%s", model_policy.PREFIX, request.backend, origin(request.source),
                ", strict" if request.strict else "",
                ", ".join(f"{n} {s}" for s, n in sorted(policy.modules.items())),
                ", under auto on CUDA measured per shape bucket" if request.backend == AUTO else "")
    for site in sorted(policy.modules):  # what is known before the device: strict, a broken flash-attn, ...
        kind = next(m._flashcompat_kind for _, m in targets if m._flashcompat_site == site)
        decision = policy.decide(kind)
        if decision.downgraded:
            policy.report(site, decision)
        for _, module in targets:
            if module._flashcompat_site == site:
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
                d = model_policy.decide(backend, kind, torch.device(device), dtype)
                row[kind] = {"implementation": d.implementation, "contenders": list(d.contenders),
                             "rejected": {r.backend: r.reason for r in d.rejected}}
            state["decisions"].append(row)
    return state
