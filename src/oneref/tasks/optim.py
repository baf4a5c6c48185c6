"""Optimiser and learning-rate schedule from ``conf/optim``, shared by every LightningModule.

The optimiser is a ``_target_`` factory (``_partial_: true``, AdamW by default) called with the
parameter groups; the config is stored as a plain dict in the module's hyperparameters and
instantiated only here, so our checkpoints load under ``torch.load(weights_only=True)``.

Official (``train_oneref.py``): one group holding every trainable parameter with weight decay
1e-4, AdamW (0.9, 0.999), eps 1e-8, the cosine factor ``0.5 (1 + cos(pi epoch / epochs))``
stepped per epoch, no warmup. Non-official options: no-decay groups (1-D tensors and the parts the
model map marks, timm's ``param_groups_weight_decay``), layer-wise lr decay (timm's
``param_groups_layer_decay`` over the model's ``group_matcher``), warmup, a per-step schedule, a
floor.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import hydra
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from oneref.models.oneref import OneRef


def param_groups(
    model: OneRef,
    weight_decay: float,
    *,
    no_weight_decay_groups: bool = False,
    layer_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Groups of the trainable parameters, each with ``weight_decay`` and ``lr_scale``."""
    if layer_decay:
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(
            model,
            weight_decay=weight_decay,
            no_weight_decay_list=model.no_weight_decay() if no_weight_decay_groups else (),
            weight_decay_exclude_1d=no_weight_decay_groups,
            layer_decay=float(layer_decay),
        )
    elif no_weight_decay_groups:
        from timm.optim import param_groups_weight_decay

        groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=model.no_weight_decay())
    else:  # official: one group
        groups = [
            {"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}
        ]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g.setdefault("lr_scale", 1.0)
    return groups


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warmup over ``warmup_steps``, then cosine from 1 to ``min_lr_ratio`` at
    ``total_steps`` (scheduler steps: epochs or optimizer steps). With no warmup and no floor it
    is the official ``0.5 * (1 + cos(pi * epoch / epochs))``."""
    return LambdaLR(optimizer, _factor("cosine", total_steps, warmup_steps, min_lr_ratio))


def constant_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warmup, then the base learning rate."""
    return LambdaLR(optimizer, _factor("constant", total_steps, warmup_steps, min_lr_ratio))


def _factor(name: str, total: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if name == "constant":
            return 1.0
        t = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return factor


def _instantiate(cfg: Mapping[str, Any], key: str) -> Callable[..., Any]:
    spec = dict(cfg.get(key) or {})
    if "_target_" not in spec:
        raise ValueError(f"optim.{key} needs a _target_ (e.g. conf/optim/adamw.yaml); got {spec}")
    spec.setdefault("_partial_", True)
    return hydra.utils.instantiate(spec)


def configure_optimizers(module: Any, model: nn.Module, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``LightningModule.configure_optimizers`` for ``model`` from the ``optim`` config ``cfg``."""
    lr = float(cfg["lr"])
    groups = param_groups(
        model,
        float(cfg.get("weight_decay", 0.0)),
        no_weight_decay_groups=bool(cfg.get("no_weight_decay_groups")),
        layer_decay=cfg.get("layer_decay"),
    )
    for g in groups:
        g["lr"] = lr * g.pop("lr_scale")
    optimizer_spec = dict(cfg.get("optimizer") or {})
    # fused kernels exist on CUDA only
    fused = bool(optimizer_spec.pop("fused", False)) and module.device.type == "cuda"
    make_optimizer = _instantiate({"optimizer": optimizer_spec}, "optimizer")
    kwargs = {"fused": True} if fused else {}
    optimizer = make_optimizer(groups, lr=lr, **kwargs)

    sched = dict(cfg.get("scheduler") or {})
    interval = sched.pop("interval", "epoch")
    if interval not in ("epoch", "step"):
        raise ValueError(f"optim.scheduler.interval must be 'epoch' or 'step', got {interval!r}")
    trainer = module.trainer
    total = trainer.max_epochs if interval == "epoch" else trainer.estimated_stepping_batches
    if interval == "epoch" and (total is None or total < 0):
        raise ValueError("an epoch-stepped schedule needs trainer.max_epochs >= 1")
    make_scheduler = _instantiate({"scheduler": sched}, "scheduler")
    params = inspect.signature(make_scheduler.func).parameters if hasattr(make_scheduler, "func") else {}
    scheduler = (
        make_scheduler(optimizer, total_steps=int(total))
        if "total_steps" in params
        else make_scheduler(optimizer)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}
