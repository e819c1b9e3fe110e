"""How the user asks for the model-wide attention policy: a ``Request`` read from the environment and the config.

By precedence: ``ESPNET_FLASHCOMPAT_MODEL_ATTN=auto|flash_attention_2|sdpa|eager|off`` (``off``: stock, whatever the
YAML says); ``model_attn_implementation`` in the recipe YAML (or ``--model_attn_implementation``; in an ESPnet3
recipe under ``model:``), whose value ``ESPNET_FLASHCOMPAT_ATTN`` (the frontend's override) replaces; and
``model_attn_strict: true`` or ``ESPNET_FLASHCOMPAT_MODEL_ATTN_STRICT=1`` to refuse instead of downgrading an
explicit request. ``optin`` adds the options to ESPnet's parsers; ``model_attention`` acts on a request.
"""

import os
from dataclasses import dataclass
from typing import Optional

from espnet_flashcompat.attention import policy

ENV_VAR, STRICT_ENV = "ESPNET_FLASHCOMPAT_MODEL_ATTN", "ESPNET_FLASHCOMPAT_MODEL_ATTN_STRICT"
OPTION, STRICT_OPTION = "model_attn_implementation", "model_attn_strict"
OFF = "off"
CHOICES = policy.CHOICES + (OFF,)
MODEL_ENV = "model-env"  # AttnDecision.source when ESPNET_FLASHCOMPAT_MODEL_ATTN asked ("env": ESPNET_FLASHCOMPAT_ATTN)
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Request:
    backend: str  # auto | flash_attention_2 | sdpa | eager
    source: str  # "config" (YAML / --option), "env" (ESPNET_FLASHCOMPAT_ATTN) or MODEL_ENV
    strict: bool = False


def requested(args=None) -> Optional[Request]:
    """What the user asks (None: not asked, or ``off``), from the environment and ``args`` (the task's parsed
    options, a config.yaml read back, or ESPnet3's ``model:``); an invalid value raises ValueError."""
    env, configured = os.environ.get(ENV_VAR, "").strip(), getattr(args, OPTION, None)
    if env:
        value, source, where = env, MODEL_ENV, ENV_VAR
    elif configured is not None:  # YAML reads a bare `off` as False
        value, source, where = OFF if configured is False else str(configured), "config", OPTION
        if os.environ.get(policy.ENV_VAR, "").strip() and value.lower() != OFF:  # it never opts in
            value, source, where = os.environ[policy.ENV_VAR].strip(), "env", policy.ENV_VAR
    else:
        return None
    value = value.lower()
    if value not in CHOICES:
        raise ValueError(f"{where}={value!r} is not one of {', '.join(CHOICES)}")
    if value == OFF:
        return None
    strict = (os.environ.get(STRICT_ENV, "").strip().lower() in _TRUE
              or str(getattr(args, STRICT_OPTION, False)).strip().lower() in _TRUE)
    return Request(value, source, strict)


def origin(source: str) -> str:
    """Where a request of ``source`` came from, as the user writes it."""
    return {"env": policy.ENV_VAR, MODEL_ENV: ENV_VAR}.get(source, OPTION)
