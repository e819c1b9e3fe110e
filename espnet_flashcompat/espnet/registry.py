"""Task registration and the startup hook: make ``frontend: s3prl_flashcompat`` known to ESPnet.

Registration follows ESPnet, not a list: every module under ``espnet_compat.TASK_PACKAGES`` (``espnet2.tasks.*``,
ESPnet3's ``espnet3.*``) that holds a ``ClassChoices`` offering ESPnet's ``S3prlFrontend`` as ``s3prl`` gets
``s3prl_flashcompat`` beside it. ``register()`` updates the modules already imported at once and arms a
``sys.meta_path`` finder that updates the others right after they are imported (it wraps their loader), so no
ESPnet module is imported here. ``startup()`` is what ``espnet_flashcompat.pth`` runs in every interpreter: it arms
that finder unless ``ESPNET_FLASHCOMPAT_DISABLE=1``, never raises, and imports nothing heavy (no torch, ESPnet,
S3PRL or transformers; not even ``logging`` unless there is a warning to give). A task module that defines a task
class is also handed to ``optin.install`` (the opt-in model-wide attention policy), never raising.

If our frontend cannot be imported, the key is registered all the same, as a stand-in whose construction raises
the real ImportError: users who never ask for it see nothing; one who asks gets the cause, not ESPnet's bare
"--frontend must be one of". ``ESPNET_FLASHCOMPAT_REPLACE_S3PRL=1`` (opt-in) makes ``frontend: s3prl`` build our
frontend too, for configs one cannot edit. ``hook_state()`` reports all this for ``espnet-flashcompat doctor``.
"""

import os
import sys

from espnet_flashcompat.espnet.espnet_compat import TASK_PACKAGES

KEY, STOCK_KEY = "s3prl_flashcompat", "s3prl"
FRONTEND = "espnet_flashcompat.frontend:S3prlFlashCompatFrontend"
OPTIN = "espnet_flashcompat.espnet.optin"  # install(module): wraps the task classes for the opt-in model attention policy
DISABLE_ENV = "ESPNET_FLASHCOMPAT_DISABLE"
REPLACE_ENV = "ESPNET_FLASHCOMPAT_REPLACE_S3PRL"
_WATCHED = tuple(package + "." for package in TASK_PACKAGES)

# The startup hook: setup.py writes PTH_LINE into PTH_NAME at the root of site-packages. `site` execs
# lines that start with "import"; the exec'd try/except keeps even a broken install silent.
PTH_NAME = "espnet_flashcompat.pth"
PTH_LINE = (
    "import sys; exec('try: import espnet_flashcompat.espnet.registry as _r; _r.startup()\\n"
    "except Exception: pass')\n"
)

_registered = {}  # module name -> names of its choices that offer KEY (e.g. ["diar_frontend", "frontend"])
_failed = {}  # module name -> why registering it raised
_optin_failed = {}  # module name -> why handing it to OPTIN raised
_frontend = {}  # "class": the frontend class or its stand-in; "error": why the real one cannot be imported
_startup = {"ran": False, "error": None}
_DEBUG, _WARNING = 10, 30  # logging's levels, without importing logging


def register() -> list:
    """Make ``s3prl_flashcompat`` a frontend choice of every ESPnet module that offers ``s3prl``.

    Idempotent. Imports no ESPnet module: those already imported are updated now (errors raise), the others
    right after they are imported. ``ESPNET_FLASHCOMPAT_DISABLE`` does not apply here (it turns off the startup
    hook only). Returns the names of the imported modules whose choices offer the key, sorted.
    """
    for name, module in list(sys.modules.items()):
        if name.startswith(_WATCHED) and module is not None:
            _register_module(module)
            _hand_over(module)
    _arm()
    return sorted(_registered)


def startup() -> None:
    """Run by ``espnet_flashcompat.pth`` at interpreter start: arm the lazy registration. Never raises."""
    try:
        _startup["ran"] = True
        if disabled_by_env():
            _log(_DEBUG, "espnet-flashcompat: startup hook disabled by %s", DISABLE_ENV)
            return
        _arm()
    except Exception as exc:  # a startup hook must never break the interpreter
        _startup["error"] = f"{type(exc).__name__}: {exc}"
        _log(_DEBUG, "espnet-flashcompat: startup hook failed: %s", _startup["error"])


def disabled_by_env() -> bool:
    """True when ``ESPNET_FLASHCOMPAT_DISABLE`` asks to turn the startup hook off (1/true/yes/on)."""
    return _env_flag(DISABLE_ENV)


def replaces_stock() -> bool:
    """True when ``ESPNET_FLASHCOMPAT_REPLACE_S3PRL`` asks ``frontend: s3prl`` to build our frontend too."""
    return _env_flag(REPLACE_ENV)


def hook_state() -> dict:
    """The startup hook's state in this process, for ``espnet-flashcompat doctor``."""
    pth = _find_pth()
    current = False
    if pth is not None:
        try:
            with open(pth, encoding="utf-8") as f:
                current = f.read() == PTH_LINE
        except OSError:
            pass
    return {
        "pth_file": pth,  # where espnet_flashcompat.pth was found on this interpreter's paths, or None
        "pth_installed": pth is not None,
        "pth_current": current,  # its content is this version's PTH_LINE
        "startup_ran": _startup["ran"],  # startup() ran in this process (the .pth, or a direct call)
        "startup_error": _startup["error"],
        "disabled_by_env": disabled_by_env(),
        "replaces_stock": replaces_stock(),
        "armed": _hook() is not None,
        "registered": {module: list(names) for module, names in sorted(_registered.items())},
        "failed": dict(_failed),
        "frontend_error": _frontend.get("error"),  # why our frontend cannot be imported (the stand-in's cause)
        "optin_failed": dict(_optin_failed),  # task modules whose classes could not be wrapped for the opt-in
    }


