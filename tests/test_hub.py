"""``hub.read_index``'s source scan against an ``ast`` reference, on the installed s3prl and on tricky sources."""

import ast
import importlib.util
import textwrap
from pathlib import Path

import pytest

from espnet_flashcompat.s3prl.hub import close_names, read_index


def ast_index(s3prl_dir: Path) -> dict:
    """The reference: what ``from s3prl... import`` in hub.py binds, by an ``ast`` walk of the module bodies."""
    index = {}
    hub_py = s3prl_dir / "hub.py"
    if not hub_py.is_file():
        return index
    for node in ast.parse(hub_py.read_text()).body:
        if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("s3prl.")):
            continue
        if any(alias.name == "*" for alias in node.names):
            names = ast_public_functions(s3prl_dir.parent.joinpath(*node.module.split(".")).with_suffix(".py"))
        else:
            names = [alias.asname or alias.name for alias in node.names]
        index.update(dict.fromkeys(names, node.module))
    return index


def ast_public_functions(source: Path) -> list:
    if not source.is_file():
        return []
    names = []
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            names.append(node.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").endswith("hubconf"):
            names.extend(alias.asname or alias.name for alias in node.names)
    return [name for name in names if not name.startswith("_")]


@pytest.fixture(scope="module")
def s3prl_dir():
    spec = importlib.util.find_spec("s3prl")  # finds the package without importing it
    if spec is None:
        pytest.skip("s3prl is not installed")
    return Path(spec.origin).parent


def test_index_equals_the_ast_reference_on_installed_s3prl(s3prl_dir):
    index = read_index(s3prl_dir)
    assert list(index.items()) == list(ast_index(s3prl_dir).items())  # same names, modules and order
    assert len(index) > 150 and index["fbank"] == "s3prl.upstream.baseline.hubconf"
    assert index["timit_posteriorgram"] == "s3prl.downstream.timit_phone.hubconf"  # hub.py's one named import


def test_re_exported_name_maps_to_the_module_that_re_exports_it(s3prl_dir):
    """vq_apc's hubconf has ``from ..apc.hubconf import apc_url as vq_apc_url``: hub.py gets it from vq_apc."""
    index = read_index(s3prl_dir)
    assert index["vq_apc_url"] == "s3prl.upstream.vq_apc.hubconf"
    assert index["apc_url"] == "s3prl.upstream.apc.hubconf"


HUB = '''\
"""s3prl.hub, with every import form the scan must read like ast does."""
from s3prl.upstream.one.hubconf import *
from s3prl.upstream.two.hubconf import (  # parenthesised, over lines
    two_a,
    two_b as renamed,  # a comment, with a comma
)
from s3prl.upstream.three.hubconf import three_a, \\
    three_b
from s3prl.upstream.missing.hubconf import *
from torch import nn
from .relative import nothing
import s3prl.upstream.one.hubconf
from s3prl.upstream.three.hubconf import *
from s3prl.upstream.one.hubconf import one_a as one_last


def options():
    from s3prl.upstream.inner.hubconf import not_top_level
'''

ONE = '''\
import torch
from ..two.hubconf import two_a as one_alias, _private
from ..two.hubconf import (
    two_b,
    two_c as one_c,
)
from .expert import UpstreamExpert as _UpstreamExpert
from . import hubconf


def one_a(ckpt, *args, **kwargs):
    return _UpstreamExpert(ckpt)


@torch.no_grad()
def one_b (ckpt):
    pass


def _helper():
    pass


async def not_a_function_def():
    pass


class NotAFunction:
    def method(self):
        pass


if True:
    def conditional():
        pass
'''

THREE = '''\
def three_a(): pass
def two_a(): pass
def three_b(): pass
def three_c(x=(1,
               2)): pass
'''


def test_index_equals_the_ast_reference_on_tricky_sources(tmp_path):
    s3prl_dir = tmp_path / "s3prl"
    for path, text in {"hub.py": HUB, "upstream/one/hubconf.py": ONE, "upstream/three/hubconf.py": THREE}.items():
        (s3prl_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (s3prl_dir / path).write_text(textwrap.dedent(text))
    index = read_index(s3prl_dir)
    assert list(index.items()) == list(ast_index(s3prl_dir).items())
    assert index == {
        "one_alias": "s3prl.upstream.one.hubconf", "one_b": "s3prl.upstream.one.hubconf",
        "two_b": "s3prl.upstream.one.hubconf", "one_c": "s3prl.upstream.one.hubconf",
        "one_a": "s3prl.upstream.one.hubconf", "renamed": "s3prl.upstream.two.hubconf",
        "two_a": "s3prl.upstream.three.hubconf",  # hub.py's last import of a name wins, as in Python
        "three_a": "s3prl.upstream.three.hubconf", "three_b": "s3prl.upstream.three.hubconf",
        "three_c": "s3prl.upstream.three.hubconf", "one_last": "s3prl.upstream.one.hubconf",
    }


def test_no_hub_py_means_an_empty_index(tmp_path):
    assert read_index(tmp_path) == {} == ast_index(tmp_path)


def test_close_names_from_a_hub_or_from_names():
    names = ["wavlm_large", "wavlm_base", "wavlm_base_plus", "hubert_large_ll60k", "fbank"]

    class Hub:
        def options(self):
            return names

    assert close_names(names, "wavlm_larg")[0] == "wavlm_large"
    assert close_names(Hub(), "wavlm_larg") == close_names(iter(names), "wavlm_larg")
    assert close_names(names, "wavlm", n=1) == ["wavlm_base"]
    assert close_names(names, "something else") == []
