#!/usr/bin/env bash
# Fetch, on a machine that reaches PyPI, what scripts/gpu.sh installs on the offline GPU machine (docs/gpu.md; so far
# an H100 or H200 with Python 3.12, torch 2.11.0+cu130, torchaudio 2.11.0, transformers 5.17.0, huggingface_hub 1.33
# preinstalled; no espnet, no s3prl, no network):
#   .whl/site/         the CURRENT stack (default): espnet 202611, espnet-s3prl (ESPnet's S3PRL fork) and the
#                      py3-none-any or cp312 manylinux packages that espnet2.bin.asr_train (a training step with
#                      frontend: s3prl_flashcompat), espnet2.bin.asr_inference, espnet2.asr.frontend.s3prl, s3prl.nn +
#                      hf_wav2vec2_custom/hf_hubert_custom and our tests import and that the image lacks, at the
#                      versions of stacks/current.txt. Found by running those imports, a CPU asr_train step and
#                      asr_inference in a Python 3.12 venv holding only the image's packages (transformers 5.17,
#                      huggingface_hub 1.33, tokenizers 0.23.2, numpy 2.5.2, torchaudio 2.11.0 at the image's
#                      versions), adding one package at a time. About 9 MB:
#                        typeguard humanfriendly torch-complex omniio soundfile cffi editdistance   (espnet2 imports)
#                        librosa soxr decorator pooch platformdirs  (espnet2; transformers' audio_utils imports soxr
#                                                                    once librosa is there; librosa's submodules)
#                        omegaconf antlr4-python3-runtime hydra-core (s3prl.nn; espnet2's state_spaces)
#                      Left out on purpose (optional imports, unused by these runs): wandb, torch-optimizer, dask,
#                      datasets, espnet_model_zoo, jiwer, ctc_segmentation, nltk. espnet 202611 has no g2p_en, so no
#                      NLTK data is looked for.
#   .whl/site-legacy/  only with ESPNET_FLASHCOMPAT_STACK=legacy: espnet 202511, s3prl 0.4.18 and their missing
#                      imports (stacks/legacy.txt), as gpu.sh used before, plus ci_sdr and fast_bss_eval, which
#                      espnet 202511's asr_inference imports; about 11 MB more (then .whl + .fa: 56 MiB). .whl/
#                      is copied whole, so copy only the folders in use (see gpu.sh) when both stacks are fetched.
#   .whl/faults/       what tests/faults.py's real-fault builders install there, offline (PIP_NO_INDEX + PIP_FIND_LINKS):
#                      flash-attn's sdist (its own installer with FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE makes the broken
#                      install) and transformers 4.46.3 with its tokenizers/huggingface_hub pins.
#   .fa/               a healthy flash-attn wheel for the GPU machine, repacked with LZMA: the same files and RECORD,
#                      17 MB instead of 63, so that .whl/ and .fa/ stay small enough to copy in one transfer (the GPU
#                      runs so far allowed 64 MiB). pip installs LZMA members like any other.
# Input from outside the repository: $SHARED_FA, a folder holding flash_attn-2.8.3.post2-cp312-cp312-linux_x86_64.whl
# built against the GPU machine's torch (2.11.0+cu130, CUDA 13.0) for its architecture, e.g. on a machine with that
# torch: FLASH_ATTN_CUDA_ARCHS=90 FLASH_ATTENTION_FORCE_BUILD=TRUE \
#            python3 -m pip wheel --no-build-isolation --no-deps -w DIR flash-attn==2.8.3.post2
# (docs/gpu.md). Default: ../shared/gpu, a folder beside the checkout.
# Usage (repo root):  bash scripts/gpu_wheels.sh                                 # current stack (+ faults, .fa)
#                     ESPNET_FLASHCOMPAT_STACK=legacy bash scripts/gpu_wheels.sh  # legacy stack (+ faults, .fa)
# $PYTHON: the Python that runs pip (default: the project venv's, else python3); flash-attn's sdist download imports
# torch. Re-running is cheap: present files are kept, and wheels of other versions or packages are removed from the
# stack's folder. .whl/ and .fa/ are git-ignored.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
SHARED_FA=${SHARED_FA:-../shared/gpu}
STACK=${ESPNET_FLASHCOMPAT_STACK:-current}

# Each stack: its folder, its binary wheels and its sdist-only pure-Python packages (built into wheels locally), by
# name; the versions come from stacks/$STACK.txt.
case "$STACK" in
    current)
        SITE=.whl/site
        WHEELS=(espnet espnet-s3prl typeguard humanfriendly torch-complex omniio soundfile cffi editdistance
                librosa soxr decorator pooch platformdirs omegaconf hydra-core)
        SDISTS=(antlr4-python3-runtime) ;;
    legacy)
        SITE=.whl/site-legacy
        WHEELS=(espnet ConfigArgParse typeguard humanfriendly kaldiio torch-complex hydra-core omegaconf librosa soxr
                soundfile cffi editdistance nltk inflect more-itertools jaraco.functools Unidecode jamo jaconv
                espnet-g2p-en)
        SDISTS=(s3prl antlr4-python3-runtime espnet_tts_frontend ci_sdr fast_bss_eval) ;;  # ci_sdr..: asr_inference
    *) echo "gpu_wheels.sh: ESPNET_FLASHCOMPAT_STACK=$STACK: expected current or legacy" >&2; exit 1 ;;
