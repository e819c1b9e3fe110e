"""The attention part of ``espnet-flashcompat doctor``: what the policies decide on each visible device.

For the S3PRL frontend, ``policy.decide`` is asked, per device in bfloat16, about a tiny random HF wav2vec2 built
through S3PRL (each backend forced, and ``auto``); for ESPnet's own attention, ``model_attention.doctor_state()``.
Also the ``ESPNET_FLASHCOMPAT_ATTN`` override and the frontend YAML to recommend. Reports only: each function
writes down an answer and adds findings through ``report``'s ``add``, at the levels of ``findings``.
"""

import tempfile
from typing import List

from espnet_flashcompat.s3prl import guard
from espnet_flashcompat.doctor.findings import ERROR, WARNING

PROBE_DTYPE = "bfloat16"
_BACKENDS = ("flash_attention_2", "sdpa", "eager")  # policy.FLASH, SDPA, EAGER (attention needs torch)
_NEEDS_PATH = ("_custom", "_local", "_url")  # upstreams that load from frontend_conf.path_or_url


def env_override(add) -> dict:
    info = {"env_override": None, "env_error": None, "decided_on": None, "implementation": None}
    try:
        from espnet_flashcompat.attention import policy

        request, source = policy.requested_backend(policy.AUTO)
    except ValueError as exc:
        info["env_error"] = str(exc)
        add(ERROR, "attention", f"{exc}: every s3prl_flashcompat frontend refuses to build",
            "unset ESPNET_FLASHCOMPAT_ATTN or set it to one of auto, flash_attention_2, sdpa, eager")
        return info
    except ImportError:  # torch missing: the S3PRL section says so
        return info
    if source == "env":
        info["env_override"] = request
        add(WARNING, "attention", f"{policy.ENV_VAR}={request} overrides attn_implementation in every YAML",
            f"unset {policy.ENV_VAR} to let the YAML decide")
    return info


def tiny_hf_upstream(add):
    """A tiny random HF wav2vec2 built through S3PRL's hf_wav2vec2_custom: the model the decisions are asked for."""
    from espnet_flashcompat.testing import make_tiny_hf_upstream

    try:
        with tempfile.TemporaryDirectory(prefix="espnet_flashcompat_doctor_") as tmp:
            path = make_tiny_hf_upstream(tmp, hidden_size=32, num_layers=1, num_heads=2)
            return guard.import_s3prl().S3PRLUpstream("hf_wav2vec2_custom", path_or_url=str(path))
    except Exception as exc:
        add(WARNING, "attention", f"could not build a tiny hf_wav2vec2_custom upstream to ask policy.decide: "
            f"{guard.one_line(exc)}", "attn_implementation: auto still decides at run time")
        return None


