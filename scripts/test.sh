#!/usr/bin/env bash
# Run the whole test suite in the project venv (created or reused by scripts/venv.sh); arguments go to pytest.
#   bash scripts/test.sh                 # everything (GPU tests skip themselves without CUDA)
#   bash scripts/test.sh -m "not slow"   # the quick ones
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/venv.sh
exec python -m pytest "$@"