esac
mkdir -p "$SITE" .whl/faults .fa

# NAME... -> NAME==VERSION lines, as pinned in stacks/$STACK.txt (names compared the PEP 503 way).
pins() {
    "$PY" - "stacks/$STACK.txt" "$@" <<'EOF'
import re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
pinned = {}
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, version = line.split("==")
        pinned[norm(name)] = f"{name.strip()}=={version.strip()}"
missing = [n for n in sys.argv[2:] if norm(n) not in pinned]
if missing:
    sys.exit(f"gpu_wheels.sh: not pinned in {sys.argv[1]}: {' '.join(missing)}")
print("\n".join(pinned[norm(n)] for n in sys.argv[2:]))
EOF
}
# Remove the wheels of DIR that no SPEC (NAME==VERSION) asks for: what an earlier run for other versions left.
prune() {
    "$PY" - "$@" <<'EOF'
import os, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
folder, specs = sys.argv[1], sys.argv[2:]
wanted = {(norm(s.split("==")[0]), s.split("==")[1]) for s in specs}
for f in sorted(os.listdir(folder)):
    name, version = f.split("-")[:2] if f.endswith(".whl") else (None, None)
    if name is None or (norm(name), version) not in wanted:
        print(f"gpu_wheels.sh: removing {folder}/{f} (not in this stack's list)", file=sys.stderr)
        os.remove(os.path.join(folder, f))
EOF
}
# pip download for the device: CPython 3.12 on x86-64 Linux, binary wheels only.
download() {
    local dest=$1; shift
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
        -d "$dest" "$@"
}
# Pure-Python projects published as sdists only: build a py3-none-any wheel locally (unless that version is there).
build_wheel() {
    local dest=$1 spec=$2 name=${2%%==*} version=${2##*==}
    ls "$dest"/"${name//[-.]/_}"-"$version"-*.whl "$dest"/"$name"-"$version"-*.whl >/dev/null 2>&1 && return 0
    "$PY" -m pip wheel -q --no-deps --no-binary :all: -w "$dest" "$spec"
}

# --- $SITE: the stack's espnet, S3PRL and the imports the image lacks -------------------------------------------------
wheel_specs=($(pins "${WHEELS[@]}"))  # exits here if stacks/$STACK.txt lacks one
sdist_specs=($(pins "${SDISTS[@]}"))
prune "$SITE" "${wheel_specs[@]}" "${sdist_specs[@]}"
download "$SITE" "${wheel_specs[@]}"
for spec in "${sdist_specs[@]}"; do build_wheel "$SITE" "$spec"; done

# --- .whl/faults: for tests/faults.py's builders (flash-attn's own installer; transformers 4.46) ---------------------
[ -f .whl/faults/flash_attn-2.8.3.post2.tar.gz ] || \
    FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE "$PY" -m pip download -q --no-deps --no-build-isolation \
        --no-binary :all: -d .whl/faults flash-attn==2.8.3.post2  # its metadata step imports torch
download .whl/faults transformers==4.46.3 tokenizers==0.20.3 huggingface_hub==0.36.2

# --- .fa: the healthy flash-attn, LZMA-repacked (pip verifies RECORD's hashes of the uncompressed files) --------------
src=$(ls "$SHARED_FA"/flash_attn-*-cp312-cp312-linux_x86_64.whl)
dst=.fa/$(basename "$src")
if [ ! -f "$dst" ]; then
    echo "repacking $(basename "$src") with LZMA (about 5 minutes on 2 cores)" >&2
    "$PY" - "$src" "$dst.part" <<'EOF'
import sys, zipfile
src, dst = sys.argv[1:]
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_LZMA) as zout:
    for info in zin.infolist():
        zout.writestr(info, zin.read(info.filename), compress_type=zipfile.ZIP_LZMA)
EOF
    mv "$dst.part" "$dst"
fi

ls -l "$SITE" .whl/faults .fa >&2
du -ch "$SITE" .whl/faults .fa | tail -n 1 | sed "s|total|$SITE + .whl/faults + .fa|" >&2
# Size of what is copied to the GPU machine: the GPU runs so far took .whl + .fa in transfers of at most 64 MiB.
total=$(du -cb .whl .fa | tail -n 1 | cut -f1)
echo "carry .whl + .fa: $(( total / 1048576 )) MiB of 64" >&2
[ "$total" -le $(( 58 * 1048576 )) ] || echo "gpu_wheels.sh: warning: .whl + .fa is over 58 MiB; carry only the \
folders the run needs, e.g. [\"$SITE\", \".whl/faults\", \".fa\"]" >&2
