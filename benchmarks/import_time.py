"""Import-time benchmark: stock ``import s3prl.nn`` vs ``espnet_flashcompat.import_s3prl()``, each + one upstream.

Every measurement is a fresh Python process (import state is per process). In each one, ``import torch``
runs first and is reported apart (``torch`` column): every ESPnet process has torch imported long before
its frontend is built. The timed region after it is

- ``import``: getting ``S3PRLUpstream``, which is, per variant,
  - ``stock``: ``from s3prl.nn import S3PRLUpstream`` with torchaudio shimmed *inside the benchmark's
    process only* (``set_audio_backend`` restored as a no-op for ``byol_s``, a dummy ``torchaudio.sox_effects``
    for ``mos_prediction``), which is "nothing broken": without the shim it fails on the legacy
    stack (s3prl 0.4.18 with torchaudio >= 2.9), shown once as ``stock, real stack``;
  - ``ours``: ``espnet_flashcompat.import_s3prl().S3PRLUpstream`` on the real, unshimmed stack (its lazy hub
    never imports ``byol_s`` or ``mos_prediction``, so the shim could not change its path);
  - ``bare``: the cheapest lazy import imaginable, wired by hand with no guard: an empty module stands in for
    ``s3prl.hub``, ``s3prl.nn`` is imported, and only the one ``hubconf`` module the upstream lives in. It imports
    exactly the same modules as ``ours`` (espnet_flashcompat's aside): the baseline for our machinery's cost;
- ``build``: ``S3PRLUpstream("fbank")`` or ``S3PRLUpstream("hf_wav2vec2_custom", path_or_url=<tiny HF wav2vec2>)``
  (``make_tiny_hf_upstream``, written once in a temp dir before any timing).

Each run records wall time and CPU time (``time.process_time``) of import+build. Targets:

- ours <= 0.4x stock, import+build with one upstream built: checked on wall AND CPU time;
- our machinery <= 5% when nothing is broken: the CPU time of our own code, measured directly in the ``ours``
  runs (importing ``espnet_flashcompat.s3prl.guard``/``hub``, ``hub.read_index``, and the guard's import wrapper
  done again on the imported modules), as a share of ``bare``'s import+build CPU time. ``ours / bare - 1``
  end to end is printed as a cross-check; on a shared 2-core machine it moves by +-15% from run to run,
  too much to resolve 5%.

Variants are interleaved (ABC, CBA, ...) after one untimed warm-up run of each, so the page cache and drift
treat them alike; ratios are medians of the per-round ratios. Workers run with ``OMP_NUM_THREADS=1``
(imports are single-threaded; without it, OpenMP's thread pool start-up and spin-waiting add up to a second
of noise to the first forward in ``build``) and with the package's startup hook off
(``ESPNET_FLASHCOMPAT_DISABLE=1``; ``benchmarks/startup_hook.py`` measures the hook).

    python benchmarks/import_time.py [--repeat N] [--upstreams fbank,hf]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UPSTREAMS = {"fbank": ("fbank", "s3prl.upstream.baseline.hubconf"),
             "hf": ("hf_wav2vec2_custom", "s3prl.upstream.hf_wav2vec2.hubconf")}

# Runs in a fresh interpreter: argv = variant, upstream key, tiny model dir. Prints one "RESULT {json}" line.
WORKER = r"""
import os, sys, time
t0, c0 = time.perf_counter(), time.process_time()
import torch
t1, c1 = time.perf_counter(), time.process_time()
import json
variant, key, tiny = sys.argv[1:4]
name, hubconf = %(upstreams)r[key]
kwargs = {"path_or_url": tiny} if key == "hf" else {}
own = {}
if variant.startswith("stock"):
    import torchaudio
    if variant == "stock":  # the shim: what torchaudio >= 2.9 removed, put back for this process only
        import types
        torchaudio.set_audio_backend = lambda *a, **k: None
        sox = types.ModuleType("torchaudio.sox_effects")
        sox.apply_effects_tensor = sox.apply_effects_file = None
        sys.modules["torchaudio.sox_effects"] = torchaudio.sox_effects = sox
    try:
        from s3prl.nn import S3PRLUpstream
    except Exception as exc:
        print("RESULT " + json.dumps({"failed": f"{type(exc).__name__}: {exc}", "torch": t1 - t0,
                                      "import": time.perf_counter() - t1}))
        sys.exit(0)
