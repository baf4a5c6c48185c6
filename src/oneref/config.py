"""Where the Hydra configs live, how code outside ``@hydra.main`` composes them, and the
resolvers the configs use:

- ``${oneref.slurm:KEY,DEFAULT}``: ``hydra.launcher.KEY`` when this run's launcher submits SLURM
  jobs (submitit), else DEFAULT. The Trainer takes its nodes and devices from the allocation, so
  the two always match.
- ``${oneref.multirun:IN_MULTIRUN,OTHERWISE}``: one of two values by Hydra's run mode (the W&B
  run name and group of a sweep job).
- ``${oneref.run_stamp:DEFAULT}``: the run folder's name (stable across SLURM requeues).
- ``${oneref.run_id:DIR}``: a stable id of a run folder (W&B run id).
- ``${oneref.choice:GROUP}``: the option chosen for a config group (``task`` -> ``rec_mixup``), for
  names such as ``run_name``.
- ``${oneref.stage:V1,V2,...}``: the value of the stage being composed (``stage``: 1, 2, ...), one
  value per stage of the recipe (``stages``), so a recipe states both stages' values in one place.
- ``${oneref.stage_dir:BASE}``: BASE for the last stage of a recipe, ``BASE/stage<k>`` for an earlier
  stage k (where each stage's exports go; the last stage's are where a one-stage run puts them).
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
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

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


def with_data(cfg: DictConfig, option: str) -> DictConfig:
    """A resolved copy of ``cfg`` whose ``data`` is the data group's ``option``, composed with the
    run's task and model choices (what they set in ``data``, e.g. RES's object masks); its
    interpolations resolve against ``cfg`` (paths, image size, seed)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [f"{g}={group_choice(g, cfg)}" for g in ("task", "model")] + [f"data={option}"]
    if GlobalHydra.instance().is_initialized():  # inside @hydra.main
        composed = compose(config_name="train", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            composed = compose(config_name="train", overrides=overrides)
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(copy):
        copy.data = OmegaConf.to_container(composed.data, resolve=False)
    OmegaConf.resolve(copy)
    return copy


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


def group_choice(group: str, _root_: Any) -> str:
    """The option chosen for ``group``: from the config's own ``hydra`` node where it still has one
    (a sweep resolves its folder before any job runs), else from the running job's HydraConfig."""
    hydra_node = _root_.get("hydra") if isinstance(_root_, DictConfig) else None
    choices = hydra_node.runtime.choices if hydra_node is not None else None
    if choices is None:
        hydra_cfg = _hydra_config()
        if hydra_cfg is None:
            raise ValueError(f"${{oneref.choice:{group}}} needs a config composed by Hydra")
        choices = hydra_cfg.runtime.choices
    return str(choices[group])


def current_stage(root: Any) -> int:
    """The stage a config describes: ``stage`` (1, 2, ...); ``all`` reads as the first stage."""
    stage = root.get("stage", "all")
    if stage in (None, "all"):
        return 1
    if isinstance(stage, bool) or not isinstance(stage, int) or stage < 1:
        from oneref.errors import UserError

        raise UserError(f"stage={stage!r}: give all, or a stage number from 1 to {root.get('stages', 1)}")
    return stage


def stage_value(*values: Any, _root_: Any) -> Any:
    """``${oneref.stage:V1,V2}``: the value of the current stage, one value per stage."""
    stages = _root_.get("stages", 1)
    if len(values) != stages:
        raise ValueError(
            f"${{oneref.stage:...}} gives {len(values)} value(s) {list(values)} for a recipe of "
            f"stages={stages}: give one value per stage"
        )
    stage = current_stage(_root_)
    if stage > stages:
        from oneref.errors import UserError

        raise UserError(f"stage={stage}: this recipe has {stages} stage(s); give all or 1..{stages}")
    return values[stage - 1]


def stage_dir(base: str, _root_: Any) -> str:
    """``${oneref.stage_dir:BASE}``: BASE for the last stage, ``BASE/stage<k>`` for an earlier one."""
    stage, stages = current_stage(_root_), _root_.get("stages", 1)
    return str(base) if stage >= stages else f"{base}/stage{stage}"


# not cached: one process runs every job of a local sweep, each with its own Hydra config
OmegaConf.register_new_resolver("oneref.slurm", slurm_value, replace=True)
OmegaConf.register_new_resolver("oneref.multirun", by_run_mode, replace=True)
OmegaConf.register_new_resolver("oneref.run_stamp", run_stamp, replace=True)
OmegaConf.register_new_resolver("oneref.run_id", run_id, replace=True)
OmegaConf.register_new_resolver("oneref.choice", group_choice, replace=True)
OmegaConf.register_new_resolver("oneref.stage", stage_value, replace=True)
OmegaConf.register_new_resolver("oneref.stage_dir", stage_dir, replace=True)
