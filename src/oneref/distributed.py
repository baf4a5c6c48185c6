"""How many processes a run spans, and the checks to make before a Trainer is built.

``train.py`` calls, before it builds the Trainer::

    check_multi_node(cfg)     # trainer.num_nodes > 1 needs torchrun, SLURM, LSF or MPI
    apply_global_batch(cfg)   # global_batch_size -> trainer.accumulate_grad_batches
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from omegaconf import DictConfig, ListConfig, open_dict

_ALL = ("auto", -1, "-1")  # Lightning: every device of the accelerator


def num_devices(trainer: Mapping[str, Any], device_count: int | None = None) -> int:
    """Devices per node that Lightning will use for ``trainer.devices`` on ``trainer.accelerator``.

    ``auto`` and ``-1`` mean every visible device (``device_count``, else what torch sees); on the
    CPU ``auto`` is one process, as in Lightning."""
    devices = trainer.get("devices", "auto")
    if isinstance(devices, bool):  # bool is an int; Lightning rejects it
        raise ValueError(f"trainer.devices={devices!r}: give a device count, a list of ids, -1 or auto")
    if isinstance(devices, (list, tuple, ListConfig)):
        if not devices:
            raise ValueError("trainer.devices=[] selects no device: give a count, a list of ids, -1 or auto")
        return len(devices)
    if isinstance(devices, str) and devices.strip() not in ("auto", "-1"):
        text = devices.strip()
        if "," in text:  # Lightning's "0,1" = these GPU ids
            return len([d for d in text.split(",") if d.strip()])
        if not text.isdigit():
            raise ValueError(f"trainer.devices={devices!r}: give a device count, a list of ids, -1 or auto")
        devices = int(text)
    if isinstance(devices, int) and devices > 0:
        return devices
    if devices not in _ALL:
        raise ValueError(f"trainer.devices={devices!r}: give a device count > 0, a list of ids, -1 or auto")
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator == "cpu":
        if devices != "auto":
            raise ValueError(
                "trainer.devices=-1 on the CPU: give the number of processes, e.g. trainer.devices=2"
            )
        return 1
    if device_count is not None:
        return device_count
    if accelerator in ("gpu", "cuda"):
        count = torch.cuda.device_count()
    elif accelerator == "mps":
        count = 1
    else:
        raise ValueError(f"trainer.devices={devices!r} on accelerator {accelerator!r}: give a device count")
    if count < 1:
        raise ValueError(
            f"trainer.devices={devices!r} asks for every GPU, but none is visible: run on a GPU machine "
            "or choose trainer=cpu"
        )
    return count


def world_size(cfg: DictConfig, device_count: int | None = None) -> int:
    """Processes in the run: devices per node x ``trainer.num_nodes``."""
    nodes = cfg.trainer.get("num_nodes", 1)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"trainer.num_nodes={nodes!r}: give a number of machines >= 1")
    return num_devices(cfg.trainer, device_count) * nodes


@dataclass(frozen=True)
class BatchPlan:
    """Samples per optimiser step = per_device x world_size x accumulate_grad_batches."""

    per_device: int
    world_size: int
    accumulate_grad_batches: int
    effective_batch_size: int


def resolve_global_batch(cfg: DictConfig, device_count: int | None = None) -> BatchPlan:
    """The gradient accumulation that makes ``global_batch_size`` samples per optimiser step with
    ``data.batch_size`` per device on the devices and nodes at hand. Without ``global_batch_size``
    (null) ``trainer.accumulate_grad_batches`` is kept as given. Reads ``cfg`` only."""
    per_device = cfg.data.get("batch_size")
    if isinstance(per_device, bool) or not isinstance(per_device, int) or per_device < 1:
        raise ValueError(f"data.batch_size={per_device!r}: give the number of samples per device, >= 1")
    world = world_size(cfg, device_count)
    given = cfg.trainer.get("accumulate_grad_batches", 1)
    target = cfg.get("global_batch_size")
    if target is None:
        if isinstance(given, bool) or not isinstance(given, int) or given < 1:
            raise ValueError(f"trainer.accumulate_grad_batches={given!r}: give an integer >= 1")
        return BatchPlan(per_device, world, given, per_device * world * given)
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise ValueError(
            f"global_batch_size={target!r}: give the number of samples per optimiser step, or null"
        )
    step = per_device * world
    layout = (
        f"data.batch_size x processes = {per_device} x {world} = {step} (trainer.devices="
        f"{cfg.trainer.get('devices')!r}, trainer.num_nodes={cfg.trainer.get('num_nodes', 1)})"
    )
    if target % step:
        raise ValueError(
            f"global_batch_size={target} is not a multiple of {layout}: set global_batch_size to a multiple "
            f"of {step} (e.g. {max(step, target // step * step)}), or a data.batch_size whose product with "
            f"{world} divides {target}"
        )
    accumulate = target // step
    if given not in (None, 1, accumulate):
        raise ValueError(
            f"global_batch_size={target} and trainer.accumulate_grad_batches={given} are both set; "
            f"global_batch_size asks for {accumulate} ({target} / {step}): drop one of the two"
        )
    return BatchPlan(per_device, world, accumulate, target)


def apply_global_batch(cfg: DictConfig, device_count: int | None = None) -> BatchPlan:
    """``resolve_global_batch``, written into ``cfg.trainer.accumulate_grad_batches``."""
    plan = resolve_global_batch(cfg, device_count)
    with open_dict(cfg):
        cfg.trainer.accumulate_grad_batches = plan.accumulate_grad_batches
    return plan


def check_multi_node(cfg: DictConfig) -> str | None:
    """With ``trainer.num_nodes > 1``, the name of the cluster environment Lightning will use.

    Without one (no torchrun, SLURM, LSF or MPI variables, and no NODE_RANK + MASTER_ADDR of a
    manual launch), every process would wait forever for nodes that never come: raise instead."""
    nodes = cfg.trainer.get("num_nodes", 1)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"trainer.num_nodes={nodes!r}: give a number of machines >= 1")
    if nodes == 1:
        return None
    from lightning.fabric.plugins.environments import (
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    # Lightning's own order of detection
    for env in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment):
        if env.detect():
            return env.__name__
    if "NODE_RANK" in os.environ and "MASTER_ADDR" in os.environ:
        return "LightningEnvironment"
    raise ValueError(
        f"trainer.num_nodes={nodes}, but this process was not started by a multi-node launcher (no torchrun, "
        "SLURM, LSF or MPI variables, no NODE_RANK and MASTER_ADDR): it would wait forever for the other "
        f"nodes. On each of the {nodes} machines run `torchrun --nnodes {nodes} --node_rank <0..{nodes - 1}> "
        "--nproc_per_node <GPUs> --master_addr <first machine> -m oneref.train ...`, or submit through SLURM "
        "(hydra/launcher=slurm_4x8 with -m, or srun), or set trainer.num_nodes=1 for one machine."
    )


# -- DDP child processes under Hydra ----------------------------------------------------------------
def hydra_ddp_child_command(local_rank: int, extra: Sequence[str] = ()) -> tuple[list[str], str]:
    """The command that starts DDP rank ``local_rank`` of this Hydra job, and its working dir.

    Lightning's DDP launcher re-executes ``sys.argv`` for every other local rank, adding
    ``hydra.run.dir`` (lightning/fabric/strategies/launchers/subprocess_script.py). Under a
    multirun that re-launches the whole sweep from every rank (``-m`` and the sweep lists are in
    ``sys.argv``): the known Hydra + Lightning trap. Here a rank re-runs exactly this job instead:
    its own resolved overrides, in single-run mode, in this job's output folder (so the run has
    one folder), without writing a second ``.hydra`` config there. ``extra`` overrides replace
    the job's overrides of the same keys (a multi-stage run starts the ranks of one stage).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hc = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    replaced = {o.split("=", 1)[0] for o in extra}
    command += [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") not in replaced]
    command += list(extra)
    command += [
        f"hydra.run.dir={hc.runtime.output_dir}",
        f"hydra.job.name={hc.job.name}_rank{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


def install_hydra_ddp_launch(extra: Sequence[str] = ()) -> None:
    """Make Lightning's DDP launchers (Fabric's and the Trainer's, which imports its own reference)
    start ranks with :func:`hydra_ddp_child_command` (with ``extra`` overrides)."""
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher

    for launcher in (fabric_launcher, trainer_launcher):
        launcher._hydra_subprocess_cmd = functools.partial(hydra_ddp_child_command, extra=tuple(extra))


# -- synchronised BatchNorm on any backend -------------------------------------------------------------
class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch of every rank, on any process
    group backend. torch's SyncBatchNorm runs on CUDA only; this is its CPU (gloo) counterpart, so
    that ``trainer.sync_batchnorm=true`` works in ``trainer=ddp_sim``. The per-channel sums travel
    through ``torch.distributed.nn.functional.all_reduce``, whose backward all-reduces the
    gradients, as SyncBatchNorm's does. Same keys as BatchNorm2d; evaluation is plain BatchNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (
            self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        ):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        count = torch.full((1,), x.numel() / c, dtype=x.dtype, device=x.device)
        stats = all_reduce(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c : 2 * c] / n - mean * mean  # biased, as BatchNorm normalises with
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)  # unbiased
                self.num_batches_tracked.add_(1)
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None] if self.affine else y


class SyncBatchNormAnyBackend(TorchSyncBatchNorm):
    """``trainer.sync_batchnorm=true`` on the CPU: every BatchNorm2d becomes a GlobalBatchNorm2d
    (on CUDA Lightning's own plugin converts them to torch's SyncBatchNorm)."""

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        for name, child in model.named_children():
            if type(child) is torch.nn.BatchNorm2d:
                sync = GlobalBatchNorm2d(
                    child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
                )
                sync.load_state_dict(child.state_dict())
                setattr(model, name, sync.to(next(child.buffers()).device))
            else:
                self.apply(child)
        return model
