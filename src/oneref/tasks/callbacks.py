"""Lightning callbacks for the grounding tasks: a panel of validation predictions.

``ValidationImages`` draws, every N epochs, the first K samples of the first validation batch with
the ground truth (green) and the prediction (red): boxes for REC, masks for RES; for MRefM
pretraining the masked patches and, in the captions, the MIM accuracy and the MLM fills. The panel goes to
every image-capable logger (W&B ``log_image``, TensorBoard ``add_image``); a run with neither (for
example CSV only) gets PNG files under ``<run folder>/val_images/``. The cost is one extra forward
of K samples every N epochs; drawing is PIL/numpy on K small images.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image
from torch import Tensor
from torchvision.ops import box_convert

from oneref.atomic import atomic_write
from oneref.drawing import MIN_TILE, denormalise, draw_sample, enlarge, make_grid
from oneref.tasks.metrics import res_pred_mask

log = logging.getLogger(__name__)


def _is_mrefm(pl_module: L.LightningModule) -> bool:
    from oneref.tasks.mrefm import MRefMModule  # here: tasks.mrefm imports the module this one serves

    return isinstance(pl_module, MRefMModule)


class ValidationImages(L.Callback):
    """Every ``every_n_epochs`` epochs, log ``num_images`` validation samples with the ground truth
    and the prediction drawn on them.

    Args:
        every_n_epochs: log after validation of epochs 0, N, 2N, ... (0 or None: never).
        num_images: K, taken from the first batch of the first validation dataloader.
        key: the name of the panel in the loggers.
        png: ``auto`` writes PNGs only when no W&B or TensorBoard logger takes the panel;
            ``always`` / ``never`` force it.
        columns: tiles per row of the PNG / TensorBoard panel.
    """

    def __init__(
        self,
        every_n_epochs: int | None = 5,
        num_images: int = 8,
        key: str = "val/images",
        png: Literal["auto", "always", "never"] = "auto",
        columns: int = 4,
    ) -> None:
        if png not in ("auto", "always", "never"):
            raise ValueError(f"ValidationImages png must be 'auto', 'always' or 'never', got {png!r}")
        if num_images < 1:
            raise ValueError(f"ValidationImages num_images must be >= 1, got {num_images}")
        self.every_n_epochs = int(every_n_epochs or 0)
        self.num_images = int(num_images)
        self.key = key
        self.png = png
        self.columns = int(columns)
        self._due = False

    def _is_due(self, trainer: L.Trainer) -> bool:
        if self.every_n_epochs <= 0 or trainer.sanity_checking or trainer.fast_dev_run:
            return False
        return trainer.current_epoch % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._due = self._is_due(trainer)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._due or batch_idx != 0 or dataloader_idx != 0:
            return
        self._due = False
        k = min(self.num_images, int(batch["image"].shape[0]))
        sub = {key: v[:k] if isinstance(v, (Tensor, list)) else v for key, v in batch.items()}
        # Every rank runs the forward (sharded strategies gather weights in it); rank 0 draws.
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            out = self._forward(trainer, pl_module, sub)
        if trainer.is_global_zero:
            sub["tokenizer"] = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
            self._log_panel(trainer, pl_module, sub, out)

    def _forward(self, trainer: L.Trainer, pl_module: L.LightningModule, sub: dict[str, Any]) -> Any:
        if _is_mrefm(pl_module):  # both step kinds of MRefM pretraining
            return tuple(pl_module(sub, kind) for kind in ("mim", "mlm"))
        return pl_module(sub)

    # -- drawing and logging -------------------------------------------------------------------
    def draw(
        self, batch: dict[str, Any], out: dict[str, Tensor], is_res: bool
    ) -> tuple[list[np.ndarray], list[str]]:
        images = denormalise(batch["image"])
        size = images.shape[1:3]
        zoom = max(1, -(-MIN_TILE // max(size)))
        phrases = [str(p) for p in batch.get("phrase", [""] * len(images))]
        if is_res:
            pred = res_pred_mask(out["seg_mask"], size).cpu().numpy()
            gt = batch["obj_mask"].reshape(len(images), *size).bool().cpu().numpy()
            images, pred, gt = (enlarge(a, zoom) for a in (images, pred, gt))
            tiles = [
                draw_sample(img, p, gt_mask=g, pred_mask=m) for img, p, g, m in zip(images, phrases, gt, pred)
            ]
        else:
            images = enlarge(images, zoom)
            scale = zoom * torch.tensor([size[1], size[0], size[1], size[0]], dtype=torch.float32)
            pred = (box_convert(out["pred_box"].float().cpu(), "cxcywh", "xyxy").clamp(0, 1) * scale).numpy()
            gt = (box_convert(batch["box"].float().cpu(), "cxcywh", "xyxy") * scale).numpy()
            tiles = [
                draw_sample(img, p, gt_box=g, pred_box=b) for img, p, g, b in zip(images, phrases, gt, pred)
            ]
        return tiles, phrases

    def _log_panel(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict[str, Any], out: dict[str, Tensor]
    ) -> None:
        if _is_mrefm(pl_module):
            tiles, phrases = _MRefMDrawing.draw(batch, out)
        else:
            tiles, phrases = self.draw(batch, out, bool(getattr(pl_module, "is_res", "seg_mask" in out)))
        step = trainer.global_step
        grid = make_grid(tiles, self.columns)
        taken = False
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=self.key, images=tiles, caption=phrases, step=step)
                taken = True
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(self.key, grid, global_step=step, dataformats="HWC")
                taken = True
        if self.png == "always" or (self.png == "auto" and not taken):
            folder = Path(trainer.default_root_dir) / "val_images"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"epoch{trainer.current_epoch:03d}_step{step:06d}.png"
            atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
            log.debug("validation panel written to %s", path)


class BadSampleReport(L.Callback):
    """At the end of every training epoch, the skipped and unparsable samples of each split
    (``data.bad_samples=skip``): warned with examples and logged as ``data/skipped/<dataset>/<split>``,
    so a run never drops data silently. Counts are summed over ranks."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "bad_sample_report"):
            return
        counts = {f"data/skipped/{r['dataset']}": float(r["skipped"]) for r in dm.bad_sample_report()}
        if counts:
            pl_module.log_dict(counts, reduce_fx="sum", sync_dist=True)


