"""ESPnet's own attention: stock and every backend under the model-wide policy, side by side, one train step of an
ESPnet ASR encoder (and, with ``--decode``, the decoder's decode step).

Models: ESPnet's ``EBranchformerEncoder`` with ``attention_layer_type: selfattn`` (``abs_pos``: the module that has a
flash path) and ``ConformerEncoder`` with ``rel_selfattn`` (``rel_pos``, ``rel_pos_type: latest``), each with ESPnet's
CTC on top, built with the stock arguments of the LibriSpeech-100 recipes (conv2d subsampling, macaron FFN, dropout
0.1, attention dropout 0.1, ``use_flash_attn`` left at its default) in two sizes: ``ls100`` (12 blocks, d=256,
4 heads, FFN 1024, batch 8) and ``large`` (12 blocks, d=512, 8 heads, FFN 2048, batch 16), where the step is not
launch-bound. Inputs: 30 s of 80-dim features (3000 frames), ``full`` (every utterance 30 s) or ``ragged`` (30 s
down to 9 s, padded), random targets of 150 tokens out of 500. A step: zero_grad, forward, CTC loss, backward, Adam.
``--decode`` adds ESPnet's ``TransformerDecoder`` (6 blocks, the largest size's width) as beam search runs it:
``forward_one_step`` with its cache, 10 hypotheses against one utterance's encoder output (750 frames, ``expand``-ed
at every step as ``BatchBeamSearch`` does), 60 tokens one at a time; a cell is the whole loop.

Columns: ``stock`` is the model as ESPnet builds it (on a GPU whose name ESPnet's list knows, with flash-attn
importable, ``use_flash_attn`` is on: in fp32 each module then fails once, logs, and runs eager without attention
dropout; the count of those warnings is shown); ``flash_attention_2``, ``sdpa``, ``eager`` are the same weights
under ``model_attention.apply`` with that request (downgraded where it cannot run: ``ran`` says what did), ``auto``
with the policy's measured ``auto``; ``floor`` (memory only) is the same model with every attention module reduced
to its output projection of the values, nothing attended: the peak that the rest of the step needs. Each row runs
in a process of its own with an empty calibration store: auto's first step holds its calibrations and the kernels'
first use in the process (``calibration``: what the calibrations took, from the policy's log); a second auto model
then finds them in the store (its first step, and the calibrations it still made: none where the store served
every site). Each cell: the median step time over ``--repeat`` steps after ``--warmup`` + 1 (CUDA synchronised
around each step), all variants resident, their steps interleaved; peak memory of one step after the warm-up with
one model resident (``max_memory_allocated``: weights, Adam state, activations, gradients; CUDA only). Precision:
``fp32``, or ``bf16`` = AMP (``torch.autocast``) over fp32 weights, as ESPnet's ``use_amp``.

flash-attn: the table runs with what this interpreter's children import (``healthy``, ``absent`` or ``broken``);
``--broken-flash DIR`` runs the whole table again with DIR first on ``PYTHONPATH`` (a flash-attn without its CUDA
module: ``python -c "import sys; sys.path.insert(0, 'tests'); import faults; print(faults.broken_flash_attn())"``
builds one, with pip and PyPI). ``--curves N``: N train steps of stock and of auto (E-Branchformer ls100,
``--curves-precision``: bf16 AMP by default on CUDA, from the same weights over the same 8 cycled ragged batches) and
their CTC losses every N/20 steps. ``--new-length``: every train step of a row on a batch of a new length (the row's
length give or take 20%, 4 frames apart: a new attention shape each, as ESPnet's length-sorted ``numel`` batches
give nearly every step), which a backend that builds something per shape (SDPA's cuDNN kernel, torch's first choice
for ``sdpa`` on Hopper) pays at every step, and which the repeated batch of the other rows hides.

Results, with their machine, versions and date, and what a ratio's noise is: docs/benchmarks.md; run times:
docs/gpu.md.

    python benchmarks/espnet_attention.py --out DIR --decode                          # the table
    python benchmarks/espnet_attention.py --out DIR --broken-flash BROKEN --curves 300   # the table twice, curves
    python benchmarks/espnet_attention.py --out DIR --new-length --repeat 30             # lengths as training gives
    python benchmarks/espnet_attention.py --tiny --out /tmp/bench --decode              # CPU smoke test: tiny sizes

Writes DIR/espnet_attention.md (tables) and DIR/espnet_attention.json (every measurement), and prints the tables.
"""

