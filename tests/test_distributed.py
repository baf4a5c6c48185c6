"""Scale-out: the global batch on 1, 2 and 8 devices, the multi-node check, Lightning's SLURM
detection from our config, and a 2-node torchrun run on localhost."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, open_dict

from helpers.cli import cli_env
from oneref.config import config_dir
from oneref.distributed import (
    BatchPlan,
    apply_global_batch,
    check_multi_node,
    num_devices,
    resolve_global_batch,
)

# Variables by which Lightning recognises a cluster launcher; cleared so that the tests see none.
LAUNCHER_VARS = ("SLURM_", "TORCHELASTIC_", "LSB_", "JSM_", "OMPI_", "PMI_")
LAUNCHER_NAMES = ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK")


def compose_train(*overrides: str) -> DictConfig:
    """conf/train.yaml as the CLI composes it (nothing shrunk: these tests build no model)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.pop("hydra")
    return cfg


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    for name in list(os.environ):
        if name.startswith(LAUNCHER_VARS) or name in LAUNCHER_NAMES:
            monkeypatch.delenv(name)
    yield
    GlobalHydra.instance().clear()


# -- the global batch -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("devices", "nodes", "per_device", "accumulate"),
    [(1, 1, 24, 8), (2, 1, 24, 4), (8, 1, 24, 1), (2, 2, 24, 2)],
)
def test_global_batch_follows_the_devices(devices, nodes, per_device, accumulate):
    # the official REC base recipe: 24 per GPU x 8 GPUs = 192
    cfg = compose_train(
        "trainer=ddp",
        f"trainer.devices={devices}",
        f"trainer.num_nodes={nodes}",
        f"data.batch_size={per_device}",
        "global_batch_size=192",
    )
    plan = resolve_global_batch(cfg)
    assert plan == BatchPlan(per_device, devices * nodes, accumulate, 192)
    assert plan.per_device * plan.world_size * plan.accumulate_grad_batches == 192
    assert cfg.trainer.accumulate_grad_batches == 1  # pure: the config is not touched


def test_global_batch_of_the_mrefm_layout_on_one_node():
    # official MRefM: 32 per GPU on 4 nodes x 8 GPUs = 1024
    cfg = compose_train("trainer=ddp", "trainer.devices=8", "data.batch_size=32", "global_batch_size=1024")
    assert resolve_global_batch(cfg).accumulate_grad_batches == 4
    cfg = compose_train(
        "trainer=ddp",
        "trainer.devices=8",
        "trainer.num_nodes=4",
        "data.batch_size=32",
        "global_batch_size=1024",
    )
    assert resolve_global_batch(cfg).accumulate_grad_batches == 1


def test_without_global_batch_the_accumulation_is_kept():
    cfg = compose_train("trainer=ddp", "trainer.devices=2", "trainer.accumulate_grad_batches=3")
    assert cfg.global_batch_size is None
    plan = resolve_global_batch(cfg)
    assert (plan.accumulate_grad_batches, plan.effective_batch_size) == (3, cfg.data.batch_size * 2 * 3)


def test_all_devices_resolve_from_the_accelerator(monkeypatch):
    # trainer=ddp asks for every GPU (-1); with 8 visible that is 8
    cfg = compose_train("trainer=ddp", "data.batch_size=24", "global_batch_size=192")
    assert cfg.trainer.devices == -1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert resolve_global_batch(cfg).accumulate_grad_batches == 1
    assert resolve_global_batch(cfg, device_count=2).accumulate_grad_batches == 4
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="none is visible"):
        resolve_global_batch(cfg)


@pytest.mark.parametrize(
    ("trainer", "expected"),
    [
        ({"accelerator": "gpu", "devices": [0, 3]}, 2),
        ({"accelerator": "gpu", "devices": "0,1,2"}, 3),
        ({"accelerator": "gpu", "devices": "4"}, 4),
        ({"accelerator": "cpu", "devices": "auto"}, 1),
        ({"accelerator": "cpu", "devices": 2}, 2),
    ],
)
def test_device_counts_as_lightning_reads_them(trainer, expected):
    assert num_devices(trainer) == expected


@pytest.mark.parametrize("devices", [0, -2, "two", [], True])
def test_bad_device_values_name_the_key(devices):
    with pytest.raises(ValueError, match="trainer.devices"):
        num_devices({"accelerator": "gpu", "devices": devices})


def test_a_global_batch_that_does_not_divide_says_what_to_set():
    cfg = compose_train("trainer=ddp", "trainer.devices=8", "data.batch_size=32", "global_batch_size=192")
    with pytest.raises(ValueError, match="global_batch_size=192") as err:
        resolve_global_batch(cfg)
    message = str(err.value)
    assert "32 x 8 = 256" in message and "multiple of 256" in message and "data.batch_size" in message


