"""S3PRL's own HuBERT and wav2vec2: which SDPA kernel torch runs for them, and what pinning one of SDPA's kernels gains.

Their self-attention (``MultiheadAttention`` in ``s3prl/upstream/wav2vec2/wav2vec2_model.py``, which HuBERT reuses)
calls ``F.multi_head_attention_forward`` with ``need_weights=False`` and a key padding mask, no bias; torch turns
the mask into a float ``attn_mask`` of shape (batch, heads, 1, frames) and calls ``scaled_dot_product_attention``,
which picks its kernel itself. The encoder pads the frames to an even count (``required_seq_len_multiple`` 2) and
masks that frame too, so even ``--full`` batches of 10 s or 30 s (499 or 1499 frames) carry a mask (wav2vec2
drops a mask that masks nothing, so a ``--full`` batch of an even frame count runs without one; HuBERT keeps it).

Models: S3PRL's ``HubertModel`` (``HubertConfig``, ``HubertPretrainingConfig``, no label dictionaries) and
``Wav2Vec2Model`` (``Wav2Vec2Config``) built with random weights (no downloads), as the released checkpoints are
configured: ``large`` (24 layers, 1024 wide, 16 heads, FFN 4096, pre-layer-norm, layer-norm front end: the
``hubert_large_ll60k``, ``wav2vec2_large_960`` and XLS-R shape) and ``base`` (12, 768, 12, FFN 3072, post-layer-norm,
group-norm front end: ``hubert_base``, ``wav2vec2_base_960``); dropout 0.1, attention dropout 0.1, layer drop 0 and
the convolutional front end without gradients (``feature_grad_mult`` 0), as S3PRL's upstreams set them. Input: 8
utterances of ``--seconds`` each (ragged, the default: from that length down to 0.7 of it, padded, with the padding
mask S3PRL's upstreams pass; ``--full``: all of it), through ``extract_features(wav, padding_mask, mask=False)``.

Columns: ``as S3PRL runs it`` (no pin: torch's own choice), ``torch picks`` (the kernel that choice runs, from one
profiled step: the aten op, ``_scaled_dot_product_{cudnn,flash,efficient}_attention`` or ``..._attention_math``,
and the CUDA kernel names, ``cudnn_generated_fort_native_sdpa_*``, ``pytorch_flash::flash_*``, ``fmha_cutlass*``;
``masked``: the attention got a key padding mask), then ``sdpa:cudnn``, ``sdpa:flash`` and ``sdpa:efficient``:
the step with that kernel alone (``sdpa_kernels.pinned(name, strict=True)``, as calibration pins it; a kernel that
refuses the batch: ``refuses`` and torch's reason), and ``best / unpinned``: the fastest pinned kernel's time and
memory relative to the unpinned step, the number a decision to pin rests on. Modes: ``fine-tune`` (train mode,
forward + backward of a mean-square loss) and ``frozen`` (eval mode, ``torch.no_grad``). Precision: ``fp32``, or
``bf16`` = ``torch.autocast`` over fp32 weights. Each cell: the median time of ``--repeat`` steps after
``--warmup`` and the peak ``max_memory_allocated`` over the timed steps, as ``wavlm.py`` measures them;
``--new-length``: every step on a length no step before it had (``wavlm.measure``), as ESPnet's length-sorted
batches give (cuDNN's attention builds a graph per sequence length: with one length it pays that once, in the
warm-up).

    python benchmarks/native_upstreams.py --out DIR                   # the table (CUDA)
    python benchmarks/native_upstreams.py --out DIR --models hubert --sizes large --seconds 30 --precisions bf16
    python benchmarks/native_upstreams.py --tiny --out /tmp/native    # CPU smoke test: tiny models, 1 s

On CPU only the unpinned column runs: SDPA's cuDNN, flash and efficient kernels are CUDA-only. Writes
DIR/native_upstreams.md and DIR/native_upstreams.json and logs the table.
"""

import argparse
from contextlib import nullcontext
import gc
import json
import logging
import re
import sys
from pathlib import Path

import torch

from espnet_flashcompat.attention import sdpa_kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wavlm  # noqa: E402  (its timing of a step)
from espnet_flashcompat.attention.calibrate import release

