"""Measured-fastest ``auto``: time the healthy attention backends on the real batch (``choice`` picks from that).

``measure()`` runs one forward (and, when training, the backward into the trainable parameters) per backend and
repeat, on the caller's own batch, and leaves no trace: the RNG is forked, buffers are restored, ``.grad`` is
not touched (``torch.autograd.grad``) and every output is dropped. A backend that its first runs show cannot come
within ``choice.TIME_NOISE`` of the fastest leaves the race early (``RACE_AFTER``), and the race stops as soon as
its leader is known to be within ``choice.TIME_NOISE`` of every other backend or faster (``decided``: ties cost no
more runs than clear wins). What a backend pays per batch shape (``choice.shape_cost``) is read off its run on a
batch of a shape of its own (``reshaped(k)``: k times two frames shorter), right after its warm-up, above its runs,
less what every backend paid alike there (the rest of the model's work on a new shape). Without ``reshaped``, off
the warm-up itself, which also holds the backend's first use in the process and the allocator's growth (on an H200,
0.7 to 1.4 s for SDPA's memory-efficient kernel's first use, 72 ms for a larger batch, neither paid again per shape).
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
from typing import Callable, Dict, Iterable, Iterator, Optional, Sequence, Set, Tuple, Union

import torch

from espnet_flashcompat.attention import choice
from espnet_flashcompat.s3prl.errors import one_line

REPEATS = 4  # timed runs per backend at least, interleaved, after one untimed warm-up each
MAX_RUNS = 15  # ... and up to this many while the race is not decided (see CONFIDENCE): four backends within 2%
# that vary by 10% from run to run stay undecided for long (HuBERT's 10 s train step on an H200, 2026-12-04: 21 runs
# each before it was decided, 3.3 s), and whichever leads by then is within the noise of the others
# Racing: after RACE_AFTER timed runs each, a backend whose every run is slower than every run of the fastest one by
# more than TIME_NOISE is out of the race (its runs so far are its timing). Were both equally fast, 3 runs of one
# all above 3 of the other would happen by chance once in 20 (3! 3! / 6!), before the TIME_NOISE gap is asked too;
# and a backend outrun so cannot be picked on time (its mean is more than TIME_NOISE above the leader's).
RACE_AFTER = 3
# Decided: the race stops once the leader (the fastest mean of the backends within the memory cap) is, at this
# one-sided confidence, within TIME_NOISE of every other backend or faster: any pick among ties is within the promise,
# so a close call of steady backends needs no more runs than a clear one. Student's t on the runs kept (the slowest
# dropped) accounts for how little a few runs say about the spread: after 4 runs t is 2.92, after 9 it is 1.89. (A
# first try stopped a close call after 3 runs whatever their spread; on the H200 that let a drifting flash-attn take
# a 30 s ragged train step at 1.10x the best.)
CONFIDENCE = 0.95
UNSTEADY_RUNS = 9  # ... but a leader whose runs vary by more than STEADY (a stall, a drift) first runs 9 times:
# with the slowest run dropped, a stall every third run would hide in 4 runs and shows in 9
_T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812,
        15: 1.753, 20: 1.725, 25: 1.708}  # one-sided 95% quantiles of Student's t by degrees of freedom


Timings = Dict[str, Union[choice.Timing, str]]  # backend -> its Timing, or why it failed
_WARM_UP: contextvars.ContextVar[bool] = contextvars.ContextVar("warm_up", default=True)  # see without_warm_ups


def measure(forward: Callable[[], object], backends: Sequence[str], switch: Callable[[str], None],
            module: torch.nn.Module, device: torch.device,
            reshaped: Optional[Callable[[int], object]] = None, held: int = 0) -> Timings:
    """Backend -> its Timing on ``forward()``, or the error it raised (an out-of-memory, a kernel limit);
    ``reshaped(k)``: the same forward on a batch of the k-th other shape, run once per backend (each its own k) after
    its warm-up (within ``without_warm_ups()``, neither is run: one untimed run in all). ``held``: bytes the step
    holds besides what ``forward`` keeps, whichever backend runs, added to each peak, so that the memory cap compares
    what the step would hold (where ``forward`` is a part of the step)."""
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


def decided(times: Dict[str, Sequence[float]], peaks: Dict[str, int], out: Set[str]) -> bool:
    """Whether the leader of the backends still racing (the fastest mean of those within the memory cap) is within
    TIME_NOISE of each other one or faster, at CONFIDENCE: mean(leader) - mean(other) + t * se <= TIME_NOISE *
    mean(other), with se the standard error of that difference (Welch) and t Student's quantile at the smaller
    count of runs kept. The backends above the memory cap cannot be picked and do not hold the race up; an
    unsteady leader holds it until it has UNSTEADY_RUNS runs (an unsteady backend behind it cannot be picked on
    that account: it has to lead first)."""
    racing = {b: _kept(t) for b, t in times.items() if b not in out and t}
    if len(racing) < 2:
        return True
    if any(len(t) < 2 for t in racing.values()):
        return False
    cap = choice.memory_cap(peaks[b] for b in racing)
    fits = {b: t for b, t in racing.items() if peaks[b] <= cap}
    leader = min(fits, key=lambda b: statistics.mean(fits[b]))
    if len(times[leader]) < UNSTEADY_RUNS and max(times[leader]) > (1 + choice.STEADY) * min(times[leader]):
        return False
    lead = fits[leader]
    for other, runs in fits.items():
        if other == leader:
            continue
        se = math.sqrt(statistics.variance(lead) / len(lead) + statistics.variance(runs) / len(runs))
        t = _t95(min(len(lead), len(runs)) - 1)
        if statistics.mean(lead) - statistics.mean(runs) + t * se > choice.TIME_NOISE * statistics.mean(runs):
            return False
    return True


def _t95(df: int) -> float:
    return _T95[max(d for d in _T95 if d <= df)] if df >= 1 else math.inf


def _kept(times: Sequence[float]) -> list:
    """The runs a timing is made of: without the slowest (a possible stray hiccup) once there are more than two."""
    return sorted(times)[:-1] if len(times) > 2 else sorted(times)


def _outrun(times: Dict[str, list], peaks: Dict[str, int], out: Set[str]) -> Set[str]:
    """The backends still racing that every run of the leader (the fastest of those within the memory cap) beats by
    more than TIME_NOISE; see RACE_AFTER."""
    racing = {b: t for b, t in times.items() if b not in out and len(t) >= RACE_AFTER}
    if len(racing) < 2:
        return set()
    cap = choice.memory_cap(peaks[b] for b in racing)
    leader = min((b for b in racing if peaks[b] <= cap), key=lambda b: _timing(b, racing[b], 0).ms)
    bound = max(racing[leader]) * (1 + choice.TIME_NOISE)
    return {b for b, t in racing.items() if b != leader and min(t) > bound}


def _timing(backend: str, times: Sequence[float], peak: int, warmup_ms: float = 0.0,
            new_shape_ms: float = 0.0) -> choice.Timing:
    """The mean, not the median: a backend that stalls now and then (flash-attn's padded path waits on the host
    once per layer) costs a training run its mean time. The slowest run is dropped as a possible stray hiccup."""
    kept = _kept(times)
    return choice.Timing(backend, statistics.mean(kept), peak, (kept[-1] - kept[0]) / kept[0], len(times), warmup_ms,
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


