"""Stock ``python -m espnet2.bin.asr_train`` / ``asr_inference`` with ``frontend: s3prl_flashcompat``, no wrapper.

The key reaches ESPnet's config system through the installed startup hook alone. A tiny dataset is written
in the test; the upstream is a tiny random HF wav2vec2 loaded through ``hf_wav2vec2_custom``.
"""

import sys

import numpy as np
import pytest
import soundfile
import yaml

from faults import run
from stacks import STACK

pytestmark = pytest.mark.slow

TOKENS = ["<blank>", "<unk>", "a", "b", "c", "<sos/eos>"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Six one-second utterances with char transcripts, Kaldi style, plus shape files."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    scp, text, speech_shape, text_shape = [], [], [], []
    for i in range(6):
        key, words = f"utt{i}", "".join(rng.choice(list("abc"), size=3))
        wav = root / f"{key}.wav"
        soundfile.write(wav, (0.1 * rng.standard_normal(16000)).astype("float32"), 16000)
        scp.append(f"{key} {wav}")
        text.append(f"{key} {words}")
        speech_shape.append(f"{key} 16000")
        text_shape.append(f"{key} 3")
    for name, lines in [("wav.scp", scp), ("text", text), ("speech_shape", speech_shape), ("text_shape", text_shape),
                        ("tokens.txt", TOKENS)]:
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def _config(tmp_path, tiny, upstream="hf_wav2vec2_custom", **frontend_conf):
    config = {
        "frontend": "s3prl_flashcompat",
        "frontend_conf": {"frontend_conf": {"upstream": upstream, "path_or_url": str(tiny)},
                          "multilayer_feature": True, **frontend_conf},
        "encoder": "transformer",
        "encoder_conf": {"output_size": 16, "attention_heads": 2, "linear_units": 32, "num_blocks": 1,
                         "input_layer": "linear"},
        "decoder": "transformer",
        "decoder_conf": {"attention_heads": 2, "linear_units": 32, "num_blocks": 1},
        "model_conf": {"ctc_weight": 0.5},
        "optim": "adam", "optim_conf": {"lr": 0.001},
        "max_epoch": 1, "batch_type": "folded", "batch_size": 2, "num_iters_per_epoch": 3,
        "num_workers": 0, "keep_nbest_models": 1,
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train(corpus, config, out, pythonpath=(), env=None):
    data = [f"{corpus}/wav.scp,speech,sound", f"{corpus}/text,text,text"]
    argv = [sys.executable, "-m", "espnet2.bin.asr_train", "--config", config, "--output_dir", out, "--ngpu", "0",
            "--token_type", "char", "--token_list", corpus / "tokens.txt", "--normalize", "none",
            "--use_preprocessor", "true", "--fold_length", "80000", "--fold_length", "150"]
    for split in ("train", "valid"):
        argv += [f"--{split}_data_path_and_name_and_type", data[0], f"--{split}_data_path_and_name_and_type", data[1],
                 f"--{split}_shape_file", corpus / "speech_shape", f"--{split}_shape_file", corpus / "text_shape"]
    return run(argv, pythonpath=pythonpath, env=env, timeout=900)


def test_stock_asr_train_and_inference(corpus, tiny_wav2vec2, tmp_path):
    out = tmp_path / "exp"
    proc = _train(corpus, _config(tmp_path, tiny_wav2vec2, attn_implementation="auto"), out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["frontend"] == "s3prl_flashcompat" and saved["frontend_conf"]["attn_implementation"] == "auto"
    assert (out / "1epoch.pth").is_file()
    assert "s3prl_flashcompat: upstream hf_wav2vec2_custom, attention sdpa" in proc.stderr
    decode = run([sys.executable, "-m", "espnet2.bin.asr_inference", "--ngpu", "0", "--asr_train_config",
                  out / "config.yaml", "--asr_model_file", out / "1epoch.pth", "--beam_size", "2",
                  "--data_path_and_name_and_type", f"{corpus}/wav.scp,speech,sound", "--output_dir", tmp_path / "dec"],
                 timeout=600)
    assert decode.returncode == 0, decode.stderr[-3000:]
    hyps = (tmp_path / "dec" / "1best_recog" / "text").read_text().splitlines()
    assert sorted(h.split()[0] for h in hyps) == [f"utt{i}" for i in range(6)]


@pytest.mark.parametrize("strict", [False, True])
def test_training_with_broken_flash_attn(corpus, tiny_wav2vec2, broken_flash_attn, tmp_path, strict):
    """flash_attention_2 requested, flash-attn installed without its kernels: train on SDPA, or fail if strict."""
    config = _config(tmp_path, tiny_wav2vec2, attn_implementation="flash_attention_2", strict=strict)
    proc = _train(corpus, config, tmp_path / "exp", pythonpath=[broken_flash_attn])
    assert "flash_attn_2_cuda" in proc.stderr
    assert "not properly installed" not in proc.stdout + proc.stderr
    if strict:
        assert proc.returncode != 0
        assert "AttentionUnavailableError: strict: attention sdpa (requested flash_attention_2); rejected " \
               "flash_attention_2: ModuleNotFoundError: No module named 'flash_attn_2_cuda'" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (tmp_path / "exp" / "1epoch.pth").is_file()
        assert "falling back to PyTorch SDPA" in proc.stderr


def test_another_task_accepts_the_key():
    proc = run([sys.executable, "-m", "espnet2.bin.st_train", "--print_config", "--frontend", "s3prl_flashcompat"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "frontend: s3prl_flashcompat" in proc.stdout and "attn_implementation: auto" in proc.stdout


def test_wavlm_local_trains_on_the_lean_path_and_hands_off_to_stock(corpus, tmp_path):
    """The path users take with S3PRL's own WavLM: a checkpoint in S3PRL's format through ``wavlm_local``, stock
    ``asr_train`` with ``frontend: s3prl_flashcompat``: its attention runs the lean path, and the trained model
    hands off to stock ESPnet with the same keys and outputs (where stock S3PRL imports: the current stack)."""
    from espnet_flashcompat.testing import make_tiny_wavlm_checkpoint

    checkpoint = make_tiny_wavlm_checkpoint(tmp_path / "tiny_wavlm.pt")
    out = tmp_path / "exp"
    proc = _train(corpus, _config(tmp_path, checkpoint, upstream="wavlm_local"), out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "s3prl_flashcompat: upstream wavlm_local, attention wavlm-lean (requested auto)" in proc.stderr
    assert "WavLM attention: wavlm-lean on 2 modules" in proc.stderr
    handoff = run([sys.executable, "-m", "espnet_flashcompat", "to-stock", out / "config.yaml", tmp_path / "stock",
                   "--model", "1epoch.pth"], timeout=900)
    if STACK == "current":
        assert handoff.returncode == 0, handoff.stdout[-2000:] + handoff.stderr[-3000:]
        assert "keys matched" in handoff.stdout and "(strict)" in handoff.stdout
    else:  # s3prl 0.4.18's hub imports byol_s, which torchaudio >= 2.9 breaks: stock ESPnet cannot build any S3PRL
        assert handoff.returncode == 1 and "cannot be verified" in handoff.stderr + handoff.stdout
