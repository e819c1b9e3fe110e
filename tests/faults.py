"""Real fault fixtures for the tests: broken installs made by the real installers, and fresh interpreters to run them.

Builders install into ``$ESPNET_FLASHCOMPAT_FAULT_CACHE/<name>`` (default ``<repo>/.cache/faults``) and each
returns a directory to put on ``PYTHONPATH``. A build runs under a file lock and writes its done-marker last,
so a half-built directory is never reused; built directories are reused across test sessions.

``run``/``run_python`` run a scenario in a fresh interpreter, so import state cannot leak between tests. A
``sitecustomize`` prelude, first on ``PYTHONPATH``, can make top-level modules unimportable (``block``) and
make ``torch.cuda.is_available()`` return True (``fake_cuda``), which turns on the import-time flash-attn
path of transformers 4.41-4.54 on a CPU machine. The torchaudio >= 2.9 breakage needs no fixture: it is the
installed stack itself.
"""

import fcntl
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLASH_ATTN_VERSION = "2.8.3.post2"
OLD_TRANSFORMERS = ("transformers==4.46.3", "tokenizers==0.20.3", "huggingface_hub==0.36.2")
# c10::cuda::SetDevice(int): what a flash-attn built against torch 2.1 asks for; later torch exports another signature.
MISSING_SYMBOL = "_ZN3c104cuda9SetDeviceEi"
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")
_TAG = sys.implementation.cache_tag
_BLOCK_VAR, _FAKE_CUDA_VAR = "ESPNET_FLASHCOMPAT_FAULT_BLOCK", "ESPNET_FLASHCOMPAT_FAULT_FAKE_CUDA"

_UNDEFINED_SYMBOL_C = f"""\
#include <Python.h>
extern void missing(int) __asm__("{MISSING_SYMBOL}");
static PyObject *fwd(PyObject *self, PyObject *args) {{ missing(0); Py_RETURN_NONE; }}
static PyMethodDef methods[] = {{{{"fwd", fwd, METH_NOARGS, NULL}}, {{NULL, NULL, 0, NULL}}}};
static struct PyModuleDef module = {{PyModuleDef_HEAD_INIT, "flash_attn_2_cuda", NULL, -1, methods}};
PyMODINIT_FUNC PyInit_flash_attn_2_cuda(void) {{ return PyModule_Create(&module); }}
"""

_PRELUDE = f'''\
"""Fault prelude written by tests/faults.py: blocks modules (${_BLOCK_VAR}, comma-separated: a top-level name
blocks its whole package, a dotted name that module alone) and
fakes CUDA (${_FAKE_CUDA_VAR}=1) at interpreter start, then runs the sitecustomize it shadows, if any."""
import importlib.machinery, importlib.util, os, sys

_blocked = frozenset(filter(None, os.environ.get("{_BLOCK_VAR}", "").split(",")))


class _Blocker:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name in _blocked or name.partition(".")[0] in _blocked:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


if _blocked:
    sys.meta_path.insert(0, _Blocker())
if os.environ.get("{_FAKE_CUDA_VAR}") == "1":
    import torch

    torch.cuda.is_available = lambda: True

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here]
)
if _spec is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
'''


def cache_dir() -> Path:
    """``$ESPNET_FLASHCOMPAT_FAULT_CACHE``, else ``<repo>/.cache/faults``."""
    return Path(os.environ.get("ESPNET_FLASHCOMPAT_FAULT_CACHE") or REPO / ".cache" / "faults")


def cached_build(name: str, build) -> Path:
    """Return ``cache_dir()/name``, first running ``build(empty_dir)`` unless a finished build is there."""
    root = cache_dir()
    out, done = root / name, root / f"{name}.done"
    if done.exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            done.touch()
    return out


def _check(argv, env=None) -> None:
    proc = subprocess.run(list(map(str, argv)), env=env, capture_output=True, text=True)
    if proc.returncode:
        output = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n{output}")


