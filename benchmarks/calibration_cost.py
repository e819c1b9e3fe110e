"""What `auto`'s calibration costs a user: a short fine-tuning run and parallel decode jobs, first and repeated.

Corpus: LibriSpeech train-clean-100's utterance lengths, as a histogram in 1-second bins (S3PRL's
``len_for_bucket/train-clean-100.csv``: 28,539 utterances, 100.6 h, 1.41 to 24.5 s, mean 12.7 s, median 14.0 s);
lengths are drawn uniformly within each bin (seeded).

*fine-tuning*: ``--steps`` train steps (forward and backward, bf16) of a random base-size Hugging Face ``--model``
(``attention_matrix.make_model``) on the batches ESPnet's ``batch_type: numel`` gives: ESPnet's own
``NumElementsBatchSampler`` on a shape file of those lengths (``--batch-bins`` samples, default 1,800,000: 8
utterances of 14 s), the batch list shuffled per epoch as ESPnet's iterator does. Every batch asks the frontend's own
``tuner.Tuner`` for its decision (per shape bucket: a calibration at its first batch and a second look at its 50th),
then runs on the pick. *first run*: an empty calibration store; *repeated run*: a new tuner over the same store and
the same batches, as a resumed run or another seed makes it. With ``--each-bucket ROUNDS``, then every contender's
train step, and its first attention layer's alone, on each bucket's own batches, interleaved (``bucket_ranking``):
whether the ranking changes from bucket to bucket, whether one attention call ranks the contenders as the step does,
and how far from the fastest the first run's pick was. With ``--named BACKENDS``, then the first run's batches (its
first ``--named-steps``) again with each backend named (no calibration), each in a process of its own as the first
run was the process's first GPU work: what ``auto``'s first run over those batches, calibration included, costs or
saves against naming the fastest backend and against torch's own ``sdpa`` (what transformers runs when nothing is
named).

*parallel decode*: ``--jobs`` processes on one GPU at once, one store between them, each running the upstream of
``--utterances`` / jobs utterances one at a time in eval mode (``asr_inference`` with batch size 1), then again over
the same store. Shares are of the upstream's forward time only (beam search not counted): an upper bound of what a
decode job loses.

    python benchmarks/calibration_cost.py --out DIR [--model wav2vec2] [--steps 2000] [--jobs 8] [--each-bucket 8]
    python benchmarks/calibration_cost.py --out DIR --scenarios finetune --named sdpa,flash_attention_2 \
        --named-steps 600
    python benchmarks/calibration_cost.py --out DIR --scenarios decode --jobs 8 --utterances 400

Writes DIR/calibration_cost.md and .json and prints the tables.
"""

import argparse
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attention_matrix  # noqa: E402  (the models, steps and environment of the attention matrix)
import bucket_ranking  # noqa: E402  (every contender on each bucket's batches: --each-bucket)

logger = logging.getLogger("calibration_cost")
SAMPLE_RATE = 16000
TRAIN_CLEAN_100 = {1: 24, 2: 563, 3: 683, 4: 670, 5: 620, 6: 636, 7: 661, 8: 722, 9: 785, 10: 975, 11: 1379,
                   12: 2491, 13: 4074, 14: 6012, 15: 6428, 16: 1763, 17: 49, 18: 1, 19: 2, 24: 1}


def corpus(n: int, seed: int):
    """``n`` lengths in samples, from the histogram (the whole corpus for n = 28,539)."""
    rng = random.Random(seed)
    bins = rng.choices(list(TRAIN_CLEAN_100), weights=list(TRAIN_CLEAN_100.values()), k=n)
    return [int(SAMPLE_RATE * min(max(b + rng.random(), 1.41), 24.525)) for b in bins]


