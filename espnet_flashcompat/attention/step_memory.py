"""The memory cap against the step's peak: where the timed forward is a part of a step (ESPnet's attention sites),
a calibration's peaks counted on top of what the step held besides that forward.

A site's calibration measures the memory its layers' calls keep and what the step held when the first call arrived;
the rest of the step (the other layers' activations, the loss, the backward) comes later. Once a step has run, its
peak is known: with backend ``ran`` running, the step held ``step_peak - peak(ran)`` besides the site's calls, and
backend b would have peaked at about that plus ``peak(b)``. ``on_top_of`` rebases the timings so; ``left_out``
says whether the cap left a backend out on them.
"""

from dataclasses import replace
from typing import Dict, Optional

from espnet_flashcompat.attention import choice


def left_out(timings: Dict) -> bool:
    """Whether the memory cap leaves a timed backend out of ``timings``."""
    ran = [t for t in timings.values() if isinstance(t, choice.Timing)]
    cap = choice.memory_cap(t.peak_bytes for t in ran)
    return any(t.peak_bytes > cap for t in ran)


def on_top_of(timings: Dict, ran: str, step_peak: int) -> Optional[Dict]:
    """``timings`` with each peak raised by what the step held besides ``ran``'s calls: ``step_peak`` (bytes, the
    step's peak with ``ran`` running) less ``ran``'s own timed peak, if positive; None where ``ran`` was not timed."""
    own = timings.get(ran)
    if not isinstance(own, choice.Timing):
        return None
    rest = max(step_peak - own.peak_bytes, 0)
    return {b: replace(t, peak_bytes=t.peak_bytes + rest) if isinstance(t, choice.Timing) else t
            for b, t in timings.items()}
