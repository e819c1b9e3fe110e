#!/usr/bin/env bash
# The main job: the example recipe end to end (data -> train -> decode -> score), offline, on CPU.
# Sets up or reuses the project venv (scripts/venv.sh), then runs egs_example/asr1/run.sh; arguments go to run.sh.
#   bash scripts/example.sh                  # all stages
#   bash scripts/example.sh --stage 4        # from training on
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/venv.sh
exec bash egs_example/asr1/run.sh "$@"
