"""Sweeps: the Optuna search (hparams_search=rec_optuna) end to end, a sweep over a key that does
not exist, and the W&B run name and group of each sweep job."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from helpers.cli import cli_env
from oneref.config import config_dir

# a few steps of the tiny model on the session's small synthetic set (conftest.TINY_SYNTHETIC)
SHORT = (
    "trainer.max_steps=3", "debug=default", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
    "callbacks.rich_progress_bar=null",
    "data.synthetic.num_train=96", "data.synthetic.num_val=32", "data.synthetic.num_test=32",
)  # fmt: skip


def needs_optuna():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the `sweep` extra")


def compose_train(*overrides: str, mode: RunMode | None = None, job_num: int | None = None) -> DictConfig:
    """conf/train.yaml as Hydra hands it to a job: the Hydra node set aside in HydraConfig."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        if mode is not None:
            cfg.hydra.mode = mode
        if job_num is not None:
            cfg.hydra.job.num = job_num
    HydraConfig().set_config(cfg)
    return cfg


def run_cli(args: list[str], root: Path, cache: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "oneref.train", *args]
    return subprocess.run(
        cmd, cwd=root, env=cli_env(root, cache), capture_output=True, text=True, timeout=600
    )


# -- W&B: one run per job, grouped by sweep ---------------------------------------------------
def test_wandb_names_each_sweep_job_and_groups_the_sweep():
    # as Hydra runs a sweep: the sweep folder is resolved once, then each job is composed again
    # with the resolver cache of the sweep (so `now` is the sweep's time in every job)
    sweep = compose_train("logger=wandb", mode=RunMode.MULTIRUN)
    sweep_dir = Path(sweep.hydra.sweep.dir)
    runs = []
    for num in (0, 1):
        job = compose_train("logger=wandb", mode=RunMode.MULTIRUN, job_num=num)
        OmegaConf.copy_cache(from_config=sweep, to_config=job)
        HydraConfig().set_config(job)
        runs.append((job.logger.wandb.name, job.logger.wandb.group))
    group = f"rec_tiny_synthetic_{sweep_dir.name}"
    assert runs == [("rec_tiny_synthetic_0", group), ("rec_tiny_synthetic_1", group)]


def test_wandb_single_run_keeps_its_name_and_group():
    cfg = compose_train("logger=wandb", "task=res", mode=RunMode.RUN)
    assert (cfg.logger.wandb.name, cfg.logger.wandb.group) == ("res_tiny_synthetic", "res_tiny")


# -- the Optuna search ------------------------------------------------------------------------
def test_rec_optuna_searches_keys_that_exist_and_maximises():
    needs_optuna()
    for task in ("rec", "res"):
        cfg = compose_train("hparams_search=rec_optuna", f"task={task}")
        sweeper = cfg.hydra.sweeper
        assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
        assert cfg.hydra.mode == RunMode.MULTIRUN  # no -m needed
        assert set(sweeper.params) == {"optim.lr", "optim.weight_decay", "optim.scheduler.warmup_steps"}
        for key in sweeper.params:
            assert OmegaConf.select(cfg, key) is not None, key
        assert cfg.task.name == task  # the search never picks the task


@pytest.mark.slow
def test_optuna_two_trials_write_the_best_value(tmp_path, cache_dir):
    needs_optuna()
    args = ["hparams_search=rec_optuna", "hydra.sweeper.n_trials=2", *SHORT, "logger=csv"]
    out = run_cli(args, tmp_path, cache_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    (sweep,) = (tmp_path / "logs" / "rec_tiny_synthetic" / "multiruns").iterdir()
    result = OmegaConf.load(sweep / "optimization_results.yaml")
    assert result.name == "optuna"
    assert set(result.best_params) == {"optim.lr", "optim.weight_decay", "optim.scheduler.warmup_steps"}
    assert 1e-5 <= result.best_params["optim.lr"] <= 3e-3
    # the value optimised is task.monitor (val/acc@0.5) of the best trial
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1"]
    val = []
    for job in jobs:
        with open(job / "csv" / "metrics.csv") as f:
            val += [float(r["val/acc@0.5"]) for r in csv.DictReader(f) if r.get("val/acc@0.5")]
    assert result.best_value == pytest.approx(max(val))


@pytest.mark.slow
def test_a_sweep_over_a_missing_key_is_one_error_naming_it(tmp_path, cache_dir):
    needs_optuna()
    args = ["hparams_search=rec_optuna", "hydra.sweeper.n_trials=2", "optim.lrr=interval(1e-4,1e-3)", *SHORT]
    out = run_cli(args, tmp_path, cache_dir)
    assert out.returncode != 0
    assert out.stderr.count("Could not override 'optim.lrr'") == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr  # Hydra's message, not a stack trace
    assert not list(tmp_path.rglob("optimization_results.yaml"))
    assert not list(tmp_path.rglob("*.ckpt"))  # no trial trained


@pytest.mark.slow
def test_optuna_trials_stopped_before_any_validation_return_a_float(tmp_path, cache_dir):
    """max_steps inside the first epoch: no validation ran during training, so the final weights
    are validated and every trial returns task.monitor (Optuna refuses None)."""
    needs_optuna()
    args = [
        "hparams_search=rec_optuna",
        "hydra.sweeper.n_trials=2",
        *SHORT,
        "trainer.max_steps=2",
        "logger=csv",
    ]
    out = run_cli(args, tmp_path, cache_dir)  # 96 samples of 32: 3 steps per epoch
    assert out.returncode == 0, out.stderr[-3000:]
    assert "float-castable" not in out.stderr
    (sweep,) = (tmp_path / "logs" / "rec_tiny_synthetic" / "multiruns").iterdir()
    result = OmegaConf.load(sweep / "optimization_results.yaml")
    assert 0.0 <= result.best_value <= 1.0


def test_a_monitor_never_logged_is_one_error_naming_it(make_cfg):
    from oneref.errors import UserError
    from oneref.train import objective

    cfg = make_cfg("task.monitor=val/nothing")
    with pytest.raises(UserError, match="task.monitor='val/nothing'"):
        objective({"train/loss": 1.0, "val/acc@0.5": 0.5}, cfg)
    assert objective({"val/nothing": 0.25}, cfg) == 0.25
