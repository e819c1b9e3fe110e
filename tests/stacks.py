"""Which ESPnet stack the tests run on, for the tests whose expectations differ between the two (see README).

- ``current``: espnet 202611 + espnet-s3prl (ESPnet's S3PRL fork, torchaudio breakage fixed), Python 3.12.
- ``legacy``: espnet 202511 + s3prl 0.4.18 (its ``byol_s`` upstream needs torchaudio's removed
  ``set_audio_backend``), Python 3.11.

Read off the installed distributions, never off ``espnet_flashcompat`` (whose answers are under test).
"""

import importlib.metadata

import pytest


def _installed(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


ESPNET = _installed("espnet")
S3PRL_DIST = "espnet-s3prl" if _installed("espnet-s3prl") else "s3prl" if _installed("s3prl") else None
STACK = "current" if S3PRL_DIST == "espnet-s3prl" else "legacy"
# stock S3PRL (s3prl 0.4.18) star-imports byol_s, which calls torchaudio.set_audio_backend (gone in torchaudio 2.9)
TORCHAUDIO_BREAKS_STOCK = STACK == "legacy"


def only_on(stack: str, why: str):
    """Skip a test everywhere but on ``stack``, saying why it applies only there."""
    return pytest.mark.skipif(STACK != stack, reason=f"{stack} stack only: {why}")
