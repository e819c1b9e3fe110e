#!/usr/bin/env bash
# Create or reuse the project venv of one ESPnet stack, plus this package (editable, with its test extras).
# ESPNET_FLASHCOMPAT_STACK picks the stack (default current):
#   current  Python 3.12, espnet 202611 + espnet-s3prl (ESPnet's S3PRL fork), torch 2.14.1: stacks/current.txt;
#            venv <repo>/.venv
#   legacy   Python 3.11, espnet 202511 + s3prl 0.4.18, torch 2.12.1: stacks/legacy.txt; venv <repo>/.venv-legacy
# $VENV overrides the venv folder. Reuse is quick: nothing is installed while the stamp in the venv matches the
# stack file, setup.cfg, setup.py and this script.
#   . scripts/venv.sh                                   # set up and activate (current)
#   ESPNET_FLASHCOMPAT_STACK=legacy bash scripts/venv.sh  # set up only (legacy)

_efc_venv() {
    local repo stack venv python want stamp
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
    stack="${ESPNET_FLASHCOMPAT_STACK:-current}"
    # The S3PRL each stack brings: espnet 202611 uses its fork, espnet-s3prl; 202511 the original s3prl. Both install
    # the same top-level `s3prl` package, so never both: this package requires neither.
    local -a stack_packages
    case "$stack" in
        current) python="$(PYENV_VERSION=3.12.1 command -v python3.12)"; venv="${VENV:-$repo/.venv}"
                 stack_packages=("espnet[train,asr]==202611" "espnet-s3prl") ;;
        legacy)  python="$(command -v python3.11 || command -v python3)"; venv="${VENV:-$repo/.venv-legacy}"
                 stack_packages=("espnet==202511" "s3prl") ;;
        *) echo "venv.sh: ESPNET_FLASHCOMPAT_STACK=$stack: expected current or legacy" >&2; return 1 ;;
    esac
    stamp="$venv/.espnet-flashcompat.stamp"
    if [ ! -x "$venv/bin/python" ]; then
        [ -n "$python" ] || { echo "venv.sh: no Python for the $stack stack" >&2; return 1; }
        echo "venv.sh: creating $venv ($stack stack) with $python" >&2
        PYENV_VERSION=3.12.1 "$python" -m venv "$venv" || return 1
    fi
    want="$( (echo "$repo $stack"; cat "$repo/stacks/$stack.txt" "$repo/setup.cfg" "$repo/setup.py" \
        "$repo/scripts/venv.sh") | sha256sum | cut -d' ' -f1)" || return 1
    if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && "$venv/bin/python" -c "import espnet_flashcompat" 2>/dev/null; then
        echo "venv.sh: reusing $venv ($stack stack)" >&2
    else
        echo "venv.sh: installing the $stack stack into $venv" >&2
        rm -f "$stamp"
        # pip 26 refuses ci_sdr's direct-URL extra (an espnet dependency): keep pip below 26.
        "$venv/bin/python" -m pip install -q --progress-bar off "pip>=24,<26" || return 1
        # asr_train (stock ESPnet) also needs tensorboard and matplotlib, which espnet does not require.
        "$venv/bin/python" -m pip install -q --progress-bar off -c "$repo/stacks/$stack.txt" \
            "${stack_packages[@]}" tensorboard matplotlib || return 1
        "$venv/bin/python" -m pip install -q --progress-bar off -c "$repo/stacks/$stack.txt" -e "$repo[test]" || return 1
        echo "$want" > "$stamp"
    fi
    VENV="$venv"
    export ESPNET_FLASHCOMPAT_STACK="$stack"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run as a script
    set -euo pipefail
    _efc_venv
else  # sourced: also activate
    _efc_venv && . "$VENV/bin/activate"
fi
