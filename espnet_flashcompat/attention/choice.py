"""Timings, and the rule that picks a backend from them: the fastest within the memory cap, the leaner of a tie.

A ``Timing`` is what calibration (``calibrate.measure``) found of a backend on one batch: its mean time, peak
memory, spread, and what its warm-up and a run on another shape took. ``pick()`` turns the timings into an
``AttnDecision``: the fastest (by time per batch) of the backends whose peak memory is within ``MEMORY_CAP`` of the
leanest (``memory_cap``), or the leaner one when two are within ``TIME_NOISE`` of each other and the leaner one is
steady, and a reason for every backend left out. A backend that builds something per batch shape (cuDNN's attention)
is charged that (``shape_cost``) at the share of the bucket's batches that had a new shape (``per_batch``).
``tied()`` names the backends that keep the promise on these timings (what a later bucket may inherit),
``close_contenders()`` the few worth a second look.
"""

from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, Optional, Tuple, Union

from espnet_flashcompat.attention.policy import AttnDecision, Rejection

TIME_NOISE = 0.02  # times within 2% of the fastest count as a tie: the leaner backend wins it, if steady
MEMORY_NOISE = 0.02  # ... if it is leaner by more than this
MEMORY_CAP = 1.1  # never pick a backend above 1.1x the peak memory of the leanest
STEADY = 0.04  # a leaner backend takes a tie only if its runs agree within 4%: else it may not stay within 2%
# A backend whose first run on a batch's shape takes more than (1 + SHAPE_COST) runs builds something per shape,
# which a training run pays at every new batch length: on an H200 with torch 2.11 and cuDNN 9.19, SDPA's cuDNN
# attention took 276 ms per wav2vec2 train step when each batch had a new length, 53 ms when all had the same
# (docs/benchmarks.md). Timing one batch again and again hides that; the warm-up shows it.
SHAPE_COST = 1.0
SKIP_SHAPE_COST = 3.0  # ... and a later bucket does not time a backend whose new shapes would cost it 3 runs more
# per batch (4x its time): no attention kernel is 4x faster per run than another on one model (cuDNN: 4.2x)
RECHECK_MARGIN = 0.10  # a bucket's second look times only the backends within 10% of its first pick (that fit)


@dataclass(frozen=True)
class Timing:
    backend: str
    ms: float  # mean of the timed runs without the slowest: what training pays, stalls included
    peak_bytes: int  # peak allocated above the memory in use before the run
    spread: float = 0.0  # (second slowest - fastest) / fastest over the timed runs: how steady the backend is
    runs: int = 0  # timed runs
    warmup_ms: float = 0.0  # the untimed first run: kernels built or loaded for this shape, allocator growth (0: none)
    new_shape_ms: float = 0.0  # a run on a new shape after the warm-up, less what all paid alike (0: not measured)

    def __str__(self) -> str:
        built = f" + {shape_cost(self):.0f} ms per new shape" if shape_cost(self) else ""
        return f"{self.backend} {self.ms:.1f} ms / {self.peak_bytes / 2**30:.2f} GiB{built}"


def memory_cap(peaks: Iterable[int]) -> float:
    """Bytes: ``MEMORY_CAP`` times the leanest of ``peaks`` (at least a byte: on CPU no peak is measured)."""
    return MEMORY_CAP * max(min(peaks, default=0), 1)


def shape_cost(t: Timing) -> float:
    """What ``t``'s backend pays on a batch of a new shape beyond a run's time (ms): the excess of its run on another
    shape after the warm-up (else of the warm-up itself), when that is above (1 + SHAPE_COST) runs (cuDNN's attention
    builds a graph per sequence length); else 0 (a little slower than the runs is the allocator or the clocks; none
    for a backend measured without a warm-up)."""
    extra = (t.new_shape_ms or t.warmup_ms) - t.ms
    return extra if extra > SHAPE_COST * t.ms else 0.0


def per_batch(t: Timing, new_shapes: float) -> float:
    """``t``'s expected time per batch (ms) when a share ``new_shapes`` of the batches has a shape not seen before."""
    return t.ms + new_shapes * shape_cost(t)


