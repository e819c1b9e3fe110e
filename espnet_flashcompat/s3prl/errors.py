"""The errors of importing S3PRL, shared by the guarded import (``guard``) and the lazy hub (``hub``).

``Diagnosis`` is one import failure reduced to its real cause, of one of four kinds; ``S3PRLImportError`` carries it
to the caller; ``one_line`` is the "ExcType: first line" form every report and log line of this package uses.
"""

from dataclasses import asdict, dataclass
from typing import Optional

# Diagnosis.kind
FLASH_ATTN = "flash_attn"
UPSTREAM_DEPENDENCY = "upstream_dependency"
NOT_INSTALLED = "not_installed"
OTHER = "other"


@dataclass(frozen=True)
class Diagnosis:
    """One import failure, reduced to its real cause."""

    kind: str
    error: str  # "ExcType: message" of the root cause
    where: str = ""  # "file:line" where the root cause was raised
    module: Optional[str] = None  # the module that is missing or lacks an attribute
    attribute: Optional[str] = None
    upstream: Optional[str] = None  # the S3PRL upstream package whose import failed
    path: Optional[str] = None  # where the broken flash_attn package lives
    hint: str = ""

    def describe(self) -> str:
        """'ExcType: message (at file:line; flash-attn at path). Fix: hint' in one line."""
        places = [f"at {self.where}"] if self.where else []
        if self.kind == FLASH_ATTN and self.path:
            places.append(f"flash-attn at {self.path}")
        return f"{self.error}{' (' + '; '.join(places) + ')' if places else ''}. Fix: {self.hint}"

    def as_dict(self) -> dict:
        return asdict(self)


class S3PRLImportError(ImportError):
    """S3PRL (or one upstream) cannot be imported; ``.diagnosis`` holds the real cause."""

    def __init__(self, diagnosis: Diagnosis, prefix: str = "S3PRL cannot be imported"):
        super().__init__(f"{prefix}: {diagnosis.describe()}")
        self.diagnosis = diagnosis


def one_line(exc: BaseException) -> str:
    """'ExcType: first line of its message', the form every report and log line of this package uses."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0]
