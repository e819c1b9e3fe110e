"""What state this machine's S3PRL stack is in, as the other modules see it: ``espnet-flashcompat doctor``.

``gather()`` asks ``guard``, ``hub``, ``attention`` and ``registry`` and writes down their answers; it
decides nothing of its own. ``render()`` turns the report into the human table; ``cli`` prints it.

Exit codes (also ``report["exit_code"]``), from the findings' levels:

- **2 broken**, any ``error``: the frontend cannot be built here. S3PRL is unusable (``guard.import_s3prl()``
  raises: s3prl, transformers or torch missing, or an unrecoverable import fault); ESPnet is not installed;
  ``ESPNET_FLASHCOMPAT_ATTN`` holds an invalid value; or the upstream named with ``--upstream`` cannot be
  imported (or is not an S3PRL upstream). Without ``--upstream`` the report checks ``hf_wav2vec2_custom``
  and only warns about it.
- **1 degraded**, any ``degraded`` (and no error): a fallback is in force. flash-attn is installed but
  cannot be imported (``guard.probe_flash_attn()`` or ``import_s3prl()`` met it broken): the guard hides it
  and HF upstreams run on SDPA/eager instead.
- **0 healthy**: nothing a run depends on is broken. ``warning`` findings do not change the code: optional
  upstreams that cannot be imported (``byol_s`` and ``mos_prediction`` on torchaudio >= 2.9), the startup
  hook missing, stale, failed or disabled, a task module without ``s3prl_flashcompat``, an
  ``ESPNET_FLASHCOMPAT_ATTN`` override, transformers not seeing a working flash-attn.

A missing flash-attn is healthy: SDPA needs none. ``quick=True`` (``--quick``) skips the two slow checks,
importing every upstream package (``hub.probe()``: tens of seconds, ``espnet_hubert`` imports ESPnet) and
importing every ESPnet task module; it still imports S3PRL, the ``--upstream`` one and the tiny HF model.

JSON schema, version 1 (``--json``; keys are only ever added within a schema version). A *diagnosis* is
``guard.Diagnosis.as_dict()``: ``{kind, error, where, module, attribute, upstream, path, hint}``::

    schema_version   1
    status           "healthy" | "degraded" | "broken"
    exit_code        0 | 1 | 2
    mode             "full" | "quick"
    package          {version, path}                      espnet-flashcompat itself
    python           {version, executable}
    torch            {version, cuda_build, cuda_available, error}
    devices          [{device, name, capability, backends, auto, auto_contenders}]
                     device "cpu" or "cuda:N"; capability "8.0" or null; each judged in bfloat16 on the tiny
                     HF model by attention.decide: backends = {flash_attention_2|sdpa|eager: {ok, reason}},
                     auto = what attn_implementation auto picks there (null when no decision could be made);
                     auto_contenders = the backends it times on the first batches there ([] when it need not)
    flash_attn       {installed, version, location, importable, error: diagnosis|null,
                      transformers_believes_available: bool|null}   (read before probing)
    transformers     {version}
    s3prl            {version, usable, error: diagnosis|null, recovered: [diagnosis]  (guard.recovered_faults(), less
                      the flash probe's own, which is flash_attn.error: each fault is listed once),
                      upstream: {name, package, ok, error: diagnosis|null}|null,   the --upstream one
                      upstreams: {probed, ok: [package], failed: {package: diagnosis}}}
                      (quick mode: probed false, only the packages imported so far; upstream and
                      upstreams stay null/empty when S3PRL is unusable)
    espnet           {version, installed,
                      tasks: {task: "registered"|"missing"|"absent"|"unchecked"|"error"},
                      task_errors: {task: message}}
                     registered/missing: the task module, imported, does/does not offer s3prl_flashcompat
                     in frontend_choices after registry.register(); absent: not in this ESPnet; error: its
                     import failed; unchecked (--quick): present, registered when it is imported
    startup_hook     registry.hook_state(), taken before doctor calls registry.register()
    attention        {env_override, env_error, decided_on: "cuda:0 bfloat16"|null, implementation: str|null,
                      contenders: [str]}
                     implementation: what auto picks on the GPU of highest compute capability, else the CPU;
                     contenders: what auto times there (then the recommended YAML keeps auto)
    recommended      {frontend, frontend_conf, yaml}     frontend_conf as the YAML nests it
    findings         [{level: "error"|"degraded"|"warning", topic, message, fix}]
"""

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import tempfile
import textwrap
from typing import Callable, Dict, List, Optional

import espnet_flashcompat
from espnet_flashcompat import guard
from espnet_flashcompat.hub import close_names, upstream_of

