"""When the model-wide attention policy (``model_attention``) applies: how the user asks, and the ESPnet task
wrappers that read it: ``install(module)``. Without the opt-in, ESPnet's behaviour, options, configs and models are stock.

How the user asks is ``request``'s job (the environment, ``model_attn_implementation``, ``model_attn_strict``).

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
from typing import List

from espnet_flashcompat.attention import policy
from espnet_flashcompat.espnet.request import (  # noqa: F401  (re-exported: where they were first defined)
    CHOICES, ENV_VAR, MODEL_ENV, OFF, OPTION, STRICT_ENV, STRICT_OPTION, Request, origin, requested)

_WRAPPED = "_espnet_flashcompat_wrapped"
_wrapped_tasks: List[str] = []


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
        from espnet_flashcompat.espnet import model_attention  # torch and ESPnet's attention: only when asked

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
                            f"{ENV_VAR} overrides it; {policy.ENV_VAR} overrides its value.")
    group.add_argument(f"--{STRICT_OPTION}", type=_str2bool, default=argparse.SUPPRESS,
                       help=f"fail instead of downgrading an explicit {OPTION} (or {STRICT_ENV}=1)")


def _str2bool(value: str) -> bool:
    from espnet2.utils.types import str2bool

    return str2bool(value)
