"""Import S3PRL safely, and say exactly why an import failed.

``import_s3prl()`` puts the resilient hub (``hub.py``) in place of ``s3prl.hub``, imports ``s3prl.nn``
and returns what ESPnet needs to build upstreams. Every import failure is walked down its exception
chain (transformers' "Failed to import transformers.models…" wrappers included) and classified:

- ``flash_attn``: flash-attn is installed but broken. It is hidden from the process (a ``sys.modules``
  sentinel plus transformers' cached availability reset), the half-imported modules are dropped and the
  import is retried once;
- ``upstream_dependency``: one upstream's own dependency is broken (byol_s on torchaudio >= 2.9);
- ``not_installed``: s3prl or transformers is missing;
- ``other``.

What cannot be recovered raises ``S3PRLImportError`` carrying a ``Diagnosis``. The diagnoses of the
faults that were recovered from stay in ``recovered_faults()`` for the frontend and ``doctor``.
"""

import importlib
import importlib.util
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from types import ModuleType
from typing import List, Optional

from espnet_flashcompat.espnet import espnet_compat
from espnet_flashcompat.s3prl.errors import (  # noqa: F401  (re-exported: guard's API)
    FLASH_ATTN, NOT_INSTALLED, OTHER, UPSTREAM_DEPENDENCY, Diagnosis, S3PRLImportError, one_line)

logger = logging.getLogger(__name__)

_FLASH_MODULES = ("flash_attn", "flash_attn_2_cuda")
_REQUIRED = ("s3prl", "transformers", "torch")


@dataclass(frozen=True)
class S3PRL:
    """What ``import_s3prl`` hands back: the classes ESPnet builds upstreams with, and the hub."""

    S3PRLUpstream: type
    Featurizer: type
    hub: ModuleType

    def available_names(self, only_registered_ckpt: bool = False) -> List[str]:
        return self.hub.options(only_registered_ckpt)


_recovered: List[Diagnosis] = []
_result: Optional[S3PRL] = None


def recovered_faults() -> List[Diagnosis]:
    """Faults this process recovered from (flash-attn hidden), oldest first."""
    return list(_recovered)


def import_s3prl() -> S3PRL:
    """Import S3PRL so that one broken upstream or a broken flash-attn cannot stop the others.

    Idempotent and cheap on the second call. Raises ``S3PRLImportError`` naming the root cause.
    """
    global _result
    if _result is not None:
        return _result
    from espnet_flashcompat.s3prl.hub import install_hub

    hub = install_hub(import_recovering)
    nn = import_recovering("s3prl.nn")
    _result = S3PRL(S3PRLUpstream=nn.S3PRLUpstream, Featurizer=nn.Featurizer, hub=hub)
    return _result


def import_recovering(name: str, upstream: Optional[str] = None) -> ModuleType:
    """``importlib.import_module(name)``, retried once with flash-attn hidden if flash-attn broke it."""
    while True:
        before = set(sys.modules)
        try:
            return importlib.import_module(name)
        except Exception as exc:
            diagnosis = classify(exc, upstream=upstream)
            if diagnosis.kind != FLASH_ATTN or flash_attn_hidden():
                prefix = f"S3PRL upstream '{upstream}' cannot be imported" if upstream else "S3PRL cannot be imported"
                raise S3PRLImportError(diagnosis, prefix) from exc
            _drop_modules(set(sys.modules) - before)
            hide_flash_attn(diagnosis, while_importing=name)


def classify(exc: BaseException, upstream: Optional[str] = None) -> Diagnosis:
    """Reduce an import failure to its root cause: the first flash-attn fault in the chain, else the last link."""
    chain = list(_chain(exc))
    flash = next((e for e in chain if _is_flash_fault(e)), None)
    root = flash or chain[-1]
    error = f"{type(root).__name__}: {root}".strip()
    where = _where(root)
    if flash is not None:
        path = _flash_attn_path()
        return Diagnosis(FLASH_ATTN, error, where, module=getattr(root, "name", None) or FLASH_ATTN, path=path,
                         hint=_flash_hint())
    module, attribute = _missing(root)
    upstream = upstream or _upstream_in(root)
    if isinstance(root, ModuleNotFoundError) and module in _REQUIRED:
        return Diagnosis(NOT_INSTALLED, error, where, module, upstream=upstream, hint=_install_hint(module))
    if upstream:
        return Diagnosis(UPSTREAM_DEPENDENCY, error, where, module, attribute, upstream,
                         hint=_dependency_hint(module, attribute, upstream))
    return Diagnosis(OTHER, error, where, module, attribute,
                     hint="read the chained traceback above; run `espnet-flashcompat doctor` for the whole picture")


def flash_attn_hidden() -> bool:
    return FLASH_ATTN in sys.modules and sys.modules[FLASH_ATTN] is None


def hide_flash_attn(diagnosis: Diagnosis, while_importing: str = "") -> None:
    """Make a broken flash-attn invisible to this process, so transformers and ESPnet fall back to SDPA."""
    _drop_modules([m for m in sys.modules if m.split(".")[0] in _FLASH_MODULES])
    for name in _FLASH_MODULES:
        sys.modules[name] = None  # `import flash_attn` now raises; importlib.util.find_spec returns None
    _reset_transformers_flash_cache()
    _recovered.append(diagnosis)
    during = f" while importing {while_importing}" if while_importing else ""
    logger.warning("flash-attn is installed but broken%s; falling back to PyTorch SDPA. %s",
                   during, diagnosis.describe())