def numel_batches(lengths, batch_bins: int):
    """ESPnet's ``NumElementsBatchSampler`` on a ``speech_shape`` file of ``lengths``: lists of lengths."""
    from espnet2.samplers.num_elements_batch_sampler import NumElementsBatchSampler

    with tempfile.NamedTemporaryFile("w", suffix=".shape", delete=False) as f:
        f.writelines(f"utt{i:06d} {n}\n" for i, n in enumerate(lengths))
    try:
        sampler = NumElementsBatchSampler(batch_bins, [f.name], sort_in_batch="descending", sort_batch="ascending")
    finally:
        os.unlink(f.name)
    return [[lengths[int(k[3:])] for k in keys] for keys in sampler.batch_list]


class Run:
    """One process's use of ``auto``: a tuner, and what its calibrations cost."""

    def __init__(self, model, device):
        from espnet_flashcompat.attention import policy, tuner

        self.model, self.device, self.tuner = model, device, tuner.Tuner("benchmark")
        holder = types.SimpleNamespace(model=model)  # policy.hf_model() finds the HF model at .model
        self.decision = policy.decide(policy.AUTO, holder, device, next(model.parameters()).dtype)
        self.measured_s = 0.0
        self.steps = {}  # pick -> wall seconds of each step it ran (calibration not included)
        self.looks = []  # (bucket, batch of the bucket, measured, store or not timed, seconds, pick, ms timed)

    def step(self, lengths, train: bool) -> float:
        """One batch of ``lengths`` on the pick; its wall seconds, calibration included."""
        from espnet_flashcompat.attention import calibrate, choice, frontend_buckets, sdpa_kernels

        start = time.perf_counter()
        x, mask = batch(lengths, next(self.model.parameters()).dtype, self.device)
        current, measured = [self.decision.implementation], [0.0]

        def switch(backend):
            current[0] = backend
            attention_matrix.set_backend(self.model, backend)

        def forward(cut=0):
            with sdpa_kernels.pinned(current[0], strict=True):
                end = x.shape[1] - cut
                return self.model(x[:, :end], attention_mask=None if mask is None else mask[:, :end]).last_hidden_state

        def measure(contenders):  # as the frontend measures: the batch, and once per backend the batch cut short
            began = time.perf_counter()
            try:
                return calibrate.measure(forward, contenders, switch, self.model, x.device,
                                         lambda k: forward(k * frontend_buckets.NEW_SHAPE_CUT))
            finally:
                measured[0] += time.perf_counter() - began

        key = (str(x.device), str(x.dtype))
        with torch.set_grad_enabled(train):
            shape = frontend_buckets.bucket(x, torch.tensor(lengths, device=x.device))
            began = time.perf_counter()
            picked = self.tuner.decision(key, self.decision, shape, False, self.model, x.device, measure,
                                         exact=tuple(x.shape))
            asked = time.perf_counter() - began
        seen = self.tuner.seen[key + (shape,)]
        stored = seen == 1 and not measured[0] and key + (shape,) in self.tuner.timings
        if measured[0] or stored or seen == 1:  # "not timed": inherited, or the only contender left
            how = "measured" if measured[0] else "store" if stored else "not timed"
            timings = self.tuner.timings.get(key + (shape,), {}) if measured[0] or stored else {}
            ms = {b: round(t.ms, 2) for b, t in timings.items() if isinstance(t, choice.Timing)}
            self.looks.append((frontend_buckets.describe(shape), seen, how, asked, picked.implementation, ms))
        self.measured_s += measured[0]
        attention_matrix.set_backend(self.model, picked.implementation)
        began = time.perf_counter()
        attention_matrix.step_fn(self.model, x, mask, train, picked.implementation, strict=False)()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.steps.setdefault(picked.implementation, []).append(time.perf_counter() - began)
        return time.perf_counter() - start


def batch(lengths, dtype, device):
    """Noise of the batch's lengths, zero-padded, and its attention mask (None when all are as long)."""
    longest = max(lengths)
    x = 0.1 * torch.randn(len(lengths), longest, device=device)
    if min(lengths) == longest:
        return x.to(dtype), None
    mask = torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    return (x * mask).to(dtype), mask.long()


