"""Registered model sizes: each entry only wires numbers (timm style)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oneref.models.oneref import OneRef, OneRefConfig
from oneref.models.runtime import split_model_options

SIZES: dict[str, dict[str, int]] = {
    # CPU-friendly size for the embedded synthetic default and for tests (conf/model/tiny.yaml adds
    # its image size, 8 px patches and small vocabulary).
    "tiny": dict(embed_dim=128, num_heads=4, depth=3, ffn_dim=512),
    "base": dict(embed_dim=768, num_heads=12, depth=12, ffn_dim=3072),
    "large": dict(embed_dim=1024, num_heads=16, depth=24, ffn_dim=4096),
}

# Image sizes of the released checkpoints (tiny accepts any multiple of the patch size).
RELEASED_IMG_SIZES: dict[str, tuple[int, ...]] = {"base": (384, 480), "large": (384,)}


def model_config(size: str, **overrides: Any) -> OneRefConfig:
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    return OneRefConfig(**{**SIZES[size], **overrides})


def config_from_options(model: Mapping[str, Any], **heads: Any) -> OneRefConfig:
    """The OneRefConfig of a ``model`` config (its runtime options aside) with the task's heads."""
    size, architecture, _ = split_model_options(model)
    return model_config(size, **architecture, **heads)


def size_of(cfg: Any) -> str | None:
    """The registered size name of an architecture (anything with the SIZES fields), or None."""
    return next((n for n, s in SIZES.items() if all(getattr(cfg, k) == v for k, v in s.items())), None)


def create_model(size: str, **overrides: Any) -> OneRef:
    return OneRef(model_config(size, **overrides))
