#!/usr/bin/env bash
# The GPU run: the gpu-marked tests (every `-m gpu` test under tests/) and the GPU benchmarks, on a GPU machine
# without network access (docs/gpu.md): Python 3.12 with torch 2.11.0+cu130, torchaudio 2.11.0, transformers 5.17.0,
# pytest and pytest-timeout installed; no espnet, no s3prl. Logs and tables go to OUT_DIR.
#
#   bash scripts/gpu.sh OUT_DIR [all|tests|bench] [ARGS]   # default: all; ARGS go to attention_matrix.py
#   bash scripts/gpu.sh OUT_DIR espnet [ARGS]               # benchmarks/espnet_attention.py (ESPnet's own attention)
#   bash scripts/gpu.sh OUT_DIR probe [ARGS]                # benchmarks/sdpa_kernel_probe.py (which SDPA kernel runs)
#   bash scripts/gpu.sh OUT_DIR wavlm [ARGS]                # tests/test_wavlm.py's GPU tests, then benchmarks/wavlm.py
#   bash scripts/gpu.sh OUT_DIR kernels [ARGS]              # benchmarks/wavlm_kernels.py (WavLM's attention alone)
#   bash scripts/gpu.sh OUT_DIR cost [ARGS]                 # benchmarks/calibration_cost.py (fine-tuning, parallel decode)
#   bash scripts/gpu.sh OUT_DIR native [ARGS]               # benchmarks/native_upstreams.py (S3PRL's HuBERT, wav2vec2)
#   bash scripts/gpu.sh OUT_DIR overhead [ARGS]             # benchmarks/model_attention_overhead.py on CUDA (per call)
#
# The ESPnet stack: ESPNET_FLASHCOMPAT_STACK=current (default: espnet 202611 + espnet-s3prl, from .whl/site) or
# legacy (espnet 202511 + s3prl 0.4.18, from .whl/site-legacy). The machine's own torch, torchaudio and
# transformers serve both.
# Run times: docs/gpu.md. To keep each command short, split the work: `tests`, `bench --models wav2vec2`,
# `bench --models hubert`.
# Before: on a machine with PyPI, `bash scripts/gpu_wheels.sh` fills .whl/site (espnet 202611, espnet-s3prl and the
# imports the machine's image lacks), .whl/faults (the fault fixtures' flash-attn sdist and transformers 4.46) and
# .fa/ (a healthy flash-attn wheel built for sm_90, LZMA-repacked; gpu_wheels.sh's header says where it comes
# from); `ESPNET_FLASHCOMPAT_STACK=legacy bash scripts/gpu_wheels.sh` fills .whl/site-legacy instead of .whl/site.
# Copy the repo with .whl/ and .fa/ to the GPU machine (.whl/site-legacy, or .whl/site, may stay behind when only
# the other stack runs). Nothing is installed into the machine's Python: everything goes into --target folders under
# $EFC_GPU_WORK (default /tmp/efc-gpu) that PYTHONPATH names. So the startup hook (espnet_flashcompat.pth) is not
# active there by itself: gpu.sh puts its .pth line in $W/hook, which $W/boot/sitecustomize.py adds as a site dir.
# What it runs, exactly (W=$EFC_GPU_WORK, R=the repo, S=site for current, site-legacy for legacy):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target $W/site R/.whl/S/*.whl
#   python3 -m pip install -q --no-index --no-deps --no-compile --target $W/fa R/.fa/flash_attn-*.whl
#   export PYTHONPATH=$W/site:R HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NLTK_DATA=$W/nltk_data
#   export ESPNET_FLASHCOMPAT_FLASH_ATTN_DIR=$W/fa            # the healthy flash-attn, for the tests that want it
#   export ESPNET_FLASHCOMPAT_FAULT_CACHE=$W/faults PIP_NO_INDEX=1 PIP_FIND_LINKS=R/.whl/faults
#                          # tests/faults.py builds the broken flash-attn and transformers 4.46 from R/.whl/faults
#   python3 -m pytest -m gpu tests/ -v -rA --timeout 400   (EFC_GPU_TESTS: more pytest args)
#   PYTHONPATH=$W/fa:$PYTHONPATH python3 benchmarks/attention_matrix.py --out OUT_DIR ARGS
# The install is redone whenever the wheels differ from those recorded in $W/installed (another stack, new wheels).
set -uo pipefail
out=${1:?usage: bash scripts/gpu.sh OUT_DIR [all|tests|bench|espnet|probe|wavlm|kernels|cost|native|overhead] [benchmark args]}
what=${2:-all}
shift $(( $# < 2 ? $# : 2 ))
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
W=${EFC_GPU_WORK:-/tmp/efc-gpu}
PY=${PYTHON:-python3}
mkdir -p "$out" "$W"
out="$(cd "$out" && pwd)"
export PYTHONUNBUFFERED=1
stamp() { echo "== $(date -u '+%H:%M:%S') $*"; }

stack=${ESPNET_FLASHCOMPAT_STACK:-current}
case "$stack" in
    current) site="$repo/.whl/site" ;;
    legacy) site="$repo/.whl/site-legacy" ;;
    *) echo "gpu.sh: ESPNET_FLASHCOMPAT_STACK=$stack: expected current or legacy" >&2; exit 2 ;;
