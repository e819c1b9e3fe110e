"""When ``auto`` calibrates, and what it reuses instead: one frontend's calibrations (or one site's of ESPnet's own
attention, ``espnet.model_policy``), per shape bucket.

``Tuner.decision()`` gives the decision for a batch: the policy's (``static``) when nothing contends; else, per
shape bucket (``frontend_buckets.bucket``), a calibration at the bucket's first batch and a second look at its
``RECHECK_AFTER``-th that times only the backends that came close (``choice.close_contenders``). A
calibration is taken from the calibration store (``store``) when it holds the key (``calibration_key``), and every
finished one is written there, so that a later process on the same machine and stack measures nothing; an entry
made at the second look settles the bucket for good. Under DDP (``together``) there is one bucket per train/eval,
every rank measures or every rank reads the store (``ranks`` shares what each found), so that all pick alike.
The caller times (``measure``: contenders -> timings, on its own batch); this module decides when, and logs it.
It also counts, per bucket, the batches whose exact shape it had not seen: ``choice.pick`` charges a backend that
builds something per shape (cuDNN's attention) at the share of new shapes after the bucket's first batch (1 at the
first batch itself: length-sorted batches seldom repeat a shape); what each bucket shows a new shape costs a backend
is kept for the later buckets of the same device, dtype and train or eval (``shape_costs``), which then do not time
a backend that would pay more than ``choice.SKIP_SHAPE_COST`` runs per batch for it (cuDNN's attention, presumed
to until a bucket measures it), and warm none up where every contender was measured to pay nothing. Once
two buckets of a device, dtype and train or eval have been measured and one backend was within the tie margin of the
fastest in every one of them, its later buckets take that backend unmeasured (``_inherited``): the evidence says the
ranking does not change with the batch's size. Where the timed forward is a part of a step (ESPnet's attention
sites: ``step_peak``, the process's peak memory since the last calibration), a bucket whose first look left a backend
out for its memory picks again at its second batch, untimed: each peak counted on top of what the step held
besides the backend that ran (``step_memory``), so that the 1.1x cap is the step's, not the attention's own.
"""

import contextlib
import logging
import time
from dataclasses import replace
from typing import Callable, Dict, FrozenSet, Optional, Set, Tuple

from espnet_flashcompat.attention import (calibrate, calibration_key, choice, frontend_buckets, ranks,
                                          sdpa_kernels, shape_costs, step_memory, store)
from espnet_flashcompat.attention.policy import AttnDecision, Rejection

# Each bucket is timed again on its 50th batch: the first batch is a cold run's (clocks, allocator and caches not yet
# settled), and two backends within a few percent of each other there may swap places a minute later (measured on
# an H200 with torch 2.11: docs/benchmarks.md).
RECHECK_AFTER = 50
INHERIT_AFTER = 2  # measured buckets of one device, dtype and train or eval that must agree before others inherit
logger = logging.getLogger(__name__)


