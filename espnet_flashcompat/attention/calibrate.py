"""Measured-fastest ``auto``: time the healthy attention backends on the real batch and keep the fastest.

``measure()`` runs one forward (and, when training, the backward into the trainable parameters) per backend and
repeat, on the caller's own batch, and leaves no trace: the RNG is forked, buffers are restored, ``.grad`` is
not touched (``torch.autograd.grad``) and every output is dropped. ``pick()`` turns the timings into an
``AttnDecision``: the fastest (by mean time) of the backends whose peak memory is within ``MEMORY_CAP`` of the
leanest, or the leaner one when two are within ``TIME_NOISE`` of each other and the leaner one is steady, and a
reason for every backend left out. A backend that its first runs show cannot come within ``TIME_NOISE`` of the
fastest leaves the race early (``RACE_AFTER``), a close call stops earning runs once every mean is known well
enough (``SETTLED``), and ``close_contenders()`` names the few worth a second look.
``bucket()`` names the batch shapes one decision stands for. CUDA only: peak memory is not measurable on CPU.
"""

import math
import statistics
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Sequence, Set, Tuple, Union

import torch

from espnet_flashcompat.attention.policy import AttnDecision, Rejection
from espnet_flashcompat.s3prl.errors import one_line

REPEATS = 9  # timed runs per backend, interleaved, after one untimed warm-up each
CLOSE_CALL_REPEATS = 27  # ... and up to this many while the two fastest are within TIME_NOISE and not SETTLED
TIME_NOISE = 0.02  # times within 2% of the fastest count as a tie: the leaner backend wins it, if steady
MEMORY_NOISE = 0.02  # ... if it is leaner by more than this
MEMORY_CAP = 1.1  # never pick a backend above 1.1x the peak memory of the leanest
STEADY = 0.04  # a leaner backend takes a tie only if its runs agree within 4%: else it may not stay within 2%
# Each bucket is timed again on its 50th batch: the first batch is a cold run's (clocks, allocator and caches not yet
# settled), and two backends within a few percent of each other there may swap places a minute later (measured on an H200 with torch 2.11: docs/benchmarks.md).
RECHECK_AFTER = 50
RECHECK_MARGIN = 0.10  # ... timing again only the backends that came within 10% of the first pick (and fit in memory)
# Racing: after RACE_AFTER timed runs each, a backend whose every run is slower than every run of the fastest one by
# more than TIME_NOISE is out of the race (its runs so far are its timing). Were both equally fast, 3 runs of one
# all above 3 of the other would happen by chance once in 20 (3! 3! / 6!), before the TIME_NOISE gap is asked too;
# and a backend outrun so cannot be picked on time (its mean is more than TIME_NOISE above the leader's).
RACE_AFTER = 3
# Known well enough: a close call stops earning runs once every backend still racing has REPEATS timed runs and the
# standard error of its mean is within SETTLED of the mean. Two means so known differ from the true ones by less than
# TIME_NOISE together at about three standard errors: a 2% gap is not mistaken, a tie within 2% is one. (After 3
# runs, as first tried, the estimate of the spread itself was too rough: on the H200 it let a drifting flash-attn
# take a 30 s ragged train step at 1.10x the best.)
SETTLED = 0.005


@dataclass(frozen=True)
class Timing:
    backend: str
    ms: float  # mean of the timed runs without the slowest: what training pays, stalls included
    peak_bytes: int  # peak allocated above the memory in use before the run
    spread: float = 0.0  # (second slowest - fastest) / fastest over the timed runs: how steady the backend is

    def __str__(self) -> str:
        return f"{self.backend} {self.ms:.1f} ms / {self.peak_bytes / 2**30:.2f} GiB"


def bucket(input: torch.Tensor, lengths: torch.Tensor) -> Tuple:
    """The shapes one calibration stands for: train or eval, batch size and padded length to the next power
    of two, and whether the batch is ragged (flash-attn takes another, slower path for padded batches)."""
    batch, samples = input.shape[0], input.shape[-1]
    ragged = bool((lengths < samples).any())
    return (torch.is_grad_enabled(), 2 ** math.ceil(math.log2(batch)), 2 ** math.ceil(math.log2(samples)), ragged)


