#!/usr/bin/env bash
# Run the whole test suite in the project venv of one ESPnet stack (created or reused by scripts/venv.sh);
# arguments go to pytest. ESPNET_FLASHCOMPAT_STACK=current (default) or legacy picks the stack.
#   bash scripts/test.sh                                    # everything, current stack (GPU tests skip without CUDA)
#   ESPNET_FLASHCOMPAT_STACK=legacy bash scripts/test.sh    # everything, legacy stack
#   bash scripts/test.sh -m "not slow"                      # the quick ones
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/venv.sh
echo "test.sh: $ESPNET_FLASHCOMPAT_STACK stack, $(python -c 'import importlib.metadata as m, sys; print("Python", sys.version.split()[0], "espnet", m.version("espnet"))')" >&2
exec python -m pytest "$@"
