"""The tiny ESPnet ASR model the model-wide policy's tests build: its config (the kind of model most ESPnet ASR
recipes train: default fbank frontend, E-Branchformer, Transformer decoder), its token list, and ``build``, which
builds it with ESPnet's own (wrapped) ``ASRTask.build_model`` from a parsed YAML; ``SCRIPT``, the same in a script
for a fresh interpreter, with a batch of two utterances; ``run_script`` runs one on the model's YAML."""

import sys

import torch
import yaml

from faults import run

TOKENS = ["<blank>", "<unk>", "a", "b", "c", "<sos/eos>"]
MODEL = {
    "frontend": "default", "frontend_conf": {"n_fft": 128, "hop_length": 64, "n_mels": 20},
    "encoder": "e_branchformer",
    "encoder_conf": {"output_size": 32, "attention_heads": 2, "attention_layer_type": "selfattn",
                     "pos_enc_layer_type": "abs_pos", "cgmlp_linear_units": 64, "linear_units": 64, "num_blocks": 2,
                     "input_layer": "conv2d", "attention_dropout_rate": 0.1},
    "decoder": "transformer",
    "decoder_conf": {"attention_heads": 2, "linear_units": 32, "num_blocks": 1},
    "model_conf": {"ctc_weight": 0.3},
}


def build(tmp_path, seed=0, **extra):
    """``MODEL`` updated with ``extra`` (YAML keys), built by ``ASRTask.build_model`` after ``torch.manual_seed(seed)``."""
    from espnet2.tasks.asr import ASRTask

    (tmp_path / "tokens.txt").write_text("\n".join(TOKENS) + "\n")
    config = tmp_path / f"model{seed}{len(extra)}.yaml"
    config.write_text(yaml.safe_dump({**MODEL, **extra}))
    args = ASRTask.get_parser().parse_args(["--config", str(config), "--token_list", str(tmp_path / "tokens.txt")])
    torch.manual_seed(seed)
    return ASRTask.build_model(args)


SCRIPT = """
import hashlib, io, json, sys, torch, yaml
from espnet2.tasks.asr import ASRTask
config, tokens = sys.argv[1:3]
args = ASRTask.get_parser().parse_args(["--config", config, "--token_list", tokens])
torch.manual_seed(0)
model = ASRTask.build_model(args).train()
g = torch.Generator().manual_seed(0)
speech, lengths = 0.1 * torch.randn(2, 8000, generator=g), torch.tensor([8000, 5600])
"""


def run_script(tmp_path, script: str, config=None, **kwargs):
    """``python -c script model.yaml tokens.txt`` in a fresh interpreter (``faults.run``, whose keyword arguments
    pass through), the YAML ``MODEL`` updated with ``config``."""
    (tmp_path / "tokens.txt").write_text("\n".join(TOKENS) + "\n")
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({**MODEL, **(config or {})}))
    return run([sys.executable, "-c", script, tmp_path / "model.yaml", tmp_path / "tokens.txt"], **kwargs)
