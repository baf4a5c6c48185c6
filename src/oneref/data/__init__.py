"""Data: options (DataConfig), tokenizer, official split files, transforms, datasets, the DataModule,
the synthetic set.

Names are imported lazily, so `oneref.data.tokenizer` or the verify CLI do not pull in Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "config",
    "RefDataModule": "datamodule",
    "RefCollate": "datasets",
    "RefDataset": "datasets",
    "SampleError": "datasets",
    "ImageError": "images",
    "Photo": "images",
    "load_image": "images",
    "load_photo": "images",
    "DATASETS": "records",
    "OFFICIAL_NAMES": "records",
    "SPLITS": "records",
    "RefRecord": "records",
    "parse_record": "records",
    "SyntheticConfig": "synthetic",
    "ensure_synthetic": "synthetic",
    "Tokenizer": "tokenizer",
    "train_sentencepiece": "tokenizer",
    "AugmentConfig": "transforms",
    "ObjMask": "transforms",
    "TrainTransform": "transforms",
    "eval_transform": "transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"oneref.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'oneref.data' has no attribute {name!r}")
