"""What a calibration depends on: the ``Key`` under which the calibration store keeps it.

The GPU (name, compute capability), driver, CUDA, cuDNN, torch, transformers and flash-attn versions (missing or
broken as such), the attention site (model class, heads, head size, layers, dtype, attention dropout; no weights;
a Hugging Face model's config, the attention modules of S3PRL's own models, or what the caller reads off ESPnet's
attention modules),
train or eval with how many parameters get a gradient, the shape bucket, the contender set and the store format.
A change in any of them is another key: the store never hands a calibration to a stack it was not made on.
Imports no torch until a key is made.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

from espnet_flashcompat.s3prl.errors import one_line

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when Key or the store's Entry change meaning: older and newer files then never match
STACK_FIELDS = ("gpu", "capability", "driver", "cuda", "cudnn", "torch", "transformers", "flash_attn")
_SITE_EXTRAS = ("attention_dropout", "position_embeddings_type")  # config fields that change the attention kernel


@dataclasses.dataclass(frozen=True)
class Key:
    gpu: str  # torch.cuda.get_device_name, "cpu" off CUDA
    capability: str  # "9.0"
    driver: str  # the NVIDIA driver ("570.86.15"), else the CUDA driver API version torch reports
    cuda: str
    cudnn: str
    torch: str
    transformers: str
    flash_attn: str  # its version, "<version> broken" when it does not import, or "missing"
    site: Tuple[Tuple[str, object], ...]  # sorted (field, value): model, heads, head_dim, layers, dtype, ...
    train: bool
    trainable: int  # parameters of the model the train step differentiates (0 in eval or frozen)
    bucket: Tuple  # frontend_buckets.bucket() less train/eval: (batch, samples, ragged); () for one decision per mode
    contenders: Tuple[str, ...]  # sorted
    format: int = FORMAT

    def fields(self) -> Dict[str, object]:
        """The key as plain JSON data, as stored in the entry."""
        return json.loads(_canonical(dataclasses.asdict(self)))

    def flat(self) -> Dict[str, object]:
        """The fields with the site's (model, heads...) among them, not nested: for listing and matching."""
        fields = self.fields()
        return {**fields, **dict(fields.pop("site"))}

    @property
    def digest(self) -> str:
        return hashlib.sha256(_canonical(self.fields()).encode()).hexdigest()

    @classmethod
    def from_fields(cls, data: Mapping) -> "Key":
        return cls(**{**data, "site": tuple((str(k), v) for k, v in data["site"]), "bucket": tuple(data["bucket"]),
                      "contenders": tuple(data["contenders"])})


def stack(device=None) -> Dict[str, str]:
    """The key's machine and software fields (``STACK_FIELDS``) for ``device`` (None or CPU: no GPU fields)."""
    import torch

    cuda = device is not None and torch.device(device).type == "cuda"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
            "capability": "%d.%d" % torch.cuda.get_device_capability(device) if cuda else "",
            "driver": _driver() if cuda else "", "cuda": torch.version.cuda or "", "cudnn": str(cudnn or ""),
            "torch": torch.__version__, "transformers": _version("transformers") or "missing",
            "flash_attn": _flash_attn()}


def site_of(model, dtype, fields: Optional[Mapping[str, object]] = None) -> Tuple[Tuple[str, object], ...]:
    """The attention site of a model, in ``dtype``: its class and attention configuration, from a Hugging Face
    model's config, else (S3PRL's own models) from its attention modules (``num_heads``, ``head_dim``); ``fields``:
    the configuration as the caller reads it (ESPnet's attention modules)."""
    config = getattr(model, "config", None)
    if fields is not None:
        site = dict(fields)
    elif config is None or not hasattr(config, "num_attention_heads"):
        site = _native_site(model)
    else:
        heads, hidden = config.num_attention_heads, getattr(config, "hidden_size", None)
        site = {"heads": heads, "layers": getattr(config, "num_hidden_layers", None),
                "head_dim": getattr(config, "head_dim", None) or (hidden // heads if heads and hidden else None)}
        site.update({name: getattr(config, name) for name in _SITE_EXTRAS if hasattr(config, name)})
    site.update(model=type(model).__name__, dtype=str(dtype).replace("torch.", ""))
    return tuple(sorted((k, v if v is None or isinstance(v, (str, int, float, bool)) else str(v))
                        for k, v in site.items()))


def _native_site(model) -> Dict[str, object]:
    """Heads, head size, layers and attention dropout of the attention modules of S3PRL's own model (fairseq's
    ``MultiheadAttention``: ``num_heads``, ``head_dim``, ``dropout_module``)."""
    attention = [m for m in model.modules() if hasattr(m, "num_heads") and hasattr(m, "head_dim")]
    if not attention:
        raise ValueError(f"{type(model).__name__} has no attention module with num_heads and head_dim")
    first = attention[0]
    dropout = getattr(getattr(first, "dropout_module", None), "p", getattr(first, "dropout", None))
    return {"heads": first.num_heads, "head_dim": first.head_dim, "layers": len(attention),
            "attention_dropout": dropout if isinstance(dropout, (int, float)) else None}


def key_for(model, dtype, bucket: Sequence, contenders: Iterable[str], device=None,
            flash_attn: Optional[str] = None, site: Optional[Mapping[str, object]] = None) -> Optional[Key]:
    """The key of calibrating ``model`` (the HF model) in ``dtype`` (the one in effect) on ``device`` (default: the
    model's) for ``bucket`` (``frontend_buckets.bucket()`` or an ESPnet attention site's, or ``(train,)`` when one decision stands for every shape)
    among ``contenders``. ``flash_attn`` overrides the probed flash-attn state. None (and a warning) if it cannot
    be made: the calibration then runs without the store. ``site``: ``site_of``'s ``fields``."""
    try:
        return _key(model, dtype, bucket, contenders, device, flash_attn, site)
    except Exception as exc:
        logger.warning("espnet-flashcompat calibration store: no key for %s: %s; calibrating without the store",
                       type(model).__name__, one_line(exc))
        return None


def _key(model, dtype, bucket, contenders, device, flash_attn, site) -> Key:
    params, train = list(model.parameters()), bool(bucket[0])
    fields = {**stack(device if device is not None or not params else params[0].device),
              **({} if flash_attn is None else {"flash_attn": flash_attn})}
    return Key(**fields, site=site_of(model, dtype, site), train=train,
               trainable=sum(p.numel() for p in params if p.requires_grad) if train else 0,
               bucket=tuple(bucket[1:]), contenders=tuple(sorted(contenders)))


def _canonical(data) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version(dist)
    return None


def _driver() -> str:
    """The NVIDIA kernel driver's version, else the CUDA driver API version torch reports."""
    with contextlib.suppress(OSError):
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", f.read())
        if found:
            return found.group(1)
    import torch

    with contextlib.suppress(Exception):
        return f"cuda-api {torch._C._cuda_getDriverVersion()}"
    return "unknown"


def _flash_attn() -> str:
    version = _version("flash_attn") or _version("flash-attn")
    if version is None:
        return "missing"
    from espnet_flashcompat.s3prl.guard import probe_flash_attn  # imports it for real, hides it if broken

    return version if probe_flash_attn() is None else f"{version} broken"
