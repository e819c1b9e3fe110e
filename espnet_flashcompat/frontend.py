"""``S3prlFlashCompatFrontend``: ESPnet's ``S3prlFrontend`` that survives broken attention plumbing.

A thin subclass: S3PRL is imported through ``guard`` (so the stock ``from s3prl.nn import ...`` inside
ESPnet's constructor succeeds), inputs are checked up front, the attention backend is chosen by
``policy.decide`` for each device and dtype the frontend meets (under ``auto`` on CUDA, ``tuner`` has the healthy
backends, SDPA's kernels one by one, timed on real batches per batch-shape bucket, or reads an earlier process's
timing from the calibration store, and keeps the fastest), and a flash-attn kernel error at run time switches to
the next backend and re-runs the same batch once. Everything else is ESPnet's.
"""

import inspect
import logging
from typing import Dict, Optional, Tuple, Union

import torch
from espnet2.asr.frontend.s3prl import S3prlFrontend

from espnet_flashcompat.attention import (calibrate, frontend_buckets, policy, ranks, sdpa_kernels,
                                          transformers_compat, tuner)
from espnet_flashcompat.s3prl.errors import one_line
from espnet_flashcompat.s3prl.guard import import_s3prl, recovered_faults
from espnet_flashcompat.s3prl.hub import ResilientHub, close_names

logger = logging.getLogger(__name__)
# Stock defaults, read off S3prlFrontend itself: the class behind its frontend_conf default moved from espnet.nets
# (202511) to espnet2.legacy.nets (202611), and the signature is all we need of it.
_STOCK = inspect.signature(S3prlFrontend.__init__).parameters


