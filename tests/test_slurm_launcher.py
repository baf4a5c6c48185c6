"""The SLURM presets (hydra/launcher=slurm_1x8, slurm_4x8) on the submitit plugin: what they
compose to, the Trainer that follows them, and the sbatch script a multirun submits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, open_dict

from oneref.config import config_dir

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the `launcher` extra")


def compose_train(*overrides: str) -> DictConfig:
    """conf/train.yaml with its Hydra node, as the CLI composes it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    return cfg


@pytest.mark.parametrize(("preset", "nodes"), [("slurm_1x8", 1), ("slurm_4x8", 4)])
def test_presets_ask_for_one_task_per_gpu_and_the_trainer_follows(preset, nodes):
    cfg = compose_train(f"hydra/launcher={preset}", "trainer=ddp")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (nodes, 8, 8)
    for key in ("timeout_min", "partition", "account", "qos", "constraint", "cpus_per_task", "setup"):
        assert key in launcher  # the keys a user changes, documented in the preset
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (nodes, 8)


def test_without_a_slurm_preset_the_trainer_keeps_its_own_layout():
    cfg = compose_train("trainer=ddp")
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (1, -1)
    cfg = compose_train("hydra/launcher=slurm_4x8", "trainer=ddp", "trainer.devices=4")
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (4, 4)  # the command line wins
    # submitit's local launcher has tasks_per_node too, but Lightning starts the processes there
    cfg = compose_train("hydra/launcher=submitit_local", "trainer=ddp")
    assert cfg.hydra.launcher.tasks_per_node == 1
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (1, -1)


def test_a_task_of_the_4x8_job_gets_its_slurm_ranks(monkeypatch):
    from oneref.factory import build_trainer

    env = {
        "SLURM_JOB_ID": "777",
        "SLURM_JOB_NAME": "train",
        "SLURM_NTASKS": "32",
        "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_NNODES": "4",
        "SLURM_NODELIST": "gpu[01-04]",
        "SLURM_PROCID": "13",
        "SLURM_LOCALID": "5",
        "SLURM_NODEID": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    # the CPU stands in for the GPUs: 8 processes per node as the preset says
    cfg = compose_train(
        "hydra/launcher=slurm_4x8", "trainer.accelerator=cpu", "logger=none", "callbacks=none"
    )
    with open_dict(cfg):
        cfg.pop("hydra")
    trainer = build_trainer(cfg)
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (32, 13, 5, 1)


@pytest.mark.slow
def test_multirun_submits_the_4x8_allocation(tmp_path):
    """-m with the preset reaches sbatch: a stand-in keeps the script submitit wrote and refuses."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = tmp_path / "submitted.sh"
    (bin_dir / "sbatch").write_text(
        '#!/bin/sh\nfor a in "$@"; do last="$a"; done\ncp "$last" "$SUBMITTED"\n'
        'echo "sbatch: error: not a cluster" >&2\nexit 1\n'
    )
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it before submitting
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SUBMITTED": str(script),
        "ONEREF_ROOT": str(tmp_path),
        "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
        "WANDB_MODE": "disabled",
    }
    cmd = [
        sys.executable, "-m", "oneref.train", "-m", "hydra/launcher=slurm_4x8", "trainer=ddp",
        "optim.lr=1e-4,2e-4", "hydra.launcher.partition=gpu", "hydra.launcher.account=proj",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "not a cluster" in out.stderr, out.stderr[-3000:]
    sbatch = script.read_text()
    for line in (
        "--nodes=4",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=10",
        "--time=4320",
        "--partition=gpu",
        "--account=proj",
        "--array=0-1",  # one job per value of the sweep
    ):
        assert f"#SBATCH {line}" in sbatch, line
