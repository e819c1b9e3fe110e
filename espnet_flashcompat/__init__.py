"""espnet-flashcompat: an ESPnet S3PRL frontend that survives broken flash-attn, old GPUs and fp32.

The top level stays import-light (no torch, no ESPnet) because the startup hook imports it in every
interpreter; each public name is loaded from its module on first use.
"""

__version__ = "0.1.0"

__all__ = ["S3PRLImportError", "import_s3prl", "register", "__version__"]

_LAZY = {
    "S3PRLImportError": "espnet_flashcompat.guard",
    "import_s3prl": "espnet_flashcompat.guard",
    "register": "espnet_flashcompat.registry",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'espnet_flashcompat' has no attribute {name!r}")
