"""``espnet-flashcompat to-stock``, and the way back (``ESPNET_FLASHCOMPAT_REPLACE_S3PRL``), end to end.

A tiny model is trained through stock ``python -m espnet2.bin.asr_train`` with ``frontend: s3prl_flashcompat``
and packed with ``python -m espnet2.bin.pack``; ``to-stock`` converts the experiment folder and the zip, and stock
``python -m espnet2.bin.asr_inference`` with ``ESPNET_FLASHCOMPAT_DISABLE=1`` must decode the results exactly as the
plugin decodes the original (hypotheses and their scores). Features go through ``global_mvn`` with a stats file that
the zip carries, so the paths ``config.yaml`` holds into the zip are exercised too.

On the legacy stack stock S3PRL cannot be imported at all (s3prl 0.4.18 needs torchaudio's ``set_audio_backend``,
gone in 2.9), so no model with an S3PRL frontend loads there without the plugin. The stock side of these tests then
plays a receiver with a working torchaudio: ``RECEIVER_SHIM`` puts back what s3prl 0.4.18 imports. Without it,
to-stock says it cannot verify (``test_unverifiable_where_stock_s3prl_cannot_be_imported``).
"""

import sys
import zipfile

import numpy as np
import pytest
import soundfile
import torch
import yaml

from espnet_flashcompat.handoff import convert as handoff, verify as handoff_verify
from espnet_flashcompat.espnet import registry
from faults import run
from stacks import TORCHAUDIO_BREAKS_STOCK, only_on

TOKENS = ["<blank>", "<unk>", "a", "b", "c", "<sos/eos>"]
STOCK = {registry.DISABLE_ENV: "1"}
STATS = "stats/feats_stats.npz"  # relative to the recipe folder, as asr.sh writes it
MODEL = "valid.acc.ave.pth"
RECEIVER_SHIM = '''"""Test shim (tests/test_handoff.py): torchaudio with what s3prl 0.4.18 imports, as before 2.9."""
import sys, types
import torchaudio
torchaudio.set_audio_backend = getattr(torchaudio, "set_audio_backend", lambda *args, **kwargs: None)
sys.modules.setdefault("torchaudio.sox_effects", types.SimpleNamespace(apply_effects_tensor=None))
'''


def to_stock(*args, cwd, pythonpath=()):
    return run([sys.executable, "-m", "espnet_flashcompat", "to-stock", *args], cwd=cwd, pythonpath=pythonpath,
               timeout=900)


# ---- without training -----------------------------------------------------------------------------------------

CONFIG = """\
# written by hand
frontend: s3prl_flashcompat   # ours
frontend_conf:
    frontend_conf:
        upstream: hf_wav2vec2_custom
        path_or_url: /models/tiny
    multilayer_feature: true
    attn_implementation: flash_attention_2
    strict: true
    layer: -1
encoder: transformer
encoder_conf:
    strict: true
    attn_implementation: keep me
"""


def test_stock_config_edits_the_text():
    text, dropped = handoff.stock_config(CONFIG)
    assert dropped == {"attn_implementation": "flash_attention_2", "strict": True}
    note, _, body = text.partition("\n")
    assert note.startswith("# espnet-flashcompat ") and "to-stock" in note
    assert body == CONFIG.replace("s3prl_flashcompat   # ours", "s3prl   # ours").replace(
        "    attn_implementation: flash_attention_2\n    strict: true\n", "")
    expected = yaml.safe_load(CONFIG)
    expected["frontend"] = "s3prl"
    del expected["frontend_conf"]["attn_implementation"], expected["frontend_conf"]["strict"]
    assert yaml.safe_load(text) == expected


def test_stock_config_redumps_a_layout_it_cannot_edit():
    flow = "frontend: s3prl_flashcompat\nfrontend_conf: {layer: 3, strict: false, attn_implementation: sdpa}\n"
    text, dropped = handoff.stock_config(flow)
    assert dropped == {"strict": False, "attn_implementation": "sdpa"}
    assert yaml.safe_load(text) == {"frontend": "s3prl", "frontend_conf": {"layer": 3}}


