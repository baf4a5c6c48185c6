"""Train (and test) a OneRef model: ``python -m oneref.train [overrides]``.

With no overrides it trains REC on the embedded synthetic dataset with the tiny model (CPU is
fine), checkpoints the best and last, tests the best checkpoint and prints a table next to the
mean-box baseline. Hydra composes task, model, data, trainer, strategy, logger and experiment;
see README.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from oneref import factory, paper, preflight
from oneref.atomic import atomic_copy
from oneref.checkpoint.resume import resolve_ckpt_path, resume_mismatch
from oneref.config import config_dir, with_data
from oneref.data.baseline import mean_box_baseline
from oneref.distributed import apply_global_batch, check_multi_node, install_hydra_ddp_launch
from oneref.errors import UserError, report_user_errors
from oneref.reporting import (
    finish_loggers,
    log_run_facts,
    print_next_steps,
    print_results,
    quiet_third_party,
)
from oneref.stages import SCRATCH, Stage, StageState, export_path, make_plan

log = logging.getLogger(__name__)

# What Lightning's DDP launcher sets in the launching process's environment.
DDP_LAUNCH_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED")


def export_best(ckpt: str | Path, dest: Path) -> None:
    """Copy a checkpoint to a stable path that a later stage's ``init_from`` names."""
    atomic_copy(ckpt, dest)
    log.info("%s exported to %s", Path(ckpt).name, dest)


def best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best checkpoint the monitored ModelCheckpoint kept, if it wrote one."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.best_model_path:
            if Path(cb.best_model_path).is_file():
                return cb.best_model_path
    return None


def train(cfg: DictConfig) -> dict[str, float]:
    """Run the recipe of ``cfg``: check every stage first (``preflight``), then train each stage
    not finished yet (:func:`run_stage`), test after the last one and print the results next to
    the published ones. Returns every metric of the last stage run, as floats."""
    plan = make_plan(cfg)
    state = StageState.load(plan.run_dir)
    if cfg.get("preflight", True) is not False:
        preflight.check([stage.cfg for stage in plan.to_run])
    if cfg.get("preflight") == "only":
        print(plan.describe(state), flush=True)
        return {}
    metrics: dict[str, float] = {}
    # an explicit checkpoint to resume from continues the first stage, even a finished one
    resume = cfg.get("ckpt_path") not in (None, "auto")
    for position, stage in enumerate(plan.to_run):
        if state.finished(stage.index, stage) and not (resume and position == 0):
            log.info("stage %d is finished (%s): not run again", stage.index, state.path)
            metrics = state.metrics(stage.index)
            continue
        if len(plan.stages) > 1:
            log.info("stage %d of %d: %s", stage.index, len(plan.stages), stage.output_dir)
        metrics, is_global_zero = run_stage(stage)
        if is_global_zero:
            state.mark_finished(stage, metrics)
            if stage.last and stage.cfg.get("test", True):
                paper.report(metrics, stage.cfg, plan.run_dir)
            if stage.last:
                print_next_steps(stage.export, stage.cfg)
    return metrics


