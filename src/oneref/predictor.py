"""A model ready to run on images and expressions, without a Trainer.

:class:`Predictor` holds the network, its tokenizer and its preprocessing (the official evaluation
letterbox), batches the queries, and maps every result back to the image's own pixels: the box
(xyxy) for every model, the mask at the image's size for RES models, by the same rule as the
original-resolution metrics (oneref.tasks.metrics).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_convert

from oneref.data.datasets import RefCollate
from oneref.data.tokenizer import Tokenizer
from oneref.data.transforms import ObjMask, eval_transform, letterbox_to_original
from oneref.models.oneref import OneRef
from oneref.tasks.metrics import res_pred_mask_original


@dataclass
class Prediction:
    """One query's result, in the pixels of the image as given (width x height)."""

    text: str
    box_xyxy: np.ndarray  # float32 (4,) x1, y1, x2, y2
    image_size: tuple[int, int]  # (width, height)
    mask: np.ndarray | None = None  # bool (height, width), RES models only


class Predictor:
    """``predict(images, texts)`` for a OneRef model.

    Args:
        model: the network (any heads; a seg head adds masks).
        tokenizer: the tokenizer it was trained with.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, or a torch.device.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on the CPU) or ``fp32``.
        batch_size: queries per forward.
    """

    def __init__(
        self,
        model: OneRef,
        tokenizer: Tokenizer,
        *,
        device: str | torch.device = "auto",
        precision: str = "auto",
        batch_size: int = 16,
    ) -> None:
        if precision not in ("auto", "fp32"):
            raise ValueError(f"precision must be 'auto' or 'fp32', got {precision!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.collate = RefCollate(tokenizer.max_query_len, tokenizer=tokenizer)
        self.bf16 = self.device.type == "cuda" and precision == "auto"
        self.batch_size = int(batch_size)

    @property
    def img_size(self) -> int:
        return self.model.cfg.img_size

    @property
    def has_masks(self) -> bool:
        return self.model.cfg.seg_head

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[Prediction]:
        """One prediction per (image, text) pair; ``images`` are RGB PIL images."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts: give one text per image")
        out: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            out += self._batch(
                images[start : start + self.batch_size], texts[start : start + self.batch_size]
            )
        return out

    def _batch(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[Prediction]:
        size = self.img_size
        # no ground truth: an empty box and mask ride along through the transform
        results = [
            eval_transform(
                img,
                np.zeros(4, np.float32),
                ObjMask(rows=np.zeros(img.height, bool), cols=np.zeros(img.width, bool)),
                size,
            )
            for img in images
        ]
        # the batch assembly of training and evaluation (normalise, letterbox, tokenise)
        batch = self.collate(
            [
                {"result": r, "text_ids": None, "index": k, "phrase": t, "image_file": ""}
                for k, (r, t) in enumerate(zip(results, texts))
            ]
        )
        pad = batch["text_padding_mask"].to(self.device) if batch["text_padded"] else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(batch["image"].to(self.device), batch["text_ids"].to(self.device), pad)
        letterbox, orig_size = batch["letterbox"], batch["orig_size"].float()
        boxes = box_convert(out["pred_box"].float().cpu(), "cxcywh", "xyxy") * size
        boxes = letterbox_to_original(boxes, letterbox, orig_size)
        masks = None
        if "seg_mask" in out:
            canvas = (max(img.height for img in images), max(img.width for img in images))
            masks = res_pred_mask_original(out["seg_mask"].float().cpu(), letterbox, orig_size, size, canvas)
        return [
            Prediction(
                text=t,
                box_xyxy=boxes[k].numpy(),
                image_size=(img.width, img.height),
                mask=None if masks is None else masks[k, : img.height, : img.width].numpy(),
            )
            for k, (img, t) in enumerate(zip(images, texts))
        ]
