"""REC and RES transfer as one LightningModule around the one OneRef model.

The task decides which heads exist (RES adds the seg head), which losses run (official flags),
which metrics are reported, and which parameters train: parameters that no enabled loss reaches
are frozen, which matches the official numerics (AdamW skips parameters without gradients) and
lets DDP run without ``find_unused_parameters``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from oneref.tasks.base import OneRefModule
from oneref.tasks.metrics import RECMetrics, RESMetrics

log = logging.getLogger(__name__)

# Epoch metrics come from torchmetrics' compute(), already reduced over all ranks and identical on
# each: "sync" them with max, which returns that value exactly on any number of ranks (and tells
# Lightning they are synchronised, instead of a warning per key under DDP).
_SYNCED = {"sync_dist": True, "reduce_fx": "max"}


class GroundingModule(OneRefModule):
    """REC (box) or RES (mask) transfer. Args as :class:`oneref.tasks.base.OneRefModule`; ``task``
    holds ``name`` (rec | res), ``frozen_backbone``, ``losses`` (official flags),
    ``val_images_every_n_epochs`` and ``original_resolution`` (metrics against the original
    annotations instead of the letterbox; see oneref.tasks.metrics)."""

    TASKS = ("rec", "res")

    def __init__(
        self, model: dict[str, Any], task: dict[str, Any], optim: dict[str, Any], **kwargs: Any
    ) -> None:
        super().__init__(model, task, optim, **kwargs)
        self.freeze_unreached(bool(task.get("frozen_backbone", False)))
        self.set_original_resolution(bool(task.get("original_resolution", False)))

    @property
    def is_res(self) -> bool:
        return self.hparams.task["name"] == "res"

    def heads(self, task: Mapping[str, Any]) -> dict[str, Any]:
        return {"seg_head": task["name"] == "res"}

    # -- setup --------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        from oneref.distributed import GlobalBatchNorm2d

        sync = sum(isinstance(m, (nn.SyncBatchNorm, GlobalBatchNorm2d)) for m in self.modules())
        if sync:  # trainer.sync_batchnorm=true: the seg head's BatchNorms see the global batch
            log.info("%d synchronised BatchNorm layers", sync)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = list(getattr(dm, "test_split_names", []) or [])
        if stage in ("test", "fit") and names and names != self.test_split_names:
            self.test_split_names = names
            self.test_metrics = nn.ModuleList(self._metric_group() for _ in names)

    def set_original_resolution(self, value: bool) -> None:
        """Metric protocol: False (official) measures in the S x S letterbox, True against the
        original annotations. Rebuilds the metrics (eval sets it on a loaded checkpoint)."""
        self.original_resolution = bool(value)
        val = self._metric_group()
        self.val_rec = val["rec"]
        self.val_res = val["res"] if self.is_res else None
        self.test_metrics = nn.ModuleList()
        self.test_split_names = []

    def _metric_group(self) -> nn.ModuleDict:
        kw = {"original_resolution": self.original_resolution, "img_size": self.model.cfg.img_size}
        group = {"rec": RECMetrics(**kw)}
        if self.is_res:
            group["res"] = RESMetrics(**kw)
        return nn.ModuleDict(group)

    def _update_metrics(self, rec: RECMetrics, res: RESMetrics | None, out: dict, batch: dict) -> None:
        valid = batch.get("valid")  # False on the padding repeats of an evaluation shard
        if not self.original_resolution:
            rec.update(out["pred_box"], batch["box"], valid=valid)
            if res is not None:
                res.update(out["seg_mask"], batch["obj_mask"], valid=valid)
            return
        frame = {"letterbox": batch["letterbox"], "orig_size": batch["orig_size"], "valid": valid}
        rec.update(out["pred_box"], orig_box=batch["orig_box"], **frame)
        if res is not None:
            if "orig_mask" not in batch:
                raise ValueError(
                    "task.original_resolution=true for RES needs the original masks in the batch: "
                    "set data.orig_masks=true"
                )
            res.update(out["seg_mask"], orig_mask=batch["orig_mask"], **frame)

    # -- steps --------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        pad = batch["text_padding_mask"] if batch.get("text_padded", True) else None
        return self.model(batch["image"], batch["text_ids"], pad)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self(batch)
        losses = self.criterion(out, batch, logit_scale=self.model.logit_scale)
        bs = batch["image"].shape[0]
        terms = {f"train/{k}": v.detach() for k, v in losses.items() if k != "loss"}
        self.log_dict(terms, batch_size=bs)
        self.log("train/loss", losses["loss"].detach(), batch_size=bs, prog_bar=True)
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self(batch)
        losses = self.criterion(out, batch, logit_scale=self.model.logit_scale)
        self.log("val/loss", losses["loss"], batch_size=batch["image"].shape[0], sync_dist=True)
        self._update_metrics(self.val_rec, self.val_res, out, batch)

    def on_validation_epoch_end(self) -> None:
        # RES runs report the box metrics too, as val/box_acc@0.5 etc. (the mask metrics own val/).
        box_prefix = "val/box_" if self.val_res is not None else "val/"
        metrics = {f"{box_prefix}{k}": v for k, v in self.val_rec.compute().items()}
        self.val_rec.reset()
        if self.val_res is not None:
            metrics.update({f"val/{k}": v for k, v in self.val_res.compute().items()})
            self.val_res.reset()
        self.log_dict(metrics, prog_bar=True, **_SYNCED)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        out = self(batch)
        group = self._test_group(dataloader_idx)
        self._update_metrics(group["rec"], group["res"] if "res" in group else None, out, batch)

    def _test_group(self, idx: int) -> nn.ModuleDict:
        if not self.test_metrics:  # no datamodule split names: one anonymous split
            self.test_split_names = ["test"]
            self.test_metrics = nn.ModuleList([self._metric_group()]).to(self.device)
        return self.test_metrics[idx]

    def on_test_epoch_end(self) -> None:
        metrics: dict[str, Tensor] = {}
        for split, group in zip(self.test_split_names, self.test_metrics):
            prefix = f"test/{self.dataset_name}/{split}"
            for k, v in group["rec"].compute().items():
                metrics[f"{prefix}/{'box_' if 'res' in group else ''}{k}"] = v
            if "res" in group:
                metrics.update({f"{prefix}/{k}": v for k, v in group["res"].compute().items()})
            for metric in group.values():
                metric.reset()
        self.log_dict(metrics, add_dataloader_idx=False, **_SYNCED)
