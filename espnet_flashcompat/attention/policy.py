"""Choose the attention backend of an S3PRL upstream, with a reason for every rejected candidate.

``decide()`` is the policy: it takes the request, the device, the dtype and the upstream, and returns an
``AttnDecision``. Under ``auto`` on CUDA, when more than one backend passes, the decision lists them as
``contenders`` and ``calibrate`` times them on the real batches. ``apply()`` puts a decision into the upstream, and
``is_flash_kernel_error()`` recognises the flash-attn kernel errors that justify a switch at run time.

Hugging Face upstreams choose among flash_attention_2, sdpa (and its kernels) and eager. S3PRL's own WavLM runs its
lean path (``wavlm``: the gated relative-position bias built for SDPA's kernels and rebuilt for the backward), or,
for ``eager``, S3PRL's own attention. Other native S3PRL upstreams (HuBERT, wav2vec2, XLS-R) attend through
``F.multi_head_attention_forward``, which is SDPA: their decision says ``native-sdpa`` (torch picks the kernel), and
under ``auto`` on CUDA SDPA's kernels contend for them as for a Hugging Face upstream (``attention_model`` names
the model calibration keys on).
"""

import logging
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from espnet_flashcompat.s3prl import guard
from espnet_flashcompat.attention import sdpa_kernels, transformers_compat, wavlm

logger = logging.getLogger(__name__)

ENV_VAR = "ESPNET_FLASHCOMPAT_ATTN"
AUTO, FLASH, SDPA, EAGER = "auto", "flash_attention_2", "sdpa", "eager"
CHOICES = (AUTO, FLASH, SDPA, EAGER)
NATIVE_SDPA, NO_ATTENTION = "native-sdpa", "none"
WAVLM_LEAN = wavlm.LEAN  # S3PRL's own WavLM on its lean path
_ORDER = (FLASH, SDPA, EAGER)  # fastest first; an explicit request is downgraded along this order

_KERNEL_ERRORS = (
    "FlashAttention only supports Ampere GPUs or newer",
    "FlashAttention only support fp16 and bf16",
    "FlashAttention forward only supports head dimension",
    "FlashAttention backward only supports head dimension",
    "No available kernel",
    "flash_attn_2_cuda",
)


class AttentionUnavailableError(RuntimeError):
    """``strict`` is on and the requested backend cannot run here."""


@dataclass(frozen=True)
class Rejection:
    backend: str
    reason: str


@dataclass(frozen=True)
class AttnDecision:
    requested: str  # auto | flash_attention_2 | sdpa | eager, after the environment override
    implementation: str  # what runs: flash_attention_2 | sdpa | eager | native-sdpa | none
    rejected: Tuple[Rejection, ...] = ()
    source: str = "config"  # config | env
    context: str = ""  # "cuda:0 bfloat16", or "" before the device is known
    contenders: Tuple[str, ...] = ()  # auto on CUDA: the healthy backends calibration chooses among
    measured: bool = False  # chosen by timing the contenders (choice.pick)

    @property
    def downgraded(self) -> bool:
        """The request was not met: another backend runs. SDPA is met by a native upstream's own SDPA and by
        WavLM's lean path (SDPA's kernels with the bias built for them)."""
        met = (SDPA, NATIVE_SDPA, WAVLM_LEAN) if self.requested == SDPA else (self.requested,)
        return self.requested != AUTO and self.implementation not in met

    def summary(self) -> str:
        why = "; ".join(f"{r.backend}: {r.reason}" for r in self.rejected)
        where = f" on {self.context}" if self.context else ""
        src = f" ({ENV_VAR})" if self.source == "env" else ""
        how = (", measured" if self.measured else
               f", to calibrate among {'/'.join(self.contenders)}" if self.contenders else "")
        return (f"attention {self.implementation}{where} (requested {self.requested}{src}{how})"
                f"{'; rejected ' + why if why else ''}")


def requested_backend(configured: str) -> Tuple[str, str]:
    """(request, source): ``ESPNET_FLASHCOMPAT_ATTN`` wins over the YAML; both are validated."""
    value, source = (os.environ.get(ENV_VAR), "env") if os.environ.get(ENV_VAR) else (configured, "config")
    value = (value or AUTO).strip().lower()
    if value not in CHOICES:
        origin = ENV_VAR if source == "env" else "attn_implementation"
        raise ValueError(f"{origin}={value!r} is not one of {', '.join(CHOICES)}")
    return value, source


def hf_model(upstream) -> Optional[torch.nn.Module]:
    """The transformers model inside an S3PRL upstream (``hf_wav2vec2_custom``...), else None."""
    model = getattr(getattr(upstream, "upstream", upstream), "model", None)
    return model if hasattr(model, "config") and hasattr(model.config, "_attn_implementation") else None


def attention_model(upstream) -> Optional[torch.nn.Module]:
    """The model whose attention ``auto`` calibrates: the HF model of an HF upstream, the upstream's own model for
    a native upstream with attention (HuBERT, wav2vec2), None for WavLM (its lean path is not calibrated) and for
    upstreams without attention."""
    model = hf_model(upstream)
    if model is not None or wavlm.is_wavlm(upstream) or not _has_attention(upstream):
        return model
    expert = getattr(upstream, "upstream", upstream)
    inner = getattr(expert, "model", None)
    return inner if isinstance(inner, torch.nn.Module) else expert