class Tuner:
    """The calibrations of one frontend (or attention site): decisions, timings and batches seen, per (device, dtype,
    bucket)."""

    def __init__(self, name: str = "s3prl_flashcompat", describe: Callable[[Tuple], str] = frontend_buckets.describe,
                 site: Optional[Dict[str, object]] = None, step_peak: Optional[Callable[[], int]] = None):
        self.name = name  # the log lines' prefix
        self.describe = describe  # a shape bucket in words; its last field says whether the batch passes a mask
        self.site = site  # the calibration store key's attention site, where the model's own cannot be read
        self.step_peak = step_peak  # bytes: the step's peak memory so far, where the timed forward is a part of it
        self.decisions: Dict[Tuple, AttnDecision] = {}
        self.seen: Dict[Tuple, int] = {}
        self.timings: Dict[Tuple, Dict] = {}  # the timings each bucket's last decision was made from
        self.settled: Set[Tuple] = set()  # buckets whose store entry came from a second look: no more timing
        self.keys: Dict[Tuple, Optional[calibration_key.Key]] = {}  # each bucket's key in the calibration store
        self.shapes: Dict[Tuple, Set[Optional[Tuple]]] = {}  # the exact batch shapes each bucket has seen
        self.shape_costs = shape_costs.ShapeCosts()  # what a new batch shape costs each backend, learned
        self.skipped: Dict[Tuple, Set[str]] = {}  # the contenders each bucket's last look did not time for that
        # each measured (or stored) bucket's pick and the backends that tied with it, which later buckets may inherit
        self.picks: Dict[Tuple, Tuple[str, FrozenSet[str]]] = {}

    def decision(self, key: Tuple, static: AttnDecision, shape: Tuple, together: bool, model, device,
                 measure: Callable, exact: Optional[Tuple] = None) -> AttnDecision:
        """The decision for a batch of ``shape`` (its bucket; ``exact``: the batch's own shape) on ``key`` =
        (device, dtype in effect); ``model``: the HF model whose attention is chosen (the store's key), None for no
        store."""
        bucket = key + (shape[0] if together else shape,)  # DDP: one calibration for train, one for eval
        seen = self.seen[bucket] = self.seen.get(bucket, 0) + 1
        self.shapes.setdefault(bucket, set()).add(exact)
        if seen == 1:
            self.decisions[bucket] = self._calibrate(bucket, static, shape, together, model, device, measure, seen)
        elif seen == 2 and self.step_peak is not None and (shape[0] or not together):
            self.decisions[bucket] = self._against_step(bucket, static, shape, together)
        elif seen == RECHECK_AFTER and bucket not in self.settled and (shape[0] or not together):
            share = self._new_shapes(bucket, seen)  # DDP: only training, whose steps are in lockstep
            share = max(ranks.gather(share)) if together else share  # ... and every rank the same share
            second = self._second_look(static, bucket, share)
            if second is not None:
                self.decisions[bucket] = self._calibrate(bucket, second, shape, together, model, device, measure,
                                                         seen, share)
        return self.decisions[bucket]

    def forget(self, key: Tuple) -> None:
        """Drop every bucket of ``key`` (a run-time fallback moved that device and dtype off calibration)."""
        for table in (self.decisions, self.seen, self.timings, self.keys, self.shapes, self.skipped, self.picks):
            for bucket in [b for b in table if b[:2] == key]:
                del table[bucket]
        self.settled = {b for b in self.settled if b[:2] != key}
        self.shape_costs.forget(key)

    def _calibrate(self, bucket, decision, shape, together, model, device, measure, seen,
                   share: float = 1.0) -> AttnDecision:
        refused = tuple(Rejection(b, why) for b in decision.contenders
                        if (why := sdpa_kernels.shape_rejection(b, masked=shape[-1])))
        contenders = tuple(b for b in decision.contenders if b not in {r.backend for r in refused})
        decision = replace(decision, contenders=contenders, rejected=decision.rejected + refused)
        where = self.describe(shape) + (", first batch" if seen == 1 else f", batch {seen}")
        if len(contenders) == 1 and not together:  # nothing to choose among on this shape
            decision = replace(decision, implementation=contenders[0], contenders=(),
                               context=f"{decision.context}, {where}")
            logger.info("%s: %s (the only contender that takes this shape)", self.name, decision.summary())
            return decision
        if together:
            where += f", decided across {ranks.world_size()} ranks"
        if seen == 1:  # the bucket's key names all its contenders, the second look's few included
            self.keys[bucket] = model is not None and calibration_key.key_for(
                model, bucket[1], (shape[0], "ranks", ranks.world_size()) if together else shape,
                contenders or (decision.implementation,), device, site=self.site) or None
        key = self.keys.get(bucket)
        if seen == 1:
            stored = self._from_store(bucket, key, decision, together, where)
            if stored is not None:
                self.picks[bucket] = (stored.implementation,
                                      choice.tied(self.timings[bucket], stored.implementation))
                return stored
            inherited = None if together else self._inherited(bucket, decision, contenders, where)
            if inherited is not None:
                store.release(key)  # nothing measured, nothing saved: processes waiting on this key go ahead
                return inherited
        # DDP ranks skip alike: the per-shape costs are learned from the merged timings, the share is agreed
        skipped = self.shape_costs.skipped(_kind(bucket), contenders, share)
        self.skipped[bucket] = {r.backend for r in skipped}
        decision = replace(decision, rejected=decision.rejected + tuple(skipped))
        contenders = tuple(b for b in contenders if b not in {r.backend for r in skipped})
        if skipped and len(contenders) == 1 and not together:  # the one left is the pick: nothing to time
            store.release(key)
            decision = replace(decision, implementation=contenders[0], contenders=(),
                               context=f"{decision.context}, {where}")
            logger.info("%s: %s (the only contender left to time)", self.name, decision.summary())
            return decision
        try:
            ran = self.decisions.get(bucket)  # what the bucket's batches ran since its first look
            step = self._peak(together) if ran is not None and self.step_peak is not None else None
            timed = contenders or (decision.implementation,)
            start = time.perf_counter()
            warm = self.shape_costs.costs_a_shape(_kind(bucket), timed)
            with contextlib.nullcontext() if warm else calibrate.without_warm_ups():
                timings = measure(timed)
            cost = time.perf_counter() - start
            if together:
                timings.update({r.backend: r.reason for r in decision.rejected})
                timings = ranks.merge(ranks.gather(timings))
            timings = step is not None and step_memory.on_top_of(timings, ran.implementation, step) or timings
            measured = choice.pick(timings, decision, where, share) or decision
            self.shape_costs.learn(_kind(bucket), timings)
            if measured.measured:
                self.picks[bucket] = (measured.implementation,
                                      choice.tied(timings, measured.implementation, share))
            spent = _spent(timings)
            timings = {**self.timings.get(bucket, {}), **timings}  # a second look keeps the first look's others
            kept = measured.measured and store.save(key, store.Entry.of(measured, timings, cost, seen))
        finally:
            store.release(key)  # processes waiting for this key go ahead, whatever happened here
        self.timings[bucket] = timings
        chosen = timings.get(measured.implementation)
        batches = f", {1e3 * cost / chosen.ms:.0f} batches' worth" if isinstance(chosen, choice.Timing) else ""
        logger.info("%s: %s (calibration took %.2f s%s%s%s)", self.name, measured.summary(), cost, batches, spent,
                    "; kept in the calibration store" if kept else "")
        return measured

    def _peak(self, together: bool) -> int:
        """``step_peak()``, the largest of every rank's under DDP (so that all ranks pick alike)."""
        return max(ranks.gather(self.step_peak())) if together else self.step_peak()

    def _against_step(self, bucket, static, shape, together) -> AttnDecision:
        """The bucket's decision at its second batch: picked again from its timings, untimed, where they left a
        backend out for its memory, with each peak on top of what the step held besides the backend its first batch
        ran (``step_memory``)."""
        decision, timings = self.decisions[bucket], self.timings.get(bucket, {})
        if not step_memory.left_out(timings):
            return decision
        peak = self._peak(together)
        rebased = step_memory.on_top_of(timings, decision.implementation, peak)
        if rebased is None:
            return decision
        timed = {b for b, t in timings.items() if isinstance(t, choice.Timing)}
        base = replace(decision, context=static.context,
                       rejected=tuple(r for r in decision.rejected if r.backend not in timed))
        where = f"{self.describe(shape)}, batch 2, memory against the step's peak of {peak / 2 ** 30:.2f} GiB"
        where += f", decided across {ranks.world_size()} ranks" if together else ""
        again = choice.pick(rebased, base, where) or decision
        self.timings[bucket] = rebased
        self.picks[bucket] = (again.implementation, choice.tied(rebased, again.implementation))
        logger.info("%s: %s (picked again from the first look's timings: %s)", self.name, again.summary(),
                    "the same pick" if again.implementation == decision.implementation else
                    f"{decision.implementation} before")
        return again

    def _new_shapes(self, bucket, seen: int) -> float:
        """The share of the bucket's batches after its first whose shape was new (1 at the first batch: length-sorted
        batches seldom repeat a shape; 1 too where the caller did not say its batches' shapes)."""
        shapes = self.shapes.get(bucket, {None})
        return 1.0 if seen == 1 or None in shapes else (len(shapes) - 1) / (seen - 1)

    def _inherited(self, bucket, decision, contenders, where) -> Optional[AttnDecision]:
        """A backend that was within the tie margin of the fastest in each of the ``INHERIT_AFTER`` or more buckets of
        this device, dtype and train or eval measured so far and can take this bucket's shape (the latest pick if it
        is one), else None (then measure). The bucket is settled: no second look."""
        kind = _kind(bucket)
        looks = [look for b, look in self.picks.items() if _kind(b) == kind and b != bucket]
        common = set(contenders).intersection(*(tied for _, tied in looks)) if len(looks) >= INHERIT_AFTER else set()
        if not common:
            return None
        latest = looks[-1][0]
        chosen = latest if latest in common else min(common, key=contenders.index)
        self.settled.add(bucket)
        inherited = replace(decision, implementation=chosen, contenders=(), context=f"{decision.context}, {where}")
        logger.info("%s: %s (not measured: within %.0f%% of the fastest in each of the %d buckets of this device, "
                    "dtype and train or eval measured so far)", self.name, inherited.summary(),
                    100 * choice.TIME_NOISE, len(looks))
        return inherited

    def _from_store(self, bucket, key, decision, together, where) -> Optional[AttnDecision]:
        """The decision of a stored calibration of ``key``, or None (then measure). Single process: ``lookup``
        waits for another process that is measuring the same key. DDP: a hit only if every rank has one."""
        if together:
            entry = store.load(key)
            found = ranks.gather(entry and (entry.timing_objects(), entry.batch))
            if not all(f and f[0] for f in found):
                return None
            timings, batch = ranks.merge([f[0] for f in found]), min(f[1] for f in found)
            stored = choice.pick(timings, decision, where + ", from the calibration store")
        else:
            entry = store.lookup(key)
            timings = entry and entry.timing_objects()
            stored = timings and entry.decision(decision, where + ", from the calibration store")
            batch = entry and entry.batch
        if not stored:  # a miss: this process now holds the key's claim until it saves what it measures
            return None
        self.timings[bucket] = timings
        self.shape_costs.learn(_kind(bucket), timings)  # as the process that measured them: later buckets skip alike
        if batch >= RECHECK_AFTER:
            self.settled.add(bucket)
        logger.info("%s: %s (from the calibration store: measured at batch %d of its bucket; %s)", self.name,
                    stored.summary(), batch, "settled" if bucket in self.settled else "timed again at batch "
                    f"{RECHECK_AFTER}")
        return stored

    def _second_look(self, decision, bucket, share: float) -> Optional[AttnDecision]:
        """The decision to calibrate again: the first look's pick and the backends close to it (under DDP from the
        timings all ranks share, so every rank asks the same), the others rejected with their first-look reason.
        None when nothing came close."""
        first, timings = self.decisions[bucket], self.timings.get(bucket, {})
        close = choice.close_contenders(timings, first.implementation) or (first.implementation,)
        skipped = {r.backend: r.reason for r in first.rejected if r.backend in self.skipped.get(bucket, ())}
        # shapes repeat after all (``share``, the share of new shapes, agreed by every rank under DDP): time them now
        close += tuple(b for b in skipped if not self.shape_costs.skipped(_kind(bucket), (b, first.implementation),
                                                                          share))
        if len(close) < 2:
            return None
        why = {b: f"not within {choice.RECHECK_MARGIN:.0%} of {first.implementation} at the first batch ({t})"
               if isinstance(t, choice.Timing) else f"failed at the first batch: {t}" for b, t in timings.items()}
        why.update(skipped)
        rejected = tuple(Rejection(b, why[b]) for b in decision.contenders if b not in close and b in why)
        return replace(decision, contenders=close, rejected=decision.rejected + rejected)