import argparse
import itertools
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from espnet_flashcompat.s3prl import guard
from espnet_flashcompat.espnet import model_attention, optin

FRAMES, FEATS, VOCAB, TARGET = 3000, 80, 500, 150
SIZES = {"ls100": dict(output_size=256, attention_heads=4, linear_units=1024, cgmlp_linear_units=1024, batch=8),
         "large": dict(output_size=512, attention_heads=8, linear_units=2048, cgmlp_linear_units=2048, batch=16)}
TINY = {"tiny": dict(output_size=32, attention_heads=2, linear_units=64, cgmlp_linear_units=64, batch=2, blocks=2,
                     frames=300, target=15)}
DECODE_STEPS, DECODE_BEAM = 60, 10  # tokens decoded one at a time, hypotheses in the beam
NEW_LENGTHS = 300  # --new-length: distinct lengths a row's steps take in turn (2,400 to 3,600 frames at 30 s)
_ESPNET_FALLBACK = "Flash Attention failed, falling back"


class _Counter(logging.Filter):
    """On the log handler: counts (and hides) ESPnet's per-module flash-failure warnings."""

    count = 0

    def filter(self, record):
        if str(record.msg).startswith(_ESPNET_FALLBACK):
            _Counter.count += 1
            return False
        return True


def build(encoder: str, size: dict, device):
    from espnet2.asr.ctc import CTC
    from espnet2.asr.encoder.conformer_encoder import ConformerEncoder
    from espnet2.asr.encoder.e_branchformer_encoder import EBranchformerEncoder

    common = dict(output_size=size["output_size"], attention_heads=size["attention_heads"],
                  linear_units=size["linear_units"], num_blocks=size.get("blocks", 12), dropout_rate=0.1,
                  positional_dropout_rate=0.1, attention_dropout_rate=0.1, input_layer="conv2d")
    torch.manual_seed(0)
    if encoder == "e_branchformer":
        enc = EBranchformerEncoder(FEATS, attention_layer_type="selfattn", pos_enc_layer_type="abs_pos",
                                   cgmlp_linear_units=size["cgmlp_linear_units"], cgmlp_conv_kernel=31,
                                   use_ffn=True, macaron_ffn=True, merge_conv_kernel=31, **common)
    else:
        enc = ConformerEncoder(FEATS, selfattention_layer_type="rel_selfattn", pos_enc_layer_type="rel_pos",
                               rel_pos_type="latest", macaron_style=True, use_cnn_module=True, cnn_module_kernel=31,
                               normalize_before=True, activation_type="swish", **common)
    model = torch.nn.ModuleDict({"encoder": enc, "ctc": CTC(VOCAB, size["output_size"])})
    return model.to(device).train()


def batch(size: dict, ragged: bool, device, seed: int = 0):
    frames, target = size.get("frames", FRAMES), size.get("target", TARGET)
    g = torch.Generator().manual_seed(seed)
    n = size["batch"]
    x = torch.randn(n, frames, FEATS, generator=g)
    lengths = (torch.linspace(1.0, 0.3, n) * frames).long() if ragged else torch.full((n,), frames)
    x = x * (torch.arange(frames)[None, :, None] < lengths[:, None, None])
    ys = torch.randint(1, VOCAB - 1, (n, target), generator=g)
    return [t.to(device) for t in (x, lengths, ys, torch.full((n,), target))]