elif variant == "ours":
    import espnet_flashcompat
    import espnet_flashcompat.s3prl.hub as hub_module
    own["modules"] = time.process_time() - c1
    real_read_index = hub_module.read_index
    def read_index(*args):
        start = time.process_time()
        try:
            return real_read_index(*args)
        finally:
            own["index"] = time.process_time() - start
    hub_module.read_index = read_index
    S3PRLUpstream = espnet_flashcompat.import_s3prl().S3PRLUpstream
elif variant == "bare":
    import importlib, types
    import s3prl
    sys.modules["s3prl.hub"] = s3prl.hub = types.ModuleType("s3prl.hub")
    from s3prl.nn import S3PRLUpstream
    setattr(s3prl.hub, name, getattr(importlib.import_module(hubconf), name))
t2 = time.perf_counter()
S3PRLUpstream(name, **kwargs)
t3, c3 = time.perf_counter(), time.process_time()
if variant == "ours":  # the guard's wrapper around each of its 3 imports (s3prl, s3prl.nn, the hubconf), done again
    from espnet_flashcompat.s3prl.guard import import_recovering
    start = time.process_time()
    for module in ("s3prl", "s3prl.nn", hubconf):
        import_recovering(module)
    own["wrapper"] = time.process_time() - start
print("RESULT " + json.dumps({"torch": t1 - t0, "torch_cpu": c1 - c0, "import": t2 - t1, "build": t3 - t2,
                              "cpu": c3 - c1, "own": own,
                              "espnet2": "espnet2" in sys.modules,
                              "upstream_modules": sum(m.endswith(".hubconf") for m in sys.modules)}), flush=True)
