"""Handing a model trained with ``frontend: s3prl_flashcompat`` to stock ESPnet (``espnet-flashcompat to-stock``).

- ``convert``: writes the copy (``config.yaml`` edited, weights unchanged), from an experiment or a packed zip.
- ``verify``: the proof, in two fresh interpreters, that stock ESPnet loads the copy as the plugin loads the source.

In 0.1 ``to_stock`` lived in the module ``espnet_flashcompat.handoff``; its names still resolve here.
"""


def __getattr__(name):
    from espnet_flashcompat import _moved

    return _moved.forward(__name__, name)