def decide(requested: str, upstream, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
           source: str = "config", strict: bool = False) -> AttnDecision:
    """The backend ``upstream`` should attend with on ``device``/``dtype`` (None: not known yet).

    ``auto`` takes the first candidate of flash_attention_2, sdpa, eager that passes its checks; an explicit
    request is honoured when it passes them and otherwise downgraded (or, with ``strict``, refused). On a known
    CUDA device, ``auto`` names the healthy backends as contenders for calibration, sdpa as each of its kernels
    that may run there (``sdpa:cudnn``, ``sdpa:flash``, ``sdpa:efficient``: ``sdpa_kernels``); eager never
    contends next to sdpa (it keeps every attention matrix: ~2.5x the memory of a 30 s train step).
    """
    context = f"{device} {str(dtype).replace('torch.', '')}" if device is not None else ""
    model = hf_model(upstream)
    if model is None and wavlm.is_wavlm(upstream):
        decision = _wavlm_decision(requested, source, context)
    elif model is None:
        native = NATIVE_SDPA if _has_attention(upstream) else NO_ATTENTION
        rejected = ()
        if requested not in (AUTO, SDPA) or (requested == SDPA and native == NO_ATTENTION):
            rejected = (Rejection(requested, f"{type(upstream.upstream).__module__} is a native S3PRL upstream "
                                             f"({native}); its attention runs on SDPA's kernels only"),)
        kernels = sdpa_kernels.candidates(device, effective_dtype(device, dtype)) if native == NATIVE_SDPA else ()
        calibrate = requested == AUTO and len(kernels) > 1
        decision = AttnDecision(requested, native, rejected, source, context, kernels if calibrate else ())
    else:
        candidates = _ORDER if requested == AUTO else _ORDER[_ORDER.index(requested):]
        rejected, healthy = [], []
        for backend in candidates:
            reason = _rejection(backend, model, device, dtype)
            if reason is None:
                healthy.append(backend)
            elif not healthy:
                rejected.append(Rejection(backend, reason))
        contenders = tuple(b for b in healthy if b != EAGER)
        kernels = sdpa_kernels.candidates(device, effective_dtype(device, dtype)) if SDPA in contenders else ()
        if len(kernels) > 1:  # SDPA's kernels contend one by one (sdpa_kernels), torch's own pick among them
            contenders = tuple(k for b in contenders for k in (kernels if b == SDPA else (b,)))
        calibrate = requested == AUTO and device is not None and device.type == "cuda" and len(contenders) > 1
        decision = AttnDecision(requested, healthy[0], tuple(rejected), source, context,
                                contenders if calibrate else ())
    if strict and decision.rejected and requested != AUTO:
        raise AttentionUnavailableError(f"strict: {decision.summary()}")
    return decision


def _wavlm_decision(requested: str, source: str, context: str) -> AttnDecision:
    """S3PRL's own WavLM: its lean path (``wavlm``) for ``auto`` and ``sdpa``, on every device (its outputs are
    stock's, its memory about half; where the kernel ops are missing it runs SDPA with the bias, as stock does);
    ``eager``: S3PRL's own attention, as stock runs it. Its gated relative-position bias has no flash-attn path."""
    if requested == EAGER:
        return AttnDecision(requested, EAGER, (), source, context)
    rejected = (Rejection(FLASH, "WavLM's gated relative-position bias has no flash-attn path"),) \
        if requested == FLASH else ()
    return AttnDecision(requested, WAVLM_LEAN, rejected, source, context)


def _rejection(backend: str, model, device, dtype) -> Optional[str]:
    """Why ``backend`` cannot run this model here, or None if it can (unknown device/dtype pass)."""
    if not transformers_compat.supports(model, backend):
        return f"{type(model).__name__} does not support {backend}"
    return flash_rejection(device, dtype) if backend == FLASH else None


def flash_rejection(device, dtype) -> Optional[str]:
    """Why flash-attn cannot run on ``device`` in ``dtype`` whatever the model, or None (unknown device/dtype pass):
    it must import for real, the device must be CUDA sm_80+ (by compute capability), the dtype in effect fp16/bf16.
    Shared with ``model_attention``, the policy for ESPnet's own attention modules."""
    broken = guard.probe_flash_attn()
    if broken is not None:
        return broken.error
    if device is not None:
        if device.type != "cuda":
            return f"device {device} is not CUDA"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return (f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}; "
                    "FlashAttention needs Ampere (sm_80) or newer")
    if dtype is not None and effective_dtype(device, dtype) not in (torch.float16, torch.bfloat16):
        return f"dtype {str(dtype).replace('torch.', '')} (FlashAttention runs fp16/bf16 only; enable AMP)"
    return None


def effective_dtype(device, dtype):
    if device is not None and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def _has_attention(upstream) -> bool:
    return any("Attention" in type(m).__name__ for m in upstream.modules())


def apply(upstream, implementation: str) -> None:
    """Switch the HF model inside ``upstream`` to ``implementation`` in place (a no-op for native upstreams): the
    model keeps its parameters, so optimizers, adapters, hooks and frozen layers are untouched by the switch."""
    model = hf_model(upstream)
    if model is None and implementation in (WAVLM_LEAN, EAGER):  # S3PRL's own WavLM: only its decisions say these
        if getattr(upstream, "_flashcompat_wavlm", None) != implementation:  # apply() runs at every forward
            wavlm.install(upstream, wavlm.LEAN if implementation == WAVLM_LEAN else wavlm.STOCK)
            upstream._flashcompat_wavlm = implementation
        return
    implementation = sdpa_kernels.backend_of(implementation)  # sdpa:<kernel>: sdpa, its kernel pinned per forward
    if model is None or model.config._attn_implementation == implementation:
        return
    transformers_compat.set_attn_implementation(model, implementation)


def is_flash_kernel_error(exc: BaseException) -> bool:
    """True for the flash-attn failures that another backend avoids (kernel limits, broken install)."""
    text = str(exc)
    return any(marker in text for marker in _KERNEL_ERRORS) or guard.classify(exc).kind == guard.FLASH_ATTN
