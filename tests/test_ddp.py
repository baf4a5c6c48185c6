"""Scale-out on the CPU: 2-process DDP training (trainer=ddp_sim, the DDP 8 GPUs get), exact metrics
across ranks, one run folder, preemption and resume, FSDP's strategy object.

Lightning's DDP launcher re-executes the command line, so distributed runs go through the CLI in a
subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from helpers.compose import TINY_SYNTHETIC, train_tiny_checkpoint
from oneref.checkpoint import CheckpointError
from oneref.checkpoint.resume import newest_intact_checkpoint, resolve_ckpt_path
from oneref.data.datasets import pad_index
from oneref.data.samplers import ShardSampler
from oneref.errors import UserError
from oneref.train import train

SYNTHETIC = [f"data.synthetic.{k}={v}" for k, v in TINY_SYNTHETIC.items()]


def run_cli(module: str, overrides: list[str], root: Path, cache: Path, timeout: int = 600):
    env = {**os.environ, "ONEREF_ROOT": str(root), "ONEREF_CACHE": str(cache), "WANDB_MODE": "disabled"}
    quiet = ["callbacks.rich_progress_bar=null"] if module == "oneref.train" else []
    cmd = [sys.executable, "-m", module, *overrides, *quiet]
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-4000:])
    return out


DDP_TRAIN = ["trainer=ddp_sim", "trainer.max_epochs=1", "data.batch_size=8", "trainer.limit_val_batches=2"]


def test_ddp_sim_rec_trains_past_step_2_tests_and_writes_one_run_folder(tmp_path, cache_dir):
    """The crash of every multi-GPU REC/RES run (an unused mask_token) and the mean-box baseline's
    deadlock are gone; both ranks write into one run folder, files by rank 0."""
    out = run_cli("oneref.train", [*DDP_TRAIN, *SYNTHETIC], tmp_path, cache_dir)
    console = out.stdout + out.stderr
    assert "baseline/synthetic/test/acc@0.5" in console  # rank 0 printed the whole table
    assert "sync_dist=True" not in console  # epoch metrics are logged as the synchronised values
    runs = list((tmp_path / "logs" / "rec_tiny_synthetic" / "runs").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 48 // 8  # 96 samples over 2 ranks, batch 8
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "csv" / "metrics.csv").is_file()
    assert {p.name for p in run.glob("*.log")} == {"train.log", "train_rank1.log"}
    assert not list(tmp_path.rglob(".pl_hydra*"))


def test_ddp_sim_res_with_sync_batchnorm(tmp_path, cache_dir):
    out = run_cli(
        "oneref.train",
        [*DDP_TRAIN, "task=res", "trainer.sync_batchnorm=true", "test=false", *SYNTHETIC],
        tmp_path,
        cache_dir,
    )
    assert "3 synchronised BatchNorm layers" in out.stdout + out.stderr
    (run,) = (tmp_path / "logs" / "res_tiny_synthetic" / "runs").iterdir()
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state["model.bn1.num_batches_tracked"] == 6  # the official keys, SyncBatchNorm or not


@pytest.mark.slow
def test_multirun_of_two_ddp_jobs(tmp_path, cache_dir):
    """Under -m, each DDP rank re-runs its own job, not the sweep (the Hydra + Lightning trap)."""
    overrides = ["-m", "optim.lr=1e-4,3e-4", *DDP_TRAIN, "test=false", *SYNTHETIC]
    run_cli("oneref.train", overrides, tmp_path, cache_dir)
    (sweep,) = (tmp_path / "logs" / "rec_tiny_synthetic" / "multiruns").iterdir()
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        last = torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=True)
        assert last["global_step"] == 6
        assert {p.name for p in (sweep / job).glob("*.log")} == {"train.log", "train_rank1.log"}
    assert not (tmp_path / "logs" / "rec_tiny_synthetic" / "runs").exists()


# -- exact metrics across ranks --------------------------------------------------------------------
def test_shard_sampler_pads_the_short_rank_with_a_zero_count_repeat():
    data = list(range(7))
    shards = [list(ShardSampler(data, 2, r)) for r in (0, 1)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5, pad_index(5)]]
    assert sorted(i for s in shards for i in s if i >= 0) == data  # every sample exactly once
    assert [list(ShardSampler(data[:1], 3, r)) for r in range(3)] == [[0], [pad_index(0)], [pad_index(0)]]


@pytest.mark.parametrize("task", ["res"])  # RES reports the box metrics too
def test_two_process_evaluation_equals_one_process(tmp_path, cache_dir, task):
    """A fixed checkpoint on an odd-sized split: the same counts on 2 ranks as on one."""
    ckpt = train_tiny_checkpoint(task, tmp_path / "train", cache_dir)
    odd = ["data.synthetic.num_test=33", "data.synthetic.num_val=33", "data.eval_batch_size=8"]
    common = [f"task={task}", f"ckpt_path={ckpt}", *SYNTHETIC[:1], *odd]
    results = {}
    for name, trainer in (("single", "trainer=cpu"), ("ddp", "trainer=ddp_sim")):
        out_json = tmp_path / f"{name}.json"
        run_cli("oneref.eval", [*common, trainer, f"output_json={out_json}"], tmp_path, tmp_path / "cache")
        results[name] = json.loads(out_json.read_text())["metrics"]
    single, ddp = results["single"], results["ddp"]
    assert single.keys() == ddp.keys() and "test/synthetic/test/oiou" in single
    for key, value in single.items():
        if key.endswith("miou"):  # a float64 sum in another order
            assert ddp[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
        else:  # ratios of integer counts
            assert ddp[key] == value, key


# -- preemption and resume ---------------------------------------------------------------------------
RESUME = (
    "trainer.max_epochs=2",
    "data.batch_size=16",  # 6 steps per epoch
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "callbacks.step_checkpoint.every_n_train_steps=2",
    "report_baseline=false",
)


class Preempted(RuntimeError):
    pass


class PreemptAt(L.Callback):
    """Kills training at the start of step ``step`` (after its checkpoints were written), as a
    preemption would: no epoch end, no final checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Preempted(f"preempted at step {self.step}")


