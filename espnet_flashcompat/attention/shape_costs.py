"""What a batch of a new shape costs each backend, learned bucket by bucket, and what that spares a calibration.

Per (device, dtype, train or eval), a "kind" of bucket: a backend's cost of a new shape, in runs of its own time
(``choice.shape_cost`` / its run), presumed for cuDNN's attention (``sdpa_kernels.PRESUMED_SHAPE_COST``: it
builds a graph per sequence length) until a bucket measures it, then the lowest measured. From it, ``skipped()``
names the contenders a bucket need not time (a new shape would cost them more than ``choice.SKIP_SHAPE_COST``
runs per batch at the bucket's share of new shapes), and ``costs_a_shape()`` says whether a bucket must warm its
contenders up and run each on another shape at all: not once every one was measured to pay nothing for a new shape.
"""

from typing import Dict, Iterable, List, Set, Tuple

from espnet_flashcompat.attention import choice, sdpa_kernels
from espnet_flashcompat.attention.policy import Rejection


class ShapeCosts:
    """One tuner's knowledge of what a new batch shape costs each backend, per kind of bucket."""

    def __init__(self):
        self.runs: Dict[Tuple, Dict[str, float]] = {}  # kind -> backend -> what a new shape cost it, in its runs
        self.measured: Set[Tuple] = set()  # kind + (backend,): measured (on another shape), no longer presumed

    def learn(self, kind: Tuple, timings: Dict) -> None:
        """Keep what a new shape cost each backend that ran (``timings``' Timing objects): the first measurement
        replaces the presumed cost, later ones keep the lowest."""
        known = self._known(kind)
        for t in timings.values():
            if isinstance(t, choice.Timing) and t.ms > 0:
                cost = choice.shape_cost(t) / t.ms
                presumed = kind + (t.backend,) not in self.measured
                self.measured.add(kind + (t.backend,))
                if cost:
                    known[t.backend] = cost if presumed else min(known.get(t.backend, cost), cost)
                else:
                    known.pop(t.backend, None)

    def skipped(self, kind: Tuple, contenders: Iterable[str], new_shapes: float) -> List[Rejection]:
        """Rejections of the contenders not worth timing where a share ``new_shapes`` of the batches has a new
        shape: it costs them more than ``choice.SKIP_SHAPE_COST`` runs, presumed or measured (cuDNN's attention
        where lengths vary); one contender at least stays."""
        contenders, known = list(contenders), self._known(kind)
        out = [b for b in contenders if new_shapes * known.get(b, 0.0) > choice.SKIP_SHAPE_COST]
        if len(out) == len(contenders):
            out = out[1:]
        return [Rejection(b, f"a new batch shape costs it {known[b]:.1f}x its run time ({self._why(kind, b)}), "
                             f"and {new_shapes:.0%} of this bucket's batches had a new shape: not timed") for b in out]

    def costs_a_shape(self, kind: Tuple, contenders: Iterable[str]) -> bool:
        """Whether a new shape may cost one of ``contenders`` more than its run: presumed or measured so, or not
        measured yet (then calibration warms each up and runs it once on another shape)."""
        known = self._known(kind)
        return any(b in known or kind + (b,) not in self.measured for b in contenders)

    def forget(self, key: Tuple) -> None:
        """Drop what was learned on ``key`` = (device, dtype)."""
        self.runs = {kind: known for kind, known in self.runs.items() if kind[:2] != key}
        self.measured = {m for m in self.measured if m[:2] != key}

    def _known(self, kind: Tuple) -> Dict[str, float]:
        return self.runs.setdefault(kind, dict(sdpa_kernels.PRESUMED_SHAPE_COST))

    def _why(self, kind: Tuple, backend: str) -> str:
        if kind + (backend,) in self.measured:
            return "measured in an earlier bucket"
        return "presumed until a bucket measures it: it builds a graph per sequence length"
