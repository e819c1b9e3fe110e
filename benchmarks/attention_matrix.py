"""Attention backend matrix: eager / sdpa and each of its kernels / flash_attention_2 / auto on base-sized HF speech
encoders; results with their machine, versions and date: docs/benchmarks.md.

For a wav2vec2 and a HuBERT encoder of base size (hidden 768, 12 layers, 12 heads, random weights, bf16 weights
and inputs, batch 8), at 10 s and 30 s, full and ragged batches, inference and a train step: the median time
(CUDA events around each iteration, after warm-up; rounds that shuffle the order of the backends, and more
rounds while a column drifts) and the peak memory (``max_memory_allocated``: weights, inputs, activations and
gradients), with each backend's ratio to the best of its row. ``sdpa`` is torch's own pick among its kernels;
``sdpa:cudnn``, ``sdpa:flash``, ``sdpa:efficient`` are each kernel alone (``sdpa_kernels.pinned``, strict: a
kernel that refuses the batch says why in its cell).

``auto`` is what ``attn_implementation: auto`` picks for that model, device, dtype and row, as the frontend does
it: the policy (``policy.decide``) names the contenders (flash_attention_2 and SDPA's kernels), calibration
(``calibrate.measure`` on that row's batch, then ``choice.pick``) picks on the first batch of the bucket, the
pick runs ``tuner.RECHECK_AFTER`` - 2 more steps, and calibration picks again on the next: that second pick is
timed like the others. Both go through the frontend's own ``tuner.Tuner`` (SDPA's flash kernel skipped on ragged
batches, racing, the second look timing only close contenders) with a new calibration store. *picked / best*
compares the picked backend's own column with the row's best: by median, by mean (what training pays), and the 95%
bootstrap interval of the mean ratio over whole rounds. *calibration*: the wall seconds of both looks (in brackets,
the contenders' untimed first runs among them: kernels built or loaded, the first time in the process for cuDNN's
attention, which torch's own ``sdpa`` pays on its first batch as well) and their share of a 1,000-step run of that
row on the pick; *second run*: the same two looks by a new tuner over the same
store, as a later process (a resumed run, a decode job) makes them.

Ragged batches' lengths run from 100% down to 30% of the longest and pass an attention mask, as S3PRL does; full
batches pass none. The train step is forward plus backward of a scalar loss in train mode (the models' dropouts;
layerdrop and SpecAugment masking off, so that every step does the same work). Needs CUDA and, for the
flash_attention_2 column, a working flash-attn imported before transformers.

    python benchmarks/attention_matrix.py --out DIR --models wav2vec2 --seconds 10   # one model, one length
    python benchmarks/attention_matrix.py --out DIR                    # everything (run times: docs/gpu.md)
    python benchmarks/attention_matrix.py --models wav2vec2 --rounds 4 --max-rounds 4   # a quick look

Writes DIR/attention_matrix.md (tables) and DIR/attention_matrix.json (every timing), and prints the tables.
"""

import argparse
import datetime
import json
import logging
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

logger = logging.getLogger("attention_matrix")

# sdpa: torch's own pick among its kernels; sdpa:<kernel>: that kernel alone (sdpa_kernels.pinned, strict)
BACKENDS = ("eager", "sdpa", "sdpa:cudnn", "sdpa:flash", "sdpa:efficient", "flash_attention_2")
SAMPLE_RATE = 16000
BATCH = 8


def make_model(kind: str, dtype: torch.dtype):
    """A base-sized random ``kind`` encoder on the GPU in ``dtype``."""
    from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2Model

    config_cls, model_cls = {"wav2vec2": (Wav2Vec2Config, Wav2Vec2Model), "hubert": (HubertConfig, HubertModel)}[kind]
    config = config_cls(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.0)
    torch.manual_seed(0)
    return model_cls(config).to("cuda", dtype)


def make_batch(seconds: float, ragged: bool, dtype: torch.dtype, seed: int = 0):
    """(waveforms, attention_mask or None): random noise, zero-padded after each utterance when ragged."""
    samples = int(seconds * SAMPLE_RATE)
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = 0.1 * torch.randn(BATCH, samples, device="cuda", generator=g)
    if not ragged:
        return x.to(dtype), None
    lengths = torch.linspace(1.0, 0.3, BATCH, device="cuda").mul(samples).long()
    mask = torch.arange(samples, device="cuda")[None, :] < lengths[:, None]
    return (x * mask).to(dtype), mask.long()


