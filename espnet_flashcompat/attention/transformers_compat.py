"""The one place where transformers versions differ: which backends a model class supports, and switching a loaded
model's attention backend in place.

``supports(model, implementation)`` reads the class flags: ``_supports_sdpa``, and ``_supports_flash_attn``
(``_supports_flash_attn_2`` in older releases).

Where transformers has ``PreTrainedModel.set_attn_implementation`` (4.54 and later) the switch is delegated to it.
Older releases fix the backend when the model is built. There the switch changes only what the backend needs: each
attention module is re-pointed to the backend's class (4.41-4.52 list them in ``<MODEL>_ATTENTION_CLASSES``:
subclasses of the eager class, with its parameters) and given the state that class's ``__init__`` adds, and the
per-module flags (``_use_flash_attention_2``) and ``config._attn_implementation`` that the forward reads are set
(4.53 reads the config only). Every ``nn.Parameter``, submodule, hook and ``requires_grad`` stays as it is: an
optimizer built before the switch still trains the model, and adapters added to it survive.
"""

import inspect
import logging
import sys

import torch

logger = logging.getLogger(__name__)

_FLAGS = {"_use_flash_attention_2": "flash_attention_2", "_use_sdpa": "sdpa"}  # set from the config at construction


class InPlaceSwitchError(RuntimeError):
    """The attention of a model cannot be switched without rebuilding it (which would orphan its parameters)."""


def supports(model: torch.nn.Module, implementation: str) -> bool:
    """Whether the transformers ``model``'s class declares support for ``implementation`` (eager always)."""
    if implementation == "sdpa":
        return bool(getattr(model, "_supports_sdpa", False))
    if implementation == "flash_attention_2":
        return bool(getattr(model, "_supports_flash_attn", False) or getattr(model, "_supports_flash_attn_2", False))
    return True


def set_attn_implementation(model: torch.nn.Module, implementation: str) -> None:
    """Make the transformers ``model`` attend with ``implementation``, keeping its parameters, submodules and hooks."""
    before = model.config._attn_implementation
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:
        _switch_in_place(model, implementation)
    if model.config._attn_implementation == before != implementation:  # set_attn_implementation only warns
        raise InPlaceSwitchError(f"transformers kept {type(model).__name__} on {before}: it cannot switch it to "
                                 f"{implementation} at run time (see its warning)")
    logger.debug("%s now attends with %s", type(model).__name__, model.config._attn_implementation)


def _switch_in_place(model: torch.nn.Module, implementation: str) -> None:
    _check_available(model, implementation)
    sources = {sys.modules[type(m).__module__] for m in model.modules()}
    tables = {id(t): t for s in sources for name, t in vars(s).items()
              if name.endswith("_ATTENTION_CLASSES") and isinstance(t, dict)}.values()
    # Everything is checked before anything changes: a refused switch leaves the model as it was. The layers of a
    # model build their attention from one config, so one plan per class serves all its modules.
    plans, swaps = {}, []
    for module in model.modules():
        table = next((t for t in tables if isinstance(module, tuple(t.values()))), None)
        if table is None:
            continue
        if type(module) not in table.values():
            raise InPlaceSwitchError(f"{type(module).__name__} subclasses a transformers attention class: its "
                                     f"{implementation} counterpart is unknown")
        if type(module) not in plans:
            plans[type(module)] = _plan(module, table, implementation)
        swaps.append((module, *plans[type(module)]))
    if not swaps and not any(hasattr(s, "ALL_ATTENTION_FUNCTIONS") for s in sources):
        raise InPlaceSwitchError(f"{type(model).__name__} neither lists its attention classes in a "
                                 "*_ATTENTION_CLASSES table nor reads the backend from its config at run time")
    for module, target, added, dropped in swaps:
        module.__class__ = target
        for name in dropped:
            module.__dict__.pop(name, None)
        module.__dict__.update(added)
    for module in model.modules():
        for flag, backend in _FLAGS.items():
            if isinstance(getattr(module, flag, None), bool):
                setattr(module, flag, implementation == backend)
    configs = (getattr(m, "config", None) for m in model.modules())
    for config in {id(c): c for c in configs if hasattr(c, "_attn_implementation")}.values():
        config._attn_implementation = implementation


def _check_available(model, implementation: str) -> None:
    """transformers' own checks, as ``from_pretrained`` runs them: raise when ``implementation`` cannot run here."""
    if implementation == "flash_attention_2":
        model._check_and_enable_flash_attn_2(model.config, torch_dtype=model.dtype, check_device_map=False,
                                             hard_check_only=True)
    elif implementation == "sdpa":
        model._check_and_enable_sdpa(model.config, hard_check_only=True)


def _plan(module: torch.nn.Module, table: dict, implementation: str):
    """(class, attributes its ``__init__`` adds, attributes it lacks) for ``module`` on ``implementation``, read off
    two throwaway instances built on the meta device from the module's own constructor arguments."""
    name, target, base = type(module).__name__, table.get(implementation), table.get("eager")
    if target is None:
        raise InPlaceSwitchError(f"{name} has no {implementation} counterpart (only {', '.join(table)})")
    if base is None or not all(issubclass(c, base) for c in table.values()):
        raise InPlaceSwitchError(f"the attention classes of {name} do not share one eager base class")
    parameters = list(inspect.signature(base.__init__).parameters)[1:]
    kwargs = {p: getattr(module, p) for p in parameters if hasattr(module, p)}
    try:
        with torch.device("meta"):
            old, new = type(module)(**kwargs), target(**kwargs)
    except TypeError as exc:
        raise InPlaceSwitchError(f"cannot rebuild the constructor arguments of {name}: {exc}") from exc
    if _layout(old) != _layout(new):
        raise InPlaceSwitchError(f"{target.__name__} has other weights or submodules than {name}")
    added = {k: v for k, v in vars(new).items() if k not in vars(old)}
    return target, added, vars(old).keys() - vars(new).keys()


def _layout(module: torch.nn.Module):
    return [n for n, _ in module.named_modules()], list(module.state_dict())
