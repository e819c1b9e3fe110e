"""Registration of ``s3prl_flashcompat`` with ESPnet's tasks, and the startup hook's behaviour, in fresh interpreters.

Each scenario runs in its own subprocess so that import state (ESPnet task modules, the import hook) cannot
leak between tests. ``PYTHONPATH`` points at this checkout, so its registry is the one under test even where
the package is installed (in that case the installed ``.pth`` has armed the hook at startup already, which the
scenarios that need an unarmed process turn off with ``ESPNET_FLASHCOMPAT_DISABLE=1``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from espnet_flashcompat.espnet import registry
from stacks import STACK

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "espnet", "espnet2", "s3prl", "transformers", "numpy", "logging")


def run_python(code, *, disable=False, args=(), cwd=None, timeout=900):
    """Run ``python -c code`` in a fresh interpreter, this checkout first on the path; output captured."""
    env = {k: v for k, v in os.environ.items() if k != registry.DISABLE_ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
               HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    if disable:
        env[registry.DISABLE_ENV] = "1"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=cwd or REPO,
                          capture_output=True, text=True, timeout=timeout)


def result_of(proc):
    """The JSON object the scenario printed on its last stdout line."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_startup_arms_the_hook_without_heavy_imports():
    out = result_of(run_python(f"""
import json, sys
heavy_before = [m for m in {HEAVY!r} if m in sys.modules]
import espnet_flashcompat.espnet.registry as r
r.startup()
r.startup()
hooks = [f for f in sys.meta_path if getattr(f, "_espnet_flashcompat_hook", False)]
print(json.dumps(dict(heavy_before=heavy_before, heavy=[m for m in {HEAVY!r} if m in sys.modules],
                      hooks=len(hooks), first=sys.meta_path[0] is hooks[0], state=r.hook_state())))
"""))
    assert out["heavy_before"] == []
    assert out["heavy"] == []
    assert out["hooks"] == 1 and out["first"]
    assert out["state"]["armed"] and out["state"]["startup_ran"] and out["state"]["startup_error"] is None


def test_disable_env_leaves_the_hook_unarmed():
    out = result_of(run_python("""
import json, sys
import espnet_flashcompat.espnet.registry as r
r.startup()
print(json.dumps(dict(state=r.hook_state(), hooks=sum(getattr(f, "_espnet_flashcompat_hook", False) for f in sys.meta_path))))
""", disable=True))
    assert out["hooks"] == 0
    assert out["state"]["disabled_by_env"] and out["state"]["startup_ran"] and not out["state"]["armed"]


def test_register_is_lazy_idempotent_and_imports_nothing():
    out = result_of(run_python(f"""
import json, sys
import espnet_flashcompat.espnet.registry as r
first, second = r.register(), r.register()
print(json.dumps(dict(first=first, second=second, heavy=[m for m in {HEAVY!r} if m in sys.modules],
                      tasks=sorted(m for m in sys.modules if m.startswith(("espnet2.tasks", "espnet3"))),
                      hooks=sum(getattr(f, "_espnet_flashcompat_hook", False) for f in sys.meta_path))))
"""))
    assert out["first"] == out["second"] == []  # nothing imported yet, so nothing registered yet
    assert out["heavy"] == [] and out["tasks"] == []  # and register() imported nothing
    assert out["hooks"] == 1


# The modules that offer ESPnet's S3prlFrontend as `s3prl`, and the choices in each (found by reading the wheels).
_OFFERING = {f"espnet2.tasks.{task}": ["frontend"] for task in (
    "asr", "st", "slu", "s2t", "s2t_ctc", "uasr", "diar", "spk", "lid", "cls", "asvspoof", "s2st")}
_OFFERING["espnet2.tasks.enh_s2t"] = ["diar_frontend", "frontend"]  # ASR's choices and a deep copy of diar's
if STACK == "current":
    _OFFERING.update({"espnet2.tasks.aqa": ["frontend"], "espnet3.systems.esp2_asr.task": ["frontend"]})
_NOT_OFFERING = ["espnet2.tasks.mt", "espnet2.tasks.hubert"]  # frontend_choices without S3PRL