def step_fn(model, x, mask, train: bool, backend: str = "", strict: bool = True):
    """One inference or train step on ``backend``'s SDPA kernel where it names one (strict: that kernel alone)."""
    from espnet_flashcompat.attention import sdpa_kernels

    if train:
        def step():
            model.zero_grad(set_to_none=True)
            with sdpa_kernels.pinned(backend, strict):
                out = model(x, attention_mask=mask).last_hidden_state
            out.float().square().mean().backward()
    else:
        @torch.no_grad()
        def step():
            with sdpa_kernels.pinned(backend, strict):
                model(x, attention_mask=mask)
    return step


def measure(step, warmup: int, iters: int):
    """Median ms over ``iters`` iterations (each timed with CUDA events), after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def auto_choice(model, dtype):
    """The decision of ``attn_implementation: auto`` for this model on this GPU and dtype."""
    from espnet_flashcompat.attention import policy

    holder = types.SimpleNamespace(model=model)  # policy.hf_model() finds the HF model at .model
    return policy.decide(policy.AUTO, holder, torch.device("cuda", torch.cuda.current_device()), dtype)


def calibrated_choice(model, decision, x, mask, train: bool, tuner, batch: int = 1):
    """What the frontend's calibration gives at the ``batch``-th batch of this row's bucket, through the frontend's
    own ``tuner.Tuner`` (the shape check, racing, the second look, the calibration store):
    (decision, {backend: timing or error} of what was timed, wall seconds the tuner took, seconds of warm-ups)."""
    from espnet_flashcompat.attention import calibrate, choice, frontend_buckets, sdpa_kernels

    if not decision.contenders:
        return decision, {}, 0.0, 0.0
    current, timed, warm = [decision.implementation], {}, [0.0]

    def switch(backend):
        current[0] = backend
        set_backend(model, backend)

    def forward(cut=0):
        with sdpa_kernels.pinned(current[0], strict=True):
            end = x.shape[1] - cut
            return model(x[:, :end], attention_mask=None if mask is None else mask[:, :end]).last_hidden_state

    def measure(contenders):  # as the frontend measures: the batch, and once per backend the batch cut short
        timings = calibrate.measure(forward, contenders, switch, model, x.device,
                                    lambda k: forward(k * frontend_buckets.NEW_SHAPE_CUT))
        timed.update({b: str(t) for b, t in timings.items()})
        warm[0] += sum(t.warmup_ms for t in timings.values() if isinstance(t, choice.Timing)) / 1e3
        return timings

    lengths = mask.sum(-1) if mask is not None else torch.full((x.shape[0],), x.shape[-1], device=x.device)
    key = (str(x.device), str(x.dtype))  # the frontend's (device, dtype in effect)
    with torch.set_grad_enabled(train):
        shape = frontend_buckets.bucket(x, lengths)
        tuner.seen[key + (shape,)] = batch - 1  # the tuner counts a bucket's batches; the steps between were run
        start = time.perf_counter()
        picked = tuner.decision(key, decision, shape, False, model, x.device, measure, exact=tuple(x.shape))
        cost = time.perf_counter() - start
    return picked, timed, cost, warm[0]


def set_backend(model, backend: str) -> None:
    from espnet_flashcompat.attention import policy, sdpa_kernels

    policy.apply(types.SimpleNamespace(model=model), backend)
    assert model.config._attn_implementation == sdpa_kernels.backend_of(backend), model.config._attn_implementation


STABLE = 0.03  # a column is stable when the medians of 4 consecutive stretches of it agree within 3%


def spread(times) -> float:
    """(max - min) / min over the medians of 4 consecutive stretches of ``times``: drift and bursts show here."""
    quarter = max(len(times) // 4, 1)
    parts = [statistics.median(times[i * quarter:(i + 1) * quarter] or times) for i in range(4)]
    return (max(parts) - min(parts)) / min(parts)


def run_model(kind, cases, backends, dtype, warmup, iters, rounds, max_rounds):
    from espnet_flashcompat.attention.calibrate import release

    model = make_model(kind, dtype)
    decision = auto_choice(model, dtype)
    logger.info("%s: auto -> %s", kind, decision.summary())
    rows = []
    for seconds, ragged, train in cases:
        model.train(train)
        x, mask = make_batch(seconds, ragged, dtype)
        # As the frontend: calibrate on the first batch of the bucket, train on the pick until the bucket's
        # RECHECK_AFTER-th batch, calibrate again there, and keep that pick (the auto column)
        from espnet_flashcompat.attention import store, tuner

        # First run: a new store; second run: a new process's tuner over the same store
        store_dir = tempfile.mkdtemp(prefix="attention_matrix_store_")
        os.environ[store.ENV_VAR] = store_dir
        first_tuner = tuner.Tuner("benchmark")
        first, first_calibration, first_cost, first_warm = calibrated_choice(model, decision, x, mask, train,
                                                                             first_tuner)
        if decision.contenders:
            set_backend(model, first.implementation)
            warm = step_fn(model, x, mask, train, first.implementation, strict=False)
            for _ in range(tuner.RECHECK_AFTER - 2):
                warm()
        picked, calibration, recheck_cost, recheck_warm = calibrated_choice(model, decision, x, mask, train,
                                                                            first_tuner, tuner.RECHECK_AFTER)
        again = tuner.Tuner("benchmark")
        second_run = [calibrated_choice(model, decision, x, mask, train, again, n)[2]
                      for n in (1, tuner.RECHECK_AFTER)]
        shutil.rmtree(store_dir, ignore_errors=True)
        logger.info("%s %gs%s %s: first batch %s -> %s; batch %d %s -> %s", kind, seconds,
                    " ragged" if ragged else "", "train" if train else "inference", first_calibration,
                    first.implementation, tuner.RECHECK_AFTER, calibration, picked.implementation)
        cells = {b: {"times": [], "peak": 0} for b in (*backends, "auto")}
        r = 0  # ``rounds`` rounds, then more (up to ``max_rounds``) while a column is not stable
        while r < rounds or (r < max_rounds and any(spread(c["times"]) > STABLE for c in cells.values() if c["times"])):
            r += 1
            order = random.Random(r).sample(list(cells), len(cells))  # a new order every round: no position bias
            for name in order:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                try:
                    backend = picked.implementation if name == "auto" else name
                    set_backend(model, backend)
                    step = step_fn(model, x, mask, train, backend, strict=name != "auto")
                    cells[name]["times"] += measure(step, warmup + 2 * (r == 1), iters)
                except Exception as exc:  # a backend that cannot run this row says why in its cell
                    cells[name]["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                    release(exc)  # else its partial forward stays allocated, inflating the next cells' peaks
                    logger.warning("%s %s: %s", kind, name, cells[name]["error"])
                    torch.cuda.synchronize()
                cells[name]["peak"] = max(cells[name]["peak"], torch.cuda.max_memory_allocated())
        del x, mask
        model.zero_grad(set_to_none=True)
        for name, cell in cells.items():
            if cell["times"]:
                cell["median_ms"] = statistics.median(cell["times"])
                cell["mean_ms"] = statistics.mean(cell["times"])  # what training pays: stalls included
                cell["round_spread"] = spread(cell["times"])
            cell["peak_gib"] = cell.pop("peak") / 2**30
        best = min((c["median_ms"] for n, c in cells.items() if n != "auto" and "median_ms" in c), default=None)
        best_mean = min((c["mean_ms"] for n, c in cells.items() if n != "auto" and "mean_ms" in c), default=None)
        for cell in cells.values():
            if "median_ms" in cell and best:
                cell["ratio"] = cell["median_ms"] / best
                cell["mean_ratio"] = cell["mean_ms"] / best_mean
        step_ms = cells["auto"].get("mean_ms")
        row = {"seconds": seconds, "ragged": ragged, "train": train, "auto": picked.implementation,
               "first_pick": first.implementation, "first_calibration": first_calibration,
               "calibration": calibration, "rounds": r, "cells": cells,
               "calibration_s": [first_cost, recheck_cost],  # both calibrations, wall seconds
               "warmup_s": [first_warm, recheck_warm],  # ... of which the contenders' untimed first runs
               "calibration_share_1000": share(first_cost + recheck_cost, step_ms),
               "second_run_s": second_run,  # the same two looks in a later process: from the store
               "second_run_share_1000": share(sum(second_run), step_ms),
               "pick_interval": pick_interval(cells, picked.implementation, backends, iters)}
        rows.append(row)
        logger.info("%s %s: %s", kind, case_name(row), "  ".join(
            f"{n} {c.get('median_ms', float('nan')):.1f} ms ({c['peak_gib']:.2f} GiB)" for n, c in cells.items()))
    del model
    torch.cuda.empty_cache()
    return {"model": kind, "auto_decision": decision.summary(), "rows": rows}


def share(cost_s: float, step_ms, steps: int = 1000):
    """``cost_s`` as a share of a ``steps``-step run of the row on the pick, the cost included."""
    return cost_s / (cost_s + step_ms * 1e-3 * steps) if step_ms else None


def pick_interval(cells, picked: str, backends, iters: int, resamples: int = 2000):
    """95% bootstrap interval of (picked backend's mean) / (the best backend's mean), resampling whole rounds,
    the same rounds for every column: how sure the row is of the pick's distance from the best."""
    rounds = {b: [sum(cells[b]["times"][i:i + iters]) for i in range(0, len(cells[b]["times"]), iters)]
              for b in backends if cells[b].get("times")}
    if picked not in rounds:
        return None
    rng, n = random.Random(0), min(len(r) for r in rounds.values())
    ratios = []
    for _ in range(resamples):
        sample = [rng.randrange(n) for _ in range(n)]
        totals = {b: sum(r[i] for i in sample) for b, r in rounds.items()}
        ratios.append(totals[picked] / min(totals.values()))
    ratios.sort()
    return [ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]]


