"""Mask Referring Modeling (MRefM) pretraining as a LightningModule around the one OneRef model.

The official loop (``engine.py`` ``train_one_epoch_with_mrefm``) alternates two kinds of step by
the global step: MIM on even steps (the image masked by the referring-aware mask, the text clean,
VQ-KD codes of the un-normalised image as targets, logits from the text-cls-modulated patches)
and MLM on odd ones (the text masked around the expression's subject and object, the image
clean). Every step also adds the enabled grounding losses: with the released scripts only the
box-mask constraint (``--enable_dynamic_mim`` switches it on). Every input comes from the data
pipeline (``data.mrefm``, oneref.data.mrefm); the frozen VQ-KD tokenizer runs without gradients
on MIM steps only and is kept out of the optimizer and out of our checkpoints.

A parameter that no loss of the current step reaches gets no gradient (its ``.grad`` stays None),
so AdamW skips it (no momentum step, no weight decay), as in the official code. Under DDP that
needs ``find_unused_parameters`` (the heads of the other step kind); ``oneref.factory`` turns it
on for this task.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from oneref.errors import UserError
from oneref.models.vqkd import VQKD, VQKDConfig
from oneref.tasks.base import OneRefModule
from oneref.tasks.losses import mlm_accuracy

log = logging.getLogger(__name__)

VQKD_RELEASE = "vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth"
VQKD_HELP = (
    f"the MIM targets come from BEiT v2's VQ-KD tokenizer {VQKD_RELEASE} (github.com/microsoft/unilm, "
    "beit2/README.md, 'visual tokenizer'); download it and set task.vqkd.checkpoint=PATH, or set "
    "task.vqkd.checkpoint=null to use a randomly initialised tokenizer (task.vqkd.random), a "
    "random-projection target that only suits demonstrations"
)


def step_kind(global_step: int, period: int = 2, mim_first: bool = True) -> str:
    """``mim`` or ``mlm`` for a global step: official ``global_step % 2 == 0`` is MIM."""
    first = (global_step % period) == 0
    return "mim" if first == mim_first else "mlm"


def build_vqkd(cfg: dict[str, Any], img_size: int, patch_size: int) -> VQKD:
    """The frozen tokenizer from ``task.vqkd``: the released checkpoint, or a seeded random one."""
    path = cfg.get("checkpoint")
    if path:
        from oneref.checkpoint.vqkd import load_vqkd

        path = Path(str(path)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"VQ-KD checkpoint not found: {path}; {VQKD_HELP}")
        vqkd, report = load_vqkd(path)
        log.info("VQ-KD tokenizer: %s", report.summary().splitlines()[0])
    else:
        rand = dict(cfg.get("random") or {})
        seed = int(rand.pop("seed", 0))
        rand.setdefault("img_size", img_size)
        rand.setdefault("patch_size", patch_size)
        with torch.random.fork_rng(devices=[]):  # leaves the training RNG untouched
            torch.manual_seed(seed)
            vqkd = VQKD(VQKDConfig(**rand))
            for m in vqkd.modules():  # a random projection needs O(1) features, not the zero init
                if isinstance(m, torch.nn.Linear):
                    torch.nn.init.normal_(m.weight, std=m.in_features**-0.5)
            torch.nn.init.normal_(vqkd.encoder.pos_embed, std=0.02)
        log.warning("VQ-KD tokenizer: randomly initialised (seed %d): a random-projection MIM target", seed)
    if vqkd.cfg.patch_size != patch_size or img_size % vqkd.cfg.patch_size:
        raise ValueError(
            f"the VQ-KD tokenizer has {vqkd.cfg.patch_size} px patches (a "
            f"{img_size // vqkd.cfg.patch_size}x{img_size // vqkd.cfg.patch_size} grid at {img_size} px) but the model "
            f"has {patch_size} px patches (a {img_size // patch_size}x{img_size // patch_size} grid): the MIM targets "
            "must be one code per model patch; use a tokenizer with the model's patch size"
        )
    return vqkd


class MRefMModule(OneRefModule):
    """MRefM pretraining. Args as :class:`oneref.tasks.base.OneRefModule`; ``task`` holds
    ``frozen_backbone``, ``losses`` (official flags: ``use_box_mask_constraints``,
    ``enable_mim_vts``, ``enable_mlm_sts``, ``mlm`` options; MIM and MLM always run),
    ``alternation`` (``period``, ``mim_first``) and ``vqkd`` (``checkpoint`` or ``random``,
    ``codebook_size``)."""

    TASKS = ("mrefm",)
    is_res = False

    def __init__(
        self, model: dict[str, Any], task: dict[str, Any], optim: dict[str, Any], **kwargs: Any
    ) -> None:
        super().__init__(model, task, optim, **kwargs)
        alternation = dict(task.get("alternation") or {})
        self.period = int(alternation.get("period", 2))
        self.mim_first = bool(alternation.get("mim_first", True))
        if self.period < 2:
            raise UserError(f"task.alternation.period must be >= 2, got {self.period}")
        self.freeze_unreached(bool(task.get("frozen_backbone", False)))
        # not a submodule (a plain dict): frozen, outside the optimizer, the checkpoints, .train()
        self._frozen: dict[str, VQKD] = {}

    def heads(self, task: Mapping[str, Any]) -> dict[str, Any]:
        codes = int((task.get("vqkd") or {}).get("codebook_size", 8192))
        return {"mim_codebook_size": codes, "mlm_head": True}

    def forced_losses(self) -> dict[str, bool]:
        return {"enable_mim": True, "enable_mlm": True}

    # -- the frozen tokenizer ------------------------------------------------------------------------
    @property
    def vqkd(self) -> VQKD:
        if "vqkd" not in self._frozen:
            cfg = self.model.cfg
            vqkd = build_vqkd(dict(self.hparams.task.get("vqkd") or {}), cfg.img_size, cfg.patch_size)
            if vqkd.cfg.num_codes != cfg.mim_codebook_size:
                raise ValueError(
                    f"the VQ-KD tokenizer has {vqkd.cfg.num_codes} codes but task.vqkd.codebook_size is "
                    f"{cfg.mim_codebook_size}: set task.vqkd.codebook_size={vqkd.cfg.num_codes}"
                )
            self._frozen["vqkd"] = vqkd
        return self._frozen["vqkd"].to(self.device)

    def setup(self, stage: str) -> None:
        _ = self.vqkd  # a missing or mismatched tokenizer fails before the first step

    # -- steps -------------------------------------------------------------------------------------------
    def step_kind(self, global_step: int | None = None) -> str:
        return step_kind(
            self.global_step if global_step is None else global_step, self.period, self.mim_first
        )

    def forward(self, batch: dict[str, Any], kind: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The model's outputs and the criterion's targets for a step of ``kind``."""
        self._check_batch(batch)
        pad = batch["text_padding_mask"] if batch.get("text_padded", True) else None
        flags = self.criterion.flags
        targets: dict[str, Tensor] = {"box": batch["box"], "obj_mask": batch["obj_mask"]}
        if kind == "mim":
            out = self.model(
                batch["image"],
                batch["text_ids"],
                pad,
                batch["mim_mask"],
                mim_positions=batch["mim_positions"],
                mim_vts=flags.enable_mim_vts,
            )
            with torch.no_grad():  # targets: one code per patch of the un-normalised letterbox
                codes = self.vqkd.get_codebook_indices(batch["vqkd_image"].float() / 255)
            targets.update(
                mim_codes=torch.gather(codes, 1, batch["mim_positions"]),
                mim_mask=batch["mim_valid"],
                mim_vts=batch["mim_vts"],
            )
        elif kind == "mlm":
            out = self.model(
                batch["image"],
                batch["mlm_text_ids"],
                pad,
                mlm_positions=batch["mlm_positions"],
                mlm_sts=flags.enable_mlm_sts,
            )
            targets.update(mlm_labels=batch["mlm_labels"], mlm_valid=batch["mlm_valid"])
            if flags.enable_mlm_sts:
                targets["mlm_sts_labels"] = batch["mlm_sts_labels"]
        else:
            raise ValueError(f"unknown MRefM step kind {kind!r}; choose mim or mlm")
        return out, targets

    @staticmethod
    def _check_batch(batch: dict[str, Any]) -> None:
        if "mim_mask" not in batch:
            raise KeyError(
                "the batch has no MRefM fields (mim_mask, mlm_text_ids, ...): task=mrefm needs "
                "data.mrefm.enabled=true (conf/task/mrefm.yaml sets it)"
            )

    def _accuracy(self, kind: str, out: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
        if kind == "mim":
            valid = targets["mim_mask"]
            hits = (out["mim_logits"].argmax(-1) == targets["mim_codes"]) & valid
            return hits.sum().float() / valid.sum().clamp_min(1)
        return mlm_accuracy(out["mlm_logits"], targets["mlm_labels"], targets["mlm_valid"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        kind = self.step_kind()
        out, targets = self(batch, kind)
        losses = self.criterion(out, targets, logit_scale=self.model.logit_scale, step=self.global_step)
        bs = batch["image"].shape[0]
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items() if k != "loss"}, batch_size=bs)
        self.log(f"train/{kind}_acc", self._accuracy(kind, out, targets).detach(), batch_size=bs)
        self.log("train/loss", losses["loss"].detach(), batch_size=bs, prog_bar=True)
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Both kinds on every validation batch (fixed masks: evaluation splits draw them with epoch
        0): ``val/mim_loss``, ``val/mim_acc``, ``val/mlm_loss``, ``val/mlm_acc``, ``val/acc`` (their
        mean, the monitored metric) and ``val/loss`` (the sum of both steps' losses)."""
        bs = batch["image"].shape[0]
        total, accs = 0.0, []
        for kind in ("mim", "mlm"):
            out, targets = self(batch, kind)
            losses = self.criterion(out, targets, logit_scale=self.model.logit_scale, step=self.global_step)
            acc = self._accuracy(kind, out, targets)
            self.log(f"val/{kind}_loss", losses[f"loss_{kind}"], batch_size=bs, sync_dist=True)
            self.log(f"val/{kind}_acc", acc, batch_size=bs, sync_dist=True, prog_bar=True)
            total = total + losses["loss"]
            accs.append(acc)
        self.log("val/loss", total, batch_size=bs, sync_dist=True)
        self.log("val/acc", (accs[0] + accs[1]) / 2, batch_size=bs, sync_dist=True)
