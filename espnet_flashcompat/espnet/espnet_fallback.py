"""ESPnet's own flash-attn fallback, caught with its real exception: ``catching(forward, ...)``.

ESPnet's attention catches any error of its flash path, logs "Flash Attention failed, falling back to default
attention" once per module, turns ``use_flash_attn`` off and answers with eager attention. ``catching`` runs a forward
with a filter on the root logger (``install()``) that takes that warning with the exception it is logged from
(``sys.exc_info()`` inside ESPnet's ``except`` block) and drops it, so that the policy gives one warning per
decision, naming the exception, instead of ESPnet's one per module.
"""

import logging
import sys
import threading
from typing import Optional, Tuple

from espnet_flashcompat.s3prl.errors import one_line

FALLBACK_LOG = "Flash Attention failed, falling back to default attention"  # ESPnet's, once per module
_local = threading.local()


class _Catcher(logging.Filter):
    _espnet_flashcompat = True

    def filter(self, record: logging.LogRecord) -> bool:
        caught = getattr(_local, "caught", None)
        if caught is None or not str(record.msg).startswith(FALLBACK_LOG):
            return True
        caught.append((sys.exc_info()[1], record.getMessage()))
        return False


def install() -> None:
    """Put the filter on the root logger, once."""
    root = logging.getLogger()
    if not any(getattr(f, "_espnet_flashcompat", False) for f in root.filters):
        root.addFilter(_Catcher())


def catching(forward, *args, **kwargs) -> Tuple[object, str, Optional[BaseException]]:
    """(output, failure text, exception or None) of ESPnet's forward, with its flash-failure warning caught; the
    failure text means something only where the forward left ``use_flash_attn`` off."""
    outer, _local.caught = getattr(_local, "caught", None), []
    try:
        out = forward(*args, **kwargs)
        caught = _local.caught
    finally:
        _local.caught = outer
    if not caught:  # ESPnet's warning was not emitted (root logger above WARNING): only its message is lost
        return out, "ESPnet's flash path failed (its warning, which holds the error, is below the log level)", None
    exc, message = caught[0]
    if exc is None:
        return out, message, None
    return out, one_line(exc), exc
