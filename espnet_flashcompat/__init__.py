"""espnet-flashcompat: an ESPnet S3PRL frontend that survives broken flash-attn, old GPUs and fp32.

One folder per concern: ``attention`` (choosing and running attention), ``espnet`` (hooking into ESPnet),
``s3prl`` (importing S3PRL), ``doctor`` and ``handoff``; ``frontend``, ``cli`` and ``testing`` are the faces of the
package. The top level stays import-light (no torch, no ESPnet) because the startup hook imports it in every
interpreter; each public name is loaded from its module on first use, and 0.1's module paths still import
(``_moved``).
"""

__version__ = "0.2.0"

__all__ = ["S3PRLImportError", "import_s3prl", "register", "__version__"]

_LAZY = {
    "S3PRLImportError": "espnet_flashcompat.s3prl.guard",
    "import_s3prl": "espnet_flashcompat.s3prl.guard",
    "register": "espnet_flashcompat.espnet.registry",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'espnet_flashcompat' has no attribute {name!r}")


def _install_old_paths():
    from espnet_flashcompat import _moved

    _moved.install()


_install_old_paths()
