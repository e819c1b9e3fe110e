#!/usr/bin/env python3
"""Create the tiny random HF wav2vec2 that the recipe's config loads through S3PRL's hf_wav2vec2_custom.

The directory is the ``path_or_url`` found in the training config, so the two cannot disagree; ``--out DIR`` names
it instead (egs_example/egs3_asr's dataset builder passes the path_or_url of its ESPnet3 config that way).
Nothing is downloaded; an existing directory is reused.
"""

import argparse
import logging

import yaml


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="training YAML with frontend_conf.frontend_conf.path_or_url")
    where.add_argument("--out", help="write the upstream here (instead of the config's path_or_url)")
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s (make_upstream) %(message)s")
    path = args.out
    if path is None:
        with open(args.config) as f:
            conf = yaml.safe_load(f)
        path = ((conf.get("frontend_conf") or {}).get("frontend_conf") or {}).get("path_or_url")
        if not path:
            logging.info("%s loads no local upstream (frontend: %s); nothing to do", args.config, conf.get("frontend"))
            return
    from transformers.utils import logging as hf_logging

    from espnet_flashcompat.testing import make_tiny_hf_upstream

    hf_logging.disable_progress_bar()

    out = make_tiny_hf_upstream(
        path, "wav2vec2", hidden_size=args.hidden_size, num_layers=args.num_layers,
        num_heads=args.num_heads, seed=args.seed,
    )
    logging.info("tiny wav2vec2 upstream (hidden %d, %d layers): %s", args.hidden_size, args.num_layers, out)


if __name__ == "__main__":
    main()
