"""``espnet-flashcompat doctor``: exit code, explanation and JSON schema on the real stack and real broken installs.

Each scenario runs the real command in a fresh interpreter. Both stacks are healthy for us: on the legacy one
(s3prl 0.4.18) byol_s and mos_prediction cannot be imported on torchaudio >= 2.9, which doctor names; on the
current one (espnet-s3prl) every upstream imports.
"""

import json
import os
import shutil
import sys

import pytest

from espnet_flashcompat.doctor.text import render
from faults import run
from stacks import S3PRL_DIST, STACK, TORCHAUDIO_BREAKS_STOCK, only_on

DOCTOR = [sys.executable, "-m", "espnet_flashcompat", "doctor"]
STALE = "not properly installed"
TOP_KEYS = {"schema_version", "status", "exit_code", "mode", "package", "python", "torch", "devices", "flash_attn",
            "transformers", "s3prl", "espnet", "startup_hook", "attention", "recommended", "findings", "model_attention",
            "calibration_store"}
BACKENDS = {"flash_attention_2", "sdpa", "eager"}


def _doctor(*args, expect, **kwargs):
    proc = run([*DOCTOR, *args], **kwargs)
    assert proc.returncode == expect, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert STALE not in proc.stdout + proc.stderr
    return proc


def _report(*args, expect, **kwargs):
    proc = _doctor("--json", *args, expect=expect, **kwargs)
    report = json.loads(proc.stdout)  # stdout holds the JSON alone: library noise is held back
    assert report["exit_code"] == expect
    return report


def _levels(report, topic):
    return [f["level"] for f in report["findings"] if f["topic"] == topic]


@pytest.mark.slow
def test_stock_stack_is_healthy_and_names_what_is_broken():
    report = _report(expect=0)
    assert set(report) == TOP_KEYS and report["schema_version"] == 2
    assert report["status"] == "healthy" and report["mode"] == "full"
    assert {f["level"] for f in report["findings"]} <= {"warning"}
    s3prl = report["s3prl"]
    assert s3prl["distribution"] == S3PRL_DIST and s3prl["version"]
    assert s3prl["usable"] and s3prl["error"] is None and s3prl["recovered"] == []
    assert s3prl["upstream"] == {"name": "hf_wav2vec2_custom", "package": "hf_wav2vec2", "ok": True, "error": None}
    ups = s3prl["upstreams"]
    assert ups["probed"] and {"hf_wav2vec2", "hubert", "wavlm", "wav2vec2"} <= set(ups["ok"])
    assert set(ups["failed"]).isdisjoint(ups["ok"]) and len(ups["ok"]) + len(ups["failed"]) > 30
    if TORCHAUDIO_BREAKS_STOCK:
        byol_s = ups["failed"]["byol_s"]
        assert byol_s["kind"] == "upstream_dependency" and "set_audio_backend" in byol_s["error"]
        assert byol_s["module"] == "torchaudio" and byol_s["attribute"] == "set_audio_backend"
        assert any("byol_s" in f["message"] and "set_audio_backend" in f["message"] for f in report["findings"])
    else:  # espnet-s3prl fixed it
        assert ups["failed"] == {} and "byol_s" in ups["ok"]
    tasks = report["espnet"]["tasks"]
    assert report["espnet"]["frontend"] == {"importable": True, "error": None}
    offering = {"asr", "st", "slu", "s2t", "diar", "enh_s2t", "spk", "cls", "lid", "asvspoof", "s2st", "uasr"}
    offering |= {"aqa"} if STACK == "current" else set()
    assert {m.replace("espnet2.tasks.", "") for m, state in tasks.items() if state == "registered"} >= offering
    assert tasks["espnet2.tasks.mt"] == "no-s3prl"
    if STACK == "current":
        assert tasks["espnet3.systems.esp2_asr.task"] == "registered"
    assert set(tasks.values()) <= {"registered", "no-s3prl"}
    assert report["flash_attn"]["installed"] is False and report["flash_attn"]["importable"] is False
    cpu = report["devices"][0]
    assert cpu["device"] == "cpu" and set(cpu["backends"]) == BACKENDS and cpu["auto"] == "sdpa"
    assert cpu["backends"]["sdpa"] == {"ok": True, "reason": None}
    assert not cpu["backends"]["flash_attention_2"]["ok"] and cpu["backends"]["flash_attention_2"]["reason"]
    assert report["attention"]["implementation"] == "sdpa"
    assert report["recommended"]["frontend_conf"]["attn_implementation"] == "sdpa"
    assert "frontend: s3prl_flashcompat" in report["recommended"]["yaml"]
    from espnet_flashcompat.attention import wavlm_fused

    assert report["attention"]["wavlm"] == {"auto": "wavlm-lean", "paths": {"cpu": "sdpa-with-bias"},
                                            "triton": wavlm_fused.available()}
    store = report["calibration_store"]  # the tests' own store (conftest), empty: no GPU calibrated
    assert store["location"] == os.environ["ESPNET_FLASHCOMPAT_CALIBRATION_DIR"] and store["entries"] == 0
    assert store["this_stack"] == 0 and "calibrations --clear" in store["clear"]
    text = render(report)
    assert f"{S3PRL_DIST} {s3prl['version']}" in text and text.endswith("Status: healthy (exit 0)")
    assert ("set_audio_backend" in text) == TORCHAUDIO_BREAKS_STOCK


