"""What state this environment's S3PRL stack is in, as the other modules see it: ``espnet-flashcompat doctor``.

``gather()`` asks ``guard``, ``hub``, ``registry`` and ``espnet_compat`` (and, through ``doctor.attention``,
the attention ``policy`` and ``model_attention``) and writes down their answers; it decides nothing of its own.
``text.render()`` turns the report into the human table.

Its exit codes and its JSON schema (``SCHEMA_VERSION``): ``docs/doctor.md``, which every change to the report
keeps in step.
"""

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from typing import Dict, List, Optional

import espnet_flashcompat
from espnet_flashcompat.doctor.findings import (  # noqa: F401  (the levels and codes are part of the report's API)
    BROKEN, DEGRADED, ERROR, FALLBACK, HEALTHY, STATUS, WARNING, at, exit_code)
from espnet_flashcompat.s3prl import guard
from espnet_flashcompat.s3prl.hub import close_names, upstream_of

SCHEMA_VERSION = 2
DEFAULT_UPSTREAM = "hf_wav2vec2_custom"


def gather(quick: bool = False, upstream: Optional[str] = None) -> dict:
    """The report (see the module docstring). Imports S3PRL and probes flash-attn in this process."""
    report = {"schema_version": SCHEMA_VERSION, "status": None, "exit_code": None, "mode": "quick" if quick else "full"}
    findings: List[dict] = []
    add = lambda level, topic, message, fix="": findings.append(  # noqa: E731
        {"level": level, "topic": topic, "message": message, "fix": fix})
    package_dir = os.path.dirname(espnet_flashcompat.__file__)
    report["package"] = {"version": espnet_flashcompat.__version__, "path": package_dir}
    report["python"] = {"version": sys.version.split()[0], "executable": sys.executable}
    report["startup_hook"] = _hook_state(add)
    report["transformers"] = {"version": _version("transformers")}
    report["flash_attn"] = _flash_attn(add)
    report["torch"] = _torch()
    report["s3prl"] = _s3prl(add, quick, upstream, probed=report["flash_attn"]["error"])
    from espnet_flashcompat.doctor import attention

    report["attention"] = attention.env_override(add)
    model = attention.tiny_hf_upstream(add) if report["s3prl"]["usable"] else None
    report["devices"] = attention.devices(model, report["torch"])
    report["attention"].update(attention.recommended_decision(report["devices"]))
    report["attention"]["wavlm"] = attention.wavlm(report["devices"])
    report["model_attention"] = attention.model_attention(add, report["devices"])
    report["calibration_store"] = attention.calibration_store(report["devices"])
    report["espnet"] = _espnet(add, quick)
    report["recommended"] = attention.recommend(upstream or DEFAULT_UPSTREAM, report["attention"])
    _warn_transformers_blind(add, report["flash_attn"])
    report["findings"] = findings
    report["exit_code"] = exit_code(findings)
    report["status"] = STATUS[report["exit_code"]]
    return report


# ----------------------------------------------------------------------------------------------- facts


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cause(diagnosis) -> str:
    return diagnosis.error + at(diagnosis.where)


def _hook_state(add) -> dict:
    from espnet_flashcompat.espnet import registry

    state = registry.hook_state()
    fix = "install the package (pip install . or pip install -e . in its checkout): it puts the .pth into site-packages"
    if state.get("disabled_by_env"):
        add(WARNING, "startup_hook", f"the startup hook is disabled by {registry.DISABLE_ENV}: stock entry points "
            f"(python -m espnet2.bin.asr_train) do not know frontend '{registry.KEY}'",
            f"unset {registry.DISABLE_ENV}, or call espnet_flashcompat.register() before building a task")
    elif not state.get("pth_installed"):
        add(WARNING, "startup_hook", f"the startup hook ({registry.PTH_NAME}) is not installed: stock entry points "
            f"(python -m espnet2.bin.asr_train) do not know frontend '{registry.KEY}'", fix)
    elif not state.get("pth_current"):
        add(WARNING, "startup_hook", f"{state['pth_file']} is not this version's startup hook", fix)
    if state.get("startup_error"):
        add(WARNING, "startup_hook", f"the startup hook failed: {state['startup_error']}", fix)
    return state


