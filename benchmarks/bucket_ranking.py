"""Every ``auto`` contender on each shape bucket's own batches of the fine-tuning emulation
(``calibration_cost.py --each-bucket ROUNDS``): the whole train step, and the first attention layer's alone.

What it is for: a bucket that inherits a neighbour's pick assumes that the ranking of the contenders does not change
from bucket to bucket; a calibration that timed one attention call instead of a whole step, at a few percent of the
cost, would assume that the call ranks them as the step does. The tables say whether either holds, and how far from
the fastest the first run's pick was.
"""

import logging
import statistics
import time
import types

import torch

import attention_matrix

logger = logging.getLogger("calibration_cost")


def each_bucket(model, batches, looks, device, rounds: int, batch) -> dict:
    """Every contender's train step on each bucket's own batches, interleaved (round r: the bucket's r-th batch of
    the run, a shape of its own as the run gives it, every contender on it in turn): the ranking a bucket's
    calibration looks for, against which the first run's last pick for that bucket is read. Median ms of the rounds
    after the first (a kernel's first use in the process). Beside it, each contender's first attention layer alone
    on the same batch (``attention_alone``): whether a calibration that timed that call, at a few percent of a
    step's cost, would rank the contenders as the whole step does."""
    from espnet_flashcompat.attention import frontend_buckets, policy, sdpa_kernels

    contenders = policy.decide(policy.AUTO, types.SimpleNamespace(model=model), device, torch.bfloat16).contenders
    buckets = {}
    for lengths in batches:
        shape = frontend_buckets.bucket(torch.empty(len(lengths), max(lengths), device="meta"), torch.tensor(lengths))
        buckets.setdefault(shape, []).append(lengths)
    picks = {look[0]: look[4] for look in looks}  # each bucket's latest pick (the second look's, where it ran)
    out = {}
    for shape, listed in buckets.items():
        timed = [b for b in contenders if not sdpa_kernels.shape_rejection(b, masked=shape[-1])]
        times, alone, failed = {b: [] for b in timed}, {b: [] for b in timed}, {}
        for r in range(rounds + 1):
            x, mask = batch(listed[r % len(listed)], torch.bfloat16, device)
            for backend in (timed if r % 2 else timed[::-1]):
                if backend in failed:
                    continue
                attention_matrix.set_backend(model, backend)
                try:
                    for kept, step in ((times, attention_matrix.step_fn(model, x, mask, True, backend, strict=True)),
                                       (alone, attention_alone(model, x, mask, backend))):
                        began = time.perf_counter()
                        step()
                        torch.cuda.synchronize(device)
                        if r:
                            kept[backend].append(1e3 * (time.perf_counter() - began))
                except Exception as exc:  # a kernel that refuses this batch
                    failed[backend] = str(exc).splitlines()[0][:120]
        name = frontend_buckets.describe(shape)
        out[name] = {"batches": len(listed), "pick": picks.get(name), "failed": failed,
                     "ms": {b: statistics.median(t) for b, t in times.items() if t and b not in failed},
                     "attention alone ms": {b: statistics.median(t) for b, t in alone.items() if t and b not in failed}}
        logger.info("each bucket, %s: %s", name, out[name])
    return out


class _Captured(Exception):
    """Raised by the hook of ``attention_alone`` once it holds the first attention layer's inputs."""


def attention_alone(model, x, mask, backend: str):
    """A train step of the first attention layer alone, on its inputs from the model's own forward on ``x`` (cut
    short there, so the mask is the one the model prepares for ``backend``): its forward, then its backward into
    its parameters and its input."""
    from espnet_flashcompat.attention import sdpa_kernels

    layer = model.encoder.layers[0].attention
    held = {}

    def grab(module, args, kwargs):
        held["args"], held["kwargs"] = args, kwargs
        raise _Captured

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), sdpa_kernels.pinned(backend, strict=True):
            model(x, attention_mask=mask)
    except _Captured:
        pass
    finally:
        handle.remove()
    args, kwargs = held["args"], dict(held["kwargs"])
    if args:
        hidden, args = args[0].detach().requires_grad_(), args[1:]
    else:
        hidden = kwargs.pop("hidden_states").detach().requires_grad_()

    def step():
        layer.zero_grad(set_to_none=True)
        with sdpa_kernels.pinned(backend, strict=True):
            out = layer(hidden, *args, **kwargs)[0]
        out.float().square().mean().backward()
    return step


def table(each: dict) -> list:
    """The lines of the table of ``each_bucket``'s result (none when it did not run)."""
    lines = []
    if each:
        lines += ["", "| bucket: each contender's train step (ms, x the fastest), median | its first attention layer "
                  "alone (ms, x the fastest) | batches | first run's pick | pick / fastest |", "|---|---|---|---|---|"]
        for b, r in each.items():
            ratio = f"{r['ms'][r['pick']] / min(r['ms'].values()):.3f}" if r["pick"] in r["ms"] else "-"  # or failed
            lines.append(f"| {b}: {_ratios(r['ms'])} | {_ratios(r.get('attention alone ms', {}), 2)} | "
                         f"{r['batches']} | {r['pick']} | {ratio} |")
    return lines


def _ratios(ms: dict, digits: int = 1) -> str:
    """``backend ms (x the fastest)``, comma-separated."""
    fastest = min(ms.values(), default=None)
    return ", ".join(f"{k} {v:.{digits}f} ({v / fastest:.3f})" for k, v in sorted(ms.items())) or "-"