def tied(timings: Dict[str, Union[Timing, str]], chosen: str, new_shapes: float = 1.0) -> FrozenSet[str]:
    """``chosen`` and the backends that ran within TIME_NOISE of its time per batch and within MEMORY_CAP of the
    leanest: any of them keeps the promise on these timings (what a later bucket may inherit)."""
    ran = [t for t in timings.values() if isinstance(t, Timing)]
    if not isinstance(timings.get(chosen), Timing):
        return frozenset({chosen})
    cap = memory_cap(t.peak_bytes for t in ran)
    bound = per_batch(timings[chosen], new_shapes) * (1 + TIME_NOISE)
    return frozenset({chosen} | {t.backend for t in ran if per_batch(t, new_shapes) <= bound and t.peak_bytes <= cap})


def pick(timings: Dict[str, Union[Timing, str]], base: AttnDecision, where: str,
         new_shapes: float = 1.0) -> Optional[AttnDecision]:
    """The decision the timings support (``base`` gives the request and its earlier rejections); None when no
    backend ran, so that the caller keeps its own choice. ``new_shapes``: the share of the bucket's batches whose
    shape was new (1 at its first batch), at which a backend's ``shape_cost`` counts."""
    ran = [t for t in timings.values() if isinstance(t, Timing)]
    if not ran:
        return None
    known = {r.backend for r in base.rejected}  # rejected before calibration: said once
    rejected = [Rejection(b, f"failed during calibration: {t}") for b, t in timings.items()
                if isinstance(t, str) and b not in known]
    leanest = min(ran, key=lambda t: t.peak_bytes)
    cap = memory_cap([leanest.peak_bytes])
    fits = [t for t in ran if t.peak_bytes <= cap]
    fastest = min(fits, key=lambda t: per_batch(t, new_shapes))
    tied = [t for t in fits if per_batch(t, new_shapes) <= per_batch(fastest, new_shapes) * (1 + TIME_NOISE)]
    lean_tie = min((t for t in tied if t is fastest or t.spread <= STEADY), key=lambda t: t.peak_bytes)
    chosen = lean_tie if lean_tie.peak_bytes < fastest.peak_bytes * (1 - MEMORY_NOISE) else fastest
    for t in ran:
        if t is chosen:
            continue
        if t.peak_bytes > cap:
            why = f"peak memory {t.peak_bytes / max(leanest.peak_bytes, 1):.2f}x the leanest ({t} vs {leanest})"
        elif t in tied and t.spread > STEADY and t.peak_bytes < chosen.peak_bytes * (1 - MEMORY_NOISE):
            why = f"ties within {TIME_NOISE:.0%} but is unsteady, its runs vary by {t.spread:.0%} ({t} vs {chosen})"
        elif t in tied:
            leaner = chosen.peak_bytes < t.peak_bytes * (1 - MEMORY_NOISE)
            why = f"ties within {TIME_NOISE:.0%}{', and uses more memory' if leaner else ''} ({t} vs {chosen})"
        elif shape_cost(t) and new_shapes and t.ms <= chosen.ms * (1 + TIME_NOISE):
            why = (f"pays {shape_cost(t):.0f} ms per new batch shape (measured on another shape), and {new_shapes:.0%} "
                   f"of this bucket's batches had a new shape ({t} vs {chosen})")
        else:
            why = f"slower ({t} vs {chosen})"
        rejected.append(Rejection(t.backend, why))
    return AttnDecision(base.requested, chosen.backend, base.rejected + tuple(rejected), base.source,
                        f"{base.context}, {where}", measured=True)


def close_contenders(timings: Dict[str, Union[Timing, str]], chosen: str) -> Tuple[str, ...]:
    """For the second look at a bucket: the pick of the first and the backends that ran within RECHECK_MARGIN of
    its time and within MEMORY_CAP of the leanest; the others cannot come close enough to swap places."""
    ran = [t for t in timings.values() if isinstance(t, Timing)]
    if chosen not in timings or not isinstance(timings[chosen], Timing):
        return tuple(t.backend for t in ran)
    cap = memory_cap(t.peak_bytes for t in ran)
    bound = timings[chosen].ms * (1 + RECHECK_MARGIN)
    return (chosen,) + tuple(t.backend for t in ran if t.backend != chosen and t.ms <= bound and t.peak_bytes <= cap)