logger = logging.getLogger("native_upstreams")
SIZES = {
    "large": dict(encoder_layers=24, encoder_embed_dim=1024, encoder_ffn_embed_dim=4096, encoder_attention_heads=16,
                  layer_norm_first=True, extractor_mode="layer_norm"),
    "base": dict(encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072, encoder_attention_heads=12,
                 layer_norm_first=False, extractor_mode="default"),
    "tiny": dict(encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=256, encoder_attention_heads=4,
                 layer_norm_first=True, extractor_mode="layer_norm", conv_pos=16, conv_pos_groups=4,
                 conv_feature_layers="[(64,10,5)] + [(64,3,2)] * 4 + [(64,2,2)] * 2"),
}
COMMON = dict(dropout=0.1, attention_dropout=0.1, encoder_layerdrop=0.0, feature_grad_mult=0.0)
BATCH = 8
UNPINNED = "as S3PRL runs it"
PINS = tuple(sdpa_kernels.name(k) for k in sdpa_kernels.KERNELS)  # sdpa:cudnn, sdpa:flash, sdpa:efficient
SIGNS = {  # which SDPA kernel a profiled step ran: aten op names, then CUDA kernel names
    "cudnn": re.compile(r"_scaled_dot_product_cudnn_attention|fort_native_sdpa|cudnn\w*sdpa"),
    "flash": re.compile(r"_scaled_dot_product_flash_attention(?!_for_cpu)|pytorch_flash|flash_(fwd|bwd)_"),
    "efficient": re.compile(r"_scaled_dot_product_efficient_attention|_efficient_attention_|fmha_cutlass|MemEff"),
    "math": re.compile(r"_scaled_dot_product_attention_math"),
    "cpu flash": re.compile(r"_scaled_dot_product_flash_attention_for_cpu"),
}
ORDER = ("math", "flash", "efficient", "cudnn", "overrideable")  # at::SDPBackend's values
ATTENTION_NAMES = re.compile(r"sdpa|fmha|flash|attention|softmax", re.I)


def build(model: str, size: str, device: str):
    cfg = {**SIZES[size], **COMMON}
    torch.manual_seed(0)
    with torch.device(device):
        if model == "hubert":
            from s3prl.upstream.hubert.hubert_model import HubertConfig, HubertModel, HubertPretrainingConfig

            return HubertModel(HubertConfig(label_rate=50.0, **cfg), HubertPretrainingConfig(), [None])
        from s3prl.upstream.wav2vec2.wav2vec2_model import Wav2Vec2Config, Wav2Vec2Model

        return Wav2Vec2Model(Wav2Vec2Config(**cfg))


def inputs(seconds: float, ragged: bool, device: str):
    samples = int(seconds * 16000)
    lengths = [int(samples * (1 - 0.3 * i / (BATCH - 1))) if ragged else samples for i in range(BATCH)]
    wav = torch.randn(BATCH, samples, device=device)
    padding = torch.arange(samples, device=device)[None, :] >= torch.tensor(lengths, device=device)[:, None]
    return wav, padding


def forward(model, wav, padding):
    out = model.extract_features(wav, padding_mask=padding, mask=False)
    return out["x"] if isinstance(out, dict) else out[0]  # Wav2Vec2Model: a dict; HubertModel: (x, padding_mask)


def step(model, wav, padding, mode: str, precision: str):
    with torch.autocast(wav.device.type, torch.bfloat16, enabled=precision == "bf16"):
        if mode == "frozen":
            with torch.no_grad():
                return forward(model, wav, padding)
        model.zero_grad(set_to_none=True)
        out = forward(model, wav, padding)
    out.float().pow(2).mean().backward()
    return None


def measure(model, wav, padding, mode, precision, warmup, repeat, new_length=False):
    return wavlm.measure(model, wav, padding, mode, precision, warmup, repeat, step=step, new_length=new_length)


def picks(model, wav, padding, mode, precision) -> dict:
    """One profiled step without a pin: which SDPA kernel ran, and whether the attention had a mask."""
    from torch.profiler import ProfilerActivity, profile

    cuda = wav.device.type == "cuda"
    masks = []
    hook = model.encoder.layers[0].self_attn.register_forward_pre_hook(
        lambda _, args, kwargs: masks.append(kwargs.get("key_padding_mask") is not None), with_kwargs=True)
    try:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            step(model, wav, padding, mode, precision)
            if cuda:
                torch.cuda.synchronize()
    finally:
        hook.remove()
    model.zero_grad(set_to_none=True)
    names = sorted({e.key for e in prof.key_averages()})
    seen = [k for k, sign in SIGNS.items() if any(sign.search(n) for n in names)]
    if not seen:
        seen = ["no SDPA call (bmm, softmax)"] if any("softmax" in n.lower() for n in names) else ["none seen"]
    return {"kernel": "+".join(seen), "masked": any(masks),
            "names": [n[:120] for n in names if ATTENTION_NAMES.search(n)]}


def refusal(exc: RuntimeError) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of memory"
    text = str(exc).strip().splitlines()[0]
    return text.split("cannot run this batch: ", 1)[-1]