def _pip_install(*args, env=None) -> None:
    _check([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", *args], env=env)


def _build_broken_flash_attn(out: Path) -> None:
    # FORCE_BUILD skips flash-attn's download of a prebuilt (working) wheel from GitHub; SKIP_CUDA_BUILD then
    # leaves out the compiled module. --no-cache-dir: a compiled wheel in pip's cache must not be reused.
    env = {**os.environ, "FLASH_ATTENTION_SKIP_CUDA_BUILD": "TRUE", "FLASH_ATTENTION_FORCE_BUILD": "TRUE"}
    args = ["--no-build-isolation", "--no-deps", "--no-cache-dir", "--target", out, f"flash-attn=={FLASH_ATTN_VERSION}"]
    _pip_install(*args, env=env)
    if list(out.glob("flash_attn_2_cuda*")):
        raise RuntimeError(f"flash-attn's installer left a compiled flash_attn_2_cuda in {out}")


def broken_flash_attn() -> Path:
    """flash-attn from its own installer without compiling: metadata present, ``flash_attn_2_cuda`` absent."""
    return cached_build(f"flash_attn-{FLASH_ATTN_VERSION}-no-cuda-{_TAG}", _build_broken_flash_attn)


def _build_undefined_symbol(out: Path) -> None:
    shutil.copytree(broken_flash_attn(), out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "flash_attn_2_cuda.c"
        source.write_text(_UNDEFINED_SYMBOL_C)
        include = sysconfig.get_paths()["include"]
        target = out / f"flash_attn_2_cuda{EXT_SUFFIX}"
        _check([os.environ.get("CC", "gcc"), "-shared", "-fPIC", f"-I{include}", source, "-o", target])


def undefined_symbol_flash_attn() -> Path:
    """The broken flash-attn plus a ``flash_attn_2_cuda`` that fails to load: ``undefined symbol: MISSING_SYMBOL``."""
    return cached_build(f"flash_attn-{FLASH_ATTN_VERSION}-undefined-symbol-{_TAG}", _build_undefined_symbol)


def _build_old_transformers(out: Path) -> None:
    # --no-deps: everything else (torch, numpy, safetensors, requests, ...) comes from the running environment.
    _pip_install("--no-deps", "--target", out, *OLD_TRANSFORMERS)
    if (out / "torch").exists():
        raise RuntimeError(f"torch was installed into {out}")


def old_transformers() -> Path:
    """transformers 4.46 (imports flash-attn at import time) with its own tokenizers and huggingface_hub, no torch."""
    return cached_build(f"{'-'.join(p.replace('==', '-') for p in OLD_TRANSFORMERS)}-{_TAG}", _build_old_transformers)


def _prelude_dir() -> Path:
    out = cache_dir() / "prelude"
    path = out / "sitecustomize.py"
    if not path.is_file() or path.read_text() != _PRELUDE:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".sitecustomize.{os.getpid()}.tmp"
        tmp.write_text(_PRELUDE)
        os.replace(tmp, path)
    return out


def fault_env(*, pythonpath=(), env=None, fake_cuda=False, block=()) -> dict:
    """Environment for a fresh interpreter: prelude and ``pythonpath`` lead PYTHONPATH; Hub offline; ``env`` last."""
    result = {k: v for k, v in os.environ.items() if k not in (_BLOCK_VAR, _FAKE_CUDA_VAR)}
    paths = [str(_prelude_dir()), *map(str, pythonpath)] + ([result["PYTHONPATH"]] if result.get("PYTHONPATH") else [])
    result.update(PYTHONPATH=os.pathsep.join(paths), PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1")
    if block:
        result[_BLOCK_VAR] = ",".join(block)
    if fake_cuda:
        result[_FAKE_CUDA_VAR] = "1"
    result.update(env or {})
    return result


def run(argv, *, pythonpath=(), env=None, fake_cuda=False, block=(), timeout=600, cwd=REPO):
    """Run ``argv`` in ``fault_env(...)``; return its CompletedProcess (text captured, a failure does not raise)."""
    return subprocess.run(
        list(map(str, argv)),
        env=fault_env(pythonpath=pythonpath, env=env, fake_cuda=fake_cuda, block=block),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    """``run([sys.executable, "-c", code], **kwargs)``: one scenario in a fresh interpreter."""
    return run([sys.executable, "-c", code], **kwargs)
