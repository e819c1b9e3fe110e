"""The package's layout keeps its promises: one folder per concern, no import circles, 0.1's import paths still
work (the same module objects), and no text that points at work items a reader cannot see."""

import ast
import importlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import espnet_flashcompat
from espnet_flashcompat import _moved

PACKAGE = Path(espnet_flashcompat.__file__).parent
REPO = PACKAGE.parent
CONCERNS = ("attention", "espnet", "s3prl", "doctor", "handoff")
FACES = {"__init__", "__main__", "_moved", "cli", "frontend", "testing"}


def _modules():
    return {".".join(p.relative_to(REPO).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path):
    """The package's modules that ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    modules = _modules()
    return {m for m in found if m in modules and m != name}


def test_one_folder_per_concern_and_only_the_faces_at_the_top():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == FACES
    for concern in CONCERNS:
        init = PACKAGE / concern / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{concern}/__init__.py says what the concern is"
        for module in (PACKAGE / concern).glob("*.py"):
            if module.stem != "__init__":
                assert f"``{module.stem}``" in doc, f"{concern}/__init__.py does not say what {module.stem} does"


def test_no_module_imports_a_module_that_imports_it_back():
    graph = {name: _imports(name, path) for name, path in _modules().items()}
    circles = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph.get(b, ())})
    assert circles == []
    # the walk sees real edges: the frontend imports the policy and the guard
    assert {"espnet_flashcompat.attention.policy", "espnet_flashcompat.s3prl.guard"} <= graph["espnet_flashcompat.frontend"]


@pytest.mark.parametrize("old", sorted(_moved.OLD_PATHS))
def test_an_old_module_path_imports_the_module_that_does_its_job_now(old):
    new = importlib.import_module(_moved.OLD_PATHS[old])
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _moved._warned.discard(old)
        assert importlib.import_module(old) is new
    assert any(issubclass(w.category, DeprecationWarning) and old in str(w.message) for w in caught)


def test_the_old_modules_named_as_their_folders_forward_their_names():
    from espnet_flashcompat import attention, doctor, handoff
    from espnet_flashcompat.attention import policy
    from espnet_flashcompat.doctor import report
    from espnet_flashcompat.handoff import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert attention.decide is policy.decide and attention.ENV_VAR == "ESPNET_FLASHCOMPAT_ATTN"
        assert doctor.gather is report.gather and doctor.ERROR == "error"
        assert handoff.to_stock is convert.to_stock
        with pytest.raises(AttributeError):
            attention.no_such_name  # noqa: B018


def test_old_paths_in_a_fresh_interpreter_as_a_script_of_0_1_wrote_them():
    script = ("from espnet_flashcompat.guard import import_s3prl, S3PRLImportError\n"
              "from espnet_flashcompat.attention import decide, AUTO\n"
              "import espnet_flashcompat.registry as r\n"
              "from espnet_flashcompat.optin import Request, requested\n"
              "from espnet_flashcompat.frontend import S3prlFlashCompatFrontend\n"
              "import espnet_flashcompat.espnet.registry as now\n"
              "assert r is now and AUTO == 'auto' and Request('sdpa', 'config').backend == 'sdpa'\n"
              "assert S3prlFlashCompatFrontend.__module__ == 'espnet_flashcompat.frontend'\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_no_text_names_a_work_item_by_number():
    """Code, tests, docs and scripts say what they mean, not which tracker item asked for it."""
    pattern = re.compile(r"\b(issues?|PR|pull request) ?#?\d+\b", re.IGNORECASE)
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    offenders = []
    for name in tracked.stdout.split():
        if Path(name).suffix not in (".py", ".md", ".sh", ".cfg", ".toml", ".yaml", ".txt") and Path(name).name != "run":
            continue
        path = REPO / name
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            # upstream projects' own trackers, named with their repository, are references a reader can follow
            if pattern.search(line) and not re.search(r"[\w.-]+/[\w.-]+(#|/(issues|pull)/)\d+", line):
                offenders.append(f"{name}:{number}: {line.strip()[:100]}")
    assert offenders == []