def summary(run: Run, wall: float, steps: int) -> dict:
    looks = run.looks
    return {"steps": steps, "wall_s": wall, "calibration_s": run.measured_s, "share": run.measured_s / wall,
            "buckets": len({look[0] for look in looks if look[1] == 1}),
            "measured": sum(look[2] == "measured" for look in looks),
            "from_store": sum(look[2] == "store" for look in looks), "looks": looks,
            "steps_by_pick": {b: [len(t), 1e3 * statistics.median(t)] for b, t in run.steps.items()}}


def finetune(args, device) -> dict:
    lengths = corpus(sum(TRAIN_CLEAN_100.values()), seed=0)
    listed = numel_batches(lengths, args.batch_bins)
    order, rng = [], random.Random(1)
    while len(order) < max(args.steps, args.repeat_steps):
        epoch = list(listed)
        rng.shuffle(epoch)
        order += epoch
    logger.info("fine-tuning: %d batches per epoch (batch_bins %d), batch sizes %d-%d", len(listed),
                args.batch_bins, min(map(len, listed)), max(map(len, listed)))
    model = attention_matrix.make_model(args.model, torch.bfloat16).train()
    out, window = {}, min(args.named_steps or args.steps, args.steps)
    for name, steps in (("first run", args.steps), ("repeated run", args.repeat_steps)):
        run, wall, early = Run(model, device), 0.0, None
        for i, b in enumerate(order[:steps]):
            wall += run.step(b, train=True)
            if i + 1 == window:  # what the named runs are set against
                early = {"steps": window, "wall_s": wall, "calibration_s": run.measured_s}
        out[name] = dict(summary(run, wall, steps), window=early)
        logger.info("fine-tuning, %s: %s", name, {k: v for k, v in out[name].items() if k not in ("looks", "window")})
    if args.each_bucket:
        out["each bucket"] = bucket_ranking.each_bucket(model, order[:args.steps], out["first run"]["looks"], device,
                                                        args.each_bucket, batch)
    if args.named:
        out["named"] = {b: named(order[:window], b, args.model) for b in args.named.split(",")}
    return out