@pytest.mark.slow
def test_every_module_that_offers_s3prl_gets_the_key_when_imported():
    out = result_of(run_python(f"""
import importlib, json, sys
import espnet_flashcompat.espnet.registry as r
r.startup()
from espnet_flashcompat.frontend import S3prlFlashCompatFrontend as ours
offered, loaders = {{}}, []
for name in {sorted(_OFFERING) + _NOT_OFFERING!r}:
    module = importlib.import_module(name)
    offered[name] = sorted(attr for attr, value in vars(module).items()
                           if isinstance(getattr(value, "classes", None), dict)
                           and value.classes.get("s3prl_flashcompat") is ours)
    loaders.append(type(module.__loader__).__name__ == "SourceFileLoader" and module.__spec__.loader is module.__loader__)
from espnet2.tasks.asr import ASRTask
asr_choices = [c for c in ASRTask.class_choices_list if c.name == "frontend"][0]
print(json.dumps(dict(offered=offered, state=r.hook_state(), loaders=all(loaders),
                      asr_class=asr_choices.get_class("s3prl_flashcompat") is ours,
                      asr_choices=list(asr_choices.choices()))))
"""))
    assert out["asr_class"] and "s3prl_flashcompat" in out["asr_choices"] and "s3prl" in out["asr_choices"]
    assert out["loaders"]  # the modules see their real loader, as without us
    for name in _NOT_OFFERING:
        assert out["offered"][name] == [], name
    # enh_s2t: ASR's frontend_choices, diar's (imported as diar_front_end_choices_) and its deep copy
    assert out["offered"]["espnet2.tasks.enh_s2t"] == ["diar_front_end_choices_", "diar_frontend_choices",
                                                       "frontend_choices"]
    assert out["state"]["registered"] == _OFFERING
    assert out["state"]["failed"] == {} and out["state"]["frontend_error"] is None


@pytest.mark.slow
def test_register_updates_an_already_imported_task_once():
    out = result_of(run_python("""
import json, sys
import espnet_flashcompat.espnet.registry as r
r.startup()  # ESPNET_FLASHCOMPAT_DISABLE=1: stays unarmed
import espnet2.tasks.asr as asr
before = "s3prl_flashcompat" in asr.frontend_choices.classes
first = r.register()
keys = list(asr.frontend_choices.classes)
second = r.register()
print(json.dumps(dict(before=before, first=first, second=second, keys=keys,
                      keys_again=list(asr.frontend_choices.classes), state=r.hook_state(),
                      cls=asr.frontend_choices.classes["s3prl_flashcompat"].__qualname__)))
""", disable=True))
    assert out["before"] is False
    assert out["first"] == out["second"] == ["espnet2.tasks.asr"]
    assert out["keys"].count("s3prl_flashcompat") == 1 and out["keys_again"] == out["keys"]
    assert out["cls"] == "S3prlFlashCompatFrontend"
    assert out["state"]["registered"] == {"espnet2.tasks.asr": ["frontend"]}
    assert out["state"]["armed"]  # register() arms the hook for the modules not imported yet


@pytest.mark.slow
def test_replace_env_makes_stock_s3prl_build_ours():
    out = result_of(run_python("""
import json, os
os.environ["ESPNET_FLASHCOMPAT_REPLACE_S3PRL"] = "1"
import espnet_flashcompat.espnet.registry as r
r.startup()
import espnet2.tasks.asr as asr
from espnet_flashcompat.frontend import S3prlFlashCompatFrontend as ours
print(json.dumps(dict(stock=asr.frontend_choices.get_class("s3prl") is ours,
                      key=asr.frontend_choices.get_class("s3prl_flashcompat") is ours,
                      state=r.hook_state())))
"""))
    assert out["stock"] and out["key"] and out["state"]["replaces_stock"]


@pytest.mark.slow
@pytest.mark.parametrize("armed", [True, False], ids=["armed", "disabled"])
def test_stock_st_train_accepts_the_key_only_when_armed(armed):
    proc = run_python("""
import runpy, sys
import espnet_flashcompat.espnet.registry as r
r.startup()
sys.argv = ["st_train"] + sys.argv[1:]
runpy.run_module("espnet2.bin.st_train", run_name="__main__", alter_sys=True)
""", disable=not armed, args=["--print_config", "--frontend", "s3prl_flashcompat"])
    if armed:
        assert proc.returncode == 0, proc.stderr[-5000:]
        assert "\nfrontend: s3prl_flashcompat\n" in proc.stdout
        assert "attn_implementation: auto" in proc.stdout  # frontend_conf defaults come from our class
    else:
        assert proc.returncode == 2
        assert "invalid choice: 's3prl_flashcompat'" in proc.stderr


