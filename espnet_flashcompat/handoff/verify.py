"""The proof step of ``espnet-flashcompat to-stock`` (``convert``): stock ESPnet loads the output as the plugin
loads SRC.

``verify()`` builds, strictly loads and runs both sides on CPU, at once, each in a fresh interpreter (``probe``):
SRC with our frontend registered, the output with ``ESPNET_FLASHCOMPAT_DISABLE=1``, which must get ESPnet's
``S3prlFrontend`` without ever importing ours. Each runs the S3PRL frontends and the encoder on one fixed random
batch; the outputs must be equal, or within float32 rounding of each other where the two frontends run different
attention kernels. Any difference raises ``VerificationFailed`` with what differed.
"""

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple, Tuple

from espnet_flashcompat.espnet.registry import DISABLE_ENV, REPLACE_ENV

logger = logging.getLogger(__name__)

STOCK_FRONTEND = "espnet2.asr.frontend.s3prl.S3prlFrontend"
PLUGIN_FRONTEND = "espnet_flashcompat.frontend.S3prlFlashCompatFrontend"
# Two float32 runs of the same weights that differ only in the attention kernel agree to rounding: plugin eager against
# stock SDPA on the tests' tiny model, max abs diff 6e-7 on values of order 1. Wrong weights differ by the values.
RTOL, ATOL = 1e-4, 1e-5
_PROBE = "import sys; from espnet_flashcompat.handoff.verify import probe; probe(*sys.argv[1:])"


class HandoffError(Exception):
    exit_code = 2


class VerificationFailed(HandoffError):
    """Stock ESPnet did not load the output as the plugin loads SRC: nothing was written."""

    exit_code = 1


class Verification(NamedTuple):
    keys_matched: int  # keys of the model file that the stock model has
    keys_total: int  # keys of the model file and of the stock model, together
    outputs: List[Tuple[str, str]]  # (what, "bit-identical" or the max abs diff within tolerance)
    espnet: str  # the stock side's ESPnet version
    plugin_attention: str  # the attention the plugin side ran


def verify(task: str, plugin_files: Tuple[Path, Path], stock_files: Tuple[Path, Path], scratch: Path) -> Verification:
    """Build, load and run both sides in fresh interpreters (at once); raise VerificationFailed on any difference."""
    logger.info("to-stock: verifying with stock ESPnet (task %s, CPU, %s=1) against the plugin", task, DISABLE_ENV)
    sides = {"plugin": plugin_files, "stock": stock_files}
    runs = {side: _start_probe(side, task, *files, scratch) for side, files in sides.items()}
    for process, _, _ in runs.values():  # both end before either is judged: none outlives the scratch folder
        process.wait()
    results = {side: _finish_probe(side, *run) for side, run in runs.items()}
    plugin, stock = results["plugin"], results["stock"]
    if "s3prl_error" in stock:
        raise VerificationFailed(
            f"stock ESPnet cannot build any S3PRL frontend in this environment (`import s3prl.nn` fails: "
            f"{stock['s3prl_error']}), so the output cannot be verified here; nothing was written. Run to-stock "
            f"where stock S3PRL imports (a receiver with this environment needs espnet-flashcompat anyway)")
    problems = []
    if stock["frontend"] != STOCK_FRONTEND or stock["plugin_imported"]:
        problems.append(f"the stock side built {stock['frontend']} (plugin imported: {stock['plugin_imported']}), "
                        f"not {STOCK_FRONTEND} alone")
    if plugin["frontend"] != PLUGIN_FRONTEND:
        problems.append(f"the plugin side built {plugin['frontend']}, not {PLUGIN_FRONTEND}")
    for side, result in results.items():
        for kind in ("missing", "unexpected"):
            if result[kind]:
                keys = result[kind]
                problems.append(f"{side} side: {len(keys)} {kind} key(s) in strict loading: "
                                f"{', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
    rows = _compare(plugin["outputs"], stock["outputs"], problems) if not problems else []
    if problems:
        raise VerificationFailed("stock ESPnet does not load the output as the plugin loads SRC: "
                                 + "; ".join(problems) + ". Nothing was written")
    return Verification(stock["matched"], stock["total"], rows, stock["espnet"], plugin["attention"])


def _compare(plugin: dict, stock: dict, problems: List[str]) -> List[Tuple[str, str]]:
    import torch

    rows = []
    for name in list(plugin) + [name for name in stock if name not in plugin]:
        if name not in plugin or name not in stock:
            problems.append(f"{name}: only the {'plugin' if name in plugin else 'stock'} side gives it")
            continue
        ref, got = plugin[name], stock[name]
        if ref.shape != got.shape:
            problems.append(f"{name}: shape {tuple(got.shape)} (stock) != {tuple(ref.shape)} (plugin)")
            continue
        diff = (got - ref).abs().max().item() if ref.numel() else 0.0
        if torch.equal(ref, got):
            rows.append((name, "bit-identical"))
        elif torch.allclose(got, ref, rtol=RTOL, atol=ATOL):
            rows.append((name, f"max abs diff {diff:.3g}, within float32 rounding (rtol {RTOL}, atol {ATOL})"))
        else:
            problems.append(f"{name} differs: max abs diff {diff:.3g} (tolerance rtol {RTOL}, atol {ATOL})")
    if not rows and not problems:
        problems.append("no output to compare: the model has no S3PRL frontend")
    return rows


def _start_probe(side: str, task: str, config: Path, model: Path, scratch: Path):
    env = {k: v for k, v in os.environ.items() if k not in (DISABLE_ENV, REPLACE_ENV)}
    if side == "stock":
        env[DISABLE_ENV] = "1"
    result, log = scratch / f"{side}.pt", scratch / f"{side}.log"
    with open(log, "w") as stream:
        process = subprocess.Popen([sys.executable, "-c", _PROBE, side, task, str(config), str(model), str(result)],
                                   env=env, stdout=stream, stderr=subprocess.STDOUT)
    return process, result, log


def _finish_probe(side: str, process, result: Path, log: Path) -> dict:
    if process.returncode == 0 and result.is_file():
        import torch

        return torch.load(result, weights_only=True)
    tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-15:])
    raise VerificationFailed(f"the {side} side could not build, load and run the model (exit {process.returncode}); "
                             f"nothing was written. Its output ends:\n{tail}")


