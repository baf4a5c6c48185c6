"""Train (and test) a OneRef model: ``python -m oneref.train [overrides]``.

With no overrides it trains REC on the embedded synthetic dataset with the tiny model (CPU is
fine), checkpoints the best and last, tests the best checkpoint and prints a table next to the
mean-box baseline. Hydra composes task, model, data, trainer, strategy, logger and experiment;
see README.md.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig

from oneref.config import config_dir, to_container
from oneref.reporting import finish_loggers, log_run_facts, mean_box_baseline, print_results
from oneref.tasks.grounding import GroundingModule

log = logging.getLogger(__name__)


def resolve_precision(precision: Any) -> Any:
    if precision == "auto":
        return "bf16-mixed" if torch.cuda.is_available() else "32-true"
    return precision


def build_trainer(cfg: DictConfig, callbacks: list | None = None) -> L.Trainer:
    trainer_cfg = to_container(cfg.trainer)
    trainer_cfg.pop("_target_", None)
    trainer_cfg["precision"] = resolve_precision(trainer_cfg.get("precision", "auto"))
    # a group entry set to null (e.g. callbacks.rich_progress_bar=null) is switched off
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    if callbacks is None:
        callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if not loggers:  # nothing to monitor the learning rate into
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    strategy = hydra.utils.instantiate(cfg.strategy) if cfg.get("strategy") else "auto"
    return L.Trainer(**trainer_cfg, callbacks=callbacks, logger=loggers or False, strategy=strategy)


def build_module(cfg: DictConfig) -> GroundingModule:
    return GroundingModule(
        model=to_container(cfg.model),
        task=to_container(cfg.task),
        optim=to_container(cfg.optim),
        dataset=str(cfg.data.dataset),
    )


def init_weights(module: GroundingModule, source: str, source_format: str | None) -> None:
    from oneref.checkpoint import load_pretrained

    report = load_pretrained(module.model, source, source_format=source_format)
    log.info("initialised from %s\n%s", source, report)


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


def export_best(ckpt: str, dest: Path) -> None:
    """Copy the best checkpoint to a stable path that a later stage's ``init_from`` names."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    shutil.copyfile(ckpt, tmp)
    tmp.replace(dest)
    log.info("best checkpoint exported to %s", dest)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, then test the best checkpoint. Returns every logged metric as a float."""
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    module = build_module(cfg)
    if cfg.get("init_from"):
        init_weights(module, str(cfg.init_from), cfg.get("init_format"))
    trainer = build_trainer(cfg)
    try:
        log_run_facts(trainer, cfg)
        metrics: dict[str, float] = {}
        if cfg.get("train", True):
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        ckpt = best if best and Path(best).is_file() else None
        if ckpt and cfg.get("export_best") and trainer.is_global_zero:
            export_best(ckpt, export_path(cfg.export_best))
        if cfg.get("test", True):
            if cfg.get("train", True) and ckpt is None:
                log.warning("no best checkpoint was saved; testing the weights in memory")
            trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
            if cfg.get("report_baseline") and trainer.is_global_zero and not module.is_res:
                metrics.update(mean_box_baseline(datamodule, module.dataset_name))
            if trainer.is_global_zero:
                print_results(metrics, title=f"{cfg.run_name}: test results", checkpoint=ckpt)
        return metrics
    finally:
        finish_loggers(trainer)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    # the value a Hydra sweeper optimises
    return metrics.get(str(cfg.task.monitor))


if __name__ == "__main__":
    main()
