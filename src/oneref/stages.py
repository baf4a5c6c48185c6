"""The stages of a training recipe, and which of them a run has finished.

The official recipes train in two stages (official ``train_and_eval_script/**/*.sh``): stage 1
warms the heads up on a frozen backbone from the released pretrained weights, stage 2 trains the
full model from stage 1's best checkpoint; MRefM pretraining chains pre-1 and pre-2 the same way
(pre-2 from pre-1's last checkpoint). A recipe states each stage's values in one place with
``${oneref.stage:<stage 1>,<stage 2>}`` (oneref.config); :func:`make_plan` composes one config per
stage from the run's config:

- ``stage`` set to the stage's number (the resolver picks its values);
- with several stages, ``paths.output_dir`` is ``<run folder>/stage<k>`` (checkpoints, logs and
  resuming per stage) and each stage but the last exports to ``logs/<run_name>/stage<k>/``;
- the first stage that runs starts from ``init_from``; every later one from the previous stage's
  export (``init_from=scratch``: random weights, with a warning for the released sizes).

:class:`StageState` records the finished stages in ``<run folder>/stages.json`` (written
atomically): a restarted or requeued job skips them and resumes the stage it was in.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from oneref.atomic import atomic_write_text
from oneref.errors import UserError

log = logging.getLogger(__name__)

STATE_FILE = "stages.json"
SCRATCH = "scratch"
# sizes whose pretrained weights were released: training them from random weights is a mistake
# unless asked for
RELEASED_SIZES = ("base", "large")


def export_path(dest: str | Path) -> Path:
    """``dest``, or ``<dest stem>.job<N><suffix>`` inside a Hydra multirun, so jobs of a sweep do
    not overwrite each other's export."""
    dest = Path(dest)
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return dest.with_name(f"{dest.stem}.job{hc.job.num}{dest.suffix}")
    except ValueError:  # not running under @hydra.main
        pass
    return dest


@dataclass(frozen=True)
class Stage:
    """One stage of a recipe: its number (from 1), whether it is the recipe's last, and its config
    (resolved; ``init_from`` is where its weights come from, None = random)."""

    index: int
    last: bool
    cfg: DictConfig
    fingerprint: str = ""

    @property
    def export(self) -> str | None:
        """Where this stage's weights for the next stage are copied (MRefM: the last checkpoint)."""
        dest = self.cfg.get("export_last") or self.cfg.get("export_best")
        if dest is None:
            return None
        job_dest = export_path(dest)  # a sweep job's own copy
        return str(dest) if job_dest == Path(dest) else str(job_dest)

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.paths.output_dir)


@dataclass(frozen=True)
class Plan:
    """Every stage of the recipe and the ones this run trains, in order."""

    stages: list[Stage]
    to_run: list[Stage]
    run_dir: Path

    def describe(self, state: StageState | None = None) -> str:
        """The plan as a user reads it (``preflight=only``)."""
        from oneref.distributed import resolve_global_batch

        lines = [f"run folder: {self.run_dir}"]
        for stage in self.to_run:
            c = stage.cfg
            done = state is not None and state.finished(stage.index, stage)
            try:
                batch = resolve_global_batch(c)
                batch_text = (
                    f"{batch.per_device} per device x {batch.world_size} process(es) x "
                    f"{batch.accumulate_grad_batches} accumulation = {batch.effective_batch_size}"
                )
            except ValueError as err:
                batch_text = f"unknown here ({err})"
            steps = c.trainer.get("max_steps", -1)
            lines += [
                f"stage {stage.index} of {len(self.stages)}" + (" (finished: skipped)" if done else ""),
                f"  weights:     {c.init_from or 'random (init_from=scratch)'}"
                + (f" [{c.ckpt_format}]" if c.get("ckpt_format") else ""),
                f"  backbone:    {'frozen' if c.task.get('frozen_backbone') else 'trained'}",
                f"  data:        {c.data.dataset}",
                f"  schedule:    {c.trainer.max_epochs} epochs"
                + (f", at most {steps} steps" if steps not in (None, -1) else "")
                + f", lr {c.optim.lr}",
                f"  batch:       {batch_text}",
                f"  checkpoints: {stage.output_dir / 'checkpoints'}",
                f"  export:      {stage.export}",
                f"  test:        {describe_test(stage)}",
            ]
        return "\n".join(lines)


def describe_test(stage: Stage) -> str:
    """What the stage tests: nothing, or the run's data and ``test_data`` (every split of each)."""
    c = stage.cfg
    if not (stage.last and c.get("test", True)):
        return "no"
    return ", ".join([f"{c.data.dataset} {list(c.data.test_splits)}", *map(str, c.get("test_data") or [])])


