"""Choosing and running attention: which backend an upstream's attention runs on, measured where it can be.

- ``policy``: the policy. ``decide()`` checks each backend (flash_attention_2, sdpa, eager) against the request, the
  device, the dtype and the upstream, and gives a reason for every one it rejects; ``apply()`` switches a model.
- ``calibrate``: ``auto`` on CUDA times the backends that pass on the real batch.
- ``choice``: timings, and the rule that picks from them (the fastest within the memory cap, the leaner of a tie).
- ``tuner``: when a frontend calibrates (per shape bucket, a first and a second look) and what it reuses instead.
- ``frontend_buckets``: the shape buckets of a frontend's waveform batches.
- ``shape_costs``: what a batch of a new shape costs each backend, learned bucket by bucket, and what that spares.
- ``step_memory``: the memory cap against a step's peak, where the timed forward is a part of the step.
- ``calibration_key``: what a calibration depends on (GPU, driver and library versions, the model's attention, the
  shape bucket, the contenders): the key it is kept under.
- ``store``: finished calibrations on disk, shared by every process of a machine (or a cluster's shared directory).
- ``sdpa_kernels``: SDPA's own kernels (cuDNN, flash, memory-efficient) as contenders, and the pin that runs one.
- ``ranks``: under DDP, every rank runs the backend chosen from all ranks' timings.
- ``transformers_compat``: the one place where transformers versions differ (attention switching in place).
- ``relpos_sdpa``: ESPnet's relative-position attention through SDPA, keeping no time x time tensor.
- ``wavlm``: S3PRL's own WavLM on its lean path (patches its attention modules in place, and back).
- ``wavlm_kernel``: WavLM's gated relative-position attention itself, choosing its path: the fused Triton kernels
  (fp16, bf16 on CUDA), else the bias built in the query's dtype for SDPA's kernels and rebuilt for the backward.
- ``wavlm_fused``: the fused path: the bias and dropout computed inside Triton kernels, differentiated by hand.
- ``wavlm_fused_kernels``: those Triton kernels (forward, the two halves of the backward, the dropout mask).

In 0.1 the policy was the module ``espnet_flashcompat.attention``; its names still resolve here.
"""


def __getattr__(name):
    from espnet_flashcompat import _moved

    return _moved.forward(__name__, name)
