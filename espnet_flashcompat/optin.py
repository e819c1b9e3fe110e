"""When the model-wide attention policy (``model_attention``) applies: how the user asks, and the ESPnet task
wrappers that read it. Without the opt-in, ESPnet's behaviour, options, configs and models are stock.

How the user asks, by precedence:

- ``ESPNET_FLASHCOMPAT_MODEL_ATTN=auto|flash_attention_2|sdpa|eager|off`` (``off``: stock, whatever the YAML says);
- ``model_attn_implementation: ...`` in the recipe YAML (or ``--model_attn_implementation``), read by stock
  ``espnet2.bin.*_train`` and, through the saved ``config.yaml``, by ``*_inference``; in an ESPnet3 recipe under
  ``model:``. ``ESPNET_FLASHCOMPAT_ATTN`` (the frontend's override) overrides the YAML value, as for the frontend;
- ``model_attn_strict: true`` or ``ESPNET_FLASHCOMPAT_MODEL_ATTN_STRICT=1``: refuse instead of downgrading an
  explicit request (``attention.AttentionUnavailableError``).

``install(module)``: ``registry`` hands over each ESPnet task module right after it executes. ``AbsTask.get_parser``
gains the two options with ``default=argparse.SUPPRESS``: they are in the parsed ``args``, and so in the saved
``config.yaml``, only when given, so ``--print_config`` and the configs of runs without them stay byte-identical
(``config_argparse`` rejects unknown YAML keys: an option is the only way a YAML key gets in). Each task's own
``build_model`` is wrapped to ``model_attention.apply()`` the policy to the model it returns when asked;
``build_model_from_file`` (inference) and ESPnet3's ``get_espnet_model`` (which passes ``model:`` as ``args``)
call it. A config.yaml that holds the key still loads without us for inference (``build_model_from_file`` reads
the YAML as a Namespace); only a stock parser given it with ``--config`` refuses the key.
"""

import argparse
import functools
import os
from dataclasses import dataclass
from typing import List, Optional

from espnet_flashcompat import attention

ENV_VAR, STRICT_ENV = "ESPNET_FLASHCOMPAT_MODEL_ATTN", "ESPNET_FLASHCOMPAT_MODEL_ATTN_STRICT"
OPTION, STRICT_OPTION = "model_attn_implementation", "model_attn_strict"
OFF = "off"
CHOICES = attention.CHOICES + (OFF,)
MODEL_ENV = "model-env"  # AttnDecision.source when ESPNET_FLASHCOMPAT_MODEL_ATTN asked ("env": ESPNET_FLASHCOMPAT_ATTN)
_WRAPPED = "_espnet_flashcompat_wrapped"
_TRUE = ("1", "true", "yes", "on")
_wrapped_tasks: List[str] = []


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
        if os.environ.get(attention.ENV_VAR, "").strip() and value.lower() != OFF:  # it never opts in
            value, source, where = os.environ[attention.ENV_VAR].strip(), "env", attention.ENV_VAR
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
    return {"env": attention.ENV_VAR, MODEL_ENV: ENV_VAR}.get(source, OPTION)


def install(module) -> None:
    """Wrap the ESPnet task classes ``module`` defines: ``get_parser`` (``AbsTask``'s) adds our options, each own
    ``build_model`` applies the policy when asked. Idempotent; abstract methods are left alone."""
    for value in list(vars(module).values()):
        if not isinstance(value, type) or value.__module__ != module.__name__:
            continue
        if not all(hasattr(value, a) for a in ("get_parser", "build_model", "build_model_from_file")):
            continue  # not an ESPnet task class
        wrapped = [_wrap(value, name, wrapper) for name, wrapper in (("get_parser", _get_parser),
                                                                      ("build_model", _build_model))]
        if any(wrapped):
            _wrapped_tasks.append(f"{value.__module__}.{value.__qualname__}")


def wrapped_tasks() -> List[str]:
    """The task classes wrapped in this process (``module.Class``), for doctor."""
    return list(_wrapped_tasks)


def _wrap(task: type, name: str, wrapper) -> bool:
    method = vars(task).get(name)
    func = getattr(method, "__func__", None)
    if not isinstance(method, classmethod) or func is None or getattr(func, _WRAPPED, False) \
            or getattr(func, "__isabstractmethod__", False):
        return False

    def wrapped(cls, *args, **kwargs):
        return wrapper(func, cls, *args, **kwargs)

    functools.update_wrapper(wrapped, func)
    setattr(wrapped, _WRAPPED, True)
    setattr(task, name, classmethod(wrapped))
    return True


def _get_parser(original, cls):
    parser = original(cls)
    add_arguments(parser)
    return parser


def _build_model(original, cls, args, *rest, **kwargs):
    model = original(cls, args, *rest, **kwargs)
    request = requested(args)
    if request is not None:
        from espnet_flashcompat import model_attention

        model_attention.apply(model, request)
    return model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Our two options, absent from the parsed args (and the saved config.yaml) unless given."""
    if any(action.dest == OPTION for action in parser._actions):
        return
    group = parser.add_argument_group("espnet-flashcompat: one attention policy for the whole model (opt-in)")
    group.add_argument(f"--{OPTION}", choices=CHOICES, default=argparse.SUPPRESS,
                       help="attention backend of ESPnet's attention modules, decided per device and dtype (auto: "
                            "flash_attention_2 where it can run, else sdpa). Unset: stock ESPnet. "
                            f"{ENV_VAR} overrides it; {attention.ENV_VAR} overrides its value.")
    group.add_argument(f"--{STRICT_OPTION}", type=_str2bool, default=argparse.SUPPRESS,
                       help=f"fail instead of downgrading an explicit {OPTION} (or {STRICT_ENV}=1)")


def _str2bool(value: str) -> bool:
    from espnet2.utils.types import str2bool

    return str2bool(value)