def _stage_number(cfg: DictConfig, stages: int) -> int | None:
    """The ``stage`` the user asked for: None for all, else 1..stages."""
    value = cfg.get("stage", "all")
    if value in (None, "all"):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= stages:
        raise UserError(
            f"stage={value!r}: this recipe has {stages} stage(s); give stage=all"
            + (f" or a stage number from 1 to {stages}" if stages > 1 else " or stage=1")
        )
    return value


def _stage_config(cfg: DictConfig, index: int, stages: int, run_dir: Path) -> DictConfig:
    """``cfg`` composed for stage ``index``, resolved."""
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(c):
        c.stage = index
        if stages > 1:
            c.paths.output_dir = str(run_dir / f"stage{index}")
    OmegaConf.resolve(c)
    return c


def make_plan(cfg: DictConfig) -> Plan:
    """The stages of ``cfg``'s recipe and the ones to run (``stage``: all, or one number)."""
    stages = cfg.get("stages", 1)
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise UserError(f"stages={stages!r}: give the number of stages of the recipe, >= 1")
    only = _stage_number(cfg, stages)
    run_dir = Path(str(cfg.paths.output_dir))
    every = []
    for k in range(1, stages + 1):
        stage_cfg = _stage_config(cfg, k, stages, run_dir)
        every.append(Stage(k, k == stages, stage_cfg, fingerprint(stage_cfg)))
    to_run = every if only is None else [every[only - 1]]
    for position, stage in enumerate(to_run):
        with open_dict(stage.cfg):
            if position > 0:  # a later stage always continues from the previous one
                stage.cfg.init_from = every[stage.index - 2].export
                stage.cfg.ckpt_format = None
                stage.cfg.ckpt_path = "auto"
            _check_init(stage.cfg)
    return Plan(every, to_run, run_dir)


def _check_init(cfg: DictConfig) -> None:
    """``init_from``: a path, or scratch (None here); null is refused for the released sizes."""
    source = cfg.get("init_from")
    size = str(cfg.model.get("size"))
    if source is None and size in RELEASED_SIZES:
        raise UserError(
            f"init_from is null for model={size}: give the pretrained weights (init_from=PATH), or "
            "init_from=scratch to train from random weights"
        )
    if source in (None, SCRATCH):
        if size in RELEASED_SIZES:
            log.warning(
                "stage %s of model=%s starts from RANDOM weights (init_from=scratch): the official "
                "recipes start from the released pretrained weights",
                cfg.stage,
                size,
            )
        cfg.init_from = None


# what makes two stage runs the same run (as resuming checks: oneref.checkpoint.resume)
FINGERPRINT_KEYS = ("model", "task", "optim", "data")


def fingerprint(cfg: DictConfig) -> str:
    """A digest of the settings that make a stage what it is."""
    parts = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in FINGERPRINT_KEYS if k in cfg}
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StageState:
    """The finished stages of a run folder (``stages.json``): ``{"finished": {"1": {...}}}`` with
    each stage's export, final metrics and :func:`fingerprint`. A stage recorded with another
    fingerprint (another run written into the same folder) is not taken as finished."""

    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: str | Path) -> StageState:
        path = Path(run_dir) / STATE_FILE
        if not path.is_file():
            return cls(path, {"finished": {}})
        try:
            data = json.loads(path.read_text())
            if not isinstance(data.get("finished"), dict):
                raise ValueError("no 'finished' mapping")
        except (ValueError, AttributeError) as err:
            raise UserError(
                f"{path} is not a stage record ({err}): delete it to run every stage again"
            ) from None
        return cls(path, data)

    def finished(self, index: int, stage: Stage | None = None) -> bool:
        """Whether stage ``index`` finished (with the settings of ``stage``, when given)."""
        record = self.data["finished"].get(str(index))
        if record is None:
            return False
        if stage is not None and record.get("fingerprint") != stage.fingerprint:
            log.warning(
                "%s: stage %d there was another run (other settings); running it again", self.path, index
            )
            return False
        return True

    def metrics(self, index: int) -> dict[str, float]:
        return dict(self.data["finished"].get(str(index), {}).get("metrics", {}))

    def mark_finished(self, stage: Stage, metrics: dict[str, float]) -> None:
        self.data["finished"][str(stage.index)] = {
            "export": stage.export,
            "fingerprint": stage.fingerprint,
            "metrics": metrics,
        }
        atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")
