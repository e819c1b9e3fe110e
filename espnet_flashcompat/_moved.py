"""Module paths of espnet-flashcompat 0.1, before its modules moved into one folder per concern, kept importable.

A script or config written against 0.1 may name ``espnet_flashcompat.guard``, ``espnet_flashcompat.registry`` and
the like. ``OLD_PATHS`` maps each old path to the module that now does its job; a finder on ``sys.meta_path``
answers an import of an old path with that module itself (the same object, so patches and state are shared), and
warns once with ``DeprecationWarning``. Three old modules share their name with the folder that holds them now
(``attention``, ``doctor``, ``handoff``): those folders forward the old module's attributes through ``forward()``.
"""

import importlib
import importlib.machinery
import sys
import warnings

_PACKAGE = "espnet_flashcompat"
OLD_PATHS = {f"{_PACKAGE}.{old}": f"{_PACKAGE}.{new}" for old, new in {
    "calibrate": "attention.calibrate", "ranks": "attention.ranks", "relpos_sdpa": "attention.relpos_sdpa",
    "sdpa_kernels": "attention.sdpa_kernels", "transformers_compat": "attention.transformers_compat",
    "espnet_compat": "espnet.espnet_compat", "model_attention": "espnet.model_attention", "optin": "espnet.optin",
    "registry": "espnet.registry", "guard": "s3prl.guard", "hub": "s3prl.hub",
    "doctor_attention": "doctor.attention", "doctor_text": "doctor.text", "handoff_verify": "handoff.verify",
}.items()}
# the folders named as an old module was, and the module that holds that old module's names now
FORWARDED = {f"{_PACKAGE}.attention": f"{_PACKAGE}.attention.policy", f"{_PACKAGE}.doctor": f"{_PACKAGE}.doctor.report",
             f"{_PACKAGE}.handoff": f"{_PACKAGE}.handoff.convert"}


class OldPathFinder:
    """Imports an old module path as the module that now stands there (a meta path finder and its loader; the
    startup hook imports this module in every interpreter, so it stays off ``importlib.abc``)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in OLD_PATHS:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        _deprecated(spec.name, OLD_PATHS[spec.name])
        return importlib.import_module(OLD_PATHS[spec.name])

    def exec_module(self, module):
        pass  # the module already ran under its own name


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (idempotent)."""
    if not any(isinstance(finder, OldPathFinder) for finder in sys.meta_path):
        sys.meta_path.append(OldPathFinder())


def forward(package: str, name: str):
    """``package.<name>`` of 0.1's module ``package``, for the folder's ``__getattr__``; AttributeError if none."""
    import importlib.util

    if name.startswith("__") or importlib.util.find_spec(f"{package}.{name}") is not None:  # a module of the folder
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    module = importlib.import_module(FORWARDED[package])
    try:
        value = getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
    _deprecated(f"{package}.{name}", f"{FORWARDED[package]}.{name}")
    return value


_warned = set()


def _deprecated(old: str, new: str) -> None:
    if old not in _warned:
        _warned.add(old)
        warnings.warn(f"{old} moved to {new} in espnet-flashcompat 0.2; the old path still works",
                      DeprecationWarning, stacklevel=4)
