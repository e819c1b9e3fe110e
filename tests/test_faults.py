"""The fault fixtures are real: each scenario breaks the STOCK stack (no espnet_flashcompat) the way users see it."""

import importlib.metadata
import sys

import pytest
import torch

import faults
from faults import run_python
from stacks import only_on

NO_CUDA_MODULE = "ModuleNotFoundError: No module named 'flash_attn_2_cuda'"
WRAPPED_4_46 = (
    "RuntimeError: Failed to import transformers.models.wav2vec2.modeling_wav2vec2 because of the following error "
    "(look up to see its traceback):\nNo module named 'flash_attn_2_cuda'"
)


def _last_line(proc):
    return proc.stderr.strip().splitlines()[-1]


@only_on("legacy", "s3prl 0.4.18 only; espnet-s3prl fixed it")
def test_stock_s3prl_dies_on_removed_set_audio_backend():
    proc = run_python("from s3prl.nn import S3PRLUpstream")
    assert proc.returncode == 1
    assert _last_line(proc) == "AttributeError: module 'torchaudio' has no attribute 'set_audio_backend'"
    assert "s3prl/upstream/byol_s/" in proc.stderr


def test_block_makes_a_module_unimportable_and_nothing_else():
    assert run_python("import s3prl").returncode == 0
    proc = run_python("import torchaudio, importlib.metadata\nimport s3prl", block=["s3prl"])
    assert proc.returncode == 1 and _last_line(proc) == "ModuleNotFoundError: No module named 's3prl'"


def test_cached_build_never_reuses_a_half_built_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("ESPNET_FLASHCOMPAT_FAULT_CACHE", str(tmp_path))
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "leftover").touch()  # an interrupted build: no done-marker
    builds = []

    def build(out):
        builds.append(out)
        (out / "ok").touch()

    first, second = faults.cached_build("demo", build), faults.cached_build("demo", build)
    assert first == second == tmp_path / "demo" and builds == [first]
    assert sorted(p.name for p in first.iterdir()) == ["ok"]


@pytest.mark.slow
def test_broken_flash_attn_has_metadata_but_no_compiled_module(broken_flash_attn):
    code = (
        "import importlib.metadata, transformers.utils as u\n"
        "print(importlib.metadata.version('flash-attn'), u.is_flash_attn_2_available())\n"
        "import flash_attn"
    )
    plain, fake_cuda = (run_python(code, pythonpath=[broken_flash_attn], fake_cuda=f) for f in (False, True))
    assert plain.stdout.split() == [faults.FLASH_ATTN_VERSION, str(torch.cuda.is_available())]
    assert fake_cuda.stdout.split() == [faults.FLASH_ATTN_VERSION, "True"]  # the metadata-only check lies
    for proc in plain, fake_cuda:
        assert proc.returncode == 1 and _last_line(proc) == NO_CUDA_MODULE
        assert f'File "{broken_flash_attn / "flash_attn" / "flash_attn_interface.py"}"' in proc.stderr
    assert not list(broken_flash_attn.glob("flash_attn_2_cuda*"))


@pytest.mark.slow
def test_undefined_symbol_flash_attn_fails_in_the_dynamic_loader(undefined_symbol_flash_attn):
    proc = run_python(
        "import importlib.metadata; print(importlib.metadata.version('flash-attn'))\nimport flash_attn",
        pythonpath=[undefined_symbol_flash_attn],
    )
    so = undefined_symbol_flash_attn / f"flash_attn_2_cuda{faults.EXT_SUFFIX}"
    assert proc.stdout.split() == [faults.FLASH_ATTN_VERSION]
    assert proc.returncode == 1
    assert _last_line(proc) == f"ImportError: {so}: undefined symbol: {faults.MISSING_SYMBOL}"


@pytest.mark.slow
def test_old_transformers_runs_on_the_environment_torch(old_transformers):
    proc = run_python(
        "import torch, transformers, tokenizers\n"
        "print(transformers.__version__, tokenizers.__version__, torch.__version__)\n"
        "print(transformers.__file__, torch.__file__, sep='\\n')",
        pythonpath=[old_transformers],
    )
    assert proc.returncode == 0, proc.stderr
    versions, tf_file, torch_file = proc.stdout.splitlines()
    assert versions.split() == ["4.46.3", "0.20.3", torch.__version__]
    assert tf_file == str(old_transformers / "transformers" / "__init__.py") and torch_file == torch.__file__


@pytest.mark.slow
@pytest.mark.parametrize("flash_attn", ["broken_flash_attn", "undefined_symbol_flash_attn"])
def test_transformers_4_46_imports_flash_attn_at_import_time(request, old_transformers, flash_attn):
    error = {
        "broken_flash_attn": NO_CUDA_MODULE,
        "undefined_symbol_flash_attn": f"undefined symbol: {faults.MISSING_SYMBOL}",
    }
    pythonpath = [old_transformers, request.getfixturevalue(flash_attn)]
    module = "import transformers.models.wav2vec2.modeling_wav2vec2"
    plain = run_python(module, pythonpath=pythonpath)
    assert plain.returncode == int(torch.cuda.is_available())  # without CUDA, flash-attn is never touched
    proc = run_python(module, pythonpath=pythonpath, fake_cuda=True)
    assert proc.returncode == 1 and _last_line(proc).endswith(error[flash_attn])
    trigger = "    from ...modeling_flash_attention_utils import _flash_attention_forward\n"
    assert f'modeling_wav2vec2.py", line 66, in <module>\n{trigger}' in proc.stderr
    assert 'modeling_flash_attention_utils.py", line 27, in <module>\n    from flash_attn.bert_padding' in proc.stderr
    if flash_attn == "broken_flash_attn":
        wrapped = run_python("from transformers import Wav2Vec2Model", pythonpath=pythonpath, fake_cuda=True)
        assert wrapped.returncode == 1 and wrapped.stderr.strip().endswith(WRAPPED_4_46)


@pytest.mark.slow
def test_transformers_5_imports_lazily_and_dies_when_flash_attention_2_is_asked_for(broken_flash_attn, tiny_wav2vec2):
    assert int(importlib.metadata.version("transformers").split(".")[0]) >= 5
    code = (
        "import sys, transformers.modeling_flash_attention_utils, transformers.models.wav2vec2.modeling_wav2vec2\n"
        "from transformers import Wav2Vec2Model\n"
        "Wav2Vec2Model.from_pretrained(sys.argv[1], attn_implementation='sdpa')\n"
        "print('imported and loaded with sdpa', flush=True)\n"
        "Wav2Vec2Model.from_pretrained(sys.argv[1], attn_implementation='flash_attention_2')"
    )
    proc = faults.run([sys.executable, "-c", code, tiny_wav2vec2], pythonpath=[broken_flash_attn], fake_cuda=True)
    assert proc.stdout.strip() == "imported and loaded with sdpa"
    assert proc.returncode == 1 and _last_line(proc) == NO_CUDA_MODULE
    assert "in _check_and_adjust_attn_implementation\n" in proc.stderr  # from_pretrained -> __init__
    assert "in lazy_import_flash_attention\n" in proc.stderr