def devices(model, torch_info: dict) -> List[dict]:
    devices = [{"device": "cpu", "name": "CPU", "capability": None}]
    if torch_info["cuda_available"] or model is not None:  # either means torch imports
        import torch

        from espnet_flashcompat.attention import policy
    if torch_info["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            name = torch.cuda.get_device_name(i)
            devices.append({"device": f"cuda:{i}", "name": name, "capability": f"{major}.{minor}"})
    for device in devices:
        device["backends"], device["auto"] = {b: {"ok": None, "reason": None} for b in _BACKENDS}, None
        if model is None:
            continue
        where, dtype = torch.device(device["device"]), getattr(torch, PROBE_DTYPE)
        for backend in _BACKENDS:
            decision = policy.decide(backend, model, where, dtype)
            reasons = [r.reason for r in decision.rejected if r.backend == backend]
            device["backends"][backend] = {"ok": decision.implementation == backend,
                                           "reason": reasons[0] if reasons else None}
        auto = policy.decide(policy.AUTO, model, where, dtype)
        device["auto"], device["auto_contenders"] = auto.implementation, list(auto.contenders)
    return devices


def wavlm(devices: List[dict]) -> dict:
    """What S3PRL's own WavLM runs under auto on each device: its lean path, and there in fp16/bf16 the path
    ``wavlm_kernel.path_on`` names (fused Triton kernels, the bias rebuilt for the backward, or kept); ``triton``: why
    the fused kernels cannot run, or None."""
    try:
        from espnet_flashcompat.attention import policy, wavlm_fused, wavlm_kernel
    except Exception as exc:  # torch missing: its own section says why
        return {"error": guard.one_line(exc)}
    paths = {d["device"]: wavlm_kernel.path_on(d["device"]) for d in devices}
    return {"auto": policy.WAVLM_LEAN, "paths": paths, "triton": wavlm_fused.available()}


def model_attention(add, devices: List[dict]) -> dict:
    """The opt-in model-wide policy for ESPnet's own attention: ESPNET_FLASHCOMPAT_MODEL_ATTN, and its decisions."""
    try:
        from espnet_flashcompat.espnet import model_attention, optin

        state = model_attention.doctor_state([d["device"] for d in devices])
        state["tasks_wrapped"] = sorted(optin.wrapped_tasks())
    except Exception as exc:  # torch or ESPnet missing: their own sections say why
        return {"error": guard.one_line(exc)}
    if state["env_error"]:
        add(ERROR, "model_attention", f"{state['env_error']}: every ESPnet model build refuses it",
            f"unset {optin.ENV_VAR} or set it to one of {', '.join(optin.CHOICES)}")
    elif state["opted_in_by_env"]:
        add(WARNING, "model_attention", f"{optin.ENV_VAR}={state['env']} puts the attention of every ESPnet model "
            f"built here under the policy (requested {state['requested']}), whatever the YAML says",
            f"unset {optin.ENV_VAR} for ESPnet's stock attention, or use {optin.OPTION} in the YAML")
    return state


def recommended_decision(devices: List[dict]) -> dict:
    """What auto picks on the GPU of highest compute capability (the first on ties), else on the CPU."""
    gpus = [d for d in devices if d["capability"]]
    best = max(gpus, key=lambda d: tuple(map(int, d["capability"].split(".")))) if gpus else devices[0]
    return {"decided_on": f"{best['device']} {PROBE_DTYPE}" if best["auto"] else None, "implementation": best["auto"],
            "contenders": best.get("auto_contenders", [])}


def recommend(upstream: str, attention_info: dict) -> dict:
    inner = {"upstream": upstream}
    if upstream.endswith(_NEEDS_PATH):
        inner["path_or_url"] = "<HF model directory or hub id>"
    implementation = attention_info["implementation"]
    comment = f"what auto picks on {attention_info['decided_on']}" if implementation else "decided at run time"
    if attention_info.get("contenders"):  # several healthy backends: auto measures them, so keep auto
        implementation = None
        comment = (f"on {attention_info['decided_on']} auto times {'/'.join(attention_info['contenders'])} "
                   "on the first batches and keeps the fastest")
    conf = {"frontend_conf": inner, "download_dir": "./hub", "multilayer_feature": True,
            "attn_implementation": implementation or "auto"}
    lines = ["frontend: s3prl_flashcompat", "frontend_conf:", "  frontend_conf:"]
    lines += [f"    {k}: {v}" for k, v in inner.items()]
    lines += ["  download_dir: ./hub", "  multilayer_feature: true",
              f"  attn_implementation: {conf['attn_implementation']}  # {comment}"]
    return {"frontend": "s3prl_flashcompat", "frontend_conf": conf, "yaml": "\n".join(lines)}


def calibration_store(devices: List[dict]) -> dict:
    """Where ``auto`` keeps its calibrations, how many there are, and how many match this environment's stack on
    one of its devices (those a run here would reuse)."""
    from espnet_flashcompat.attention import calibration_key, store

    location, records = store.location(), store.entries()
    stacks = [calibration_key.stack(d["device"]) for d in devices if d["capability"]]
    mine = [r for r in records if any(all(r.key.fields()[k] == v for k, v in s.items()) for s in stacks)]
    return {"location": str(location) if location else None, "env": store.ENV_VAR, "entries": len(records),
            "this_stack": len(mine), "clear": "espnet-flashcompat calibrations --clear"}
