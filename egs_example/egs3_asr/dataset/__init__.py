"""Synthetic tone-language dataset module (the recipe-local ``dataset`` ESPnet3 loads when ``data_src`` is omitted)."""

from .builder import ToneLanguageBuilder as DatasetBuilder
from .dataset import ToneLanguageDataset as Dataset

__all__ = ["Dataset", "DatasetBuilder"]