def new_lengths(size: dict, ragged: bool, device, cycle: int = NEW_LENGTHS):
    """The batch, a new length at every call (``--new-length``), as ESPnet's length-sorted ``numel`` batches give
    nearly every step: ``cycle`` lengths 4 frames apart (one frame apart after the 4x subsampling: a new attention
    shape each), centred on the row's length and taken in turn by every variant's steps, so that no two steps of a
    row share a length while every round's variants run nearly the same one. Cut from one batch on the device."""
    frames = size.get("frames", FRAMES)
    cycle = min(cycle, frames // 8)  # the shortest at least half the row's length
    top = frames + 2 * cycle
    x, _, ys, ylens = batch(dict(size, frames=top), ragged, device)
    scale = torch.linspace(1.0, 0.3, x.size(0), device=device) if ragged else torch.ones(x.size(0), device=device)
    taken = itertools.count()

    def next_batch():
        n = top - 4 * (next(taken) % cycle)
        lengths = (scale * n).long()
        return x[:, :n] * (torch.arange(n, device=device)[None, :, None] < lengths[:, None, None]), lengths, ys, ylens
    return next_batch


def make_step(model, data, bf16: bool, device):
    """One train step on ``data`` (x, lengths, targets, target lengths), or on what ``data()`` gives at each step."""
    optim = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        optim.zero_grad(set_to_none=True)
        x, lengths, ys, ylens = data() if callable(data) else data
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            hs, hlens, _ = model["encoder"](x, lengths)
            loss = model["ctc"](hs, hlens, ys, ylens)
        loss.backward()
        optim.step()
        return loss.detach()
    return step


def what_ran(model) -> str:
    """The backends the attention modules used in the last step, e.g. 'eager x12' or 'flash_attention_2 x12'."""
    names = []
    for m in model.modules():
        if hasattr(m, "use_flash_attn") and hasattr(m, "linear_q"):
            rel = hasattr(m, "rel_shift")  # stock 202511 rel-pos modules never read use_sdpa, ours and 202611's do
            names.append("flash_attention_2" if m.use_flash_attn and not rel else "sdpa" if m.use_sdpa else "eager")
    return ", ".join(f"{n} x{names.count(n)}" for n in sorted(set(names)))


VARIANTS = ("stock", "flash_attention_2", "sdpa", "eager", "auto")  # "floor": memory only
POLICY = VARIANTS[1:]


def _no_attention(self, query, key, value, *rest, **kwargs):
    """The ``floor`` variant's attention: the output projection of the values, nothing attended."""
    return self.linear_out(value)


def model_of(variant: str, model):
    """``model`` (as ESPnet builds it) for ``variant``: stock, the floor, or under the policy's request."""
    if variant in POLICY:
        model_attention.apply(model, optin.Request(variant, "config"))
    elif variant == "floor":  # what the step needs without attention: no attention policy can go below it
        for module in model.modules():
            if hasattr(module, "linear_q") and hasattr(module, "linear_out"):
                module.forward = _no_attention.__get__(module)
    return model


def ran(variant: str, model) -> str:
    """What the attention ran: ESPnet's flags for stock (``what_ran``), the policy's decisions per site else."""
    policy = model_attention.policy_of(model)
    if policy is None:
        return what_ran(model)
    return ", ".join(f"{site} {d.implementation}" for (site, _, _), d in sorted(policy.decisions.items()))


class _Calibrations(logging.Handler):
    """Sums the seconds of the policy's calibrations and counts its store hits, from its log lines."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds, self.stored = 0.0, 0

    def emit(self, record):
        found = re.search(r"calibration took ([0-9.]+) s", record.getMessage())
        self.seconds += float(found.group(1)) if found else 0.0
        self.stored += "(from the calibration store" in record.getMessage()


def _timed(step, sync) -> float:
    sync()
    start = time.perf_counter()
    step()
    sync()
    return 1e3 * (time.perf_counter() - start)


def measure(job: dict, args, device) -> dict:
    """One row, every variant in this process: memory and what ran with one model resident at a time (auto's
    first step, with its calibrations, and a second auto model's first step, which finds them in the store), then
    the step times with all resident, steps interleaved (the order turning each round) so that drift hits all alike."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    make, variants = job["make"], VARIANTS + (("floor",) if cuda and job["floor"] else ())
    row = {k: v for k, v in job.items() if k not in ("make", "floor")}
    watcher = _Calibrations()
    logging.getLogger("espnet_flashcompat").addHandler(watcher)
    logging.getLogger("espnet_flashcompat").setLevel(logging.INFO)
    cells = {}
    for variant in variants:
        step, model = make(variant)
        _Counter.count = 0
        first = _timed(step, sync)
        cell = dict(first_ms=first)
        if variant == "auto":
            cell.update(calibration_s=watcher.seconds)
            second, _ = make("auto")  # a later run: the calibrations come from the store
            seconds, stored = watcher.seconds, watcher.stored
            cell.update(second_first_ms=_timed(second, sync), second_calibration_s=watcher.seconds - seconds,
                        second_from_store=watcher.stored - stored)
            del second
        for _ in range(args.warmup):
            step()
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        cells[variant] = dict(cell, ran=ran(variant, model), espnet_warnings=_Counter.count,
                              peak_mib=torch.cuda.max_memory_allocated() / 2**20 if cuda else None)
        del model, step
        if cuda:
            torch.cuda.empty_cache()
    logging.getLogger("espnet_flashcompat").removeHandler(watcher)
    steps = {}
    for variant in VARIANTS:
        steps[variant] = make(variant)[0]
        for _ in range(args.warmup + 1):
            steps[variant]()
    times = {variant: [] for variant in VARIANTS}
    for i in range(args.repeat):
        for variant in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
            times[variant].append(_timed(steps[variant], sync))
    for variant in VARIANTS:
        cells[variant].update(median_ms=statistics.median(times[variant]), times_ms=times[variant])
    del steps
    if cuda:
        torch.cuda.empty_cache()
    return dict(row, cells=cells)


def train_job(encoder, size_name, size, ragged, bf16, device, new_length: bool = False) -> dict:
    data = new_lengths(size, ragged, device) if new_length else batch(size, ragged, device)

    def make(variant):
        model = model_of(variant, build(encoder, size, device))
        return make_step(model, data, bf16, device), model

    return dict(encoder=encoder, size=size_name, batch=("ragged" if ragged else "full")
                + (", a new length each step" if new_length else ""), precision="bf16" if bf16 else "fp32",
                make=make, floor=True)


def decode_job(size_name, size, bf16, device, steps=DECODE_STEPS, beam=DECODE_BEAM) -> dict:
    """ESPnet's Transformer decoder as beam search runs it: one token at a time (``forward_one_step`` with its
    cache), ``beam`` hypotheses against one utterance's encoder output (30 s: 750 frames after the 4x
    subsampling, expanded to the beam at every step), ``steps`` tokens; one cell times the whole loop."""
    from espnet2.asr.decoder.transformer_decoder import TransformerDecoder

    frames = size.get("frames", FRAMES) // 4
    g = torch.Generator().manual_seed(0)
    memory = torch.randn(1, frames, size["output_size"], generator=g).to(device)
    tokens = torch.randint(1, VOCAB - 1, (beam, steps), generator=g).to(device)

    def make(variant):
        torch.manual_seed(0)
        decoder = TransformerDecoder(VOCAB, size["output_size"], attention_heads=size["attention_heads"],
                                     linear_units=size["linear_units"], num_blocks=size.get("decoder_blocks", 6))
        model = model_of(variant, decoder.to(device).eval())

        @torch.no_grad()
        def loop():
            cache = None
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                for n in range(1, steps + 1):
                    mask = torch.tril(torch.ones(n, n, dtype=torch.bool, device=device)).unsqueeze(0)
                    _, cache = model.forward_one_step(tokens[:, :n], mask, memory.expand(beam, -1, -1), cache=cache)
            return cache
        return loop, model

    return dict(encoder="transformer decoder", size=size_name, batch=f"decode {beam} x {steps} tokens",
                precision="bf16" if bf16 else "fp32", make=make, floor=False)


def jobs(args, device) -> list:
    sizes = TINY if args.tiny else {k: SIZES[k] for k in args.sizes}
    out = [train_job(encoder, size_name, size, ragged, bf16, device, args.new_length)
           for encoder in args.encoders for size_name, size in sizes.items()
           for ragged in (False, True) for bf16 in (False, True)]
    if args.decode:
        out += [decode_job(size_name, size, bf16, device, *((4, 3) if args.tiny else ()))
                for size_name, size in list(sizes.items())[-1:] for bf16 in (False, True)]
    return out


def table(args, device, env: dict) -> list:
    """Every row, each in a process of its own (``--row N``, environment ``env``), each with a calibration store of
    its own: auto's first step pays what a first run pays (its calibrations, the kernels' first use in the process)."""
    rows = []
    for n, job in enumerate(jobs(args, device)):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**env, "ESPNET_FLASHCOMPAT_CALIBRATION_DIR": tmp}
            out = Path(tmp) / "row.json"
            subprocess.run([sys.executable, __file__, *args.forwarded, "--row", str(n), "--child-json", str(out)],
                           env=env, check=True)
            row = json.loads(out.read_text())
        rows.append(row)
        print("  " + summary(row), file=sys.stderr, flush=True)
    return rows


def summary(row: dict) -> str:
    c = row["cells"]
    best = min(c[v]["median_ms"] for v in VARIANTS)
    return (f"{row['encoder']} {row['size']} {row['batch']} {row['precision']} ({row['flash_attn']}): "
            + ", ".join(f"{v} {c[v]['median_ms']:.1f} ms" for v in VARIANTS)
            + f"; auto/best {c['auto']['median_ms'] / best:.3f}, calibration {c['auto']['calibration_s']:.2f} s")


def curves(args, device) -> dict:
    size = TINY["tiny"] if args.tiny else SIZES["ls100"]
    bf16 = args.curves_precision == "bf16"
    data = [batch(size, True, device, seed=s) for s in range(8)]
    out = {}
    for variant in ("stock", "auto"):
        model = model_of(variant, build("e_branchformer", size, device))
        torch.manual_seed(1)
        optim = torch.optim.Adam(model.parameters(), lr=5e-4)
        losses = []
        for i in range(args.curves):
            d = data[i % len(data)]
            optim.zero_grad(set_to_none=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                hs, hlens, _ = model["encoder"](d[0], d[1])
                loss = model["ctc"](hs, hlens, d[2], d[3])
            loss.backward()
            optim.step()
            losses.append(loss.item())
        out[variant] = dict(losses=losses, ran=ran(variant, model))
        del model
    return out


def paired(cells: dict) -> float:
    """The median over the rounds of auto's step over the step, in the same round, of the other cell whose median
    is the lowest."""
    other = min((v for v in VARIANTS if v != "auto"), key=lambda v: cells[v]["median_ms"])
    return statistics.median(a / b for a, b in zip(cells["auto"]["times_ms"], cells[other]["times_ms"]))


def render(rows: list, curve: dict, device, args) -> str:
    lines = [f"# ESPnet attention: stock and each backend under the policy, {device_name(device)}, "
             f"torch {torch.__version__}", "",
             f"Median of {args.repeat} steps after {args.warmup + 1} warm-up; peak = max_memory_allocated of one "
             "step (one model resident). auto/best: auto's median over the fastest median of the row (stock "
             "included); paired: the median over the rounds of auto's step over that of the fastest other cell in "
             "the same round (the cells' steps interleave, so that a round's drift cancels); auto mem/leanest: over "
             "the lowest peak of the row. calibration: what auto's calibrations took in the first run (in its first "
             "step); 2nd run: a new model with the first one's store, its first step and its calibrations.", "",
             "| encoder | size | batch | prec. | flash-attn | " + " | ".join(f"{v} ms" for v in VARIANTS)
             + " | auto ran | auto/best | paired | auto/stock | " + " | ".join(f"{v} MiB" for v in VARIANTS)
             + " | floor MiB | auto mem/leanest | auto mem/stock | calibration | auto 1st step | 2nd run 1st step, "
             "calibration | ESPnet warnings (stock) |",
             "|" + "---|" * (5 + 2 * len(VARIANTS) + 12)]
    for row in rows:
        c = row["cells"]
        best = min(c[v]["median_ms"] for v in VARIANTS)
        peaks = {v: c[v]["peak_mib"] for v in VARIANTS}
        mem = [f"{peaks[v]:.0f}" if peaks[v] else "-" for v in VARIANTS]
        floor = c.get("floor", {}).get("peak_mib")
        lean = (f"{peaks['auto'] / min(peaks.values()):.2f} | {peaks['auto'] / peaks['stock']:.2f}"
                if peaks["auto"] else "- | -")
        auto = c["auto"]
        lines.append(
            f"| {row['encoder']} | {row['size']} | {row['batch']} | {row['precision']} | {row['flash_attn']} | "
            + " | ".join(f"{c[v]['median_ms']:.1f}" for v in VARIANTS)
            + f" | {auto['ran']} | {auto['median_ms'] / best:.3f} | {paired(c):.3f}"
            + f" | {auto['median_ms'] / c['stock']['median_ms']:.3f}"
            + " | " + " | ".join(mem) + f" | {f'{floor:.0f}' if floor else '-'} | {lean} | "
            f"{auto['calibration_s']:.2f} s | {auto['first_ms']:.0f} ms | {auto['second_first_ms']:.0f} ms, "
            f"{auto['second_calibration_s']:.2f} s ({auto['second_from_store']} from the store) | "
            f"{c['stock']['espnet_warnings']} |")
    if curve:
        n = len(curve["stock"]["losses"])
        every = max(1, n // 20)
        lines += ["", f"## Loss curves: E-Branchformer, {'bf16 AMP' if args.curves_precision == 'bf16' else 'fp32'}, "
                      f"8 cycled ragged batches (stock ran {curve['stock']['ran']}; auto ran {curve['auto']['ran']})",
                  "", "| step | stock loss | auto loss |", "|---|---|---|"]
        for i in list(range(0, n, every)) + ([n - 1] if (n - 1) % every else []):
            lines.append(f"| {i + 1} | {curve['stock']['losses'][i]:.3f} | {curve['auto']['losses'][i]:.3f} |")
    return "\n".join(lines) + "\n"


def _listdir(path: str) -> list:
    try:
        return os.listdir(path)
    except OSError:
        return []


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def flash_state() -> str:
    diagnosis = guard.probe_flash_attn()
    if diagnosis is None:
        return "healthy"
    return "absent" if "No module named 'flash_attn'" in diagnosis.error else "broken"


def broken_env(broken: Path) -> dict:
    """The environment of rows run with the broken flash-attn alone: a healthy one on PYTHONPATH would lend it
    flash_attn_2_cuda (one installed in site-packages would too: the rows' flash-attn column then says healthy)."""
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and not any(n.startswith(("flash_attn", "flash_attn_2_cuda")) for n in _listdir(p))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(broken), *kept])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory for espnet_attention.md and .json")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (2 blocks, d=32, 3 s): a CPU smoke test")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=None, help="timed steps per cell (default 10; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
    parser.add_argument("--encoders", nargs="+", default=["e_branchformer", "conformer"])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--decode", action="store_true", help="add the decoder's decode-step rows (largest size)")
    parser.add_argument("--new-length", action="store_true",
                        help="train rows: a new batch length at every step (as length-sorted batches give)")
    parser.add_argument("--broken-flash", type=Path, help="a broken flash-attn directory: run the table again with it")
    parser.add_argument("--curves", type=int, default=0, help="train N steps of stock and auto, print the losses")
    parser.add_argument("--curves-precision", choices=("fp32", "bf16"), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--log-level", default="WARNING", help="what the log shows (INFO: every calibration)")
    parser.add_argument("--row", type=int, help=argparse.SUPPRESS)  # a child process: this row alone
    parser.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)  # ... written here
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (2 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.forwarded = ["--device", args.device, "--repeat", str(args.repeat), "--warmup", str(args.warmup),
                      "--encoders", *args.encoders, "--sizes", *args.sizes] + ["--tiny"] * args.tiny \
        + ["--decode"] * args.decode + ["--new-length"] * args.new_length + ["--log-level", args.log_level]
    handler = logging.StreamHandler()
    handler.setLevel(args.log_level)  # by default the policy's INFO lines go to _Calibrations only
    handler.addFilter(_Counter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    args.curves_precision = args.curves_precision or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # ESPnet's default (use_tf32: false)
    if args.row is not None:
        row = measure(jobs(args, device)[args.row], args, device)
        row["flash_attn"] = flash_state()  # after the first stock build: ESPnet imports flash-attn itself first
        args.child_json.write_text(json.dumps(row))
        return
    rows = table(args, device, dict(os.environ))
    if args.broken_flash:
        rows += table(args, device, broken_env(args.broken_flash))
    curve = curves(args, device) if args.curves else {}
    text = render(rows, curve, device, args)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "espnet_attention.md").write_text(text)
        (args.out / "espnet_attention.json").write_text(json.dumps(dict(
            device=device_name(device), torch=torch.__version__, repeat=args.repeat, warmup=args.warmup,
            rows=rows, curves=curve), indent=1))


if __name__ == "__main__":
    main()