class _TaskImportHook:
    """A ``sys.meta_path`` finder: hands out the real spec of a watched task module, its loader wrapped."""

    _espnet_flashcompat_hook = True  # marks our finder across reloads of this module

    def __init__(self):
        self._finding = set()  # guards against finders that re-enter the import system

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(_WATCHED) or fullname in self._finding:
            return None
        self._finding.add(fullname)
        try:
            spec = _find_spec_elsewhere(fullname, path, target)
        finally:
            self._finding.discard(fullname)
        if spec is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec

    def invalidate_caches(self):
        pass


class _RegisteringLoader:
    """Wraps a task module's loader: executes the module, then registers it. Leaves no trace on it."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # get_source, get_filename, is_package, ...: the real loader's
        if name == "loader" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.loader, name)

    def create_module(self, spec):
        create = getattr(self.loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module):
        module.__loader__ = self.loader  # the module sees its real loader, as without us
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        try:
            _register_module(module)
        except Exception as exc:  # never break the import of an ESPnet module
            _failed[module.__name__] = f"{type(exc).__name__}: {exc}"
            _log(_WARNING, "espnet-flashcompat: could not add frontend %r to %s: %s: %s",
                 KEY, module.__name__, type(exc).__name__, exc)
        _hand_over(module)


def _hand_over(module) -> None:
    """Give a module that defines a task class (one with ``build_model``) to ``OPTIN``. Never raises."""
    try:
        if not any(isinstance(v, type) and "build_model" in vars(v) for v in list(vars(module).values())):
            return
        import importlib

        importlib.import_module(OPTIN).install(module)
    except Exception as exc:  # the opt-in is lost for this task; the import of ESPnet's module is not
        _optin_failed[module.__name__] = f"{type(exc).__name__}: {exc}"
        _log(_WARNING, "espnet-flashcompat: could not wrap the tasks of %s for model_attn_implementation: %s: %s",
             module.__name__, type(exc).__name__, exc)


def _register_module(module) -> None:
    """Add KEY to each of the module's choices that offer ESPnet's ``S3prlFrontend`` as ``s3prl``."""
    stock = getattr(sys.modules.get("espnet2.asr.frontend.s3prl"), "S3prlFrontend", None)
    if stock is None:  # the module never imported S3prlFrontend: it offers no s3prl
        return
    targets = [value for value in list(vars(module).values())
               if isinstance(getattr(value, "classes", None), dict)
               and (value.classes.get(STOCK_KEY) is stock or KEY in value.classes)]
    if not targets:
        return
    frontend = _frontend_class()
    for choices in targets:
        choices.classes.setdefault(KEY, frontend)
        if replaces_stock():
            choices.classes[STOCK_KEY] = frontend
    _registered[module.__name__] = sorted({str(choices.name) for choices in targets})
    _failed.pop(module.__name__, None)


def _frontend_class():
    """Our frontend class; if it cannot be imported, a stand-in that raises the real ImportError when built."""
    if "class" not in _frontend:
        import importlib

        module_name, _, attr = FRONTEND.partition(":")
        try:
            _frontend["class"] = getattr(importlib.import_module(module_name), attr)
        except Exception as exc:
            _frontend["error"] = f"{type(exc).__name__}: {exc}"
            _frontend["class"] = _unavailable(exc)
            _log(_DEBUG, "espnet-flashcompat: %s cannot be imported: %s", FRONTEND, _frontend["error"])
    return _frontend["class"]


def _unavailable(cause: Exception) -> type:
    """The stand-in for a frontend that cannot be imported: building it raises ImportError from ``cause``."""

    class S3prlFlashCompatFrontendUnavailable:
        def __init__(self, *args, **kwargs):
            raise ImportError(f"frontend '{KEY}' cannot be built: {FRONTEND} failed to import: "
                              f"{type(cause).__name__}: {cause}. Run `espnet-flashcompat doctor`") from cause

    return S3prlFlashCompatFrontendUnavailable


def _find_spec_elsewhere(fullname, path, target):
    for finder in list(sys.meta_path):
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None or getattr(finder, "_espnet_flashcompat_hook", False):
            continue
        spec = find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


def _hook():
    return next((f for f in sys.meta_path if getattr(f, "_espnet_flashcompat_hook", False)), None)


def _arm() -> None:
    if _hook() is None:
        sys.meta_path.insert(0, _TaskImportHook())


def _find_pth():
    dirs = list(sys.path)
    if "site" in sys.modules:
        site = sys.modules["site"]
        dirs += list(getattr(site, "getsitepackages", lambda: [])()) + [site.getusersitepackages()]
    for directory in dict.fromkeys(d for d in dirs if d):
        candidate = os.path.join(directory, PTH_NAME)
        if os.path.isfile(candidate):
            return candidate
    return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _log(level, msg, *args):
    """Log without importing ``logging`` at startup: below WARNING only if logging is already loaded."""
    if level < _WARNING and "logging" not in sys.modules:
        return
    import logging

    logging.getLogger(__name__).log(level, msg, *args)