class _MRefMDrawing:
    """The MRefM panel of :class:`ValidationImages`: each sample with its masked patches tinted
    and, in the caption, its MIM accuracy and the masked expression with the model's fills
    (``[label>prediction]`` at each masked position)."""

    @classmethod
    def draw(cls, batch: dict[str, Any], out: Any) -> tuple[list[np.ndarray], list[str]]:
        (mim, mim_t), (mlm, mlm_t) = out
        images = denormalise(batch["image"])
        size = images.shape[1]
        grid = int(round(batch["mim_mask"].shape[1] ** 0.5))
        patch = size // grid
        masked = batch["mim_mask"].view(-1, grid, grid).cpu().numpy()
        masked = masked.repeat(patch, axis=1).repeat(patch, axis=2)
        hits = (mim["mim_logits"].argmax(-1) == mim_t["mim_codes"]) & mim_t["mim_mask"]
        counts = mim_t["mim_mask"].sum(1).clamp_min(1)
        mim_acc = (hits.sum(1).float() / counts).cpu().tolist()
        fills = cls._fills(batch, mlm, mlm_t)
        zoom = max(1, -(-MIN_TILE // size))
        images, masked = enlarge(images, zoom), enlarge(masked, zoom)
        tiles, captions = [], []
        for k, img in enumerate(images):
            captions.append(f"MIM acc {mim_acc[k]:.2f} | {fills[k]}")
            tiles.append(draw_sample(img, f"MIM acc {mim_acc[k]:.2f}", pred_mask=masked[k]))
        return tiles, captions

    @staticmethod
    def _fills(batch: dict[str, Any], mlm: dict[str, Tensor], targets: dict[str, Tensor]) -> list[str]:
        """The masked expression per sample, each masked piece as [label>prediction]."""
        tokenizer = batch.get("tokenizer")
        pred = mlm["mlm_logits"].argmax(-1).cpu()
        positions, valid = batch["mlm_positions"].cpu(), batch["mlm_valid"].cpu()
        labels = targets["mlm_labels"].cpu()
        out = []

        def piece(t: int) -> str:  # the MLM head also covers table rows no piece maps to
            return (
                tokenizer.id_to_piece(t) if tokenizer is not None and t < tokenizer.vocab_size else f"<{t}>"
            )

        for b, ids in enumerate(batch["text_ids"].cpu().tolist()):
            show = {
                int(p): (int(labels[b, j]), int(pred[b, j]))
                for j, p in enumerate(positions[b])
                if valid[b, j]
            }
            words = []
            for i, tok in enumerate(ids):
                if tok == 1:  # padding
                    break
                if i in show:
                    label, guess = show[i]
                    words.append(f"[{piece(label)}>{piece(guess)}]")
                elif i > 0 and tok != 2:
                    words.append(piece(tok))
            out.append(" ".join(words).replace("▁", ""))
        return out
