"""What the model-wide policy adds to each call of ESPnet's own attention: its decision and its hand-off, per call.

Two copies of each ESPnet model from the same seed: *stock*, as ESPnet builds it with its flash path off (eager
attention: what stock runs on CPU, on a GPU outside ESPnet's list, or in fp32), and *policy*, under
``model_attn_implementation: eager`` (``model_attention.apply``): the same kernels, so that what differs is our
``forward`` (the site's decision, ESPnet's flags, the attention matrix dropped) before ESPnet's own. A third copy, a
second stock one, is the control: what noise alone gives.

Patterns (``--patterns``):

- ``decode``: ESPnet's ``TransformerDecoder`` (6 blocks) as beam search runs it: one token at a time,
  ``forward_one_step`` with its cache, 10 hypotheses against the encoder's output (``expand``-ed at every step, as
  ``BatchBeamSearch`` does), 30 tokens; a sample is one such decode; per step: 12 attention calls.
- ``encode``: ESPnet's ``TransformerEncoder`` (6 blocks) on 4 utterances (already subsampled: ``input_layer:
  null``), eval under ``torch.no_grad`` (a decode's encoder); 6 calls.
- ``train``: the same encoder's forward and backward (a training step's attention; dropout off); 6 calls.

``--size full`` (the default on CUDA): 256 wide, 4 heads, 200 frames of encoder output, utterances of 100 to 200
frames; ``small`` (the default on CPU): 32 wide, 2 heads, 20 frames, utterances of 10 to 20 frames.

Each round times policy, stock, control, control, stock, policy, after a warm-up; a sample is the mean of enough
back-to-back runs to last ``SAMPLE_S``. Per pattern: the median over rounds of (policy - stock) per run and per
attention call, as a share of stock's run, with its interquartile range, and the same for the control.
``--pin``: the cost of entering and leaving the run-time pin of one SDPA kernel (``sdpa_kernels.pinned``), which a
decision for ``sdpa:<kernel>`` adds to every call.

    python benchmarks/model_attention_overhead.py [--repeat N] [--threads T] [--device cuda] [--size full]
"""

import argparse
import copy
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SAMPLE_S = 0.15
BLOCKS, VOCAB, BEAM, TOKENS = 6, 500, 10, 30
# full: the sizes of a small ASR recipe's decoder and encoder; small: tiny tensors, so that on a CPU the time of the
# Python around the kernels, ours included, is not lost in the kernels' (the default on CPU)
SIZES = {"full": dict(width=256, heads=4, memory=200, lengths=(200, 170, 130, 100)),
         "small": dict(width=32, heads=2, memory=20, lengths=(20, 17, 13, 10))}


def _stock(model):
    for module in model.modules():
        if hasattr(module, "use_flash_attn"):
            module.use_flash_attn = False
    return model


def copies(model):
    """{"stock", "policy", "control"} of ``model`` (the policy's copy under an explicit ``eager`` request)."""
    from espnet_flashcompat.espnet import model_attention
    from espnet_flashcompat.espnet.request import Request

    stock = _stock(model)
    policy, control = copy.deepcopy(stock), copy.deepcopy(stock)
    model_attention.apply(policy, Request("eager", "config"))
    return {"policy": policy, "stock": stock, "control": control}


def decode(device, size):
    import torch
    from espnet2.asr.decoder.transformer_decoder import TransformerDecoder

    torch.manual_seed(0)
    width = size["width"]
    models = copies(TransformerDecoder(VOCAB, width, attention_heads=size["heads"], linear_units=4 * width,
                                       num_blocks=BLOCKS, dropout_rate=0.0).to(device).eval())
    g = torch.Generator().manual_seed(0)
    memory = torch.randn(1, size["memory"], width, generator=g).to(device)
    tokens = torch.randint(1, VOCAB - 1, (BEAM, TOKENS), generator=g).to(device)

    def run(model):
        cache = None
        with torch.no_grad():
            for n in range(1, TOKENS + 1):
                mask = torch.tril(torch.ones(n, n, dtype=torch.bool, device=device)).unsqueeze(0)
                _, cache = model.forward_one_step(tokens[:, :n], mask, memory.expand(BEAM, -1, -1), cache=cache)
    return models, run, 2 * BLOCKS * TOKENS, f"decode {BEAM} x {TOKENS} tokens"


