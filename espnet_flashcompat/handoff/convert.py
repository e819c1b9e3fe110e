"""``espnet-flashcompat to-stock``: hand a model trained with ``frontend: s3prl_flashcompat`` to stock ESPnet.

Its one job: write a copy that loads without the plugin, and prove that it does. The weights need no change
(``S3prlFlashCompatFrontend`` is ESPnet's ``S3prlFrontend`` with the same parameters), so only ``config.yaml``
changes: ``frontend: s3prl``, and ``attn_implementation`` and ``strict`` leave ``frontend_conf``. The edit is made
on the text, so comments, key order and layout stay, and a comment line naming espnet-flashcompat is put on top; the
result is checked as YAML data (only those keys differ), and a layout the text edit cannot handle is dumped anew as
ESPnet dumps configs.

SRC is an experiment's ``config.yaml`` (or its folder) with the model file beside it: ``valid.acc.ave.pth``, the
file ``asr.sh`` decodes with, unless ``--model`` names another; or a zip made by ``espnet2.bin.pack``, which gives a
zip with the same members, ``config.yaml`` alone rewritten, so that the paths it holds into the zip stay valid.

Nothing is written to OUT before ``verify`` proves, on CPU in two fresh interpreters, that stock ESPnet
(plugin off) builds and strictly loads the output, and runs it to the same frontend and encoder outputs as the
plugin gets from SRC. Exit codes (see ``cli``): 0 written and verified, 1 verification failed (nothing written),
2 SRC refused.
"""

import copy
import importlib.util
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import yaml

from espnet_flashcompat import __version__
from espnet_flashcompat.handoff.verify import STOCK_FRONTEND, HandoffError, Verification, verify
from espnet_flashcompat.handoff.verify import VerificationFailed  # noqa: F401  (raised by verify; part of this API)
from espnet_flashcompat.espnet.registry import DISABLE_ENV, KEY, STOCK_KEY

logger = logging.getLogger(__name__)

EXTRA_KEYS = ("attn_implementation", "strict")  # our frontend_conf arguments, unknown to S3prlFrontend
DEFAULT_MODEL = "valid.acc.ave.pth"  # asr.sh's inference_asr_model
DEFAULT_TASK = "asr"


class Refused(HandoffError):
    """SRC (or OUT) is not something to_stock converts: nothing was written."""

    exit_code = 2


class Result(NamedTuple):
    written: List[Path]
    dropped: Dict[str, object]  # the frontend_conf entries taken out
    task: str
    verification: Verification


def to_stock(src, out, model: Optional[str] = None, task: Optional[str] = None) -> Result:
    """Write the stock-loadable copy of ``src`` to ``out`` and verify it; raise ``HandoffError`` if not done."""
    src, out = Path(src), Path(out)
    if not src.exists():
        raise Refused(f"{src}: no such file or folder")
    if src.is_file() and zipfile.is_zipfile(src):
        if model is not None:
            raise Refused("--model is for an experiment's config.yaml; a zip's meta.yaml names its model file")
        return _zip_to_stock(src, out, task)
    return _experiment_to_stock(src, out, model, task)