def _final_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_a_run_interrupted_mid_epoch_resumes_to_the_same_result(make_cfg, tmp_path):
    """Stopped at step 8 (epoch 1, batch 2 of 6) and resumed from its step checkpoint, a run ends
    with the weights and metrics of an uninterrupted one: the epoch continues with the batches it
    had not seen, in the same order."""
    whole_dir = tmp_path / "whole"
    whole = make_cfg(*RESUME)
    with open_dict(whole):
        whole.paths.output_dir = str(whole_dir)
    expected = train(whole)

    cut_dir = tmp_path / "cut"
    cut = make_cfg(*RESUME, "+callbacks.preempt._target_=test_ddp.PreemptAt", "+callbacks.preempt.step=8")
    with open_dict(cut):
        cut.paths.output_dir = str(cut_dir)
    with pytest.raises(Preempted):
        train(cut)
    step_ckpt = cut_dir / "checkpoints" / "step.ckpt"
    saved = torch.load(step_ckpt, weights_only=True)
    assert (saved["global_step"], saved["epoch"]) == (8, 1)
    assert torch.load(cut_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6

    resumed = make_cfg(*RESUME, "ckpt_path=auto")  # the newest intact checkpoint of its folder
    with open_dict(resumed):
        resumed.paths.output_dir = str(cut_dir)
    assert resolve_ckpt_path("auto", cut_dir / "checkpoints") == str(step_ckpt)
    got = train(resumed)
    for key in ("test/synthetic/test/acc@0.5", "test/synthetic/test/miou", "val/acc@0.5", "val/miou"):
        assert got[key] == expected[key], key
    a, b = _final_state(whole_dir), _final_state(cut_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_truncated_checkpoints_are_refused_by_name_and_skipped_by_auto_resume(make_cfg, tmp_path):
    ckpt = train_tiny_checkpoint("rec", tmp_path / "train", Path(make_cfg().paths.cache_dir))
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    good = folder / "last.ckpt"
    good.write_bytes(ckpt.read_bytes())
    bad = folder / "step.ckpt"
    bad.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a job killed while writing
    os.utime(bad, (good.stat().st_mtime + 10,) * 2)  # the newer file
    with pytest.raises(CheckpointError, match=str(bad)):
        resolve_ckpt_path(str(bad), folder)
    cfg = make_cfg(f"ckpt_path={bad}")
    with pytest.raises(CheckpointError, match="truncated"):
        train(cfg)
    assert newest_intact_checkpoint(folder) == good
    from oneref.eval import evaluate

    # eval's preflight names the file before anything is built
    with pytest.raises(UserError, match=rf"(?s){re.escape(str(bad))}.*truncated"):
        evaluate(make_cfg(f"ckpt_path={bad}", name="eval"))


def test_checkpoints_are_written_atomically(tmp_path):
    from oneref.checkpoint.resume import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "c" / "x.ckpt"
    io.save_checkpoint({"global_step": 3, "state_dict": {}}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["x.ckpt"]  # no temporary file left behind

    class Boom(dict):
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"global_step": 4, "x": Boom()}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 3  # the old file is intact
    assert [p.name for p in path.parent.iterdir()] == ["x.ckpt"]


def test_slurm_batch_jobs_get_a_stable_run_folder_and_wandb_id(monkeypatch):
    from oneref.config import run_id, run_stamp

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert run_stamp("2026-12-02_10-00-00") == "2026-12-02_10-00-00"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NAME", "oneref")
    assert run_stamp("x") == "slurm-4242"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_stamp("x") == "slurm-4242_3"
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # an interactive allocation: several runs share it
    assert run_stamp("x") == "x"
    assert run_id("/a/b") == run_id("/a/b") != run_id("/a/c") and len(run_id("/a/b")) == 16


# -- FSDP: declared, not coded --------------------------------------------------------------------------
def test_fsdp_strategy_wraps_and_checkpoints_each_multiway_layer(make_cfg):
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from oneref.models.beit3 import EncoderLayer

    cfg = make_cfg("strategy=fsdp", "strategy.activation_checkpointing_layers=true")
    strategy = instantiate(cfg.strategy)
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {EncoderLayer}
    checkpointing = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert checkpointing._module_classes == {EncoderLayer}
    assert strategy._state_dict_type == "full" and str(strategy.sharding_strategy).endswith("FULL_SHARD")


def test_fsdp_on_a_machine_without_gpu_is_one_clear_error(make_cfg):
    from oneref.factory import build_trainer

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: FSDP can run")
    with pytest.raises(ValueError, match="strategy=fsdp needs CUDA GPUs.*strategy=ddp"):
        build_trainer(make_cfg("strategy=fsdp"))


def _global_bn_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from oneref.distributed import GlobalBatchNorm2d

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    x = torch.randn(2 * world, 3, 4, 5) * 3 + 1
    bn = GlobalBatchNorm2d(3)
    bn.weight.data.uniform_(0.5, 1.5)
    mine = x[2 * rank : 2 * rank + 2].clone().requires_grad_(True)
    y = bn(mine)
    (y * torch.arange(y.numel()).view_as(y)).sum().backward()
    torch.save(
        {"y": y.detach(), "grad": mine.grad, "state": bn.state_dict(), "wgrad": bn.weight.grad},
        f"{out}.{rank}",
    )
    dist.destroy_process_group()


def test_global_batchnorm_equals_batchnorm_over_the_concatenated_batch(tmp_path):
    """trainer.sync_batchnorm on the CPU (gloo): outputs, input gradients, parameter gradients
    (summed over ranks by DDP) and running statistics of a BatchNorm2d over all ranks' samples."""
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(
        _global_bn_worker, args=(world, f"file://{tmp_path / 'init'}", str(tmp_path / "r")), nprocs=world
    )
    parts = [torch.load(f"{tmp_path / 'r'}.{r}", weights_only=True) for r in range(world)]
    torch.manual_seed(0)
    x = torch.randn(2 * world, 3, 4, 5) * 3 + 1
    bn = torch.nn.BatchNorm2d(3)
    bn.weight.data.uniform_(0.5, 1.5)
    xr = x.clone().requires_grad_(True)
    y = bn(xr)
    weights = torch.cat([torch.arange(y[:2].numel()).view_as(y[:2]).float()] * world)
    (y * weights).sum().backward()
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach())
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts]), xr.grad)
    torch.testing.assert_close(sum(p["wgrad"] for p in parts), bn.weight.grad, rtol=1e-5, atol=1e-5)
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(parts[0]["state"][key], value)
