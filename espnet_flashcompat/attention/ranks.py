"""Agreement across DDP ranks: every rank runs the backend chosen from all ranks' calibration timings.

Under ``torch.distributed`` (a process group initialised, more than one rank) the frontend calibrates once per
(device, dtype, train or eval), at its first forward there. ESPnet's trainer calls the model's forward in
lockstep on every rank (DDP's all-reduce at each step, the ``iterator_stop`` all-reduce before each validation
batch), so that first forward is a point every rank reaches together: there ``gather()`` exchanges what each
rank measured on its own batch, or why it could not (a backend rejected or failed there), and ``merge()`` turns
that into one set of timings that every rank then picks from with the same rule, hence the same backend.
A rank that has nothing to time still takes part in the exchange, so nobody waits for it.

Without a process group (or with one rank) nothing is exchanged and calibration stays per shape bucket.
A run-time flash-attn fallback stays local to the rank that met it: the backends differ in kernels only, not in
parameters or in the collectives DDP makes, so ranks on different backends still train one model
(``tests/test_ranks.py`` shows it).
"""

from typing import Dict, List, Union

import torch

from espnet_flashcompat.attention.choice import Timing

Timings = Dict[str, Union[Timing, str]]  # backend -> its Timing, or why it cannot run there


def world_size() -> int:
    """How many ranks take decisions together: 1 without an initialised process group."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather(timings: Timings) -> List[Timings]:
    """Every rank's timings, in rank order (a collective: every rank must call it)."""
    if world_size() == 1:
        return [timings]
    out: List[Timings] = [{} for _ in range(world_size())]
    torch.distributed.all_gather_object(out, timings)
    return out


def merge(per_rank: List[Timings]) -> Timings:
    """One set of timings for all ranks: a backend runs only if it ran on every rank, and it costs what it cost on
    its slowest rank (a DDP step waits for the slowest rank at the gradient all-reduce), at its highest peak and its
    slowest warm-up (what a new batch shape costs it)."""
    backends = list(dict.fromkeys(b for timings in per_rank for b in timings))
    merged: Timings = {}
    for backend in backends:
        results = [timings.get(backend, "not a contender there") for timings in per_rank]
        failed = [(rank, r) for rank, r in enumerate(results) if not isinstance(r, Timing)]
        if failed:
            rank, reason = failed[0]
            merged[backend] = f"rank {rank}: {reason}"
            continue
        merged[backend] = Timing(backend, max(t.ms for t in results), max(t.peak_bytes for t in results),
                                 max(t.spread for t in results), min(t.runs for t in results),
                                 max(t.warmup_ms for t in results), max(t.new_shape_ms for t in results))
    return merged