SCHEMA_VERSION = 1
HEALTHY, DEGRADED, BROKEN = 0, 1, 2
STATUS = {HEALTHY: "healthy", DEGRADED: "degraded", BROKEN: "broken"}
ERROR, FALLBACK, WARNING = "error", "degraded", "warning"  # finding levels
DEFAULT_UPSTREAM = "hf_wav2vec2_custom"
PROBE_DTYPE = "bfloat16"
_BACKENDS = ("flash_attention_2", "sdpa", "eager")  # attention.FLASH, SDPA, EAGER (attention needs torch)
_NEEDS_PATH = ("_custom", "_local", "_url")  # upstreams that load from frontend_conf.path_or_url


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
    report["attention"] = _env_override(add)
    model = _tiny_hf_upstream(add) if report["s3prl"]["usable"] else None
    report["devices"] = _devices(model, report["torch"])
    report["attention"].update(_recommended_decision(report["devices"]))
    report["espnet"] = _espnet(add, quick)
    report["recommended"] = _recommend(upstream or DEFAULT_UPSTREAM, report["attention"])
    _warn_transformers_blind(add, report["flash_attn"])
    report["findings"] = findings
    report["exit_code"] = exit_code(findings)
    report["status"] = STATUS[report["exit_code"]]
    return report


def exit_code(findings: List[dict]) -> int:
    levels = {f["level"] for f in findings}
    return BROKEN if ERROR in levels else DEGRADED if FALLBACK in levels else HEALTHY


# ----------------------------------------------------------------------------------------------- facts


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cause(diagnosis) -> str:
    return diagnosis.error + _at(diagnosis.where)


def _at(where: Optional[str]) -> str:
    return f" (at {where})" if where else ""


