"""The human-readable table of an ``espnet-flashcompat doctor`` report (``report.gather()``): text only."""

import textwrap
from typing import Callable, List

from espnet_flashcompat.doctor.findings import at
from espnet_flashcompat.doctor.attention import _BACKENDS, PROBE_DTYPE


_WAVLM_PATHS = {"fused-kernel": "bias inside fused Triton kernels in fp16/bf16, rebuilt for the backward in fp32",
                "efficient-kernel": "bias rebuilt for the backward", "sdpa-with-bias": "bias kept, as stock"}


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
        ("s3prl", f"{s3['distribution']} {s3['version']}" if s3.get("distribution") else "not installed"),
        ("espnet", es["version"] or "not installed"),
    ])
    out.append(f"Devices (policy.decide in {PROBE_DTYPE} on a tiny HF wav2vec2)")
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
    wavlm = report["attention"].get("wavlm") or {}
    if wavlm.get("paths"):
        out.append(f"  S3PRL's own WavLM: {wavlm['auto']} (" + ", ".join(
            f"{dev}: {_WAVLM_PATHS.get(path, path)}" for dev, path in wavlm["paths"].items()) + ")")
    if not any(d["auto"] for d in report["devices"]):
        out.append("  no decision could be made here (see Findings); attn_implementation: auto decides at run time")
    out.append("")

    error = fa["error"]
    section("flash-attn", [
        ("installed", f"yes, {fa['version'] or 'no metadata'} ({fa['location'] or 'location unknown'})"
         if fa["installed"] else "no (optional: SDPA needs none)"),
        ("importable", "yes" if fa["importable"] else f"no: {error['error']}{at(error['where'])}"),
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
        rows += [(f"  {package}", d["error"] + at(d["where"])) for package, d in ups["failed"].items()]
    section("S3PRL", rows)

    by_state = {}
    for module, state in es["tasks"].items():
        by_state.setdefault(state, []).append(module.replace("espnet2.tasks.", ""))
    hook_text = ("not installed" if not hook.get("pth_installed") else
                 f"{hook['pth_file']}{'' if hook.get('pth_current') else ' (stale)'}")
    hook_text += "; disabled by ESPNET_FLASHCOMPAT_DISABLE" if hook.get("disabled_by_env") else ""
    hook_text += "; frontend: s3prl builds ours too (ESPNET_FLASHCOMPAT_REPLACE_S3PRL)" if hook.get("replaces_stock") else ""
    hook_text += f"; armed at startup: {'yes' if hook.get('armed') else 'no'}"
    frontend = es.get("frontend") or {}
    rows = [("frontend class", "imports" if frontend.get("importable") else f"FAILS: {frontend.get('error')}")]
    rows += [("" if i else state, line) for state, modules in sorted(by_state.items())
             for i, line in enumerate(textwrap.wrap(" ".join(modules), 88))]
    section("ESPnet registration of s3prl_flashcompat (espnet2.tasks.* shortened)",
            rows + [("", f"{t}: {e}") for t, e in es["task_errors"].items()] + [("startup hook", hook_text)])

    cal = report["calibration_store"]
    section("Calibration store (auto's timings, reused by later runs)", [
        ("location", cal["location"] or f"off ({cal['env']})"),
        ("entries", f"{cal['entries']}, {cal['this_stack']} for this environment's GPUs and libraries"),
        ("clear", cal["clear"]),
    ])

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
