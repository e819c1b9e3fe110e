#!/usr/bin/env python3
"""Say why ESPnet, run by this Python, does not know ``frontend: s3prl_flashcompat`` (run.sh prints it as a HINT).

ESPnet learns the key from espnet-flashcompat's startup hook, ``espnet_flashcompat.pth`` in site-packages, which
runs at interpreter start unless ``ESPNET_FLASHCOMPAT_DISABLE`` turns it off. This names the first of those that
fails here: the package missing, the hook disabled, the .pth missing or stale, the hook failing; and points at
``espnet-flashcompat doctor`` for the whole picture. Never raises; imports no torch or ESPnet.
"""

import os
import sys

DOCTOR = "Run `espnet-flashcompat doctor` with this Python for the full report."


def cause() -> str:
    python = sys.executable
    try:
        import espnet_flashcompat
        from espnet_flashcompat.espnet import registry
    except Exception as exc:  # not installed, or broken
        return (f"espnet-flashcompat cannot be imported by {python} ({type(exc).__name__}: {exc}): install it into "
                "this Python (pip install -e <repo root>), or run with the venv that has it (then check it with "
                "`espnet-flashcompat doctor`).")
    where = os.path.dirname(os.path.abspath(espnet_flashcompat.__file__))
    try:
        state = registry.hook_state()
    except Exception as exc:
        return f"espnet-flashcompat (from {where}) cannot report its startup hook: {type(exc).__name__}: {exc}."
    env = getattr(registry, "DISABLE_ENV", "ESPNET_FLASHCOMPAT_DISABLE")
    pth = getattr(registry, "PTH_NAME", "espnet_flashcompat.pth")
    if state.get("disabled_by_env"):
        return (f"espnet-flashcompat is installed (from {where}), but its startup hook is turned off by "
                f"{env}={os.environ.get(env, '')!r}: unset {env} (or call espnet_flashcompat.register() "
                "before ESPnet builds the task).")
    if not state.get("pth_installed", True):
        return (f"espnet-flashcompat imports (from {where}), but its startup hook {pth} is not in {python}'s "
                "site-packages (a checkout on PYTHONPATH, or an install that skipped it): reinstall it with "
                "pip install -e <repo root>.")
    if not state.get("pth_current", True):
        return (f"{state.get('pth_file')} is not the startup hook of the espnet-flashcompat at {where} (an older "
                "install): reinstall it with pip install -e <repo root>.")
    if state.get("startup_error"):
        return f"the startup hook {state.get('pth_file')} failed at interpreter start: {state['startup_error']}."
    return (f"espnet-flashcompat (from {where}) and its startup hook {state.get('pth_file')} are installed and "
            "enabled, yet this ESPnet task did not get the key: the task module may be one the hook does not know.")


if __name__ == "__main__":
    try:
        text = cause()
    except Exception as exc:  # a hint must never hide the real error
        text = f"(could not diagnose: {type(exc).__name__}: {exc})"
    print(f"HINT: ESPnet does not know frontend s3prl_flashcompat: {text}" + ("" if "doctor" in text else f" {DOCTOR}"))