def run_stage(stage: Stage) -> tuple[dict[str, float], bool]:
    """Fit one stage, export its weights for the next and, after the last stage, test the best
    checkpoint. Returns every logged metric as a float, and whether this is the global rank 0."""
    cfg = stage.cfg
    check_multi_node(cfg)  # before anything is built: a misconfigured cluster run fails at once
    apply_global_batch(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    ckpt_path = resolve_ckpt_path(
        cfg.get("ckpt_path"), Path(cfg.paths.output_dir) / "checkpoints", cfg.paths.output_dir
    )
    datamodule = factory.build_datamodule(cfg)
    module = factory.build_module(cfg)
    if ckpt_path is not None and str(cfg.get("ckpt_path")) == "auto":
        differ = resume_mismatch(ckpt_path, module.hparams)
        if differ:  # e.g. another run written into this folder
            log.warning("not resuming from %s: it is another run (%s differ)", ckpt_path, ", ".join(differ))
            ckpt_path = None
    if cfg.get("init_from") and ckpt_path is None:  # a resumed run has its own weights
        factory.init_weights(module, str(cfg.init_from), cfg.get("ckpt_format"), datamodule=datamodule)
    # DDP ranks that Lightning starts run this stage only, from the same weights
    install_hydra_ddp_launch(
        [
            f"stage={stage.index}",
            f"init_from={cfg.init_from or SCRATCH}",
            f"ckpt_format={cfg.ckpt_format or 'null'}",
            "preflight=false",
        ]
        if cfg.get("stages", 1) > 1
        else []
    )
    launch_env = {k: os.environ.get(k) for k in DDP_LAUNCH_ENV}
    trainer = factory.build_trainer(cfg)
    test = stage.last and cfg.get("test", True)
    try:
        log_run_facts(trainer, cfg)
        metrics: dict[str, float] = {}
        if cfg.get("train", True):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            metrics.update(float_metrics(trainer))
            if str(cfg.task.monitor) not in metrics:
                # training stopped before any validation (max_steps mid-epoch): validate the final
                # weights, so that the monitored metric (a sweep's objective) exists
                log.info("no %s after training: validating the final weights", cfg.task.monitor)
                trainer.validate(module, datamodule=datamodule, verbose=False)
                metrics.update(float_metrics(trainer))
        ckpt = best_checkpoint(trainer)
        if cfg.get("train", True):
            export_weights(trainer, cfg, ckpt)
        if test:
            if cfg.get("train", True) and ckpt is None:
                log.warning("no best checkpoint was saved; testing the weights in memory")
            trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
            metrics.update(float_metrics(trainer))
            if cfg.get("report_baseline") and not module.is_res:
                # every rank: each reads its shard and the metric sums over all of them
                metrics.update(mean_box_baseline(datamodule, module.dataset_name, module.device))
            for option in cfg.get("test_data") or []:  # e.g. a mixup model on RefCOCO/+/g's splits
                data_cfg = with_data(cfg, str(option))
                module.dataset_name = str(data_cfg.data.dataset)
                trainer.test(
                    module, datamodule=factory.build_datamodule(data_cfg), ckpt_path=ckpt, verbose=False
                )
                metrics.update(float_metrics(trainer))
            if trainer.is_global_zero:
                print_results(metrics, title=f"{cfg.run_name}: test results", checkpoint=ckpt)
        return metrics, trainer.is_global_zero
    finally:
        finish_loggers(trainer)
        # The next stage, or the next job of a multirun in this process, starts its own process
        # group and ranks: with LOCAL_RANK left set, Lightning would take the processes as
        # launched externally and wait.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in launch_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def float_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def export_weights(trainer: L.Trainer, cfg: DictConfig, best: str | None) -> None:
    """Copy the stage's best checkpoint (``export_best``) and, for pretraining, its last
    (``export_last``) to their stable paths, where the next stage's ``init_from`` points. A stage
    that saved no best checkpoint (it never validated an improvement) exports its final weights,
    so that the next stage still starts from what this one trained."""
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    for key, source in (("export_best", best), ("export_last", last if last.is_file() else None)):
        if not cfg.get(key):
            continue
        dest = export_path(cfg[key])
        if source is None:
            log.warning("%s: no checkpoint to copy; saving the final weights to %s", key, dest)
            trainer.save_checkpoint(dest)  # every rank calls it; the strategy writes on rank 0
        elif trainer.is_global_zero:
            export_best(source, dest)
    trainer.strategy.barrier("export")  # the next stage reads the export on every rank


def objective(metrics: dict[str, float], cfg: DictConfig) -> float | None:
    """The value a Hydra sweeper optimises: ``task.monitor`` of the last stage (None when nothing
    was trained, e.g. ``preflight=only``)."""
    if not metrics or not cfg.get("train", True):
        return None
    monitor = str(cfg.task.monitor)
    if monitor not in metrics:
        raise UserError(
            f"task.monitor={monitor!r} was never logged (logged: {sorted(metrics)}): set task.monitor to "
            "a validation metric of this task, or let training reach a validation (trainer.max_steps, "
            "trainer.limit_val_batches)"
        )
    return metrics[monitor]


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> float | None:
    quiet_third_party()
    return objective(train(cfg), cfg)


if __name__ == "__main__":
    main()
