"""Where the Hydra configs live, how code outside ``@hydra.main`` composes them, and the
resolvers the configs use:

- ``${oneref.slurm:KEY,DEFAULT}``: ``hydra.launcher.KEY`` when this run's launcher submits SLURM
  jobs (submitit), else DEFAULT. The Trainer takes its nodes and devices from the allocation, so
  the two always match.
- ``${oneref.multirun:IN_MULTIRUN,OTHERWISE}``: one of two values by Hydra's run mode (the W&B
  run name and group of a sweep job).
- ``${oneref.run_stamp:DEFAULT}``: the run folder's name (stable across SLURM requeues).
- ``${oneref.run_id:DIR}``: a stable id of a run folder (W&B run id).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

T = TypeVar("T")


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


def options_from(cls: type[T], value: T | Mapping[str, Any] | None, what: str) -> T:
    """A frozen options dataclass from a config mapping (Hydra's, or a dict), a ready instance or
    None (the defaults). Unknown keys are one error naming ``what`` and the valid keys; lists become
    tuples (dataclass fields of tuple type, e.g. a size range)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; valid: {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, (list, ListConfig)) else v for k, v in value.items()})


def _hydra_config() -> DictConfig | None:
    try:
        return HydraConfig.get()
    except ValueError:  # composed outside a Hydra run
        return None


def slurm_value(key: str, default: Any) -> Any:
    """``hydra.launcher.<key>`` of a SLURM launcher, else ``default``."""
    hydra_cfg = _hydra_config()
    launcher = None if hydra_cfg is None else hydra_cfg.get("launcher")
    if launcher is None or not str(launcher.get("_target_", "")).endswith(".SlurmLauncher"):
        return default
    value = launcher.get(key)
    return default if value is None else value


def by_run_mode(in_multirun: Any, otherwise: Any) -> Any:
    hydra_cfg = _hydra_config()
    return in_multirun if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN else otherwise


def run_stamp(default: str) -> str:
    """The run folder's name: ``slurm-<job id>[_<array index>]`` inside a SLURM batch job (stable
    across requeues, so a requeued job resumes in its own folder), else ``default`` (a timestamp).
    Interactive allocations (``srun --pty bash``) get the timestamp: several runs share them."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return default
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"slurm-{job}" + (f"_{task}" if task else "")


def run_id(output_dir: str) -> str:
    """A stable id for a run folder (W&B's run id: a requeued job continues its W&B run)."""
    return hashlib.sha1(str(Path(output_dir).absolute()).encode()).hexdigest()[:16]


# not cached: one process runs every job of a local sweep, each with its own Hydra config
OmegaConf.register_new_resolver("oneref.slurm", slurm_value, replace=True)
OmegaConf.register_new_resolver("oneref.multirun", by_run_mode, replace=True)
OmegaConf.register_new_resolver("oneref.run_stamp", run_stamp, replace=True)
OmegaConf.register_new_resolver("oneref.run_id", run_id, replace=True)
