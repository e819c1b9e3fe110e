"""Build script: ships the startup hook ``espnet_flashcompat.pth`` into site-packages.

Metadata lives in setup.cfg; pyproject.toml makes every pip build through PEP 517/660 (without it, old pips and
venvs holding setuptools + wheel run ``setup.py install``/``develop``, which skip the hook). This file adds the
one-line ``.pth`` file (its name and line come from ``espnet_flashcompat.espnet.registry``, which imports nothing heavy) in
both install modes:

- ``pip install .``: ``build_py`` writes it at the root of build_lib, so it sits at the root of the wheel
  and pip puts it in site-packages.
- ``pip install -e .`` (PEP 660): the editable wheel holds no build_lib files, so the strategy that
  ``editable_wheel`` selects is wrapped to also write the ``.pth`` into the editable wheel.

Either way it is a file of the wheel, hence listed in RECORD, and ``pip uninstall`` removes it.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from espnet_flashcompat.espnet.registry import PTH_LINE, PTH_NAME  # noqa: E402

sys.path.pop(0)


class BuildPyWithPth(build_py):
    """build_py that also writes the startup hook at the root of build_lib (regular installs)."""

    def run(self):
        super().run()
        if not self.editable_mode:  # the editable wheel gets it from EditableWheelWithPth
            target = os.path.join(self.build_lib, PTH_NAME)
            self.announce(f"writing {target}", level=2)
            if not self.dry_run:
                with open(target, "w", encoding="utf-8") as f:
                    f.write(PTH_LINE)

    def get_outputs(self, *args, **kwargs):
        outputs = super().get_outputs(*args, **kwargs)
        if self.editable_mode:
            return outputs
        return outputs + [os.path.join(self.build_lib, PTH_NAME)]


class _StrategyWithPth:
    """Delegates to setuptools' editable strategy, then adds the startup hook to the editable wheel."""

    def __init__(self, strategy):
        self.strategy = strategy

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self.strategy.__exit__(*exc)

    def __call__(self, wheel, files, mapping):
        self.strategy(wheel, files, mapping)
        wheel.writestr(PTH_NAME, PTH_LINE.encode("utf-8"))


cmdclass = {"build_py": BuildPyWithPth}

try:  # setuptools >= 64 (PEP 660); pip builds editables in an isolated env with a recent setuptools
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # pragma: no cover - no PEP 660 support, no editable install to hook
    editable_wheel = None

if editable_wheel is not None and hasattr(editable_wheel, "_select_strategy"):

    class EditableWheelWithPth(editable_wheel):
        def _select_strategy(self, *args, **kwargs):
            return _StrategyWithPth(super()._select_strategy(*args, **kwargs))

    cmdclass["editable_wheel"] = EditableWheelWithPth
elif editable_wheel is not None:  # pragma: no cover - a setuptools whose internals moved
    print(f"warning: this setuptools has no editable_wheel._select_strategy; 'pip install -e' will not "
          f"install {PTH_NAME}: call espnet_flashcompat.register() yourself", file=sys.stderr)

setup(cmdclass=cmdclass)