def probe_flash_attn() -> Optional[Diagnosis]:
    """Import flash-attn's kernels for real; on failure hide it and return why. None when it works."""
    if flash_attn_hidden():
        return _recovered[-1] if _recovered else Diagnosis(FLASH_ATTN, "flash-attn hidden", hint=_flash_hint())
    if importlib.util.find_spec(FLASH_ATTN) is None:
        return Diagnosis(FLASH_ATTN, "ModuleNotFoundError: No module named 'flash_attn'", module=FLASH_ATTN,
                         hint="pip install flash-attn --no-build-isolation (optional: SDPA is used without it)")
    before = set(sys.modules)
    try:
        importlib.import_module("flash_attn.flash_attn_interface")
        return None
    except Exception as exc:
        diagnosis = classify(exc)
        if diagnosis.kind != FLASH_ATTN:  # a failure inside flash_attn's own imports still belongs to it
            diagnosis = Diagnosis(FLASH_ATTN, diagnosis.error, diagnosis.where, diagnosis.module,
                                  path=_flash_attn_path(), hint=_flash_hint())
        _drop_modules(set(sys.modules) - before)
        hide_flash_attn(diagnosis, while_importing="flash_attn")
        return diagnosis


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _is_flash_fault(exc: BaseException) -> bool:
    if isinstance(exc, ImportError):
        if (exc.name or "").split(".")[0] in _FLASH_MODULES or FLASH_ATTN in (exc.path or ""):
            return True
        if any(m in str(exc) for m in _FLASH_MODULES):
            return True
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and _in_flash_attn(frames[-1].filename)


def _in_flash_attn(filename: str) -> bool:
    parts = filename.replace("\\", "/").split("/")
    return any(p == FLASH_ATTN or p.startswith("flash_attn_2_cuda") for p in parts)


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def _missing(exc: BaseException):
    """(module, attribute) that the failure names: 'torchaudio', 'set_audio_backend' for example."""
    if isinstance(exc, ImportError):
        return exc.name, None
    if isinstance(exc, AttributeError) and getattr(exc, "name", None):
        obj = getattr(exc, "obj", None)
        return getattr(obj, "__name__", type(obj).__name__ if obj is not None else None), exc.name
    return None, None


def _upstream_in(exc: BaseException) -> Optional[str]:
    """The S3PRL upstream package the failing code lives in, read off the traceback."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        parts = frame.filename.replace("\\", "/").split("/")
        for i in range(len(parts) - 2):
            if parts[i] == "s3prl" and parts[i + 1] == "upstream":
                return parts[i + 2]
    return None


def _dependency_hint(module, attribute, upstream) -> str:
    if module and attribute:
        version = _version_of(module)
        return (f"{module}{' ' + version if version else ''} has no '{attribute}'; only '{upstream}' needs it. "
                f"Choose another upstream, or install a {module} release that still has it")
    if module:
        return f"'{upstream}' needs '{module}'; install it, or choose another upstream"
    return f"only '{upstream}' is affected; choose another upstream"


def _version_of(module: str) -> str:
    mod = sys.modules.get(module.split(".")[0])
    return str(getattr(mod, "__version__", "")) if mod else ""


def _install_hint(module: str) -> str:
    if module != "s3prl":
        return f"pip install {module} (stacks/ in the espnet-flashcompat repository pins known-good stacks)"
    wanted = espnet_compat.wanted_s3prl()
    other = espnet_compat.ORIGINAL_S3PRL if wanted == espnet_compat.ESPNET_S3PRL else espnet_compat.ESPNET_S3PRL
    return (f"pip install {wanted} (the S3PRL distribution this ESPnet asks for; never install {other} over it: "
            "both provide the package 's3prl')")


def _flash_attn_path() -> Optional[str]:
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        dist = distribution("flash-attn")
        return os.path.join(str(dist.locate_file("")), FLASH_ATTN)
    except (ImportError, PackageNotFoundError):
        return None


def _flash_hint() -> str:
    torch = sys.modules.get("torch")
    against = f" against torch {torch.__version__}" if torch is not None else ""
    return (f"rebuild it{against} (pip install --no-build-isolation --force-reinstall --no-cache-dir flash-attn) "
            "or remove it (pip uninstall flash-attn); SDPA needs neither")


def _reset_transformers_flash_cache() -> None:
    """transformers caches flash-attn availability; forget it so the sentinel is seen."""
    import_utils = sys.modules.get("transformers.utils.import_utils")
    if import_utils is None:
        return
    for name, value in vars(import_utils).items():
        if "flash_attn" not in name:
            continue
        if hasattr(value, "cache_clear"):
            value.cache_clear()
        elif isinstance(value, bool):
            setattr(import_utils, name, False)


_HALF_IMPORTED = ("s3prl.nn", "s3prl.upstream.", "s3prl.downstream.", "transformers.models.")


def _drop_modules(names) -> None:
    """Forget half-imported modules so a retry executes them again (never packages' roots)."""
    for name in names:
        if name.startswith(_HALF_IMPORTED) or "flash_attn" in name or "flash_attention" in name:
            sys.modules.pop(name, None)