def describe(key: Tuple) -> str:
    grad, batch, samples, ragged = key
    return (f"{'train' if grad else 'eval'}, batch <= {batch}, <= {samples / 16000:g} s at 16 kHz"
            f"{', ragged' if ragged else ''}")


def measure(forward: Callable[[], object], backends: Sequence[str], switch: Callable[[str], None],
            module: torch.nn.Module, device: torch.device) -> Dict[str, Union[Timing, str]]:
    """Backend -> its Timing on ``forward()``, or the error it raised (an out-of-memory, a kernel limit)."""
    trainable = [p for p in module.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    times: Dict[str, list] = {b: [] for b in backends}
    peaks: Dict[str, int] = dict.fromkeys(backends, 0)
    failed: Dict[str, str] = {}
    outrun: Set[str] = set()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            round_ = 0  # round 0 warms up; the order alternates from round to round
            while round_ <= REPEATS or (round_ <= CLOSE_CALL_REPEATS and _close(times, set(failed) | outrun)
                                        and not _settled(times, set(failed) | outrun)):
                if round_ > RACE_AFTER:
                    outrun |= _outrun(times, peaks, set(failed) | outrun)
                for backend in (backends if round_ % 2 else backends[::-1]):
                    if backend in failed or backend in outrun:
                        continue
                    try:
                        ms, peak = _run_once(forward, backend, switch, trainable, device)
                    except Exception as exc:  # this backend cannot run this batch: it is out, with its reason
                        failed[backend] = one_line(exc)[:300]
                        release(exc)
                        continue
                    if round_:
                        times[backend].append(ms)
                    peaks[backend] = max(peaks[backend], peak)
                round_ += 1
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    return {b: failed.get(b) or _timing(b, times[b], peaks[b]) for b in backends}


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


def _close(times: Dict[str, list], out: Set[str]) -> bool:
    """Whether the two fastest backends still racing are within TIME_NOISE: a close call earns more runs."""
    typical = sorted(_timing(b, t, 0).ms for b, t in times.items() if b not in out and t)
    return len(typical) > 1 and typical[1] <= typical[0] * (1 + TIME_NOISE)


def _settled(times: Dict[str, list], out: Set[str]) -> bool:
    """Whether every backend still racing knows its mean to SETTLED (relative standard error)."""
    racing = [t for b, t in times.items() if b not in out]
    return all(len(t) >= REPEATS and statistics.stdev(t) / math.sqrt(len(t)) <= SETTLED * statistics.mean(t)
               for t in racing)


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


def _timing(backend: str, times: Sequence[float], peak: int) -> Timing:
    """The mean, not the median: a backend that stalls now and then (flash-attn's padded path waits on the host
    once per layer) costs a training run its mean time. The slowest run is dropped as a possible stray hiccup."""
    kept = sorted(times)[:-1] if len(times) > 2 else sorted(times)
    return Timing(backend, statistics.mean(kept), peak, (kept[-1] - kept[0]) / kept[0])


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


def pick(timings: Dict[str, Union[Timing, str]], base: AttnDecision, where: str) -> Optional[AttnDecision]:
    """The decision the timings support (``base`` gives the request and its earlier rejections); None when no
    backend ran, so that the caller keeps its own choice."""
    ran = [t for t in timings.values() if isinstance(t, Timing)]
    if not ran:
        return None
    known = {r.backend for r in base.rejected}  # rejected before calibration: said once
    rejected = [Rejection(b, f"failed during calibration: {t}") for b, t in timings.items()
                if isinstance(t, str) and b not in known]
    leanest = min(ran, key=lambda t: t.peak_bytes)
    cap = MEMORY_CAP * max(leanest.peak_bytes, 1)
    fits = [t for t in ran if t.peak_bytes <= cap]
    fastest = min(fits, key=lambda t: t.ms)
    tied = [t for t in fits if t.ms <= fastest.ms * (1 + TIME_NOISE)]
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
        else:
            why = f"slower ({t} vs {chosen})"
        rejected.append(Rejection(t.backend, why))
    return AttnDecision(base.requested, chosen.backend, base.rejected + tuple(rejected), base.source,
                        f"{base.context}, {where}", measured=True)
