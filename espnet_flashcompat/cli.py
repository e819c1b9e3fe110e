"""The ``espnet-flashcompat`` command line: argument parsing and printing, for ``doctor``, ``to-stock``, ``calibrations``.

``doctor`` prints ``doctor.text.render()`` or, with ``--json``, the report as JSON, and exits with the report's
exit code (0 healthy, 1 degraded, 2 broken; see ``espnet_flashcompat.doctor.report``). While the checks run,
whatever the imported libraries print or log is held back (``--verbose`` lets it through, to stderr), so
that stdout carries the report alone. A usage error exits 64 (EX_USAGE), so that 2 always means broken.

``to-stock`` runs ``handoff.convert.to_stock`` and prints ``handoff.convert.render()``; it exits 0 when the output
is written and verified, 1 when verification failed, 2 when SRC or OUT is refused (nothing is written then), with the
reason on stderr.

``calibrations`` lists the calibration store's entries (``--json``) or removes them (``--clear``); it exits 0.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import sys
from typing import List, Optional


USAGE_ERROR = 64


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="espnet-flashcompat", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    doctor = commands.add_parser(
        "doctor", help="report the state of torch, GPUs, flash-attn, transformers, S3PRL and ESPnet",
        description="Report what espnet-flashcompat sees in this Python environment and the frontend_conf to use. "
                    "Exit code: 0 healthy, 1 degraded (a fallback is in force), "
                    "2 broken (the frontend cannot be built).")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON (schema_version 2)")
    doctor.add_argument("--quick", action="store_true",
                        help="skip importing every S3PRL upstream package and every ESPnet task module (the slow part)")
    doctor.add_argument("--upstream", metavar="NAME",
                        help="the S3PRL upstream you train with: checked (exit 2 if it cannot be imported) and put "
                             "in the recommended YAML (default: hf_wav2vec2_custom, not required)")
    doctor.add_argument("--verbose", action="store_true",
                        help="let library output and log messages through to stderr while checking")
    to_stock = commands.add_parser(
        "to-stock", help="copy a model trained with frontend: s3prl_flashcompat so that stock ESPnet loads it",
        description="Write a copy of a model trained with frontend: s3prl_flashcompat that stock ESPnet loads without "
                    "espnet-flashcompat (config.yaml: frontend: s3prl, attn_implementation and strict dropped; weights "
                    "unchanged), after verifying it with stock ESPnet. Exit code: 0 written and verified, "
                    "1 verification failed, 2 refused; nothing is written unless 0.")
    to_stock.add_argument("src", metavar="SRC",
                          help="an experiment's config.yaml (or its folder) with the model file beside it, "
                               "or a zip made by `python -m espnet2.bin.pack`")
    to_stock.add_argument("out", metavar="OUT",
                          help="the folder to write (new or empty); for a zip SRC, the zip is written into it under "
                               "the same name, or to OUT itself if OUT ends in .zip")
    to_stock.add_argument("--model", metavar="FILE",
                          help="the model file of a config.yaml SRC; a bare name is also looked up beside config.yaml "
                               "(default: valid.acc.ave.pth beside config.yaml, the file asr.sh decodes with)")
    to_stock.add_argument("--task", metavar="NAME",
                          help="the ESPnet task that builds the model, espnet2.tasks.NAME (default: the one a zip's "
                               "meta.yaml names, else asr)")
    calibrations = commands.add_parser(
        "calibrations", help="list (or clear) the calibrations auto keeps on disk",
        description="List the calibrations that attn_implementation: auto keeps in its store (location: "
                    "ESPNET_FLASHCOMPAT_CALIBRATION_DIR, else the user's cache directory), or remove them.")
    calibrations.add_argument("--json", action="store_true", help="print the entries as JSON")
    calibrations.add_argument("--clear", action="store_true",
                              help="remove every entry: the next runs calibrate again")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "to-stock":
        return _to_stock(args)
    if args.command == "calibrations":
        return _calibrations(args)
    from espnet_flashcompat.doctor.report import gather
    from espnet_flashcompat.doctor.text import render

    if args.verbose:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
        report = _stdout_to_stderr(lambda: gather(quick=args.quick, upstream=args.upstream))
    else:
        report = _held_back(lambda: gather(quick=args.quick, upstream=args.upstream))
    print(json.dumps(report, indent=2) if args.json else render(report))
    return report["exit_code"]


def _to_stock(args) -> int:
    from espnet_flashcompat.handoff import convert

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = convert.to_stock(args.src, args.out, model=args.model, task=args.task)
    except convert.HandoffError as exc:
        print(f"espnet-flashcompat to-stock: {exc}", file=sys.stderr)
        return exc.exit_code
    print(convert.render(result))
    return 0


def _calibrations(args) -> int:
    from espnet_flashcompat.attention import store

    location = store.location()
    if args.clear:
        print(f"removed {store.clear()} calibration(s) from {location}")
        return 0
    records = store.entries()
    if args.json:
        print(json.dumps({"location": str(location) if location else None, "entries": [
            {"key": r.key.fields(), "entry": dataclasses.asdict(r.entry), "file": str(r.path)} for r in records]},
            indent=2))
        return 0
    print(f"calibration store: {location or f'off ({store.ENV_VAR})'}, {len(records)} entries")
    for r in records:
        k = r.key.flat()
        shape = "/".join(map(str, k["bucket"]))
        print(f"  {k['gpu']} torch {k['torch']} {k['model']} {k['dtype']} {'train' if k['train'] else 'eval'} "
              f"[{shape}]: {r.entry.pick} (batch {r.entry.batch}, {r.entry.cost_s:.1f} s, {r.entry.written})")
    return 0


def _stdout_to_stderr(gather):
    with contextlib.redirect_stdout(sys.stderr):
        return gather()


def _held_back(gather):
    """Run ``gather`` with Python-level stdout, stderr and warnings captured; replay them only if it raises."""
    noise = io.StringIO()
    try:
        with contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            return gather()
    except BaseException:
        sys.stderr.write(noise.getvalue())
        raise


if __name__ == "__main__":
    sys.exit(main())