def probe(side: str, task: str, config: str, model_file: str, out: str) -> None:
    """Run in a fresh interpreter by ``_verify``: build, strictly load and run the model; save what it gives."""
    import torch

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if side == "plugin":
        from espnet_flashcompat import register

        register()
    if side == "stock":
        try:
            import s3prl.nn  # noqa: F401  what ESPnet's S3prlFrontend imports: broken stacks fail here, for any model
        except Exception as exc:
            torch.save({"s3prl_error": f"{type(exc).__name__}: {exc}"}, out)
            return
    import espnet2
    from espnet2.asr.frontend.s3prl import S3prlFrontend

    model, _ = _task_class(task).build_model_from_file(config, model_file, "cpu")
    state = torch.load(model_file, map_location="cpu")
    expected = model.state_dict()
    frontends = {name: m for name, m in model.named_modules() if isinstance(m, S3prlFrontend)}
    first = next(iter(frontends.values()), None)
    result = {
        "frontend": f"{type(first).__module__}.{type(first).__qualname__}" if first is not None else "none",
        "plugin_imported": "espnet_flashcompat.frontend" in sys.modules,
        "attention": getattr(getattr(first, "attn_decision", None), "summary", lambda: "stock")(),
        "espnet": str(getattr(espnet2, "__version__", "?")),
        "matched": len(set(state) & set(expected)),
        "total": len(set(state) | set(expected)),
        "missing": sorted(set(expected) - set(state)),
        "unexpected": sorted(set(state) - set(expected)),
        "outputs": {},
    }
    if not result["missing"] and not result["unexpected"]:
        model.load_state_dict(state, strict=True)
        result["outputs"] = _outputs(model, frontends)
    torch.save(result, out)


def _task_class(task: str):
    import importlib

    from espnet2.tasks.abs_task import AbsTask

    module = importlib.import_module(f"espnet2.tasks.{task}")
    classes = [v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, AbsTask) and v.__module__ == module.__name__]
    if len(classes) != 1:
        raise RuntimeError(f"espnet2.tasks.{task} defines {len(classes)} AbsTask classes, not one")
    return classes[0]


def _outputs(model, frontends: dict) -> dict:
    """Each S3PRL frontend's features and the encoder output for two fixed random utterances (1 s, 0.75 s)."""
    import torch

    speech = 0.1 * torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([16000, 12000])
    speech[1, 12000:] = 0.0
    model.eval()
    outputs = {}
    with torch.no_grad():
        for name, frontend in frontends.items():
            outputs[f"{name} features"] = frontend(speech, lengths)[0]
        if callable(getattr(model, "encode", None)):
            encoded = model.encode(speech, lengths)[0]
            outputs["encoder output"] = encoded[0] if isinstance(encoded, tuple) else encoded
    return outputs