def case_name(row) -> str:
    return f"{row['seconds']:g} s{' ragged' if row['ragged'] else ''}, {'train step' if row['train'] else 'inference'}"


def table(result, backends) -> str:
    names = (*backends, "auto")
    lines = [f"| case ({result['model']}) | " + " | ".join(names) + " | auto picked (first batch -> batch 50) | "
             "pick / best: median, mean [95% interval] | calibration: s (warm-ups), share of 1000 steps | "
             "second run (same store): s, share | rounds, worst spread |",
             "|---" * (len(names) + 6) + "|"]
    for row in result["rows"]:
        cells = []
        for name in names:
            c = row["cells"][name]
            if "median_ms" not in c:
                cells.append(f"fails: {c.get('error', '?')[:80]}")
                continue
            best = " **best**" if c["ratio"] == 1.0 and name != "auto" else ""
            cells.append(f"{c['median_ms']:.1f} ms, {c['ratio']:.2f}x, {c['peak_gib']:.2f} GiB{best}")
        worst = max(c.get("round_spread", 0.0) for c in row["cells"].values())
        picked = row["cells"].get(row["auto"], {})  # the picked backend's own column
        first = "" if row["first_pick"] == row["auto"] else f"{row['first_pick']} -> "
        share, again = row.get("calibration_share_1000"), row.get("second_run_share_1000")
        lines.append(f"| {case_name(row)} | " + " | ".join(cells) + f" | {first}{row['auto']} | "
                     f"{picked.get('ratio', float('nan')):.3f}x, {picked.get('mean_ratio', float('nan')):.3f}x "
                     f"[{interval(row)}] | {sum(row['calibration_s']):.1f} ({sum(row.get('warmup_s', [0])):.1f}), "
                     f"{'-' if share is None else f'{share:.2%}'} | {sum(row['second_run_s']):.2f}, "
                     f"{'-' if again is None else f'{again:.2%}'} | {row['rounds']}, {worst:.0%} |")
    return "\n".join(lines)


