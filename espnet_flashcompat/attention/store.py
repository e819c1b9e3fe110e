"""Keep finished calibrations on disk, keyed, so that a later process with the same key skips measuring.

Key: ``calibration_key.Key`` (the GPU, driver and library versions, the attention site, the bucket, the contenders).
Entry: the pick, each contender's timing or failure, each rejection's reason, the cost, who wrote it and when.
One JSON file per key, named by the sha256 of the key's canonical JSON (the full key inside, to catch a collision
or a changed definition), written beside it and moved into place by ``os.replace``: no reader sees a torn entry, the
last writer wins, and files of another format (an older or newer package) have other names. Processes that miss
one key at once (decode jobs) measure it once: ``lookup()`` claims the key or waits for the process that did.
Location: ``$ESPNET_FLASHCOMPAT_CALIBRATION_DIR`` (``off``, ``0``, ``false`` or ``none``: no store), else
``$XDG_CACHE_HOME/espnet-flashcompat/calibration``, else ``~/.cache/espnet-flashcompat/calibration``.
Bad state (a corrupt, truncated, future-format or unreadable file; a location that is not a directory or cannot be
written) is one warning per kind of problem and reads as a miss: no public function raises. Imports no torch.
"""

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

from espnet_flashcompat import __version__
from espnet_flashcompat.attention.calibration_key import FORMAT, Key
from espnet_flashcompat.s3prl.errors import one_line

logger = logging.getLogger(__name__)

ENV_VAR = "ESPNET_FLASHCOMPAT_CALIBRATION_DIR"
OFF = ("off", "0", "false", "none")
CLAIM_WAIT_S = 60.0  # lookup() waits this long at most for another process measuring the same key
STALE_S = 600.0  # a claim or temporary file this old is a crashed process's: taken over, or removed by clear()
_warned: set = set()  # problem kinds already warned about in this process


