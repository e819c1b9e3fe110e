"""WavLM's gated relative-position attention alone, one layer's worth, on each way to run it: what the kernels cost
apart from the rest of the model.

Input: the attention of one WavLM large layer (16 heads of 64) on 8 ragged utterances (from ``--frames`` down to 0.7
of it, padded keys masked), bf16 queries, keys and values, a float32 gate and distance table as WavLM makes them.
Rows: ``stock`` (the (batch, head, time, time) bias built with autograd and handed to SDPA, torch's kernel choice:
what S3PRL runs), ``efficient`` (``wavlm_kernel``'s memory-efficient kernel, the bias rebuilt for the backward),
``fused`` (``wavlm_fused``: the bias inside Triton kernels), ``no bias`` (SDPA with the padding mask only, torch's
kernel choice: the floor). Modes: ``fine-tune`` (forward and backward, attention dropout 0.1, gradients for q, k, v,
gate and table), the same without dropout, and ``frozen`` (forward, no gradients, no dropout). Cell: median of
``--repeat`` calls after 3 (CUDA events, ``attention_matrix.measure``), peak memory above what was allocated before
the calls. ``max err``: fused against a float32 computation of the same function with the same dropout mask,
relative to its largest value, per output and gradient.

    python benchmarks/wavlm_kernels.py --out DIR [--frames 1500 500] [--sweep | --variants | --first-use]

``--first-use`` times what the kernels cost a process before its first step: Triton compiles each kernel for the
first shape class it meets (time divisible by 16 or not, dropout or not) and keeps it in its disk cache
(``TRITON_CACHE_DIR``, default ``~/.triton/cache``): two processes on one empty cache directory, each timing its first
fine-tuning call (forward and backward, dropout 0.1), its first frozen call, and a fine-tuning call on a length of the
other class; the second process finds the first one's kernels on disk.

``--sweep`` times the fused kernels' tile sizes and warps instead (the forward's frozen, the backward's in fine-tune
mode, on the first ``--frames``). ``--variants`` times the fused backward's variants (``wavlm_fused``: the stored
dropout mask, the tiles turned instead of sheared, the flat tiles' one sum) against none of them, each alone and all
together, fine-tuning, on every ``--frames``. The fused rows give the kernels the runs of distances that share
WavLM large's last buckets (320 buckets, 800 frames' reach: from 778 frames on), as the model does.
"""

import argparse
import functools
import itertools
import json
import logging
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

import attention_matrix  # its CUDA-event timing loop (this script's folder is on sys.path)
from espnet_flashcompat.attention import wavlm_fused, wavlm_kernel

BATCH, HEADS, HEAD_D = 8, 16, 64


def inputs(frames: int, grad: bool):
    torch.manual_seed(0)
    dev = "cuda"

    def x():
        return torch.randn(frames, BATCH, HEADS, HEAD_D, device=dev, dtype=torch.bfloat16).permute(1, 2, 0, 3)

    q, k, v = x(), x(), x()
    gate = torch.rand(BATCH, HEADS, frames, device=dev) + 0.5
    rel = torch.randn(HEADS, 2 * frames - 1, device=dev)
    lengths = torch.tensor([int(frames * (1 - 0.3 * i / (BATCH - 1))) for i in range(BATCH)], device=dev)
    pad = (torch.arange(frames, device=dev)[None, :] >= lengths[:, None]).view(BATCH, 1, 1, frames)
    ins = [t.requires_grad_(grad) for t in (q, k, v, gate, rel)]
    return ins, pad


def stock(q, k, v, gate, rel, pad, p):
    bias = (gate.unsqueeze(-1) * wavlm_kernel.toeplitz(rel, q.size(2))).masked_fill(pad, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, bias.to(q.dtype), dropout_p=p)


def efficient(q, k, v, gate, rel, pad, p):
    if torch.is_grad_enabled():
        return wavlm_kernel._GatedBias.apply(q, k, v, gate, rel, pad, p)
    return wavlm_kernel._forward_only(q, k, v, wavlm_kernel.bias(gate, rel, pad, q.dtype), p)


def no_bias(q, k, v, gate, rel, pad, p):
    return F.scaled_dot_product_attention(q, k, v, ~pad, dropout_p=p)


@functools.lru_cache(maxsize=None)
def flat_ends(frames: int):
    """The distances that share WavLM large's first and last buckets, from S3PRL's own bucket function."""
    from espnet_flashcompat.attention import wavlm
    from s3prl.upstream.wavlm.modules import MultiheadAttention

    module = MultiheadAttention(1024, HEADS, has_relative_attention_bias=True, num_buckets=320, max_distance=800,
                                gru_rel_pos=True)
    distances = torch.arange(-(frames - 1), frames)
    return wavlm._flat_ends(module._relative_positions_bucket(distances, bidirectional=True))


