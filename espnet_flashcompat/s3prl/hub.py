"""A lazy, resilient stand-in for ``s3prl.hub``: import only the upstream that is asked for.

s3prl 0.4.18's ``hub.py`` star-imports all of its upstream ``hubconf`` modules, so one broken dependency
(``byol_s`` on torchaudio >= 2.9) takes every upstream down, and the eager imports cost seconds
(``espnet_hubert`` alone imports ESPnet). ``ResilientHub`` reads which entry points each hubconf
defines from the source of s3prl's own ``hub.py`` (a line scan, nothing executed) and imports a hubconf
module the first time one of its names is looked up. ``S3PRLUpstream`` finds it where it always looks,
``getattr(hub, name)`` and ``hub.options()``. A module that fails is remembered: asking for one of its
names raises ``S3PRLImportError`` naming the real cause; ``options()`` leaves it out and
``unavailable()`` says why. ``close_names`` suggests entry points for a misspelt one.
"""

import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, Iterable, List, Optional, Union

from espnet_flashcompat.s3prl.errors import S3PRLImportError

_UNREGISTERED_SUFFIXES = ("_local", "_url", "_gdriveid", "_custom")
# A top-level ``def name(`` or ``from module import names`` (parenthesised over lines, or continued with "\\"),
# matched after a newline: the literal prefix lets ``re`` skip from line to line (3x faster than ``^`` with re.M).
_STATEMENT = re.compile(r"\n(?:def[ \t]+(\w+)[ \t]*\("
                        r"|from[ \t]+([\w.]+)[ \t]+import[ \t]*(\([^)]*\)|(?:[^\n\\]|\\\n)*))")
_NOT_NAMES = re.compile(r"#[^\n]*|\\\n|[()]")  # comments, continuations and parentheses in an import's names


class ResilientHub(ModuleType):
    """Entry point name -> hubconf module, imported on first use."""

    def __init__(self, index: Dict[str, str], load: Callable[..., ModuleType]):
        super().__init__("s3prl.hub", __doc__)
        self.__file__ = __file__
        self._index = index
        self._load = load
        self._failed: Dict[str, S3PRLImportError] = {}  # hubconf module -> why it cannot be imported

    def __getattr__(self, name: str):
        module = self._index.get(name)
        if module is None or name.startswith("__"):
            raise AttributeError(f"module 's3prl.hub' has no attribute {name!r}")
        value = getattr(self._import(module), name)
        setattr(self, name, value)  # later look-ups skip __getattr__
        return value

    def _import(self, module: str) -> ModuleType:
        if module in self._failed:
            raise self._failed[module]
        try:
            return self._load(module, upstream=upstream_of(module))
        except S3PRLImportError as exc:
            self._failed[module] = exc
            raise

    def options(self, only_registered_ckpt: bool = False) -> List[str]:
        """Entry point names, like ``s3prl.hub.options``, minus those whose module is known to be broken."""
        return [
            name for name, module in self._index.items()
            if module not in self._failed and not (only_registered_ckpt and name.endswith(_UNREGISTERED_SUFFIXES))
        ]

    def module_of(self, name: str) -> Optional[str]:
        return self._index.get(name)

    def unavailable(self) -> Dict[str, S3PRLImportError]:
        """Entry point name -> the error its module raised, for the modules tried so far."""
        return {name: self._failed[m] for name, m in self._index.items() if m in self._failed}

    def probe(self) -> Dict[str, Optional[S3PRLImportError]]:
        """Import every hubconf module (slow: seconds); upstream package -> its error, or None."""
        result = {}
        for module in dict.fromkeys(self._index.values()):
            try:
                self._import(module)
                result[upstream_of(module)] = None
            except S3PRLImportError as exc:
                result[upstream_of(module)] = exc
        return result


def upstream_of(module: str) -> str:
    """'s3prl.upstream.byol_s.hubconf' -> 'byol_s'."""
    return module.split(".")[-2]


def install_hub(load: Callable[..., ModuleType]) -> ModuleType:
    """Put a ResilientHub at ``s3prl.hub`` (keeping a real hub that already imported fine); return the hub."""
    current = sys.modules.get("s3prl.hub")
    if current is not None:
        return current
    s3prl = load("s3prl")  # raises S3PRLImportError naming a missing package
    index = read_index(Path(s3prl.__file__).parent)
    if not index:  # an s3prl whose hub.py we cannot read: use its own
        return load("s3prl.hub")
    hub = ResilientHub(index, load)
    sys.modules["s3prl.hub"] = hub
    s3prl.hub = hub
    return hub


def close_names(hub_or_names: Union[ModuleType, Iterable[str]], name: str, n: int = 5) -> List[str]:
    """Up to ``n`` entry point names like ``name`` (difflib, best first), from a hub's ``options()`` or from names."""
    import difflib

    options = hub_or_names.options() if callable(getattr(hub_or_names, "options", None)) else hub_or_names
    return difflib.get_close_matches(str(name), list(options), n=n, cutoff=0.6)


def read_index(s3prl_dir: Path) -> Dict[str, str]:
    """Entry point name -> hubconf module, from the imports in s3prl's ``hub.py`` (last one wins, as there).

    A scan of the sources for top-level statements, not ``ast``: a fifth of the cost, paid in every process
    that imports S3PRL. It finds what an ``ast`` walk of the module bodies finds as long as no line inside a
    string starts with ``def`` or ``from``; ``tests/test_hub.py`` compares the two on the installed s3prl.
    """
    index: Dict[str, str] = {}
    root = str(s3prl_dir)
    site = os.path.dirname(root)
    for _, module, names in _statements(os.path.join(root, "hub.py")):
        if not (module and module.startswith("s3prl.")):
            continue
        names = _bound(names)
        if "*" in names:
            names = _public_functions(os.path.join(site, *module.split(".")) + ".py")
        index.update(dict.fromkeys(names, module))
    return index


def _public_functions(source: str) -> List[str]:
    """What ``from <hubconf> import *`` exports as entry points: its public functions, and those it
    re-exports from another hubconf (``from ..apc.hubconf import apc_url as vq_apc_url``)."""
    names = []
    for function, module, imported in _statements(source):
        if function:
            names.append(function)
        elif module.endswith("hubconf"):
            names.extend(_bound(imported))
    return [name for name in names if not name.startswith("_")]


def _statements(source: str):
    """(function, None, None) or (None, module, names as written) for each top-level def and from-import, in order."""
    try:
        with open(source, encoding="utf-8") as file:
            text = "\n" + file.read()
    except (OSError, UnicodeDecodeError):  # absent or unreadable: no entry points, as with no file
        return
    for match in _STATEMENT.finditer(text):
        yield match.groups()


def _bound(names: str) -> List[str]:
    """The names an import binds: 'a as b, c' -> ['b', 'c']; '*' -> ['*']."""
    if "#" in names or "\\" in names or "(" in names:
        names = _NOT_NAMES.sub(" ", names)
    return [alias.split()[-1] for alias in names.split(",") if alias.strip()]
