"""SDPA's own kernels as contenders of ``auto``: their names, which may run where, and the context that pins one.

``scaled_dot_product_attention`` is several kernels (cuDNN, flash, memory-efficient, math), and which one runs
depends on the torch version, the mask, the dtype and the GPU: on Hopper with cuDNN > 9.15 torch tries cuDNN first,
which huggingface/transformers#48163 measured 1.7-2.3x faster than SDPA's flash kernel for Hopper training shapes and slower
on an A100. Under ``auto`` on CUDA, ``policy.decide`` names each kernel that may run there as ``sdpa:<kernel>``
(``candidates()``), and ``calibrate`` times them like any backend.

``pinned(name)`` runs a forward on that kernel: at run time first in torch's priority order, the others after it
(a later batch that it refuses still runs; a kernel switched off with ``torch.backends.cuda.enable_*_sdp`` stays
off); with ``strict`` (calibration) alone, so that a kernel that refuses the
batch fails there, with torch's own reason, instead of timing another kernel under its name. The backward runs the
backward of the kernel its forward ran. The math kernel never contends: it is eager attention inside SDPA. (On CPU
torch tries its flash kernel, then math, whatever the priority order; ``auto`` calibrates on CUDA only.)
"""

import contextlib
import re
import warnings
from typing import Optional, Tuple

import torch

SDPA = "sdpa"
KERNELS = ("cudnn", "flash", "efficient")  # torch's own priority order on Hopper; math comes last
# What a new batch shape is presumed to cost a kernel, in its run times, until a bucket whose shapes repeat times it:
# cuDNN's attention builds and compiles a graph per sequence length. H200, torch 2.11.0+cu130, cuDNN 9.19,
# 2026-12-04: a wav2vec2 base train step of 8 x 10 s took 52.7 ms on one length, 276.3 ms when each step had a new
# one (4.2x), which ESPnet's length-sorted batches (and a decode of one utterance at a time) give nearly every step.
PRESUMED_SHAPE_COST = {"sdpa:cudnn": 4.2}
_TRIGGERED = re.compile(r"\s*\(Triggered internally at [^)]*\)")


def name(kernel: str) -> str:
    return f"{SDPA}:{kernel}"


def kernel_of(implementation: str) -> Optional[str]:
    """``sdpa:cudnn`` -> ``cudnn``; None for a backend that pins no kernel (``sdpa`` itself included)."""
    backend, _, kernel = implementation.partition(":")
    return kernel if backend == SDPA and kernel else None


def backend_of(implementation: str) -> str:
    """What transformers is told to run: ``sdpa`` for any of SDPA's kernels."""
    return implementation.partition(":")[0]


def candidates(device: Optional[torch.device], dtype: Optional[torch.dtype]) -> Tuple[str, ...]:
    """The kernels worth timing on ``device`` in ``dtype`` (the dtype in effect): CUDA only; cuDNN and flash need
    fp16/bf16 on sm_80+; each only where torch has it enabled (``torch.backends.cuda.*_sdp_enabled``)."""
    if device is None or device.type != "cuda" or dtype is None:
        return ()
    half = dtype in (torch.float16, torch.bfloat16) and torch.cuda.get_device_capability(device)[0] >= 8
    enabled = {"cudnn": half and torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cudnn.is_available(),
               "flash": half and torch.backends.cuda.flash_sdp_enabled(),
               "efficient": torch.backends.cuda.mem_efficient_sdp_enabled()}
    return tuple(name(k) for k in KERNELS if enabled[k])


def shape_rejection(implementation: str, masked: bool) -> Optional[str]:
    """Why ``implementation`` cannot take a batch of this shape, known before running it, or None: SDPA's flash
    kernel takes no attention mask, and a ragged batch passes one (ESPnet's attention passes one to nearly every
    call: ``masked``)."""
    if kernel_of(implementation) == "flash" and masked:
        return "SDPA's flash kernel takes no attention mask, and this batch passes one"
    return None


def _backend(kernel: str):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[kernel]


_ORDER_SETTLED = False  # torch has made its first SDPA call of the process on CUDA


def _settle_torch_order() -> None:
    """torch sets its own kernel priority order at the process's first SDPA call on CUDA (cuDNN first on Hopper), over
    an order set before that call: with torch 2.11 on an H200 (2026-12-04) the first forward under a pin to the
    memory-efficient kernel ran cuDNN's. So that call is made first, on a tiny input, by the math kernel."""
    global _ORDER_SETTLED
    if _ORDER_SETTLED or not torch.cuda.is_available():
        return
    from torch.nn.attention import sdpa_kernel

    q = torch.zeros(1, 1, 1, 8, device="cuda")
    with sdpa_kernel([_backend("math")]):
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    _ORDER_SETTLED = True


def pinned(implementation: str, strict: bool = False):
    """A context that runs its block on ``implementation``'s SDPA kernel (a no-op for any other backend); see the
    module doc. The run-time pin is an object of two calls into torch: it is entered at every attention call of
    ESPnet's modules under the model-wide policy."""
    kernel = kernel_of(implementation)
    if kernel is None:
        return contextlib.nullcontext()
    if strict:
        return _alone(implementation, kernel)
    _settle_torch_order()
    if _GET is None or _PUT is None:  # a torch without them: the public context, which also enables every kernel
        from torch.nn.attention import sdpa_kernel

        order = [kernel] + [k for k in KERNELS + ("math",) if k != kernel]
        return sdpa_kernel([_backend(k) for k in order], set_priority=True)
    return _First(int(_backend(kernel)))


# torch's own priority order of SDPA's kernels (torch >= 2.5 has both)
_GET, _PUT = (getattr(torch._C, f"_{w}_sdp_priority_order", None) for w in ("get", "set"))


class _First:
    """The kernel first in torch's own priority order, the kernels' on/off flags left as they are: two calls into
    torch instead of ``sdpa_kernel``'s dozen."""

    __slots__ = ("first", "previous")

    def __init__(self, first: int):
        self.first = first

    def __enter__(self):
        self.previous = previous = _GET()
        if previous[0] != self.first:
            _PUT([self.first] + [b for b in previous if b != self.first])

    def __exit__(self, *exc):
        if self.previous[0] != self.first:
            _PUT(self.previous)


@contextlib.contextmanager
def _alone(implementation: str, kernel: str):
    """The kernel alone; where it refuses the call, a RuntimeError with torch's reasons (calibration's pin)."""
    from torch.nn.attention import sdpa_kernel

    with warnings.catch_warnings(record=True) as caught, sdpa_kernel([_backend(kernel)]):
        warnings.simplefilter("always")  # torch says why a kernel cannot run in UserWarnings: keep them for the error
        try:
            yield
        except RuntimeError as exc:
            why = reasons(str(w.message) for w in caught if issubclass(w.category, UserWarning))
            if not why:
                raise
            raise RuntimeError(f"{implementation} cannot run this batch: {why}") from exc


def reasons(messages) -> str:
    """torch's warnings of a refused call, as one reason: without its source locations, the headers ("... not used
    because:"), and the other kernels' "has been runtime disabled" (the pin did that); in order, each once."""
    why = [_TRIGGERED.sub("", m).strip() for m in messages]
    why = [w for w in why if w and not w.endswith("not used because:")]
    own = [w for w in why if not w.endswith("has been runtime disabled.")]
    return "; ".join(dict.fromkeys(own or why))