def fused(q, k, v, gate, rel, pad, p):
    """The fused kernels as WavLM large's layers call them."""
    frames = q.size(2)
    return wavlm_fused.attend(q, k, v, gate, rel, pad, p, wavlm_fused.prepare(rel, pad, q.size(0), flat_ends(frames)))


ROWS = {"stock": stock, "efficient": efficient, "fused": fused, "no bias": no_bias}


MODES = {"fine-tune": 0.1, "fine-tune, no dropout": 0.0, "frozen": 0.0}  # mode: attention dropout


def time_it(fn, ins, pad, mode, repeat):
    grad = mode != "frozen"
    p = MODES[mode]
    go = torch.randn_like(ins[0])

    def call():
        with torch.set_grad_enabled(grad):
            out = fn(*ins, pad, p)
            if grad:
                torch.autograd.grad(out, ins, go, allow_unused=True)

    call()  # the first call of a shape: outside the memory baseline and the timing
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = attention_matrix.measure(call, 2, repeat)
    return {"ms": statistics.median(times), "gib": (torch.cuda.max_memory_allocated() - base) / 2 ** 30}


def errors(frames: int):
    """fused (bf16) against float32 with the same dropout mask."""
    ins, pad = inputs(frames, True)
    go = torch.randn_like(ins[0])
    torch.manual_seed(7)
    out = fused(*ins, pad, 0.1)
    got = [out, *torch.autograd.grad(out, ins, go)]
    torch.manual_seed(7)
    seed = torch.randint(2 ** 62, (1,), device="cuda", dtype=torch.int64)
    keep = wavlm_fused.keep_mask(seed, BATCH * HEADS, frames, 0.1).view(BATCH, HEADS, frames, frames)
    ref_in = [t.detach().float().requires_grad_() for t in ins]
    q, k, v, gate, rel = ref_in
    bias = (gate.unsqueeze(-1) * wavlm_kernel.toeplitz(rel, frames)).masked_fill(pad, float("-inf"))
    rescale = wavlm_fused.dropout_threshold(0.1)[1]
    a = torch.softmax(q @ k.transpose(-1, -2) / HEAD_D ** 0.5 + bias, -1) * keep * rescale
    ref = a @ v
    want = [ref, *torch.autograd.grad(ref, ref_in, go.float())]
    names = ["out", "dq", "dk", "dv", "dgate", "drel"]
    return {n: ((g.float() - w).abs().max() / w.abs().max()).item() for n, g, w in zip(names, got, want)}


def sweep(frames: int, repeat: int):
    ins, pad = inputs(frames, True)
    results = []
    tiles = [(64, 64, 4), (128, 64, 4), (128, 64, 8), (64, 128, 4), (128, 128, 8)]
    for kernel, (bm, bn, warps), stages in itertools.product(("FORWARD", "BACKWARD_KV", "BACKWARD_Q"), tiles, (2, 3)):
        saved = dict(getattr(wavlm_fused, kernel))
        setattr(wavlm_fused, kernel, dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages))
        try:
            cell = time_it(fused, ins if kernel != "FORWARD" else [t.detach() for t in ins], pad,
                           "frozen" if kernel == "FORWARD" else "fine-tune", repeat)
        except Exception as exc:  # noqa: BLE001 - a config the compiler refuses (shared memory): reported
            cell = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
        setattr(wavlm_fused, kernel, saved)
        cell.update(kernel=kernel, tile=f"{bm}x{bn}", warps=warps, stages=stages)
        logging.info("%s", cell)
        results.append(cell)
    return results


FLAGS = ("STORE_KEEP_MASK", "ROTATE_TILES", "FLAT_TILES")
VARIANTS = {"none": {}, "stored mask": dict(STORE_KEEP_MASK=True), "turned tiles": dict(ROTATE_TILES=True),
            "flat tiles": dict(FLAT_TILES=True), "all three": dict.fromkeys(FLAGS, True)}


