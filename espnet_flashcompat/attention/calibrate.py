"""Measured-fastest ``auto``: time the healthy attention backends on the real batch and keep the fastest.

``measure()`` runs one forward (and, when training, the backward into the trainable parameters) per backend and
repeat, on the caller's own batch, and leaves no trace: the RNG is forked, buffers are restored, ``.grad`` is
not touched (``torch.autograd.grad``) and every output is dropped. ``pick()`` turns the timings into an
``AttnDecision``: the fastest (by mean time) of the backends whose peak memory is within ``MEMORY_CAP`` of the
leanest, or the leaner one when two are within ``TIME_NOISE`` of each other and the leaner one is steady, and a
reason for every backend left out. A backend that its first runs show cannot come within ``TIME_NOISE`` of the
fastest leaves the race early (``RACE_AFTER``), the race stops as soon as its leader is known to be within
``TIME_NOISE`` of every other backend or faster (``decided``: ties cost no more runs than clear wins), and
``close_contenders()`` names the few worth a second look. A backend that builds something per batch shape is
charged that at the bucket's share of new shapes: what its run on a batch of a shape of its own (``reshaped(k)``: k
times two frames shorter), right after its warm-up, takes above its runs, less what every backend paid alike there
(the rest of the model's work on a new shape). Without ``reshaped``, the warm-up itself, which also holds the
backend's first use in the process and the allocator's growth (on an H200, 0.7 to 1.4 s for SDPA's memory-efficient
kernel's first use, 72 ms for a larger batch, neither paid again per shape).
Within ``without_warm_ups()`` (the tuner's, where earlier buckets measured that a new shape costs every contender
nothing) there is neither: one untimed run of one backend warms the batch's shape up for all (the rest of the
model's first work on it, the allocator's growth), and none is charged for it.
The caller names the batch shapes one decision stands for (``frontend_buckets``, ``espnet.model_calibration``).
CUDA only: peak memory is not measurable on CPU.
"""

import contextlib
import contextvars
import math
import statistics
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Iterable, Iterator, Optional, Sequence, Set, Tuple, Union

import torch

from espnet_flashcompat.attention.policy import AttnDecision, Rejection
from espnet_flashcompat.s3prl.errors import one_line

REPEATS = 4  # timed runs per backend at least, interleaved, after one untimed warm-up each
MAX_RUNS = 15  # ... and up to this many while the race is not decided (see CONFIDENCE): four backends within 2%
# that vary by 10% from run to run stay undecided for long (HuBERT's 10 s train step on an H200, 2026-12-04: 21 runs
# each before it was decided, 3.3 s), and whichever leads by then is within the noise of the others
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
# Each bucket is timed again on its 50th batch: the first batch is a cold run's (clocks, allocator and caches not yet
# settled), and two backends within a few percent of each other there may swap places a minute later (measured on an H200 with torch 2.11: docs/benchmarks.md).
RECHECK_AFTER = 50
RECHECK_MARGIN = 0.10  # ... timing again only the backends that came within 10% of the first pick (and fit in memory)
# Racing: after RACE_AFTER timed runs each, a backend whose every run is slower than every run of the fastest one by
# more than TIME_NOISE is out of the race (its runs so far are its timing). Were both equally fast, 3 runs of one
# all above 3 of the other would happen by chance once in 20 (3! 3! / 6!), before the TIME_NOISE gap is asked too;
# and a backend outrun so cannot be picked on time (its mean is more than TIME_NOISE above the leader's).
RACE_AFTER = 3
# Decided: the race stops once the leader (the fastest mean of the backends within MEMORY_CAP) is, at this one-sided
# confidence, within TIME_NOISE of every other backend or faster: any pick among ties is within the promise, so a
# close call of steady backends needs no more runs than a clear one. Student's t on the runs kept (the slowest
# dropped) accounts for how little a few runs say about the spread: after 4 runs t is 2.92, after 9 it is 1.89. (A
# first try stopped a close call after 3 runs whatever their spread; on the H200 that let a drifting flash-attn take
# a 30 s ragged train step at 1.10x the best.)
CONFIDENCE = 0.95
UNSTEADY_RUNS = 9  # ... but a leader whose runs vary by more than STEADY (a stall, a drift) first runs 9 times:
# with the slowest run dropped, a stall every third run would hide in 4 runs and shows in 9
_T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812,
        15: 1.753, 20: 1.725, 25: 1.708}  # one-sided 95% quantiles of Student's t by degrees of freedom


