"""Mask Referring Modeling (MRefM) inputs, built per sample in the data pipeline.

MRefM pretraining alternates MIM steps (even global steps) and MLM steps (odd). The model picks
the step kind; the data pipeline builds the inputs of both kinds for every training sample (all
cheap), so that no tokenisation, parsing or masking runs in the model's forward (official
``models/OneRef_model.py`` ``_get_text_token_and_masking_modeling`` does them there).

Per sample (:class:`MRefMBuilder`):

- MIM: the referring-aware patch mask (``oneref.data.masking.ReferringMaskGenerator``) and the VTS
  targets (``visual_target_relation_scores``) of the sample's letterboxed box, as the official
  ``DataAugmentationForMIM``; the VQ-KD image is the same augmented letterbox before
  normalisation, written by the collate as uint8 (``TransformResult.write_uint8``);
- MLM: the referring-aware text masking (``oneref.data.text_masking``) anchored on the subject and
  object words parsed once per split file (``oneref.data.anchors``).

Each random draw has its own generator seeded by (seed, epoch, index), so batches do not depend
on the number of loader workers. :func:`collate_mrefm` lays the fields out with static shapes; see
its docstring for the batch keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from oneref.config import options_from
from oneref.data.anchors import Anchors, anchor_piece_indices
from oneref.data.masking import ReferringMaskGenerator, visual_target_relation_scores
from oneref.data.text_masking import MASK_PROB, mask_text, masked_token_count, sample_rng
from oneref.data.tokenizer import PAD_ID

MIM_STREAM = 0x4D494D  # "MIM": the image-mask generator's stream, apart from augmentation and text
IGNORED_LABEL = -100  # mlm_labels of unused slots (torch's cross-entropy ignore_index)
MIM_NUM_SCALES = 6  # official DataAugmentationForMIM: long sides S, S-32, ..., S-160 (384 .. 224)


@dataclass(frozen=True)
class MRefMConfig:
    """``data.mrefm``: the MRefM batch fields (off by default; training and validation splits).

    Official values: ``mim_mask_ratio`` 0.35 (``--mim_mask_ratio``), ``dynamic_mask_ratio`` 0.75
    (``--dynamic_mask_ratio``), ``text_mask_prob`` 0.4 (``--text_mask_prob``), spaCy
    ``en_core_web_md``, 6 training scales. ``mlm_slots``: the masked-position slots K of a batch are
    the batch's largest count rounded up to a multiple of ``mlm_slots`` (few distinct shapes), or,
    with 0, always the largest possible count at ``max_query_len`` (one shape).
    """

    enabled: bool = False
    patch_size: int = 16
    mim_mask_ratio: float = 0.35
    dynamic_mask_ratio: float = 0.75
    text_mask_prob: float = MASK_PROB
    mim_scales: bool = True  # 6 long-side scales as DataAugmentationForMIM; false = the 7 of grounding
    spacy_model: str | None = None  # package name or folder; None = the rule-based fallback
    spacy_batch_size: int = 512
    spacy_processes: int = 1
    cache_dir: str | None = None  # anchor cache; None = $ONEREF_CACHE/anchors or .cache/anchors
    mlm_slots: int = 8

    def __post_init__(self) -> None:
        if self.patch_size < 1:
            raise ValueError(f"data.mrefm.patch_size must be >= 1, got {self.patch_size}")
        if not 0 <= self.text_mask_prob <= 1:
            raise ValueError(f"data.mrefm.text_mask_prob must be in [0, 1], got {self.text_mask_prob}")
        if self.mlm_slots < 0:
            raise ValueError(f"data.mrefm.mlm_slots must be >= 0 (0 = one fixed size), got {self.mlm_slots}")
        ReferringMaskGenerator(1, self.mim_mask_ratio, self.dynamic_mask_ratio)  # checks the ratios

    @classmethod
    def from_any(cls, value: MRefMConfig | Mapping[str, Any] | None) -> MRefMConfig:
        return options_from(cls, value, "data.mrefm")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def max_masked(self, max_query_len: int) -> int:
        """Most masked positions a sample can have (the count of the longest expression)."""
        return masked_token_count(max_query_len, self.text_mask_prob)

    def slots(self, largest: int, max_query_len: int) -> int:
        """K for a batch whose largest masked count is ``largest``."""
        cap = self.max_masked(max_query_len)
        if self.mlm_slots == 0:
            return cap
        return min(max(math.ceil(largest / self.mlm_slots), 1) * self.mlm_slots, max(cap, largest))


class MRefMBuilder:
    """Builds one training sample's MRefM fields (see the module docstring)."""

    def __init__(self, cfg: MRefMConfig, img_size: int, mask_id: int, vocab_size: int) -> None:
        if img_size % cfg.patch_size:
            raise ValueError(
                f"data.mrefm: img_size {img_size} is not a multiple of patch_size {cfg.patch_size}"
            )
        self.cfg = cfg
        self.grid = img_size // cfg.patch_size
        self.generator = ReferringMaskGenerator(self.grid, cfg.mim_mask_ratio, cfg.dynamic_mask_ratio)
        self.mask_id = int(mask_id)
        self.vocab_size = int(vocab_size)

    def __call__(
        self,
        box_cxcywh: np.ndarray,
        text_ids: np.ndarray,
        pieces: Sequence[str],
        anchors: Anchors,
        seed: int,
        epoch: int,
        index: int,
    ) -> dict[str, Any]:
        mim_rng = np.random.default_rng([seed, epoch, index, MIM_STREAM])
        sbj, obj = anchor_piece_indices(pieces, anchors)
        masked = mask_text(
            text_ids,
            sample_rng(seed, epoch, index),
            self.mask_id,
            self.vocab_size,
            self.cfg.text_mask_prob,
            sbj,
            obj,
        )
        return {
            "mim_mask": self.generator(box_cxcywh, mim_rng).reshape(-1),
            "mim_vts": visual_target_relation_scores(box_cxcywh, self.grid),
            "mlm": masked,
            "anchor_index": (-1 if sbj is None else sbj, -1 if obj is None else obj),
        }


