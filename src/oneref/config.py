"""Where the Hydra configs live, and how code outside ``@hydra.main`` composes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def config_dir() -> str:
    """The top-level ``conf/`` of a source checkout (editable install), else the copy shipped
    inside the wheel as ``oneref/conf``."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parents[1] / "conf", here / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"no Hydra configs found next to {here} (looked for conf/train.yaml in the checkout and in "
        "the installed package); reinstall oneref with `pip install .` from a full checkout"
    )


def to_container(cfg: DictConfig | dict | None) -> dict[str, Any]:
    """Plain, resolved containers: what we store in checkpoints (weights_only-safe)."""
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)
