"""The guarded import and the resilient hub, against real broken installs, each in a fresh interpreter."""

import json

import pytest

from faults import run_python
from stacks import S3PRL_DIST, TORCHAUDIO_BREAKS_STOCK, only_on

STALE = "not properly installed"

# Builds the tiny HF upstream and fbank through import_s3prl(), runs both, prints what the guard saw.
BUILD_AND_RUN = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(message)s")
import torch
from espnet_flashcompat import import_s3prl
from espnet_flashcompat.s3prl.guard import recovered_faults
s3prl = import_s3prl()
assert import_s3prl() is s3prl
wavs, lens = torch.randn(2, 32000), torch.tensor([32000, 20000])
shapes = {}
for name, path in [("fbank", None), ("hf_wav2vec2_custom", TINY)]:
    hs, hs_len = s3prl.S3PRLUpstream(name, path_or_url=path)(wavs, lens)
    shapes[name] = [list(hs[-1].shape), hs_len[-1].tolist(), len(hs)]
print("RESULT", json.dumps({"shapes": shapes, "faults": [f.as_dict() for f in recovered_faults()],
                            "flash_hidden": sys.modules.get("flash_attn", 0) is None}))
"""


def _result(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _build_and_run(tiny, **kwargs):
    return run_python(f"TINY = {str(tiny)!r}\n" + BUILD_AND_RUN, **kwargs)


EXPECTED_SHAPES = {"fbank": [[2, 200, 240], [200, 125], 1], "hf_wav2vec2_custom": [[2, 100, 32], [100, 63], 3]}


def test_stock_stack_builds_and_runs(tiny_wav2vec2):
    """Legacy: torchaudio >= 2.9 breaks byol_s, hence stock `from s3prl.nn import S3PRLUpstream`; current: espnet-s3prl
    fixed that and the stock import works. Ours builds and runs on both."""
    stock = run_python("from s3prl.nn import S3PRLUpstream")
    if TORCHAUDIO_BREAKS_STOCK:
        assert stock.returncode != 0 and "set_audio_backend" in stock.stderr
    else:
        assert stock.returncode == 0, stock.stderr[-3000:]
    proc = _build_and_run(tiny_wav2vec2)
    result = _result(proc)
    assert result["shapes"] == EXPECTED_SHAPES
    assert result["faults"] == [] and not result["flash_hidden"]
    assert STALE not in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fixture,cause", [
    ("broken_flash_attn", "No module named 'flash_attn_2_cuda'"),
    ("undefined_symbol_flash_attn", "undefined symbol"),
])
def test_import_time_flash_fault_of_transformers_4_4x_is_recovered(request, tiny_wav2vec2, old_transformers,
                                                                   fixture, cause):
    """transformers 4.46 with CUDA imports flash_attn with the model modules: hide it, retry, warn once."""
    flash = request.getfixturevalue(fixture)
    proc = _build_and_run(tiny_wav2vec2, pythonpath=[old_transformers, flash], fake_cuda=True)
    result = _result(proc)
    assert result["shapes"] == EXPECTED_SHAPES
    assert result["flash_hidden"]
    [fault] = result["faults"]
    assert fault["kind"] == "flash_attn" and cause in fault["error"]
    assert fault["path"] == str(flash / "flash_attn")
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and cause in warnings[0] and "Fix:" in warnings[0] and str(flash) in warnings[0]
    assert STALE not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_unrecoverable_flash_fault_names_the_cause(tiny_wav2vec2, old_transformers, broken_flash_attn):
    """Once flash-attn is hidden, a failure that still names it is not retried forever: it is raised, chained."""
    code = """
import sys
from espnet_flashcompat.s3prl.guard import S3PRLImportError, import_recovering
sys.modules["flash_attn"] = None  # already hidden: a second flash fault must surface
try:
    import_recovering("flash_attn.flash_attn_interface")
except S3PRLImportError as exc:
    print("KIND", exc.diagnosis.kind, "|", exc, "| chained:", type(exc.__cause__).__name__)
"""
    proc = run_python(code, pythonpath=[broken_flash_attn])
    assert "KIND flash_attn" in proc.stdout and "chained: ModuleNotFoundError" in proc.stdout, proc.stderr


def test_missing_s3prl_raises_s3prl_import_error():
    code = """
from espnet_flashcompat import S3PRLImportError, import_s3prl
try:
    import_s3prl()
except ImportError as exc:
    assert isinstance(exc, S3PRLImportError)
    print("KIND", exc.diagnosis.kind, exc.diagnosis.module, "|", exc)
"""
    proc = run_python(code, block=["s3prl"])
    assert "KIND not_installed s3prl | S3PRL cannot be imported: ModuleNotFoundError: No module named 's3prl'" \
        in proc.stdout, proc.stderr
    other = {"s3prl": "espnet-s3prl", "espnet-s3prl": "s3prl"}[S3PRL_DIST]  # the one the ESPnet in use does not want
    assert f"Fix: pip install {S3PRL_DIST} (the S3PRL distribution this ESPnet asks for; never install {other} " \
        "over it" in proc.stdout
    assert STALE not in proc.stdout + proc.stderr


@only_on("legacy", "s3prl 0.4.18's byol_s needs torchaudio.set_audio_backend (gone in torchaudio 2.9)")
def test_one_broken_upstream_leaves_the_others_working():
    code = """