@pytest.mark.slow
def test_an_unimportable_frontend_stays_silent_until_asked_for():
    """The key is registered as a stand-in: the task imports and trains other frontends quietly; building
    ``s3prl_flashcompat`` raises the real ImportError, not ESPnet's bare "--frontend must be one of"."""
    proc = run_python("""
import json, sys
import espnet_flashcompat.espnet.registry as r
sys.modules["espnet_flashcompat.frontend"] = None  # importing the frontend now raises ImportError
r.startup()
import espnet2.tasks.uasr as uasr
stock = type(uasr.frontend_choices.get_class("default")()).__name__
try:
    uasr.frontend_choices.get_class("s3prl_flashcompat")(fs=16000)
    error = None
except ImportError as exc:
    error = f"{type(exc).__name__}: {exc} <- {type(exc.__cause__).__name__}"
print(json.dumps(dict(task=uasr.UASRTask.__name__, stock=stock, error=error, state=r.hook_state())))
""")
    out = result_of(proc)
    assert out["task"] == "UASRTask" and out["stock"] == "DefaultFrontend"
    assert out["error"].startswith("ImportError: frontend 's3prl_flashcompat' cannot be built: "
                                   "espnet_flashcompat.frontend:S3prlFlashCompatFrontend failed to import: "
                                   "ModuleNotFoundError: import of espnet_flashcompat.frontend halted")
    assert out["error"].endswith("<- ModuleNotFoundError")
    assert out["state"]["registered"] == {"espnet2.tasks.uasr": ["frontend"]}
    assert out["state"]["frontend_error"].startswith("ModuleNotFoundError")
    assert "s3prl_flashcompat" not in proc.stderr  # nothing said to a user who did not ask


def test_startup_never_raises_in_a_broken_process():
    proc = run_python("""
import json, sys
import espnet_flashcompat.espnet.registry as r
# a meta_path that cannot take the hook (minus the one an installed .pth may have armed already)
sys.meta_path = tuple(f for f in sys.meta_path if not getattr(f, "_espnet_flashcompat_hook", False))
r.startup()
print(json.dumps(r.hook_state()))
""")
    out = result_of(proc)
    assert not out["armed"] and out["startup_error"].startswith("AttributeError")
    assert proc.stderr == ""


@pytest.mark.parametrize("damage", ["registry raises", "package missing"])
def test_pth_line_stays_silent_on_a_broken_install(tmp_path, damage):
    """The real ``.pth`` line, processed by ``site`` from a site dir whose package is broken or gone."""
    site_dir = tmp_path / "site-packages"
    site_dir.mkdir()
    (site_dir / registry.PTH_NAME).write_text(registry.PTH_LINE)
    if damage == "registry raises":
        package = site_dir / "espnet_flashcompat"
        package.mkdir()
        for name in ("__init__.py", "_moved.py", "espnet/__init__.py"):
            (package / name).parent.mkdir(exist_ok=True)
            (package / name).write_text((REPO / "espnet_flashcompat" / name).read_text())
        (package / "espnet" / "registry.py").write_text("raise RuntimeError('broken on purpose')\n")
    # -S: no site-packages of the running venv, so only site_dir can provide espnet_flashcompat
    proc = subprocess.run(
        [sys.executable, "-S", "-c", "import json, site, sys; site.addsitedir(sys.argv[1]); "
         "print(json.dumps(sorted(m for m in sys.modules if m.startswith('espnet_flashcompat'))))", str(site_dir)],
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", registry.DISABLE_ENV)},
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0 and proc.stderr == ""
    expected = ["espnet_flashcompat", "espnet_flashcompat._moved", "espnet_flashcompat.espnet"] \
        if damage == "registry raises" else []
    assert json.loads(proc.stdout) == expected  # the import was really attempted, and failed quietly