esac
stamp "install the $stack stack into $W (--target folders; the machine's Python is left alone)"
if ! ls "$site"/*.whl >/dev/null 2>&1 || ! ls "$repo"/.fa/flash_attn-*.whl >/dev/null 2>&1; then
    echo "missing $site or $repo/.fa: run 'ESPNET_FLASHCOMPAT_STACK=$stack bash scripts/gpu_wheels.sh' where PyPI" \
        "is reachable, and bring .whl/ and .fa/" >&2
    exit 2
fi
wanted="$(cd "$repo" && ls "$site"/*.whl .fa/flash_attn-*.whl | xargs -n 1 basename)"
if [ "$(cat "$W/installed" 2>/dev/null)" != "$wanted" ]; then
    rm -rf "$W/site" "$W/fa" "$W/nltk_data" "$W/installed"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$W/site" "$site"/*.whl || exit 1
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$W/fa" "$repo"/.fa/flash_attn-*.whl || exit 1
    # Legacy stack: g2p_en (imported by every espnet 202511 task) downloads NLTK data at import when it finds none;
    # offline that can hang. Empty archives under the names it checks make it look no further (ASR with word tokens
    # never uses them). espnet 202611 imports g2p_en only where it is installed, and .whl/site brings none.
    if [ -d "$W/site/g2p_en" ]; then
        mkdir -p "$W/nltk_data/taggers" "$W/nltk_data/corpora"
        "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(p, "w").close() for p in sys.argv[1:]]' \
            "$W/nltk_data/taggers/averaged_perceptron_tagger_eng.zip" "$W/nltk_data/corpora/cmudict.zip"
    fi
    echo "$wanted" > "$W/installed"
fi
# The startup hook, as `pip install` would place it: its .pth line in a site dir that a sitecustomize adds, so
# stock `python -m espnet2.bin.asr_train` and DDP's spawned workers see s3prl_flashcompat (tests/faults.py's
# prelude runs this sitecustomize after its own).
mkdir -p "$W/hook" "$W/boot"
(cd "$repo" && "$PY" -c 'import sys; from espnet_flashcompat.espnet.registry import PTH_LINE, PTH_NAME
open(sys.argv[1] + "/" + PTH_NAME, "w").write(PTH_LINE)' "$W/hook")
printf 'import site\nsite.addsitedir(%s)\n' "'$W/hook'" > "$W/boot/sitecustomize.py"
export PYTHONPATH="$W/site:$repo:$W/boot${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NLTK_DATA="$W/nltk_data" TOKENIZERS_PARALLELISM=false
export ESPNET_FLASHCOMPAT_FLASH_ATTN_DIR="$W/fa"
export ESPNET_FLASHCOMPAT_FAULT_CACHE="$W/faults" PIP_NO_INDEX=1 PIP_FIND_LINKS="$repo/.whl/faults"
cd "$repo"

stamp "environment -> $out/env.txt"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" - <<'EOF'
import importlib.metadata as md, os, platform, sys, torch
print("stack", os.environ.get("ESPNET_FLASHCOMPAT_STACK", "current"))
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in ("torchaudio", "transformers", "tokenizers", "huggingface_hub", "espnet", "espnet-s3prl", "s3prl",
             "librosa", "numpy", "pytest",
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
    "$PY" -m pytest -m gpu tests/ -v -rA --timeout 400 -p no:cacheprovider ${EFC_GPU_TESTS:-} 2>&1 | tee "$out/pytest.log"
    status=${PIPESTATUS[0]}
    stamp "GPU tests: exit $status"
fi
if [ "$what" = espnet ]; then
    stamp "ESPnet attention benchmark -> $out/espnet_attention.{md,json}, $out/espnet.log"
    PYTHONPATH="$W/fa:$PYTHONPATH" "$PY" benchmarks/espnet_attention.py --out "$out" "$@" 2>&1 | tee "$out/espnet.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if [ "$what" = wavlm ]; then
    stamp "WavLM GPU tests -> $out/pytest_wavlm.log; WavLM benchmark -> $out/wavlm.{md,json}, $out/wavlm.log"
    "$PY" -m pytest -m gpu tests/test_wavlm.py tests/test_wavlm_fused.py -v -rA -p no:cacheprovider 2>&1 | tee "$out/pytest_wavlm.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    "$PY" benchmarks/wavlm.py --out "$out" "$@" 2>&1 | tee "$out/wavlm.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if [ "$what" = kernels ]; then
    stamp "WavLM's attention alone, each way to run it -> $out/wavlm_kernels.{md,json}, $out/kernels.log"
    "$PY" benchmarks/wavlm_kernels.py --out "$out" "$@" 2>&1 | tee "$out/kernels.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if [ "$what" = probe ]; then
    stamp "which SDPA kernel runs under each pin -> $out/sdpa_kernel_probe.{md,json}"
    PYTHONPATH="$W/fa:$PYTHONPATH" "$PY" benchmarks/sdpa_kernel_probe.py --out "$out" "$@" 2>&1 | tee "$out/probe.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if [ "$what" = cost ]; then
    stamp "what calibration costs a fine-tuning run and parallel decode jobs -> $out/calibration_cost.{md,json}"
    PYTHONPATH="$W/fa:$PYTHONPATH" "$PY" benchmarks/calibration_cost.py --out "$out" "$@" 2>&1 | tee "$out/cost.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if [ "$what" = native ]; then
    stamp "S3PRL's own HuBERT and wav2vec2 under each SDPA kernel -> $out/native_upstreams.{md,json}"
    "$PY" benchmarks/native_upstreams.py --out "$out" "$@" 2>&1 | tee "$out/native.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if [ "$what" = overhead ]; then
    stamp "what the model-wide policy adds to each ESPnet attention call -> $out/overhead.log"
    "$PY" benchmarks/model_attention_overhead.py --device cuda --pin "$@" 2>&1 | tee "$out/overhead.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
    stamp "attention matrix -> $out/attention_matrix.{md,json}, $out/bench.log"
    PYTHONPATH="$W/fa:$PYTHONPATH" "$PY" benchmarks/attention_matrix.py --out "$out" "$@" 2>&1 | tee "$out/bench.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
stamp "done (exit $status)"
exit "$status"
