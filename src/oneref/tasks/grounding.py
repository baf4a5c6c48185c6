"""REC and RES transfer as one LightningModule around the one OneRef model.

The task decides which heads exist (RES adds the seg head), which losses run (official flags),
which metrics are reported, and which parameters train: parameters that no enabled loss reaches
are frozen, which matches the official numerics (AdamW skips parameters without gradients) and
lets DDP run without ``find_unused_parameters``.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from torch import Tensor, nn

from oneref.models.oneref import BACKBONE_PARTS, OneRef
from oneref.models.registry import model_config
from oneref.tasks.losses import GroundingCriterion
from oneref.tasks.metrics import RECMetrics, RESMetrics
from oneref.tasks.optim import configure_optimizers

log = logging.getLogger(__name__)

# Epoch metrics come from torchmetrics' compute(), already reduced over all ranks and identical on
# each: "sync" them with max, which returns that value exactly on any number of ranks (and tells
# Lightning they are synchronised, instead of a warning per key under DDP).
_SYNCED = {"sync_dist": True, "reduce_fx": "max"}
# Keys of the model config that configure training, not the architecture.
_RUNTIME_MODEL_KEYS = ("size", "compile", "compile_mode", "grad_checkpointing", "attention")


def build_model(model: dict[str, Any], seg_head: bool = False, **extra: Any) -> OneRef:
    arch = {k: v for k, v in model.items() if k not in _RUNTIME_MODEL_KEYS}
    return OneRef(model_config(model["size"], seg_head=seg_head, **arch, **extra))


def embed_tokenizer(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Put the training tokenizer into a checkpoint (a sentencepiece model is ~1 MB), so that
    evaluating, fine-tuning or predicting from the file uses it (oneref.checkpoint.Checkpoint)."""
    tokenizer = getattr(getattr(module._trainer, "datamodule", None), "tokenizer", None)
    if tokenizer is not None:
        checkpoint["tokenizer"] = {
            "model": tokenizer.serialized(),
            "max_query_len": tokenizer.max_query_len,
            "source": tokenizer.model_path,
        }


class GroundingModule(L.LightningModule):
    """REC (box) or RES (mask) transfer.

    Args are plain containers (saved as hyperparameters, so our checkpoints load under
    ``torch.load(weights_only=True)``):
        model: size name plus OneRefConfig overrides, ``compile`` and ``grad_checkpointing``.
        task: ``name`` (rec | res), ``frozen_backbone``, ``losses`` (official flags),
            ``val_images_every_n_epochs``, ``original_resolution`` (metrics against the original
            annotations instead of the letterbox; see oneref.tasks.metrics).
        optim: see conf/optim/adamw.yaml.
        dataset: dataset name, used in test metric names.
        architecture: ignored on input; saved as the resolved OneRefConfig (for load_model).
    """

    def __init__(
        self,
        model: dict[str, Any],
        task: dict[str, Any],
        optim: dict[str, Any],
        dataset: str = "data",
        architecture: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        name = task["name"]
        if name not in ("rec", "res"):
            raise ValueError(f"task.name must be 'rec' or 'res', got {name!r}")
        self.is_res = name == "res"
        self.dataset_name = dataset
        self.model = build_model(model, seg_head=self.is_res)
        # The resolved OneRefConfig, so that load_model() rebuilds the model from a .ckpt alone.
        self.hparams["architecture"] = self.model.cfg.to_dict()
        if model.get("grad_checkpointing"):
            self.model.set_grad_checkpointing(True)
        self.model.beit3.set_attention(model.get("attention") or "sdpa")
        losses = dict(task.get("losses", {}))
        self.criterion = GroundingCriterion(
            similarity_temperature=self.model.cfg.similarity_temperature, **losses
        )
        self._freeze_unreached(bool(task.get("frozen_backbone", False)))
        self.set_original_resolution(bool(task.get("original_resolution", False)))

    # -- setup --------------------------------------------------------------------------------
    def _freeze_unreached(self, frozen_backbone: bool) -> None:
        """Train exactly the parts that an enabled loss reaches (oneref.tasks.losses.LOSS_REACH)."""
        trainable = self.criterion.reached_parts() & self.model.parts()
        if frozen_backbone:  # official --frozen_backbone: every beit3.* parameter
            trainable -= BACKBONE_PARTS
        if not trainable:
            raise ValueError("no enabled loss reaches any trainable parameter: check task.losses")
        self.model.set_trainable(trainable)
        log.info(
            "trained parts: %s; frozen: %s",
            ", ".join(sorted(trainable)),
            ", ".join(sorted(self.model.parts() - trainable)) or "none",
        )

    def on_fit_start(self) -> None:
        from oneref.distributed import GlobalBatchNorm2d

        sync = sum(isinstance(m, (nn.SyncBatchNorm, GlobalBatchNorm2d)) for m in self.modules())
        if sync:  # trainer.sync_batchnorm=true: the seg head's BatchNorms see the global batch
            log.info("%d synchronised BatchNorm layers", sync)

    def configure_model(self) -> None:
        if self.hparams.model.get("compile"):
            self.model.compile_layers(self.hparams.model.get("compile_mode"))

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = list(getattr(dm, "test_split_names", []) or [])
        if stage in ("test", "fit") and names and names != self.test_split_names:
            self.test_split_names = names
            self.test_metrics = nn.ModuleList(self._metric_group() for _ in names)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        embed_tokenizer(self, checkpoint)

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

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        return configure_optimizers(self, self.model, self.hparams.optim)
