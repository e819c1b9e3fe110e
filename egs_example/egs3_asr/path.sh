# Source me: the same environment as the ESPnet2 example (egs_example/asr1/path.sh): the project venv (current
# stack, ../../.venv) if none is active, offline Hugging Face, seeded hashing, OMP threads = cores.
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../asr1/path.sh"