class S3prlFlashCompatFrontend(S3prlFrontend):
    """``frontend: s3prl_flashcompat``: ``S3prlFrontend``'s arguments plus ``attn_implementation`` and ``strict``."""

    def __init__(
        self,
        fs: Union[int, str] = 16000,
        frontend_conf: Optional[dict] = _STOCK["frontend_conf"].default,
        download_dir: Optional[str] = None,
        multilayer_feature: bool = False,
        layer: int = -1,
        attn_implementation: str = policy.AUTO,
        strict: bool = False,
    ):
        request, source = policy.requested_backend(attn_implementation)
        s3prl = import_s3prl()
        _check_upstream(s3prl.hub, (frontend_conf or {}).get("upstream"))
        super().__init__(fs, frontend_conf, download_dir, multilayer_feature, layer)
        num_layers = self.upstream.num_layers
        if not -num_layers <= layer < num_layers:
            raise ValueError(f"layer={layer} is out of range: upstream '{frontend_conf['upstream']}' has "
                             f"{num_layers} hidden states (0..{num_layers - 1}, or counted from the end down to "
                             f"-{num_layers}; -1, the default, is the last one, or with multilayer_feature: true "
                             "the weighted sum of all)")
        self.frontend_type = "s3prl"  # ESPnet keys behaviour on this; we are an s3prl frontend
        self.strict = strict
        self.attn_request, self.attn_source = request, source
        self.import_faults = recovered_faults()
        self._static: Dict[Tuple[str, str], policy.AttnDecision] = {}  # (device, dtype) -> policy decision
        self._tuner = tuner.Tuner()  # under auto on CUDA: calibrations per (device, dtype, shape bucket)
        # found once (it walks the upstream's modules); in a tuple, so as not to register it as a submodule twice
        self._attention_model = (policy.attention_model(self.upstream),)
        self._warned = set()  # rejection tuples already warned about: one warning per decision
        self.attn_decision = self._policy(None, None)
        if self.attn_decision.implementation != policy.FLASH:  # flash waits for the device: on CPU fp32 it warns
            policy.apply(self.upstream, self.attn_decision.implementation)
        logger.info("s3prl_flashcompat: upstream %s, %s", frontend_conf["upstream"], self.attn_decision.summary())

    def forward(self, input: torch.Tensor, input_lengths: torch.Tensor):
        _check_batch(input, input_lengths)
        self._attend_on(input, input_lengths)
        try:
            return self._run(self.attn_decision.implementation, input, input_lengths)
        except Exception as exc:
            if self.attn_decision.implementation != policy.FLASH or not policy.is_flash_kernel_error(exc):
                raise
            self._fall_back(exc)
        return self._run(self.attn_decision.implementation, input, input_lengths)

    def _run(self, implementation: str, input: torch.Tensor, input_lengths: torch.Tensor, strict: bool = False):
        """ESPnet's forward, on ``implementation``'s SDPA kernel where it names one (``sdpa:cudnn``...)."""
        with sdpa_kernels.pinned(implementation, strict):
            return S3prlFrontend.forward(self, input, input_lengths)

    def _policy(self, device, dtype) -> policy.AttnDecision:
        decision = policy.decide(self.attn_request, self.upstream, device, dtype, self.attn_source, self.strict)
        if decision.downgraded and decision.rejected not in self._warned:
            self._warned.add(decision.rejected)
            logger.warning("s3prl_flashcompat: %s. Fix: %s", decision.summary(), _FIX)
        return decision

    def _attend_on(self, input: torch.Tensor, input_lengths: torch.Tensor) -> None:
        """The decision for this batch: the policy's, once per (device, dtype in effect), refined under ``auto``
        by calibration once per shape bucket; under DDP once per train/eval, agreed by all ranks (``ranks``).
        A GPU run sees CUDA only after the model is moved."""
        device = input.device
        model = self._attention_model[0]
        dtype = policy.effective_dtype(device, next(model.parameters()).dtype if model is not None else input.dtype)
        key = self._key = (str(device), str(dtype))
        if key not in self._static:
            self._static[key] = self._policy(device, dtype)
            if not self._static[key].contenders:
                logger.info("s3prl_flashcompat: %s", self._static[key].summary())
        decision = self._static[key]
        together = ranks.world_size() > 1 and device.type == "cuda" and self.attn_request == policy.AUTO \
            and model is not None
        if decision.contenders or together:
            decision = self._tuner.decision(key, decision, frontend_buckets.bucket(input, input_lengths), together, model,
                                            device, lambda contenders: self._measure(contenders, input, input_lengths),
                                            exact=tuple(input.shape))
        policy.apply(self.upstream, decision.implementation)
        self.attn_decision = decision

    def _measure(self, contenders, input, input_lengths):
        """Each contender's timing on this batch (``calibrate.measure``), the model left on the last one timed."""
        current = [contenders[0]]

        def switch(backend):
            current[0] = backend
            policy.apply(self.upstream, backend)

        def shorter(k):  # the batch cut short: the k-th shape no backend has run yet (choice.shape_cost)
            cut = input.shape[1] - k * frontend_buckets.NEW_SHAPE_CUT
            return self._run(current[0], input[:, :cut], input_lengths.clamp(max=cut), strict=True)

        room = input.shape[1] > (len(contenders) + 1) * frontend_buckets.NEW_SHAPE_CUT
        return calibrate.measure(lambda: self._run(current[0], input, input_lengths, strict=True), contenders,
                                 switch, self, input.device, shorter if room else None)

    def _fall_back(self, exc: Exception) -> None:
        failed = self.attn_decision
        if self.strict:
            raise policy.AttentionUnavailableError(
                f"strict: flash_attention_2 failed on {failed.context}: {type(exc).__name__}: {exc}") from exc
        model = policy.hf_model(self.upstream)
        backend = policy.SDPA if transformers_compat.supports(model, policy.SDPA) else policy.EAGER
        rejection = policy.Rejection(policy.FLASH, one_line(exc))
        decision = policy.AttnDecision(failed.requested, backend, failed.rejected + (rejection,),
                                          failed.source, failed.context)
        policy.apply(self.upstream, backend)
        logger.warning("s3prl_flashcompat: flash-attn failed at run time; re-running the batch. %s. Fix: %s",
                       decision.summary(), _FIX)
        # This device and dtype now run on the fallback, whatever the batch shape: no more calibration.
        self._static[self._key] = decision
        self._tuner.forget(self._key)
        self.attn_decision = decision


_FIX = ("run flash-attn on an Ampere+ GPU in fp16/bf16 (ESPnet: use_amp: true AND model_conf: autocast_frontend: "
        "true, else the frontend stays fp32), or set attn_implementation: sdpa; see `espnet-flashcompat doctor`")


def _check_upstream(hub, name) -> None:
    """A clear error for a missing or unknown upstream; a broken one raises its real cause from the hub."""
    known = hub.module_of(name) is not None if isinstance(hub, ResilientHub) else name in hub.options()
    if known:
        getattr(hub, name)  # imports its module now: S3PRLImportError names the real cause
        return
    close = close_names(hub, name)
    hint = f" Did you mean: {', '.join(close)}?" if close else " Run `espnet-flashcompat doctor` to list upstreams."
    raise ValueError(f"frontend_conf.upstream={name!r} is not an S3PRL upstream.{hint}")


def _check_batch(input: torch.Tensor, input_lengths: torch.Tensor) -> None:
    if input.dim() not in (2, 3) or input.size(0) == 0:
        raise ValueError("s3prl_flashcompat expects a non-empty (batch, samples) waveform batch, "
                         f"got {tuple(input.shape)}")
    empty = (input_lengths <= 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"zero-length utterance(s) at batch index {empty}: S3PRL upstreams need at least one sample")
