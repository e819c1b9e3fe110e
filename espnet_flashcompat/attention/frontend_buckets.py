"""The shape buckets of a frontend's waveform batches: the batch shapes one calibration stands for (``bucket``), in
words for the log (``describe``), and how much shorter a batch must be to have another shape in the attention
(``NEW_SHAPE_CUT``, for ``calibrate``'s cost of a new shape). ESPnet's own attention has its own buckets
(``espnet.model_calibration``).
"""

import math
from typing import Tuple

import torch

# A batch this many samples shorter has another shape in the attention: two frames of the upstreams' convolutional
# front ends (320 samples each; S3PRL's own encoders pad to an even frame count, so one frame may not do)
NEW_SHAPE_CUT = 640


def bucket(input: torch.Tensor, lengths: torch.Tensor) -> Tuple:
    """Train or eval, batch size and padded length to the next power of two, and whether the batch is ragged
    (flash-attn takes another, slower path for padded batches; SDPA's flash kernel refuses the mask it passes)."""
    batch, samples = input.shape[0], input.shape[-1]
    ragged = bool((lengths < samples).any())
    return (torch.is_grad_enabled(), 2 ** math.ceil(math.log2(batch)), 2 ** math.ceil(math.log2(samples)), ragged)


def describe(key: Tuple) -> str:
    grad, batch, samples, ragged = key
    return (f"{'train' if grad else 'eval'}, batch <= {batch}, <= {samples / 16000:g} s at 16 kHz"
            f"{', ragged' if ragged else ''}")
