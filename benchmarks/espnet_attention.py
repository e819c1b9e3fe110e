"""ESPnet's own attention, stock vs the model-wide policy: one train step of an ESPnet ASR encoder.

Models: ESPnet's ``EBranchformerEncoder`` with ``attention_layer_type: selfattn`` (``abs_pos``: the module that has a
flash path) and ``ConformerEncoder`` with ``rel_selfattn`` (``rel_pos``, ``rel_pos_type: latest``), each with ESPnet's
CTC on top, built with the stock arguments of the LibriSpeech-100 recipes (conv2d subsampling, macaron FFN, dropout
0.1, attention dropout 0.1, ``use_flash_attn`` left at its default) in two sizes: ``ls100`` (12 blocks, d=256,
4 heads, FFN 1024, batch 8) and ``large`` (12 blocks, d=512, 8 heads, FFN 2048, batch 16), where the step is not
launch-bound. Inputs: 30 s of 80-dim features (3000 frames), ``full`` (every utterance 30 s) or ``ragged`` (30 s
down to 9 s, padded), random targets of 150 tokens out of 500. A step: zero_grad, forward, CTC loss, backward, Adam.

Columns: ``floor`` (memory only) is the same model with every attention module reduced to its output projection of
the values, nothing attended: the peak that the rest of the step needs, below which no attention backend can go;
``floor/stock`` is thus the lowest ratio an attention policy could reach in that row. ``stock`` is the module as ESPnet builds it (on a GPU whose name ESPnet's list knows, with flash-attn
importable, ``use_flash_attn`` is on: in fp32 each module then fails once, logs, and runs eager without attention
dropout; the count of those warnings is shown); ``policy`` is the same weights under
``model_attention.apply(..., auto)``. Each cell: the median step time over ``--repeat`` steps after ``--warmup``
(CUDA synchronised around each step) and the peak memory of the timed steps (``max_memory_allocated``: weights,
Adam state, activations, gradients; CUDA only). Precision: ``fp32``, or ``bf16`` = AMP (``torch.autocast``) over
fp32 weights, as ESPnet's ``use_amp``. Memory is measured with one model resident at a time; the times with both
resident, their steps interleaved.

flash-attn: the table runs with what this interpreter imports (``healthy``, ``absent`` or ``broken``);
``--broken-flash DIR`` runs the whole table again in a child process with DIR first on ``PYTHONPATH`` (a flash-attn
without its CUDA module: ``python -c "import sys; sys.path.insert(0, 'tests'); import faults;
print(faults.broken_flash_attn())"`` builds one, with pip and PyPI). ``--curves N``: N train steps of stock and of
the policy (E-Branchformer ls100, ``--curves-precision``: bf16 AMP by default on CUDA, from the same weights over
the same 8 cycled ragged batches) and their CTC losses every N/20 steps. In fp32 with a healthy flash-attn, stock
trains on eager attention without attention dropout (its fallback), the policy on SDPA with it.

Results, with their machine, versions and date, and what a ratio's noise is: docs/benchmarks.md; run times:
docs/gpu.md.

    python benchmarks/espnet_attention.py --out DIR                                   # the table
    python benchmarks/espnet_attention.py --out DIR --broken-flash BROKEN --curves 300   # the table twice, curves
    python benchmarks/espnet_attention.py --tiny --out /tmp/bench --curves 20           # CPU smoke test: tiny sizes

Writes DIR/espnet_attention.md (tables) and DIR/espnet_attention.json (every measurement), and prints the tables.
"""

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
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


def make_step(model, data, bf16: bool, device):
    optim = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        optim.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            hs, hlens, _ = model["encoder"](data[0], data[1])
            loss = model["ctc"](hs, hlens, data[2], data[3])
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


VARIANTS = ("stock", "policy")


def _no_attention(self, query, key, value, *rest, **kwargs):
    """The ``floor`` variant's attention: the output projection of the values, nothing attended."""
    return self.linear_out(value)


def model_of(variant: str, encoder: str, size: dict, device):
    model = build(encoder, size, device)
    if variant == "policy":
        model_attention.apply(model, optin.Request("auto", "config"))
    elif variant == "floor":  # what the step needs without attention: no attention policy can go below it
        for module in model.modules():
            if hasattr(module, "linear_q") and hasattr(module, "linear_out"):
                module.forward = _no_attention.__get__(module)
    return model


def measure(encoder, size_name, size, ragged, bf16, args, device) -> list:
    """[stock row, policy row]: peak memory and what ran with one model resident at a time, then the step times with
    both resident, steps interleaved (the order alternating each round) so that clock drift hits both alike."""
    data, cuda = batch(size, ragged, device), device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows, steps = {}, {}
    for variant in VARIANTS + (("floor",) if cuda else ()):  # the floor: memory only
        model = model_of(variant, encoder, size, device)
        step = make_step(model, data, bf16, device)
        _Counter.count = 0
        for _ in range(args.warmup):
            step()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        rows[variant] = dict(encoder=encoder, size=size_name, batch="ragged" if ragged else "full",
                             precision="bf16" if bf16 else "fp32", variant=variant, ran=what_ran(model),
                             espnet_warnings=_Counter.count,
                             peak_mib=torch.cuda.max_memory_allocated() / 2**20 if cuda else None)
        del model, step
        if cuda:
            torch.cuda.empty_cache()
    for variant in VARIANTS:
        steps[variant] = make_step(model_of(variant, encoder, size, device), data, bf16, device)
        for _ in range(args.warmup):
            steps[variant]()
    times = {variant: [] for variant in VARIANTS}
    for i in range(args.repeat):
        for variant in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
            sync()
            start = time.perf_counter()
            steps[variant]()
            sync()
            times[variant].append(1e3 * (time.perf_counter() - start))
    for variant in VARIANTS:
        rows[variant].update(median_ms=statistics.median(times[variant]), times_ms=times[variant])
    del steps
    if cuda:
        torch.cuda.empty_cache()
    floor = rows.get("floor", {}).get("peak_mib")
    return [dict(rows[variant], floor_mib=floor) for variant in VARIANTS]


