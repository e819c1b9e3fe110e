# Source me: puts the project's venv on PATH and keeps runs offline, seeded and within the CPU cores.
# (The s3prl_flashcompat frontend registers itself through the package's startup hook; nothing to do here.)
venv="${VIRTUAL_ENV:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.venv}"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "${venv}/bin/activate" ]; then . "${venv}/bin/activate"; fi
export PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