def _flash_attn(add) -> dict:
    """Installation facts and transformers' belief first (probing hides a broken flash-attn), then the probe."""
    info = {"installed": False, "version": _version("flash-attn"), "location": None, "importable": False,
            "error": None, "transformers_believes_available": None}
    try:
        spec = importlib.util.find_spec("flash_attn")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        info["location"] = list(spec.submodule_search_locations)[0]
    info["installed"] = info["version"] is not None or spec is not None
    try:
        from transformers.utils import is_flash_attn_2_available

        info["transformers_believes_available"] = bool(is_flash_attn_2_available())
    except Exception:  # transformers missing or broken: the S3PRL section says why
        pass
    diagnosis = guard.probe_flash_attn()
    info["importable"] = diagnosis is None
    info["error"] = diagnosis.as_dict() if diagnosis is not None else None
    if diagnosis is not None and info["installed"]:
        add(FALLBACK, "flash_attn", f"flash-attn {info['version'] or ''} is installed but broken: {diagnosis.error}; "
            "HF upstreams fall back to SDPA", diagnosis.hint)
    return info


def _torch() -> dict:
    info = {"version": _version("torch"), "cuda_build": None, "cuda_available": False, "error": None}
    try:
        import torch
    except Exception as exc:
        info["error"] = guard.one_line(exc)
        return info
    info.update(version=torch.__version__, cuda_build=torch.version.cuda, cuda_available=torch.cuda.is_available())
    return info


def _s3prl(add, quick: bool, upstream: Optional[str], probed: Optional[dict]) -> dict:
    """``probed``: the flash probe's diagnosis. Probing hides a broken flash-attn and so records it in
    ``guard.recovered_faults()`` too; ``recovered`` leaves it out, keeping the faults import_s3prl() met."""
    from espnet_flashcompat.espnet.espnet_compat import s3prl_distribution

    distribution, version = s3prl_distribution() or (None, None)
    info = {"distribution": distribution, "version": version, "usable": False, "error": None, "recovered": [],
            "upstream": None, "upstreams": {"probed": False, "ok": [], "failed": {}}}
    try:
        s3prl = guard.import_s3prl()
    except guard.S3PRLImportError as exc:
        info["error"] = exc.diagnosis.as_dict()
        add(ERROR, "s3prl", f"S3PRL cannot be imported: {_cause(exc.diagnosis)}", exc.diagnosis.hint)
        return info
    finally:
        info["recovered"] = [d.as_dict() for d in guard.recovered_faults() if d.as_dict() != probed]
        for d in info["recovered"]:  # the probe imported flash-attn's kernels, but S3PRL's import met it broken
            add(FALLBACK, "flash_attn", f"importing S3PRL met a broken flash-attn: {d['error']}{at(d['where'])}; "
                "it is hidden and HF upstreams fall back to SDPA", d["hint"])
    info["usable"] = True
    hub = s3prl.hub
    info["upstream"] = _named_upstream(add, hub, upstream or DEFAULT_UPSTREAM, required=upstream is not None)
    if not quick and hasattr(hub, "probe"):
        results = hub.probe()
    else:
        results = _imported_so_far(hub)
    info["upstreams"] = {
        "probed": not quick,
        "ok": sorted(p for p, exc in results.items() if exc is None),
        "failed": {p: exc.diagnosis.as_dict() for p, exc in sorted(results.items()) if exc is not None},
    }
    for package, exc in sorted(results.items()):
        if exc is not None and package != info["upstream"]["package"]:
            add(WARNING, "upstream", f"upstream '{package}' cannot be imported: {exc.diagnosis.error}",
                exc.diagnosis.hint)
    return info


def _named_upstream(add, hub, name: str, required: bool) -> dict:
    module = hub.module_of(name) if hasattr(hub, "module_of") else None
    info = {"name": name, "package": upstream_of(module) if module else None, "ok": False, "error": None}
    try:
        getattr(hub, name)
        info["ok"] = True
    except guard.S3PRLImportError as exc:
        info["error"] = exc.diagnosis.as_dict()
        add(ERROR if required else WARNING, "upstream",
            f"upstream '{name}' cannot be imported: {_cause(exc.diagnosis)}", exc.diagnosis.hint)
    except AttributeError:
        close = close_names(hub, name)
        hint = f"did you mean: {', '.join(close)}?" if close else "see `espnet-flashcompat doctor` for the upstreams"
        info["error"] = guard.Diagnosis(guard.OTHER, f"{name!r} is not an S3PRL upstream", hint=hint).as_dict()
        add(ERROR if required else WARNING, "upstream", info["error"]["error"], hint)
    return info


