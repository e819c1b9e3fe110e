#!/usr/bin/env bash
# Fetch, on a machine that reaches PyPI, what scripts/gpu.sh installs on an offline H100 machine (Python 3.12,
# torch 2.11+cu130, transformers 5.17 preinstalled, no espnet, no s3prl, no network):
#   .whl/site/    espnet 202511, s3prl 0.4.18 and the pure-Python (or cp312 manylinux) packages that
#                 espnet2.bin.asr_train, espnet2.asr.frontend.s3prl and s3prl.nn + hf_wav2vec2_custom import and
#                 that the machine's image lacks (the image's list: the device docs' KINDS.md). Found by running
#                 those imports and a training step with every non-image package blocked, adding one at a time.
#   .whl/faults/  what tests/faults.py's real-fault builders install there, offline (PIP_NO_INDEX + PIP_FIND_LINKS):
#                 flash-attn's sdist (its own installer with FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE makes the broken
#                 install) and transformers 4.46.3 with its tokenizers/huggingface_hub pins.
#   .fa/          the healthy flash-attn wheel of ../shared/gpu (built for sm90 there), repacked with LZMA:
#                 the same files and RECORD, 17 MB instead of 63, so that it travels with the rest in one call
#                 (each call may carry 64 MiB). pip installs LZMA members like any other.
# Usage (repo root, project venv active or any python3 with pip):  bash scripts/gpu_wheels.sh
# Re-running is cheap: present files are kept. Both folders are git-ignored.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
SHARED_FA=${SHARED_FA:-../shared/gpu}

mkdir -p .whl/site .whl/faults .fa
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
grep -qx '/.fa/' .git/info/exclude 2>/dev/null || echo '/.fa/' >> .git/info/exclude

# pip download for the device: CPython 3.12 on x86-64 Linux, binary wheels only.
download() {
    local dest=$1; shift
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
        -d "$dest" "$@"
}
# Pure-Python projects published as sdists only: build a py3-none-any wheel here.
build_wheel() {
    local dest=$1 spec=$2 name=${2%%==*}
    ls "$dest"/"${name//-/_}"-*.whl "$dest"/"${name}"-*.whl >/dev/null 2>&1 && return 0
    "$PY" -m pip wheel -q --no-deps --no-binary :all: -w "$dest" "$spec"
}

# --- .whl/site: espnet, s3prl and the missing imports (versions = the project's known-good constraints.txt) ---
download .whl/site \
    espnet==202511 ConfigArgParse==1.9.0 typeguard==4.6.0 humanfriendly==10.0 kaldiio==2.18.1 torch-complex==0.4.4 \
    hydra-core==1.3.8 omegaconf==2.3.1 librosa==0.11.0 soxr==1.1.0 \
    soundfile==0.14.0 cffi==2.1.1 editdistance==0.8.1 \
    nltk==3.10.4 inflect==7.6.0 more-itertools==11.2.1 jaraco.functools==4.6.0 Unidecode==1.4.0 \
    jamo==0.4.1 jaconv==0.5.0 espnet-g2p-en==2.1.0.post1
build_wheel .whl/site s3prl==0.4.18
build_wheel .whl/site antlr4-python3-runtime==4.9.3
build_wheel .whl/site espnet_tts_frontend==0.0.4

# --- .whl/faults: for tests/faults.py's builders (flash-attn's own installer; transformers 4.46) ---
[ -f .whl/faults/flash_attn-2.8.3.post2.tar.gz ] || \
    FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE "$PY" -m pip download -q --no-deps --no-build-isolation \
        --no-binary :all: -d .whl/faults flash-attn==2.8.3.post2  # its metadata step imports torch
download .whl/faults transformers==4.46.3 tokenizers==0.20.3 huggingface_hub==0.36.2

# --- .fa: the healthy flash-attn, LZMA-repacked (pip verifies RECORD's hashes of the uncompressed files) ---
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

du -ch .whl/site .whl/faults .fa | tail -n 1 >&2
ls .whl/site .whl/faults .fa >&2
