"""Builder for the synthetic tone-language corpus of egs_example/asr1, in ESPnet3's DatasetBuilder form.

``prepare_source`` stands in for a download: it runs asr1's ``local/make_data.py`` (the same script and seed as the
ESPnet2 example, not a copy) into ``downloads/synth``. With ``upstream_dir`` (the training config passes its
``model.frontend_conf.frontend_conf.path_or_url``) it also writes the tiny random wav2vec2 upstream there with asr1's
``local/make_upstream.py``, standing in for the checkpoint S3PRL would download. ``build`` writes one
``utt_id<TAB>wav<TAB>text`` manifest per ESPnet3 split (train, valid = asr1's dev, test).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from espnet3.components.data.dataset_builder import DatasetBuilder

CONFIG = yaml.safe_load((Path(__file__).with_name("config.yaml")).read_text(encoding="utf-8"))["builder"]


def _root(recipe_dir) -> Path:
    return Path(recipe_dir if recipe_dir is not None else Path(__file__).resolve().parents[1]).resolve()


def _run(cmd, cwd) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=cwd, check=True)


def read_kaldi(path: Path) -> dict:
    """``utt rest-of-line`` lines as a dict."""
    with open(path, encoding="utf-8") as f:
        return dict(line.rstrip("\n").split(" ", 1) for line in f if line.strip())


class ToneLanguageBuilder(DatasetBuilder):
    """Generate the corpus (and the tiny upstream) once; write the manifests ESPnet3's Dataset reads."""

    def is_source_prepared(self, recipe_dir=None, upstream_dir=None, **_kwargs) -> bool:
        root = _root(recipe_dir)
        source = root / CONFIG["dataset_path"]
        corpus = all((source / d / f).is_file() for d in CONFIG["splits"].values() for f in ("wav.scp", "text"))
        upstream = upstream_dir is None or (root / upstream_dir / "config.json").is_file()
        return corpus and upstream

    def prepare_source(self, recipe_dir=None, upstream_dir=None, **_kwargs) -> None:
        root = _root(recipe_dir)
        source = root / CONFIG["dataset_path"]
        if not all((source / d / "text").is_file() for d in CONFIG["splits"].values()):
            _run([sys.executable, root / CONFIG["generator"], "--out", source, "--seed", CONFIG["seed"]], cwd=root)
        if upstream_dir is not None and not (root / upstream_dir / "config.json").is_file():
            make_upstream = (root / CONFIG["generator"]).with_name("make_upstream.py")
            _run([sys.executable, make_upstream, "--out", root / upstream_dir, "--seed", CONFIG["seed"]], cwd=root)

    def is_built(self, recipe_dir=None, **_kwargs) -> bool:
        data = _root(recipe_dir) / CONFIG["data_path"]
        return all((data / p).is_file() for p in CONFIG["manifest_paths"].values())

    def build(self, recipe_dir=None, **_kwargs) -> None:
        root = _root(recipe_dir)
        source = root / CONFIG["dataset_path"]
        for split, kaldi_dir in CONFIG["splits"].items():
            wavs = read_kaldi(source / kaldi_dir / "wav.scp")
            texts = read_kaldi(source / kaldi_dir / "text")
            manifest = root / CONFIG["data_path"] / CONFIG["manifest_paths"][split]
            manifest.parent.mkdir(parents=True, exist_ok=True)
            with open(manifest, "w", encoding="utf-8") as f:
                for utt in sorted(texts):
                    f.write(f"{utt}\t{(root / wavs[utt]).resolve()}\t{texts[utt]}\n")
            print(f"{manifest}: {len(texts)} utterances", flush=True)
