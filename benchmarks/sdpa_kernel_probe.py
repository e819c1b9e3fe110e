"""Which SDPA kernel really runs: one attention-matrix row under torch's own choice and under each pin.

For each row (wav2vec2 base, bf16, batch 8, as ``attention_matrix.py``), one step is profiled under: no pin
(torch's own choice), ``sdpa_kernels.pinned(k)`` (the run-time pin) and ``pinned(k, strict=True)`` (calibration's
pin, the kernel alone) for each SDPA kernel; the table gives the attention kernels the profiler saw, the median of
``--iters`` steps and the peak memory, with torch's SDPA priority order inside each context.

    python benchmarks/sdpa_kernel_probe.py --out DIR [--seconds 10] [--iters 20]   # on a CUDA machine
"""

import argparse
import json
import logging
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_matrix import environment, make_batch, make_model, measure, set_backend, step_fn  # noqa: E402

logger = logging.getLogger("sdpa_kernel_probe")
ATTENTION_KERNEL = re.compile(r"fmha|flash|cudnn|sdpa|attention|cutlass", re.I)
ORDER_NAMES = ("math", "flash", "efficient", "cudnn", "overrideable")  # at::SDPBackend's values


def priority() -> list:
    return [ORDER_NAMES[int(b)] if 0 <= int(b) < len(ORDER_NAMES) else str(b) for b in torch._C._get_sdp_priority_order()]


def kernels_of(step) -> list:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages() if ATTENTION_KERNEL.search(e.key)}
    return sorted(n[:90] for n in names)


def priority_inside(implementation, strict) -> list:
    from espnet_flashcompat.attention import sdpa_kernels

    with sdpa_kernels.pinned(implementation, strict):
        return priority()


def probe_row(model, seconds, ragged, train, iters):
    from espnet_flashcompat.attention import sdpa_kernels
    from espnet_flashcompat.attention.calibrate import release

    x, mask = make_batch(seconds, ragged, torch.bfloat16)
    rows = []
    for implementation, strict in [("sdpa", False)] + [(sdpa_kernels.name(k), s) for k in sdpa_kernels.KERNELS
                                                       for s in (False, True)]:
        label = implementation + (" strict" if strict else "")
        step = step_fn(model, x, mask, train, implementation, strict)
        try:
            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            times = measure(step, 2, iters)
            peak = torch.cuda.max_memory_allocated() / 2**30
            rows.append({"pin": label, "kernels": kernels_of(step), "median_ms": statistics.median(times),
                         "peak_gib": peak, "priority": priority_inside(implementation, strict)})
        except RuntimeError as exc:
            rows.append({"pin": label, "error": str(exc).splitlines()[0][:200]})
            release(exc)
        logger.info("%s s %s %s %s: %s", seconds, "ragged" if ragged else "full", "train" if train else "inference",
                    label, rows[-1])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    model = make_model("wav2vec2", torch.bfloat16)
    set_backend(model, "sdpa")
    result = {"environment": environment(), "default_priority": priority(),
              "rows": {}}
    lines = [f"default priority order before any SDPA call: {result['default_priority']}", "",
             "| row | pin | attention kernels seen | median ms | peak GiB | priority order inside |", "|---|---|---|---|---|---|"]
    for ragged, train in ((True, True), (True, False), (False, True)):
        name = f"{args.seconds:g} s {'ragged' if ragged else 'full'}, {'train step' if train else 'inference'}"
        model.train(train)
        rows = result["rows"][name] = probe_row(model, args.seconds, ragged, train, args.iters)
        for r in rows:
            if "error" in r:
                lines.append(f"| {name} | {r['pin']} | fails: {r['error']} | | | |")
            else:
                lines.append(f"| {name} | {r['pin']} | {'<br>'.join(r['kernels'])} | {r['median_ms']:.1f} | "
                             f"{r['peak_gib']:.2f} | {', '.join(r['priority'])} |")
    result["default_priority_after"] = priority()
    lines.insert(1, f"default priority order after the probe: {result['default_priority_after']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sdpa_kernel_probe.md").write_text("\n".join(lines) + "\n")
    (args.out / "sdpa_kernel_probe.json").write_text(json.dumps(result, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
