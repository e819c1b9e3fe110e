"""Task registration and the startup hook: make ``frontend: s3prl_flashcompat`` known to ESPnet.

``register()`` adds ``s3prl_flashcompat`` to the ``frontend_choices`` of every installed ESPnet task
that offers ``s3prl``. Task modules already imported are updated at once; the others are updated right
after they are imported, by a ``sys.meta_path`` finder that wraps their loader, so no task module is
imported here. ``startup()`` is what ``espnet_flashcompat.pth`` runs in every interpreter: it arms that
finder unless ``ESPNET_FLASHCOMPAT_DISABLE=1``, never raises, and imports nothing heavy (no torch,
ESPnet, S3PRL or transformers; not even ``logging`` unless there is a warning to give).
``hook_state()`` reports all this for ``espnet-flashcompat doctor``.
"""

import os
import sys

KEY = "s3prl_flashcompat"
FRONTEND = "espnet_flashcompat.frontend:S3prlFlashCompatFrontend"
DISABLE_ENV = "ESPNET_FLASHCOMPAT_DISABLE"

# The ESPnet tasks whose frontend_choices offer `s3prl` (module espnet2.tasks.<task>).
TASKS = ("asr", "st", "slu", "s2t", "s2t_ctc", "uasr", "diar", "spk", "lid", "cls", "asvspoof", "s2st", "enh_s2t")
_MODULES = {f"espnet2.tasks.{task}": task for task in TASKS}

# The startup hook: setup.py writes PTH_LINE into PTH_NAME at the root of site-packages. `site` execs
# lines that start with "import"; the exec'd try/except keeps even a broken install silent.
PTH_NAME = "espnet_flashcompat.pth"
PTH_LINE = (
    "import sys; exec('try: import espnet_flashcompat.registry as _r; _r.startup()\\n"
    "except Exception: pass')\n"
)

_registered = {}  # task -> names of the choices that received KEY (e.g. ["frontend", "diar_frontend"])
_not_registered = {}  # task -> why its imported module got no KEY
_startup = {"ran": False, "error": None}
_DEBUG, _WARNING = 10, 30  # logging's levels, without importing logging


def register() -> list:
    """Make ``s3prl_flashcompat`` a frontend choice of every installed ESPnet task that offers ``s3prl``.

    Idempotent. Imports no task module: those already imported are registered now (errors raise),
    the others right after they are imported. ``ESPNET_FLASHCOMPAT_DISABLE`` does not apply here (it
    turns off the startup hook only). Returns the names of the tasks (in ``TASKS`` order) whose
    ``frontend_choices`` offer ``s3prl_flashcompat`` from now on in this process.
    """
    imported = {task: sys.modules[name] for name, task in _MODULES.items() if name in sys.modules}
    for module in imported.values():
        _register_module(module)
    _arm()
    pending = _installed_tasks() - set(imported)
    return [task for task in TASKS if task in _registered or task in pending]


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
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


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
        "armed": _hook() is not None,
        "registered": {task: list(names) for task, names in _registered.items()},
        "not_registered": dict(_not_registered),
    }


class _TaskImportHook:
    """A ``sys.meta_path`` finder: hands out the real spec of a watched task module, its loader wrapped."""

    _espnet_flashcompat_hook = True  # marks our finder across reloads of this module

    def __init__(self):
        self._finding = set()  # guards against finders that re-enter the import system

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _MODULES or fullname in self._finding:
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
        except Exception as exc:  # never break the import of an ESPnet task
            _not_registered[_MODULES[module.__name__]] = f"{type(exc).__name__}: {exc}"
            _log(_WARNING, "espnet-flashcompat: could not add frontend %r to %s: %s: %s",
                 KEY, module.__name__, type(exc).__name__, exc)


def _register_module(module) -> None:
    """Add KEY to each of the module's choices whose ``s3prl`` is ESPnet's ``S3prlFrontend``."""
    task = _MODULES[module.__name__]
    stock = getattr(sys.modules.get("espnet2.asr.frontend.s3prl"), "S3prlFrontend", None)
    targets = [
        value for value in list(vars(module).values())
        if stock is not None and isinstance(getattr(value, "classes", None), dict)
        and value.classes.get("s3prl") is stock
    ]
    if not targets:
        _not_registered[task] = "no frontend choices offering ESPnet's S3prlFrontend as 's3prl'"
        return
    frontend = _frontend_class()
    for choices in targets:
        choices.classes.setdefault(KEY, frontend)
    _registered[task] = sorted({str(choices.name) for choices in targets})
    _not_registered.pop(task, None)


def _frontend_class():
    import importlib

    module_name, _, attr = FRONTEND.partition(":")
    return getattr(importlib.import_module(module_name), attr)


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


def _installed_tasks() -> set:
    """The tasks whose module exists in the installed ESPnet, found on disk without importing anything."""
    from importlib.machinery import PathFinder
    from importlib.util import find_spec

    package = sys.modules.get("espnet2.tasks")
    locations = getattr(package, "__path__", None)
    if locations is None:
        espnet2 = sys.modules.get("espnet2")
        espnet2_path = getattr(espnet2, "__path__", None)
        if espnet2_path is None:
            spec = find_spec("espnet2")
            espnet2_path = spec.submodule_search_locations if spec is not None else None
        spec = PathFinder.find_spec("espnet2.tasks", espnet2_path) if espnet2_path else None
        locations = spec.submodule_search_locations if spec is not None else None
    if not locations:
        return set()
    return {task for name, task in _MODULES.items() if PathFinder.find_spec(name, list(locations)) is not None}


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


def _log(level, msg, *args):
    """Log without importing ``logging`` at startup: below WARNING only if logging is already loaded."""
    if level < _WARNING and "logging" not in sys.modules:
        return
    import logging

    logging.getLogger(__name__).log(level, msg, *args)
