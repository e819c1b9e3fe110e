"""S3PRL's own WavLM: its gated relative-position attention as S3PRL runs it, without the bias, and on the lean path.

Models: S3PRL's ``WavLM`` built from its ``WavLMConfig`` with random weights (no downloads), as the released
checkpoints are configured: ``large`` (24 layers, 1024 wide, 16 heads, FFN 4096, pre-layer-norm, layer-norm front
end) and ``base_plus`` (12, 768, 12, FFN 3072, post-layer-norm, group-norm front end); both with
``relative_position_embedding`` and ``gru_rel_pos`` (320 buckets up to distance 800), dropout 0.1, attention dropout
0.1, layer drop 0 and the convolutional front end without gradients (``feature_grad_mult`` 0), as S3PRL's
``wavlm`` upstream sets them. Input: 8 utterances of ``--seconds`` each (``--ragged``, the default: from that length
down to 0.7 of it, padded, with S3PRL's padding mask; ``--full``: all of it), through ``extract_features``.

Columns: ``stock`` (S3PRL as it is), ``no bias`` (the same configuration with ``relative_position_embedding`` and
``gru_rel_pos`` off: the floor that any implementation of the bias can only approach, since it still has to add
it) and ``lean`` (the stock model, same weights, after ``attention.wavlm.install``); ``lean/floor``: the ratios the
target bounds (time 1.3, memory 1.15). Modes: ``fine-tune`` (train mode, forward + backward of a mean-square loss,
gradients set to None before each step) and ``frozen`` (eval mode, forward under ``torch.no_grad``). Precision:
``fp32``, or ``bf16`` = ``torch.autocast`` over fp32 weights. Each cell: the median time of ``--repeat`` steps
after ``--warmup`` (CUDA synchronised around each) and the peak of ``max_memory_allocated`` over the timed steps,
weights and gradients included, with one model resident. ``--new-length``: every step (warm-ups included) on a length
that no step before it in the process had, as ESPnet's length-sorted batches give, so that a kernel that builds
something per sequence length (cuDNN's attention) pays it at every step: step i of the process's c-th measurement of
this input is ``(c + SLOTS * i)`` times 2 frames (640 samples; S3PRL's encoders pad to an even frame count) shorter
than the input, ``SLOTS`` being the measurements the input gets (variants x precisions x modes), so that every cell's
steps span the same lengths: on average ``SLOTS * steps / 2`` times 640 samples shorter (1.3 s for 12 cells of 7
steps). ``max err``: the largest difference between stock's and
lean's frozen outputs, relative to stock's largest value.

    python benchmarks/wavlm.py --out DIR                       # the table (CUDA)
    python benchmarks/wavlm.py --out DIR --models large --seconds 30 --precisions bf16
    python benchmarks/wavlm.py --tiny --out /tmp/wavlm_bench   # CPU smoke test: a tiny model, 1 s
    python benchmarks/wavlm.py --out DIR --fused-off STORE_KEEP_MASK   # the fused backward without a variant

Writes DIR/wavlm.md and DIR/wavlm.json and prints the table.
"""

import argparse
import gc
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from espnet_flashcompat.attention import wavlm, wavlm_fused

SIZES = {
    "large": dict(encoder_layers=24, encoder_embed_dim=1024, encoder_ffn_embed_dim=4096, encoder_attention_heads=16,
                  layer_norm_first=True, extractor_mode="layer_norm", normalize=True),
    "base_plus": dict(encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072,
                      encoder_attention_heads=12, layer_norm_first=False, extractor_mode="default"),
    "tiny": dict(encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=256, encoder_attention_heads=4,
                 conv_feature_layers="[(64,10,5)] + [(64,3,2)] * 4 + [(64,2,2)] * 2", conv_pos=16, conv_pos_groups=4),
}
COMMON = dict(relative_position_embedding=True, gru_rel_pos=True, num_buckets=320, max_distance=800, dropout=0.1,
              attention_dropout=0.1, encoder_layerdrop=0.0, feature_grad_mult=0.0)
NO_BIAS = dict(relative_position_embedding=False, gru_rel_pos=False)
BATCH = 8


def build(size: str, device: str, **overrides):
    from s3prl.upstream.wavlm.WavLM import WavLM, WavLMConfig

    torch.manual_seed(0)
    with torch.device(device):
        return WavLM(WavLMConfig({**SIZES[size], **COMMON, **overrides}))


def inputs(seconds: float, ragged: bool, device: str):
    samples = int(seconds * 16000)
    lengths = [int(samples * (1 - 0.3 * i / (BATCH - 1))) if ragged else samples for i in range(BATCH)]
    wav = torch.randn(BATCH, samples, device=device)
    padding = torch.arange(samples, device=device)[None, :] >= torch.tensor(lengths, device=device)[:, None]
    return wav, padding


def step(model, wav, padding, mode: str, precision: str):
    with torch.autocast(wav.device.type, torch.bfloat16, enabled=precision == "bf16"):
        if mode == "frozen":
            with torch.no_grad():
                return model.extract_features(wav, padding_mask=padding)[0]
        model.zero_grad(set_to_none=True)
        out = model.extract_features(wav, padding_mask=padding)[0]
    out.float().pow(2).mean().backward()
    return None


SHORTER = 640  # samples: 2 frames of the convolutional front end (S3PRL's encoders pad to an even frame count)
SLOTS = 8  # measurements of one input whose new lengths interleave: the benchmark sets it (cells per input)
_measured = {}  # id of an input -> how many measurements with new lengths it has had