def encoder(device, size, train: bool):
    import torch
    from espnet2.asr.encoder.transformer_encoder import TransformerEncoder

    torch.manual_seed(0)
    width, lengths = size["width"], size["lengths"]
    net = TransformerEncoder(width, output_size=width, attention_heads=size["heads"], linear_units=4 * width,
                             num_blocks=BLOCKS, dropout_rate=0.0, positional_dropout_rate=0.0,
                             attention_dropout_rate=0.0, input_layer=None).to(device)
    models = copies(net.train(train))
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(len(lengths), max(lengths), width, generator=g).to(device)
    lens = torch.tensor(lengths, device=device)

    def run(model):
        if train:
            model(xs, lens)[0].sum().backward()
        else:
            with torch.no_grad():
                model(xs, lens)
    return models, run, BLOCKS, f"{'train' if train else 'eval'} {len(lengths)} x {max(lengths)} frames"


PATTERNS = {"decode": decode, "encode": lambda d, s: encoder(d, s, False), "train": lambda d, s: encoder(d, s, True)}


def sample(run, model, sync, k: int) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(k):
        run(model)
    sync()
    return (time.perf_counter() - start) / k


def measure(name: str, device, size: dict, repeat: int, sync) -> dict:
    models, run, calls, what = PATTERNS[name](device, size)
    for model in models.values():
        for _ in range(3):
            run(model)
    one = sample(run, models["stock"], sync, 3)
    k = max(1, round(SAMPLE_S / one))
    added, noise, stock = [], [], []
    for _ in range(repeat):
        t = {}
        for variant in ("policy", "stock", "control", "control", "stock", "policy"):
            t.setdefault(variant, []).append(sample(run, models[variant], sync, k))
        base = statistics.mean(t["stock"])
        stock.append(base)
        added.append(statistics.mean(t["policy"]) - base)
        noise.append(statistics.mean(t["control"]) - base)
    return dict(pattern=name, what=what, calls=calls, stock=statistics.median(stock), added=added, noise=noise)


def _quartiles(values):
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def render(rows, device_name: str, size: dict, pin_us) -> str:
    lines = [f"Device: {device_name}; {size['width']} wide, {size['heads']} heads, {size['memory']} frames of encoder "
             f"output", "",
             "| pattern | stock run | added per run [IQR] | per attention call | share of stock | control (noise) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        low, mid, high = _quartiles(r["added"])
        lines.append(f"| {r['pattern']}: {r['what']}, {r['calls']} calls | {r['stock'] * 1e3:.2f} ms | "
                     f"{mid * 1e6:.0f} us [{low * 1e6:.0f}, {high * 1e6:.0f}] | {mid / r['calls'] * 1e6:.1f} us | "
                     f"{mid / r['stock']:+.2%} | {statistics.median(r['noise']) / r['stock']:+.2%} |")
    if pin_us is not None:
        lines += ["", f"Entering and leaving the run-time pin of one SDPA kernel: {pin_us:.2f} us per call."]
    return "\n".join(lines)


def pin_cost(n: int = 20000) -> float:
    from espnet_flashcompat.attention import sdpa_kernels

    start = time.perf_counter()
    for _ in range(n):
        with sdpa_kernels.pinned("sdpa:efficient"):
            pass
    return (time.perf_counter() - start) / n * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=9, help="rounds per pattern (default 9)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--size", choices=list(SIZES), help="full on CUDA, small on CPU by default")
    parser.add_argument("--pin", action="store_true", help="also time the run-time pin of one SDPA kernel")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    import platform

    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    size = SIZES[args.size or ("full" if device.type == "cuda" else "small")]
    rows = [measure(name, device, size, args.repeat, sync) for name in args.patterns]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}), {args.threads} thread(s)"
    import espnet

    print(f"torch {torch.__version__}, espnet {espnet.__version__}, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(render(rows, name, size, pin_cost() if args.pin else None))


if __name__ == "__main__":
    main()
