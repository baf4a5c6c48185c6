"""Box geometry shared by the losses and the metrics.

Boxes are ``(..., 4)`` tensors: ``cxcywh`` (centre, width, height) or ``xyxy`` (corners). All
functions are element-wise over the leading dimensions (pairs, not all-vs-all matrices), so a
batch of B predictions against B targets costs O(B).
"""

from __future__ import annotations

import torch
from torch import Tensor


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    # Same operation order as the official xywh2xyxy (bit-identical results).
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def _inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter, area_a + area_b - inter


def generalized_box_iou_pairwise(a: Tensor, b: Tensor) -> Tensor:
    """GIoU of each ``a[i]`` with ``b[i]`` (xyxy).

    Numerically the diagonal of DETR's all-pairs ``generalized_box_iou`` (same operations per
    pair). Unlike DETR it does not assert ``x2 >= x1``: that check is a host sync on every step.
    Degenerate boxes (zero-area enclosing box) give NaN.
    """
    inter, union = _inter_union(a, b)
    iou = inter / union
    lt = torch.minimum(a[..., :2], b[..., :2])
    rb = torch.maximum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing


def box_iou_eval(pred_xyxy: Tensor, gt_xyxy: Tensor) -> Tensor:
    """Per-pair IoU exactly as the official ``bbox_iou`` (``+1e-16`` in the denominator).

    The operation order follows the official code so that float32 results, and hence
    ``>= threshold`` decisions, are bit-identical.
    """
    p_x1, p_y1, p_x2, p_y2 = pred_xyxy.unbind(-1)
    g_x1, g_y1, g_x2, g_y2 = gt_xyxy.unbind(-1)
    iw = (torch.minimum(p_x2, g_x2) - torch.maximum(p_x1, g_x1)).clamp(min=0)
    ih = (torch.minimum(p_y2, g_y2) - torch.maximum(p_y1, g_y1)).clamp(min=0)
    inter = iw * ih
    area_p = (p_x2 - p_x1) * (p_y2 - p_y1)
    area_g = (g_x2 - g_x1) * (g_y2 - g_y1)
    return inter / (area_p + area_g - inter + 1e-16)


def letterbox_to_original(boxes_xyxy: Tensor, letterbox: Tensor, orig_size: Tensor) -> Tensor:
    """Map xyxy pixel boxes of the padded square back to original-image pixels.

    ``letterbox`` (B,3) = (ratio, left, top) with ``padded = orig * ratio + (left, top)``;
    ``orig_size`` (B,2) = (h, w). The result is clamped to the image.
    """
    ratio, left, top = letterbox.unbind(-1)
    shift = torch.stack((left, top, left, top), dim=-1)
    out = (boxes_xyxy - shift) / ratio.unsqueeze(-1)
    h, w = orig_size.to(out.dtype).unbind(-1)
    upper = torch.stack((w, h, w, h), dim=-1)
    return torch.minimum(out.clamp(min=0), upper)
