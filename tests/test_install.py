"""The startup hook as pip installs it: ``pip install .`` and ``pip install -e .`` in fresh venvs, then uninstall;
installing into a full ESPnet environment changes nothing but this package (the user's S3PRL stays); and stock
ESPnet entry points seeing ``frontend: s3prl_flashcompat`` in the project venv, with no wrapper.

The fresh venvs get the package alone (``--no-deps``): the hook must arm without ESPnet or torch around.
They build from a copy of this checkout under tmp, so the build never writes into the working tree.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from espnet_flashcompat.espnet import registry
from stacks import TORCHAUDIO_BREAKS_STOCK

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PROBE = ("import json, sys; r = sys.modules.get('espnet_flashcompat.espnet.registry'); "
         "print(json.dumps(dict(state=r and r.hook_state(), file=r and r.__file__, "
         "heavy=[m for m in ('torch', 'espnet2', 's3prl', 'transformers', 'logging') if m in sys.modules])))")


def run(argv, *, env=None, cwd, timeout=900):
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", registry.DISABLE_ENV)}
    return subprocess.run(list(map(str, argv)), env={**base, **(env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def check(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


def source_copy(dest: Path) -> Path:
    """What pip needs to build the package, copied from this checkout."""
    dest.mkdir()
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "espnet_flashcompat", dest / "espnet_flashcompat",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return dest


# Without pyproject.toml pip takes the legacy `setup.py install` / `setup.py develop` route, which never writes the
# .pth, in two common venvs: a bare one whose bundled pip is older than 23.1 (Debian's Python 3.11: pip 23.0.1), and
# any venv holding setuptools and wheel (ESPnet's do), where pip < 25.1 still runs `setup.py develop` for `-e`.
@pytest.mark.parametrize("build_tools", ["bare", "setuptools+wheel"])
@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_pth_hook_in_a_fresh_venv_and_nothing_left_after_uninstall(tmp_path, editable, build_tools):
    src = source_copy(tmp_path / "src")
    venv = tmp_path / "venv"
    check(run([sys.executable, "-m", "venv", venv], cwd=tmp_path))
    python = venv / "bin" / "python"
    if build_tools != "bare":
        check(run([python, "-m", "pip", "install", "-q", "setuptools<74", "wheel"], cwd=tmp_path))
    site_packages = Path(check(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   cwd=tmp_path)).stdout.strip())
    baseline = sorted(os.listdir(site_packages))

    check(run([python, "-m", "pip", "install", "-q", "--no-deps", *(["-e"] if editable else []), src], cwd=tmp_path))
    pth = site_packages / registry.PTH_NAME
    assert pth.read_text() == registry.PTH_LINE
    record = next(site_packages.glob("espnet_flashcompat-*.dist-info")) / "RECORD"
    assert any(line.split(",")[0] == registry.PTH_NAME for line in record.read_text().splitlines())

    proc = check(run([python, "-c", PROBE], cwd=tmp_path))
    out = json.loads(proc.stdout)
    assert proc.stderr == ""
    assert out["state"]["armed"] and out["state"]["pth_file"] == str(pth) and out["state"]["pth_current"]
    assert out["heavy"] == []
    installed_at = src if editable else site_packages
    assert Path(out["file"]).resolve() == (installed_at / "espnet_flashcompat" / "espnet" / "registry.py").resolve()

    out = json.loads(check(run([python, "-c", PROBE], env={registry.DISABLE_ENV: "1"}, cwd=tmp_path)).stdout)
    assert out["state"]["startup_ran"] and out["state"]["disabled_by_env"] and not out["state"]["armed"]

    check(run([python, "-m", "pip", "uninstall", "-y", "-q", "espnet-flashcompat"], cwd=tmp_path))
    assert sorted(os.listdir(site_packages)) == baseline
    proc = check(run([python, "-c", "pass"], cwd=tmp_path))
    assert proc.stderr == ""
    proc = run([python, "-c", "import espnet_flashcompat"], cwd=tmp_path)
    assert proc.returncode == 1 and "No module named 'espnet_flashcompat'" in proc.stderr


STOCK_FRONTEND = """
import json, sys, torch
from espnet2.asr.frontend.s3prl import S3prlFrontend
frontend = S3prlFrontend(frontend_conf={"upstream": "hf_wav2vec2_custom", "path_or_url": sys.argv[1]})
feats, lens = frontend(torch.randn(2, 16000), torch.tensor([16000, 12000]))
print(json.dumps(dict(cls=type(frontend).__name__, shape=list(feats.shape))))
"""


def _freeze(python, cwd):
    """Distribution name -> version, every distribution (pip, setuptools too), as ``pip list`` sees them."""
    out = check(run([python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"], cwd=cwd)).stdout
    return {d["name"].lower().replace("_", "-"): d["version"] for d in json.loads(out)}


def _stock(python, tiny, cwd):
    """(exit code, last line) of stock ESPnet building and running S3prlFrontend in ``python``."""
    proc = run([python, "-c", STOCK_FRONTEND, tiny], env={"HF_HUB_OFFLINE": "1"}, cwd=cwd)
    lines = (proc.stdout if proc.returncode == 0 else proc.stderr).strip().splitlines()
    return proc.returncode, lines[-1] if lines else ""


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs the project venv (scripts/venv.sh)")
def test_installing_into_an_espnet_environment_adds_this_package_alone(tmp_path, tiny_wav2vec2):
    """A hard-linked copy of the project venv (a full ESPnet stack with its S3PRL: espnet-s3prl on the current stack,
    s3prl on the legacy one) minus this package; then ``pip install SRC`` and ``pip install -e SRC`` as a user runs
    them, with dependency resolution. Hard links make the copy cheap; pip and Python replace files, never write
    into them, so the project venv is untouched."""
    venv = tmp_path / "venv"
    check(run(["cp", "-al", sys.prefix, venv], cwd=tmp_path))
    python = venv / "bin" / "python"
    check(run([python, "-m", "pip", "uninstall", "-y", "-q", "espnet-flashcompat"], cwd=tmp_path))
    before = _freeze(python, tmp_path)
    s3prl = {name: line for name, line in before.items() if name in ("s3prl", "espnet-s3prl")}
    assert len(s3prl) == 1, f"expected one S3PRL distribution in the project venv, found {s3prl}"
    stock_before = _stock(python, tiny_wav2vec2, tmp_path)  # legacy: fails on torchaudio, as stock always does there
    src = source_copy(tmp_path / "src")
    for editable in (False, True):
        proc = check(run([python, "-m", "pip", "install", "--disable-pip-version-check", *(["-e"] if editable else []),
                          src], cwd=tmp_path))
        after = _freeze(python, tmp_path)
        added = {name for name in after if name not in before}
        changed = {name for name in before if after.get(name) != before[name]}
        assert added == {"espnet-flashcompat"} and changed == set(), (added, changed, proc.stdout[-3000:])
        assert _stock(python, tiny_wav2vec2, tmp_path) == stock_before  # stock `frontend: s3prl` as it was
        if not TORCHAUDIO_BREAKS_STOCK:  # current stack: it works, before and after
            assert stock_before == (0, json.dumps({"cls": "S3prlFrontend", "shape": [2, 50, 32]}))
        check(run([python, "-m", "pip", "uninstall", "-y", "-q", "espnet-flashcompat"], cwd=tmp_path))
        assert _freeze(python, tmp_path) == before


def project_venv_state():
    """hook_state() of a fresh interpreter of the venv running the tests (where scripts/venv.sh installed us)."""
    out = json.loads(check(run([sys.executable, "-c", PROBE], cwd=REPO)).stdout)
    if not (out["state"] or {}).get("pth_installed"):
        pytest.fail(f"{registry.PTH_NAME} is not installed in {sys.prefix}: run `pip install -e .` "
                    f"(scripts/venv.sh does) before this test")
    return out


def test_stock_asr_train_sees_the_key_through_the_installed_pth(tmp_path):
    project_venv_state()
    proc = check(run([sys.executable, "-m", "espnet2.bin.asr_train", "--print_config", "--frontend", "s3prl_flashcompat"],
                     env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}, cwd=tmp_path))
    assert "\nfrontend: s3prl_flashcompat\n" in proc.stdout
    assert "attn_implementation: auto" in proc.stdout  # frontend_conf defaults come from our class


def test_spawned_workers_see_the_key(tmp_path):
    """What a DDP worker started with the ``spawn`` method meets: a fresh interpreter armed by the ``.pth``."""
    project_venv_state()
    script = tmp_path / "spawn_probe.py"
    script.write_text(textwrap.dedent("""
        import multiprocessing, sys

        def probe():
            import espnet2.tasks.asr as asr
            return "s3prl_flashcompat" in asr.frontend_choices.classes

        if __name__ == "__main__":
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                print(pool.apply(probe), "espnet2.tasks.asr" in sys.modules)
    """))
    proc = check(run([sys.executable, script], env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}, cwd=tmp_path))
    # (ESPnet prints to stdout on import: read the last line) the worker registered; the parent never imported ESPnet
    assert proc.stdout.splitlines()[-1].split() == ["True", "False"]
