"""The release as a user takes it: the sdist and the wheel, built from a copy of this checkout.

The sdist is built through setuptools' PEP 517 hook (``build_sdist``, what ``python -m build --sdist`` calls), then
the wheel from the unpacked sdist with pip's own PEP 517 build (``pip wheel --no-deps --no-build-isolation``), as
``python -m build`` does: so a file the sdist forgets also fails the wheel. Both run in the venv's Python with its
own setuptools, offline. The copy holds the whole working tree (tests, benchmarks, examples and docs included), so
that the checks below see whether any of it leaks into the wheel. About 3 s in all, so not marked slow.
"""

import configparser
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import espnet_flashcompat
from espnet_flashcompat.espnet import registry

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "espnet_flashcompat"
NOT_SHIPPED = ("tests", "benchmarks", "egs_example", "docs", "scripts", "stacks")
# Build outputs and local state of a checkout (see .gitignore): never part of a release.
LOCAL = (".git", ".venv*", ".cache", ".whl", ".fa", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
         "data", "exp", "dump", "downloads", "tiny_upstream")


def _run(argv, cwd):
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, \
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(sdist, wheel, source copy): the release files of a copy of this checkout."""
    tmp = tmp_path_factory.mktemp("release")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*LOCAL), symlinks=True)
    dist = tmp / "dist"
    dist.mkdir()
    _run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                                "print(build_meta.build_sdist(sys.argv[1]))", dist], cwd=src)
    (sdist,) = dist.glob("*.tar.gz")
    unpacked = tmp / "unpacked"
    with tarfile.open(sdist) as tar:
        # our own sdist; the "data" filter where this Python has it (3.11.4 and later)
        tar.extractall(unpacked, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (sdist_root,) = unpacked.iterdir()
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-cache-dir",
          "--disable-pip-version-check", "-w", dist, sdist_root], cwd=tmp)
    (wheel,) = dist.glob("*.whl")
    return sdist, wheel, src


def _wheel_names(wheel):
    with zipfile.ZipFile(wheel) as whl:
        return whl.namelist()


def _wheel_text(wheel, name):
    with zipfile.ZipFile(wheel) as whl:
        return whl.read(name).decode("utf-8")


def _dist_info(wheel):
    return f"{PACKAGE}-{espnet_flashcompat.__version__}.dist-info"


def test_wheel_has_the_startup_hook_at_its_root(built):
    _, wheel, _ = built
    assert registry.PTH_NAME in _wheel_names(wheel)
    assert _wheel_text(wheel, registry.PTH_NAME) == registry.PTH_LINE
    record = _wheel_text(wheel, f"{_dist_info(wheel)}/RECORD")  # listed, so `pip uninstall` removes it
    assert any(line.split(",")[0] == registry.PTH_NAME for line in record.splitlines())


def test_wheel_holds_every_module_of_every_subpackage(built):
    _, wheel, src = built
    sources = {p.relative_to(src).as_posix() for p in (src / PACKAGE).rglob("*.py")}
    folders = {p.parent for p in (src / PACKAGE).rglob("*.py")}
    bare = sorted(f.relative_to(src).as_posix() for f in folders if not (f / "__init__.py").is_file())
    assert not bare, f"left out of the wheel by packages = find: (no __init__.py): {bare}"
    shipped = {n for n in _wheel_names(wheel) if n.startswith(f"{PACKAGE}/") and n.endswith(".py")}
    assert shipped == sources
    subpackages = {p.parent.relative_to(src).as_posix() for p in (src / PACKAGE).rglob("__init__.py")}
    assert len(subpackages) > 1, "the package has subpackages"
    assert {f"{s}/__init__.py" for s in subpackages} <= shipped


def test_wheel_ships_the_package_alone(built):
    _, wheel, _ = built
    names = _wheel_names(wheel)
    roots = {n.split("/")[0] for n in names}
    assert roots == {PACKAGE, registry.PTH_NAME, _dist_info(wheel)}
    assert not [n for n in names if n.split("/")[0] in NOT_SHIPPED or "/tests/" in n or "__pycache__" in n]


def test_wheel_metadata_license_python_and_command(built):
    _, wheel, _ = built
    info = _dist_info(wheel)
    names = _wheel_names(wheel)
    licenses = [n for n in names if n in (f"{info}/LICENSE", f"{info}/licenses/LICENSE")]
    assert len(licenses) == 1, names
    assert _wheel_text(wheel, licenses[0]) == (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in (REPO / "LICENSE").read_text(encoding="utf-8")
    meta = _wheel_text(wheel, f"{info}/METADATA")
    head = meta.split("\n\n", 1)[0].splitlines()
    assert f"Version: {espnet_flashcompat.__version__}" in head
    assert any(line in ("License: Apache-2.0", "License-Expression: Apache-2.0") for line in head)
    assert "Requires-Python: >=3.11" in head
    for version in ("3.11", "3.12"):
        assert f"Classifier: Programming Language :: Python :: {version}" in head
    assert not [line for line in head if line.startswith("Requires-Dist: s3prl")], "neither S3PRL is required"
    entry_points = configparser.ConfigParser()
    entry_points.read_string(_wheel_text(wheel, f"{info}/entry_points.txt"))
    assert entry_points["console_scripts"]["espnet-flashcompat"] == "espnet_flashcompat.cli:main"


def test_sdist_holds_license_changelog_and_build_files(built):
    sdist, _, _ = built
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"LICENSE", "CHANGELOG.md", "README.md", "setup.py", "setup.cfg", "pyproject.toml", "PKG-INFO"} <= names
    assert f"{PACKAGE}/__init__.py" in names
    assert not [n for n in names if n.split("/")[0] in ("benchmarks", "egs_example", "scripts", "stacks")]
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## {espnet_flashcompat.__version__}" in changelog