@dataclasses.dataclass(frozen=True)
class Entry:
    pick: str  # the backend chosen: flash_attention_2, sdpa:cudnn...
    timings: Mapping[str, Union[Mapping[str, float], str]]  # backend -> its Timing's fields, or why it could not run
    rejected: Tuple[Tuple[str, str], ...] = ()  # (backend, reason) of the decision, every backend not picked
    cost_s: float = 0.0  # what the calibration itself took
    batch: int = 1  # which batch of its bucket was timed: 1, or tuner.RECHECK_AFTER
    written: str = ""  # ISO 8601 UTC
    version: str = __version__  # of espnet-flashcompat

    @classmethod
    def of(cls, decision, timings: Mapping, cost_s: float, batch: int = 1) -> "Entry":
        """From a calibration: ``choice.pick()``'s decision and the timings it was made from."""
        plain = {b: dataclasses.asdict(t) if dataclasses.is_dataclass(t) else str(t) for b, t in timings.items()}
        return cls(decision.implementation, plain, tuple((r.backend, r.reason) for r in decision.rejected),
                   float(cost_s), int(batch), datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def timing_objects(self) -> Optional[Dict[str, object]]:
        """Backend -> ``choice.Timing``, or its failure reason; None (and a warning) if they no longer fit."""
        from espnet_flashcompat.attention.choice import Timing

        names = {f.name for f in dataclasses.fields(Timing)}
        try:
            return {b: t if isinstance(t, str) else Timing(**{k: v for k, v in t.items() if k in names})
                    for b, t in self.timings.items()}
        except Exception as exc:
            return _warn("corrupt", f"stored timings that do not fit Timing: {self.timings}", exc, "clear() them")

    def decision(self, base, where: str):
        """The ``AttnDecision`` that ``choice.pick(timings, base, where)`` made, rebuilt on ``base`` (the policy's
        decision now); None when the pick cannot run now (not among ``base``'s contenders)."""
        from espnet_flashcompat.attention.policy import Rejection

        if self.pick not in (base.contenders or (base.implementation,)):
            return None
        known = {r.backend for r in base.rejected}
        rejected = base.rejected + tuple(Rejection(b, why) for b, why in self.rejected if b not in known)
        return dataclasses.replace(base, implementation=self.pick, rejected=rejected, contenders=(),
                                   context=f"{base.context}, {where}", measured=True)


class Record(NamedTuple):
    key: Key
    entry: Entry
    path: Path


def _safe(default):
    """Public functions never raise: an unexpected error is one warning and ``default``."""
    def wrap(fn):
        @functools.wraps(fn)
        def safe(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                _warn("internal", f"{fn.__name__}() failed", exc,
                      f"report it; {ENV_VAR}=off runs without the store meanwhile")
                return copy.copy(default)
        return safe
    return wrap


@_safe(None)
def location() -> Optional[Path]:
    """The store's directory (it may not exist yet), or None when the store is off."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value.lower() in OFF:
        return None
    if value:
        return Path(os.path.abspath(os.path.expanduser(value)))
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    try:
        cache = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # a relative XDG path is invalid
    except (RuntimeError, KeyError) as exc:
        return _warn("location", "no home directory for the calibration store", exc, f"set {ENV_VAR} to one")
    return cache / "espnet-flashcompat" / "calibration"


@_safe(None)
def load(key: Optional[Key]) -> Optional[Entry]:
    """The stored entry of ``key``, or None: off, absent, or bad (one warning per kind of problem)."""
    root = location()
    if key is None or root is None:
        return None
    record = _read(root / f"{key.digest}.json")
    if record is not None and record.key.fields() != key.fields():
        return _warn("mismatch", f"{record.path} holds another key ({record.key})", None,
                     "none needed: the next calibration of this key rewrites it")
    return record and record.entry


@_safe(False)
def save(key: Optional[Key], entry: Entry) -> bool:
    """Store ``entry`` under ``key`` atomically; False (and one warning per kind of problem) when it cannot."""
    root = location()
    if key is None or root is None:
        return False
    text = json.dumps({"format": FORMAT, "key": key.fields(), "entry": dataclasses.asdict(entry)}, indent=1)
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key.digest[:16]}.", suffix=".tmp", dir=root)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())  # whole on disk before it is visible: a crash leaves no empty entry behind
        os.chmod(tmp, 0o644)  # readable by the other users of a shared store; it is replaced, never edited
        os.replace(tmp, root / f"{key.digest}.json")
        release(key)
        return True
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        _problem(root, exc)
        return False


@_safe(None)
def lookup(key: Optional[Key], timeout_s: float = CLAIM_WAIT_S) -> Optional[Entry]:
    """``load(key)``, and when it misses while another process is measuring the same key (it holds the key's
    claim), that process's entry once it is saved (up to ``timeout_s``). None: measure, then ``save()``, which
    releases the claim this process then holds (``release()`` it if there is nothing to save). Not under DDP,
    where ranks measure together: one rank would wait for a claim that another cannot release before it."""
    deadline = time.monotonic() + timeout_s
    while True:
        entry = load(key)
        if entry is not None or key is None:
            return entry
        if _claim(key):
            entry = load(key)  # saved between the miss and the claim: nothing to measure after all
            if entry is not None:
                release(key)
            return entry
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


@_safe(None)
def release(key: Optional[Key]) -> None:
    """Give up this process's claim on ``key`` (``save()`` does it)."""
    root = location()
    if key is not None and root is not None:
        with contextlib.suppress(OSError):
            (root / f".{key.digest}.claim").unlink()


def _claim(key: Key) -> bool:
    """Whether this process may measure ``key``: it now holds the key's claim, or a stale one (a crashed process's)
    was taken over, or nothing can be claimed (the store is off or unusable). False: another process holds it."""
    root = location()
    if root is None:
        return True
    path = root / f".{key.digest}.claim"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return True
            with contextlib.suppress(FileNotFoundError):  # released meanwhile: try again
                if time.time() - path.stat().st_mtime < STALE_S:
                    return False
                path.unlink()
        return False
    except OSError as exc:
        _problem(root, exc)
        return True


@_safe([])
def entries() -> List[Record]:
    """Every readable entry of this format, with its key and file (bad files are skipped, with one warning)."""
    root = location()
    if root is None or not root.is_dir():
        return []
    records = (_read(path, listing=True) for path in sorted(root.glob("*.json")) if not path.name.startswith("."))
    return [r for r in records if r is not None and r.path.name == f"{r.key.digest}.json"]


@_safe(0)
def clear(match: Union[None, Mapping[str, object], Callable[[Key], bool]] = None) -> int:
    """Remove entries; how many. ``match``: None for all (bad files and stale temporary files too), a mapping of
    ``Key.flat()`` fields to values (``{"gpu": "NVIDIA H200", "model": "HubertModel"}``), or a predicate on keys."""
    root = location()
    if root is None or not root.is_dir():
        return 0
    if match is None:
        paths = [p for p in root.glob("*.json") if not p.name.startswith(".")]
        for tmp in root.glob(".*"):  # a crashed writer's file or claim; a live writer's is seconds old
            with contextlib.suppress(OSError):
                if tmp.suffix in (".tmp", ".claim") and time.time() - tmp.stat().st_mtime > STALE_S:
                    tmp.unlink()
    else:
        keep = match if callable(match) else (lambda key: all(key.flat().get(k) == v for k, v in match.items()))
        paths = [r.path for r in entries() if keep(r.key)]
    removed = 0
    for path in paths:
        try:
            path.unlink()
            removed += 1
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):  # else another process cleared it first
                _problem(root, exc)
    return removed


def _read(path: Path, listing: bool = False) -> Optional[Record]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except NotADirectoryError as exc:
        return _problem(path.parent, exc)
    except OSError as exc:
        return _warn("unreadable", f"cannot read {path}", exc, "make it readable, or delete it")
    try:
        data = json.loads(raw.decode("utf-8"))
        version = data["format"] if isinstance(data, dict) else None
        if not isinstance(version, int):
            raise ValueError("no format number")
        if version != FORMAT:
            if version > FORMAT and not listing:  # a newer package's entries beside ours are no fault when listing
                _warn("future", f"{path} is of store format {version}, newer than this package's {FORMAT}", None,
                      f"upgrade espnet-flashcompat, or give this version another {ENV_VAR}")
            return None
        return Record(Key.from_fields(data["key"]), _entry(data["entry"]), path)
    except Exception as exc:
        return _warn("corrupt", f"{path} is not a whole calibration entry", exc,
                     "delete it (the next calibration of this key rewrites it)")


def _entry(data: Mapping) -> Entry:
    entry = Entry(**data)
    timings = entry.timings if isinstance(entry.timings, dict) else {}
    if entry.pick not in timings or not all(isinstance(t, (str, dict)) for t in timings.values()):
        raise ValueError(f"malformed entry {data}")
    return dataclasses.replace(entry, rejected=tuple((str(b), str(why)) for b, why in entry.rejected))


def _problem(root: Path, exc: OSError) -> None:
    """The store's directory cannot be used: a file where it or a parent should be, or it cannot be written."""
    fix = f"make {root} a writable directory, or set {ENV_VAR} to one (or to off)"
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        return _warn("location", f"{root} is not a directory, or lies under a file", exc, fix)
    return _warn("unwritable", f"cannot write into {root}", exc, fix)


def _warn(kind: str, what: str, exc: Optional[BaseException], fix: str) -> None:
    """Log a problem of ``kind`` once per process; None, for ``return _warn(...)`` where a miss is the answer."""
    if kind not in _warned:
        _warned.add(kind)
        logger.warning("espnet-flashcompat calibration store: %s%s; calibrating as without the store. Fix: %s",
                       what, f": {one_line(exc)}" if exc is not None else "", fix)


