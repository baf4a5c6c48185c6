"""The tiny model: the registered ``tiny`` size at the test resolution, cheap on a CPU."""

from __future__ import annotations

from typing import Any

from oneref.models.oneref import OneRef, OneRefConfig
from oneref.models.registry import model_config

# conf/model/tiny.yaml's architecture: 64 px images, 8 px patches, the synthetic vocabulary
TINY_ARCH: dict[str, Any] = dict(img_size=64, patch_size=8, vocab_size=1000)


def tiny_config(**overrides: Any) -> OneRefConfig:
    return model_config("tiny", **{**TINY_ARCH, **overrides})


def tiny_model(seed: int | None = 0, **overrides: Any) -> OneRef:
    """A tiny OneRef (seeded when ``seed`` is not None)."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    return OneRef(tiny_config(**overrides))