_WARM_UP: contextvars.ContextVar[bool] = contextvars.ContextVar("warm_up", default=True)  # see without_warm_ups


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


def measure(forward: Callable[[], object], backends: Sequence[str], switch: Callable[[str], None],
            module: torch.nn.Module, device: torch.device,
            reshaped: Optional[Callable[[int], object]] = None, held: int = 0) -> Dict[str, Union[Timing, str]]:
    """Backend -> its Timing on ``forward()``, or the error it raised (an out-of-memory, a kernel limit);
    ``reshaped(k)``: the same forward on a batch of the k-th other shape, run once per backend (each its own k) after
    its warm-up. ``held``: bytes the step holds besides what ``forward`` keeps, whichever backend runs, added to each
    peak, so that the memory cap compares what the step would hold (where ``forward`` is a part of the step)."""
    trainable = [p for p in module.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    times: Dict[str, list] = {b: [] for b in backends}
    warmups: Dict[str, float] = dict.fromkeys(backends, 0.0)
    peaks: Dict[str, int] = dict.fromkeys(backends, 0)
    failed: Dict[str, str] = {}
    outrun: Set[str] = set()
    new_shape: Dict[str, float] = dict.fromkeys(backends, 0.0)
    warm_up = _WARM_UP.get()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for round_ in range(MAX_RUNS + 1):  # round 0 warms up; the order alternates from round to round
                if round_ > RACE_AFTER:
                    outrun |= _outrun(times, peaks, set(failed) | outrun)
                if round_ > REPEATS and decided(times, peaks, set(failed) | outrun):
                    break
                order = backends if round_ % 2 else backends[::-1]
                for backend in (order if round_ or warm_up else order[:1]):
                    if backend in failed or backend in outrun:
                        continue
                    try:
                        ms, peak = _run_once(forward, backend, switch, trainable, device)
                        if not round_ and reshaped is not None and warm_up:
                            k = backends.index(backend) + 1
                            new_shape[backend] = _run_once(lambda: reshaped(k), backend, switch, trainable,
                                                           device)[0]
                    except Exception as exc:  # this backend cannot run this batch: it is out, with its reason
                        failed[backend] = one_line(exc)[:300]
                        release(exc)
                        continue
                    if round_:
                        times[backend].append(ms)
                    elif warm_up:
                        warmups[backend] = ms
                    peaks[backend] = max(peaks[backend], held + peak)
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    ran = [b for b in backends if b not in failed and times[b] and new_shape[b]]
    alike = min((new_shape[b] - _timing(b, times[b], 0).ms for b in ran), default=0.0)  # the rest of the model
    new_shape = {b: max(new_shape[b] - max(alike, 0.0), 0.0) if b in ran else 0.0 for b in backends}
    return {b: failed.get(b) or _timing(b, times[b], peaks[b], warmups[b], new_shape[b]) for b in backends}


@contextlib.contextmanager
def without_warm_ups() -> Iterator[None]:
    """``measure()`` warms up no backend of its own and runs none on another shape within this context: one run of
    one backend, untimed, warms the batch's shape up for all."""
    token = _WARM_UP.set(False)
    try:
        yield
    finally:
        _WARM_UP.reset(token)


def release(exc: BaseException) -> None:
    """Free what a failed forward left in its frames now: the traceback of an exception that passed through a
    context manager is a reference cycle, which would keep the partial forward's activations (gigabytes on a GPU)
    until the garbage collector's next full pass."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def close_contenders(timings: Dict[str, Union[Timing, str]], chosen: str) -> Tuple[str, ...]:
    """For the second look at a bucket: the pick of the first and the backends that ran within RECHECK_MARGIN of
    its time and within MEMORY_CAP of the leanest; the others cannot come close enough to swap places."""
    ran = [t for t in timings.values() if isinstance(t, Timing)]
    if chosen not in timings or not isinstance(timings[chosen], Timing):
        return tuple(t.backend for t in ran)
    cap = MEMORY_CAP * max(min(t.peak_bytes for t in ran), 1)
    bound = timings[chosen].ms * (1 + RECHECK_MARGIN)
    return (chosen,) + tuple(t.backend for t in ran if t.backend != chosen and t.ms <= bound and t.peak_bytes <= cap)


def decided(times: Dict[str, Sequence[float]], peaks: Dict[str, int], out: Set[str]) -> bool:
    """Whether the leader of the backends still racing (the fastest mean of those within MEMORY_CAP of the leanest)
    is within TIME_NOISE of each other one or faster, at CONFIDENCE: mean(leader) - mean(other) + t * se <=
    TIME_NOISE * mean(other), with se the standard error of that difference (Welch) and t Student's quantile at
    the smaller count of runs kept. The backends above MEMORY_CAP cannot be picked and do not hold the race up; an
    unsteady leader holds it until it has UNSTEADY_RUNS runs (an unsteady backend behind it cannot be picked on
    that account: it has to lead first)."""
    racing = {b: _kept(t) for b, t in times.items() if b not in out and t}
    if len(racing) < 2:
        return True
    if any(len(t) < 2 for t in racing.values()):
        return False
    cap = MEMORY_CAP * max(min(peaks[b] for b in racing), 1)
    fits = {b: t for b, t in racing.items() if peaks[b] <= cap}
    leader = min(fits, key=lambda b: statistics.mean(fits[b]))
    if len(times[leader]) < UNSTEADY_RUNS and max(times[leader]) > (1 + STEADY) * min(times[leader]):
        return False
    lead = fits[leader]
    for other, runs in fits.items():
        if other == leader:
            continue
        se = math.sqrt(statistics.variance(lead) / len(lead) + statistics.variance(runs) / len(runs))
        t = _t95(min(len(lead), len(runs)) - 1)
        if statistics.mean(lead) - statistics.mean(runs) + t * se > TIME_NOISE * statistics.mean(runs):
            return False
    return True


def _t95(df: int) -> float:
    return _T95[max(d for d in _T95 if d <= df)] if df >= 1 else math.inf


def _kept(times: Sequence[float]) -> list:
    """The runs a timing is made of: without the slowest (a possible stray hiccup) once there are more than two."""
    return sorted(times)[:-1] if len(times) > 2 else sorted(times)


def _outrun(times: Dict[str, list], peaks: Dict[str, int], out: Set[str]) -> Set[str]:
    """The backends still racing that every run of the leader (the fastest of those within MEMORY_CAP of the
    leanest) beats by more than TIME_NOISE; see RACE_AFTER."""
    racing = {b: t for b, t in times.items() if b not in out and len(t) >= RACE_AFTER}
    if len(racing) < 2:
        return set()
    cap = MEMORY_CAP * max(min(peaks[b] for b in racing), 1)
    leader = min((b for b in racing if peaks[b] <= cap), key=lambda b: _timing(b, racing[b], 0).ms)
    bound = max(racing[leader]) * (1 + TIME_NOISE)
    return {b for b, t in racing.items() if b != leader and min(t) > bound}


def _timing(backend: str, times: Sequence[float], peak: int, warmup_ms: float = 0.0,
            new_shape_ms: float = 0.0) -> Timing:
    """The mean, not the median: a backend that stalls now and then (flash-attn's padded path waits on the host
    once per layer) costs a training run its mean time. The slowest run is dropped as a possible stray hiccup."""
    kept = _kept(times)
    return Timing(backend, statistics.mean(kept), peak, (kept[-1] - kept[0]) / kept[0], len(times), warmup_ms,
                  new_shape_ms)


def _run_once(forward, backend, switch, trainable, device) -> Tuple[float, int]:
    switch(backend)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = forward()
    tensors = [t for t in _tensors(out) if t.requires_grad]
    if trainable and tensors:
        grads = [torch.ones_like(t) for t in tensors]
        torch.autograd.grad(tensors, trainable, grads, allow_unused=True)
    if cuda:
        torch.cuda.synchronize(device)
    ms = 1000 * (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - base if cuda else 0
    return ms, peak


def _tensors(out) -> Iterable[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for item in out:
            yield from _tensors(item)


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
    cap = MEMORY_CAP * max(min(t.peak_bytes for t in ran), 1)
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
    cap = MEMORY_CAP * max(leanest.peak_bytes, 1)
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