def named(batches, backend: str, model_kind: str) -> dict:
    """``batches`` as train steps with ``backend`` named, in a new process: its wall seconds (or why it failed)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, result = Path(tmp, "batches.json"), Path(tmp, "named.json")
        spec.write_text(json.dumps(batches))
        proc = subprocess.run([sys.executable, __file__, "--named-worker", backend, "--model", model_kind,
                               "--out", str(result), "--batches", str(spec)], capture_output=True, text=True)
        if proc.returncode:
            return {"failed": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1][:200]}
        out = json.loads(result.read_text())
    logger.info("fine-tuning, %s named: %s", backend, out)
    return out


def named_worker(batches, backend: str, model_kind: str, out: Path, device) -> None:
    """The body of ``named``: every batch's train step on ``backend``, timed as ``Run.step`` times auto's."""
    model = attention_matrix.make_model(model_kind, torch.bfloat16).train()
    attention_matrix.set_backend(model, backend)
    wall = 0.0
    for lengths in batches:
        start = time.perf_counter()
        x, mask = batch(lengths, torch.bfloat16, device)
        attention_matrix.step_fn(model, x, mask, True, backend, strict=False)()
        torch.cuda.synchronize(device)
        wall += time.perf_counter() - start
    out.write_text(json.dumps({"steps": len(batches), "wall_s": wall}))


def new_shapes(args, device) -> dict:
    """Train steps of batch 8 on each backend: the same length every step, then a new length every step (10 s plus
    20 ms more each time, as length-sorted batches give): what a backend pays per new shape (a cuDNN graph built
    per sequence length shows here, and nowhere in a calibration that times one batch again and again)."""
    model = attention_matrix.make_model(args.model, torch.bfloat16).train()
    out = {}
    for backend in ("sdpa:cudnn", "sdpa:efficient", "flash_attention_2"):
        attention_matrix.set_backend(model, backend)
        row = {}
        for name, grow in (("same length", 0), ("a new length each step", 320)):
            times = []
            for i in range(args.shape_steps + 2):
                n = 10 * SAMPLE_RATE + grow * i
                x, mask = batch([n - k * SAMPLE_RATE // 4 for k in range(8)], torch.bfloat16, device)
                began = time.perf_counter()
                attention_matrix.step_fn(model, x, mask, True, backend, strict=True)()
                torch.cuda.synchronize(device)
                times.append(1e3 * (time.perf_counter() - began))
            row[name] = statistics.median(times[2:])
        out[backend] = row
        logger.info("new shapes, %s: %s", backend, row)
    return out


def decode(args, device) -> dict:
    store_dir = tempfile.mkdtemp(prefix="calibration_cost_store_")
    lengths = corpus(args.utterances, seed=2)
    out = {}
    for name in ("first run", "repeated run"):
        with tempfile.TemporaryDirectory() as tmp:
            procs = []
            for job in range(args.jobs):
                share = lengths[job::args.jobs]
                result = Path(tmp, f"job{job}.json")
                env = {**os.environ, "ESPNET_FLASHCOMPAT_CALIBRATION_DIR": store_dir}
                procs.append((subprocess.Popen([sys.executable, __file__, "--decode-worker", json.dumps(share),
                                                "--model", args.model, "--out", str(result)], env=env), result))
            jobs = [json.loads(r.read_text()) for p, r in procs if p.wait() == 0]
        looks = [look for j in jobs for look in j["looks"]]
        wall = sum(j["wall_s"] for j in jobs)
        cost = sum(j["calibration_s"] for j in jobs)
        out[name] = {"jobs": len(jobs), "failed": args.jobs - len(jobs), "wall_s": wall, "calibration_s": cost,
                     "share": cost / wall if wall else None, "keys": len({look[0] for look in looks}),
                     "measured": sum(look[2] == "measured" for look in looks),
                     "from_store": sum(look[2] == "store" for look in looks)}
        logger.info("parallel decode, %s: %s", name, out[name])
    return out


def decode_worker(lengths, model_kind: str, out: Path, device) -> None:
    model = attention_matrix.make_model(model_kind, torch.bfloat16).eval()
    run = Run(model, device)
    wall = sum(run.step([n], train=False) for n in lengths)
    out.write_text(json.dumps(summary(run, wall, len(lengths))))


def table(result: dict) -> str:
    lines = ["| scenario | run | wall s | calibration s | share | buckets or keys | measured | from the store |",
             "|---|---|---|---|---|---|---|---|"]
    for scenario, runs in result.items():
        for name, r in runs.items() if scenario != "new shapes" else ():
            if name in ("each bucket", "named"):
                continue
            lines.append(f"| {scenario} | {name} | {r['wall_s']:.1f} | {r['calibration_s']:.2f} | {r['share']:.2%} | "
                         f"{r.get('buckets', r.get('keys'))} | {r['measured']} | {r['from_store']} |")
    looks = result.get("fine-tuning", {}).get("first run", {}).get("looks", [])
    if looks:  # each timed backend's ms over the fastest's: whether the ranking changes with the bucket
        lines += ["", "| bucket (fine-tuning, first run) | batch | how | s | pick | timed: ms (x the fastest) |",
                  "|---|---|---|---|---|---|"]
        for b, n, how, s, pick, ms in looks:
            timed = ", ".join(f"{k} {v:.1f} ({v / min(ms.values()):.3f})" for k, v in sorted(ms.items()))
            lines.append(f"| {b} | {n} | {how} | {s:.2f} | {pick} | {timed} |")
    lines += _named_table(result.get("fine-tuning", {}))
    lines += bucket_ranking.table(result.get("fine-tuning", {}).get("each bucket", {}))
    return "\n".join(lines)


def _named_table(runs: dict) -> list:
    """The first run against each named backend over the same batches: auto's cost and gain, side by side."""
    named, first = runs.get("named", {}), runs.get("first run", {}).get("window")
    if not named or not first:
        return []
    lines = ["", f"| fine-tuning, the first run's {first['steps']} batches | wall s | auto's first run against it |",
             "|---|---|---|",
             f"| auto, calibration {first['calibration_s']:.2f} s included | {first['wall_s']:.1f} | - |"]
    for backend, r in named.items():
        if "failed" in r:
            lines.append(f"| {backend} named | failed: {r['failed']} | - |")
            continue
        gap = first["wall_s"] - r["wall_s"]
        lines.append(f"| {backend} named | {r['wall_s']:.1f} | {gap:+.1f} s ({gap / r['wall_s']:+.1%}) |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--model", default="wav2vec2", choices=("wav2vec2", "hubert"))
    parser.add_argument("--scenarios", default="finetune,decode,shapes")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeat-steps", type=int, default=None, help="steps of the repeated run (default: --steps)")
    parser.add_argument("--batch-bins", type=int, default=1_800_000)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--utterances", type=int, default=400)
    parser.add_argument("--shape-steps", type=int, default=12, help="steps per cell of the shapes scenario")
    parser.add_argument("--each-bucket", type=int, default=0, metavar="ROUNDS",
                        help="fine-tuning: then time every contender on each bucket's batches, ROUNDS rounds")
    parser.add_argument("--named", metavar="BACKENDS", help="fine-tuning: then the first run's batches with each of "
                        "these backends named (comma-separated: sdpa, flash_attention_2, sdpa:efficient...)")
    parser.add_argument("--named-steps", type=int, help="... over the first run's first N batches (default: all; "
                        "torch's own sdpa pays a cuDNN graph per new length: about 0.25 s a step on an H200)")
    parser.add_argument("--decode-worker", help=argparse.SUPPRESS)
    parser.add_argument("--named-worker", help=argparse.SUPPRESS)  # a child process: this backend named
    parser.add_argument("--batches", type=Path, help=argparse.SUPPRESS)  # ... over these batches
    args = parser.parse_args(argv)
    args.repeat_steps = args.repeat_steps or args.steps
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    device = torch.device("cuda")
    if args.decode_worker:
        logging.getLogger().setLevel(logging.WARNING)
        return decode_worker(json.loads(args.decode_worker), args.model, args.out, device)
    if args.named_worker:
        logging.getLogger().setLevel(logging.WARNING)
        return named_worker(json.loads(args.batches.read_text()), args.named_worker, args.model, args.out, device)
    env = attention_matrix.environment()
    result = {}
    if "finetune" in args.scenarios:
        result["fine-tuning"] = finetune(args, device)
    if "decode" in args.scenarios:
        result["parallel decode"] = decode(args, device)
    shapes = new_shapes(args, device) if "shapes" in args.scenarios else {}
    text = (f"{env['gpu']}, torch {env['torch']}, transformers {env['transformers']}, flash-attn {env['flash_attn']}; "
            f"{env['date']}. {args.model}, bf16, LibriSpeech train-clean-100 lengths.\n\n{table(result)}")
    if shapes:
        text += ("\n\n| train step, batch 8, about 10 s (ms, median) | same length | a new length each step |\n"
                 "|---|---|---|\n" + "\n".join(f"| {b} | {r['same length']:.1f} | {r['a new length each step']:.1f} |"
                                              for b, r in shapes.items()))
        result["new shapes"] = shapes
    print("\n" + text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "calibration_cost.md").write_text(text + "\n")
        (args.out / "calibration_cost.json").write_text(json.dumps({"environment": env, "result": result,
                                                                    "args": vars(args)}, indent=1, default=str))


if __name__ == "__main__":
    main()