def measure(model, wav, padding, mode, precision, warmup, repeat, step=step, new_length=False):
    """Median ms of ``repeat`` calls of ``step`` after ``warmup``, and the peak GiB allocated over them; with
    ``new_length`` each call's batch of a length no call before it had (see the module's doc)."""
    model.train(mode == "fine-tune")
    cuda = wav.device.type == "cuda"
    slot = _measured[id(wav)] = _measured.get(id(wav), -1) + 1 if new_length else 0

    def batch(i):
        end = wav.shape[-1] - SHORTER * (slot + SLOTS * i) if new_length else wav.shape[-1]
        return wav[..., :end], padding[..., :end]

    for i in range(warmup):
        step(model, *batch(i), mode, precision)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup, warmup + repeat):
        x, pad = batch(i)
        start = time.perf_counter()
        step(model, x, pad, mode, precision)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
    model.zero_grad(set_to_none=True)
    return {"ms": statistics.median(times), "gib": peak}


def run(args):
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    rows = []
    for size in args.models:
        for seconds in args.seconds:
            wav, padding = inputs(seconds, args.ragged, device)
            for variant in ("stock", "lean", "no bias"):
                if variant != "lean":  # one model resident at a time; lean is the stock model, same weights
                    model = None
                    gc.collect()
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    model = build(size, device, **(NO_BIAS if variant == "no bias" else {}))
                if variant == "lean":
                    assert wavlm.install(model) == len(model.encoder.layers)
                for precision in args.precisions:
                    for mode in args.modes:
                        cell = measure(model, wav, padding, mode, precision, args.warmup, args.repeat,
                                       new_length=args.new_length)
                        cell.update(model=size, seconds=seconds, ragged=args.ragged, new_length=args.new_length,
                                    variant=variant,
                                    precision=precision, mode=mode, path=wavlm.paths_of(model))
                        if mode == "frozen" and variant != "no bias":
                            model.eval()
                            cell["output"] = step(model, wav, padding, mode, precision).float().cpu()
                        rows.append(cell)
                        logging.info("%s", {k: v for k, v in cell.items() if k != "output"})
                if variant == "lean":
                    wavlm.uninstall(model)
            model = None
    for row in rows:  # lean's frozen output against stock's
        if row["variant"] == "lean" and "output" in row:
            ref = next(r for r in rows if r["variant"] == "stock" and "output" in r and
                       all(r[k] == row[k] for k in ("model", "seconds", "precision")))
            row["max_err"] = ((row["output"] - ref["output"]).abs().max() / ref["output"].abs().max()).item()
    for row in rows:
        row.pop("output", None)
    return rows, device


def table(rows, device) -> str:
    def cell(model, seconds, precision, mode, variant):
        return next(r for r in rows if (r["model"], r["seconds"], r["precision"], r["mode"], r["variant"]) ==
                    (model, seconds, precision, mode, variant))

    lines = ["A new length at every step (`--new-length`)", ""] if rows and rows[0].get("new_length") else []
    keys = sorted({(r["precision"], r["model"], r["seconds"]) for r in rows}, key=lambda k: (k[0], k[1], -k[2]))
    for precision in dict.fromkeys(k[0] for k in keys):
        lines += [f"**{precision}**{' autocast' if precision == 'bf16' else ''} ({device})", "",
                  "| model, 8 x length | fine-tune: stock | no bias | lean | lean/floor | frozen: stock | no bias "
                  "| lean | lean/floor | max err |", "|---" * 10 + "|"]
        for _, model, seconds in (k for k in keys if k[0] == precision):
            parts = [f"{model}, 8 x {seconds:g} s"]
            for mode in ("fine-tune", "frozen"):
                try:
                    s, f, l = [cell(model, seconds, precision, mode, v) for v in ("stock", "no bias", "lean")]
                except StopIteration:
                    parts += ["-"] * 4
                    continue
                parts += [f"{c['ms']:.1f} ms, {c['gib']:.2f} GiB" for c in (s, f, l)]
                parts.append(f"{l['ms'] / f['ms']:.2f}x, {l['gib'] / f['gib']:.2f}x")
            lean_frozen = [r for r in rows if (r["model"], r["seconds"], r["precision"], r["variant"]) ==
                           (model, seconds, precision, "lean") and "max_err" in r]
            parts.append(f"{lean_frozen[0]['max_err']:.1e}" if lean_frozen else "-")
            lines.append("| " + " | ".join(parts) + " |")
        lines.append("")
    return "\n".join(lines)


FUSED_VARIANTS = ("STORE_KEEP_MASK", "ROTATE_TILES", "FLAT_TILES")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["large", "base_plus"], choices=sorted(SIZES))
    parser.add_argument("--seconds", nargs="+", type=float, default=[30.0, 10.0])
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--modes", nargs="+", default=["fine-tune", "frozen"], choices=["fine-tune", "frozen"])
    parser.add_argument("--full", dest="ragged", action="store_false", help="every utterance the whole length")
    parser.add_argument("--new-length", action="store_true", help="each step on a length no step before it had")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: the tiny model, 1 s, one step")
    parser.add_argument("--fused-off", nargs="*", default=[], choices=FUSED_VARIANTS,
                        help="turn these variants of the fused backward off (attention/wavlm_fused.py)")
    args = parser.parse_args()
    for flag in args.fused_off:
        setattr(wavlm_fused, flag, False)
    if args.tiny:
        args.models, args.seconds, args.warmup, args.repeat = ["tiny"], [1.0], 0, 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    global SLOTS
    SLOTS = 3 * len(args.precisions) * len(args.modes)  # stock, no bias, lean
    rows, device = run(args)
    text = table(rows, device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wavlm.md").write_text(text + "\n")
    (args.out / "wavlm.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
