"""Test-suite wiring: the ``slow`` and ``gpu`` markers, GPU skipping, a calibration store of its own for each test,
and session-wide fault and tiny-model fixtures."""

import pytest

import faults


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slow test (builds fault fixtures or trains); still runs in CI")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(autouse=True)
def calibration_store(tmp_path, monkeypatch):
    """Each test (and the processes it starts) calibrates into a store of its own, never the user's cache: a test
    that expects a calibration must not find one that an earlier test made."""
    path = tmp_path / "calibration-store"
    monkeypatch.setenv("ESPNET_FLASHCOMPAT_CALIBRATION_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def broken_flash_attn():
    return faults.broken_flash_attn()


@pytest.fixture(scope="session")
def undefined_symbol_flash_attn():
    return faults.undefined_symbol_flash_attn()


@pytest.fixture(scope="session")
def old_transformers():
    return faults.old_transformers()


@pytest.fixture(scope="session")
def healthy_flash_attn():
    """PYTHONPATH entries that give a working flash-attn for this GPU: ``$ESPNET_FLASHCOMPAT_FLASH_ATTN_DIR`` (a
    ``pip install --target`` of a wheel built for it, as scripts/gpu.sh makes), else the installed one."""
    import importlib.util
    import os

    where = os.environ.get("ESPNET_FLASHCOMPAT_FLASH_ATTN_DIR")
    pythonpath = [where] if where else []
    if not where and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("no flash-attn: install one, or set ESPNET_FLASHCOMPAT_FLASH_ATTN_DIR to a --target install of it")
    proc = faults.run_python("import flash_attn, flash_attn_2_cuda; print(flash_attn.__version__)",
                             pythonpath=pythonpath, timeout=300)
    assert proc.returncode == 0, f"the flash-attn meant to be healthy does not import:\n{proc.stderr[-3000:]}"
    return pythonpath


def _tiny(tmp_path_factory, kind):
    from espnet_flashcompat.testing import make_tiny_hf_upstream

    return make_tiny_hf_upstream(tmp_path_factory.mktemp(f"tiny_{kind}"), kind=kind)


@pytest.fixture(scope="session")
def tiny_wav2vec2(tmp_path_factory):
    return _tiny(tmp_path_factory, "wav2vec2")


@pytest.fixture(scope="session")
def tiny_hubert(tmp_path_factory):
    return _tiny(tmp_path_factory, "hubert")
