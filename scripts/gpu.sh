#!/usr/bin/env bash
# The GPU truth run (issue 5): the GPU-marked tests (tests/test_gpu.py, scenarios a-e) and the attention benchmark
# (benchmarks/attention_matrix.py) on an H100 machine with no network: Python 3.12, torch 2.11+cu130 and
# transformers 5.17 preinstalled, no espnet, no s3prl. Logs and tables go to OUT_DIR.
#
#   bash scripts/gpu.sh OUT_DIR [all|tests|bench] [ARGS]   # default: all; ARGS go to attention_matrix.py
#
# On an H100: about 1 minute of install, 4.5 minutes of tests, 9.5 of benchmark (4.7 per model). Where one command
# may run 10 minutes at most, make three: `tests`, `bench --models wav2vec2`, `bench --models hubert`.
# Before: on a machine with PyPI, `bash scripts/gpu_wheels.sh` fills .whl/ (espnet, s3prl and their missing
# imports; the fault fixtures' flash-attn sdist and transformers 4.46) and .fa/ (the healthy sm90 flash-attn of
# ../shared/gpu); copy the repo with .whl/ and .fa/ to the GPU machine. Nothing is installed into the machine's
# Python: everything goes into --target folders under $EFC_GPU_WORK (default /tmp/efc-gpu) that PYTHONPATH names.
# What it runs, exactly (W=$EFC_GPU_WORK, R=the repo):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target $W/site R/.whl/site/*.whl
#   python3 -m pip install -q --no-index --no-deps --no-compile --target $W/fa R/.fa/flash_attn-*.whl
#   export PYTHONPATH=$W/site:R HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NLTK_DATA=$W/nltk_data
#   export ESPNET_FLASHCOMPAT_FLASH_ATTN_DIR=$W/fa            # the healthy flash-attn, for the tests that want it
#   export ESPNET_FLASHCOMPAT_FAULT_CACHE=$W/faults PIP_NO_INDEX=1 PIP_FIND_LINKS=R/.whl/faults
#                          # tests/faults.py builds the broken flash-attn and transformers 4.46 from R/.whl/faults
#   python3 -m pytest -m gpu tests/test_gpu.py -v -rA --timeout 400
#   PYTHONPATH=$W/fa:$PYTHONPATH python3 benchmarks/attention_matrix.py --out OUT_DIR ARGS
# In this workplace, from the repo root: device run(command="bash scripts/gpu.sh $OUT tests", carry=[".whl", ".fa"]),
# then the same with "bench --models wav2vec2" and "bench --models hubert".
set -uo pipefail
out=${1:?usage: bash scripts/gpu.sh OUT_DIR [all|tests|bench] [attention_matrix.py args]}
what=${2:-all}
shift $(( $# < 2 ? $# : 2 ))
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
W=${EFC_GPU_WORK:-/tmp/efc-gpu}
PY=${PYTHON:-python3}
mkdir -p "$out" "$W"
out="$(cd "$out" && pwd)"
export PYTHONUNBUFFERED=1
stamp() { echo "== $(date -u '+%H:%M:%S') $*"; }

stamp "install into $W (--target folders; the machine's Python is left alone)"
[ -d "$repo/.whl/site" ] && ls "$repo"/.fa/flash_attn-*.whl >/dev/null \
    || { echo "missing .whl/ or .fa/: run scripts/gpu_wheels.sh where PyPI is reachable, and bring both" >&2; exit 2; }
if [ ! -f "$W/installed" ]; then
    rm -rf "$W/site" "$W/fa"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$W/site" "$repo"/.whl/site/*.whl || exit 1
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$W/fa" "$repo"/.fa/flash_attn-*.whl || exit 1
    # g2p_en (imported by every ESPnet task) downloads NLTK data at import when it finds none; offline that can
    # hang. Empty archives under the names it checks make it look no further (ASR with word tokens never uses them).
    mkdir -p "$W/nltk_data/taggers" "$W/nltk_data/corpora"
    "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(p, "w").close() for p in sys.argv[1:]]' \
        "$W/nltk_data/taggers/averaged_perceptron_tagger_eng.zip" "$W/nltk_data/corpora/cmudict.zip"
    touch "$W/installed"
fi
export PYTHONPATH="$W/site:$repo${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NLTK_DATA="$W/nltk_data" TOKENIZERS_PARALLELISM=false
export ESPNET_FLASHCOMPAT_FLASH_ATTN_DIR="$W/fa"
export ESPNET_FLASHCOMPAT_FAULT_CACHE="$W/faults" PIP_NO_INDEX=1 PIP_FIND_LINKS="$repo/.whl/faults"
cd "$repo"

stamp "environment -> $out/env.txt"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" - <<'EOF'
import importlib.metadata as md, platform, sys, torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in ("torchaudio", "transformers", "tokenizers", "huggingface_hub", "espnet", "s3prl", "numpy", "pytest",
             "pytest-timeout", "pip", "setuptools", "wheel"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
    PYTHONPATH="$W/fa:$PYTHONPATH" "$PY" -c \
        'import flash_attn, flash_attn_2_cuda; print("flash_attn", flash_attn.__version__, flash_attn_2_cuda.__file__)'
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

status=0
if [ "$what" = all ] || [ "$what" = tests ]; then
    stamp "GPU tests -> $out/pytest.log"
    "$PY" -m pytest -m gpu tests/test_gpu.py -v -rA --timeout 400 -p no:cacheprovider 2>&1 | tee "$out/pytest.log"
    status=${PIPESTATUS[0]}
    stamp "GPU tests: exit $status"
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
    stamp "attention matrix -> $out/attention_matrix.{md,json}, $out/bench.log"
    PYTHONPATH="$W/fa:$PYTHONPATH" "$PY" benchmarks/attention_matrix.py --out "$out" "$@" 2>&1 | tee "$out/bench.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
stamp "done (exit $status)"
exit "$status"