MIM_SLOTS = 16  # masked-patch slots of a batch: its largest count rounded up to a multiple of this


def mask_positions(mask: torch.Tensor, slots: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A (B, N) bool mask as static-size slots: the True indices of each row, ascending, padded
    with 0 to K = the largest count rounded up to a multiple of ``slots`` (capped at N), and the
    (B, K) validity. Row-major over the valid slots is the official ``x[mask]`` order."""
    b, n = mask.shape
    counts = mask.sum(1)
    k = min(n, -(-max(int(counts.max()), 1) // slots) * slots)
    # a stable sort puts the True indices first, in ascending order
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :k]
    valid = torch.arange(k)[None, :] < counts[:, None]
    return torch.where(valid, order, 0), valid


def collate_mrefm(
    samples: Sequence[Mapping[str, Any]], width: int, cfg: MRefMConfig, max_query_len: int
) -> dict[str, torch.Tensor]:
    """The MRefM batch fields of samples built by :class:`MRefMBuilder` (``sample["mrefm"]``).

    ``width`` is the text width L of the batch's ``text_ids``. Keys (G = img_size / patch_size):

    - ``mim_mask`` bool (B, G*G): True = patch replaced by the mask token on MIM steps;
    - ``mim_vts`` float32 (B, G*G, 4): visual target-relation score targets;
    - ``mim_positions`` int64 (B, K_mim), ``mim_valid`` bool (B, K_mim): the masked patches as
      static-size slots (``mask_positions``), where the MIM logits are computed;
    - ``mlm_text_ids`` int64 (B, L): the masked ids for MLM steps, padded like ``text_ids``;
    - ``mlm_positions`` int64 (B, K): masked positions, ascending, then 0 in unused slots;
    - ``mlm_labels`` int64 (B, K): the original ids there, -100 in unused slots;
    - ``mlm_valid`` bool (B, K): which slots are used. The used slots in row-major order are the
      official ``text_ids[masked_pos]`` order of the MLM logits and labels;
    - ``mlm_anchor_index`` int64 (B, 2): subject and object piece index (-1 = none), for reports.

    The VQ-KD image (``vqkd_image``) is written by ``RefCollate`` from the transform results.
    """
    parts = [s["mrefm"] for s in samples]
    b = len(parts)
    masked = [p["mlm"] for p in parts]
    k = cfg.slots(max(len(m.positions) for m in masked), max_query_len)
    ids = np.full((b, width), PAD_ID, dtype=np.int64)
    positions = np.zeros((b, k), dtype=np.int64)
    labels = np.full((b, k), IGNORED_LABEL, dtype=np.int64)
    valid = np.zeros((b, k), dtype=bool)
    for r, m in enumerate(masked):
        ids[r, : len(m.ids)] = m.ids
        n = len(m.positions)
        positions[r, :n] = m.positions
        labels[r, :n] = m.labels
        valid[r, :n] = True
    mim_mask = torch.from_numpy(np.stack([p["mim_mask"] for p in parts]))
    mim_positions, mim_valid = mask_positions(mim_mask, MIM_SLOTS)
    return {
        "mim_mask": mim_mask,
        "mim_positions": mim_positions,
        "mim_valid": mim_valid,
        "mim_vts": torch.from_numpy(np.stack([p["mim_vts"] for p in parts])),
        "mlm_text_ids": torch.from_numpy(ids),
        "mlm_positions": torch.from_numpy(positions),
        "mlm_labels": torch.from_numpy(labels),
        "mlm_valid": torch.from_numpy(valid),
        "mlm_anchor_index": torch.tensor([p["anchor_index"] for p in parts], dtype=torch.int64),
    }
