"""Tokenizer training text for ``ASRSystem.train_tokenizer``: the transcripts of one split of the recipe dataset."""

from __future__ import annotations

from pathlib import Path
from typing import List


def gather_training_text(recipe_dir: str | Path = ".", split: str = "train") -> List[str]:
    """Return the transcripts of ``split``, one string per utterance (``tokenizer.text_builder.func``)."""
    from espnet3.components.data.dataset_module import load_dataset_module

    dataset = load_dataset_module(data_src=None, recipe_dir=recipe_dir).Dataset(split=split, recipe_dir=recipe_dir)
    return dataset.transcripts()
