"""oneref: fast, faithful OneRef (NeurIPS 2024) on BEiT-3.

    import oneref

    model = oneref.load("best.ckpt")  # or a checkpoint folder, or OneRef_B_refcoco.pth, tokenizer="beit3.spm"
    pred = model.predict("photo.jpg", "the man in red on the left")
    x1, y1, x2, y2 = pred.box_xyxy  # in the photo's own pixels

``load``, ``Predictor`` and ``Prediction`` (oneref.predictor), ``PhotoOptions`` (how photos are
read, oneref.data.images) and ``Checkpoint`` (what a checkpoint is, oneref.checkpoint) are imported
on first use, so that ``import oneref`` stays light (no torch until a model is loaded).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "load": "oneref.predictor",
    "Predictor": "oneref.predictor",
    "Prediction": "oneref.predictor",
    "PhotoOptions": "oneref.data.images",
    "Checkpoint": "oneref.checkpoint",
}
__all__ = ["Checkpoint", "PhotoOptions", "Prediction", "Predictor", "__version__", "load"]

if TYPE_CHECKING:
    from oneref.checkpoint import Checkpoint
    from oneref.data.images import PhotoOptions
    from oneref.predictor import Prediction, Predictor, load


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'oneref' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