def test_extra_keys_are_what_our_frontend_adds():
    import inspect

    from espnet2.asr.frontend.s3prl import S3prlFrontend

    from espnet_flashcompat.frontend import S3prlFlashCompatFrontend

    ours, stock = (inspect.signature(c.__init__).parameters for c in (S3prlFlashCompatFrontend, S3prlFrontend))
    assert set(ours) - set(stock) == set(handoff.EXTRA_KEYS)


def test_compare_reports_what_differs():
    ref = {"encoder output": torch.ones(2, 3), "frontend features": torch.zeros(2, 4)}
    problems = []
    rows = handoff_verify._compare(ref, {k: v.clone() for k, v in ref.items()}, problems)
    assert rows == [("encoder output", "bit-identical"), ("frontend features", "bit-identical")] and not problems
    rows = handoff_verify._compare(ref, {"encoder output": ref["encoder output"] + 1e-7, "frontend features": ref[
        "frontend features"] + 0.5}, problems)
    assert rows[0][0] == "encoder output" and "within float32 rounding" in rows[0][1]
    assert problems == ["frontend features differs: max abs diff 0.5 (tolerance rtol 0.0001, atol 1e-05)"]


def test_refuses_a_config_that_is_not_ours(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "config.yaml").write_text(CONFIG.replace("s3prl_flashcompat", "s3prl"))
    (exp / MODEL).write_bytes(b"")
    proc = to_stock(exp / "config.yaml", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "the config has frontend: s3prl, not s3prl_flashcompat: nothing to convert" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_refuses_a_missing_model_file(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "config.yaml").write_text(CONFIG)
    (exp / "1epoch.pth").write_bytes(b"")
    proc = to_stock(exp, tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"model file {exp / MODEL} not found; model files beside config.yaml: 1epoch.pth. " \
           "Name one with --model FILE" in proc.stderr
    proc = to_stock(exp / "config.yaml", tmp_path / "out", "--model", "2epoch.pth", cwd=tmp_path)
    assert proc.returncode == 2 and "model file 2epoch.pth not found" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


# ---- trained models -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def receiver(tmp_path_factory):
    """PYTHONPATH for the stock side: RECEIVER_SHIM where torchaudio breaks stock S3PRL, else nothing."""
    if not TORCHAUDIO_BREAKS_STOCK:
        return []
    shim = tmp_path_factory.mktemp("receiver")
    (shim / "sitecustomize.py").write_text(RECEIVER_SHIM)
    return [shim]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A recipe folder: six one-second utterances with char transcripts, Kaldi style, and a feats stats file."""
    root = tmp_path_factory.mktemp("recipe")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    lines = {name: [] for name in ("wav.scp", "text", "speech_shape", "text_shape")}
    for i in range(6):
        key, words = f"utt{i}", "".join(rng.choice(list("abc"), size=3))
        soundfile.write(data / f"{key}.wav", (0.1 * rng.standard_normal(16000)).astype("float32"), 16000)
        lines["wav.scp"].append(f"{key} {data / key}.wav")
        lines["text"].append(f"{key} {words}")
        lines["speech_shape"].append(f"{key} 16000")
        lines["text_shape"].append(f"{key} 3")
    lines["tokens.txt"] = TOKENS
    for name, content in lines.items():
        (data / name).write_text("\n".join(content) + "\n")
    (root / STATS).parent.mkdir()
    dim = 32  # the tiny upstream's hidden size: S3PRL's featurizer output
    np.savez(root / STATS, count=np.array(100.0), sum=rng.standard_normal(dim) * 10,
             sum_square=100 + rng.random(dim) * 50)
    return root


def _train(recipe, tiny, out, frontend, env=None, pythonpath=(), **frontend_conf):
    config = {
        "frontend": frontend,
        "frontend_conf": {"frontend_conf": {"upstream": "hf_wav2vec2_custom", "path_or_url": str(tiny)},
                          "multilayer_feature": True, **frontend_conf},
        "normalize": "global_mvn", "normalize_conf": {"stats_file": STATS},
        "encoder": "transformer",
        "encoder_conf": {"output_size": 16, "attention_heads": 2, "linear_units": 32, "num_blocks": 1,
                         "input_layer": "linear"},
        "decoder": "transformer",
        "decoder_conf": {"attention_heads": 2, "linear_units": 32, "num_blocks": 1},
        "model_conf": {"ctc_weight": 0.5},
        "optim": "adam", "optim_conf": {"lr": 0.01},
        "max_epoch": 1, "batch_type": "folded", "batch_size": 2, "num_iters_per_epoch": 3,
        "num_workers": 0, "keep_nbest_models": 1,
    }
    (recipe / f"{out}.yaml").write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "espnet2.bin.asr_train", "--config", f"{out}.yaml", "--output_dir", out,
            "--ngpu", "0", "--token_type", "char", "--token_list", "data/tokens.txt", "--use_preprocessor", "true",
            "--fold_length", "80000", "--fold_length", "150"]
    for split in ("train", "valid"):
        argv += [f"--{split}_data_path_and_name_and_type", "data/wav.scp,speech,sound",
                 f"--{split}_data_path_and_name_and_type", "data/text,text,text",
                 f"--{split}_shape_file", "data/speech_shape", f"--{split}_shape_file", "data/text_shape"]
    proc = run(argv, env=env, pythonpath=pythonpath, cwd=recipe, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (recipe / out / MODEL).is_file()
    return recipe / out


def decode(recipe, config, model, out, env=None, cwd=None, pythonpath=()):
    """Stock ``asr_inference`` of the recipe's utterances: (the 1-best files, by name; the process)."""
    proc = run([sys.executable, "-m", "espnet2.bin.asr_inference", "--ngpu", "0", "--asr_train_config", config,
                "--asr_model_file", model, "--beam_size", "2", "--output_dir", out,
                "--data_path_and_name_and_type", f"{recipe}/data/wav.scp,speech,sound"],
               env=env, pythonpath=pythonpath, cwd=cwd or recipe, timeout=600)
    best = out / "1best_recog"
    files = {f: (best / f).read_text() for f in ("text", "score", "token")} if proc.returncode == 0 else None
    return files, proc


def unpack(archive, out):
    """ESPnet's own unpacking (file handling only), as a model tag goes through it. Returns its file dict."""
    from espnet2.main_funcs.pack_funcs import unpack

    return unpack(archive, out)


@pytest.fixture(scope="module")
def plugin_model(recipe, tiny_wav2vec2):
    """(experiment folder, its zip, the plugin's decode of it) for a model trained with s3prl_flashcompat."""
    exp = _train(recipe, tiny_wav2vec2, "exp_plugin", "s3prl_flashcompat", attn_implementation="auto", strict=False)
    proc = run([sys.executable, "-m", "espnet2.bin.pack", "asr", "--asr_train_config", "exp_plugin/config.yaml",
                "--asr_model_file", f"exp_plugin/{MODEL}", "--option", STATS, "--outpath", "packed/plugin.zip"],
               cwd=recipe)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hyps, proc = decode(recipe, exp / "config.yaml", exp / MODEL, recipe / "dec_plugin")
    assert hyps is not None, proc.stderr[-3000:]
    assert "s3prl_flashcompat: upstream hf_wav2vec2_custom, attention" in proc.stderr
    assert sorted(line.split()[0] for line in hyps["score"].splitlines()) == [f"utt{i}" for i in range(6)]
    return exp, recipe / "packed" / "plugin.zip", hyps


def _assert_report(stdout):
    keys = next(line for line in stdout.splitlines() if "keys matched:" in line)
    matched, total = keys.split(":")[1].split()[0].split("/")
    assert matched == total and int(total) > 50, stdout
    assert "encoder output: bit-identical" in stdout and "frontend features: bit-identical" in stdout, stdout


@pytest.mark.slow
def test_experiment_to_stock_decodes_the_same_without_the_plugin(plugin_model, recipe, receiver, tmp_path):
    exp, _, plugin_hyps = plugin_model
    out = tmp_path / "stock"
    proc = to_stock(exp / "config.yaml", out, cwd=recipe, pythonpath=receiver)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_report(proc.stdout)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", MODEL]
    assert (out / MODEL).read_bytes() == (exp / MODEL).read_bytes()
    original, converted = (yaml.safe_load((d / "config.yaml").read_text()) for d in (exp, out))
    assert converted["frontend"] == "s3prl"
    assert set(original["frontend_conf"]) - set(converted["frontend_conf"]) == {"attn_implementation", "strict"}
    original["frontend"], converted["frontend_conf"] = "s3prl", original["frontend_conf"]
    assert converted == original
    assert (out / "config.yaml").read_text().startswith("# espnet-flashcompat ")

    hyps, proc = decode(recipe, out / "config.yaml", out / MODEL, tmp_path / "dec", env=STOCK, pythonpath=receiver)
    assert hyps == plugin_hyps, proc.stderr[-3000:]
    assert "s3prl_flashcompat" not in proc.stderr  # our frontend was not in it


@pytest.mark.slow
def test_zip_to_stock_decodes_the_same_without_the_plugin(plugin_model, recipe, receiver, tmp_path):
    _, packed, plugin_hyps = plugin_model
    files = unpack(packed, tmp_path / "plugin_unpacked")
    hyps, proc = decode(recipe, files["asr_train_config"], files["asr_model_file"], tmp_path / "dec0", env=STOCK,
                        cwd=tmp_path, pythonpath=receiver)
    assert hyps is None and "--frontend s3prl_flashcompat" in proc.stderr  # what a receiver without the plugin sees

    proc = to_stock(packed, tmp_path / "out", cwd=tmp_path, pythonpath=receiver)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_report(proc.stdout)
    converted = tmp_path / "out" / "plugin.zip"
    with zipfile.ZipFile(packed) as old, zipfile.ZipFile(converted) as new:
        assert new.namelist() == old.namelist()
        changed = [n for n in old.namelist() if old.read(n) != new.read(n)]
        assert changed == ["exp_plugin/config.yaml"]
        assert STATS in new.namelist()
        assert yaml.safe_load(new.read(changed[0]))["frontend"] == "s3prl"

    files = unpack(converted, tmp_path / "stock_unpacked")
    assert yaml.safe_load(open(files["asr_train_config"]))["normalize_conf"]["stats_file"] == str(
        tmp_path / "stock_unpacked" / STATS)  # ESPnet pointed the path into the zip at the unpacked copy
    hyps, proc = decode(recipe, files["asr_train_config"], files["asr_model_file"], tmp_path / "dec", env=STOCK,
                        cwd=tmp_path, pythonpath=receiver)
    assert hyps == plugin_hyps, proc.stderr[-3000:]


@pytest.mark.slow
def test_verification_failure_writes_nothing(plugin_model, recipe, receiver, tmp_path):
    exp, _, _ = plugin_model
    state = torch.load(exp / MODEL)
    dropped = next(k for k in state if k.startswith("frontend."))
    del state[dropped]
    torch.save(state, tmp_path / "pruned.pth")
    proc = to_stock(exp / "config.yaml", tmp_path / "out", "--model", tmp_path / "pruned.pth", cwd=recipe,
                    pythonpath=receiver)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"stock side: 1 missing key(s) in strict loading: {dropped}" in proc.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".espnet-flashcompat-*"))