def _hook_state(add) -> dict:
    from espnet_flashcompat import registry

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
    info = {"version": _version("s3prl"), "usable": False, "error": None, "recovered": [],
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
            add(FALLBACK, "flash_attn", f"importing S3PRL met a broken flash-attn: {d['error']}{_at(d['where'])}; "
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


def _env_override(add) -> dict:
    info = {"env_override": None, "env_error": None, "decided_on": None, "implementation": None}
    try:
        from espnet_flashcompat import attention

        request, source = attention.requested_backend(attention.AUTO)
    except ValueError as exc:
        info["env_error"] = str(exc)
        add(ERROR, "attention", f"{exc}: every s3prl_flashcompat frontend refuses to build",
            "unset ESPNET_FLASHCOMPAT_ATTN or set it to one of auto, flash_attention_2, sdpa, eager")
        return info
    except ImportError:  # torch missing: the S3PRL section says so
        return info
    if source == "env":
        info["env_override"] = request
        add(WARNING, "attention", f"{attention.ENV_VAR}={request} overrides attn_implementation in every YAML",
            f"unset {attention.ENV_VAR} to let the YAML decide")
    return info


def _tiny_hf_upstream(add):
    """A tiny random HF wav2vec2 built through S3PRL's hf_wav2vec2_custom: the model the decisions are asked for."""
    from espnet_flashcompat.testing import make_tiny_hf_upstream

    try:
        with tempfile.TemporaryDirectory(prefix="espnet_flashcompat_doctor_") as tmp:
            path = make_tiny_hf_upstream(tmp, hidden_size=32, num_layers=1, num_heads=2)
            return guard.import_s3prl().S3PRLUpstream("hf_wav2vec2_custom", path_or_url=str(path))
    except Exception as exc:
        add(WARNING, "attention", f"could not build a tiny hf_wav2vec2_custom upstream to ask attention.decide: "
            f"{guard.one_line(exc)}", "attn_implementation: auto still decides at run time")
        return None


def _devices(model, torch_info: dict) -> List[dict]:
    devices = [{"device": "cpu", "name": "CPU", "capability": None}]
    if torch_info["cuda_available"]:
        import torch

        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            name = torch.cuda.get_device_name(i)
            devices.append({"device": f"cuda:{i}", "name": name, "capability": f"{major}.{minor}"})
    for device in devices:
        device["backends"], device["auto"] = {b: {"ok": None, "reason": None} for b in _BACKENDS}, None
        if model is None:
            continue
        import torch

        from espnet_flashcompat import attention

        where, dtype = torch.device(device["device"]), getattr(torch, PROBE_DTYPE)
        for backend in _BACKENDS:
            decision = attention.decide(backend, model, where, dtype)
            reasons = [r.reason for r in decision.rejected if r.backend == backend]
            device["backends"][backend] = {"ok": decision.implementation == backend,
                                           "reason": reasons[0] if reasons else None}
        auto = attention.decide(attention.AUTO, model, where, dtype)
        device["auto"], device["auto_contenders"] = auto.implementation, list(auto.contenders)
    return devices


def _recommended_decision(devices: List[dict]) -> dict:
    """What auto picks on the GPU of highest compute capability (the first on ties), else on the CPU."""
    gpus = [d for d in devices if d["capability"]]
    best = max(gpus, key=lambda d: tuple(map(int, d["capability"].split(".")))) if gpus else devices[0]
    return {"decided_on": f"{best['device']} {PROBE_DTYPE}" if best["auto"] else None, "implementation": best["auto"],
            "contenders": best.get("auto_contenders", [])}


def _espnet(add, quick: bool) -> dict:
    info = {"version": _version("espnet"), "installed": False, "tasks": {}, "task_errors": {}}
    try:
        info["installed"] = importlib.util.find_spec("espnet2") is not None
    except (ImportError, ValueError):
        pass
    if not info["installed"]:
        add(ERROR, "espnet", "ESPnet is not installed: s3prl_flashcompat is an ESPnet frontend", "pip install espnet")
        return info
    from espnet_flashcompat import registry

    try:
        offered = set(registry.register())
    except Exception as exc:
        info["task_errors"]["*"] = guard.one_line(exc)
        add(WARNING, "registration", f"registry.register() failed: {guard.one_line(exc)}")
        offered = set()
    for task in registry.TASKS:
        info["tasks"][task] = "unchecked" if task in offered else "absent"
        if quick or task not in offered:
            continue
        try:
            module = importlib.import_module(f"espnet2.tasks.{task}")
        except Exception as exc:
            info["tasks"][task], info["task_errors"][task] = "error", guard.one_line(exc)
            continue
        classes = getattr(getattr(module, "frontend_choices", None), "classes", {})
        info["tasks"][task] = "registered" if registry.KEY in classes else "missing"
        if info["tasks"][task] == "missing":
            info["task_errors"][task] = registry.hook_state()["not_registered"].get(task, "")
    missing = [t for t, s in info["tasks"].items() if s in ("missing", "error")]
    if missing:
        add(WARNING, "registration", f"frontend '{registry.KEY}' is not offered by task(s) {', '.join(missing)}: "
            + "; ".join(f"{t}: {info['task_errors'].get(t) or 'no reason given'}" for t in missing))
    return info


def _recommend(upstream: str, attention_info: dict) -> dict:
    inner = {"upstream": upstream}
    if upstream.endswith(_NEEDS_PATH):
        inner["path_or_url"] = "<HF model directory or hub id>"
    implementation = attention_info["implementation"]
    comment = f"what auto picks on {attention_info['decided_on']}" if implementation else "decided at run time"
    if attention_info.get("contenders"):  # several healthy backends: auto measures them, so keep auto
        implementation = None
        comment = (f"on {attention_info['decided_on']} auto times {'/'.join(attention_info['contenders'])} "
                   "on the first batches and keeps the faster")
    conf = {"frontend_conf": inner, "download_dir": "./hub", "multilayer_feature": True,
            "attn_implementation": implementation or "auto"}
    lines = ["frontend: s3prl_flashcompat", "frontend_conf:", "  frontend_conf:"]
    lines += [f"    {k}: {v}" for k, v in inner.items()]
    lines += ["  download_dir: ./hub", "  multilayer_feature: true",
              f"  attn_implementation: {conf['attn_implementation']}  # {comment}"]
    return {"frontend": "s3prl_flashcompat", "frontend_conf": conf, "yaml": "\n".join(lines)}


def _warn_transformers_blind(add, flash: dict) -> None:
    if flash["importable"] and flash["transformers_believes_available"] is False:
        add(WARNING, "flash_attn", "flash-attn imports, but transformers.utils.is_flash_attn_2_available() is False: "
            "transformers will refuse flash_attention_2", "check transformers' flash-attn version requirement and CUDA")


# ------------------------------------------------------------------------------------------ human text


def render(report: dict) -> str:
    """The human-readable table of a report from ``gather()``."""
    out: List[str] = [f"espnet-flashcompat doctor {report['package']['version']} ({report['mode']} check)", ""]
    section = _section(out)
    t, fa, s3, es, hook = (report[k] for k in ("torch", "flash_attn", "s3prl", "espnet", "startup_hook"))

    section("Environment", [
        ("python", f"{report['python']['version']} ({report['python']['executable']})"),
        ("espnet-flashcompat", f"{report['package']['version']} ({report['package']['path']})"),
        ("torch", t["error"] or f"{t['version']} (CUDA build {t['cuda_build'] or 'none'}; "
                                f"CUDA {'available' if t['cuda_available'] else 'not available'})"),
        ("transformers", report["transformers"]["version"] or "not installed"),
        ("s3prl", s3["version"] or "not installed"),
        ("espnet", es["version"] or "not installed"),
    ])
    out.append(f"Devices (attention.decide in {PROBE_DTYPE} on a tiny HF wav2vec2)")
    rows = [("", "name", *_BACKENDS, "auto")] + [
        (d["device"], d["name"] + (f" (sm_{d['capability'].replace('.', '')})" if d["capability"] else ""),
         *(_yes_no(d["backends"][b]["ok"]) for b in _BACKENDS), d["auto"] or "-") for d in report["devices"]]
    out += _table(rows)
    reasons = {}
    for d in report["devices"]:
        for backend, verdict in d["backends"].items():
            if verdict["reason"]:
                reasons.setdefault((backend, verdict["reason"]), []).append(d["device"])
    out += [f"  {backend} on {', '.join(devs)}: {reason}" for (backend, reason), devs in reasons.items()]
    if not any(d["auto"] for d in report["devices"]):
        out.append("  no decision could be made here (see Findings); attn_implementation: auto decides at run time")
    out.append("")

    error = fa["error"]
    section("flash-attn", [
        ("installed", f"yes, {fa['version'] or 'no metadata'} ({fa['location'] or 'location unknown'})"
         if fa["installed"] else "no (optional: SDPA needs none)"),
        ("importable", "yes" if fa["importable"] else f"no: {error['error']}{_at(error['where'])}"),
        ("transformers sees", {True: "available", False: "not available", None: "unknown"}[
            fa["transformers_believes_available"]] + " (is_flash_attn_2_available, read before probing)"),
    ] + ([("fix", error["hint"])] if fa["installed"] and error else []))

    ups, named = s3["upstreams"], s3["upstream"]
    rows = [("import_s3prl()", "ok" if s3["usable"] else f"FAILS: {s3['error']['error']}")]
    if not s3["usable"] and s3["error"].get("hint"):
        rows.append(("fix", s3["error"]["hint"]))
    rows += [("recovered", f"{d['kind']}: {d['error']}") for d in s3["recovered"]]
    if named:
        rows.append((f"upstream {named['name']}", "imports" if named["ok"] else f"FAILS: {named['error']['error']}"))
    if s3["usable"]:
        tried = len(ups["ok"]) + len(ups["failed"])
        scope = "upstream packages import" if ups["probed"] else "packages tried so far import (--quick)"
        rows.append(("upstreams", f"{len(ups['ok'])} of {tried} {scope}"))
        rows += [("  ok" if i == 0 else "", line) for i, line in enumerate(textwrap.wrap(", ".join(ups["ok"]), 88))]
        rows += [(f"  {package}", d["error"] + _at(d["where"])) for package, d in ups["failed"].items()]
    section("S3PRL", rows)

    tasks = es["tasks"]
    by_state = {}
    for task, state in tasks.items():
        by_state.setdefault(state, []).append(task)
    hook_text = ("not installed" if not hook.get("pth_installed") else
                 f"{hook['pth_file']}{'' if hook.get('pth_current') else ' (stale)'}")
    hook_text += "; disabled by ESPNET_FLASHCOMPAT_DISABLE" if hook.get("disabled_by_env") else ""
    hook_text += f"; armed at startup: {'yes' if hook.get('armed') else 'no'}"
    section("ESPnet registration of s3prl_flashcompat", [(state, " ".join(ts)) for state, ts in by_state.items()]
            + [("", f"{t}: {e}") for t, e in es["task_errors"].items()] + [("startup hook", hook_text)])

    att = report["attention"]
    if att["env_override"]:
        out.append(f"ESPNET_FLASHCOMPAT_ATTN={att['env_override']} overrides the YAML below.")
    out.append("Recommended YAML")
    out += ["  " + line for line in report["recommended"]["yaml"].splitlines()]
    out.append("")

    out.append("Findings")
    for f in report["findings"]:
        out.append(f"  {f['level'].upper():8} {f['message']}")
        if f["fix"]:
            out.append(f"  {'':8} Fix: {f['fix']}")
    if not report["findings"]:
        out.append("  none")
    out += ["", f"Status: {report['status']} (exit {report['exit_code']})"]
    return "\n".join(out)


def _section(out: List[str]) -> Callable:
    def section(title, rows):
        out.append(title)
        out.extend(_table(rows))
        out.append("")
    return section


def _table(rows) -> List[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)] if rows else []
    return ["  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths + [0])).rstrip() for r in rows]


def _yes_no(ok) -> str:
    return {True: "yes", False: "no", None: "?"}[ok]
