"""Where ESPnet releases differ, for the rest of the package: which S3PRL distribution an ESPnet wants, where its
task modules live. Import-light (no torch, no ESPnet): the startup hook reads it in every interpreter.

- Task modules: ``espnet2.tasks.*`` in every release; espnet 202611 adds ESPnet3 (``espnet3``), whose systems
  carry their own copies of a task (``espnet3.systems.esp2_asr.task``) with their own ``frontend_choices``.
- S3PRL: espnet 202511 and older use the original ``s3prl``; espnet 202611 its fork ``espnet-s3prl`` (the torchaudio
  >= 2.9 breakage fixed). Both install the top-level package ``s3prl``. ESPnet's own metadata names the one it
  wants (202611's ``s2st`` extra requires ``espnet-s3prl``), so nothing here compares version numbers.
- Transformer attention (``MultiHeadedAttention`` and the relative-position ones): ``espnet.nets.pytorch_backend``
  up to 202511, ``espnet2.legacy.nets.pytorch_backend`` from 202611. 202611 also gave
  ``RelPositionMultiHeadedAttention`` and ``LegacyRelPositionMultiHeadedAttention`` a ``use_sdpa`` path (an
  ``__init__`` argument); 202511's have none (their ``use_sdpa`` attribute, inherited, is read by nothing).
  Both are read off the classes, not a version number.
"""

import importlib.metadata
import os
import re
from importlib.machinery import PathFinder
from typing import List, Optional, Tuple

TASK_PACKAGES = ("espnet2.tasks", "espnet3")  # every module below these may define frontend_choices
ATTENTION_MODULES = ("espnet2.legacy.nets.pytorch_backend.transformer.attention",  # 202611
                     "espnet.nets.pytorch_backend.transformer.attention")  # 202511 and older
ATTENTION_CLASSES = ("MultiHeadedAttention", "RelPositionMultiHeadedAttention", "LegacyRelPositionMultiHeadedAttention")
ORIGINAL_S3PRL, ESPNET_S3PRL = "s3prl", "espnet-s3prl"
_S3PRL_DISTRIBUTIONS = (ESPNET_S3PRL, ORIGINAL_S3PRL)


def s3prl_distribution() -> Optional[Tuple[str, str]]:
    """(name, version) of the installed distribution that provides the ``s3prl`` package, or None."""
    for name in _S3PRL_DISTRIBUTIONS:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def wanted_s3prl() -> str:
    """The S3PRL distribution the installed ESPnet asks for: ``espnet-s3prl`` where ESPnet's metadata requires it."""
    try:
        requires = importlib.metadata.requires("espnet") or []
    except importlib.metadata.PackageNotFoundError:
        return ORIGINAL_S3PRL
    names = {re.split(r"[\s<>=!~;\[]", r.strip(), maxsplit=1)[0].lower().replace("_", "-") for r in requires}
    return ESPNET_S3PRL if ESPNET_S3PRL in names else ORIGINAL_S3PRL


def task_module_files() -> List[Tuple[str, str]]:
    """(module name, source path) of every module under TASK_PACKAGES that mentions ``frontend_choices``.

    Found on disk, nothing imported: what doctor imports to check registration. A mention is not an offer
    (``mt`` has frontend choices without S3PRL): importing the module tells.
    """
    found = []
    for package in TASK_PACKAGES:
        top, _, rest = package.partition(".")
        spec = PathFinder.find_spec(top)
        if spec is None or not spec.submodule_search_locations:
            continue
        for base in spec.submodule_search_locations:
            root = os.path.join(base, *rest.split(".")) if rest else base
            for folder, dirs, files in os.walk(root):
                dirs[:] = sorted(d for d in dirs if d.isidentifier())
                for file in sorted(files):
                    path = os.path.join(folder, file)
                    if file.endswith(".py") and _mentions(path, b"frontend_choices"):
                        module = os.path.relpath(path[:-3], base).replace(os.sep, ".")
                        found.append((f"{top}.{module}".removesuffix(".__init__"), path))
    return found


def _mentions(path: str, text: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return text in f.read()
    except OSError:
        return False


def attention_classes() -> List[type]:
    """ESPnet's Transformer attention classes (``ATTENTION_CLASSES``) from every ``ATTENTION_MODULES`` this ESPnet has.

    Imports those modules (torch and ESPnet): call it only where a model is being built.
    """
    import importlib

    found = []
    for name in ATTENTION_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):  # this ESPnet has no such module
                continue
            raise
        found += [getattr(module, c) for c in ATTENTION_CLASSES if isinstance(getattr(module, c, None), type)]
    return found