import json
from espnet_flashcompat import S3PRLImportError, import_s3prl
s3prl = import_s3prl()
before = "byol_s_default" in s3prl.available_names()
try:
    s3prl.S3PRLUpstream("byol_s_default")
except S3PRLImportError as exc:
    error = exc
fbank = s3prl.S3PRLUpstream("fbank")
print("RESULT", json.dumps({
    "before": before, "after": "byol_s_default" in s3prl.available_names(),
    "unavailable": sorted(s3prl.hub.unavailable()), "diagnosis": error.diagnosis.as_dict(), "message": str(error),
    "fbank_in_names": "fbank" in s3prl.available_names(),
}))
"""
    result = _result(run_python(code))
    assert result["before"] and not result["after"] and result["fbank_in_names"]
    assert result["unavailable"] == ["byol_s_cvt", "byol_s_default", "byol_s_resnetish34"]
    diagnosis = result["diagnosis"]
    assert (diagnosis["kind"], diagnosis["upstream"], diagnosis["module"], diagnosis["attribute"]) == \
        ("upstream_dependency", "byol_s", "torchaudio", "set_audio_backend")
    assert diagnosis["where"].endswith("byol_s/byol_a/common.py:20")
    assert result["message"].startswith("S3PRL upstream 'byol_s' cannot be imported: AttributeError: module "
                                        "'torchaudio' has no attribute 'set_audio_backend'")


@only_on("current", "espnet-s3prl has no broken upstream of its own: one module of byol_s is made unimportable")
def test_one_unimportable_upstream_leaves_the_others_working():
    code = """
import json
from espnet_flashcompat import S3PRLImportError, import_s3prl
s3prl = import_s3prl()
try:
    s3prl.S3PRLUpstream("byol_s_default")
except S3PRLImportError as exc:
    error = exc
fbank = s3prl.S3PRLUpstream("fbank")
print("RESULT", json.dumps({"unavailable": sorted(s3prl.hub.unavailable()), "diagnosis": error.diagnosis.as_dict(),
                            "message": str(error), "fbank_in_names": "fbank" in s3prl.available_names()}))
"""
    result = _result(run_python(code, block=["s3prl.upstream.byol_s.expert"]))
    assert result["fbank_in_names"] and result["unavailable"] == ["byol_s_cvt", "byol_s_default", "byol_s_resnetish34"]
    assert (result["diagnosis"]["kind"], result["diagnosis"]["upstream"]) == ("upstream_dependency", "byol_s")
    assert result["message"].startswith("S3PRL upstream 'byol_s' cannot be imported: ModuleNotFoundError: ")


def test_only_the_requested_upstream_is_imported():
    code = """
import sys
from espnet_flashcompat import import_s3prl
import_s3prl().S3PRLUpstream("fbank")
print("LOADED", sorted(m for m in sys.modules if m.endswith(".hubconf")))
"""
    proc = run_python(code)
    assert "LOADED ['s3prl.upstream.baseline.hubconf']" in proc.stdout, proc.stdout + proc.stderr


def test_index_matches_the_entry_points_of_stock_hub():
    """Our index lists exactly the functions stock s3prl.hub exports (made importable by a shim here)."""
    code = """
import importlib, sys, types, inspect, json
import torchaudio
torchaudio.set_audio_backend = lambda *a, **k: None
sys.modules["torchaudio.sox_effects"] = types.SimpleNamespace(apply_effects_tensor=None)
import s3prl, s3prl.hub as stock
from pathlib import Path
from espnet_flashcompat.s3prl.hub import read_index
stock_functions = {n for n, v in vars(stock).items() if inspect.isfunction(v) and not n.startswith("_")
                   and v.__module__.endswith(".hubconf")}
index = read_index(Path(s3prl.__file__).parent)
print("RESULT", json.dumps({"missing": sorted(stock_functions - set(index)), "extra": sorted(set(index) - stock_functions),
                            "modules_agree": all(getattr(importlib.import_module(m), n) is getattr(stock, n) for n, m in index.items()),
                            "count": len(index)}))
"""
    result = _result(run_python(code))
    assert result["missing"] == [] and result["extra"] == [] and result["modules_agree"]
    assert result["count"] > 150


def test_tiny_upstream_already_written_is_reused_without_importing_torch(tiny_wav2vec2):
    code = f"""
import sys
from espnet_flashcompat.testing import make_tiny_hf_upstream
print("REUSED", make_tiny_hf_upstream({str(tiny_wav2vec2)!r}), "torch" in sys.modules, "transformers" in sys.modules)
"""
    proc = run_python(code)
    assert f"REUSED {tiny_wav2vec2} False False" in proc.stdout, proc.stdout + proc.stderr
