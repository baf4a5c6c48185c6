"""Train (and test) a OneRef model: ``python -m oneref.train [overrides]``.

With no overrides it trains REC on the embedded synthetic dataset with the tiny model (CPU is
fine), checkpoints the best and last, tests the best checkpoint and prints a table next to the
mean-box baseline. Hydra composes task, model, data, trainer, strategy, logger and experiment;
see README.md.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from oneref import factory
from oneref.checkpoint.resume import resolve_ckpt_path, resume_mismatch
from oneref.config import config_dir
from oneref.data.baseline import mean_box_baseline
from oneref.distributed import apply_global_batch, check_multi_node, install_hydra_ddp_launch
from oneref.reporting import (
    finish_loggers,
    log_run_facts,
    print_results,
    quiet_third_party,
)

log = logging.getLogger(__name__)

# What Lightning's DDP launcher sets in the launching process's environment.
DDP_LAUNCH_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED")


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


def export_best(ckpt: str | Path, dest: Path) -> None:
    """Copy a checkpoint to a stable path that a later stage's ``init_from`` names."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    shutil.copyfile(ckpt, tmp)
    tmp.replace(dest)
    log.info("%s exported to %s", Path(ckpt).name, dest)


def best_checkpoint(trainer: L.Trainer) -> str | None:
    """The best checkpoint the monitored ModelCheckpoint kept, if it wrote one."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.best_model_path:
            if Path(cb.best_model_path).is_file():
                return cb.best_model_path
    return None


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, then test the best checkpoint. Returns every logged metric as a float."""
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
        if differ:  # e.g. stage 2 written into stage 1's folder
            log.warning("not resuming from %s: it is another run (%s differ)", ckpt_path, ", ".join(differ))
            ckpt_path = None
    if cfg.get("init_from") and ckpt_path is None:  # a resumed run has its own weights
        factory.init_weights(module, str(cfg.init_from), cfg.get("ckpt_format"), datamodule=datamodule)
    install_hydra_ddp_launch()
    launch_env = {k: os.environ.get(k) for k in DDP_LAUNCH_ENV}
    trainer = factory.build_trainer(cfg)
    try:
        log_run_facts(trainer, cfg)
        metrics: dict[str, float] = {}
        if cfg.get("train", True):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        ckpt = best_checkpoint(trainer)
        if trainer.is_global_zero:
            if ckpt and cfg.get("export_best"):
                export_best(ckpt, export_path(cfg.export_best))
            last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
            if cfg.get("export_last") and last.is_file():  # pretraining: the next stage starts from it
                export_best(last, export_path(cfg.export_last))
        if cfg.get("test", True):
            if cfg.get("train", True) and ckpt is None:
                log.warning("no best checkpoint was saved; testing the weights in memory")
            trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
            if cfg.get("report_baseline") and not module.is_res:
                # every rank: each reads its shard and the metric sums over all of them
                metrics.update(mean_box_baseline(datamodule, module.dataset_name, module.device))
            if trainer.is_global_zero:
                print_results(metrics, title=f"{cfg.run_name}: test results", checkpoint=ckpt)
        return metrics
    finally:
        finish_loggers(trainer)
        # The next job of a multirun in this process starts its own process group and ranks: with
        # LOCAL_RANK left set, Lightning would take the processes as launched externally and wait.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in launch_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    quiet_third_party()
    metrics = train(cfg)
    # the value a Hydra sweeper optimises
    return metrics.get(str(cfg.task.monitor))


if __name__ == "__main__":
    main()