def stock_config(text: str) -> Tuple[str, Dict[str, object]]:
    """``config.yaml`` text for stock ESPnet, and the ``frontend_conf`` entries dropped. Refused if not ours."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise Refused(f"not a YAML config: {exc}") from exc
    found = data.get("frontend") if isinstance(data, dict) else None
    if found != KEY:
        raise Refused(f"the config has frontend: {found}, not {KEY}: nothing to convert")
    wanted = copy.deepcopy(data)
    wanted["frontend"] = STOCK_KEY
    conf = wanted.get("frontend_conf") or {}
    dropped = {key: conf.pop(key) for key in EXTRA_KEYS if key in conf}
    new = _edited(text)
    if yaml.safe_load(new) != wanted:
        logger.warning("to-stock: the config's layout defeats the text edit; it is dumped anew (comments dropped)")
        from espnet2.utils.yaml_no_alias_safe_dump import yaml_no_alias_safe_dump

        new = yaml_no_alias_safe_dump(wanted, indent=4, sort_keys=False)
    note = (f"# espnet-flashcompat {__version__} to-stock: frontend {KEY} -> {STOCK_KEY}, dropped from frontend_conf: "
            f"{_flow(dropped)}. Loads with stock ESPnet; the plugin is not needed.\n")
    return note + new, dropped


def _flow(values: dict) -> str:
    """``values`` as one line of YAML: ``{attn_implementation: auto, strict: false}``."""
    return yaml.safe_dump(values, default_flow_style=True, sort_keys=False, width=float("inf")).strip()


def _edited(text: str) -> str:
    """``text`` with the ``frontend`` value replaced and our ``frontend_conf`` keys' lines cut, by YAML node marks."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    cuts = []  # (start, end, replacement), character offsets into text
    for key, value in root.value:
        if key.value == "frontend":
            cuts.append((value.start_mark.index, value.end_mark.index, STOCK_KEY))
        elif key.value == "frontend_conf" and isinstance(value, yaml.MappingNode):
            for conf_key, conf_value in value.value:
                if conf_key.value in EXTRA_KEYS:
                    start = text.rfind("\n", 0, conf_key.start_mark.index) + 1
                    end = text.find("\n", conf_value.end_mark.index)
                    cuts.append((start, len(text) if end < 0 else end + 1, ""))
    for start, end, replacement in sorted(cuts, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def _experiment_to_stock(src: Path, out: Path, model: Optional[str], task: Optional[str]) -> Result:
    config = src / "config.yaml" if src.is_dir() else src
    if not config.is_file():
        raise Refused(f"{config}: no such file")
    model_file = _model_file(config, model)
    text, dropped = stock_config(_read(config))
    task = _task(task or DEFAULT_TASK)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise Refused(f"{out} exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _scratch(out.parent) as tmp:
        scratch = Path(tmp)
        staged = scratch / "out"
        staged.mkdir()
        (staged / "config.yaml").write_text(text, encoding="utf-8")
        shutil.copyfile(model_file, staged / model_file.name)
        verification = verify(task, (_plugin_config(config, scratch), model_file),
                               (staged / "config.yaml", staged / model_file.name), scratch)
        if out.is_dir():
            out.rmdir()
        staged.rename(out)
    return Result([out / "config.yaml", out / model_file.name], dropped, task, verification)


def _model_file(config: Path, model: Optional[str]) -> Path:
    if model is not None:
        path = Path(model)
        if not path.is_file() and not path.is_absolute():
            path = config.parent / model if (config.parent / model).is_file() else path
    else:
        path = config.parent / DEFAULT_MODEL
    if path.is_file():
        return path
    found = sorted(p.name for p in config.parent.glob("*.pth") if p.is_file() and p.name != "checkpoint.pth")
    beside = f"; model files beside {config.name}: {', '.join(found)}" if found else ""
    raise Refused(f"model file {path} not found{beside}. Name one with --model FILE")


def _zip_to_stock(src: Path, out: Path, task: Optional[str]) -> Result:
    target = out if out.suffix == ".zip" else out / src.name
    if target.exists():
        raise Refused(f"{target} exists")
    with zipfile.ZipFile(src) as packed:
        config_member, model_member, named_task = _packed_model(packed)
        text, dropped = stock_config(packed.read(config_member).decode("utf-8"))
    task = _task(task or named_task or DEFAULT_TASK)
    target.parent.mkdir(parents=True, exist_ok=True)
    from espnet2.main_funcs.pack_funcs import unpack

    with _scratch(target.parent) as tmp:
        scratch = Path(tmp)
        staged = scratch / target.name
        _copy_zip(src, staged, config_member, text.encode("utf-8"))
        # Unpacked by ESPnet, as espnet_model_zoo does for a model tag: paths into the zip become paths on disk.
        unpack(src, scratch / "plugin", use_cache=False)
        unpack(staged, scratch / "stock", use_cache=False)
        plugin, stock = scratch / "plugin", scratch / "stock"
        verification = verify(task, (_plugin_config(plugin / config_member, scratch), plugin / model_member),
                               (stock / config_member, stock / model_member), scratch)
        os.replace(staged, target)
    return Result([target], dropped, task, verification)


def _packed_model(packed: zipfile.ZipFile) -> Tuple[str, str, Optional[str]]:
    """(config member, model member, task named by meta.yaml's keys) of the pack's s3prl_flashcompat model."""
    names = packed.namelist()
    meta_name = next((name for name in names if Path(name).name == "meta.yaml"), None)  # as unpack() finds it
    if meta_name is None:
        raise Refused("the zip has no meta.yaml: not made by espnet2.bin.pack")
    meta = yaml.safe_load(packed.read(meta_name)) or {}
    frontends, found = {}, []
    for key, path in (meta.get("yaml_files") or {}).items():
        member = _member(names, path)
        data = yaml.safe_load(packed.read(member)) if member else None
        frontends[key] = data.get("frontend") if isinstance(data, dict) else None
        if frontends[key] != KEY:
            continue
        prefix = key[:-len("train_config")] if key.endswith("train_config") else None  # "asr_" or ""
        model_path = (meta.get("files") or {}).get(f"{prefix}model_file") if prefix is not None else None
        model_member = _member(names, model_path)
        if model_member is None:
            raise Refused(f"model file missing: meta.yaml's {prefix}model_file for {key} is "
                          f"{model_path or 'not given'}, and the zip has no such member")
        found.append((member, model_member, prefix.rstrip("_") or None))
    if len(found) != 1:
        listed = ", ".join(f"{key} has frontend: {frontend}" for key, frontend in frontends.items()) or "none listed"
        raise Refused(f"the zip holds {len(found)} configs with frontend: {KEY}, not one ({listed})")
    return found[0]


def _member(names: List[str], path: Optional[str]) -> Optional[str]:
    """The zip member for a meta.yaml path: pack() records absolute paths, zipfile stores them without the '/'."""
    return next((name for name in (path, (path or "").lstrip("/")) if name in names), None) if path else None


def _copy_zip(src: Path, dst: Path, member: str, data: bytes) -> None:
    """Copy ``src`` to ``dst`` member by member, in order, with ``member``'s content replaced by ``data``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        zout.comment = zin.comment
        for info in zin.infolist():
            new = zipfile.ZipInfo(info.filename, info.date_time)
            new.compress_type, new.external_attr, new.comment = info.compress_type, info.external_attr, info.comment
            if info.filename == member:
                zout.writestr(new, data)
                continue
            zip64 = info.file_size > zipfile.ZIP64_LIMIT
            with zin.open(info) as reader, zout.open(new, "w", force_zip64=zip64) as writer:
                shutil.copyfileobj(reader, writer, 1 << 20)


def _task(task: str) -> str:
    if importlib.util.find_spec("espnet2.tasks") is None or importlib.util.find_spec(f"espnet2.tasks.{task}") is None:
        raise Refused(f"--task {task}: ESPnet has no module espnet2.tasks.{task}")
    return task


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise Refused(f"{path} is neither a YAML config nor a zip") from exc


def _scratch(parent: Path) -> tempfile.TemporaryDirectory:
    """Scratch space beside the output, so that the verified files move into place by rename."""
    return tempfile.TemporaryDirectory(prefix=".espnet-flashcompat-", dir=parent)


def _plugin_config(config: Path, scratch: Path) -> Path:
    """The config the plugin side builds: SRC's, with ``strict`` off so that a CPU can build a flash-only model."""
    data = yaml.safe_load(_read(config))
    if not (data.get("frontend_conf") or {}).get("strict"):
        return config
    data["frontend_conf"]["strict"] = False
    relaxed = scratch / "plugin_config.yaml"
    relaxed.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return relaxed


def render(result: Result) -> str:
    """The report ``espnet-flashcompat to-stock`` prints."""
    v = result.verification
    lines = [f"to-stock: wrote {', '.join(map(str, result.written))}",
             f"  config.yaml: frontend {KEY} -> {STOCK_KEY}; dropped from frontend_conf: {_flow(result.dropped)}",
             f"verified with stock ESPnet {v.espnet} ({DISABLE_ENV}=1, task {result.task}, CPU):",
             f"  frontend built: {STOCK_FRONTEND}; espnet_flashcompat.frontend never imported",
             f"  keys matched: {v.keys_matched}/{v.keys_total} (strict)"]
    lines += [f"  {name}: {verdict}" for name, verdict in v.outputs]
    lines.append(f"  plugin side: {v.plugin_attention}")
    return "\n".join(lines)