def variants(frames_list, repeat: int) -> str:
    """The fused backward's variants (``wavlm_fused``'s ``FLAGS``) against none of them, fine-tuning with dropout
    0.1, interleaved in rounds so that drift hits all alike; median per variant."""
    lines = ["| frames | " + " | ".join(VARIANTS) + " |", "|---" * (len(VARIANTS) + 1) + "|"]
    for frames in frames_list:
        ins, pad = inputs(frames, True)
        times = {name: [] for name in VARIANTS}
        peaks = dict.fromkeys(VARIANTS, 0.0)
        for round_ in range(3):
            for name, flags in (VARIANTS.items() if round_ % 2 == 0 else list(VARIANTS.items())[::-1]):
                saved = {k: getattr(wavlm_fused, k) for k in FLAGS}
                for k, v in {**saved, **{k: False for k in saved}, **flags}.items():
                    setattr(wavlm_fused, k, v)
                try:
                    cell = time_it(fused, ins, pad, "fine-tune", repeat)
                finally:
                    for k, v in saved.items():
                        setattr(wavlm_fused, k, v)
                times[name].append(cell["ms"])
                peaks[name] = max(peaks[name], cell["gib"])
        logging.info("frames %d: %s", frames, times)
        lines.append(f"| {frames} | " + " | ".join(f"{statistics.median(times[n]):.2f} ms, {peaks[n]:.2f} GiB"
                                                   for n in VARIANTS) + " |")
    return "\n".join(lines) + "\n"


def first_use(frames: int) -> dict:
    """Seconds of the first calls in this process (see the module's doc)."""
    import time

    out = {}
    for name, n, mode in (("fine-tune", frames, "fine-tune"), ("frozen", frames, "frozen"),
                          ("fine-tune, other length class", frames + (1 if frames % 16 == 0 else 16 - frames % 16),
                           "fine-tune")):
        ins, pad = inputs(n, mode != "frozen")
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.set_grad_enabled(mode != "frozen"):
            o = fused(*ins, pad, MODES[mode])
            if mode != "frozen":
                torch.autograd.grad(o, ins, torch.ones_like(o))
        torch.cuda.synchronize()
        out[name] = time.perf_counter() - start
    out["steady fine-tune"] = time_it(fused, ins, pad, "fine-tune", 5)["ms"] / 1000
    return out


def first_use_table(frames: int, out_dir: Path) -> str:
    import os
    import subprocess
    import sys
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for run in ("first process, empty cache", "second process, cache on disk"):
            code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import wavlm_kernels as w; "
                    f"print(json.dumps(w.first_use({frames})))")
            done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True,
                                  text=True, env={**os.environ, "TRITON_CACHE_DIR": cache}, check=True)
            rows.append((run, json.loads(done.stdout.strip().splitlines()[-1])))
    keys = list(rows[0][1])
    lines = [f"| process ({frames} frames) | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {run} | " + " | ".join(f"{cell[k]:.3f} s" for k in keys) + " |" for run, cell in rows]
    text = "\n".join(lines) + "\n"
    (out_dir / "wavlm_kernels_first_use.md").write_text(text)
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--frames", nargs="+", type=int, default=[1500, 500])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--first-use", action="store_true")
    parser.add_argument("--variants", action="store_true", help="the fused backward's variants against the default")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.first_use:
        logging.info("\n%s", first_use_table(args.frames[0], args.out))
        return
    if args.variants:
        text = variants(args.frames, args.repeat)
        (args.out / "wavlm_kernels_variants.md").write_text(text)
        logging.info("\n%s", text)
        return
    if args.sweep:
        rows = sweep(args.frames[0], args.repeat)
        (args.out / "wavlm_kernels_sweep.json").write_text(json.dumps(rows, indent=1))
        return
    rows, lines = [], ["| frames (8 ragged, 16 x 64 heads, bf16) | mode | " + " | ".join(ROWS) + " | fused / no bias |",
                       "|---" * (len(ROWS) + 3) + "|"]
    for frames in args.frames:
        err = errors(frames)
        logging.info("frames %d: fused against float32: %s", frames, err)
        for mode in MODES:
            ins, pad = inputs(frames, mode != "frozen")
            cells = {name: time_it(fn, ins, pad, mode, args.repeat) for name, fn in ROWS.items()}
            rows.append({"frames": frames, "mode": mode, "cells": cells, "max_err": err})
            logging.info("%s", rows[-1])
            lines.append(f"| {frames} | {mode} | " + " | ".join(f"{c['ms']:.2f} ms, {c['gib']:.2f} GiB"
                                                                 for c in cells.values())
                         + f" | {cells['fused']['ms'] / cells['no bias']['ms']:.2f}x |")
    text = "\n".join(lines) + "\n"
    (args.out / "wavlm_kernels.md").write_text(text)
    (args.out / "wavlm_kernels.json").write_text(json.dumps(rows, indent=1))
    logging.info("\n%s", text)


if __name__ == "__main__":
    main()