@pytest.mark.slow
def test_human_table_of_a_healthy_stack():
    out = _doctor("--quick", expect=0).stdout
    for heading in ("Environment", "Devices", "flash-attn", "S3PRL", "ESPnet registration", "Calibration store",
                    "Recommended YAML", "Findings"):
        assert f"\n{heading}" in out
    assert "attn_implementation: sdpa" in out and "upstream hf_wav2vec2_custom  imports" in out
    assert "S3PRL's own WavLM: wavlm-lean (cpu: bias kept, as stock)" in out
    assert out.rstrip().endswith("Status: healthy (exit 0)")


@pytest.mark.slow
@pytest.mark.parametrize("fixture,cause", [
    ("broken_flash_attn", "No module named 'flash_attn_2_cuda'"),
    ("undefined_symbol_flash_attn", "undefined symbol"),
])
def test_broken_flash_attn_is_degraded(request, fixture, cause):
    flash = request.getfixturevalue(fixture)
    report = _report("--quick", expect=1, pythonpath=[flash])
    fa = report["flash_attn"]
    assert fa["installed"] and fa["version"] == "2.8.3.post2" and not fa["importable"]
    assert fa["location"] == str(flash / "flash_attn")
    assert cause in fa["error"]["error"] and fa["error"]["kind"] == "flash_attn"
    assert report["status"] == "degraded" and _levels(report, "flash_attn") == ["degraded"]
    assert report["s3prl"]["usable"] and report["devices"][0]["auto"] == "sdpa"
    assert report["s3prl"]["recovered"] == []  # listed once, as flash_attn.error
    assert cause in report["devices"][0]["backends"]["flash_attention_2"]["reason"]
    text = render(report)
    assert "flash_attn_2_cuda" in text and "DEGRADED flash-attn 2.8.3.post2 is installed but broken" in text
    assert text.endswith("Status: degraded (exit 1)")


@pytest.mark.slow
def test_transformers_4_46_belief_is_read_before_the_probe_hides_flash_attn(old_transformers, broken_flash_attn):
    """transformers 4.46 with fake CUDA believes the broken flash-attn is available; doctor shows that, then why not."""
    report = _report("--quick", expect=1, pythonpath=[old_transformers, broken_flash_attn], fake_cuda=True)
    assert report["transformers"]["version"] == "4.46.3" and report["torch"]["cuda_available"]
    fa = report["flash_attn"]
    assert fa["transformers_believes_available"] is True and not fa["importable"]
    assert "flash_attn_2_cuda" in fa["error"]["error"]


def test_missing_s3prl_is_broken():
    report = _report("--quick", expect=2, block=["s3prl"])
    s3prl = report["s3prl"]
    assert not s3prl["usable"] and s3prl["upstream"] is None
    assert s3prl["error"]["kind"] == "not_installed" and "No module named 's3prl'" in s3prl["error"]["error"]
    assert _levels(report, "s3prl") == ["error"] and report["status"] == "broken"
    assert report["recommended"]["frontend_conf"]["attn_implementation"] == "auto"
    text = render(report)
    assert "No module named 's3prl'" in text and f"pip install {S3PRL_DIST} (the S3PRL distribution" in text
    assert text.endswith("Status: broken (exit 2)")


@pytest.mark.slow
def test_missing_espnet_is_broken():
    report = _report("--quick", expect=2, block=["espnet", "espnet2"])
    assert report["s3prl"]["usable"] and not report["espnet"]["installed"]
    assert _levels(report, "espnet") == ["error"]


@pytest.mark.slow
def test_an_unimportable_frontend_is_broken():
    report = _report("--quick", expect=2, block=["espnet_flashcompat.frontend"])
    assert report["espnet"]["frontend"]["importable"] is False
    assert "No module named 'espnet_flashcompat.frontend'" in report["espnet"]["frontend"]["error"]
    assert _levels(report, "frontend") == ["error"]


@pytest.mark.slow
@only_on("legacy", "byol_s is broken by torchaudio >= 2.9 only in s3prl 0.4.18")
def test_an_upstream_broken_by_torchaudio_is_broken_for_whoever_names_it():
    report = _report("--quick", "--upstream", "byol_s_default", expect=2)
    named = report["s3prl"]["upstream"]
    assert named["package"] == "byol_s" and not named["ok"] and "set_audio_backend" in named["error"]["error"]
    assert report["recommended"]["frontend_conf"]["frontend_conf"] == {"upstream": "byol_s_default"}


@pytest.mark.slow
def test_unknown_upstream_lists_close_names():
    report = _report("--quick", "--upstream", "wavlm_larg", expect=2)
    assert "wavlm_large" in next(f["fix"] for f in report["findings"] if f["topic"] == "upstream")


@pytest.mark.slow
def test_invalid_attention_override_is_broken():
    report = _report("--quick", expect=2, env={"ESPNET_FLASHCOMPAT_ATTN": "fastest"})
    assert "'fastest' is not one of" in report["attention"]["env_error"] and _levels(report, "attention") == ["error"]


def test_usage_errors_never_exit_with_a_health_code():
    assert run([*DOCTOR, "--bogus"]).returncode == 64
    assert run([sys.executable, "-m", "espnet_flashcompat"]).returncode == 64


def test_console_script_runs_doctor():
    script = shutil.which("espnet-flashcompat", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("espnet-flashcompat is not installed in this environment (pip install -e .)")
    proc = run([script, "doctor", "--help"])
    assert proc.returncode == 0 and "--json" in proc.stdout