def _imported_so_far(hub) -> Dict[str, Optional[guard.S3PRLImportError]]:
    """Upstream package -> error, for the hubconf modules this process has tried (quick mode)."""
    results = {}
    for name, module in sorted(sys.modules.items()):
        if name.startswith("s3prl.upstream.") and name.endswith(".hubconf") and module is not None:
            results[upstream_of(name)] = None
    if hasattr(hub, "unavailable"):
        for name, exc in hub.unavailable().items():
            results[exc.diagnosis.upstream or upstream_of(hub.module_of(name))] = exc
    return results


def _espnet(add, quick: bool) -> dict:
    """Our frontend class imports, and which ESPnet task modules offer it (espnet2 tasks and ESPnet3 systems)."""
    info = {"version": _version("espnet"), "installed": False, "frontend": {"importable": False, "error": None},
            "tasks": {}, "task_errors": {}}
    try:
        info["installed"] = importlib.util.find_spec("espnet2") is not None
    except (ImportError, ValueError):
        pass
    if not info["installed"]:
        add(ERROR, "espnet", "ESPnet is not installed: s3prl_flashcompat is an ESPnet frontend", "pip install espnet")
        return info
    from espnet_flashcompat.espnet import espnet_compat, registry

    try:
        importlib.import_module(registry.FRONTEND.partition(":")[0])
        info["frontend"]["importable"] = True
    except Exception as exc:
        info["frontend"]["error"] = guard.one_line(exc)
        add(ERROR, "frontend", f"{registry.FRONTEND} cannot be imported: {guard.one_line(exc)}; every "
            f"frontend: {registry.KEY} raises it when built", "read the error; `pip install -U espnet-flashcompat`")
    try:
        registry.register()
    except Exception as exc:
        info["task_errors"]["*"] = guard.one_line(exc)
        add(ERROR, "registration", f"registry.register() failed: {guard.one_line(exc)}")
    for module, _ in espnet_compat.task_module_files():
        if quick and module not in sys.modules:
            info["tasks"][module] = "unchecked"
            continue
        try:
            info["tasks"][module] = _offers(importlib.import_module(module), registry)
        except Exception as exc:
            info["tasks"][module], info["task_errors"][module] = "error", guard.one_line(exc)
    states = set(info["tasks"].values())
    failed = {**registry.hook_state()["failed"], **info["task_errors"]}
    if not info["tasks"]:
        add(ERROR, "registration", f"no ESPnet task module found under {', '.join(espnet_compat.TASK_PACKAGES)}")
    elif not quick and "registered" not in states:
        add(ERROR, "registration", f"no installed ESPnet task offers frontend '{registry.KEY}'"
            + (": " + "; ".join(f"{m}: {e}" for m, e in failed.items()) if failed else ""))
    problems = [m for m, state in info["tasks"].items() if state in ("missing", "error")]
    if problems:
        add(WARNING, "registration", f"these task modules cannot be checked or lack '{registry.KEY}': "
            + "; ".join(f"{m}: {failed.get(m) or info['tasks'][m]}" for m in problems))
    return info


def _offers(module, registry) -> str:
    """registered | missing (it offers s3prl, not our key) | no-s3prl (its frontend choices have no S3PRL)."""
    from espnet2.asr.frontend.s3prl import S3prlFrontend

    choices = [v for v in vars(module).values() if isinstance(getattr(v, "classes", None), dict)]
    offering = [c for c in choices if c.classes.get(registry.STOCK_KEY) is S3prlFrontend or registry.KEY in c.classes]
    if not offering:
        return "no-s3prl"
    return "registered" if all(registry.KEY in c.classes for c in offering) else "missing"


def _warn_transformers_blind(add, flash: dict) -> None:
    if flash["importable"] and flash["transformers_believes_available"] is False:
        add(WARNING, "flash_attn", "flash-attn imports, but transformers.utils.is_flash_attn_2_available() is False: "
            "transformers will refuse flash_attention_2", "check transformers' flash-attn version requirement and CUDA")