def test_global_batch_and_accumulation_both_set_is_an_error():
    cfg = compose_train(
        "trainer=ddp", "trainer.devices=2", "data.batch_size=24", "global_batch_size=192",
        "trainer.accumulate_grad_batches=2",
    )  # fmt: skip
    with pytest.raises(ValueError, match="trainer.accumulate_grad_batches=2") as err:
        resolve_global_batch(cfg)
    assert "asks for 4" in str(err.value)


@pytest.mark.parametrize("value", [0, -64, "'192'", 1.5])
def test_bad_global_batch_values_are_rejected(value):
    cfg = compose_train("trainer=ddp", "trainer.devices=2", f"global_batch_size={value}")
    with pytest.raises(ValueError, match="global_batch_size"):
        resolve_global_batch(cfg)


def test_apply_global_batch_sets_the_trainer_accumulation():
    cfg = compose_train("trainer=ddp", "trainer.devices=2", "data.batch_size=24", "global_batch_size=192")
    plan = apply_global_batch(cfg)
    assert cfg.trainer.accumulate_grad_batches == plan.accumulate_grad_batches == 4


# -- several nodes ----------------------------------------------------------------------------
def test_several_nodes_without_a_launcher_is_one_clear_error():
    cfg = compose_train("trainer.num_nodes=4")
    with pytest.raises(ValueError) as err:
        check_multi_node(cfg)
    message = str(err.value)
    assert message.startswith("trainer.num_nodes=4")
    for advice in ("torchrun --nnodes 4", "SLURM", "trainer.num_nodes=1"):
        assert advice in message


def test_one_node_needs_no_launcher():
    assert check_multi_node(compose_train()) is None


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TORCHELASTIC_RUN_ID": "none"}, "TorchElasticEnvironment"),
        ({"SLURM_NTASKS": "8", "SLURM_JOB_NAME": "train"}, "SLURMEnvironment"),
        ({"NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"}, "LightningEnvironment"),
    ],
)
def test_several_nodes_under_a_launcher_pass(monkeypatch, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert check_multi_node(compose_train("trainer.num_nodes=2")) == expected


def test_an_interactive_slurm_shell_is_not_a_launcher(monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # salloc + a shell: Lightning does not take it as SLURM
    with pytest.raises(ValueError, match="trainer.num_nodes=2"):
        check_multi_node(compose_train("trainer.num_nodes=2"))


def test_bad_num_nodes_is_rejected():
    with pytest.raises(ValueError, match="trainer.num_nodes=0"):
        check_multi_node(compose_train("trainer.num_nodes=0"))


def fake_slurm(monkeypatch, *, nodes: int, tasks_per_node: int, proc_id: int) -> None:
    """The variables srun gives task `proc_id` of a job on `nodes` x `tasks_per_node`."""
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "train",
        "SLURM_NTASKS": str(nodes * tasks_per_node),
        "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
        "SLURM_NNODES": str(nodes),
        "SLURM_NODELIST": f"gpu[07-{6 + nodes:02d}]",
        "SLURM_PROCID": str(proc_id),
        "SLURM_LOCALID": str(proc_id % tasks_per_node),
        "SLURM_NODEID": str(proc_id // tasks_per_node),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_trainer_from_our_config_picks_slurm_ranks(monkeypatch):
    from oneref.factory import build_trainer

    fake_slurm(monkeypatch, nodes=2, tasks_per_node=2, proc_id=3)
    cfg = compose_train("trainer=ddp_sim", "trainer.num_nodes=2", "logger=none", "callbacks=none")
    assert check_multi_node(cfg) == "SLURMEnvironment"
    trainer = build_trainer(cfg)
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment)
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (4, 3, 1, 1)
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (4, 3, 1, 1)
    assert env.main_address == "gpu07"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_nodes_on_localhost(tmp_path, cache_dir):
    """Two torchrun 'nodes' of one process each (gloo): both ranks train, test and finish, into
    one run folder (every node is given the same hydra.run.dir)."""
    run_dir = tmp_path / "run"
    env = cli_env(tmp_path, cache_dir, OMP_NUM_THREADS="1")
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
    ]  # fmt: skip
    train = [
        "-m", "oneref.train",
        "trainer=ddp_sim", "trainer.devices=1", "trainer.num_nodes=2", "debug=default",
        "trainer.max_steps=3", "data.batch_size=16", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "callbacks.rich_progress_bar=null",
        # the session's small synthetic set (conftest.TINY_SYNTHETIC)
        "data.synthetic.num_train=96", "data.synthetic.num_val=32", "data.synthetic.num_test=32",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    procs = [
        subprocess.Popen(
            [*torchrun, "--node_rank", str(rank), *train],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    try:
        outputs = [proc.communicate(timeout=400)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank}:\n{out[-4000:]}"
    assert "'world_size': 2" in outputs[0] and "GLOBAL_RANK: 1" in outputs[1]
    # one run folder: no rank made a timestamped one of its own
    assert not (tmp_path / "logs" / "rec_tiny_synthetic" / "runs").exists()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3  # 96 samples / (16 per rank x 2 ranks), one epoch
