"""Drawing predictions: boxes and masks on images with a caption, and panels of tiles.

Used by the validation-image callback (oneref.tasks.callbacks) and by prediction. Ground truth
is green, the prediction red; masks are tinted with a crisp outline.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from oneref.data.transforms import IMAGENET_MEAN, IMAGENET_STD

GT_COLOUR = (0, 220, 0)
PRED_COLOUR = (255, 40, 40)
CAPTION_HEIGHT = 14
MIN_TILE = 128  # small images (the synthetic default) are enlarged to at least this side


def denormalise(
    images: Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> np.ndarray:
    """(B,3,H,W) normalised float -> (B,H,W,3) uint8."""
    m = images.new_tensor(mean).view(1, 3, 1, 1)
    s = images.new_tensor(std).view(1, 3, 1, 1)
    pixels = ((images.float() * s + m).clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def enlarge(batch: np.ndarray, zoom: int) -> np.ndarray:
    """Nearest-neighbour upscale of (B,H,W[,C]) arrays by an integer factor."""
    return batch if zoom == 1 else batch.repeat(zoom, axis=1).repeat(zoom, axis=2)


def _tint(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], alpha: float) -> np.ndarray:
    out = rgb.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, dtype=np.float32)
    return out.round().astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a binary mask (4-neighbourhood), for a crisp edge on top of the tint."""
    m = np.pad(mask, 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def draw_sample(
    image: np.ndarray,
    caption: str,
    gt_box: np.ndarray | None = None,
    pred_box: np.ndarray | None = None,
    gt_mask: np.ndarray | None = None,
    pred_mask: np.ndarray | None = None,
) -> np.ndarray:
    """One tile: the (H,W,3) uint8 image with boxes (xyxy pixels) or masks drawn, and a caption
    strip underneath. Ground truth green, prediction red."""
    rgb = image
    for mask, colour in ((gt_mask, GT_COLOUR), (pred_mask, PRED_COLOUR)):
        if mask is not None:
            rgb = _tint(rgb, mask, colour, 0.35)
            rgb = _tint(rgb, _outline(mask), colour, 1.0)
    h, w = rgb.shape[:2]
    tile = Image.new("RGB", (w, h + CAPTION_HEIGHT), (0, 0, 0))
    tile.paste(Image.fromarray(rgb), (0, 0))
    draw = ImageDraw.Draw(tile)
    width = max(1, round(max(h, w) / 128))
    for box, colour in ((gt_box, GT_COLOUR), (pred_box, PRED_COLOUR)):
        if box is not None:
            draw.rectangle([float(v) for v in box], outline=colour, width=width)
    draw.text((2, h + 1), caption, fill=(255, 255, 255))
    return np.asarray(tile)


def make_grid(tiles: list[np.ndarray], columns: int = 4, gap: int = 2) -> np.ndarray:
    """Tiles of equal size -> one (H,W,3) uint8 panel."""
    rows = -(-len(tiles) // columns)
    cols = min(columns, len(tiles))
    th, tw = tiles[0].shape[:2]
    grid = np.full((rows * th + (rows - 1) * gap, cols * tw + (cols - 1) * gap, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * (th + gap) : r * (th + gap) + th, c * (tw + gap) : c * (tw + gap) + tw] = tile
    return grid


# inferno's colours at 0, 1/4, 1/2, 3/4, 1 (matplotlib): dark = low similarity, bright = high
HEAT_STOPS = np.array(
    [(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float32
)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """(H,W) float -> (H,W,3) uint8 colours, stretched from the map's minimum to its maximum."""
    v = values.astype(np.float32)
    lo, hi = float(v.min()), float(v.max())
    t = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    x = t * (len(HEAT_STOPS) - 1)
    i = np.minimum(x.astype(np.int64), len(HEAT_STOPS) - 2)
    f = (x - i)[..., None]
    return ((1 - f) * HEAT_STOPS[i] + f * HEAT_STOPS[i + 1]).round().astype(np.uint8)


def overlay_heatmap(image: np.ndarray, values: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """The (h,w) map ``values`` resized (bilinear) to the (H,W,3) uint8 ``image`` and blended onto
    it as colours (:func:`heat_colours`)."""
    h, w = image.shape[:2]
    resized = np.asarray(Image.fromarray(values.astype(np.float32)).resize((w, h), Image.BILINEAR))
    blend = (1 - alpha) * image.astype(np.float32) + alpha * heat_colours(resized).astype(np.float32)
    return blend.round().astype(np.uint8)