os._exit(0)  # skip the interpreter's teardown: not part of any variant's cost, and seconds after ESPnet
""" % {"upstreams": UPSTREAMS}

VARIANTS = {
    "stock": "stock  import s3prl.nn (torchaudio shimmed)",
    "ours": "ours   import_s3prl()",
    "bare": "bare   hand-wired lazy hub, no guard",
}


def run_worker(variant, key, tiny, log):
    env = dict(os.environ, ESPNET_FLASHCOMPAT_DISABLE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WORKER, variant, key, str(tiny)], env=env, cwd=REPO,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    log.write(f"--- {variant} {key} rc={proc.returncode} wall={wall:.2f}s\n{proc.stderr[-4000:]}\n")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"worker {variant}/{key} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall"] = wall
    return result


def make_tiny(tmp):
    code = ("import sys; from espnet_flashcompat.testing import make_tiny_hf_upstream; "
            "make_tiny_hf_upstream(sys.argv[1])")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-c", code, str(tmp)], env=env, check=True, capture_output=True)
    return tmp


def spread(values, scale=1.0, fmt="{:.2f}"):
    """'median [min-max]'."""
    values = [v * scale for v in values]
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def median(values):
    return statistics.median(list(values))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per variant and upstream (default 2)")
    parser.add_argument("--upstreams", default="fbank,hf", help="comma list of: fbank, hf (tiny HF wav2vec2)")
    parser.add_argument("--log", default=None, help="workers' stderr goes here (default: a temp file)")
    args = parser.parse_args()
    keys = [k.strip() for k in args.upstreams.split(",") if k.strip()]
    unknown = set(keys) - set(UPSTREAMS)
    if unknown or not keys or args.repeat < 1:
        parser.error(f"--repeat >= 1; --upstreams from {sorted(UPSTREAMS)}")

    began = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="flashcompat-bench-"))
    log_path = Path(args.log) if args.log else tmp / "workers.log"
    print(f"import_time: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average at start "
          f"{os.getloadavg()[0]:.2f}; {args.repeat} timed runs per row, interleaved, after one warm-up run of "
          f"each variant; worker log: {log_path}", flush=True)
    tiny = make_tiny(tmp / "tiny_wav2vec2")
    plan = [(v, k) for k in keys for v in VARIANTS]
    runs = {job: [] for job in plan}
    with open(log_path, "w") as log:
        broken = run_worker("stock-real", "fbank", tiny, log)
        for variant in VARIANTS:  # warm-up: puts in the page cache what each variant reads (the last upstream most)
            run_worker(variant, keys[-1], tiny, log)
        for round_ in range(args.repeat):
            for job in plan if round_ % 2 == 0 else plan[::-1]:
                result = run_worker(*job, tiny, log)
                if "failed" in result:
                    sys.exit(f"{job} failed: {result['failed']}")
                runs[job].append(result)
            print(f"  round {round_ + 1}/{args.repeat} done at {time.perf_counter() - began:.0f}s", flush=True)
    shutil.rmtree(tiny, ignore_errors=True)

    outcome = (f"FAILS after {broken['import']:.2f}s: {broken['failed'][:120]}" if "failed" in broken
               else "works here (this stack does not need the shim)")
    print(f"\nstock on the real stack (no shim): `from s3prl.nn import S3PRLUpstream` {outcome}")
    print("\nSeconds; median [min-max] over the timed runs, each a fresh process. torch: `import torch`, before the "
          "timed region. import: getting\nS3PRLUpstream. build: S3PRLUpstream(name). cpu: CPU time of import+build "
          "(less moved by other processes' load than wall time).\n"
          "process: the whole process as seen by the parent, interpreter start to the result (teardown skipped).")
    header = (f"{'upstream':<19} {'variant':<41} {'torch':>6} {'import':>6} {'build':>6} "
              f"{'import+build':>20} {'cpu':>20} {'process':>8}")
    print(header)
    print("-" * len(header))
    for key in keys:
        for variant, label in VARIANTS.items():
            rs = runs[(variant, key)]
            print(f"{UPSTREAMS[key][0]:<19} {label:<41} {median(r['torch'] for r in rs):6.2f} "
                  f"{median(r['import'] for r in rs):6.2f} {median(r['build'] for r in rs):6.2f} "
                  f"{spread([r['import'] + r['build'] for r in rs]):>20} {spread([r['cpu'] for r in rs]):>20} "
                  f"{median(r['wall'] for r in rs):8.2f}")

    print("\nTargets. Ratios are medians of the per-round ratios (runs of one round are neighbours in time); "
          "wall time of import+build, [CPU time]:")
    for key in keys:
        stock, ours, bare = (runs[(v, key)] for v in VARIANTS)
        wall = lambda r: r["import"] + r["build"]
        own = lambda r: sum(r["own"].values())
        name = UPSTREAMS[key][0]
        vs_stock = median(wall(o) / wall(s) for o, s in zip(ours, stock))
        vs_stock_cpu = median(o["cpu"] / s["cpu"] for o, s in zip(ours, stock))
        vs_stock_torch = median((o["torch"] + wall(o)) / (s["torch"] + wall(s)) for o, s in zip(ours, stock))
        share = median(own(o) / b["cpu"] for o, b in zip(ours, bare))
        share_torch = median(own(o) / (b["torch_cpu"] + b["cpu"]) for o, b in zip(ours, bare))
        over = [wall(o) / wall(b) - 1 for o, b in zip(ours, bare)]
        over_cpu = [o["cpu"] / b["cpu"] - 1 for o, b in zip(ours, bare)]
        print(f"  {name:<19} ours / stock             {vs_stock:6.3f}x [{vs_stock_cpu:.3f}x]; with each run's "
              f"`import torch` {vs_stock_torch:.3f}x.  Target <= 0.4x: "
              f"{'PASS' if max(vs_stock, vs_stock_cpu) <= 0.4 else 'FAIL'}")
        print(f"  {name:<19} our machinery (CPU)      {median(own(o) for o in ours) * 1000:5.1f} ms = "
              f"{share * 100:.1f}% of bare import+build ({share_torch * 100:.1f}% with `import torch`): importing "
              f"guard/hub {median(o['own']['modules'] for o in ours) * 1000:.1f} ms + AST index "
              f"{median(o['own'].get('index', 0.0) for o in ours) * 1000:.1f} ms + import wrapper "
              f"{median(o['own']['wrapper'] for o in ours) * 1000:.1f} ms.")
        print(f"  {name:<19}   nothing broken, target <= 5% of import+build: {'PASS' if share <= 0.05 else 'FAIL'}. "
              f"Cross-check, ours / bare - 1: {median(over) * 100:+.1f}% [{median(over_cpu) * 100:+.1f}%], "
              f"per-round {min(over_cpu) * 100:+.0f}..{max(over_cpu) * 100:+.0f}% CPU")
        print(f"  {name:<19} imported                 stock: {stock[0]['upstream_modules']} hubconf modules, "
              f"ESPnet {'too' if stock[0]['espnet2'] else 'no'}; ours: {ours[0]['upstream_modules']}, ESPnet "
              f"{'too' if ours[0]['espnet2'] else 'no'}")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}; total {time.perf_counter() - began:.0f}s")


if __name__ == "__main__":
    main()
