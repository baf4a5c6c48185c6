"""Referring-aware masking targets of MRefM (official
``datasets/masking_generator.py`` ``Dynamic_MIM_MaskGenerator`` and
``Visual_Target_Relation_Score_Generator``), built in the data pipeline.

- :class:`ReferringMaskGenerator`: the official ``Dynamic_MIM_MaskGenerator``. The referred box,
  in patch units, truncated toward zero and grown by a 1-patch margin (clipped to the grid), is the
  *region*. A uniformly random ``mim_mask_ratio`` of the whole grid is masked, then the region is
  overwritten by an independent uniformly random ``dynamic_mask_ratio`` of its own cells: about 35 %
  of the patches outside the referred object and exactly ``L - int(L * 0.25)`` of the L region
  patches inside it. The official code draws each subset by picking one of 10 random permutations;
  one permutation is the same distribution.
- :func:`visual_target_relation_scores`: the VTS targets, per patch (row j, column i)
  ``[(i - cx G)/G, (j - cy G)/G, 1/max(w G, 1), 1/max(h G, 1)]`` (the integer patch index, not its
  centre, as the official generator), row-major (G*G, 4).

Both take the box as normalised (cx, cy, w, h) in the letterbox, as the datasets return it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MARGIN = 1  # patches added on every side of the box (hard-coded in the official generator)


def _masked_count(n: int, ratio: float) -> int:
    # official: n - int(n * (1 - ratio)) cells are masked
    return n - int(n * (1 - ratio))


@dataclass(frozen=True)
class ReferringMaskGenerator:
    grid: int
    mim_mask_ratio: float = 0.35  # whole image (official --mim_mask_ratio)
    dynamic_mask_ratio: float = 0.75  # inside the referred region (official --dynamic_mask_ratio)

    def __post_init__(self) -> None:
        for name in ("mim_mask_ratio", "dynamic_mask_ratio"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")

    def region(self, box_cxcywh: Sequence[float]) -> tuple[int, int, int, int]:
        """(row0, row1, col0, col1), half-open, of the box grown by the margin, in patches."""
        g = self.grid
        cx, cy, w, h = (float(v) * g for v in box_cxcywh)
        # float32 like the official tensor arithmetic, then truncation toward zero (.int())
        x1, y1, x2, y2 = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dtype=np.float32).astype(
            np.int64
        )
        x1, y1 = max(int(x1) - MARGIN, 0), max(int(y1) - MARGIN, 0)
        x2, y2 = min(int(x2) + MARGIN, g), min(int(y2) + MARGIN, g)
        # the official region is never empty: at least one row and one column
        return y1, max(y2, y1 + 1), x1, max(x2, x1 + 1)

    def __call__(self, box_cxcywh: Sequence[float], rng: np.random.Generator) -> np.ndarray:
        """Bool (grid, grid) mask, True = patch replaced by the mask token."""
        g = self.grid
        mask = np.zeros(g * g, dtype=bool)
        mask[rng.permutation(g * g)[: _masked_count(g * g, self.mim_mask_ratio)]] = True
        mask = mask.reshape(g, g)
        r0, r1, c0, c1 = self.region(box_cxcywh)
        n = (r1 - r0) * (c1 - c0)
        inside = np.zeros(n, dtype=bool)
        inside[rng.permutation(n)[: _masked_count(n, self.dynamic_mask_ratio)]] = True
        mask[r0:r1, c0:c1] = inside.reshape(r1 - r0, c1 - c0)
        return mask


@functools.lru_cache(maxsize=8)
def _patch_indices(g: int) -> tuple[np.ndarray, np.ndarray]:
    # built once per grid size: this runs for every training sample with MRefM on
    rows, cols = np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32), indexing="ij")
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


def visual_target_relation_scores(box_cxcywh: Sequence[float], grid: int) -> np.ndarray:
    """(grid*grid, 4) float32 VTS targets of one box, row-major over the patch grid."""
    g = grid
    cx, cy, w, h = (np.float32(v) * np.float32(g) for v in box_cxcywh)
    w, h = max(w, np.float32(1)), max(h, np.float32(1))
    rows, cols = _patch_indices(g)
    out = np.empty((g, g, 4), dtype=np.float32)
    out[..., 0] = (cols - cx) / np.float32(g)
    out[..., 1] = (rows - cy) / np.float32(g)
    out[..., 2] = np.float32(1) / w
    out[..., 3] = np.float32(1) / h
    return out.reshape(g * g, 4)