def _kind(bucket: Tuple) -> Tuple:
    """(device, dtype, train or eval) of a bucket: key + (shape,), or key + (train or eval,) under DDP."""
    last = bucket[2]
    return bucket[:2] + (last[0] if isinstance(last, tuple) else last,)


def _spent(timings: Dict) -> str:
    """Where a calibration's time went: the warm-ups (kernels built or loaded for a new shape) and the timed runs."""
    ran = [t for t in timings.values() if isinstance(t, choice.Timing)]
    if not any(t.warmup_ms for t in ran):
        return f": {sum(t.runs for t in ran)} timed runs, no warm-up (a new shape costs none of them anything)"
    warm = sum(t.warmup_ms for t in ran) / 1e3
    timed = sum(t.runs * t.ms for t in ran) / 1e3
    coldest = max(ran, key=lambda t: t.warmup_ms, default=None)
    cold = f" ({coldest.backend} {coldest.warmup_ms / 1e3:.2f} s)" if coldest and len(ran) > 1 else ""
    reshaped = sum(t.new_shape_ms for t in ran) / 1e3
    other = f", {len(ran)} runs on another shape {reshaped:.2f} s" if reshaped else ""
    return f": {len(ran)} warm-ups {warm:.2f} s{cold}, {sum(t.runs for t in ran)} timed runs about {timed:.2f} s{other}"