def interval(row) -> str:
    low, high = row.get("pick_interval") or (float("nan"), float("nan"))
    return f"{low:.3f}-{high:.3f}"


def environment() -> dict:
    try:  # first: flash-attn must be importable before transformers checks for it
        import flash_attn

        fa_version = flash_attn.__version__
    except Exception as exc:  # the flash_attention_2 column then shows why it fails
        fa_version = f"unavailable ({type(exc).__name__}: {exc})"
    import transformers

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name(), "capability": "sm_%d%d" % torch.cuda.get_device_capability(),
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "transformers": transformers.__version__, "flash_attn": fa_version,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="directory for attention_matrix.md and .json")
    parser.add_argument("--models", default="wav2vec2,hubert")
    parser.add_argument("--seconds", default="10,30")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations after each switch (+2 at first)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per backend and round")
    parser.add_argument("--rounds", type=int, default=16, help="rounds, each in a new order of the backends")
    parser.add_argument("--max-rounds", type=int, default=48, help="more rounds while a column is not stable")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    env = environment()
    logger.info("environment: %s", json.dumps(env))
    dtype = torch.bfloat16
    cases = [(float(s), ragged, train) for train in (False, True) for s in args.seconds.split(",")
             for ragged in (False, True)]
    results = [run_model(kind, cases, BACKENDS, dtype, args.warmup, args.iters, args.rounds,
                         args.max_rounds)
               for kind in args.models.split(",")]
    header = (f"{env['gpu']} ({env['capability']}), torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), "
              f"transformers {env['transformers']}, flash-attn {env['flash_attn']}, Python {env['python']}; "
              f"{env['date']}. Batch {BATCH}, bf16, median of {args.rounds} to {args.max_rounds} rounds of {args.iters} "
              f"iterations, each after {args.warmup} warm-up; cell: median ms, ratio to the row's best backend, peak allocated GiB.")
    text = header + "\n\n" + "\n\n".join(
        f"auto on {r['model']}: {r['auto_decision']}\n\n{table(r, BACKENDS)}" for r in results)
    print("\n" + text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "attention_matrix.md").write_text(text + "\n")
        (args.out / "attention_matrix.json").write_text(json.dumps({"environment": env, "results": results,
                                                                    "args": vars(args)}, indent=1, default=str))


if __name__ == "__main__":
    main()