@pytest.mark.slow
@only_on("legacy", "stock S3PRL (s3prl 0.4.18) cannot be imported with torchaudio >= 2.9")
def test_unverifiable_where_stock_s3prl_cannot_be_imported(plugin_model, recipe, tmp_path):
    exp, _, _ = plugin_model
    proc = to_stock(exp / "config.yaml", tmp_path / "out", cwd=recipe)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "stock ESPnet cannot build any S3PRL frontend in this environment (`import s3prl.nn` fails: " \
           "AttributeError: module 'torchaudio' has no attribute 'set_audio_backend')" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_stock_model_decodes_with_our_frontend_when_asked(recipe, tiny_wav2vec2, receiver, tmp_path):
    exp = _train(recipe, tiny_wav2vec2, "exp_stock", "s3prl", env=STOCK, pythonpath=receiver)
    assert yaml.safe_load((exp / "config.yaml").read_text())["frontend"] == "s3prl"
    stock_hyps, proc = decode(recipe, exp / "config.yaml", exp / MODEL, tmp_path / "dec_stock", env=STOCK,
                              pythonpath=receiver)
    assert stock_hyps is not None and "s3prl_flashcompat" not in proc.stderr, proc.stderr[-3000:]
    hyps, proc = decode(recipe, exp / "config.yaml", exp / MODEL, tmp_path / "dec_ours",
                        env={registry.REPLACE_ENV: "1"})  # no shim: the plugin needs none
    assert "s3prl_flashcompat: upstream hf_wav2vec2_custom, attention" in proc.stderr, proc.stderr[-3000:]
    assert hyps == stock_hyps
