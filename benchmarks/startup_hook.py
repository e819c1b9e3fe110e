"""What the startup hook costs every interpreter: ``python -c pass`` with the hook, disabled, and without site.

Runs in the interpreter it is started with, which must have the package installed (``espnet_flashcompat.pth``
in its site-packages). Prints a table of medians over N runs (interleaved, so load drifts hit all variants
alike), and the hook's own share from ``python -X importtime``. Target: at most 5 ms over the disabled hook.

    python benchmarks/startup_hook.py [--runs 40]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

DISABLE_ENV = "ESPNET_FLASHCOMPAT_DISABLE"
TARGET_MS = 5.0


def environ(**extra):
    # Bytecode caching on, as users have it: PYTHONDONTWRITEBYTECODE would recompile our modules at every start.
    env = {k: v for k, v in os.environ.items() if k not in (DISABLE_ENV, "PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    env.update(extra)
    return env


VARIANTS = {  # name -> (argv after the interpreter, environment)
    "hook armed": (["-c", "pass"], environ()),
    f"{DISABLE_ENV}=1": (["-c", "pass"], environ(**{DISABLE_ENV: "1"})),
    "python -S (no site, no .pth)": (["-S", "-c", "pass"], environ()),
}


def wall_ms(argv, env):
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], env=env, check=True)
    return (time.perf_counter() - start) * 1000


def importtime_ms(env):
    """Medians over 5 runs of ``-X importtime``: self time of our modules at startup, and cumulative time of
    setuptools' editable finder (present with ``pip install -e .`` only: its cost, not the hook's)."""
    ours, finder = [], []
    for _ in range(5):
        err = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], env=env,
                             capture_output=True, text=True, check=True).stderr
        rows = re.findall(r"^import time:\s+(\d+) \|\s+(\d+) \|\s+(\S+)\s*$", err, re.M)
        ours.append(sum(int(own) for own, _, name in rows if name.split(".")[0] == "espnet_flashcompat"))
        finder.append(sum(int(cum) for _, cum, name in rows if name.startswith("__editable___espnet_flashcompat")))
    return statistics.median(ours) / 1000, statistics.median(finder) / 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="runs of each variant (default 40)")
    args = parser.parse_args()

    probe = subprocess.run([sys.executable, "-c", "import sys; r = sys.modules.get('espnet_flashcompat.espnet.registry'); "
                            "print(bool(r and r.hook_state()['armed']))"], env=environ(), capture_output=True, text=True)
    if probe.stdout.strip() != "True":
        sys.exit(f"the startup hook is not armed in {sys.executable}: install the package first (pip install -e .)")

    for argv, env in VARIANTS.values():  # warm the file cache and .pyc files
        wall_ms(argv, env)
    times = {name: [] for name in VARIANTS}
    for _ in range(args.runs):
        for name, (argv, env) in VARIANTS.items():
            times[name].append(wall_ms(argv, env))

    medians = {name: statistics.median(samples) for name, samples in times.items()}
    base = medians[f"{DISABLE_ENV}=1"]
    print(f"python -c pass, {sys.executable} ({sys.version.split()[0]}), {args.runs} runs each")
    print(f"{'variant':<32} {'median ms':>10} {'p10 ms':>8} {'p90 ms':>8} {'vs disabled':>12}")
    for name, samples in times.items():
        deciles = statistics.quantiles(samples, n=10)
        print(f"{name:<32} {medians[name]:>10.2f} {deciles[0]:>8.2f} {deciles[-1]:>8.2f} {medians[name] - base:>+11.2f}")
    arming = medians["hook armed"] - base
    imports, finder = importtime_ms(environ())
    total = imports + max(arming, 0.0)
    print(f"\n-X importtime: espnet_flashcompat + registry imported at startup: {imports:.2f} ms (self, median)")
    if finder:
        print(f"-X importtime: setuptools' editable finder (pip install -e only, not the hook): {finder:.2f} ms")
    print(f"hook cost = its imports + arming (armed - disabled) = {total:.2f} ms; target <= {TARGET_MS:.0f} ms: "
          f"{'OK' if total <= TARGET_MS else 'OVER TARGET'}")


if __name__ == "__main__":
    main()