def run(args):
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    rows = []
    for name in args.models:
        for size in args.sizes:
            model = None
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            model = build(name, size, device)
            for seconds in args.seconds:
                wav, padding = inputs(seconds, args.ragged, device)
                for precision in args.precisions:
                    for mode in args.modes:
                        model.train(mode == "fine-tune")
                        row = dict(model=name, size=size, seconds=seconds, ragged=args.ragged, precision=precision,
                                   mode=mode, device=device, new_length=args.new_length)
                        for column in (UNPINNED,) + PINS:
                            if column != UNPINNED and device != "cuda":
                                row[column] = {"skipped": "CUDA-only"}
                                continue
                            try:
                                pin = sdpa_kernels.pinned(column, strict=True) if column in PINS else nullcontext()
                                with pin:
                                    row[column] = measure(model, wav, padding, mode, precision, args.warmup,
                                                          args.repeat, args.new_length)
                            except RuntimeError as exc:
                                row[column] = {"refuses": refusal(exc), "error": str(exc)[:1000]}
                                release(exc)
                                model.zero_grad(set_to_none=True)
                                gc.collect()
                                if device == "cuda":
                                    torch.cuda.empty_cache()
                            if column == UNPINNED:
                                row["torch picks"] = (picks(model, wav, padding, mode, precision)
                                                      if "ms" in row[column] else {"kernel": "-", "masked": None})
                        ran = [p for p in PINS if "ms" in row[p]]
                        if ran and "ms" in row[UNPINNED]:
                            best = min(ran, key=lambda p: row[p]["ms"])
                            row["best / unpinned"] = {"kernel": best,
                                                      "time": row[best]["ms"] / row[UNPINNED]["ms"],
                                                      "memory": row[best]["gib"] / row[UNPINNED]["gib"]
                                                      if row[best]["gib"] else None}
                        rows.append(row)
                        logger.info("%s", {k: v for k, v in row.items() if k != "torch picks"} |
                                    {"torch picks": row["torch picks"]["kernel"]})
            model = None
    return rows, device


def environment(device) -> dict:
    import importlib.metadata as metadata

    import s3prl

    env = {"torch": torch.__version__, "s3prl": str(Path(s3prl.__file__).parent), "device": device}
    for dist in ("espnet-s3prl", "s3prl"):
        try:
            env[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cudnn=torch.backends.cudnn.version(),
                   sdpa_priority=[ORDER[int(b)] for b in torch._C._get_sdp_priority_order()])
    return env


def table(rows, env) -> str:
    def cell(c):
        if "ms" not in c:
            return c.get("skipped") or f"refuses: {c['refuses'][:110]}"
        return f"{c['ms']:.1f} ms" + (f", {c['gib']:.2f} GiB" if c["gib"] is not None else "")

    stack = ", ".join(f"{k} {env[k]}" for k in ("torch", "espnet-s3prl", "s3prl", "gpu", "cudnn") if k in env)
    every = "; a new length at every step (`--new-length`)" if rows and rows[0]["new_length"] else ""
    lines = [f"{stack}; {'ragged' if rows and rows[0]['ragged'] else 'full'} batches of {BATCH}{every}", ""]
    if env["device"] != "cuda":
        lines += ["CPU: SDPA's cuDNN, flash and efficient kernels are CUDA-only, so only the unpinned column ran.", ""]
    for precision in dict.fromkeys(r["precision"] for r in rows):
        lines += [f"**{precision}**{' autocast' if precision == 'bf16' else ''} ({env['device']})", "",
                  f"| upstream, 8 x length, mode | {UNPINNED} | torch picks | " + " | ".join(PINS) +
                  " | best / unpinned |", "|---" * (4 + len(PINS)) + "|"]
        for r in (r for r in rows if r["precision"] == precision):
            picked = r["torch picks"]
            best = r.get("best / unpinned")
            ratio = (f"{best['time']:.2f}x time, {best['memory'] or float('nan'):.2f}x memory ({best['kernel']})"
                     if best else "-")
            mask = {True: ", masked", False: ", no mask"}.get(picked["masked"], "")
            parts = [f"{r['model']} {r['size']}, 8 x {r['seconds']:g} s, {r['mode']}", cell(r[UNPINNED]),
                     picked["kernel"] + mask]
            lines.append("| " + " | ".join(parts + [cell(r[p]) for p in PINS] + [ratio]) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    split = lambda text: [t for t in text.split(",") if t]  # noqa: E731
    parser.add_argument("--models", type=split, default=["hubert", "wav2vec2"], help="hubert,wav2vec2")
    parser.add_argument("--sizes", type=split, default=["large", "base"], help="large,base")
    parser.add_argument("--seconds", type=lambda t: [float(s) for s in split(t)], default=[10.0, 30.0])
    parser.add_argument("--precisions", type=split, default=["bf16", "fp32"], help="bf16,fp32")
    parser.add_argument("--modes", type=split, default=["fine-tune", "frozen"], help="fine-tune,frozen")
    parser.add_argument("--full", dest="ragged", action="store_false", help="every utterance the whole length")
    parser.add_argument("--new-length", action="store_true", help="each step on a length no step before it had")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, 1 s, one step")
    args = parser.parse_args(argv)
    for key, allowed in (("models", {"hubert", "wav2vec2"}), ("sizes", set(SIZES)), ("precisions", {"bf16", "fp32"}),
                         ("modes", {"fine-tune", "frozen"})):
        if not set(getattr(args, key)) <= allowed:
            parser.error(f"--{key}: choose from {','.join(sorted(allowed))}")
    if args.tiny:
        args.sizes, args.seconds, args.warmup, args.repeat = ["tiny"], [1.0], 0, 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    wavlm.SLOTS = (1 + len(PINS)) * len(args.precisions) * len(args.modes)  # cells per input
    rows, device = run(args)
    env = environment(device)
    text = table(rows, env)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "native_upstreams.md").write_text(text + "\n")
    (args.out / "native_upstreams.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    logger.info("\n%s", text)


if __name__ == "__main__":
    main()
