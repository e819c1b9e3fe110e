"""The tone-language dataset: ``{"speech", "text"}`` items read from the manifests the builder writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from espnet3.components.data.base_dataset import BaseDataset
from espnet3.contract import Field

from .builder import CONFIG, ToneLanguageBuilder, _root


class ToneLanguageDataset(BaseDataset):
    """One split of the corpus (``train``, ``valid`` or ``test``).

    ``with_utt_id: true`` adds the corpus' utterance id (``spk08-test0000``) as ``utt_id``: inference writes it
    as the key of ``text.scp`` instead of the item's index, so the hypotheses can be compared with the Kaldi
    ``text`` files as well. Training leaves it off (ESPnet's collate function takes only arrays).
    """

    def __init__(self, split: str, recipe_dir: str | Path | None = None, with_utt_id: bool = False) -> None:
        if split not in CONFIG["manifest_paths"]:
            raise ValueError(f"Unknown split {split!r}; expected one of {', '.join(CONFIG['manifest_paths'])}")
        root = _root(recipe_dir)
        if not ToneLanguageBuilder().is_built(recipe_dir=root):
            raise FileNotFoundError(
                f"No manifests under {root / CONFIG['data_path']}: run `python run.py --stages create_dataset "
                "--training_config conf/training.yaml` first"
            )
        manifest = root / CONFIG["data_path"] / CONFIG["manifest_paths"][split]
        with open(manifest, encoding="utf-8") as f:
            self._entries = [line.rstrip("\n").split("\t", 2) for line in f if line.strip()]
        if not self._entries:
            raise RuntimeError(f"Manifest is empty: {manifest}")
        self.with_utt_id = with_utt_id
        self.fields = (Field("speech", "audio"), Field("text", "text")) + (
            (Field("utt_id", "text"),) if with_utt_id else ()
        )

    def transcripts(self) -> list:
        """Every utterance's transcript, without reading the audio (the tokenizer's training text)."""
        return [text for _utt, _wav, text in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, idx: int) -> dict:
        utt_id, wav, text = self._entries[int(idx)]
        array, _rate = sf.read(wav, dtype="float32")
        item = {"speech": np.asarray(array, dtype=np.float32), "text": text}
        if self.with_utt_id:
            item["utt_id"] = utt_id
        return item
