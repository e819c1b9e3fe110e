#!/usr/bin/env bash
# Create or reuse the project venv: the pinned CPU stack (constraints.txt) plus this package, editable, with its
# test extras. The venv is $VENV, default <repo>/.venv, made with python3.11 (else python3). Reuse is quick:
# nothing is installed while the stamp in the venv matches setup.cfg, setup.py, constraints.txt and this script.
#   . scripts/venv.sh      # set up and activate
#   bash scripts/venv.sh   # set up only

_efc_venv() {
    local repo venv python want stamp
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
    venv="${VENV:-$repo/.venv}"
    stamp="$venv/.espnet-flashcompat.stamp"
    if [ ! -x "$venv/bin/python" ]; then
        python="$(command -v python3.11 || command -v python3)" || { echo "venv.sh: no python3.11 or python3" >&2; return 1; }
        echo "venv.sh: creating $venv with $python" >&2
        "$python" -m venv "$venv" || return 1
    fi
    want="$( (echo "$repo"; cat "$repo/setup.cfg" "$repo/setup.py" "$repo/constraints.txt" "$repo/scripts/venv.sh") \
        | sha256sum | cut -d' ' -f1)" || return 1
    if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && "$venv/bin/python" -c "import espnet_flashcompat" 2>/dev/null; then
        echo "venv.sh: reusing $venv" >&2
    else
        echo "venv.sh: installing the stack into $venv" >&2
        rm -f "$stamp"
        # pip 26 refuses ci_sdr's direct-URL extra (an espnet dependency): keep pip below 26.
        "$venv/bin/python" -m pip install -q --progress-bar off "pip>=24,<26" || return 1
        # asr_train (stock ESPnet) also needs tensorboard and matplotlib, which espnet does not require.
        "$venv/bin/python" -m pip install -q --progress-bar off -c "$repo/constraints.txt" \
            -e "$repo[test]" tensorboard matplotlib || return 1
        echo "$want" > "$stamp"
    fi
    VENV="$venv"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run as a script
    set -euo pipefail
    _efc_venv
else  # sourced: also activate
    _efc_venv && . "$VENV/bin/activate"
fi