def table(args, device) -> list:
    rows = []
    sizes = TINY if args.tiny else {k: SIZES[k] for k in args.sizes}
    for encoder in args.encoders:
        for size_name, size in sizes.items():
            for ragged in (False, True):
                for bf16 in (False, True):
                    rows += measure(encoder, size_name, size, ragged, bf16, args, device)
                    stock, policy = rows[-2:]
                    mib = (f" / {stock['peak_mib']:.0f} MiB; policy" if stock["peak_mib"] else ", policy")
                    print(f"  {encoder} {size_name} {stock['batch']} {stock['precision']}: stock {stock['ran']} "
                          f"{stock['median_ms']:.1f} ms{mib} {policy['ran']} {policy['median_ms']:.1f} ms"
                          + (f" / {policy['peak_mib']:.0f} MiB; floor {stock['floor_mib']:.0f} MiB"
                             if stock["peak_mib"] else ""), file=sys.stderr, flush=True)
    flash = flash_state()  # after the first stock build: ESPnet imports flash-attn itself, before any probe of ours
    return [dict(row, flash_attn=flash) for row in rows]


def curves(args, device) -> dict:
    size = TINY["tiny"] if args.tiny else SIZES["ls100"]
    bf16 = args.curves_precision == "bf16"
    data = [batch(size, True, device, seed=s) for s in range(8)]
    out = {}
    for variant in VARIANTS:
        model = model_of(variant, "e_branchformer", size, device)
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
        out[variant] = dict(losses=losses, ran=what_ran(model))
        del model
    return out


def render(rows: list, curve: dict, device, args) -> str:
    lines = [f"# ESPnet attention: stock vs model_attention (auto), {device_name(device)}, torch {torch.__version__}",
             "", f"Median of {args.repeat} train steps after {args.warmup} warm-up; peak = max_memory_allocated.", "",
             "| encoder | size | batch | prec. | flash-attn | stock ran | stock ms | policy ran | policy ms | "
             "time policy/stock | stock MiB | policy MiB | mem policy/stock | floor MiB | floor/stock | "
             "ESPnet warnings (stock) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for stock, policy in zip(rows[0::2], rows[1::2]):
        mem = (f"{stock['peak_mib']:.0f} | {policy['peak_mib']:.0f} | {policy['peak_mib'] / stock['peak_mib']:.2f} | "
               f"{stock['floor_mib']:.0f} | {stock['floor_mib'] / stock['peak_mib']:.2f}"
               if stock["peak_mib"] else "- | - | - | - | -")
        lines.append(f"| {stock['encoder']} | {stock['size']} | {stock['batch']} | {stock['precision']} | "
                     f"{stock['flash_attn']} | {stock['ran']} | {stock['median_ms']:.1f} | {policy['ran']} | "
                     f"{policy['median_ms']:.1f} | {policy['median_ms'] / stock['median_ms']:.2f} | {mem} | "
                     f"{stock['espnet_warnings']} |")
    if curve:
        n = len(curve["stock"]["losses"])
        every = max(1, n // 20)
        lines += ["", f"## Loss curves: E-Branchformer, {'bf16 AMP' if args.curves_precision == 'bf16' else 'fp32'}, "
                      f"8 cycled ragged batches (stock ran {curve['stock']['ran']}; "
                      f"policy ran {curve['policy']['ran']})",
                  "", "| step | stock loss | policy loss |", "|---|---|---|"]
        for i in list(range(0, n, every)) + ([n - 1] if (n - 1) % every else []):
            lines.append(f"| {i + 1} | {curve['stock']['losses'][i]:.3f} | {curve['policy']['losses'][i]:.3f} |")
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory for espnet_attention.md and .json")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (2 blocks, d=32, 3 s): a CPU smoke test")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=None, help="timed steps per cell (default 10; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
    parser.add_argument("--encoders", nargs="+", default=["e_branchformer", "conformer"])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--broken-flash", type=Path, help="a broken flash-attn directory: run the table again with it")
    parser.add_argument("--curves", type=int, default=0, help="train N steps of stock and policy, print the losses")
    parser.add_argument("--curves-precision", choices=("fp32", "bf16"), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)  # a --broken-flash child writes here
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (2 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    handler = logging.StreamHandler()
    handler.addFilter(_Counter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    args.curves_precision = args.curves_precision or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # ESPnet's default (use_tf32: false)
    rows = table(args, device)
    if args.child_json:
        args.child_json.write_text(json.dumps(rows))
        return
    if args.broken_flash:
        (args.out or Path("/tmp")).mkdir(parents=True, exist_ok=True)
        child = (args.out or Path("/tmp")) / "espnet_attention.broken.json"
        # the child must see the broken flash-attn alone: a healthy one on PYTHONPATH would lend it flash_attn_2_cuda
        # (one installed in site-packages would too: the child's flash-attn column then says "healthy")
        kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                if p and not any(n.startswith(("flash_attn", "flash_attn_2_cuda")) for n in _listdir(p))]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(args.broken_flash), *kept])}
        forwarded = ["--device", args.device, "--repeat", str(args.repeat), "--warmup", str(args.warmup),
                     "--encoders", *args.encoders, "--sizes", *args.sizes] + (["--tiny"] if args.tiny else [])
        subprocess.run([sys.executable, __file__, *forwarded, "--child-json", str(child)], env=env, check=True)
        rows += json.loads(child.read_text())
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
